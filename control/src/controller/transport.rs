//! How the controller reaches the coordinator: the [`Transport`] /
//! [`Session`] traits (so the retry loop can be tested against an in-memory
//! fake on a paused clock) and the real [`WebSocketTransport`]:
//! TCP (tokio) → optional TLS (rustls with the `ring` provider, webpki roots
//! plus an optional extra CA) → websocket upgrade (tokio-tungstenite,
//! RFC 6455) carrying JSON text frames.
//!
//! Neither the transport nor the session applies timeouts: the driver wraps
//! the whole dial (connect, TLS, upgrade, hello → welcome) in its dial
//! timeout and watches sessions with pings, so the same deadlines hold for
//! every transport.

use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::url::CoordinatorUrl;
use crate::proto::{ClientMessage, ErrorCode, MAX_SERVER_MESSAGE, ServerMessage};

/// Opens sessions to the coordinator.
pub trait Transport: Send + Sync + 'static {
    /// The session type this transport produces.
    type Session: Session;

    /// Connects and upgrades to a message session (no protocol messages are
    /// exchanged yet). No timeout of its own: the caller bounds it.
    ///
    /// # Errors
    /// A [`DialError`] whose [`kind`](DialError::kind) says what failed.
    fn dial(
        &self,
        url: &CoordinatorUrl,
    ) -> impl Future<Output = Result<Self::Session, DialError>> + Send;
}

/// What a session delivers besides errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A protocol message.
    Message(ServerMessage),
    /// The answer to one of our pings (liveness signal).
    Pong,
}

/// One open connection to the coordinator, carrying protocol messages.
pub trait Session: Send + 'static {
    /// Sends one message.
    ///
    /// # Errors
    /// [`SessionError`] if the connection failed.
    fn send(
        &mut self,
        msg: &ClientMessage,
    ) -> impl Future<Output = Result<(), SessionError>> + Send;

    /// Receives the next message or pong. Pings from the coordinator are
    /// answered inside. **Cancel-safe**: dropping the future before it
    /// completes loses nothing, so it can sit in a `select!` loop.
    ///
    /// # Errors
    /// [`SessionError`] when the connection ends or delivers garbage.
    fn recv(&mut self) -> impl Future<Output = Result<Incoming, SessionError>> + Send;

    /// Sends a ping; its answer arrives as [`Incoming::Pong`].
    ///
    /// # Errors
    /// [`SessionError`] if the connection failed.
    fn ping(&mut self) -> impl Future<Output = Result<(), SessionError>> + Send;

    /// Closes the connection politely (best effort).
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// Why a dial (connect, TLS, upgrade, hello → welcome) failed. Every
/// variant is retried by the controller; none ends its loop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    /// The dial did not complete within the dial timeout (or the OS timed out).
    #[error("timed out")]
    Timeout,
    /// The coordinator's host name did not resolve.
    #[error("DNS resolution failed: {0}")]
    Dns(String),
    /// The connection was refused (nothing listening).
    #[error("connection refused: {0}")]
    Refused(String),
    /// Another socket error (unreachable network, reset, ...).
    #[error("I/O error: {0}")]
    Io(String),
    /// The TLS handshake failed (certificate, protocol, ...).
    #[error("TLS error: {0}")]
    Tls(String),
    /// The server answered the upgrade with a non-101 HTTP status.
    #[error("HTTP status {status} instead of a websocket upgrade")]
    Http {
        /// The HTTP status code.
        status: u16,
    },
    /// The websocket handshake or framing failed.
    #[error("websocket error: {0}")]
    WebSocket(String),
    /// The coordinator spoke, but not the protocol we expect.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The coordinator refused the node (bad auth key, version, ...).
    #[error("rejected by the coordinator: {code}: {reason}")]
    Rejected {
        /// The coordinator's error code.
        code: ErrorCode,
        /// Its explanation.
        reason: String,
    },
}

impl DialError {
    /// A short, stable label for metrics and status (`timeout`, `dns`,
    /// `refused`, `io`, `tls`, `http`, `websocket`, `protocol`, `rejected`).
    pub fn kind(&self) -> &'static str {
        match self {
            DialError::Timeout => "timeout",
            DialError::Dns(_) => "dns",
            DialError::Refused(_) => "refused",
            DialError::Io(_) => "io",
            DialError::Tls(_) => "tls",
            DialError::Http { .. } => "http",
            DialError::WebSocket(_) => "websocket",
            DialError::Protocol(_) => "protocol",
            DialError::Rejected { .. } => "rejected",
        }
    }
}

/// Why an open session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The coordinator closed the connection.
    #[error("connection closed by the coordinator{}", fmt_reason(.0))]
    Closed(String),
    /// A socket error.
    #[error("I/O error: {0}")]
    Io(String),
    /// A websocket-level error.
    #[error("websocket error: {0}")]
    WebSocket(String),
    /// A message we cannot use (bad JSON, binary frame, out of order).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The coordinator sent `error` (it closes the session after it).
    #[error("coordinator error: {code}: {reason}")]
    Rejected {
        /// The coordinator's error code.
        code: ErrorCode,
        /// Its explanation.
        reason: String,
    },
    /// Nothing (no pong, no message) arrived for two ping intervals.
    #[error("no answer to pings for two intervals")]
    PingTimeout,
    /// A write did not complete in time (the connection is stuck).
    #[error("write timed out")]
    SendTimeout,
}

