//! Where the coordinator accepts connections: the host's TCP listener, or a simulated
//! network's listener in tests (anything that yields byte streams with a peer address).

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

/// A source of incoming connections.
pub trait ConnectionListener: Send + 'static {
    /// An accepted connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The address connections arrive at.
    ///
    /// # Errors
    /// When the listener cannot tell.
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// Waits for the next connection and the address it comes from.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
}

impl ConnectionListener for TcpListener {
    type Stream = TcpStream;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }

    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, remote) = TcpListener::accept(self).await?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%remote, error = %e, "cannot set TCP_NODELAY");
        }
        Ok((stream, remote))
    }
}
