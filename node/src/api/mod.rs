//! The local API: a small HTTP server on a loopback port or a unix socket (never on the
//! tailnet) that reports the node's state, and its client ([`client`]) used by `tailnode
//! status` and `tailnode ping`.
//!
//! - `GET /v1/status` answers the [`Status`](crate::status::Status) document.
//! - `GET /v1/ping?target=..` pings a peer from the node's netstack and streams one JSON event
//!   per line (see [`crate::ping`] for the protocol).
//! - `GET /healthz` answers `ok`.

pub mod client;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub use client::{FetchError, PingError, PingEvents, fetch_status, ping};

use crate::accept::{AcceptLimits, Listener, accept_clients};
use crate::status::StatusSource;

/// Where the local API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAddr {
    /// TCP (loopback addresses only).
    Tcp(SocketAddr),
    /// A unix socket.
    Unix(PathBuf),
    /// No API.
    Off,
}

impl FromStr for ApiAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" || s == "none" {
            return Ok(ApiAddr::Off);
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(ApiAddr::Unix(PathBuf::from(path)));
        }
        let addr: SocketAddr = s
            .parse()
            .map_err(|_| format!("{s:?} is not IP:PORT, unix:/path or off"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{addr}: the local API listens on loopback only (127.0.0.1, ::1) or a unix socket"
            ));
        }
        Ok(ApiAddr::Tcp(addr))
    }
}

impl fmt::Display for ApiAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiAddr::Tcp(a) => write!(f, "{a}"),
            ApiAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ApiAddr::Off => f.write_str("off"),
        }
    }
}

/// The default API address: `unix:<state dir>/tailnode.sock`.
pub fn default_api() -> Option<ApiAddr> {
    crate::identity::state_dir().map(|d| ApiAddr::Unix(d.join("tailnode.sock")))
}

/// A bound API listener.
pub enum ApiListener {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// Unix socket (removed on drop).
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Drop for ApiListener {
    fn drop(&mut self) {
        if let ApiListener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl ApiListener {
    /// The address it listens on.
    pub fn addr(&self) -> ApiAddr {
        match self {
            ApiListener::Tcp(l) => l.local_addr().map_or(ApiAddr::Off, ApiAddr::Tcp),
            ApiListener::Unix(_, path) => ApiAddr::Unix(path.clone()),
        }
    }
}

/// Why the API address could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ApiBindError {
    /// A live node already listens on the unix socket.
    #[error("{} is in use by another node", .0.display())]
    InUse(PathBuf),
    /// The address is `off`.
    #[error("the API is off")]
    Off,
    /// The OS refused.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Binds the API address. A stale unix socket left by a crashed node is
/// replaced; a live one is an error.
///
/// # Errors
/// [`ApiBindError`] when the address cannot be bound (or is `off`).
pub async fn bind(addr: &ApiAddr) -> Result<ApiListener, ApiBindError> {
    match addr {
        ApiAddr::Tcp(a) => Ok(ApiListener::Tcp(tokio::net::TcpListener::bind(a).await?)),
        ApiAddr::Unix(path) => {
            if path.exists() {
                if tokio::net::UnixStream::connect(path).await.is_ok() {
                    return Err(ApiBindError::InUse(path.clone()));
                }
                let _ = std::fs::remove_file(path);
            }
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)?;
            }
            let listener = tokio::net::UnixListener::bind(path)?;
            Ok(ApiListener::Unix(listener, path.clone()))
        }
        ApiAddr::Off => Err(ApiBindError::Off),
    }
}

/// Clients the local API serves at once; further clients are closed on accept.
pub const MAX_API_CONNECTIONS: usize = 64;

/// Serves the API until `cancel` fires; returns when every request in flight has ended.
pub async fn serve(listener: ApiListener, source: StatusSource, cancel: CancellationToken) {
    let kind = format!("local API on {}", listener.addr());
    let limits = AcceptLimits {
        kind: &kind,
        max_connections: MAX_API_CONNECTIONS,
        connections: None,
    };
    accept_clients(listener, &cancel, limits, |stream, (), token| {
        let source = source.clone();
        async move {
            let served = async {
                match stream {
                    ApiStream::Tcp(s) => handle(s, &source).await,
                    ApiStream::Unix(s) => handle(s, &source).await,
                }
            };
            tokio::select! {
                () = token.cancelled() => {}
                () = served => {}
            }
        }
    })
    .await;
}

/// A connection to the local API.
pub(crate) enum ApiStream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Listener for ApiListener {
    type Stream = ApiStream;
    type Peer = ();

