//! How the node's proxies and forwards reach a destination: one vocabulary ([`TargetAddr`],
//! [`Dialer`], [`UdpDialer`], [`DialError`]) and one routing policy ([`policy`]) for TCP and
//! UDP.
//!
//! # Layout
//!
//! - [`policy`]: where a destination address goes — this node, a peer through the tunnel, the
//!   host network, or nowhere — decided once for streams and datagrams alike.
//! - [`tailnet`]: [`TailnetDialer`], the node's dialer: peer names through the coordinated
//!   directory, addresses through the policy, connections through the netstack or the host.
//! - [`udp`]: the datagram side: [`UdpDialer`] / [`UdpEgress`] and the node's [`TailnetUdp`].
//!
//! Proxies are generic over [`Dialer`] (and [`UdpDialer`]), so their tests run against local
//! sockets; the node hands them its [`TailnetDialer`].

pub mod policy;
pub mod tailnet;
pub mod udp;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

pub use policy::{DirectPolicy, Via};
pub use tailnet::TailnetDialer;
pub use udp::{NoUdp, TailnetUdp, UdpDialer, UdpEgress};

/// Default time allowed for a connection to be established.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest domain name a target may carry (the SOCKS5 limit, RFC 1928: one length byte, and
/// DNS's 253 characters).
pub const MAX_DOMAIN_LEN: usize = 253;

/// Where a client wants to go: an address, or a name still to be resolved by the dialer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetAddr {
    /// An IPv4 or IPv6 address and port.
    Ip(SocketAddr),
    /// A domain name and port. The name is 1..=[`MAX_DOMAIN_LEN`] bytes of UTF-8 without
    /// control characters.
    Domain(String, u16),
}

impl TargetAddr {
    /// The destination port.
    pub fn port(&self) -> u16 {
        match self {
            Self::Ip(addr) => addr.port(),
            Self::Domain(_, port) => *port,
        }
    }

    /// The IP address, if the target is not a domain name.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Self::Ip(addr) => Some(addr.ip()),
            Self::Domain(..) => None,
        }
    }
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(addr) => addr.fmt(f),
            Self::Domain(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

impl From<SocketAddr> for TargetAddr {
    fn from(addr: SocketAddr) -> Self {
        Self::Ip(addr)
    }
}

/// A `HOST:PORT` that does not parse as a [`TargetAddr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid target {0:?}: expected IP:PORT, [IPv6]:PORT or NAME:PORT")]
pub struct TargetAddrError(String);

impl FromStr for TargetAddr {
    type Err = TargetAddrError;

    /// `100.64.0.2:80`, `[fd7a:115c:a1e0::2]:80` or `web:80` (a peer name or a host name).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Self::Ip(addr));
        }
        let err = || TargetAddrError(s.to_string());
        let (host, port) = s.rsplit_once(':').ok_or_else(err)?;
        let port: u16 = port.parse().map_err(|_| err())?;
        let valid_name = !host.is_empty()
            && host.len() <= MAX_DOMAIN_LEN
            && !host.contains(':')
            && !host.chars().any(char::is_control);
        if !valid_name {
            return Err(err());
        }
        Ok(Self::Domain(host.to_string(), port))
    }
}

/// Why a dial failed. The proxies map it to their answers (SOCKS5 reply codes, HTTP 502/504).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    /// The policy forbids this destination (e.g. direct egress disabled). SOCKS5 reply 0x02.
    #[error("connection not allowed by policy")]
    NotAllowed,
    /// No route: outside every peer's allowed IPs and no direct egress, or no local address of
    /// the destination's family. Reply 0x03.
    #[error("network unreachable")]
    NetworkUnreachable,
    /// The host cannot be reached (peer without endpoint, name does not resolve). Reply 0x04.
    #[error("host unreachable")]
    HostUnreachable,
    /// The target refused the connection (RST). Reply 0x05.
    #[error("connection refused")]
    ConnectionRefused,
    /// The connection attempt timed out. Reply 0x06 ("TTL expired").
    #[error("connection timed out")]
    TimedOut,
    /// The dialer cannot handle this kind of address. Reply 0x08.
    #[error("address type not supported")]
    AddressTypeNotSupported,
    /// The node has stopped. Reply 0x01.
    #[error("the node has stopped")]
    NodeStopped,
    /// The netstack has no room for another socket (socket limit, ephemeral ports). Reply 0x01.
    #[error("no socket available: {0}")]
    NoSocket(String),
    /// The destination cannot be connected to (unspecified, multicast, port 0). Reply 0x01.
    #[error("invalid destination {0}")]
    InvalidDestination(SocketAddr),
    /// Any other operating-system error. Reply 0x01.
    #[error("{0}")]
    Io(io::ErrorKind),
}

