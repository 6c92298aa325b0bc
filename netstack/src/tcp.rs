//! Async TCP handles: [`TcpStream`] (tokio `AsyncRead`/`AsyncWrite`) and [`TcpListener`].
//!
//! Every operation locks the netstack and runs the core's operation, which either completes or
//! returns `WouldBlock`; then the task's waker is registered before the lock is released (see
//! [`Shared::poll_with`]) and woken once the core lists the operation as ready, typically after
//! a later `poll`. Operations that give the stack work notify the driver.

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::core::{ConnId, Waiter};
use crate::{ConnectError, Shared};

/// Opens a connection; see [`crate::Netstack::connect`].
pub(crate) async fn connect(
    shared: &Arc<Shared>,
    remote: SocketAddr,
) -> Result<TcpStream, ConnectError> {
    let id = shared.with(|core| core.connect_start(remote))?;
    // Until the handshake completes, dropping the future (a caller's timeout) resets the attempt.
    let mut guard = ConnectGuard {
        shared: shared.clone(),
        id,
        armed: true,
    };
    let (local, peer) = poll_fn(|cx| shared.poll_with(cx, |core| core.connect_finish(id))).await?;
    // Ownership passes to the stream.
    guard.armed = false;
    Ok(TcpStream {
        shared: shared.clone(),
        id,
        local,
        peer,
        graceful: true,
    })
}

/// Resets and releases a connection attempt that did not complete.
struct ConnectGuard {
    shared: Arc<Shared>,
    id: ConnId,
    armed: bool,
}

impl Drop for ConnectGuard {
    fn drop(&mut self) {
        if self.armed {
            let id = self.id;
            self.shared
                .release(&[Waiter::TcpSend(id)], |core| core.release(id, false));
        }
    }
}

/// An established TCP connection through the netstack.
///
/// Reads return 0 after the peer's FIN; a peer reset surfaces as
/// [`io::ErrorKind::ConnectionReset`]. `shutdown()` sends FIN while reading continues
/// (half-close). Dropping the stream closes gracefully (FIN after queued data, RST if received
/// data was left unread); [`abort`](Self::abort) resets at once. The socket is reclaimed by the
/// stack once the close completes.
///
/// One task may read while another writes (e.g. after `tokio::io::split`); two tasks reading
/// concurrently would overwrite each other's waker.
pub struct TcpStream {
    shared: Arc<Shared>,
    id: ConnId,
    local: SocketAddr,
    peer: SocketAddr,
    /// Close with FIN (true) or RST (false) when dropped.
    graceful: bool,
}

impl fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpStream")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish()
    }
}

impl TcpStream {
    /// Our address and port of the connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The peer's address and port.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Resets the connection (RST) and releases it, discarding queued data in both directions.
    pub fn abort(mut self) {
        self.graceful = false;
        // Drop releases the connection.
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        let id = self.id;
        let graceful = self.graceful;
        self.shared
            .release(&[Waiter::TcpRecv(id), Waiter::TcpSend(id)], |core| {
                core.release(id, graceful);
            });
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let id = self.id;
        self.shared.poll_with(cx, |core| {
            core.tcp_recv(id, buf.remaining(), |data| buf.put_slice(data))
                .map(|read| read.map(|_| ()))
        })
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let id = self.id;
        self.shared.poll_with(cx, |core| core.tcp_send(id, data))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written data is in the stack's send buffer; the driver transmits it.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let id = self.id;
        Poll::Ready(self.shared.with(|core| core.tcp_shutdown(id)))
    }
}

/// Accepts TCP connections to one port on all of the node's addresses.
///
/// Dropping the listener stops listening and resets connections not yet accepted.
pub struct TcpListener {
    shared: Arc<Shared>,
    port: u16,
}

impl fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpListener")
            .field("port", &self.port)
            .finish()
    }
}

impl TcpListener {
    pub(crate) fn new(shared: Arc<Shared>, port: u16) -> Self {
        Self { shared, port }
    }

    /// The listened port.
    pub fn local_port(&self) -> u16 {
        self.port
    }

    /// Waits for the next established connection; returns it with the peer's address.
    ///
    /// # Errors
    ///
    /// Only if the listener's state vanished, which does not happen while it is alive.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Poll form of [`accept`](Self::accept). Only the most recent task to poll is woken.
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        let port = self.port;
        self.shared
            .poll_with(cx, |core| core.accept(port))
            .map_ok(|(id, (local, peer))| {
                (
                    TcpStream {
                        shared: self.shared.clone(),
                        id,
                        local,
                        peer,
                        graceful: true,
                    },
                    peer,
                )
            })
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        let port = self.port;
        self.shared
            .release(&[Waiter::Accept(port)], |core| core.unlisten(port));
    }
}
