//! How proxies reach a destination: through the tailnet when a peer's allowed
//! IPs cover it, from the host network when direct egress is allowed, refused
//! otherwise.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tailnode_control::controller::PeerDirectory;
use tailnode_netstack::ConnectError;
use tokio::net::TcpStream as HostStream;
use tracing::debug;

use crate::node::{NodeHandle, Route};
use crate::socks5::{DialError, Dialer, TargetAddr};
use crate::stream::ProxyStream;

/// Default time allowed for a connection to be established.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// What to do with destinations outside the tailnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectPolicy {
    /// Connect them from the host network.
    Allow,
    /// Refuse them (SOCKS5 reply "connection not allowed by ruleset").
    Refuse,
}

/// Opens proxy connections for a node.
#[derive(Clone)]
pub struct TailnetDialer {
    node: NodeHandle,
    direct: DirectPolicy,
    connect_timeout: Duration,
    names: Option<PeerDirectory>,
}

impl TailnetDialer {
    /// A dialer for `node`.
    pub fn new(node: NodeHandle, direct: DirectPolicy, connect_timeout: Duration) -> Self {
        Self {
            node,
            direct,
            connect_timeout,
            names: None,
        }
    }

    /// Resolves host names through the coordinated peer directory first
    /// (`name` and `name.<tailnet domain>`).
    pub fn with_names(mut self, names: PeerDirectory) -> Self {
        self.names = Some(names);
        self
    }

    /// Connects to `target`, resolving host names first.
    ///
    /// # Errors
    /// A [`DialError`] that says why, mapped by the proxies to their reply codes.
    pub async fn dial(&self, target: &TargetAddr) -> Result<(ProxyStream, SocketAddr), DialError> {
        match target {
            TargetAddr::Ip(addr) => self.dial_addr(*addr).await,
            TargetAddr::Domain(host, port) => {
                let addrs = self.resolve(host, *port).await?;
                let mut last = DialError::HostUnreachable;
                for addr in addrs {
                    match self.dial_addr(addr).await {
                        Ok(done) => return Ok(done),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, DialError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Some(names) = &self.names {
            if let Some((v4, v6)) = names.resolve(host) {
                return Ok(vec![
                    SocketAddr::new(IpAddr::V4(v4), port),
                    SocketAddr::new(IpAddr::V6(v6), port),
                ]);
            }
            if names.with(|l| {
                l.self_addresses()
                    .is_some_and(|me| in_domain(host, &me.domain))
            }) {
                // A tailnet name we do not know: never ask the host's DNS.
                return Err(DialError::HostUnreachable);
            }
        }
        if self.direct == DirectPolicy::Refuse {
            // Without direct egress only tailnet names could be reached, and
            // the host's DNS must not learn what the tailnet is asked for.
            return Err(DialError::HostUnreachable);
        }
        let found =
            tokio::time::timeout(self.connect_timeout, tokio::net::lookup_host((host, port)))
                .await
                .map_err(|_| DialError::TimedOut)?
                .map_err(|e| {
                    debug!(%host, error = %e, "name resolution failed");
                    DialError::HostUnreachable
                })?;
        let addrs: Vec<SocketAddr> = found.collect();
        if addrs.is_empty() {
            Err(DialError::HostUnreachable)
        } else {
            Ok(addrs)
        }
    }

    async fn dial_addr(&self, addr: SocketAddr) -> Result<(ProxyStream, SocketAddr), DialError> {
        let route = self
            .node
            .route(addr.ip())
            .await
            .map_err(|e| DialError::Other(e.to_string()))?;
        match route {
            Route::Peer {
                has_endpoint: false,
                ..
            } => Err(DialError::HostUnreachable),
            Route::Peer { .. } | Route::Local => self.dial_tailnet(addr).await,
            Route::None => match self.direct {
                DirectPolicy::Allow => self.dial_host(addr).await,
                DirectPolicy::Refuse => Err(DialError::NotAllowed),
            },
        }
    }

    async fn dial_tailnet(&self, addr: SocketAddr) -> Result<(ProxyStream, SocketAddr), DialError> {
        let stack = self.node.netstack();
        match tokio::time::timeout(self.connect_timeout, stack.connect(addr)).await {
            Err(_) => Err(DialError::TimedOut),
            Ok(Err(e)) => Err(connect_error(e)),
            Ok(Ok(stream)) => {
                let local = stream.local_addr();
                Ok((ProxyStream::Tailnet(stream), local))
            }
        }
    }

    async fn dial_host(&self, addr: SocketAddr) -> Result<(ProxyStream, SocketAddr), DialError> {
        match tokio::time::timeout(self.connect_timeout, HostStream::connect(addr)).await {
            Err(_) => Err(DialError::TimedOut),
            Ok(Err(e)) => Err(io_error(&e)),
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                let local = stream
                    .local_addr()
                    .unwrap_or_else(|_| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0));
                Ok((ProxyStream::Host(stream), local))
            }
        }
    }
}

/// Whether `host` is `domain` or a name under it (case-insensitive, trailing dot allowed).
fn in_domain(host: &str, domain: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_matches('.').to_ascii_lowercase();
    !domain.is_empty() && (host == domain || host.ends_with(&format!(".{domain}")))
}

fn connect_error(e: ConnectError) -> DialError {
    match e {
        ConnectError::Refused => DialError::ConnectionRefused,
        ConnectError::NoAddress => DialError::NetworkUnreachable,
        other => DialError::Other(other.to_string()),
    }
}

fn io_error(e: &std::io::Error) -> DialError {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => DialError::ConnectionRefused,
        ErrorKind::TimedOut => DialError::TimedOut,
        ErrorKind::NetworkUnreachable => DialError::NetworkUnreachable,
        ErrorKind::HostUnreachable => DialError::HostUnreachable,
        _ => DialError::Other(e.to_string()),
    }
}

impl Dialer for TailnetDialer {
    type Stream = ProxyStream;

    async fn connect(&self, target: &TargetAddr) -> Result<(ProxyStream, SocketAddr), DialError> {
        self.dial(target).await
    }
}
