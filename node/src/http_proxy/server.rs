//! The tokio driver: accept loop, per-connection task, request/response forwarding, tunnels.
//!
//! One task per client. It reads request heads into a bounded buffer (head deadline, keep-alive
//! idle timeout), checks credentials, and either tunnels (CONNECT, or a 101 upgrade) or forwards
//! one exchange at a time: request head and body to the upstream while the response comes back,
//! so that `Expect: 100-continue` and early answers work. Upstream connections are kept between
//! requests to the same target. Whatever a client does, it only ever ends its own task.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, trace};

use super::parse::{
    AbsoluteUri, BodyLength, BodyTracker, DEFAULT_MAX_HEAD_BYTES, HeadKind, HeadScanner, Limits,
    MAX_HEADERS, ParseError, Parsed, RequestHead, ResponseHead, basic_credentials,
    encode_forwarded_request, encode_forwarded_response, leading_empty_lines, parse_absolute_uri,
    parse_connect_target, parse_request_head, parse_response_head, reason_phrase, request_body,
    response_body,
};
use crate::accept::{AcceptLimits, accept_clients, close_with_reply};
use crate::dial::{DialError, Dialer, TargetAddr};
use crate::node::ConnectionCounters;
use crate::relay::{RELAY_BUFFER, relay};
use crate::socks5::Credentials;

/// Settings of an [`HttpProxyServer`].
#[derive(Debug, Clone)]
pub struct HttpProxyConfig {
    /// Credentials clients must present with `Proxy-Authorization: Basic` on every request;
    /// `None` serves everybody.
    pub auth: Option<Credentials>,
    /// Time a client has to send a complete request head: from accept for the first request,
    /// from its first byte for later ones. A client that sent part of a head is answered 408.
    pub header_timeout: Duration,
    /// Time allowed for a dial before the client is answered 504.
    pub connect_timeout: Duration,
    /// Time the upstream has to send its final response head once the request (head and body) is
    /// sent; 504 when it expires.
    pub response_timeout: Duration,
    /// Time a kept-alive client connection may stay idle between requests before it is closed.
    pub idle_timeout: Duration,
    /// Maximum number of clients served at once. Connections above it are accepted and closed at
    /// once, without an answer. 0 refuses everybody.
    pub max_connections: usize,
    /// Largest request or response head; a bigger request head is answered 400.
    pub max_head_bytes: usize,
    /// Counts served clients (open and total), for metrics.
    pub connections: Option<Arc<ConnectionCounters>>,
}

impl Default for HttpProxyConfig {
    fn default() -> Self {
        Self {
            auth: None,
            header_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(30),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            connections: None,
        }
    }
}

/// An HTTP/1.1 forward proxy (CONNECT tunnels and absolute-URI requests) dialing through `D`.
#[derive(Debug)]
pub struct HttpProxyServer<D: Dialer> {
    config: Arc<HttpProxyConfig>,
    dialer: Arc<D>,
}

/// Read size while reading a head.
const HEAD_READ: usize = 8 * 1024;
/// Longest time spent, after a final error answer, reading and discarding what the client still
/// sends, so that closing does not reset the connection before the client reads the answer.
const MAX_LINGER: Duration = Duration::from_secs(2);
/// Most bytes discarded while lingering.
const MAX_LINGER_BYTES: usize = 256 * 1024;
/// The answer to a successful CONNECT.
const CONNECT_ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

impl<D: Dialer> HttpProxyServer<D> {
    /// A server with `config` that opens connections through `dialer`.
    pub fn new(config: HttpProxyConfig, dialer: Arc<D>) -> Self {
        Self {
            config: Arc::new(config),
            dialer,
        }
    }

