//! How proxies reach a destination: through the tailnet when a peer's allowed
//! IPs cover it, from the host network when direct egress is allowed, refused
//! otherwise. The same policy covers TCP ([`Dialer`]) and the datagrams of
//! SOCKS5 UDP associations ([`UdpDialer`], [`TailnetUdp`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::task::Poll;
use std::time::Duration;

use tailnode_control::controller::PeerDirectory;
use tailnode_netstack::ConnectError;
use tokio::io::ReadBuf;
use tokio::net::TcpStream as HostStream;
use tokio::time::Instant;
use tracing::debug;

use crate::node::{NodeHandle, Route};
use crate::socks5::{DialError, Dialer, TargetAddr, UdpDialer, UdpEgress};
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

// ---------------------------------------------------------------------------
// UDP: the egress of SOCKS5 UDP associations.

/// How long a destination's route decision (tailnet, direct, refused) is reused.
const UDP_ROUTE_TTL: Duration = Duration::from_secs(5);
/// How long a resolved destination name is reused.
const UDP_NAME_TTL: Duration = Duration::from_secs(30);
/// Route decisions and names remembered per association; the caches are emptied when full.
const UDP_CACHE_ENTRIES: usize = 256;

/// Where a UDP destination is reached from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UdpPath {
    Tailnet,
    Direct,
}

/// The outbound side of one SOCKS5 UDP association: one netstack socket (bound when the
/// association opens, so that tailnet replies come back to it), plus host sockets for direct
/// destinations, bound on first use and only when direct egress is allowed.
///
/// Destinations follow the CONNECT policy: names resolve through the peer directory first (the
/// host's DNS only with direct egress), addresses inside a peer's allowed IPs go through the
/// tailnet, others go direct or are refused. Route decisions are cached for 5 s and names for
/// 30 s, so the steady state costs neither a round trip to the node task nor a DNS query per
/// datagram.
pub struct TailnetUdp {
    dialer: TailnetDialer,
    tailnet: tailnode_netstack::UdpSocket,
    host_v4: Option<tokio::net::UdpSocket>,
    host_v6: Option<tokio::net::UdpSocket>,
    routes: HashMap<IpAddr, (Result<UdpPath, DialError>, Instant)>,
    names: HashMap<String, (IpAddr, Instant)>,
    host_first: bool,
}

impl std::fmt::Debug for TailnetUdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TailnetUdp")
            .field("tailnet_port", &self.tailnet.local_port())
            .field(
                "direct",
                &(self.host_v4.is_some() || self.host_v6.is_some()),
            )
            .finish()
    }
}

impl UdpDialer for TailnetDialer {
    type Egress = TailnetUdp;

    async fn open_udp(&self) -> Result<TailnetUdp, DialError> {
        let tailnet = self
            .node
            .netstack()
            .bind_udp(None)
            .map_err(|e| DialError::Other(e.to_string()))?;
        Ok(TailnetUdp {
            dialer: self.clone(),
            tailnet,
            host_v4: None,
            host_v6: None,
            routes: HashMap::new(),
            names: HashMap::new(),
            host_first: false,
        })
    }
}

impl TailnetUdp {
    async fn resolve(&mut self, target: &TargetAddr) -> Result<SocketAddr, DialError> {
        let (host, port) = match target {
            TargetAddr::Ip(addr) => return Ok(*addr),
            TargetAddr::Domain(host, port) => (host, *port),
        };
        let now = Instant::now();
        if let Some((ip, at)) = self.names.get(host.as_str())
            && now.duration_since(*at) < UDP_NAME_TTL
        {
            return Ok(SocketAddr::new(*ip, port));
        }
        let addr = self
            .dialer
            .resolve(host, port)
            .await?
            .into_iter()
            .next()
            .ok_or(DialError::HostUnreachable)?;
        if self.names.len() >= UDP_CACHE_ENTRIES {
            self.names.clear();
        }
        self.names.insert(host.clone(), (addr.ip(), now));
        Ok(addr)
    }

    async fn path(&mut self, ip: IpAddr) -> Result<UdpPath, DialError> {
        let now = Instant::now();
        if let Some((path, at)) = self.routes.get(&ip)
            && now.duration_since(*at) < UDP_ROUTE_TTL
        {
            return path.clone();
        }
        let route = self
            .dialer
            .node
            .route(ip)
            .await
            .map_err(|e| DialError::Other(e.to_string()))?;
        let path = match route {
            Route::Peer {
                has_endpoint: false,
                ..
            } => Err(DialError::HostUnreachable),
            Route::Peer { .. } | Route::Local => Ok(UdpPath::Tailnet),
            Route::None => match self.dialer.direct {
                DirectPolicy::Allow => Ok(UdpPath::Direct),
                DirectPolicy::Refuse => Err(DialError::NotAllowed),
            },
        };
        if self.routes.len() >= UDP_CACHE_ENTRIES {
            self.routes.clear();
        }
        self.routes.insert(ip, (path.clone(), now));
        path
    }

    async fn host_socket(&mut self, v4: bool) -> Result<&tokio::net::UdpSocket, DialError> {
        let slot = if v4 {
            &mut self.host_v4
        } else {
            &mut self.host_v6
        };
        if slot.is_none() {
            let any: SocketAddr = if v4 {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = tokio::net::UdpSocket::bind(any)
                .await
                .map_err(|e| io_error(&e))?;
            debug!(local = ?socket.local_addr().ok(), "UDP association: host socket bound");
            *slot = Some(socket);
        }
        slot.as_ref()
            .ok_or_else(|| DialError::Other("host socket missing".into()))
    }
}

impl UdpEgress for TailnetUdp {
    async fn send_to(
        &mut self,
        target: &TargetAddr,
        payload: &[u8],
    ) -> Result<SocketAddr, DialError> {
        let addr = self.resolve(target).await?;
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        match self.path(addr.ip()).await? {
            UdpPath::Tailnet => self.tailnet.send_to(payload, addr).await,
            UdpPath::Direct => {
                self.host_socket(addr.is_ipv4())
                    .await?
                    .send_to(payload, addr)
                    .await
            }
        }
        .map_err(|e| io_error(&e))?;
        Ok(addr)
    }

    async fn recv_from(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        // Alternate which side is polled first so that a busy one cannot starve the other.
        self.host_first = !self.host_first;
        let host_first = self.host_first;
        let (tailnet, hosts) = (&self.tailnet, [&self.host_v4, &self.host_v6]);
        std::future::poll_fn(|cx| {
            for turn in 0..2 {
                if (turn == 0) != host_first {
                    if let Poll::Ready(received) = tailnet.poll_recv_from(cx, buf) {
                        return Poll::Ready(received);
                    }
                    continue;
                }
                for socket in hosts.iter().copied().flatten() {
                    let mut read = ReadBuf::new(buf);
                    if let Poll::Ready(received) = socket.poll_recv_from(cx, &mut read) {
                        let len = read.filled().len();
                        return Poll::Ready(received.map(|from| (len, from)));
                    }
                }
            }
            Poll::Pending
        })
        .await
    }
}
