//! The coordinator's tiny HTTP front: read one request head (bounded), decide
//! what it is, and either answer it or hand the connection — with the bytes
//! already read put back in front — to the websocket handshake.
//!
//! Only two things are served (RFC 9110 / RFC 6455 §4.2.1):
//! `GET /healthz` → `200 ok`, and `GET` + `Upgrade: websocket` on
//! [`NODE_PATH`]. Everything else gets a short error response and a close.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proto::{HEALTH_PATH, NODE_PATH};

/// Largest request head accepted.
pub const MAX_HEAD: usize = 8 << 10;

/// Most headers in a request head.
const MAX_HEADERS: usize = 64;

/// What a request head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /healthz`.
    Health,
    /// A websocket upgrade on the node path.
    Node,
    /// An answer-and-close: status code and reason phrase.
    Refuse(u16, &'static str),
}

/// Where the request head ends (the index after `\r\n\r\n`), if it is
/// complete in `buf`.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Classifies a complete request head.
pub fn route(head: &[u8]) -> Route {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) | Err(_) => return Route::Refuse(400, "Bad Request"),
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Route::Refuse(400, "Bad Request");
    };
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let is_upgrade = request.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("upgrade")
            && std::str::from_utf8(h.value)
                .map(|v| {
                    v.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
                })
                .unwrap_or(false)
    });
    match path {
        HEALTH_PATH if method == "GET" => Route::Health,
        NODE_PATH if method == "GET" && is_upgrade => Route::Node,
        NODE_PATH if method == "GET" => Route::Refuse(426, "Upgrade Required"),
        HEALTH_PATH | NODE_PATH => Route::Refuse(405, "Method Not Allowed"),
        _ => Route::Refuse(404, "Not Found"),
    }
}

/// A complete HTTP/1.1 response with a short plain-text body, closing the
/// connection.
pub fn response(status: u16, reason: &str, body: &str) -> Vec<u8> {
    let mut extra = "";
    if status == 426 {
        extra = "Upgrade: websocket\r\n";
    } else if status == 405 {
        extra = "Allow: GET\r\n";
    }
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{extra}Connection: close\r\nCache-Control: no-store\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A stream that first yields `prefix`, then reads from `inner`; writes go
/// straight to `inner`. Hands bytes already consumed while routing back to
/// the websocket handshake.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `inner`, with `prefix` read first.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn routes() {
        let get = |path: &str, extra: &str| {
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").into_bytes()
        };
        assert_eq!(route(&get("/healthz", "")), Route::Health);
        assert_eq!(route(&get("/healthz?probe=1", "")), Route::Health);
        assert_eq!(
            route(&get(
                NODE_PATH,
                "Connection: Upgrade\r\nUpgrade: WebSocket\r\n"
            )),
            Route::Node
        );
        assert_eq!(
            route(&get(NODE_PATH, "")),
            Route::Refuse(426, "Upgrade Required")
        );
        assert_eq!(route(&get("/", "")), Route::Refuse(404, "Not Found"));
        assert_eq!(
            route(&get("/tailnode/v2/node", "Upgrade: websocket\r\n")).clone(),
            Route::Refuse(404, "Not Found")
        );
        assert_eq!(
            route(b"POST /healthz HTTP/1.1\r\n\r\n"),
            Route::Refuse(405, "Method Not Allowed")
        );
        assert_eq!(
            route(b"\x16\x03\x01garbage\r\n\r\n"),
            Route::Refuse(400, "Bad Request")
        );
    }

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn responses_are_well_formed() {
        let r = String::from_utf8(response(200, "OK", "ok")).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains("Content-Length: 2\r\n"));
        assert!(r.ends_with("\r\n\r\nok"));
    }

    #[tokio::test]
    async fn prefixed_reads_prefix_then_inner() {
        let inner: &[u8] = b" world";
        let mut s = Prefixed::new(b"hello".to_vec(), inner);
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    proptest::proptest! {
        #[test]
        fn routing_garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = head_end(&bytes);
            let _ = route(&bytes);
        }

        #[test]
        fn unknown_paths_are_404(path in "/[a-z0-9/]{0,40}") {
            proptest::prop_assume!(path != HEALTH_PATH && path != NODE_PATH);
            let head = format!("GET {path} HTTP/1.1\r\n\r\n");
            proptest::prop_assert_eq!(route(head.as_bytes()), Route::Refuse(404, "Not Found"));
        }
    }
}