    /// Accepts and serves clients until `cancel` fires.
    ///
    /// Each client runs in its own task on a child token of `cancel`. On cancellation the listener
    /// is closed first, then the connection tasks (cancelled with it) are awaited, so when this
    /// returns no task of this server is left. Accept errors are logged and retried after a short
    /// pause: only cancellation ends the loop.
    ///
    /// # Errors
    ///
    /// Only if the listener's local address cannot be read at startup.
    pub async fn serve(self, listener: TcpListener, cancel: CancellationToken) -> io::Result<()> {
        let local = listener.local_addr()?;
        info!(%local, auth = self.config.auth.is_some(), "HTTP proxy listening");
        let kind = format!("HTTP proxy on {local}");
        let limits = AcceptLimits {
            kind: &kind,
            max_connections: self.config.max_connections,
            connections: self.config.connections.as_ref(),
        };
        let (config, dialer) = (&self.config, &self.dialer);
        accept_clients(listener, &cancel, limits, |stream, client, token| {
            let config = Arc::clone(config);
            let dialer = Arc::clone(dialer);
            async move {
                let outcome = tokio::select! {
                    biased;
                    () = token.cancelled() => Outcome::Cancelled,
                    outcome = serve_connection(stream, &config, &*dialer) => outcome,
                };
                outcome.log();
            }
            .instrument(info_span!("http_proxy", %client))
        })
        .await;
        Ok(())
    }
}

/// How a client connection ended; logged once per connection.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The client closed the connection between requests.
    ClientClosed {
        /// Requests served on the connection.
        requests: u64,
    },
    /// The connection was idle longer than the idle timeout.
    Idle {
        /// Requests served on the connection.
        requests: u64,
    },
    /// A request head did not arrive in time.
    HeaderTimeout,
    /// The proxy closed the connection after a response (the client or the upstream asked for
    /// it, or the body was delimited by the close).
    Finished {
        /// Requests served on the connection.
        requests: u64,
    },
    /// A request was answered with an error status, then the connection closed.
    Refused {
        /// The status sent.
        status: u16,
    },
    /// A tunnel (CONNECT, or a protocol upgrade) ran until both directions were shut down.
    Tunnelled {
        /// Where it went.
        target: TargetAddr,
        /// Bytes from the client to the target (including bytes pipelined with the request).
        up: u64,
        /// Bytes from the target to the client.
        down: u64,
    },
    /// A tunnel or a response in progress failed; the connection was closed.
    Broken {
        /// Where the request went.
        target: TargetAddr,
        /// What happened.
        error: String,
    },
    /// Reading from or writing to the client failed.
    ClientError(io::Error),
    /// The server is shutting down.
    Cancelled,
}

impl Outcome {
    fn log(&self) {
        match self {
            Self::ClientClosed { requests } => debug!(requests, "HTTP proxy client closed"),
            Self::Idle { requests } => debug!(requests, "HTTP proxy client idle: closed"),
            Self::HeaderTimeout => info!("HTTP proxy request head timed out"),
            Self::Finished { requests } => debug!(requests, "HTTP proxy connection closed"),
            Self::Refused { status } => debug!(status, "HTTP proxy request refused: closed"),
            Self::Tunnelled { target, up, down } => {
                info!(%target, up, down, "HTTP proxy tunnel closed");
            }
            Self::Broken { target, error } => {
                info!(%target, %error, "HTTP proxy connection broken");
            }
            Self::ClientError(error) => debug!(%error, "HTTP proxy client I/O error"),
            Self::Cancelled => info!("HTTP proxy connection cancelled by shutdown"),
        }
    }
}

/// Serves one client until its connection ends. Cancellation is the caller's (drop the future).
pub(crate) async fn serve_connection<S, D>(
    client: S,
    config: &HttpProxyConfig,
    dialer: &D,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    D: Dialer,
{
    let mut conn = Connection {
        client,
        inbuf: BytesMut::with_capacity(HEAD_READ),
        upstream: None,
        config,
        dialer,
        limits: Limits {
            max_head_bytes: config.max_head_bytes.max(1),
            max_headers: MAX_HEADERS,
        },
        requests: 0,
        linger: config.header_timeout.min(MAX_LINGER),
    };
    loop {
        let head = match conn.read_request().await {
            Ok(head) => head,
            Err(end) => return end,
        };
        conn.requests += 1;
        if let Some(outcome) = conn.handle_request(head).await {
            return outcome;
        }
    }
}

/// An upstream connection, kept between requests to the same target.
struct Upstream<U> {
    target: TargetAddr,
    stream: U,
    /// Bytes read from the upstream and not forwarded yet.
    buf: BytesMut,
}

/// The state of one client connection.
struct Connection<'a, S, D: Dialer> {
    client: S,
    /// Bytes read from the client and not consumed yet (a head, body bytes, pipelined requests).
    inbuf: BytesMut,
    upstream: Option<Upstream<D::Stream>>,
    config: &'a HttpProxyConfig,
    dialer: &'a D,
    limits: Limits,
    requests: u64,
    linger: Duration,
}

