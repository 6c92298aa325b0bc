//! The local API: a small HTTP server on a loopback port or a unix socket
//! (never on the tailnet) that reports the node's state as JSON, and the
//! client side used by `tailnode status`.
//!
//! `GET /v1/status` answers a [`Status`] document. Its fields are stable:
//! new fields may be added, existing ones keep their name and meaning
//! (`version` changes otherwise). Durations are seconds as floating point
//! numbers, ages are "seconds ago".
//!
//! `GET /v1/ping?target=..` pings a peer from the node's netstack and streams
//! one JSON event per line (see [`crate::ping`] for the protocol).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tailnode_control::controller::{
    ConnectionState, ControlStatus, CoordinatorUrl, PeerDirectory, PeerState,
};
use tailnode_wg::PublicKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::coordinated::node_key;
use crate::endpoints::local_endpoints;
use crate::node::{Counter, NodeHandle};

/// Version of the [`Status`] document.
pub const STATUS_VERSION: u32 = 1;

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

/// Binds the API address. A stale unix socket left by a crashed node is
/// replaced; a live one is an error.
///
/// # Errors
/// When the address cannot be bound (or is `off`).
pub async fn bind(addr: &ApiAddr) -> anyhow::Result<ApiListener> {
    match addr {
        ApiAddr::Tcp(a) => Ok(ApiListener::Tcp(tokio::net::TcpListener::bind(a).await?)),
        ApiAddr::Unix(path) => {
            if path.exists() {
                if tokio::net::UnixStream::connect(path).await.is_ok() {
                    anyhow::bail!("{} is in use by another node", path.display());
                }
                let _ = std::fs::remove_file(path);
            }
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)?;
            }
            let listener = tokio::net::UnixListener::bind(path)?;
            Ok(ApiListener::Unix(listener, path.clone()))
        }
        ApiAddr::Off => anyhow::bail!("the API is off"),
    }
}

/// What the control plane exposes to the API.
#[derive(Clone)]
pub struct ControlHandles {
    /// The controller's status.
    pub status: watch::Receiver<ControlStatus>,
    /// Coordinated peers and their lifecycle states.
    pub directory: PeerDirectory,
    /// The coordinator.
    pub url: Option<CoordinatorUrl>,
}

/// Everything the status document is made from.
#[derive(Clone)]
pub struct StatusSource {
    node: NodeHandle,
    control: Option<ControlHandles>,
    static_peers: Vec<PublicKey>,
    /// API requests answered with an error status (4xx, 5xx); shared by clones.
    errors: Counter,
}

impl StatusSource {
    /// A source for `node`.
    pub fn new(
        node: NodeHandle,
        control: Option<ControlHandles>,
        static_peers: Vec<PublicKey>,
    ) -> Self {
        Self {
            node,
            control,
            static_peers,
            errors: Counter::default(),
        }
    }

    /// The node.
    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    /// The control plane's handles, when the node is coordinated.
    pub fn control(&self) -> Option<&ControlHandles> {
        self.control.as_ref()
    }

    /// API requests answered with an error status so far.
    pub fn api_errors(&self) -> u64 {
        self.errors.value()
    }

