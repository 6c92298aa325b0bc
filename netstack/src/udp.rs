//! Async UDP sockets bound to a port on all of the node's addresses.

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::Shared;
use crate::core::Waiter;

/// A UDP socket of the netstack.
///
/// Datagrams are limited to the tunnel MTU minus the IP and UDP headers (no fragmentation).
/// Dropping the socket closes it once its queued datagrams have been handed to the driver.
/// One task may receive while another sends; concurrent receivers (or senders) overwrite each
/// other's waker.
pub struct UdpSocket {
    shared: Arc<Shared>,
    port: u16,
}

impl fmt::Debug for UdpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpSocket")
            .field("port", &self.port)
            .finish()
    }
}

impl UdpSocket {
    pub(crate) fn new(shared: Arc<Shared>, port: u16) -> Self {
        Self { shared, port }
    }

    /// The bound port.
    pub fn local_port(&self) -> u16 {
        self.port
    }

    /// The bound endpoint: every address of the node (shown as `[::]`) and the port.
    pub fn local_addr(&self) -> SocketAddr {
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), self.port)
    }

    /// Sends one datagram to `target`, waiting while the send queue is full.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for an unspecified target or a datagram above the MTU limit,
    /// `AddrNotAvailable` if the node has no address of the target's family.
    pub async fn send_to(&self, data: &[u8], target: SocketAddr) -> io::Result<usize> {
        poll_fn(|cx| self.poll_send_to(cx, data, target)).await
    }

    /// Poll form of [`send_to`](Self::send_to).
    pub fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        data: &[u8],
        target: SocketAddr,
    ) -> Poll<io::Result<usize>> {
        let port = self.port;
        self.shared
            .poll_with(cx, |core| core.udp_send(port, data, target))
    }

    /// Receives one datagram into `buf`: its length (truncated to `buf.len()`, the rest of a
    /// longer datagram is discarded) and the sender.
    ///
    /// # Errors
    ///
    /// `NotConnected` only if the socket's state vanished, which does not happen while it is
    /// alive.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        poll_fn(|cx| self.poll_recv_from(cx, buf)).await
    }

    /// Poll form of [`recv_from`](Self::recv_from).
    pub fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, SocketAddr)>> {
        let port = self.port;
        self.shared.poll_with(cx, |core| core.udp_recv(port, buf))
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        let port = self.port;
        self.shared
            .release(&[Waiter::UdpRecv(port), Waiter::UdpSend(port)], |core| {
                core.udp_close(port);
            });
    }
}