/// What one exchange needs to know about its request.
struct Plan<'a> {
    method: &'a str,
    body: BodyLength,
    upgrade: bool,
    client_keep_alive: bool,
    limits: Limits,
}

impl<S, D> Connection<'_, S, D>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    D: Dialer,
{
    /// Reads the next request head, under the idle timeout (before its first byte, for requests
    /// after the first) and the head deadline.
    async fn read_request(&mut self) -> Result<RequestHead, Outcome> {
        let requests = self.requests;
        if requests > 0 && self.inbuf.is_empty() {
            self.inbuf.reserve(HEAD_READ);
            match timeout(
                self.config.idle_timeout,
                self.client.read_buf(&mut self.inbuf),
            )
            .await
            {
                Err(_elapsed) => return Err(Outcome::Idle { requests }),
                Ok(Ok(0)) => return Err(Outcome::ClientClosed { requests }),
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(Outcome::ClientError(error)),
            }
        }
        let deadline = Instant::now() + self.config.header_timeout;
        let read = read_head(
            &mut self.client,
            &mut self.inbuf,
            HeadKind::Request,
            self.limits,
            parse_request_head,
        );
        match timeout_at(deadline, read).await {
            Ok(Ok(head)) => Ok(head),
            Ok(Err(HeadError::Closed { .. })) => Err(Outcome::ClientClosed { requests }),
            Ok(Err(HeadError::Io(error))) => Err(Outcome::ClientError(error)),
            Ok(Err(HeadError::Invalid(error))) => {
                info!(%error, status = error.status(), "HTTP proxy rejected a malformed request");
                Err(self
                    .answer_error(error.status(), &error.to_string(), false, false)
                    .await)
            }
            Err(_elapsed) => {
                if self.inbuf.is_empty() {
                    Err(Outcome::HeaderTimeout)
                } else {
                    info!(status = 408, "HTTP proxy request head timed out");
                    self.answer_error(408, "request head not received in time", false, false)
                        .await;
                    Err(Outcome::HeaderTimeout)
                }
            }
        }
    }

    /// Handles one request. `None`: read the next request; `Some`: the connection is over.
    async fn handle_request(&mut self, head: RequestHead) -> Option<Outcome> {
        trace!(?head, "HTTP proxy request head");
        if let Some(credentials) = &self.config.auth {
            let presented = head
                .headers
                .values("proxy-authorization")
                .next()
                .and_then(basic_credentials);
            let valid = presented.is_some_and(|(user, pass)| credentials.verify(&user, &pass));
            if !valid {
                // Log the username tried, never the password.
                info!(
                    method = %head.method,
                    status = 407,
                    "HTTP proxy request without valid credentials"
                );
                return Some(
                    self.answer_error(407, "proxy authentication required", head.is_head(), true)
                        .await,
                );
            }
        }
        if head.is_connect() {
            return Some(self.connect(&head).await);
        }
        let uri = match parse_absolute_uri(&head.target) {
            Ok(uri) => uri,
            Err(error) => return Some(self.reject(&head, None, &error).await),
        };
        let body = match request_body(&head) {
            Ok(body) => body,
            Err(error) => return Some(self.reject(&head, Some(&uri), &error).await),
        };
        if head.headers.values("host").count() > 1 {
            return Some(
                self.reject(&head, Some(&uri), &ParseError::MultipleHosts)
                    .await,
            );
        }
        self.forward(&head, &uri, body).await
    }

    /// Answers a request that cannot be proxied with `error`'s status.
    async fn reject(
        &mut self,
        head: &RequestHead,
        uri: Option<&AbsoluteUri>,
        error: &ParseError,
    ) -> Outcome {
        let status = error.status();
        match uri {
            Some(uri) => {
                info!(method = %head.method, target = %shown(uri), status, %error, "HTTP proxy request")
            }
            None => info!(method = %head.method, status, %error, "HTTP proxy request"),
        }
        self.answer_error(status, &error.to_string(), head.is_head(), false)
            .await
    }