fn fmt_reason(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

impl SessionError {
    /// A short, stable label for metrics and status.
    pub fn kind(&self) -> &'static str {
        match self {
            SessionError::Closed(_) => "closed",
            SessionError::Io(_) => "io",
            SessionError::WebSocket(_) => "websocket",
            SessionError::Protocol(_) => "protocol",
            SessionError::Rejected { .. } => "rejected",
            SessionError::PingTimeout => "ping_timeout",
            SessionError::SendTimeout => "send_timeout",
        }
    }
}

impl From<SessionError> for DialError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Closed(r) => DialError::WebSocket(format!(
                "connection closed before welcome{}",
                fmt_reason(&r)
            )),
            SessionError::Io(s) => DialError::Io(s),
            SessionError::WebSocket(s) => DialError::WebSocket(s),
            SessionError::Protocol(s) => DialError::Protocol(s),
            SessionError::Rejected { code, reason } => DialError::Rejected { code, reason },
            SessionError::PingTimeout | SessionError::SendTimeout => DialError::Timeout,
        }
    }
}

/// The TLS trust configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The extra CA file could not be read.
    #[error("cannot read CA file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The extra CA file holds no usable PEM certificate.
    #[error("CA file {path} contains no usable PEM certificate{detail}")]
    NoCertificates {
        /// The file.
        path: String,
        /// What went wrong, if known.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Opens the byte stream a websocket session runs on: TCP from the host ([`TcpConnector`]), or
/// a simulated network's stream in tests.
pub trait Connector: Send + Sync + 'static {
    /// The connected stream.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Connects to `host:port`. No timeout of its own: the caller bounds it.
    ///
    /// # Errors
    /// [`DialError::Dns`], [`DialError::Refused`], [`DialError::Timeout`] or
    /// [`DialError::Io`].
    fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> impl Future<Output = Result<Self::Stream, DialError>> + Send;
}

/// TCP from the host network: resolves the name, tries each address in turn.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    type Stream = TcpStream;

    async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, DialError> {
        let addrs: Vec<_> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| DialError::Dns(format!("{host}: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(DialError::Dns(format!("{host}: no addresses")));
        }
        let mut last = None;
        for addr in addrs {
            tracing::debug!(%addr, "connecting to the coordinator");
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    // Control messages are small and latency-sensitive.
                    let _ = tcp.set_nodelay(true);
                    return Ok(tcp);
                }
                Err(e) => last = Some((addr, e)),
            }
        }
        Err(match last {
            Some((addr, e)) => classify_io(&e, &addr.to_string()),
            None => DialError::Dns(format!("{host}: no addresses")),
        })
    }
}

/// The real transport: a stream from its [`Connector`] (TCP by default), optional TLS,
/// websocket.
#[derive(Clone)]
pub struct WebSocketTransport<C = TcpConnector> {
    tls: Arc<rustls::ClientConfig>,
    connector: C,
}

impl<C> std::fmt::Debug for WebSocketTransport<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebSocketTransport")
    }
}

impl WebSocketTransport {
    /// Trusts the webpki (Mozilla) roots, plus every certificate in the PEM
    /// file `extra_ca` if given (for coordinators with a private or
    /// self-signed certificate).
    ///
    /// # Errors
    /// [`TlsSetupError`] if the CA file is unreadable or holds no certificate.
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, TlsSetupError> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = extra_ca {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| TlsSetupError::Read {
                path: shown.clone(),
                source,
            })?;
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| TlsSetupError::NoCertificates {
                    path: shown.clone(),
                    detail: format!(": {e}"),
                })?;
                roots.add(cert)?;
                added += 1;
            }
            if added == 0 {
                return Err(TlsSetupError::NoCertificates {
                    path: shown,
                    detail: String::new(),
                });
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self::with_tls_config(Arc::new(config)))
    }

    /// Uses a caller-built rustls client configuration for `wss` URLs.
    pub fn with_tls_config(tls: Arc<rustls::ClientConfig>) -> Self {
        WebSocketTransport {
            tls,
            connector: TcpConnector,
        }
    }
}

impl<C> WebSocketTransport<C> {
    /// The same transport over the streams of `connector`.
    pub fn with_connector<N: Connector>(self, connector: N) -> WebSocketTransport<N> {
        WebSocketTransport {
            tls: self.tls,
            connector,
        }
    }
}

impl<C: Connector> Transport for WebSocketTransport<C> {
    type Session = WebSocketSession<MaybeTlsStream<C::Stream>>;