impl DialError {
    /// The failure an OS error stands for.
    pub fn from_io(e: &io::Error) -> Self {
        use io::ErrorKind;
        match e.kind() {
            ErrorKind::ConnectionRefused => Self::ConnectionRefused,
            ErrorKind::TimedOut => Self::TimedOut,
            ErrorKind::NetworkUnreachable => Self::NetworkUnreachable,
            ErrorKind::HostUnreachable => Self::HostUnreachable,
            kind => Self::Io(kind),
        }
    }
}

impl From<tailnode_netstack::ConnectError> for DialError {
    fn from(e: tailnode_netstack::ConnectError) -> Self {
        use tailnode_netstack::ConnectError;
        match e {
            ConnectError::Refused => Self::ConnectionRefused,
            ConnectError::TimedOut => Self::TimedOut,
            ConnectError::NoAddress => Self::NetworkUnreachable,
            ConnectError::InvalidAddress(addr) => Self::InvalidDestination(addr),
            ConnectError::TooManySockets | ConnectError::NoFreePort => {
                Self::NoSocket(e.to_string())
            }
        }
    }
}

impl From<tailnode_netstack::UdpBindError> for DialError {
    fn from(e: tailnode_netstack::UdpBindError) -> Self {
        Self::NoSocket(e.to_string())
    }
}

impl From<crate::node::NodeStopped> for DialError {
    fn from(_: crate::node::NodeStopped) -> Self {
        Self::NodeStopped
    }
}

/// Something that opens streams for the proxies: the node implements it ([`TailnetDialer`]:
/// through the netstack, or direct from the host).
pub trait Dialer: Send + Sync + 'static {
    /// The stream a successful dial yields.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Opens a TCP stream to `target`, returning it and the local address it is bound to (the
    /// SOCKS5 reply's BND.ADDR/BND.PORT).
    ///
    /// Callers bound the call with their connect timeout and drop the future when their client
    /// goes away, so implementations need not time out themselves (they may, returning
    /// [`DialError::TimedOut`]).
    fn connect(
        &self,
        target: &TargetAddr,
    ) -> impl Future<Output = Result<(Self::Stream, SocketAddr), DialError>> + Send;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_from_host_port() {
        assert_eq!(
            "100.64.0.2:80".parse::<TargetAddr>().unwrap(),
            TargetAddr::Ip("100.64.0.2:80".parse().unwrap())
        );
        assert_eq!(
            "[fd7a:115c:a1e0::2]:443".parse::<TargetAddr>().unwrap(),
            TargetAddr::Ip("[fd7a:115c:a1e0::2]:443".parse().unwrap())
        );
        assert_eq!(
            "web:8080".parse::<TargetAddr>().unwrap(),
            TargetAddr::Domain("web".into(), 8080)
        );
        for bad in [
            "web",
            ":80",
            "web:http",
            "web:70000",
            "fd7a::2:80",
            "a\nb:1",
        ] {
            assert!(bad.parse::<TargetAddr>().is_err(), "{bad:?}");
        }
        let name = "x".repeat(MAX_DOMAIN_LEN + 1);
        assert!(format!("{name}:1").parse::<TargetAddr>().is_err());
    }

    #[test]
    fn os_and_netstack_errors_map_to_their_failures() {
        let io = |kind| DialError::from_io(&io::Error::from(kind));
        assert_eq!(
            io(io::ErrorKind::ConnectionRefused),
            DialError::ConnectionRefused
        );
        assert_eq!(io(io::ErrorKind::TimedOut), DialError::TimedOut);
        assert_eq!(
            io(io::ErrorKind::PermissionDenied),
            DialError::Io(io::ErrorKind::PermissionDenied)
        );
        use tailnode_netstack::ConnectError;
        assert_eq!(
            DialError::from(ConnectError::NoAddress),
            DialError::NetworkUnreachable
        );
        assert!(matches!(
            DialError::from(ConnectError::TooManySockets),
            DialError::NoSocket(_)
        ));
    }
}