    /// CONNECT: dial, answer 200, tunnel.
    async fn connect(&mut self, head: &RequestHead) -> Outcome {
        let target = match parse_connect_target(&head.target) {
            Ok(target) => target,
            Err(error) => return self.reject(head, None, &error).await,
        };
        // A tunnel ends the connection: a kept upstream is of no further use.
        self.upstream = None;
        let mut upstream = match dial(self.dialer, self.config.connect_timeout, &target).await {
            Ok(stream) => stream,
            Err((status, message)) => {
                info!(method = "CONNECT", %target, status, "HTTP proxy request");
                return self.answer_error(status, &message, false, false).await;
            }
        };
        if let Err(error) = write_flush(&mut self.client, CONNECT_ESTABLISHED).await {
            return Outcome::ClientError(error);
        }
        info!(method = "CONNECT", %target, status = 200, "HTTP proxy request");
        let early = std::mem::take(&mut self.inbuf);
        tunnel(&mut self.client, &mut upstream, &early, &[], target).await
    }

    /// Forwards one absolute-URI request and its response.
    async fn forward(
        &mut self,
        head: &RequestHead,
        uri: &AbsoluteUri,
        body: BodyLength,
    ) -> Option<Outcome> {
        let upgrade = head.wants_upgrade();
        let mut request = Vec::with_capacity(512);
        encode_forwarded_request(head, uri, upgrade, &mut request);
        let plan = Plan {
            method: &head.method,
            body,
            upgrade,
            client_keep_alive: head.keep_alive(),
            limits: self.limits,
        };
        let mut retried = false;
        loop {
            let (mut upstream, reused) = match self.upstream.take() {
                Some(mut kept) if kept.target == uri.target && kept.buf.is_empty() => {
                    if still_open(&mut kept.stream) {
                        (kept, true)
                    } else {
                        debug!(target = %uri.target, "kept upstream connection was closed; dialing anew");
                        match Self::dial_upstream(
                            self.dialer,
                            self.config.connect_timeout,
                            &uri.target,
                        )
                        .await
                        {
                            Ok(fresh) => (fresh, false),
                            Err((status, message)) => {
                                return Some(self.fail(head, uri, status, &message).await);
                            }
                        }
                    }
                }
                _ => {
                    match Self::dial_upstream(self.dialer, self.config.connect_timeout, &uri.target)
                        .await
                    {
                        Ok(fresh) => (fresh, false),
                        Err((status, message)) => {
                            return Some(self.fail(head, uri, status, &message).await);
                        }
                    }
                }
            };
            let result = exchange(
                &mut self.client,
                &mut self.inbuf,
                &mut upstream.stream,
                &mut upstream.buf,
                &request,
                &plan,
                self.config.response_timeout,
            )
            .await;
            let received = match result {
                Ok(received) => received,
                Err(ExchangeError::Upstream { message, retryable }) => {
                    // A kept connection the upstream closed just as we reused it: try once more on
                    // a fresh one, if nothing of the request was taken from the client.
                    if retryable && reused && !retried && body == BodyLength::Empty {
                        debug!(target = %uri.target, %message, "kept upstream connection failed; retrying");
                        retried = true;
                        continue;
                    }
                    return Some(self.fail(head, uri, 502, &message).await);
                }
                Err(ExchangeError::Timeout) => {
                    let message = format!(
                        "{} did not answer within {:?}",
                        uri.target, self.config.response_timeout
                    );
                    return Some(self.fail(head, uri, 504, &message).await);
                }
                Err(ExchangeError::BadRequestBody(error)) => {
                    return Some(self.reject(head, Some(uri), &error).await);
                }
                Err(ExchangeError::Broken(error)) => {
                    info!(method = %head.method, target = %shown(uri), %error, "HTTP proxy response failed");
                    return Some(Outcome::Broken {
                        target: uri.target.clone(),
                        error,
                    });
                }
                Err(ExchangeError::Client(error)) => return Some(Outcome::ClientError(error)),
            };
            info!(method = %head.method, target = %shown(uri), status = received.status, "HTTP proxy request");
            if received.upgraded {
                let early = std::mem::take(&mut self.inbuf);
                let late = std::mem::take(&mut upstream.buf);
                let target = upstream.target.clone();
                return Some(
                    tunnel(
                        &mut self.client,
                        &mut upstream.stream,
                        &early,
                        &late,
                        target,
                    )
                    .await,
                );
            }
            if received.upstream_keep_alive {
                self.upstream = Some(upstream);
            }
            if received.client_close {
                // FIN, then drain briefly: unread client bytes (a body we stopped forwarding)
                // must not turn the close into a reset that destroys the response.
                close_with_reply(&mut self.client, &[], self.linger, MAX_LINGER_BYTES).await;
                return Some(Outcome::Finished {
                    requests: self.requests,
                });
            }
            return None;
        }
    }

