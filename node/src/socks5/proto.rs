//! SOCKS5 wire formats: RFC 1928 (greeting, request, reply, UDP datagram header) and RFC 1929
//! (username/password subnegotiation).
//!
//! Everything here is sans-IO and works on byte slices. Stream decoders (`decode_greeting`,
//! `decode_user_pass`, `decode_request`) return:
//!
//! - `Ok(Decoded::Incomplete)`: the bytes are a valid prefix; read more and call again with the
//!   whole accumulated buffer;
//! - `Ok(Decoded::Complete(msg, consumed))`: a message was decoded from the first `consumed` bytes;
//!   anything after that belongs to the next message (clients may pipeline);
//! - `Err(ProtocolError)`: the bytes can never become a valid message.
//!
//! An error is reported as soon as the offending byte is visible, so a client cannot make a decoder
//! wait for bytes after an invalid header. UDP datagrams (RFC 1928 §7) arrive whole, so
//! [`decode_udp_datagram`] reports a short datagram as [`ProtocolError::Truncated`].
//!
//! Domain names: RFC 1928 carries them as 1..=255 opaque octets. We accept a name only if it is
//! 1..=[`MAX_DOMAIN_LEN`] bytes of UTF-8 without control characters, so that names are always
//! safe to log and to hand to a resolver. Anything else is [`ProtocolError::InvalidDomain`], which
//! the server answers with reply code 0x01 (general failure): the address *type* is supported, the
//! name is not usable.

pub use crate::dial::TargetAddr;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// SOCKS protocol version carried by greetings, requests and replies (RFC 1928 §3).
pub const SOCKS_VERSION: u8 = 0x05;
/// Version of the username/password subnegotiation (RFC 1929 §2).
pub const USER_PASS_VERSION: u8 = 0x01;
/// Longest domain name accepted in a request (the longest DNS name in text form, RFC 1035 §2.3.4).
pub use crate::dial::MAX_DOMAIN_LEN;

/// RFC 1929 status byte for a successful authentication.
pub const USER_PASS_SUCCESS: u8 = 0x00;
/// RFC 1929 status byte for a failed authentication (any non-zero value; we send 0x01).
pub const USER_PASS_FAILURE: u8 = 0x01;

const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;

/// An authentication method code offered in a greeting (RFC 1928 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Method(pub u8);

impl Method {
    /// 0x00: no authentication required.
    pub const NO_AUTH: Self = Self(0x00);
    /// 0x01: GSSAPI (RFC 1961); never selected by this server.
    pub const GSSAPI: Self = Self(0x01);
    /// 0x02: username/password (RFC 1929).
    pub const USER_PASS: Self = Self(0x02);
    /// 0xFF: no acceptable methods; the client must close the connection.
    pub const NO_ACCEPTABLE: Self = Self(0xFF);
}

/// What a request asks the server to do (RFC 1928 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// 0x01: open a TCP stream to the target.
    Connect,
    /// 0x02: accept one inbound TCP connection for the client.
    Bind,
    /// 0x03: relay UDP datagrams between the client and targets (RFC 1928 §7).
    UdpAssociate,
}

impl Command {
    /// The wire value of the command.
    pub fn code(self) -> u8 {
        match self {
            Self::Connect => 0x01,
            Self::Bind => 0x02,
            Self::UdpAssociate => 0x03,
        }
    }

    /// The command for a wire value, if it is one RFC 1928 defines.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0x01 => Some(Self::Connect),
            0x02 => Some(Self::Bind),
            0x03 => Some(Self::UdpAssociate),
            _ => None,
        }
    }
}

/// The REP field of a reply (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReplyCode {
    /// 0x00: succeeded.
    Succeeded = 0x00,
    /// 0x01: general SOCKS server failure.
    GeneralFailure = 0x01,
    /// 0x02: connection not allowed by ruleset.
    NotAllowed = 0x02,
    /// 0x03: network unreachable.
    NetworkUnreachable = 0x03,
    /// 0x04: host unreachable.
    HostUnreachable = 0x04,
    /// 0x05: connection refused.
    ConnectionRefused = 0x05,
    /// 0x06: TTL expired (used for connect timeouts).
    TtlExpired = 0x06,
    /// 0x07: command not supported.
    CommandNotSupported = 0x07,
    /// 0x08: address type not supported.
    AddressTypeNotSupported = 0x08,
}