    /// The status document now.
    pub async fn status(&self) -> Status {
        let now = Instant::now();
        let ago = |t: Instant| secs(now.saturating_duration_since(t));
        let engine_peers = self.node.peers().await.unwrap_or_default();
        let control_status = self.control.as_ref().map(|c| c.status.borrow().clone());
        let me = control_status.as_ref().and_then(|s| s.self_info.clone());
        // Lifecycle states of coordinated peers, by key.
        let lifecycle: HashMap<
            tailnode_control::proto::NodeKey,
            (String, PeerState, Instant, Vec<IpAddr>),
        > = self
            .control
            .as_ref()
            .map(|c| {
                c.directory.with(|l| {
                    l.peers()
                        .map(|(k, e)| {
                            let info = e.info();
                            (
                                *k,
                                (
                                    info.name.clone(),
                                    e.state(),
                                    e.state_since(),
                                    vec![IpAddr::V4(info.ipv4), IpAddr::V6(info.ipv6)],
                                ),
                            )
                        })
                        .collect()
                })
            })
            .unwrap_or_default();

        let mut peers = Vec::new();
        for p in &engine_peers {
            let coordinated = lifecycle.get(&node_key(&p.public_key));
            let (state, state_seconds) = match coordinated {
                Some((_, PeerState::Lost { .. }, since, _)) => ("lost", Some(ago(*since))),
                Some((_, _, since, _)) => ("active", Some(ago(*since))),
                None => ("active", None),
            };
            peers.push(PeerStatus {
                name: coordinated.map(|c| c.0.clone()),
                public_key: p.public_key.to_base64(),
                allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
                endpoint: p.endpoint,
                last_handshake_seconds_ago: p.last_handshake.map(ago),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                rx_packets: p.rx_packets,
                tx_packets: p.tx_packets,
                state: state.to_string(),
                state_seconds,
                source: if self.static_peers.contains(&p.public_key) && coordinated.is_none() {
                    "static"
                } else {
                    "coordinated"
                }
                .to_string(),
            });
        }
        // Expired peers are out of the engine; the lifecycle remembers them.
        for (key, (name, state, since, addrs)) in &lifecycle {
            if let PeerState::Expired { .. } = state {
                peers.push(PeerStatus {
                    name: Some(name.clone()),
                    public_key: key.to_string(),
                    allowed_ips: addrs
                        .iter()
                        .map(|ip| ipnet::IpNet::from(*ip).to_string())
                        .collect(),
                    endpoint: None,
                    last_handshake_seconds_ago: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    rx_packets: 0,
                    tx_packets: 0,
                    state: "expired".to_string(),
                    state_seconds: Some(ago(*since)),
                    source: "coordinated".to_string(),
                });
            }
        }
        peers.sort_by(|a, b| a.name.cmp(&b.name).then(a.public_key.cmp(&b.public_key)));

        let udp = self.node.udp_addr();
        Status {
            version: STATUS_VERSION,
            node: NodeStatus {
                name: me.as_ref().map(|m| m.name.clone()),
                public_key: self.node.public_key().to_base64(),
                addresses: self.node.netstack().addresses(),
                domain: me.as_ref().map(|m| m.domain.clone()),
                udp_port: udp.port(),
                endpoints: local_endpoints(udp.port(), udp.is_ipv6()),
                observed_addr: me.as_ref().map(|m| m.observed_addr),
                control: control_json(self.control.as_ref(), control_status.as_ref(), now),
            },
            peers,
        }
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn control_json(
    handles: Option<&ControlHandles>,
    status: Option<&ControlStatus>,
    now: Instant,
) -> ControlJson {
    let (Some(handles), Some(status)) = (handles, status) else {
        return ControlJson {
            coordinator: None,
            state: "disabled".to_string(),
            ..ControlJson::default()
        };
    };
    let ago = |t: Instant| secs(now.saturating_duration_since(t));
    let (state, state_seconds, attempts, next_dial_in) = match status.state {
        ConnectionState::Connecting { since, attempt } => {
            ("connecting", Some(ago(since)), attempt, None)
        }
        ConnectionState::Connected { since } => ("connected", Some(ago(since)), 0, None),
        ConnectionState::Backoff { until, attempts } => (
            "backoff",
            None,
            attempts,
            Some(secs(until.saturating_duration_since(now))),
        ),
        ConnectionState::Stopped => ("stopped", None, 0, None),
    };
    ControlJson {
        coordinator: handles.url.as_ref().map(ToString::to_string),
        state: state.to_string(),
        state_seconds,
        attempts,
        next_dial_in_seconds: next_dial_in,
        last_error: status.last_error.as_ref().map(|e| LastErrorJson {
            kind: e.kind.to_string(),
            message: e.message.clone(),
            seconds_ago: ago(e.at),
        }),
        last_coordination_seconds_ago: status.last_coordination.map(ago),
        sessions_started: status.sessions_started,
        dials: status.dials,
        dial_failures: status
            .dial_failures_by_kind
            .iter()
            .map(|(k, v)| ((*k).to_string(), *v))
            .collect(),
    }
}

/// The status document (`GET /v1/status`, `tailnode status --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Document version ([`STATUS_VERSION`]).
    pub version: u32,
    /// This node.
    pub node: NodeStatus,
    /// Every peer: in the engine (active, lost) or remembered (expired).
    pub peers: Vec<PeerStatus>,
}

/// This node in the status document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Name assigned by the coordinator (none without one).
    pub name: Option<String>,
    /// WireGuard public key (base64).
    pub public_key: String,
    /// Tailnet addresses.
    pub addresses: Vec<IpAddr>,
    /// The tailnet's DNS domain.
    pub domain: Option<String>,
    /// WireGuard UDP port.
    pub udp_port: u16,
    /// UDP endpoints on local interfaces.
    pub endpoints: Vec<SocketAddr>,
    /// The address the coordinator saw us connect from.
    pub observed_addr: Option<SocketAddr>,
    /// Control-plane state.
    pub control: ControlJson,
}

/// Control-plane state in the status document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlJson {
    /// Coordinator URL (none when the node has only static peers).
    pub coordinator: Option<String>,
    /// `disabled`, `connecting`, `connected`, `backoff` or `stopped`.
    pub state: String,
    /// Seconds in the current state (connecting, connected).
    pub state_seconds: Option<f64>,
    /// Failed attempts since the last healthy session.
    pub attempts: u32,
    /// Seconds until the next dial (backoff).
    pub next_dial_in_seconds: Option<f64>,
    /// The most recent failure.
    pub last_error: Option<LastErrorJson>,
    /// Seconds since the coordinator was last heard from.
    pub last_coordination_seconds_ago: Option<f64>,
    /// Sessions opened since start.
    pub sessions_started: u64,
    /// Dials since start.
    pub dials: u64,
    /// Dial failures by cause (`timeout`, `refused`, `dns`, `tls`, ...).
    pub dial_failures: BTreeMap<String, u64>,
}