    async fn dial_upstream(
        dialer: &D,
        connect_timeout: Duration,
        target: &TargetAddr,
    ) -> Result<Upstream<D::Stream>, (u16, String)> {
        let stream = dial(dialer, connect_timeout, target).await?;
        Ok(Upstream {
            target: target.clone(),
            stream,
            buf: BytesMut::new(),
        })
    }

    /// Logs a failed request and answers it with `status`.
    async fn fail(
        &mut self,
        head: &RequestHead,
        uri: &AbsoluteUri,
        status: u16,
        message: &str,
    ) -> Outcome {
        info!(method = %head.method, target = %shown(uri), status, %message, "HTTP proxy request");
        self.answer_error(status, message, head.is_head(), false)
            .await
    }

    /// Sends an error answer with a short text body and `Connection: close`, then closes.
    async fn answer_error(
        &mut self,
        status: u16,
        message: &str,
        head_request: bool,
        authenticate: bool,
    ) -> Outcome {
        let body = format!("{status} {}: {message}\n", reason_phrase(status));
        let mut answer = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
            reason_phrase(status),
            body.len()
        );
        if authenticate {
            answer.push_str("Proxy-Authenticate: Basic realm=\"tailnode\"\r\n");
        }
        answer.push_str("\r\n");
        if !head_request {
            answer.push_str(&body);
        }
        close_with_reply(
            &mut self.client,
            answer.as_bytes(),
            self.linger,
            MAX_LINGER_BYTES,
        )
        .await;
        Outcome::Refused { status }
    }
}

/// Dials `target` under `connect_timeout`; errors come as (status, message).
async fn dial<D: Dialer>(
    dialer: &D,
    connect_timeout: Duration,
    target: &TargetAddr,
) -> Result<D::Stream, (u16, String)> {
    let dialed = match timeout(connect_timeout, dialer.connect(target)).await {
        Ok(dialed) => dialed,
        Err(_elapsed) => Err(DialError::TimedOut),
    };
    match dialed {
        Ok((stream, bound)) => {
            debug!(%target, %bound, "HTTP proxy dialed");
            Ok(stream)
        }
        Err(error) => {
            let status = match error {
                DialError::TimedOut => 504,
                _ => 502,
            };
            Err((status, format!("cannot connect to {target}: {error}")))
        }
    }
}

/// `http://authority/path` without the query, for logs (queries may carry secrets).
fn shown(uri: &AbsoluteUri) -> String {
    let path = uri.path.split('?').next().unwrap_or_default();
    format!("http://{}{path}", uri.authority)
}

/// How a head read ended without a head.
enum HeadError {
    /// EOF; `partial`: some bytes of a head had arrived.
    Closed { partial: bool },
    /// The bytes can never become an acceptable head.
    Invalid(ParseError),
    /// Reading failed.
    Io(io::Error),
}