impl ReplyCode {
    /// The wire value of the code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// The wire form of a [`TargetAddr`] (ATYP, DST.ADDR, DST.PORT).
impl TargetAddr {
    /// Number of bytes `ATYP DST.ADDR DST.PORT` takes on the wire.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Ip(SocketAddr::V4(_)) => 1 + 4 + 2,
            Self::Ip(SocketAddr::V6(_)) => 1 + 16 + 2,
            Self::Domain(name, _) => 1 + 1 + name.len() + 2,
        }
    }

    /// Appends `ATYP ADDR PORT` to `out`.
    ///
    /// A domain longer than 255 bytes cannot be represented; it is truncated to 255 bytes (the
    /// decoder then rejects it). Names built by [`decode_request`] are always short enough.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Ip(SocketAddr::V4(addr)) => {
                out.push(ATYP_IPV4);
                out.extend_from_slice(&addr.ip().octets());
                out.extend_from_slice(&addr.port().to_be_bytes());
            }
            Self::Ip(SocketAddr::V6(addr)) => {
                out.push(ATYP_IPV6);
                out.extend_from_slice(&addr.ip().octets());
                out.extend_from_slice(&addr.port().to_be_bytes());
            }
            Self::Domain(name, port) => {
                let bytes = &name.as_bytes()[..name.len().min(255)];
                out.push(ATYP_DOMAIN);
                // `bytes.len() <= 255` by construction.
                out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(bytes);
                out.extend_from_slice(&port.to_be_bytes());
            }
        }
    }
}

/// Result of a stream decoder that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// The input is a valid but unfinished prefix; read more bytes.
    Incomplete,
    /// A message, and the number of input bytes it occupied.
    Complete(T, usize),
}

/// Bytes that can never become a valid SOCKS5 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The VER field is not the version this message must carry.
    #[error("unsupported protocol version {found:#04x} (expected {expected:#04x})")]
    BadVersion {
        /// The version this message must carry.
        expected: u8,
        /// The version the client sent.
        found: u8,
    },
    /// A greeting offered no authentication methods (NMETHODS = 0).
    #[error("greeting offers no authentication methods")]
    NoMethods,
    /// A username/password request has an empty username (ULEN = 0).
    #[error("empty username")]
    EmptyUsername,
    /// A username/password request has an empty password (PLEN = 0).
    #[error("empty password")]
    EmptyPassword,
    /// A request carries a CMD value RFC 1928 does not define.
    #[error("unknown command {0:#04x}")]
    UnknownCommand(u8),
    /// An address carries an ATYP value RFC 1928 does not define.
    #[error("unknown address type {0:#04x}")]
    UnknownAddressType(u8),
    /// A domain name is empty, too long, not UTF-8, or contains control characters.
    #[error("invalid domain name: {0}")]
    InvalidDomain(&'static str),
    /// A UDP datagram ends before its header does.
    #[error("truncated datagram")]
    Truncated,
    /// A UDP datagram is a fragment (FRAG != 0); fragmentation is not supported.
    #[error("fragmented datagram (FRAG = {0})")]
    Fragmented(u8),
}

impl ProtocolError {
    /// The reply code that answers a request failing with this error (RFC 1928 §6).
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            Self::UnknownCommand(_) => ReplyCode::CommandNotSupported,
            Self::UnknownAddressType(_) => ReplyCode::AddressTypeNotSupported,
            Self::BadVersion { .. }
            | Self::NoMethods
            | Self::EmptyUsername
            | Self::EmptyPassword
            | Self::InvalidDomain(_)
            | Self::Truncated
            | Self::Fragmented(_) => ReplyCode::GeneralFailure,
        }
    }
}

/// A method-selection message (RFC 1928 §3): `VER NMETHODS METHODS...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting<'a> {
    /// The raw method codes, in the client's order (at least one).
    pub methods: &'a [u8],
}