    async fn accept(&mut self) -> std::io::Result<(ApiStream, ())> {
        match self {
            ApiListener::Tcp(l) => l.accept().await.map(|(s, _)| (ApiStream::Tcp(s), ())),
            ApiListener::Unix(l, _) => l.accept().await.map(|(s, _)| (ApiStream::Unix(s), ())),
        }
    }
}

/// The most a request head of the local API or the metrics endpoint may take.
const MAX_HEAD: usize = 8 << 10;
/// How long a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The request line of a request to one of the node's small local HTTP servers.
pub(crate) struct RequestLine {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The target before `?`.
    pub path: String,
    /// The target after `?` (empty without one).
    pub query: String,
}

/// Reads a request head and returns its request line; `None` when the head did not arrive
/// whole (end of stream, error, more than 8 KiB, or after 5 s).
pub(crate) async fn read_request_line<S: AsyncRead + Unpin>(stream: &mut S) -> Option<RequestLine> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut used = 0;
    let head_read = async {
        while used < buf.len() {
            match stream.read(&mut buf[used..]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => used += n,
            }
            if buf[..used].windows(4).any(|w| w == b"\r\n\r\n") {
                return true;
            }
        }
        false
    };
    if !tokio::time::timeout(HEAD_TIMEOUT, head_read)
        .await
        .unwrap_or(false)
    {
        return None;
    }
    let line = std::str::from_utf8(&buf[..used])
        .ok()
        .and_then(|s| s.lines().next())
        .unwrap_or("");
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Some(RequestLine {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
    })
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, source: &StatusSource) {
    let request = read_request_line(&mut stream).await;
    if let Some(RequestLine {
        method,
        path,
        query,
    }) = &request
        && method == "GET"
        && path == "/v1/ping"
    {
        let names = source.control().map(|c| &c.directory);
        let code = crate::ping::serve(&mut stream, query, source.node(), names).await;
        if code >= 400 {
            source.count_api_error();
        }
        return;
    }
    let (code, body, ctype) = match request {
        None => (400, "bad request\n".to_string(), "text/plain"),
        Some(RequestLine { method, .. }) if method != "GET" => {
            (405, "only GET\n".to_string(), "text/plain")
        }
        Some(RequestLine { path, .. }) => match path.as_str() {
            "/v1/status" => {
                let status = source.status().await;
                let json = serde_json::to_string_pretty(&status).unwrap_or_default();
                (200, json + "\n", "application/json")
            }
            "/healthz" => (200, "ok\n".to_string(), "text/plain"),
            _ => (
                404,
                "not found: try /v1/status or /v1/ping?target=PEER\n".to_string(),
                "text/plain",
            ),
        },
    };
    if code >= 400 {
        source.count_api_error();
    }
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn api_addresses_parse_and_refuse_non_loopback() {
        assert_eq!("off".parse::<ApiAddr>().unwrap(), ApiAddr::Off);
        assert_eq!(
            "unix:/run/t.sock".parse::<ApiAddr>().unwrap(),
            ApiAddr::Unix("/run/t.sock".into())
        );
        assert_eq!(
            "127.0.0.1:4000".parse::<ApiAddr>().unwrap(),
            ApiAddr::Tcp("127.0.0.1:4000".parse().unwrap())
        );
        assert!("0.0.0.0:4000".parse::<ApiAddr>().is_err());
        assert!("100.64.0.1:4000".parse::<ApiAddr>().is_err());
        assert!("unix:".parse::<ApiAddr>().is_err());
        assert!("nonsense".parse::<ApiAddr>().is_err());
    }
}