/// Reads into `buf` until it holds a complete head of `kind`, parses it and removes it from
/// `buf` (bytes after it stay). For requests, empty lines before the head are dropped.
async fn read_head<R, T>(
    reader: &mut R,
    buf: &mut BytesMut,
    kind: HeadKind,
    limits: Limits,
    parse: fn(&[u8], &Limits) -> Result<Parsed<T>, ParseError>,
) -> Result<T, HeadError>
where
    R: AsyncRead + Unpin,
{
    let mut scanner = HeadScanner::new(kind, limits.max_head_bytes);
    loop {
        if kind == HeadKind::Request && !scanner.started() {
            let skip = leading_empty_lines(buf);
            buf.advance(skip);
        }
        let ready = !buf.is_empty() && buf[..] != *b"\r";
        if ready && let Some(end) = scanner.handle_input(buf).map_err(HeadError::Invalid)? {
            return match parse(&buf[..end], &limits).map_err(HeadError::Invalid)? {
                Parsed::Complete(head, consumed) => {
                    buf.advance(consumed);
                    Ok(head)
                }
                // The scanner found the end: the parser must agree.
                Parsed::Incomplete => Err(HeadError::Invalid(ParseError::BadStartLine)),
            };
        }
        buf.reserve(HEAD_READ);
        match reader.read_buf(buf).await {
            Ok(0) => {
                return Err(HeadError::Closed {
                    partial: !buf.is_empty(),
                });
            }
            Ok(n) => trace!(n, "read head bytes"),
            Err(error) => return Err(HeadError::Io(error)),
        }
    }
}

/// What a completed exchange left behind.
struct Received {
    /// The final status forwarded.
    status: u16,
    /// The client connection must close now.
    client_close: bool,
    /// The upstream connection may serve another request.
    upstream_keep_alive: bool,
    /// A 101 was forwarded: the connection is now a tunnel.
    upgraded: bool,
}

/// Why an exchange failed.
enum ExchangeError {
    /// The upstream failed before a final response head was forwarded: answer 502.
    /// `retryable`: it sent nothing at all (a kept connection it had just closed).
    Upstream { message: String, retryable: bool },
    /// No final response head within the response timeout after the request: answer 504.
    Timeout,
    /// The client's request body is malformed and nothing final was forwarded yet: answer 400.
    BadRequestBody(ParseError),
    /// The exchange failed after a final response head was forwarded: close.
    Broken(String),
    /// The client's side failed.
    Client(io::Error),
}

/// Progress of the response side, shared with the request side of an exchange.
#[derive(Default)]
struct Progress {
    /// The final response head has arrived (the response timeout no longer applies).
    final_head: AtomicBool,
    /// The final response head was sent to the client (errors can no longer be answered).
    final_sent: AtomicBool,
    /// The whole request body went upstream (else the client connection cannot be reused).
    request_sent: AtomicBool,
}

/// Sends `request` and its body upstream while the response comes back to the client.
async fn exchange<C, U>(
    client: &mut C,
    inbuf: &mut BytesMut,
    upstream: &mut U,
    upbuf: &mut BytesMut,
    request: &[u8],
    plan: &Plan<'_>,
    response_timeout: Duration,
) -> Result<Received, ExchangeError>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut up_r, mut up_w) = tokio::io::split(upstream);
    let progress = Progress::default();
    let send = send_request(
        &mut client_r,
        inbuf,
        &mut up_w,
        request,
        plan.body,
        &progress,
    );
    let recv = receive_response(&mut up_r, upbuf, &mut client_w, plan, &progress);
    tokio::pin!(send, recv);
    let mut sending = true;
    let mut deadline: Option<Instant> = None;
    loop {
        let timer = async {
            match deadline {
                Some(deadline) => sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            sent = &mut send, if sending => {
                sending = false;
                deadline = Some(Instant::now() + response_timeout);
                match sent {
                    Ok(()) => {}
                    // The upstream may have answered early and closed (e.g. 413): the response
                    // side reports what it got.
                    Err(SendError::Upstream(error)) => debug!(%error, "writing the request upstream failed"),
                    Err(SendError::Client(error)) => return Err(ExchangeError::Client(error)),
                    Err(SendError::Body(error)) => {
                        return Err(if progress.final_sent.load(Ordering::Relaxed) {
                            ExchangeError::Broken(format!("request body: {error}"))
                        } else {
                            ExchangeError::BadRequestBody(error)
                        });
                    }
                }
            }
            received = &mut recv => {
                let mut received = match received {
                    Ok(received) => received,
                    Err(error) => return Err(error.into_exchange_error(&progress)),
                };
                if !progress.request_sent.load(Ordering::Relaxed) {
                    // The rest of the request body is still on its way: the client connection
                    // cannot be resynchronised, nor can the upstream one.
                    received.client_close = true;
                    received.upstream_keep_alive = false;
                }
                return Ok(received);
            }
            () = timer => {
                if !progress.final_head.load(Ordering::Relaxed) {
                    return Err(ExchangeError::Timeout);
                }
                deadline = None;
            }
        }
    }
}