impl Greeting<'_> {
    /// Whether the client offers `method`.
    pub fn offers(&self, method: Method) -> bool {
        self.methods.contains(&method.0)
    }
}

/// Decodes a greeting from the start of `buf`.
///
/// # Errors
///
/// [`ProtocolError::BadVersion`] if VER is not 5, [`ProtocolError::NoMethods`] if NMETHODS is 0.
pub fn decode_greeting(buf: &[u8]) -> Result<Decoded<Greeting<'_>>, ProtocolError> {
    let Some(&version) = buf.first() else {
        return Ok(Decoded::Incomplete);
    };
    check_version(SOCKS_VERSION, version)?;
    let Some(&count) = buf.get(1) else {
        return Ok(Decoded::Incomplete);
    };
    if count == 0 {
        return Err(ProtocolError::NoMethods);
    }
    let end = 2 + usize::from(count);
    match buf.get(2..end) {
        Some(methods) => Ok(Decoded::Complete(Greeting { methods }, end)),
        None => Ok(Decoded::Incomplete),
    }
}

/// Appends a greeting offering `methods` (at most 255 are written).
pub fn encode_greeting(methods: &[Method], out: &mut Vec<u8>) {
    let methods = &methods[..methods.len().min(255)];
    out.push(SOCKS_VERSION);
    out.push(u8::try_from(methods.len()).unwrap_or(u8::MAX));
    out.extend(methods.iter().map(|m| m.0));
}

/// Appends the server's method selection (RFC 1928 §3): `VER METHOD`.
pub fn encode_method_selection(method: Method, out: &mut Vec<u8>) {
    out.extend_from_slice(&[SOCKS_VERSION, method.0]);
}

/// A username/password request (RFC 1929 §2): `VER ULEN UNAME PLEN PASSWD`.
///
/// `Debug` does not print the password.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UserPass<'a> {
    /// UNAME, 1..=255 opaque bytes.
    pub username: &'a [u8],
    /// PASSWD, 1..=255 opaque bytes.
    pub password: &'a [u8],
}

impl fmt::Debug for UserPass<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserPass")
            .field("username", &String::from_utf8_lossy(self.username))
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Decodes a username/password request from the start of `buf`.
///
/// # Errors
///
/// [`ProtocolError::BadVersion`] if VER is not 1, [`ProtocolError::EmptyUsername`] or
/// [`ProtocolError::EmptyPassword`] if a length is 0.
pub fn decode_user_pass(buf: &[u8]) -> Result<Decoded<UserPass<'_>>, ProtocolError> {
    let Some(&version) = buf.first() else {
        return Ok(Decoded::Incomplete);
    };
    check_version(USER_PASS_VERSION, version)?;
    let Some(&ulen) = buf.get(1) else {
        return Ok(Decoded::Incomplete);
    };
    if ulen == 0 {
        return Err(ProtocolError::EmptyUsername);
    }
    let user_end = 2 + usize::from(ulen);
    let Some(username) = buf.get(2..user_end) else {
        return Ok(Decoded::Incomplete);
    };
    let Some(&plen) = buf.get(user_end) else {
        return Ok(Decoded::Incomplete);
    };
    if plen == 0 {
        return Err(ProtocolError::EmptyPassword);
    }
    let end = user_end + 1 + usize::from(plen);
    match buf.get(user_end + 1..end) {
        Some(password) => Ok(Decoded::Complete(UserPass { username, password }, end)),
        None => Ok(Decoded::Incomplete),
    }
}

/// Appends a username/password request. Fields longer than 255 bytes are truncated.
pub fn encode_user_pass(username: &[u8], password: &[u8], out: &mut Vec<u8>) {
    out.push(USER_PASS_VERSION);
    for field in [username, password] {
        let field = &field[..field.len().min(255)];
        out.push(u8::try_from(field.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(field);
    }
}

/// Appends the subnegotiation status (RFC 1929 §2): `VER STATUS`.
pub fn encode_user_pass_status(success: bool, out: &mut Vec<u8>) {
    let status = if success {
        USER_PASS_SUCCESS
    } else {
        USER_PASS_FAILURE
    };
    out.extend_from_slice(&[USER_PASS_VERSION, status]);
}

/// A request (RFC 1928 §4): `VER CMD RSV ATYP DST.ADDR DST.PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What the client asks for.
    pub command: Command,
    /// DST.ADDR and DST.PORT. For UDP ASSOCIATE this is where the client will send datagrams
    /// from (possibly all zeros).
    pub target: TargetAddr,
}

impl Request {
    /// Appends the request to `out` (RSV = 0).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[SOCKS_VERSION, self.command.code(), 0x00]);
        self.target.encode(out);
    }
}

