//! The seam between the packet task and the network: where WireGuard datagrams leave and
//! arrive. The host's UDP socket is one implementation; the simulated network of the
//! `testing` feature ([`crate::testing::sim`]) is another.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

/// A datagram socket the packet task can drive: readiness plus non-blocking receive and send,
/// as [`tokio::net::UdpSocket`] offers them.
pub trait DatagramIo: Send + Sync + 'static {
    /// The address datagrams are sent from.
    ///
    /// # Errors
    /// When the socket cannot tell (a closed socket).
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// Waits until a datagram may be ready to receive. May wake spuriously: the caller
    /// retries [`try_recv_from`](Self::try_recv_from) until it would block.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Takes one received datagram without waiting; `WouldBlock` when none is queued.
    ///
    /// # Errors
    /// `WouldBlock`, or an error concerning one datagram (an ICMP error of an earlier send).
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;

    /// Sends one datagram without waiting; `WouldBlock` when there is no room.
    ///
    /// # Errors
    /// `WouldBlock`, or why the datagram could not be sent.
    fn try_send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize>;

    /// Sends one datagram, waiting for room.
    fn send_to(
        &self,
        buf: &[u8],
        dst: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send;
}

impl DatagramIo for tokio::net::UdpSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::UdpSocket::local_addr(self)
    }

    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::UdpSocket::readable(self)
    }

    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        tokio::net::UdpSocket::try_recv_from(self, buf)
    }

    fn try_send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize> {
        tokio::net::UdpSocket::try_send_to(self, buf, dst)
    }

    fn send_to(
        &self,
        buf: &[u8],
        dst: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send {
        tokio::net::UdpSocket::send_to(self, buf, dst)
    }
}
