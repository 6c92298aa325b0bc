//! The server side of the SOCKS5 handshake as a sans-IO state machine.
//!
//! [`Handshake`] goes through method selection (RFC 1928 §3), the optional username/password
//! subnegotiation (RFC 1929) and the request (RFC 1928 §4). It owns no socket and no clock: the
//! driver keeps the received bytes in a buffer, calls [`Handshake::handle_input`] with everything
//! not consumed yet, and acts on the returned [`Step`] (send bytes, drop consumed input, read
//! more, close). The handshake deadline is the driver's business.
//!
//! Method choice: with credentials configured only 0x02 (username/password) is acceptable; without,
//! only 0x00 (no authentication). Anything else gets `05 FF` and a close.

use std::fmt;

use subtle::{Choice, ConstantTimeEq};

use super::proto::{
    Decoded, Method, ProtocolError, Reply, Request, decode_greeting, decode_request,
    decode_user_pass, encode_method_selection, encode_user_pass_status,
};

/// Username and password required from clients (RFC 1929).
///
/// `Debug` does not print the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    username: String,
    password: String,
}

/// Credentials that RFC 1929 cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    /// The username is empty or longer than 255 bytes.
    #[error("username must be 1 to 255 bytes long")]
    UsernameLength,
    /// The password is empty or longer than 255 bytes.
    #[error("password must be 1 to 255 bytes long")]
    PasswordLength,
}

impl Credentials {
    /// Credentials a client must present.
    ///
    /// # Errors
    ///
    /// A field that is empty or longer than 255 bytes (RFC 1929 ULEN/PLEN) is rejected.
    pub fn new(
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Result<Self, CredentialsError> {
        let (username, password) = (username.into(), password.into());
        if !(1..=255).contains(&username.len()) {
            return Err(CredentialsError::UsernameLength);
        }
        if !(1..=255).contains(&password.len()) {
            return Err(CredentialsError::PasswordLength);
        }
        Ok(Self { username, password })
    }

    /// The username.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// Compares presented credentials in constant time: the time taken depends neither on the
    /// contents nor on the lengths of either side.
    pub fn verify(&self, username: &[u8], password: &[u8]) -> bool {
        // Lengths above 255 cannot come off the wire; rejecting them keeps `padded` injective.
        let in_range = Choice::from(u8::from(username.len() <= 255 && password.len() <= 255));
        let user_ok = padded(self.username.as_bytes()).ct_eq(&padded(username));
        let pass_ok = padded(self.password.as_bytes()).ct_eq(&padded(password));
        bool::from(in_range & user_ok & pass_ok)
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A field as a fixed-size block: its length (saturated at 255) then its first 255 bytes, zero
/// padded. Equal blocks mean equal fields for fields of at most 255 bytes, which is all that
/// `Credentials::new` and the wire format allow.
fn padded(field: &[u8]) -> [u8; 256] {
    let mut block = [0u8; 256];
    let len = field.len().min(255);
    block[0] = u8::try_from(len).unwrap_or(u8::MAX);
    block[1..=len].copy_from_slice(&field[..len]);
    block
}

/// Why a handshake ended without a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The client sent bytes that are not a valid SOCKS5 message.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The client offered no method this server accepts.
    #[error("no acceptable authentication method offered")]
    NoAcceptableMethod,
    /// The client presented wrong credentials.
    #[error("authentication failed for user {username:?}")]
    AuthFailed {
        /// The username the client presented (lossily decoded; never the password).
        username: String,
    },
}

/// What the driver must do next.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub enum Step {
    /// The input is an unfinished message: read more bytes, then call again with all unconsumed
    /// bytes.
    NeedMore,
    /// Drop the first `consumed` input bytes, send `reply`, and call again with the rest.
    Send {
        /// Input bytes used up by the message just handled.
        consumed: usize,
        /// Bytes to send to the client.
        reply: Vec<u8>,
    },
    /// The handshake is done. Drop the first `consumed` input bytes (any bytes after them are
    /// early payload for the target), carry out `request`, and answer with a [`Reply`].
    Request {
        /// Input bytes used up by the request.
        consumed: usize,
        /// What the client asks for.
        request: Request,
    },
    /// Send `reply` (possibly empty), then close the connection.
    Close {
        /// Last bytes for the client.
        reply: Vec<u8>,
        /// Why the handshake failed.
        error: HandshakeError,
    },
}

/// Server-side SOCKS5 handshake state.
#[derive(Debug)]
pub struct Handshake<'a> {
    credentials: Option<&'a Credentials>,
    stage: Stage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Greeting,
    UserPass,
    Request,
    Finished,
}

impl<'a> Handshake<'a> {
    /// A handshake that requires `credentials` if given, and no authentication otherwise.
    pub fn new(credentials: Option<&'a Credentials>) -> Self {
        Self {
            credentials,
            stage: Stage::Greeting,
        }
    }