/// Decodes a request from the start of `buf`.
///
/// RSV is ignored (RFC 1928 fixes it to 0; some clients are sloppy and it carries no meaning).
///
/// # Errors
///
/// [`ProtocolError::BadVersion`], [`ProtocolError::UnknownCommand`],
/// [`ProtocolError::UnknownAddressType`] or [`ProtocolError::InvalidDomain`]; answer with
/// [`ProtocolError::reply_code`].
pub fn decode_request(buf: &[u8]) -> Result<Decoded<Request>, ProtocolError> {
    let Some(&version) = buf.first() else {
        return Ok(Decoded::Incomplete);
    };
    check_version(SOCKS_VERSION, version)?;
    let Some(&cmd) = buf.get(1) else {
        return Ok(Decoded::Incomplete);
    };
    let command = Command::from_code(cmd).ok_or(ProtocolError::UnknownCommand(cmd))?;
    // buf[2] is RSV.
    let Some(rest) = buf.get(3..) else {
        return Ok(Decoded::Incomplete);
    };
    Ok(match decode_addr(rest)? {
        Decoded::Incomplete => Decoded::Incomplete,
        Decoded::Complete(target, len) => Decoded::Complete(Request { command, target }, 3 + len),
    })
}

/// A reply (RFC 1928 §6): `VER REP RSV ATYP BND.ADDR BND.PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// REP.
    pub code: ReplyCode,
    /// BND.ADDR and BND.PORT: for CONNECT, the address the server's outbound connection is bound
    /// to; for UDP ASSOCIATE, the relay address the client must send datagrams to.
    pub bound: SocketAddr,
}

impl Reply {
    /// A failure reply with the conventional all-zero IPv4 bound address.
    pub fn failure(code: ReplyCode) -> Self {
        Self {
            code,
            bound: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
        }
    }

    /// Appends the reply to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[SOCKS_VERSION, self.code.code(), 0x00]);
        TargetAddr::Ip(self.bound).encode(out);
    }
}

/// A UDP datagram exchanged with a client under UDP ASSOCIATE (RFC 1928 §7):
/// `RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    /// From the client: where to send `payload`. To the client: where it came from.
    pub target: TargetAddr,
    /// DATA.
    pub payload: &'a [u8],
}

/// Decodes a whole UDP datagram received from a client.
///
/// RSV is ignored. Fragments (FRAG != 0) are rejected: RFC 1928 §7 lets a server that does not
/// implement fragmentation drop them, and callers must drop the datagram on any error.
///
/// # Errors
///
/// [`ProtocolError::Truncated`], [`ProtocolError::Fragmented`],
/// [`ProtocolError::UnknownAddressType`] or [`ProtocolError::InvalidDomain`].
pub fn decode_udp_datagram(buf: &[u8]) -> Result<UdpDatagram<'_>, ProtocolError> {
    let Some(&frag) = buf.get(2) else {
        return Err(ProtocolError::Truncated);
    };
    if frag != 0 {
        return Err(ProtocolError::Fragmented(frag));
    }
    let rest = buf.get(3..).unwrap_or_default();
    match decode_addr(rest)? {
        Decoded::Incomplete => Err(ProtocolError::Truncated),
        Decoded::Complete(target, len) => Ok(UdpDatagram {
            target,
            payload: rest.get(len..).unwrap_or_default(),
        }),
    }
}

/// Appends the header of a UDP datagram (RSV = 0, FRAG = 0) for `target`; append the payload
/// after it.
pub fn encode_udp_header(target: &TargetAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0x00, 0x00, 0x00]);
    target.encode(out);
}

