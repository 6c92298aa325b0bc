//! The datagram side of dialing: [`UdpDialer`] opens an [`UdpEgress`] per client (a SOCKS5 UDP
//! association, a UDP forward flow), and [`TailnetUdp`] is the node's: one netstack socket for
//! tailnet destinations, plus host sockets for direct ones when the policy allows them.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::task::Poll;
use std::time::Duration;

use tokio::io::ReadBuf;
use tokio::time::Instant;
use tracing::debug;

use super::policy::Via;
use super::{DialError, TailnetDialer, TargetAddr};

/// Opens the outbound side of UDP clients; the node implements it ([`TailnetDialer`]: tailnet
/// through the netstack, or direct from the host).
pub trait UdpDialer: Send + Sync + 'static {
    /// What one client sends through and receives replies from.
    type Egress: UdpEgress;

    /// Opens the egress of a new client (before a SOCKS5 client is answered: an error is the
    /// reply code of its UDP ASSOCIATE request).
    fn open_udp(&self) -> impl Future<Output = Result<Self::Egress, DialError>> + Send;
}

/// The outbound sockets of one client. Dropping it releases them.
pub trait UdpEgress: Send + 'static {
    /// Resolves `target` and sends `payload` to it; returns the address it was sent to (replies
    /// from there are accepted). An error drops the datagram.
    fn send_to(
        &mut self,
        target: &TargetAddr,
        payload: &[u8],
    ) -> impl Future<Output = Result<SocketAddr, DialError>> + Send;

    /// Receives the next reply, from any destination, into `buf`: its length and its source. A
    /// datagram longer than `buf` is truncated. Must be cancel-safe (the caller drops it when
    /// something else is ready).
    fn recv_from(
        &mut self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send;
}

/// The UDP capability of a server that does not support UDP (SOCKS5 answers 0x07). It has no
/// values.
#[derive(Debug, Clone, Copy)]
pub enum NoUdp {}

impl UdpDialer for NoUdp {
    type Egress = NoUdp;

    async fn open_udp(&self) -> Result<NoUdp, DialError> {
        match *self {}
    }
}

impl UdpEgress for NoUdp {
    async fn send_to(&mut self, _: &TargetAddr, _: &[u8]) -> Result<SocketAddr, DialError> {
        match *self {}
    }

    async fn recv_from(&mut self, _: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match *self {}
    }
}

/// How long a destination's route decision (tailnet, direct, refused) is reused.
const UDP_ROUTE_TTL: Duration = Duration::from_secs(5);
/// How long a resolved destination name is reused.
const UDP_NAME_TTL: Duration = Duration::from_secs(30);
/// Route decisions and names remembered per egress; the caches are emptied when full.
const UDP_CACHE_ENTRIES: usize = 256;

/// The outbound side of one UDP client: one netstack socket (bound when the egress opens, so
/// that tailnet replies come back to it), plus host sockets for direct destinations, bound on
/// first use and only when direct egress is allowed.
///
/// Destinations follow the CONNECT policy: names resolve through the peer directory first (the
/// host's DNS only with direct egress), addresses go as [`super::policy::decide`] says. Route
/// decisions are cached for 5 s and names for 30 s, so the steady state costs neither a round
/// trip to the packet task nor a DNS query per datagram.
pub struct TailnetUdp {
    dialer: TailnetDialer,
    tailnet: tailnode_netstack::UdpSocket,
    host_v4: Option<tokio::net::UdpSocket>,
    host_v6: Option<tokio::net::UdpSocket>,
    routes: HashMap<IpAddr, (Result<Via, DialError>, Instant)>,
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
        let tailnet = self.node.netstack().bind_udp(None)?;
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
    /// The port of the egress's tailnet socket.
    pub fn tailnet_port(&self) -> u16 {
        self.tailnet.local_port()
    }

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

    async fn via(&mut self, ip: IpAddr) -> Result<Via, DialError> {
        let now = Instant::now();
        if let Some((via, at)) = self.routes.get(&ip)
            && now.duration_since(*at) < UDP_ROUTE_TTL
        {
            return via.clone();
        }
        let via = self.dialer.via(ip).await;
        if self.routes.len() >= UDP_CACHE_ENTRIES {
            self.routes.clear();
        }
        self.routes.insert(ip, (via.clone(), now));
        via
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
                .map_err(|e| DialError::from_io(&e))?;
            debug!(local = ?socket.local_addr().ok(), "UDP egress: host socket bound");
            *slot = Some(socket);
        }
        slot.as_ref()
            .ok_or(DialError::Io(io::ErrorKind::NotConnected))
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
        match self.via(addr.ip()).await? {
            Via::Tailnet => self.tailnet.send_to(payload, addr).await,
            Via::Host => {
                self.host_socket(addr.is_ipv4())
                    .await?
                    .send_to(payload, addr)
                    .await
            }
        }
        .map_err(|e| DialError::from_io(&e))?;
        Ok(addr)
    }

    async fn recv_from(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
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