    /// Handles the unconsumed input bytes received so far.
    ///
    /// After [`Step::Request`] or [`Step::Close`] the handshake is finished and further calls
    /// return [`Step::NeedMore`] without looking at the input.
    pub fn handle_input(&mut self, input: &[u8]) -> Step {
        match self.stage {
            Stage::Greeting => self.handle_greeting(input),
            Stage::UserPass => self.handle_user_pass(input),
            Stage::Request => self.handle_request(input),
            Stage::Finished => Step::NeedMore,
        }
    }

    fn handle_greeting(&mut self, input: &[u8]) -> Step {
        let (greeting, consumed) = match decode_greeting(input) {
            Ok(Decoded::Incomplete) => return Step::NeedMore,
            Ok(Decoded::Complete(greeting, consumed)) => (greeting, consumed),
            // Bad version or no methods: "no acceptable methods" is the only answer a greeting
            // can carry, and it tells a confused client to give up.
            Err(error) => return self.close(no_acceptable(), error.into()),
        };
        let (wanted, next) = match self.credentials {
            Some(_) => (Method::USER_PASS, Stage::UserPass),
            None => (Method::NO_AUTH, Stage::Request),
        };
        if !greeting.offers(wanted) {
            return self.close(no_acceptable(), HandshakeError::NoAcceptableMethod);
        }
        self.stage = next;
        let mut reply = Vec::with_capacity(2);
        encode_method_selection(wanted, &mut reply);
        Step::Send { consumed, reply }
    }

    fn handle_user_pass(&mut self, input: &[u8]) -> Step {
        let mut failure = Vec::with_capacity(2);
        encode_user_pass_status(false, &mut failure);
        let (user_pass, consumed) = match decode_user_pass(input) {
            Ok(Decoded::Incomplete) => return Step::NeedMore,
            Ok(Decoded::Complete(user_pass, consumed)) => (user_pass, consumed),
            Err(error) => return self.close(failure, error.into()),
        };
        let accepted = self
            .credentials
            .is_some_and(|c| c.verify(user_pass.username, user_pass.password));
        if !accepted {
            let username = String::from_utf8_lossy(user_pass.username).into_owned();
            return self.close(failure, HandshakeError::AuthFailed { username });
        }
        self.stage = Stage::Request;
        let mut reply = Vec::with_capacity(2);
        encode_user_pass_status(true, &mut reply);
        Step::Send { consumed, reply }
    }

    fn handle_request(&mut self, input: &[u8]) -> Step {
        match decode_request(input) {
            Ok(Decoded::Incomplete) => Step::NeedMore,
            Ok(Decoded::Complete(request, consumed)) => {
                self.stage = Stage::Finished;
                Step::Request { consumed, request }
            }
            Err(error) => {
                let mut reply = Vec::with_capacity(10);
                Reply::failure(error.reply_code()).encode(&mut reply);
                self.close(reply, error.into())
            }
        }
    }

    fn close(&mut self, reply: Vec<u8>, error: HandshakeError) -> Step {
        self.stage = Stage::Finished;
        Step::Close { reply, error }
    }
}