/// Longest §7 header with an IP address: RSV(2) FRAG ATYP, 16 address octets, PORT.
pub const MAX_UDP_IP_HEADER: usize = 3 + 1 + 16 + 2;

/// Writes the header of a UDP datagram (RSV = 0, FRAG = 0) for an IP `source` into the start of
/// `out` and returns its length (10 for IPv4, 22 for IPv6). The relay uses it to put the header in
/// front of a reply already received into the same buffer, without copying the payload.
pub fn write_udp_ip_header(source: SocketAddr, out: &mut [u8; MAX_UDP_IP_HEADER]) -> usize {
    out[..3].fill(0);
    match source {
        SocketAddr::V4(addr) => {
            out[3] = ATYP_IPV4;
            out[4..8].copy_from_slice(&addr.ip().octets());
            out[8..10].copy_from_slice(&addr.port().to_be_bytes());
            10
        }
        SocketAddr::V6(addr) => {
            out[3] = ATYP_IPV6;
            out[4..20].copy_from_slice(&addr.ip().octets());
            out[20..22].copy_from_slice(&addr.port().to_be_bytes());
            22
        }
    }
}

/// Decodes `ATYP ADDR PORT` from the start of `buf`.
fn decode_addr(buf: &[u8]) -> Result<Decoded<TargetAddr>, ProtocolError> {
    let Some(&atyp) = buf.first() else {
        return Ok(Decoded::Incomplete);
    };
    match atyp {
        ATYP_IPV4 => {
            let Some((octets, port)) = fixed_addr::<4>(&buf[1..]) else {
                return Ok(Decoded::Incomplete);
            };
            let addr = SocketAddrV4::new(Ipv4Addr::from(octets), port);
            Ok(Decoded::Complete(TargetAddr::Ip(addr.into()), 1 + 4 + 2))
        }
        ATYP_IPV6 => {
            let Some((octets, port)) = fixed_addr::<16>(&buf[1..]) else {
                return Ok(Decoded::Incomplete);
            };
            let addr = SocketAddrV6::new(Ipv6Addr::from(octets), port, 0, 0);
            Ok(Decoded::Complete(TargetAddr::Ip(addr.into()), 1 + 16 + 2))
        }
        ATYP_DOMAIN => {
            let Some(&len) = buf.get(1) else {
                return Ok(Decoded::Incomplete);
            };
            let len = usize::from(len);
            if len == 0 {
                return Err(ProtocolError::InvalidDomain("empty"));
            }
            if len > MAX_DOMAIN_LEN {
                return Err(ProtocolError::InvalidDomain("longer than 253 bytes"));
            }
            let (Some(name), Some(port)) = (buf.get(2..2 + len), buf.get(2 + len..2 + len + 2))
            else {
                return Ok(Decoded::Incomplete);
            };
            let name =
                std::str::from_utf8(name).map_err(|_| ProtocolError::InvalidDomain("not UTF-8"))?;
            if name.chars().any(char::is_control) {
                return Err(ProtocolError::InvalidDomain("contains control characters"));
            }
            let port = u16::from_be_bytes([port[0], port[1]]);
            Ok(Decoded::Complete(
                TargetAddr::Domain(name.to_owned(), port),
                2 + len + 2,
            ))
        }
        other => Err(ProtocolError::UnknownAddressType(other)),
    }
}

/// Splits `N` address octets and a big-endian port off the start of `buf`.
fn fixed_addr<const N: usize>(buf: &[u8]) -> Option<([u8; N], u16)> {
    let octets: [u8; N] = buf.get(..N)?.try_into().ok()?;
    let port: [u8; 2] = buf.get(N..N + 2)?.try_into().ok()?;
    Some((octets, u16::from_be_bytes(port)))
}

