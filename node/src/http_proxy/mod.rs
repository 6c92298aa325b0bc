//! HTTP forward proxy: `CONNECT` tunnels and absolute-URI requests (RFC 9110, RFC 9112), dialing
//! through the same pluggable [`Dialer`](crate::dial::Dialer) as the SOCKS5 proxy, so the
//! node's tailnet dialer serves both. Clients use it as `HTTP_PROXY` / `HTTPS_PROXY`.
//!
//! # Layout
//!
//! - [`parse`]: sans-IO. Request and response heads, request targets, body framing and the
//!   chunked coding (tracked, not decoded), and the rewrite of proxied messages. Parsers work on
//!   byte slices and return `Parsed::Incomplete`, `Parsed::Complete(head, consumed)` or a
//!   [`ParseError`] that carries the status to answer.
//! - `server`: the tokio driver. [`HttpProxyServer::serve`] accepts on a `TcpListener` and runs
//!   one task per client connection.
//!
//! # Contract
//!
//! - `CONNECT host:port` (explicit port required): dial, answer
//!   `HTTP/1.1 200 Connection established`, then relay both ways with backpressure and half-close
//!   propagation. Bytes the client pipelined after the head are forwarded first.
//! - Any other method with an absolute `http://` URI: the request goes upstream in origin form
//!   (`GET /path?query HTTP/1.1`), same method and HTTP version. The client's `Host` field is kept
//!   (one made from the URI is added when missing; several are a 400). Hop-by-hop fields are
//!   dropped: `Connection` and every field it lists, `Proxy-Connection`, `Keep-Alive`, `TE`,
//!   `Trailer`, `Upgrade`, `Proxy-Authorization`, `Proxy-Authenticate`. `Via: 1.1 tailnode` is
//!   added both ways.
//! - Bodies are forwarded byte for byte. Requests: `Content-Length`, or `Transfer-Encoding:
//!   chunked` (chunk sizes, extensions and trailers parsed only to find the end), else none.
//!   Responses: none for HEAD, 1xx, 204 and 304; else chunked, `Content-Length`, or until the
//!   upstream closes (then the client connection is closed after it). The request body and the
//!   response travel concurrently, so `Expect: 100-continue` works (1xx answers are forwarded)
//!   and an upstream may answer before reading the whole body.
//! - Keep-alive: an HTTP/1.1 client connection serves requests in sequence (pipelined ones are
//!   answered in order). The upstream connection is kept and reused while the next request goes
//!   to the same target; a kept connection the upstream closed meanwhile is replaced, and a
//!   bodiless request that meets a silently closed kept connection is retried once on a fresh
//!   one. `Connection: close` from either side, an HTTP/1.0 client (no `Keep-Alive`
//!   negotiation), a close-delimited response or a request body not fully forwarded when the
//!   response starts (an early answer such as 413) close the client connection after the
//!   response, announced with `Connection: close`; the close drains the client's unread input
//!   briefly so the response is not lost to a reset.
//! - Upgrades (e.g. WebSocket): a request with `Connection: upgrade` and `Upgrade` is forwarded
//!   with both; a `101` answer is forwarded and the connection becomes a tunnel. A 101 nobody
//!   asked for is a 502.
//! - Errors are answered with a short `text/plain` body and `Connection: close`, then the
//!   connection closes (FIN, then a short bounded drain so the answer is not lost to a reset):
//!   400 malformed head, bad or origin-form target, `https://` URI (use CONNECT), CONNECT without
//!   port, bad `Content-Length`, ambiguous framing (Transfer-Encoding with Content-Length, or in an
//!   HTTP/1.0 request), head over [`HttpProxyConfig::max_head_bytes`] or over
//!   [`parse::MAX_HEADERS`] fields, malformed chunked request body; 407 with
//!   `Proxy-Authenticate: Basic realm="tailnode"` for missing or wrong credentials; 408 when a
//!   started head does not complete in time; 501 for a request transfer coding other than
//!   `chunked`; 502 when the dial fails (refused, unreachable, not allowed by policy: the body
//!   says which) or the upstream closes, fails or answers garbage before a response head; 504
//!   when the dial times out ([`DialError::TimedOut`](crate::dial::DialError::TimedOut) or the
//!   connect timeout) or no response head comes within the response timeout; 505 for HTTP
//!   versions other than 1.0 and 1.1. No method is refused: any token method is forwarded.
//! - Limits: head deadline, keep-alive idle timeout, connect timeout, response timeout (from the
//!   end of the request to the final response head; bodies in flight are not timed), at most
//!   `max_connections` clients (excess ones are accepted and closed at once).
//! - HTTP versions: the request goes upstream with the client's version and the response comes
//!   back with the upstream's, so an HTTP/1.0 client never receives a chunked body (a deviation
//!   from RFC 9110 §6.2, which wants the proxy's own version; it spares re-framing bodies).
//! - Shutdown: cancelling the token closes the listener, cancels every connection, and
//!   [`HttpProxyServer::serve`] returns once all connection tasks are gone.
//! - Logs: one INFO line per request (method, `http://authority/path` without the query, status),
//!   per tunnel end and per failure; credentials are never logged (header `Debug` redacts them).

pub mod parse;
mod server;

#[cfg(test)]
mod tests;

pub use parse::{ParseError, Version};
pub use server::{HttpProxyConfig, HttpProxyServer};
