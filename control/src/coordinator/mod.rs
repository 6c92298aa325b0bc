//! The coordinator: the server side of the control plane.
//!
//! Nodes connect over a websocket (`GET` [`NODE_PATH`](crate::proto::NODE_PATH),
//! optionally behind TLS), say `hello` with the tailnet's auth key and their
//! WireGuard public key, and get back a stable identity (`welcome`: name,
//! IPv4, IPv6), the current peer set (`snapshot`) and then every change
//! (`peer_update`). `control/PROTOCOL.md` is the wire contract.
//!
//! # Layout
//!
//! - [`registry`]: the sans-IO core. [`Registry`] holds identities and
//!   sessions, checks `hello`s, and turns session events into
//!   [`Output`]s: pre-serialized [`Frame`]s per session, close orders and
//!   persist requests. No sockets, no clock: unit-tested with plain calls.
//! - [`state`]: the JSON state file (identities), loaded at start-up (a
//!   corrupt file is a start-up error) and written atomically by a writer
//!   task only when an identity changes.
//! - `server` (driver): accept loop with a connection limit, a bounded
//!   HTTP head reader (`/healthz`, the websocket upgrade, 404 for the
//!   rest), one task per session with a bounded outbound queue, pings, and
//!   the hub — a mutex around the registry plus the session queues — that
//!   every session task calls into. A session whose queue is full is dropped
//!   (announced `lost`; it reconnects and gets a fresh snapshot), so a slow
//!   node never holds up the others.
//! - `tls`: optional rustls in front of everything.
//!
//! # Contract
//!
//! - Only the `cancel` token passed to [`serve`] ends the server; a bad
//!   connection, message or peer only ever ends its own session.
//! - A node that says `goodbye` is announced `disconnected`; any other end
//!   of its session (EOF, error, ping timeout, queue overflow, a refused
//!   message) is announced `lost`, and it stays in snapshots with status
//!   `lost` until it returns or [`CoordinatorConfig::lost_expiry`] passes.
//! - Identities are stable per node key across restarts.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};

pub mod http;
pub mod listener;
pub mod registry;
mod server;
pub mod state;
pub mod tls;

pub use listener::ConnectionListener;
pub use registry::{
    AuthKey, Frame, Hello, Output, Registry, RegistryConfig, Rejection, SessionId,
    effective_endpoints,
};
pub use server::{CoordinatorServer, serve};
pub use state::{NodeRecord, STATE_VERSION, StateFile, default_state_path};

/// Default tailnet DNS domain.
pub const DEFAULT_DOMAIN: &str = "tailnet.internal";

/// Default IPv4 range (the CGNAT range, as Tailscale uses).
pub const DEFAULT_IPV4_RANGE: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10) {
    Ok(net) => net,
    Err(_) => panic!("constant prefix length is valid"),
};

/// Default IPv6 prefix (a ULA /48).
pub const DEFAULT_IPV6_PREFIX: Ipv6Net =
    match Ipv6Net::new(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0), 48) {
        Ok(net) => net,
        Err(_) => panic!("constant prefix length is valid"),
    };

/// Where the auth key comes from.
#[derive(Clone)]
pub enum AuthKeySource {
    /// A fixed key.
    Fixed(String),
    /// A file holding the key (surrounding whitespace ignored), re-read on
    /// every `hello` so the key can be rotated without a restart.
    File(PathBuf),
}

impl fmt::Debug for AuthKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthKeySource::Fixed(_) => f.write_str("Fixed(<redacted>)"),
            AuthKeySource::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// PEM files for TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Everything the coordinator is configured with.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Address to listen on (used by [`CoordinatorServer::bind`]).
    pub listen: SocketAddr,
    /// The tailnet's auth key.
    pub auth_key: AuthKeySource,
    /// The state file (see [`default_state_path`]).
    pub state_path: PathBuf,
    /// DNS domain of the tailnet (default [`DEFAULT_DOMAIN`]).
    pub domain: String,
    /// IPv4 range for node addresses (default [`DEFAULT_IPV4_RANGE`]).
    pub ipv4_range: Ipv4Net,
    /// IPv6 prefix for node addresses (default [`DEFAULT_IPV6_PREFIX`]).
    pub ipv6_prefix: Ipv6Net,
    /// Interval of websocket pings (default 5 s). A session from which
    /// nothing arrived for two intervals is dropped and announced `lost`;
    /// a write that stalls for two intervals likewise.
    pub ping_interval: Duration,
    /// How long a lost node stays in snapshots (default 24 h).
    pub lost_expiry: Duration,
    /// TLS certificate and key; plain TCP if `None`.
    pub tls: Option<TlsFiles>,
    /// Most concurrent connections (default 100 000); more are closed at once.
    pub max_connections: usize,
    /// Time allowed for the TLS handshake, the HTTP head, the websocket
    /// upgrade and the `hello` (default 10 s).
    pub handshake_timeout: Duration,
    /// Outbound queue length per session, in messages (default 65 536, at
    /// least 2). Queued messages are shared, pre-serialized frames, so a
    /// long queue costs a pointer per message; it absorbs a join storm's
    /// burst of updates without dropping healthy sessions. A session whose
    /// queue still overflows is dropped (it reconnects and resyncs); one
    /// that stops reading is dropped by the write timeout long before.
    pub session_queue: usize,
}

impl CoordinatorConfig {
    /// A config with the defaults above, listening on `0.0.0.0:8080`.
    pub fn new(auth_key: AuthKeySource, state_path: PathBuf) -> Self {
        CoordinatorConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            auth_key,
            state_path,
            domain: DEFAULT_DOMAIN.into(),
            ipv4_range: DEFAULT_IPV4_RANGE,
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
            ping_interval: Duration::from_secs(5),
            lost_expiry: Duration::from_secs(24 * 3600),
            tls: None,
            max_connections: 100_000,
            handshake_timeout: Duration::from_secs(10),
            session_queue: 65_536,
        }
    }

    /// The registry's part of the config.
    pub fn registry_config(&self) -> RegistryConfig {
        RegistryConfig {
            domain: self.domain.clone(),
            ipv4_range: self.ipv4_range.trunc(),
            ipv6_prefix: self.ipv6_prefix.trunc(),
            lost_expiry: self.lost_expiry,
        }
    }
}

/// Why the coordinator could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The listener's address could not be read.
    #[error("listener has no local address: {0}")]
    Listener(std::io::Error),
    /// The configuration is unusable.
    #[error("invalid coordinator configuration: {0}")]
    Config(String),
    /// The auth key file could not be read or is empty.
    #[error("auth key file {}: {reason}", path.display())]
    AuthKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The state file exists but could not be read.
    #[error("cannot read state file {}: {source}", path.display())]
    StateRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The state file is not a valid state file (never silently discarded).
    #[error("state file {} is corrupt: {reason} (fix or move it away; it holds the tailnet's names and addresses)", path.display())]
    StateCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The state file could not be written.
    #[error("cannot write state file {}: {source}", path.display())]
    StateWrite {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS certificate or key is unusable.
    #[error("TLS file {}: {reason}", path.display())]
    Tls {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}
