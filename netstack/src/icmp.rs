//! Async ICMP echo sockets: send echo requests (ping) over IPv4 and IPv6 and receive the replies.
//!
//! An [`IcmpSocket`] owns one echo identifier. Requests leave from the node's address of the
//! destination's family; the socket receives only echo replies addressed to the node that carry
//! its identifier (RFC 792, RFC 4443 §4). Echo requests *to* the node are answered by the stack
//! whether or not any socket is open. Matching replies to requests (sequence numbers, the
//! sender's address) and timeouts are the caller's business: apply `tokio::time::timeout` to
//! [`IcmpSocket::recv_reply`].

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::Shared;
use crate::core::Waiter;

/// Errors of [`Netstack::bind_icmp`](crate::Netstack::bind_icmp).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum IcmpBindError {
    /// Another [`IcmpSocket`] holds this echo identifier.
    #[error("ICMP echo identifier {0} already in use")]
    InUse(u16),
    /// The limit of echo sockets alive at once (1024) is reached.
    #[error("too many ICMP echo sockets")]
    TooManySockets,
}

/// One echo reply taken from an [`IcmpSocket`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoReply {
    /// Who answered (the source address of the reply).
    pub from: IpAddr,
    /// The reply's sequence number.
    pub seq: u16,
    /// Length of the reply's payload (the part copied into the caller's buffer may be shorter).
    pub len: usize,
}

/// An ICMP/ICMPv6 echo socket of the netstack, bound to one echo identifier.
///
/// Payloads are limited to the tunnel MTU minus the IP header and the 8-byte echo header (no
/// fragmentation). Up to 16 replies are buffered; later ones are dropped until the application
/// reads. Dropping the socket releases the identifier once its queued requests have been handed
/// to the driver. One task may receive while another sends.
pub struct IcmpSocket {
    shared: Arc<Shared>,
    ident: u16,
}

impl fmt::Debug for IcmpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IcmpSocket")
            .field("ident", &self.ident)
            .finish()
    }
}

impl IcmpSocket {
    pub(crate) fn new(shared: Arc<Shared>, ident: u16) -> Self {
        Self { shared, ident }
    }

    /// The echo identifier of every request this socket sends.
    pub fn ident(&self) -> u16 {
        self.ident
    }

    /// Sends one echo request with sequence number `seq` and `payload` to `dst`, waiting while
    /// the send queue is full.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a destination that is not unicast or a payload above the MTU limit,
    /// `AddrNotAvailable` if the node has no address of the destination's family.
    pub async fn send_echo(&self, dst: IpAddr, seq: u16, payload: &[u8]) -> io::Result<()> {
        poll_fn(|cx| self.poll_send_echo(cx, dst, seq, payload)).await
    }

    /// Poll form of [`send_echo`](Self::send_echo).
    pub fn poll_send_echo(
        &self,
        cx: &mut Context<'_>,
        dst: IpAddr,
        seq: u16,
        payload: &[u8],
    ) -> Poll<io::Result<()>> {
        let ident = self.ident;
        self.shared
            .poll_with(cx, |core| core.icmp_send(ident, dst, seq, payload))
    }

    /// Waits for the next echo reply; its payload is copied into `buf` (truncated to
    /// `buf.len()`).
    ///
    /// # Errors
    ///
    /// `NotConnected` only if the socket's state vanished, which does not happen while it is
    /// alive.
    pub async fn recv_reply(&self, buf: &mut [u8]) -> io::Result<EchoReply> {
        poll_fn(|cx| self.poll_recv_reply(cx, buf)).await
    }

    /// Poll form of [`recv_reply`](Self::recv_reply).
    pub fn poll_recv_reply(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<EchoReply>> {
        let ident = self.ident;
        self.shared.poll_with(cx, |core| core.icmp_recv(ident, buf))
    }
}

impl Drop for IcmpSocket {
    fn drop(&mut self) {
        let ident = self.ident;
        self.shared.release(
            &[Waiter::IcmpRecv(ident), Waiter::IcmpSend(ident)],
            |core| {
                core.icmp_close(ident);
            },
        );
    }
}
