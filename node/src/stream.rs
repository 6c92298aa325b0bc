//! A stream that is either a tailnet connection or a connection made from
//! the host network, so proxies can treat both alike.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tailnode_netstack::TcpStream as TailnetStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream as HostStream;

/// A connection opened by a proxy.
#[derive(Debug)]
pub enum ProxyStream {
    /// Through the tunnel, terminated by this node's netstack.
    Tailnet(TailnetStream),
    /// From the host network (direct egress).
    Host(HostStream),
}

impl ProxyStream {
    /// Ends the connection abruptly (RST) rather than with a FIN.
    pub fn abort(self) {
        match self {
            ProxyStream::Tailnet(s) => s.abort(),
            ProxyStream::Host(s) => {
                // SO_LINGER 0 makes the close send an RST.
                let _ = s.set_zero_linger();
            }
        }
    }
}

impl AsyncRead for ProxyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ProxyStream::Tailnet(s) => Pin::new(s).poll_read(cx, buf),
            ProxyStream::Host(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ProxyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ProxyStream::Tailnet(s) => Pin::new(s).poll_write(cx, buf),
            ProxyStream::Host(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ProxyStream::Tailnet(s) => Pin::new(s).poll_flush(cx),
            ProxyStream::Host(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ProxyStream::Tailnet(s) => Pin::new(s).poll_shutdown(cx),
            ProxyStream::Host(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