/// Why sending a request failed.
enum SendError {
    /// Reading the client failed, or it closed mid-body.
    Client(io::Error),
    /// The request body breaks its framing.
    Body(ParseError),
    /// Writing to the upstream failed.
    Upstream(io::Error),
}

/// Writes `head` then the request body (as much of it as `inbuf` holds first, then from the
/// client) to the upstream, leaving bytes after the body in `inbuf`.
async fn send_request<R, W>(
    client: &mut R,
    inbuf: &mut BytesMut,
    upstream: &mut W,
    head: &[u8],
    body: BodyLength,
    progress: &Progress,
) -> Result<(), SendError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut tracker = BodyTracker::new(body);
    // The head and the body bytes already received go out in one write.
    let mut pending = head.to_vec();
    loop {
        if !inbuf.is_empty() && !tracker.is_done() {
            let n = tracker.handle_input(inbuf).map_err(SendError::Body)?;
            pending.extend_from_slice(&inbuf[..n]);
            inbuf.advance(n);
        }
        if !pending.is_empty() {
            upstream
                .write_all(&pending)
                .await
                .map_err(SendError::Upstream)?;
            trace!(n = pending.len(), "request bytes sent upstream");
            pending.clear();
        }
        if tracker.is_done() {
            upstream.flush().await.map_err(SendError::Upstream)?;
            progress.request_sent.store(true, Ordering::Relaxed);
            return Ok(());
        }
        inbuf.reserve(RELAY_BUFFER);
        let n = client.read_buf(inbuf).await.map_err(SendError::Client)?;
        if n == 0 {
            tracker.handle_eof().map_err(|_| {
                SendError::Client(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed the connection inside a request body",
                ))
            })?;
        }
    }
}

/// Why receiving a response failed.
enum RecvError {
    /// The upstream closed, failed or misbehaved; `silent`: before sending a single byte.
    Upstream { message: String, silent: bool },
    /// Writing to the client failed.
    Client(io::Error),
}

impl RecvError {
    fn into_exchange_error(self, progress: &Progress) -> ExchangeError {
        match self {
            Self::Client(error) => ExchangeError::Client(error),
            Self::Upstream { message, .. } if progress.final_sent.load(Ordering::Relaxed) => {
                ExchangeError::Broken(message)
            }
            Self::Upstream { message, silent } => ExchangeError::Upstream {
                message,
                retryable: silent,
            },
        }
    }
}

/// Reads response heads from the upstream, forwards interim (1xx) ones, then the final head and
/// its body.
async fn receive_response<R, W>(
    upstream: &mut R,
    upbuf: &mut BytesMut,
    client: &mut W,
    plan: &Plan<'_>,
    progress: &Progress,
) -> Result<Received, RecvError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut silent = true;
    loop {
        let head = match read_head(
            upstream,
            upbuf,
            HeadKind::Response,
            plan.limits,
            parse_response_head,
        )
        .await
        {
            Ok(head) => head,
            Err(HeadError::Closed { partial }) => {
                return Err(RecvError::Upstream {
                    message: "upstream closed the connection without a complete response".into(),
                    silent: silent && !partial,
                });
            }
            Err(HeadError::Io(error)) => {
                return Err(RecvError::Upstream {
                    message: format!("reading the response failed: {error}"),
                    silent: silent && upbuf.is_empty(),
                });
            }
            Err(HeadError::Invalid(error)) => {
                return Err(RecvError::Upstream {
                    message: format!("invalid response from upstream: {error}"),
                    silent: false,
                });
            }
        };
        silent = false;
        trace!(?head, "HTTP proxy response head");
        if head.status == 101 {
            if !plan.upgrade {
                return Err(RecvError::Upstream {
                    message: "upstream switched protocols without being asked".into(),
                    silent: false,
                });
            }
            progress.final_head.store(true, Ordering::Relaxed);
            let mut out = Vec::with_capacity(256);
            encode_forwarded_response(&head, false, true, &mut out);
            write_flush(client, &out).await.map_err(RecvError::Client)?;
            progress.final_sent.store(true, Ordering::Relaxed);
            return Ok(Received {
                status: 101,
                client_close: false,
                upstream_keep_alive: false,
                upgraded: true,
            });
        }
        if head.is_interim() {
            let mut out = Vec::with_capacity(128);
            encode_forwarded_response(&head, false, false, &mut out);
            write_flush(client, &out).await.map_err(RecvError::Client)?;
            continue;
        }
        progress.final_head.store(true, Ordering::Relaxed);
        return forward_final_response(upstream, upbuf, client, plan, progress, &head).await;
    }
}