fn no_acceptable() -> Vec<u8> {
    let mut reply = Vec::with_capacity(2);
    encode_method_selection(Method::NO_ACCEPTABLE, &mut reply);
    reply
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::socks5::proto::{Command, TargetAddr};

    const CONNECT_V4: [u8; 10] = [5, 1, 0, 1, 100, 64, 0, 7, 0, 22];

    fn target() -> TargetAddr {
        TargetAddr::Ip("100.64.0.7:22".parse().unwrap())
    }

    fn creds() -> Credentials {
        Credentials::new("alice", "s3cret").unwrap()
    }

    #[test]
    fn no_auth_flow() {
        let mut hs = Handshake::new(None);
        assert_eq!(hs.handle_input(&[5]), Step::NeedMore);
        assert_eq!(
            hs.handle_input(&[5, 2, 2, 0]),
            Step::Send {
                consumed: 4,
                reply: vec![5, 0]
            },
            "no auth chosen although the client also offers user/pass"
        );
        assert_eq!(hs.handle_input(&CONNECT_V4[..9]), Step::NeedMore);
        assert_eq!(
            hs.handle_input(&CONNECT_V4),
            Step::Request {
                consumed: 10,
                request: Request {
                    command: Command::Connect,
                    target: target()
                }
            }
        );
        assert_eq!(hs.handle_input(&CONNECT_V4), Step::NeedMore, "finished");
    }

    #[test]
    fn user_pass_flow_with_pipelined_input() {
        let creds = creds();
        let mut hs = Handshake::new(Some(&creds));
        let mut input = vec![5, 2, 0, 2];
        input.extend_from_slice(b"\x01\x05alice\x06s3cret");
        input.extend_from_slice(&CONNECT_V4);
        input.extend_from_slice(b"early data");

        let Step::Send { consumed, reply } = hs.handle_input(&input) else {
            panic!("expected method selection")
        };
        assert_eq!((consumed, reply), (4, vec![5, 2]));
        input.drain(..consumed);
        let Step::Send { consumed, reply } = hs.handle_input(&input) else {
            panic!("expected auth status")
        };
        assert_eq!((consumed, reply), (14, vec![1, 0]));
        input.drain(..consumed);
        let Step::Request { consumed, request } = hs.handle_input(&input) else {
            panic!("expected request")
        };
        assert_eq!(request.target, target());
        assert_eq!(&input[consumed..], b"early data");
    }

    #[test]
    fn wrong_credentials_get_01_01() {
        let creds = creds();
        for (user, pass) in [
            (&b"alice"[..], &b"wrong"[..]),
            (b"bob", b"s3cret"),
            (b"alice", b"s3cret!"),
            (b"alic", b"s3cret"),
        ] {
            let mut hs = Handshake::new(Some(&creds));
            assert!(matches!(hs.handle_input(&[5, 1, 2]), Step::Send { .. }));
            let mut msg = Vec::new();
            crate::socks5::proto::encode_user_pass(user, pass, &mut msg);
            let step = hs.handle_input(&msg);
            let Step::Close { reply, error } = step else {
                panic!("expected close, got {step:?}")
            };
            assert_eq!(reply, [1, 1]);
            assert!(matches!(error, HandshakeError::AuthFailed { .. }));
            assert!(!format!("{error}").contains(std::str::from_utf8(pass).unwrap()));
        }
    }

    #[test]
    fn malformed_user_pass_gets_01_01() {
        let creds = creds();
        let mut hs = Handshake::new(Some(&creds));
        assert!(matches!(hs.handle_input(&[5, 1, 2]), Step::Send { .. }));
        let Step::Close { reply, error } = hs.handle_input(&[1, 0]) else {
            panic!("expected close")
        };
        assert_eq!(reply, [1, 1]);
        assert_eq!(
            error,
            HandshakeError::Protocol(ProtocolError::EmptyUsername)
        );
    }

    #[test]
    fn method_mismatch_gets_05_ff() {
        let creds = creds();
        // Auth required, client offers only "no auth".
        let mut hs = Handshake::new(Some(&creds));
        assert_eq!(
            hs.handle_input(&[5, 1, 0]),
            Step::Close {
                reply: vec![5, 0xFF],
                error: HandshakeError::NoAcceptableMethod
            }
        );
        // No auth configured, client offers only user/pass and GSSAPI.
        let mut hs = Handshake::new(None);
        assert_eq!(
            hs.handle_input(&[5, 2, 2, 1]),
            Step::Close {
                reply: vec![5, 0xFF],
                error: HandshakeError::NoAcceptableMethod
            }
        );
    }

    #[test]
    fn bad_greetings_get_05_ff() {
        for bytes in [&[4u8, 1, 0][..], &[5, 0], b"GET / HTTP/1.1\r\n"] {
            let step = Handshake::new(None).handle_input(bytes);
            let Step::Close { reply, error } = step else {
                panic!("expected close for {bytes:?}, got {step:?}")
            };
            assert_eq!(reply, [5, 0xFF]);
            assert!(matches!(error, HandshakeError::Protocol(_)));
        }
    }

    #[test]
    fn bad_requests_get_their_reply_code() {
        for (bytes, code) in [
            (&[5u8, 1, 0, 9][..], 0x08),
            (&[5, 7, 0, 1], 0x07),
            (&[5, 1, 0, 3, 0], 0x01),
            (&[6, 1, 0, 1], 0x01),
        ] {
            let mut hs = Handshake::new(None);
            assert!(matches!(hs.handle_input(&[5, 1, 0]), Step::Send { .. }));
            let Step::Close { reply, .. } = hs.handle_input(bytes) else {
                panic!("expected close for {bytes:?}")
            };
            assert_eq!(reply, [5, code, 0, 1, 0, 0, 0, 0, 0, 0]);
        }
    }

    #[test]
    fn credentials_validation_and_debug() {
        assert_eq!(
            Credentials::new("", "x"),
            Err(CredentialsError::UsernameLength)
        );
        assert_eq!(
            Credentials::new("x", ""),
            Err(CredentialsError::PasswordLength)
        );
        assert_eq!(
            Credentials::new("x", "p".repeat(256)),
            Err(CredentialsError::PasswordLength)
        );
        let c = Credentials::new("u".repeat(255), "topsecret").unwrap();
        assert!(c.verify("u".repeat(255).as_bytes(), b"topsecret"));
        assert!(!c.verify("u".repeat(256).as_bytes(), b"topsecret"));
        assert!(!format!("{c:?}").contains("topsecret"));
    }
}