/// A control-plane failure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastErrorJson {
    /// Cause (`timeout`, `refused`, `dns`, `tls`, `http`, `websocket`, `protocol`, `rejected`, ...).
    pub kind: String,
    /// The message.
    pub message: String,
    /// When, in seconds ago.
    pub seconds_ago: f64,
}

/// One peer in the status document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Name (coordinated peers).
    pub name: Option<String>,
    /// WireGuard public key (base64).
    pub public_key: String,
    /// Allowed IPs (the peer's addresses for coordinated peers).
    pub allowed_ips: Vec<String>,
    /// Current UDP endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Seconds since the last completed handshake.
    pub last_handshake_seconds_ago: Option<f64>,
    /// Bytes received from the peer (WireGuard datagrams).
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
    /// Datagrams received.
    pub rx_packets: u64,
    /// Datagrams sent.
    pub tx_packets: u64,
    /// `active`, `lost` or `expired`.
    pub state: String,
    /// Seconds in that state (coordinated peers).
    pub state_seconds: Option<f64>,
    /// `static` (wg-quick file) or `coordinated`.
    pub source: String,
}

/// Serves the API until `cancel` fires.
pub async fn serve(listener: ApiListener, source: StatusSource, cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            accepted = accept(&listener) => match accepted {
                Ok(stream) => {
                    let source = source.clone();
                    tokio::spawn(async move {
                        match stream {
                            Stream::Tcp(s) => handle(s, &source).await,
                            Stream::Unix(s) => handle(s, &source).await,
                        }
                    });
                }
                Err(e) => {
                    debug!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &ApiListener) -> std::io::Result<Stream> {
    match listener {
        ApiListener::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
        ApiListener::Unix(l, _) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
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
        let names = source.control.as_ref().map(|c| &c.directory);
        let code = crate::ping::serve(&mut stream, query, &source.node, names).await;
        if code >= 400 {
            source.errors.increment();
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
        source.errors.increment();
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

/// A human summary of a status document (`tailnode status`).
pub fn render(status: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let n = &status.node;
    let addrs: Vec<String> = n.addresses.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "{}  {}  udp {}  key {}",
        n.name.as_deref().unwrap_or("(unnamed)"),
        addrs.join(" "),
        n.udp_port,
        n.public_key
    );
    let c = &n.control;
    match c.state.as_str() {
        "disabled" => {
            let _ = writeln!(out, "control: none (static peers only)");
        }
        state => {
            let mut line = format!(
                "control: {state} {}",
                c.coordinator.as_deref().unwrap_or("")
            );
            if let Some(s) = c.state_seconds {
                let _ = write!(line, " for {s:.0}s");
            }
            if c.attempts > 0 {
                let _ = write!(line, ", {} failed attempts", c.attempts);
            }
            if let Some(e) = &c.last_error {
                let _ = write!(
                    line,
                    ", last error {:.0}s ago: {} ({})",
                    e.seconds_ago, e.message, e.kind
                );
            }
            let _ = writeln!(out, "{line}");
        }
    }
    for p in &status.peers {
        let handshake = p
            .last_handshake_seconds_ago
            .map_or_else(|| "never".to_string(), |s| format!("{s:.0}s ago"));
        let endpoint = p
            .endpoint
            .map_or_else(|| "-".to_string(), |e| e.to_string());
        let _ = writeln!(
            out,
            "  {:<16} {:<8} {:<11} {:<40} handshake {:<9} rx {} tx {}  {}",
            p.name.as_deref().unwrap_or("-"),
            p.state,
            p.source,
            p.allowed_ips.join(","),
            handshake,
            p.rx_bytes,
            p.tx_bytes,
            endpoint
        );
    }
    out
}

/// Fetches the status document from a node's API (`tailnode status`).
///
/// # Errors
/// When the API cannot be reached or answers something else than a status document.
pub async fn fetch_status(addr: &ApiAddr) -> anyhow::Result<Status> {
    let request = b"GET /v1/status HTTP/1.1\r\nHost: tailnode\r\nConnection: close\r\n\r\n";
    let response = tokio::time::timeout(Duration::from_secs(10), async {
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
            ApiAddr::Off => anyhow::bail!("no API address"),
        }
        anyhow::Ok(out)
    })
    .await
    .context("the node's API did not answer in time")?
    .with_context(|| {
        format!(
            "cannot reach the node's API at {addr} (is `tailnode up` running with --api {addr}?)"
        )
    })?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed answer from the API")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "API answered: {}",
        head.lines().next().unwrap_or("")
    );
    serde_json::from_str(body).context("the API's status document does not parse")
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
