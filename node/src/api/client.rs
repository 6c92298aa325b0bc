//! The client of the local API: the status document, and the event stream of a ping.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::ApiAddr;
use crate::ping::{PingEvent, PingParams};
use crate::status::Status;

/// Why the status document could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No address to ask.
    #[error("no API address")]
    Off,
    /// The API could not be reached.
    #[error(
        "cannot reach the node's API at {addr} (is `tailnode up` running with --api {addr}?): {source}"
    )]
    Unreachable {
        /// Where it was asked.
        addr: ApiAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// No complete answer within 10 s.
    #[error("the node's API at {0} did not answer in time")]
    TimedOut(ApiAddr),
    /// An answer that is not a status document.
    #[error("unexpected answer from the API: {0}")]
    BadAnswer(String),
}

/// Fetches the status document from a node's API (`tailnode status`).
///
/// # Errors
/// [`FetchError`] when the API cannot be reached or answers something else than a status
/// document.
pub async fn fetch_status(addr: &ApiAddr) -> Result<Status, FetchError> {
    let request = b"GET /v1/status HTTP/1.1\r\nHost: tailnode\r\nConnection: close\r\n\r\n";
    let exchange = async {
        let mut out = Vec::new();
        match addr {
            ApiAddr::Tcp(a) => {
                let mut s = tokio::net::TcpStream::connect(a).await?;
                s.write_all(request).await?;
                s.read_to_end(&mut out).await?;
            }
            ApiAddr::Unix(p) => {
                let mut s = tokio::net::UnixStream::connect(p).await?;
                s.write_all(request).await?;
                s.read_to_end(&mut out).await?;
            }
            ApiAddr::Off => {}
        }
        std::io::Result::Ok(out)
    };
    if *addr == ApiAddr::Off {
        return Err(FetchError::Off);
    }
    let response = tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| FetchError::TimedOut(addr.clone()))?
        .map_err(|source| FetchError::Unreachable {
            addr: addr.clone(),
            source,
        })?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| FetchError::BadAnswer("malformed HTTP".into()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(FetchError::BadAnswer(
            head.lines().next().unwrap_or("").to_string(),
        ));
    }
    serde_json::from_str(body)
        .map_err(|e| FetchError::BadAnswer(format!("the status document does not parse: {e}")))
}

/// Why a ping could not start.
#[derive(Debug, thiserror::Error)]
pub enum PingError {
    /// The parameters are out of range.
    #[error(transparent)]
    Params(#[from] crate::ping::ParamError),
    /// The API could not be reached or answered nothing usable.
    #[error(transparent)]
    Api(#[from] FetchError),
    /// The node refused the ping (unknown name, outside the tailnet, ...); its reason.
    #[error("{0}")]
    Refused(String),
}

/// The event stream of a ping the node runs for us (`GET /v1/ping`).
pub struct PingEvents {
    reader: tokio::io::BufReader<Box<dyn ApiStream>>,
    line: String,
}

impl std::fmt::Debug for PingEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PingEvents").finish_non_exhaustive()
    }
}

/// A line of the ping stream that is not an event.
#[derive(Debug, thiserror::Error)]
pub enum PingStreamError {
    /// The connection failed.
    #[error("connection to the node lost: {0}")]
    Io(#[from] std::io::Error),
    /// A line that does not parse (it is skipped).
    #[error("unexpected line from the node ({0})")]
    BadLine(serde_json::Error),
}

impl PingEvents {
    /// The next event; `None` once the node closed the stream. Cancel-safe only between lines:
    /// drop it only to stop listening altogether.
    pub async fn next_event(&mut self) -> Option<Result<PingEvent, PingStreamError>> {
        self.line.clear();
        match self.reader.read_line(&mut self.line).await {
            Ok(0) => None,
            Ok(_) => {
                Some(serde_json::from_str(self.line.trim_end()).map_err(PingStreamError::BadLine))
            }
            Err(e) => Some(Err(e.into())),
        }
    }
}

/// Asks the node at `addr` to ping `params.target` and returns the stream of its events.
///
/// # Errors
/// [`PingError`] when the parameters are bad, the API cannot be reached, or the node refuses.
pub async fn ping(addr: &ApiAddr, params: &PingParams) -> Result<PingEvents, PingError> {
    params.validate()?;
    let request = format!(
        "GET /v1/ping?{} HTTP/1.1\r\nHost: tailnode\r\nConnection: close\r\n\r\n",
        params.to_query()
    );
    let connect = async {
        let stream: Box<dyn ApiStream> = match addr {
            ApiAddr::Tcp(a) => Box::new(tokio::net::TcpStream::connect(a).await?),
            ApiAddr::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
            ApiAddr::Off => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no API address",
                ));
            }
        };
        Ok(stream)
    };
    if *addr == ApiAddr::Off {
        return Err(FetchError::Off.into());
    }
    let unreachable = |source| FetchError::Unreachable {
        addr: addr.clone(),
        source,
    };
    let mut stream = tokio::time::timeout(ANSWER_TIMEOUT, connect)
        .await
        .map_err(|_| FetchError::TimedOut(addr.clone()))?
        .map_err(unreachable)?;
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(unreachable)?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    let mut line = String::new();
    let head = async {
        reader.read_line(&mut status_line).await?;
        // Skip the header lines.
        loop {
            line.clear();
            if reader.read_line(&mut line).await? == 0 || line == "\r\n" || line == "\n" {
                return std::io::Result::Ok(());
            }
        }
    };
    tokio::time::timeout(ANSWER_TIMEOUT, head)
        .await
        .map_err(|_| FetchError::TimedOut(addr.clone()))?
        .map_err(|e| FetchError::BadAnswer(format!("reading the API's answer: {e}")))?;
    if !status_line.starts_with("HTTP/1.1 200") {
        let mut body = String::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(5), reader.read_to_string(&mut body)).await;
        let reason = if body.trim().is_empty() {
            status_line.trim().to_string()
        } else {
            body.trim().to_string()
        };
        return Err(PingError::Refused(reason));
    }
    Ok(PingEvents {
        reader,
        line: String::new(),
    })
}

/// How long the API has to accept a connection and to answer a request's head.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A bidirectional byte stream (TCP or unix socket).
trait ApiStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ApiStream for T {}