fn check_version(expected: u8, found: u8) -> Result<(), ProtocolError> {
    if found == expected {
        Ok(())
    } else {
        Err(ProtocolError::BadVersion { expected, found })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(a: [u8; 4], port: u16) -> TargetAddr {
        TargetAddr::Ip(SocketAddr::from((a, port)))
    }

    fn complete<T>(d: Decoded<T>) -> (T, usize) {
        match d {
            Decoded::Complete(msg, n) => (msg, n),
            Decoded::Incomplete => panic!("expected a complete message"),
        }
    }

    #[test]
    fn greeting_decodes_and_reports_prefixes_incomplete() {
        let bytes = [5, 2, 0, 2, 0xAA];
        for n in 0..4 {
            assert_eq!(
                decode_greeting(&bytes[..n]),
                Ok(Decoded::Incomplete),
                "prefix {n}"
            );
        }
        let (g, n) = complete(decode_greeting(&bytes).unwrap());
        assert_eq!(n, 4, "trailing byte belongs to the next message");
        assert_eq!(g.methods, &[0, 2]);
        assert!(g.offers(Method::NO_AUTH) && g.offers(Method::USER_PASS));
        assert!(!g.offers(Method::GSSAPI));
    }

    #[test]
    fn greeting_errors() {
        assert_eq!(
            decode_greeting(&[4, 1, 0]),
            Err(ProtocolError::BadVersion {
                expected: 5,
                found: 4
            })
        );
        // The error is visible from the first byte: no waiting for more input.
        assert!(decode_greeting(b"G").is_err());
        assert_eq!(decode_greeting(&[5, 0]), Err(ProtocolError::NoMethods));
    }

    #[test]
    fn user_pass_decodes_and_rejects_empty_fields() {
        let mut bytes = Vec::new();
        encode_user_pass(b"alice", b"s3cret", &mut bytes);
        assert_eq!(bytes, b"\x01\x05alice\x06s3cret");
        for n in 0..bytes.len() {
            assert_eq!(
                decode_user_pass(&bytes[..n]),
                Ok(Decoded::Incomplete),
                "prefix {n}"
            );
        }
        let (up, n) = complete(decode_user_pass(&bytes).unwrap());
        assert_eq!(
            (up.username, up.password, n),
            (&b"alice"[..], &b"s3cret"[..], 14)
        );

        assert_eq!(decode_user_pass(&[1, 0]), Err(ProtocolError::EmptyUsername));
        assert_eq!(
            decode_user_pass(&[1, 1, b'a', 0]),
            Err(ProtocolError::EmptyPassword)
        );
        assert_eq!(
            decode_user_pass(&[5, 1, b'a']),
            Err(ProtocolError::BadVersion {
                expected: 1,
                found: 5
            })
        );
    }

    #[test]
    fn request_decodes_every_address_type() {
        let cases: [(&[u8], TargetAddr); 3] = [
            (
                &[5, 1, 0, 1, 10, 0, 0, 1, 0x1F, 0x90],
                v4([10, 0, 0, 1], 8080),
            ),
            (
                &[
                    5, 1, 0, 4, 0xfd, 0x7a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 80,
                ],
                TargetAddr::Ip(SocketAddr::new("fd7a::1".parse().unwrap(), 80)),
            ),
            (
                b"\x05\x01\x00\x03\x0bexample.com\x01\xbb",
                TargetAddr::Domain("example.com".into(), 443),
            ),
        ];
        for (bytes, target) in cases {
            for n in 0..bytes.len() {
                assert_eq!(
                    decode_request(&bytes[..n]),
                    Ok(Decoded::Incomplete),
                    "prefix {n}"
                );
            }
            let (req, n) = complete(decode_request(bytes).unwrap());
            assert_eq!(n, bytes.len());
            assert_eq!(req.command, Command::Connect);
            assert_eq!(req.target, target);
            let mut again = Vec::new();
            req.encode(&mut again);
            assert_eq!(again, bytes);
        }
    }

    #[test]
    fn request_errors_map_to_rfc_reply_codes() {
        let cases: [(&[u8], ProtocolError, u8); 8] = [
            (&[5, 9], ProtocolError::UnknownCommand(9), 0x07),
            (&[5, 1, 0, 2], ProtocolError::UnknownAddressType(2), 0x08),
            (&[5, 1, 0, 0], ProtocolError::UnknownAddressType(0), 0x08),
            (
                &[5, 1, 0, 3, 0],
                ProtocolError::InvalidDomain("empty"),
                0x01,
            ),
            (
                &[5, 1, 0, 3, 254],
                ProtocolError::InvalidDomain("longer than 253 bytes"),
                0x01,
            ),
            (
                &[5, 1, 0, 3, 2, 0xC3, 0x28, 0, 80],
                ProtocolError::InvalidDomain("not UTF-8"),
                0x01,
            ),
            (
                b"\x05\x01\x00\x03\x03a\nb\x00\x50",
                ProtocolError::InvalidDomain("contains control characters"),
                0x01,
            ),
            (
                &[4, 1],
                ProtocolError::BadVersion {
                    expected: 5,
                    found: 4,
                },
                0x01,
            ),
        ];
        for (bytes, error, code) in cases {
            assert_eq!(decode_request(bytes), Err(error.clone()), "{bytes:?}");
            assert_eq!(error.reply_code().code(), code, "{error}");
        }
    }

    #[test]
    fn bind_and_udp_associate_decode_as_commands() {
        let (req, _) = complete(decode_request(&[5, 2, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap());
        assert_eq!(req.command, Command::Bind);
        let (req, _) = complete(decode_request(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap());
        assert_eq!(req.command, Command::UdpAssociate);
    }

    #[test]
    fn replies_are_byte_exact() {
        let mut out = Vec::new();
        Reply {
            code: ReplyCode::Succeeded,
            bound: "127.0.0.1:1080".parse().unwrap(),
        }
        .encode(&mut out);
        assert_eq!(out, [5, 0, 0, 1, 127, 0, 0, 1, 0x04, 0x38]);

        out.clear();
        Reply {
            code: ReplyCode::Succeeded,
            bound: "[::1]:443".parse().unwrap(),
        }
        .encode(&mut out);
        let mut expected = vec![5, 0, 0, 4];
        expected.extend_from_slice(&[0; 15]);
        expected.extend_from_slice(&[1, 0x01, 0xbb]);
        assert_eq!(out, expected);

        out.clear();
        Reply::failure(ReplyCode::HostUnreachable).encode(&mut out);
        assert_eq!(out, [5, 4, 0, 1, 0, 0, 0, 0, 0, 0]);

        out.clear();
        encode_method_selection(Method::NO_ACCEPTABLE, &mut out);
        encode_user_pass_status(true, &mut out);
        encode_user_pass_status(false, &mut out);
        assert_eq!(out, [5, 0xFF, 1, 0, 1, 1]);
    }

    #[test]
    fn udp_datagram_header() {
        let mut dgram = Vec::new();
        encode_udp_header(&v4([100, 64, 0, 2], 53), &mut dgram);
        dgram.extend_from_slice(b"query");
        assert_eq!(&dgram[..10], &[0, 0, 0, 1, 100, 64, 0, 2, 0, 53]);
        let d = decode_udp_datagram(&dgram).unwrap();
        assert_eq!(d.target, v4([100, 64, 0, 2], 53));
        assert_eq!(d.payload, b"query");

        // An empty payload is a valid datagram.
        assert_eq!(decode_udp_datagram(&dgram[..10]).unwrap().payload, b"");
        for n in 0..10 {
            assert_eq!(
                decode_udp_datagram(&dgram[..n]),
                Err(ProtocolError::Truncated)
            );
        }
        dgram[2] = 1;
        assert_eq!(
            decode_udp_datagram(&dgram),
            Err(ProtocolError::Fragmented(1))
        );
        assert_eq!(
            decode_udp_datagram(&[0, 0, 0, 7, 1, 2]),
            Err(ProtocolError::UnknownAddressType(7))
        );
    }

    fn target_strategy() -> impl Strategy<Value = TargetAddr> {
        prop_oneof![
            any::<(std::net::Ipv4Addr, u16)>()
                .prop_map(|(ip, port)| TargetAddr::Ip(SocketAddr::new(ip.into(), port))),
            any::<(std::net::Ipv6Addr, u16)>()
                .prop_map(|(ip, port)| TargetAddr::Ip(SocketAddr::new(ip.into(), port))),
            ("[a-z0-9.-]{1,253}", any::<u16>())
                .prop_map(|(name, port)| TargetAddr::Domain(name, port)),
            ("\\PC{1,60}", any::<u16>()).prop_map(|(name, port)| TargetAddr::Domain(name, port)),
        ]
    }

    fn command_strategy() -> impl Strategy<Value = Command> {
        prop_oneof![
            Just(Command::Connect),
            Just(Command::Bind),
            Just(Command::UdpAssociate)
        ]
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_greeting(&bytes);
            let _ = decode_user_pass(&bytes);
            let _ = decode_request(&bytes);
            let _ = decode_udp_datagram(&bytes);
        }

        #[test]
        fn decoders_never_panic_on_plausible_headers(
            head in prop_oneof![Just(vec![5u8]), Just(vec![5, 1, 0]), Just(vec![1u8]), Just(vec![0, 0, 0])],
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let bytes = [head, tail].concat();
            let _ = decode_greeting(&bytes);
            let _ = decode_user_pass(&bytes);
            let _ = decode_request(&bytes);
            let _ = decode_udp_datagram(&bytes);
        }

        #[test]
        fn request_round_trips(
            command in command_strategy(),
            target in target_strategy(),
            trailing in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let request = Request { command, target };
            let mut bytes = Vec::new();
            request.encode(&mut bytes);
            let len = bytes.len();
            prop_assert_eq!(len, 3 + request.target.encoded_len());
            for n in 0..len {
                prop_assert_eq!(decode_request(&bytes[..n]), Ok(Decoded::Incomplete));
            }
            bytes.extend_from_slice(&trailing);
            prop_assert_eq!(decode_request(&bytes), Ok(Decoded::Complete(request, len)));
        }

        #[test]
        fn greeting_round_trips(methods in proptest::collection::vec(any::<u8>(), 1..=255)) {
            let methods: Vec<Method> = methods.into_iter().map(Method).collect();
            let mut bytes = Vec::new();
            encode_greeting(&methods, &mut bytes);
            let (g, n) = complete(decode_greeting(&bytes).unwrap());
            prop_assert_eq!(n, bytes.len());
            prop_assert!(g.methods.iter().copied().eq(methods.iter().map(|m| m.0)));
        }

        #[test]
        fn user_pass_round_trips(
            user in proptest::collection::vec(any::<u8>(), 1..=255),
            pass in proptest::collection::vec(any::<u8>(), 1..=255),
        ) {
            let mut bytes = Vec::new();
            encode_user_pass(&user, &pass, &mut bytes);
            let (up, n) = complete(decode_user_pass(&bytes).unwrap());
            prop_assert_eq!(n, bytes.len());
            prop_assert_eq!(up.username, &user[..]);
            prop_assert_eq!(up.password, &pass[..]);
        }

        #[test]
        fn udp_ip_header_matches_the_vec_encoder(
            source in prop_oneof![
                any::<(std::net::Ipv4Addr, u16)>().prop_map(|(ip, port)| SocketAddr::new(ip.into(), port)),
                any::<(std::net::Ipv6Addr, u16)>().prop_map(|(ip, port)| SocketAddr::new(ip.into(), port)),
            ],
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut header = [0xAAu8; MAX_UDP_IP_HEADER];
            let len = write_udp_ip_header(source, &mut header);
            let mut expected = Vec::new();
            encode_udp_header(&TargetAddr::Ip(source), &mut expected);
            prop_assert_eq!(&header[..len], &expected[..]);
            let mut bytes = header[..len].to_vec();
            bytes.extend_from_slice(&payload);
            let d = decode_udp_datagram(&bytes).unwrap();
            prop_assert_eq!(d.target, TargetAddr::Ip(source));
            prop_assert_eq!(d.payload, &payload[..]);
        }

        #[test]
        fn udp_datagram_round_trips(
            target in target_strategy(),
            payload in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let mut bytes = Vec::new();
            encode_udp_header(&target, &mut bytes);
            bytes.extend_from_slice(&payload);
            let d = decode_udp_datagram(&bytes).unwrap();
            prop_assert_eq!(d.target, target);
            prop_assert_eq!(d.payload, &payload[..]);
        }
    }
}