    async fn dial(&self, url: &CoordinatorUrl) -> Result<Self::Session, DialError> {
        let stream = self.connector.connect(&url.host(), url.port()).await?;
        let stream = if url.is_tls() {
            let name = ServerName::try_from(url.host())
                .map_err(|e| DialError::Tls(format!("invalid server name: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, stream)
                .await
                .map_err(|e| DialError::Tls(e.to_string()))?;
            MaybeTlsStream::Rustls(tls)
        } else {
            MaybeTlsStream::Plain(stream)
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_SERVER_MESSAGE))
            .max_frame_size(Some(MAX_SERVER_MESSAGE));
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(url.to_string(), stream, Some(config))
                .await
                .map_err(classify_handshake)?;
        tracing::debug!(%url, "websocket upgraded");
        Ok(WebSocketSession { ws })
    }
}

/// A websocket session to the coordinator over the stream `S`.
pub struct WebSocketSession<S = MaybeTlsStream<TcpStream>> {
    ws: WebSocketStream<S>,
}

impl<S> std::fmt::Debug for WebSocketSession<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebSocketSession")
    }
}

impl<S> Session for WebSocketSession<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn send(&mut self, msg: &ClientMessage) -> Result<(), SessionError> {
        self.ws
            .send(Message::text(msg.to_json()))
            .await
            .map_err(session_error)
    }

    async fn recv(&mut self) -> Result<Incoming, SessionError> {
        // Cancel-safe: `next()` on the websocket stream is, and no state is
        // kept between iterations.
        loop {
            let frame = match self.ws.next().await {
                None => return Err(SessionError::Closed(String::new())),
                Some(Err(e)) => return Err(session_error(e)),
                Some(Ok(frame)) => frame,
            };
            match frame {
                Message::Text(text) => {
                    tracing::trace!(len = text.len(), "control message received");
                    return ServerMessage::from_json(text.as_str())
                        .map(Incoming::Message)
                        .map_err(|e| SessionError::Protocol(e.to_string()));
                }
                Message::Binary(_) => {
                    return Err(SessionError::Protocol(
                        "binary frame (the protocol uses text frames)".into(),
                    ));
                }
                Message::Pong(_) => return Ok(Incoming::Pong),
                // tungstenite queues the pong and flushes it on the next read.
                Message::Ping(_) | Message::Frame(_) => {}
                Message::Close(frame) => {
                    return Err(SessionError::Closed(
                        frame
                            .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                            .unwrap_or_default(),
                    ));
                }
            }
        }
    }

    async fn ping(&mut self) -> Result<(), SessionError> {
        self.ws
            .send(Message::Ping(Default::default()))
            .await
            .map_err(session_error)
    }

    async fn close(&mut self) {
        let _ = self.ws.close(None).await;
    }
}

fn classify_io(e: &io::Error, what: &str) -> DialError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => DialError::Refused(what.to_owned()),
        io::ErrorKind::TimedOut => DialError::Timeout,
        _ => DialError::Io(format!("{what}: {e}")),
    }
}

fn classify_handshake(e: tungstenite::Error) -> DialError {
    match e {
        tungstenite::Error::Http(response) => DialError::Http {
            status: response.status().as_u16(),
        },
        tungstenite::Error::Io(e) => classify_io(&e, "websocket upgrade"),
        tungstenite::Error::Tls(e) => DialError::Tls(e.to_string()),
        other => DialError::WebSocket(other.to_string()),
    }
}

fn session_error(e: tungstenite::Error) -> SessionError {
    match e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            SessionError::Closed(String::new())
        }
        tungstenite::Error::Io(e) => SessionError::Io(e.to_string()),
        tungstenite::Error::Capacity(e) => SessionError::Protocol(e.to_string()),
        tungstenite::Error::Utf8(e) => SessionError::Protocol(format!("invalid UTF-8: {e}")),
        other => SessionError::WebSocket(other.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_distinct_labels() {
        let all = [
            DialError::Timeout,
            DialError::Dns(String::new()),
            DialError::Refused(String::new()),
            DialError::Io(String::new()),
            DialError::Tls(String::new()),
            DialError::Http { status: 401 },
            DialError::WebSocket(String::new()),
            DialError::Protocol(String::new()),
            DialError::Rejected {
                code: ErrorCode::BadAuthKey,
                reason: String::new(),
            },
        ];
        let kinds: std::collections::BTreeSet<_> = all.iter().map(DialError::kind).collect();
        assert_eq!(kinds.len(), all.len());
    }

    #[test]
    fn session_errors_during_the_dial_keep_their_meaning() {
        let rejected = SessionError::Rejected {
            code: ErrorCode::BadAuthKey,
            reason: "wrong key".into(),
        };
        assert_eq!(DialError::from(rejected).kind(), "rejected");
        assert_eq!(
            DialError::from(SessionError::SendTimeout),
            DialError::Timeout
        );
        assert_eq!(
            DialError::from(SessionError::Closed(String::new())).kind(),
            "websocket"
        );
    }

    #[test]
    fn extra_ca_errors_are_clear() {
        let dir = std::env::temp_dir().join(format!("tailnode-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").ok();
        let err = WebSocketTransport::new(Some(&empty))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no usable PEM certificate"), "{err}");
        let missing = dir.join("missing.pem");
        let err = WebSocketTransport::new(Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read CA file"), "{err}");
        assert!(WebSocketTransport::new(None).is_ok());
    }
}