/// Forwards a final response head and its body.
async fn forward_final_response<R, W>(
    upstream: &mut R,
    upbuf: &mut BytesMut,
    client: &mut W,
    plan: &Plan<'_>,
    progress: &Progress,
    head: &ResponseHead,
) -> Result<Received, RecvError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let length = response_body(plan.method, head).map_err(|error| RecvError::Upstream {
        message: format!("invalid response from upstream: {error}"),
        silent: false,
    })?;
    let until_close = length == BodyLength::UntilClose;
    // A request body still on its way when the response starts means the client connection
    // cannot be resynchronised: announce the close now.
    let client_close = !plan.client_keep_alive
        || !head.keep_alive()
        || until_close
        || !progress.request_sent.load(Ordering::Relaxed);
    let upstream_keep_alive = head.keep_alive() && !until_close;
    let mut out = Vec::with_capacity(512);
    encode_forwarded_response(head, client_close, false, &mut out);
    let mut tracker = BodyTracker::new(length);
    loop {
        if !upbuf.is_empty() && !tracker.is_done() {
            let n = tracker
                .handle_input(upbuf)
                .map_err(|error| RecvError::Upstream {
                    message: format!("response body: {error}"),
                    silent: false,
                })?;
            out.extend_from_slice(&upbuf[..n]);
            upbuf.advance(n);
        }
        if !out.is_empty() {
            client.write_all(&out).await.map_err(RecvError::Client)?;
            progress.final_sent.store(true, Ordering::Relaxed);
            trace!(n = out.len(), "response bytes sent to the client");
            out.clear();
        }
        if tracker.is_done() {
            break;
        }
        upbuf.reserve(RELAY_BUFFER);
        let n = upstream
            .read_buf(upbuf)
            .await
            .map_err(|error| RecvError::Upstream {
                message: format!("reading the response body failed: {error}"),
                silent: false,
            })?;
        if n == 0 {
            tracker.handle_eof().map_err(|error| RecvError::Upstream {
                message: format!("response body: {error}"),
                silent: false,
            })?;
        }
    }
    client.flush().await.map_err(RecvError::Client)?;
    Ok(Received {
        status: head.status,
        client_close,
        // Bytes after the response are garbage: do not reuse a connection that sent them.
        upstream_keep_alive: upstream_keep_alive && upbuf.is_empty(),
        upgraded: false,
    })
}

/// Relays bytes both ways after a CONNECT or an upgrade; `early` (from the client) and `late`
/// (from the target) were received before the tunnel started and are delivered first.
async fn tunnel<C, U>(
    client: &mut C,
    upstream: &mut U,
    early: &[u8],
    late: &[u8],
    target: TargetAddr,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    if !early.is_empty()
        && let Err(error) = write_flush(upstream, early).await
    {
        return Outcome::Broken {
            target,
            error: error.to_string(),
        };
    }
    if !late.is_empty()
        && let Err(error) = write_flush(client, late).await
    {
        return Outcome::ClientError(error);
    }
    match relay(client, upstream).await {
        Ok((up, down)) => Outcome::Tunnelled {
            target,
            up: up + early.len() as u64,
            down: down + late.len() as u64,
        },
        Err(error) => Outcome::Broken {
            target,
            error: error.to_string(),
        },
    }
}

/// Whether a kept connection still looks usable: no EOF, error or unsolicited byte is waiting.
/// Polls once without blocking.
fn still_open<U: AsyncRead + Unpin>(stream: &mut U) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(Pin::new(stream).poll_read(&mut cx, &mut buf), Poll::Pending)
}

async fn write_flush<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}
