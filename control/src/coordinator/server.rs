//! The coordinator's tokio driver: listener, HTTP front, websocket sessions,
//! and the hub that connects them to the sans-IO [`Registry`].
//!
//! Tasks: one accept loop; one task per connection (TLS handshake, HTTP
//! head, websocket upgrade, `hello`, then the session loop); one expiry
//! timer for lost nodes; one state writer. Session tasks call into the
//! [`Hub`] — a `std` mutex around the registry and the per-session queues,
//! never held across an `.await` — and the hub hands each output frame to
//! its session's bounded queue with `try_send`. Each session task writes its
//! own socket, so a slow node only ever fills its own queue; a full queue
//! drops that session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::{MissedTickBehavior, timeout, timeout_at};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, trace, warn};

use super::http::{MAX_HEAD, Prefixed, Route, head_end, response, route};
use super::listener::ConnectionListener;
use super::registry::{AuthKey, Frame, Hello, Output, Registry, Rejection, SessionId};
use super::state::StateFile;
use super::{AuthKeySource, CoordinatorConfig, CoordinatorError, tls};
use crate::proto::{ClientMessage, DecodeError, ErrorCode, MAX_CLIENT_MESSAGE, NodeKey};

/// Most queued frames written before one flush.
const MAX_WRITE_BATCH: usize = 64;

/// Time allowed for closing frames and for draining a refused connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Most bytes read and discarded while lingering before a close.
const MAX_LINGER_BYTES: usize = 1 << 20;

/// Pause after a failed `accept` (e.g. out of file descriptors), so the
/// loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves the coordinator on `listener` until `cancel` is cancelled.
///
/// # Errors
/// Start-up errors only (config, auth key file, state file, TLS files);
/// once serving, nothing but `cancel` ends it.
pub async fn serve(
    config: CoordinatorConfig,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<(), CoordinatorError> {
    CoordinatorServer::from_listener(config, listener)
        .await?
        .run(cancel)
        .await
}

/// A coordinator that has done its start-up checks and holds its listener (TCP unless
/// built with another [`ConnectionListener`]).
pub struct CoordinatorServer<L = TcpListener> {
    config: Arc<CoordinatorConfig>,
    listener: L,
    local_addr: SocketAddr,
    registry: Registry,
    tls: Option<TlsAcceptor>,
}

impl<L> std::fmt::Debug for CoordinatorServer<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorServer")
            .field("local_addr", &self.local_addr)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl CoordinatorServer {
    /// Binds `config.listen` and does the start-up checks.
    ///
    /// # Errors
    /// [`CoordinatorError::Bind`], or any error of
    /// [`from_listener`](Self::from_listener).
    pub async fn bind(config: CoordinatorConfig) -> Result<Self, CoordinatorError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| CoordinatorError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Self::from_listener(config, listener).await
    }
}

impl<L: ConnectionListener> CoordinatorServer<L> {
    /// Checks the config, reads the auth key file (if any), loads the state
    /// file (creating it if absent, which also proves it is writable) and
    /// the TLS files.
    ///
    /// # Errors
    /// The first problem found, naming the file involved.
    pub async fn from_listener(
        config: CoordinatorConfig,
        listener: L,
    ) -> Result<Self, CoordinatorError> {
        let local_addr = listener.local_addr().map_err(CoordinatorError::Listener)?;
        if config.session_queue < 2 {
            return Err(CoordinatorError::Config(
                "session_queue must be at least 2 (welcome and snapshot)".into(),
            ));
        }
        if config.max_connections == 0 {
            return Err(CoordinatorError::Config(
                "max_connections must be at least 1".into(),
            ));
        }
        if config.ping_interval.is_zero() || config.handshake_timeout.is_zero() {
            return Err(CoordinatorError::Config(
                "ping_interval and handshake_timeout must be positive".into(),
            ));
        }
        match &config.auth_key {
            AuthKeySource::Fixed(key) if key.trim().is_empty() => {
                return Err(CoordinatorError::Config("the auth key is empty".into()));
            }
            AuthKeySource::Fixed(_) => {}
            AuthKeySource::File(path) => {
                read_auth_file(path)
                    .await
                    .map_err(|reason| CoordinatorError::AuthKeyFile {
                        path: path.clone(),
                        reason,
                    })?;
            }
        }
        let path = config.state_path.clone();
        let state = tokio::task::spawn_blocking(move || load_or_create_state(&path))
            .await
            .map_err(|e| CoordinatorError::Config(format!("state loading task failed: {e}")))??;
        let registry = Registry::new(config.registry_config(), state)?;
        let tls = match &config.tls {
            Some(files) => Some(TlsAcceptor::from(tls::server_config(
                &files.cert,
                &files.key,
            )?)),
            None => None,
        };
        Ok(CoordinatorServer {
            config: Arc::new(config),
            listener,
            local_addr,
            registry,
            tls,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `cancel`; then closes every session, waits for the
    /// tasks and writes the last state.
    ///
    /// # Errors
    /// None today; the signature leaves room for fatal runtime errors.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), CoordinatorError> {
        let CoordinatorServer {
            config,
            mut listener,
            local_addr,
            registry,
            tls,
        } = self;
        let (persist_tx, persist_rx) = watch::channel(0u64);
        let fixed_auth = match &config.auth_key {
            AuthKeySource::Fixed(key) => Some(AuthKey::new(key.trim())),
            AuthKeySource::File(_) => None,
        };
        let hub = Arc::new(Hub {
            ws_config: WebSocketConfig::default()
                .max_message_size(Some(MAX_CLIENT_MESSAGE))
                .max_frame_size(Some(MAX_CLIENT_MESSAGE))
                .read_buffer_size(4096)
                // tungstenite's write buffer keeps the capacity of the
                // largest write it ever held: with whole snapshots written
                // as one frame, every session would keep a snapshot-sized
                // buffer (O(n) each, O(n²) in all). Large messages are
                // written as fragments instead (see `feed_frame`), so it
                // stays near this size.
                .write_buffer_size(WRITE_BUFFER),
            fixed_auth,
            config: config.clone(),
            inner: Mutex::new(HubInner {
                registry,
                sessions: HashMap::new(),
            }),
            persist: persist_tx,
            expiry: Notify::new(),
            shutdown: cancel.clone(),
            next_session: AtomicU64::new(1),
        });
        let writer = tokio::spawn(write_state(
            config.state_path.clone(),
            persist_rx,
            Arc::downgrade(&hub),
        ));
        let tracker = TaskTracker::new();
        tracker.spawn(expiry_loop(hub.clone()));
        let limit = Arc::new(Semaphore::new(config.max_connections));
        info!(
            addr = %local_addr,
            tls = tls.is_some(),
            state = %config.state_path.display(),
            "coordinator listening"
        );

        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    }
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                warn!(%remote, max = config.max_connections, "connection limit reached; closing");
                continue;
            };
            trace!(%remote, "connection accepted");
            let hub = hub.clone();
            let tls = tls.clone();
            tracker.spawn(async move {
                handle_connection(hub, stream, remote, tls).await;
                drop(permit);
            });
        }

        info!("coordinator shutting down");
        drop(listener);
        tracker.close();
        tracker.wait().await;
        // Every session has ended: the identities are final. Dropping the
        // hub ends the writer (after a write in progress); then the final
        // state is written here, so no older state can land after it.
        let changed = *hub.persist.borrow() > 0;
        let last = hub.lock().registry.state_file();
        drop(hub);
        if let Err(e) = writer.await {
            error!(error = %e, "state writer task failed");
        }
        if changed {
            let path = config.state_path.clone();
            match tokio::task::spawn_blocking(move || last.store(&path)).await {
                Ok(Ok(())) => debug!("final state written"),
                Ok(Err(e)) => error!(
                    path = %config.state_path.display(),
                    error = %e,
                    "cannot write the final state"
                ),
                Err(e) => error!(error = %e, "final state write task failed"),
            }
        }
        info!("coordinator stopped");
        Ok(())
    }
}

/// The websocket text message carrying `frame`.
fn frame_message(frame: Frame) -> Message {
    // Frames are serialized JSON, so the check always passes; it costs one pass over bytes
    // that are about to be copied into the socket buffer anyway.
    match Utf8Bytes::try_from(frame.into_bytes()) {
        Ok(text) => Message::Text(text),
        Err(_) => Message::Text(Utf8Bytes::from_static("")),
    }
}

/// The registry's clock: tokio's, so a paused runtime drives expiry in tests.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Reads the state file, or creates an empty one.
fn load_or_create_state(path: &Path) -> Result<StateFile, CoordinatorError> {
    if let Some(state) = StateFile::load(path)? {
        info!(path = %path.display(), nodes = state.nodes.len(), "state loaded");
        return Ok(state);
    }
    let state = StateFile::empty();
    state
        .store(path)
        .map_err(|source| CoordinatorError::StateWrite {
            path: path.to_owned(),
            source,
        })?;
    info!(path = %path.display(), "new state file created");
    Ok(state)
}

async fn read_auth_file(path: &Path) -> Result<AuthKey, String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| e.to_string())?;
    let key = text.trim();
    if key.is_empty() {
        return Err("the file is empty".into());
    }
    Ok(AuthKey::new(key))
}

/// Writes the state whenever the identity table changed. The state is
/// captured (under the hub lock) only when a write starts, so changes that
/// arrive during a write are coalesced into the next one and a burst of
/// joins costs a few writes, not one per join. Ends when the hub is gone;
/// [`CoordinatorServer::run`] writes the final state itself.
async fn write_state(path: PathBuf, mut rx: watch::Receiver<u64>, hub: Weak<Hub>) {
    while rx.changed().await.is_ok() {
        rx.borrow_and_update();
        let Some(hub) = hub.upgrade() else {
            break;
        };
        let state = hub.lock().registry.state_file();
        drop(hub);
        let target = path.clone();
        match tokio::task::spawn_blocking(move || state.store(&target)).await {
            Ok(Ok(())) => debug!(path = %path.display(), "state written"),
            Ok(Err(e)) => error!(
                path = %path.display(),
                error = %e,
                "cannot write state file; will retry on the next change"
            ),
            Err(e) => error!(error = %e, "state write task failed"),
        }
    }
}

/// Expires lost nodes when their time comes.
async fn expiry_loop(hub: Arc<Hub>) {
    loop {
        let deadline = hub.lock().registry.poll_timeout();
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = hub.shutdown.cancelled() => return,
            _ = hub.expiry.notified() => continue,
            _ = sleep => {}
        }
        hub.with_registry(|r| r.handle_timeout(now()));
    }
}

/// Shared state of all session tasks.
struct Hub {
    config: Arc<CoordinatorConfig>,
    ws_config: WebSocketConfig,
    fixed_auth: Option<AuthKey>,
    inner: Mutex<HubInner>,
    /// Generation of the identity table; bumped on every change.
    persist: watch::Sender<u64>,
    /// Wakes the expiry loop when a node may have become lost.
    expiry: Notify,
    /// The server's cancellation token.
    shutdown: CancellationToken,
    next_session: AtomicU64,
}

struct HubInner {
    registry: Registry,
    sessions: HashMap<SessionId, SessionHandle>,
}

/// The hub's end of a session.
struct SessionHandle {
    tx: mpsc::Sender<Outbound>,
    cancel: CancellationToken,
    key: NodeKey,
}

/// What the hub queues for a session.
enum Outbound {
    /// Write this frame.
    Frame(Frame),
    /// Write this frame, then close (the session was replaced).
    Close(Frame),
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HubInner> {
        // A panic elsewhere cannot leave the registry half-updated in a way
        // that matters more than stopping the whole coordinator would.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the registry and delivers what it produced.
    fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        let mut inner = self.lock();
        let result = f(&mut inner.registry);
        self.dispatch(&mut inner);
        result
    }

    /// Drains the registry's outputs into session queues.
    fn dispatch(&self, inner: &mut HubInner) {
        let HubInner { registry, sessions } = inner;
        let mut persist = false;
        while let Some(output) = registry.poll_output() {
            match output {
                Output::Send { session, frame } => {
                    deliver(sessions, session, Outbound::Frame(frame));
                }
                Output::Close { session, frame } => {
                    deliver(sessions, session, Outbound::Close(frame));
                }
                Output::PersistState => persist = true,
            }
        }
        if persist {
            self.persist.send_modify(|generation| *generation += 1);
        }
    }

    async fn auth_key(&self) -> Result<AuthKey, String> {
        match (&self.fixed_auth, &self.config.auth_key) {
            (Some(key), _) => Ok(key.clone()),
            (None, AuthKeySource::File(path)) => read_auth_file(path).await,
            (None, AuthKeySource::Fixed(key)) => Ok(AuthKey::new(key.trim())),
        }
    }
}

/// Queues `item` for `session`; a full queue drops the session.
fn deliver(sessions: &mut HashMap<SessionId, SessionHandle>, session: SessionId, item: Outbound) {
    let Some(handle) = sessions.get(&session) else {
        return;
    };
    match handle.tx.try_send(item) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            warn!(
                %session,
                key = %handle.key.short(),
                "outbound queue full; dropping the session (the node will reconnect and resync)"
            );
            handle.cancel.cancel();
            sessions.remove(&session);
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            sessions.remove(&session);
        }
    }
}

/// One accepted connection, start to end.
async fn handle_connection<S>(
    hub: Arc<Hub>,
    stream: S,
    remote: SocketAddr,
    tls: Option<TlsAcceptor>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + hub.config.handshake_timeout;
    match tls {
        None => serve_http(hub, stream, remote, deadline).await,
        Some(acceptor) => {
            let stream = tokio::select! {
                _ = hub.shutdown.cancelled() => return,
                accepted = timeout_at(deadline, acceptor.accept(stream)) => match accepted {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        debug!(%remote, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                },
            };
            serve_http(hub, stream, remote, deadline).await;
        }
    }
}

/// Reads the request head and routes it.
async fn serve_http<S>(
    hub: Arc<Hub>,
    mut stream: S,
    remote: SocketAddr,
    deadline: tokio::time::Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = vec![0u8; MAX_HEAD];
    let mut filled = 0;
    let head_len = loop {
        if let Some(end) = head_end(&buf[..filled]) {
            break end;
        }
        if filled == MAX_HEAD {
            debug!(%remote, "request head too large");
            refuse_http(
                &mut stream,
                431,
                "Request Header Fields Too Large",
                &hub.shutdown,
            )
            .await;
            return;
        }
        let read = tokio::select! {
            _ = hub.shutdown.cancelled() => return,
            read = timeout_at(deadline, stream.read(&mut buf[filled..])) => read,
        };
        match read {
            Ok(Ok(0)) => {
                trace!(%remote, "connection closed before a request head");
                return;
            }
            Ok(Ok(n)) => filled += n,
            Ok(Err(e)) => {
                debug!(%remote, error = %e, "read error before a request head");
                return;
            }
            Err(_) => {
                debug!(%remote, "no request head in time");
                return;
            }
        }
    };
    match route(&buf[..head_len]) {
        Route::Health => {
            trace!(%remote, "health check");
            let _ = timeout(CLOSE_TIMEOUT, async {
                stream.write_all(&response(200, "OK", "ok")).await?;
                stream.shutdown().await
            })
            .await;
        }
        Route::Refuse(status, reason) => {
            debug!(%remote, status, "request refused");
            refuse_http(&mut stream, status, reason, &hub.shutdown).await;
        }
        Route::Node => {
            buf.truncate(filled);
            let upgrade = tokio::select! {
                _ = hub.shutdown.cancelled() => return,
                upgrade = timeout_at(
                    deadline,
                    tokio_tungstenite::accept_async_with_config(
                        Prefixed::new(buf, stream),
                        Some(hub.ws_config),
                    ),
                ) => upgrade,
            };
            match upgrade {
                Ok(Ok(ws)) => run_session(hub, ws, remote, deadline).await,
                Ok(Err(e)) => debug!(%remote, error = %e, "websocket upgrade failed"),
                Err(_) => debug!(%remote, "websocket upgrade timed out"),
            }
        }
    }
}

async fn refuse_http<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    reason: &str,
    shutdown: &CancellationToken,
) {
    let body = format!("{}\n", reason.to_ascii_lowercase());
    let _ = timeout(
        CLOSE_TIMEOUT,
        stream.write_all(&response(status, reason, &body)),
    )
    .await;
    linger(stream, shutdown).await;
}

/// Half-closes and reads what the peer still sends (bounded), so the
/// kernel does not answer unread data with a reset that could destroy the
/// response or error frame just written.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, shutdown: &CancellationToken) {
    let drain = timeout(CLOSE_TIMEOUT, async {
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < MAX_LINGER_BYTES {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            total += n;
        }
        Ok::<(), std::io::Error>(())
    });
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = drain => {}
    }
}

/// A websocket message, classified.
enum Inbound {
    /// A decoded client message.
    Message(ClientMessage),
    /// A ping, pong or raw frame: proof of life, nothing to do.
    Control,
    /// The connection ended (close frame, EOF, I/O error).
    Ended(String),
    /// A message to refuse with an `error`.
    Refused(Rejection),
}

fn classify(item: Option<Result<Message, WsError>>) -> Inbound {
    match item {
        None => Inbound::Ended("connection closed".into()),
        Some(Ok(Message::Text(text))) => match ClientMessage::from_json(text.as_str()) {
            Ok(message) => Inbound::Message(message),
            Err(DecodeError::TooLarge { len, limit }) => Inbound::Refused(Rejection::new(
                ErrorCode::MessageTooLarge,
                format!("message of {len} bytes exceeds the limit of {limit} bytes"),
            )),
            Err(DecodeError::Malformed(e)) => Inbound::Refused(Rejection::new(
                ErrorCode::MalformedMessage,
                format!("not a valid client message: {e}"),
            )),
        },
        Some(Ok(Message::Binary(_))) => Inbound::Refused(Rejection::new(
            ErrorCode::MalformedMessage,
            "binary frames are not accepted: send JSON in text frames",
        )),
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Inbound::Control,
        Some(Ok(Message::Close(_))) => Inbound::Ended("the node closed the websocket".into()),
        Some(Err(WsError::Capacity(e))) => Inbound::Refused(Rejection::new(
            ErrorCode::MessageTooLarge,
            format!("{e} (the limit is {MAX_CLIENT_MESSAGE} bytes)"),
        )),
        Some(Err(e)) => Inbound::Ended(format!("websocket error: {e}")),
    }
}

fn message_type(message: &ClientMessage) -> &'static str {
    match message {
        ClientMessage::Hello { .. } => "hello",
        ClientMessage::Update { .. } => "update",
        ClientMessage::Goodbye => "goodbye",
    }
}

/// How a session ended.
enum End {
    /// The coordinator is shutting down.
    Shutdown,
    /// The hub dropped the session (queue overflow).
    Dropped,
    /// The node said goodbye.
    Goodbye,
    /// A newer session replaced this one; send this frame and close.
    Replaced(Frame),
    /// The node sent something refused; send the error and close.
    Refused(Rejection),
    /// The connection broke or the node closed it.
    Ended(String),
    /// Nothing arrived for two ping intervals.
    PingTimeout,
    /// A write failed or stalled.
    WriteFailed(String),
}

type Ws<S> = WebSocketStream<Prefixed<S>>;

/// A websocket session: `hello`, admission, the session loop, cleanup.
async fn run_session<S>(
    hub: Arc<Hub>,
    mut ws: Ws<S>,
    remote: SocketAddr,
    deadline: tokio::time::Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let hello = loop {
        let item = tokio::select! {
            _ = hub.shutdown.cancelled() => return,
            item = timeout_at(deadline, ws.next()) => item,
        };
        let Ok(item) = item else {
            debug!(%remote, "no hello in time");
            let rejection = Rejection::new(
                ErrorCode::ProtocolViolation,
                format!(
                    "no hello within {:?} of connecting",
                    hub.config.handshake_timeout
                ),
            );
            close_with_error(&mut ws, &rejection, &hub.shutdown).await;
            return;
        };
        match classify(item) {
            Inbound::Control => continue,
            Inbound::Ended(reason) => {
                debug!(%remote, %reason, "connection ended before hello");
                return;
            }
            Inbound::Refused(rejection) => {
                info!(%remote, code = ?rejection.code, "first message refused");
                close_with_error(&mut ws, &rejection, &hub.shutdown).await;
                return;
            }
            Inbound::Message(message) => {
                let kind = message_type(&message);
                match Hello::from_message(message) {
                    Some(hello) => break hello,
                    None => {
                        let rejection = Rejection::new(
                            ErrorCode::ProtocolViolation,
                            format!("the first message must be hello, not {kind}"),
                        );
                        info!(%remote, code = ?rejection.code, "first message refused");
                        close_with_error(&mut ws, &rejection, &hub.shutdown).await;
                        return;
                    }
                }
            }
        }
    };
    let auth = match hub.auth_key().await {
        Ok(auth) => auth,
        Err(reason) => {
            error!(%reason, "cannot read the auth key; refusing the node");
            let rejection = Rejection::new(
                ErrorCode::Internal,
                "the coordinator cannot read its auth key",
            );
            close_with_error(&mut ws, &rejection, &hub.shutdown).await;
            return;
        }
    };

    let session = SessionId(hub.next_session.fetch_add(1, Ordering::Relaxed));
    let key = hello.node_key;
    let (tx, mut rx) = mpsc::channel(hub.config.session_queue);
    let cancel = hub.shutdown.child_token();
    let admitted = {
        let mut inner = hub.lock();
        inner.sessions.insert(
            session,
            SessionHandle {
                tx,
                cancel: cancel.clone(),
                key,
            },
        );
        match inner
            .registry
            .handle_hello(session, hello, remote, &auth, now())
        {
            Ok(()) => {
                hub.dispatch(&mut inner);
                Ok(())
            }
            Err(rejection) => {
                inner.sessions.remove(&session);
                Err(rejection)
            }
        }
    };
    if let Err(rejection) = admitted {
        info!(%remote, code = ?rejection.code, "hello refused");
        close_with_error(&mut ws, &rejection, &hub.shutdown).await;
        return;
    }

    let end = session_loop(&hub, &mut ws, session, &mut rx, &cancel).await;

    {
        let mut inner = hub.lock();
        inner.sessions.remove(&session);
        if !hub.shutdown.is_cancelled() {
            inner.registry.handle_closed(session, now());
            hub.dispatch(&mut inner);
        }
    }
    hub.expiry.notify_one();

    let short = key.short();
    match end {
        End::Shutdown => {
            close(&mut ws, CloseCode::Away, "coordinator shutting down").await;
        }
        End::Dropped => {
            close(
                &mut ws,
                CloseCode::Again,
                "outbound queue overflow; reconnect",
            )
            .await;
        }
        End::Goodbye => {
            close(&mut ws, CloseCode::Normal, "goodbye").await;
        }
        End::Replaced(frame) => {
            debug!(%session, key = %short, "closing replaced session");
            let _ = timeout(CLOSE_TIMEOUT, ws.send(frame_message(frame))).await;
            close(&mut ws, CloseCode::Policy, "replaced").await;
        }
        End::Refused(rejection) => {
            info!(%session, key = %short, code = ?rejection.code, "message refused; closing session");
            close_with_error(&mut ws, &rejection, &hub.shutdown).await;
        }
        End::Ended(reason) => {
            debug!(%session, key = %short, %reason, "session ended");
            // Flush the automatic reply to a close frame, if any.
            let _ = timeout(CLOSE_TIMEOUT, ws.flush()).await;
        }
        End::PingTimeout => {
            info!(%session, key = %short, "no answer to pings; session dropped");
        }
        End::WriteFailed(reason) => {
            info!(%session, key = %short, %reason, "write failed; session dropped");
        }
    }
}

/// The admitted part of a session: outbound queue, inbound messages, pings.
async fn session_loop<S>(
    hub: &Hub,
    ws: &mut Ws<S>,
    session: SessionId,
    rx: &mut mpsc::Receiver<Outbound>,
    cancel: &CancellationToken,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let interval = hub.config.ping_interval;
    let write_timeout = interval * 2;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_rx = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return cancelled(hub),
            item = rx.recv() => {
                let Some(item) = item else { return End::Dropped };
                let first = match item {
                    Outbound::Frame(frame) => frame,
                    Outbound::Close(frame) => return End::Replaced(frame),
                };
                // A stalled write must not hide a cancellation (shutdown, or
                // the hub dropping this session because its queue filled).
                let written = tokio::select! {
                    _ = cancel.cancelled() => return cancelled(hub),
                    written = timeout(write_timeout, write_batch(ws, rx, first)) => written,
                };
                match written {
                    Ok(Ok(None)) => {}
                    Ok(Ok(Some(close))) => return End::Replaced(close),
                    Ok(Err(e)) => return End::WriteFailed(e.to_string()),
                    Err(_) => return End::WriteFailed(format!("write stalled for {write_timeout:?}")),
                }
            }
            item = ws.next() => {
                last_rx = tokio::time::Instant::now();
                match classify(item) {
                    Inbound::Control => trace!(%session, "control frame"),
                    Inbound::Ended(reason) => return End::Ended(reason),
                    Inbound::Refused(rejection) => return End::Refused(rejection),
                    Inbound::Message(ClientMessage::Hello { .. }) => {
                        return End::Refused(Rejection::new(
                            ErrorCode::ProtocolViolation,
                            "a second hello on the same session",
                        ));
                    }
                    Inbound::Message(ClientMessage::Update { endpoints }) => {
                        trace!(%session, count = endpoints.len(), "update");
                        let result = hub.with_registry(|r| r.handle_update(session, &endpoints, now()));
                        if let Err(rejection) = result {
                            return refused(rejection);
                        }
                    }
                    Inbound::Message(ClientMessage::Goodbye) => {
                        let result = hub.with_registry(|r| r.handle_goodbye(session, now()));
                        return match result {
                            Ok(()) => End::Goodbye,
                            Err(rejection) => refused(rejection),
                        };
                    }
                }
            }
            _ = ping.tick() => {
                if last_rx.elapsed() >= interval * 2 {
                    return End::PingTimeout;
                }
                trace!(%session, "ping");
                let sent = tokio::select! {
                    _ = cancel.cancelled() => return cancelled(hub),
                    sent = timeout(write_timeout, ws.send(Message::Ping(Bytes::new()))) => sent,
                };
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return End::WriteFailed(e.to_string()),
                    Err(_) => return End::WriteFailed(format!("write stalled for {write_timeout:?}")),
                }
            }
        }
    }
}

/// Why the session's token was cancelled.
fn cancelled(hub: &Hub) -> End {
    if hub.shutdown.is_cancelled() {
        End::Shutdown
    } else {
        End::Dropped
    }
}

/// A refusal from the registry; `Replaced` becomes the replaced ending.
fn refused(rejection: Rejection) -> End {
    if rejection.code == ErrorCode::Replaced {
        End::Replaced(rejection.frame())
    } else {
        End::Refused(rejection)
    }
}

/// Writes `first` and whatever else is queued (bounded), then flushes.
/// Returns a close order found in the queue.
async fn write_batch<S>(
    ws: &mut Ws<S>,
    rx: &mut mpsc::Receiver<Outbound>,
    first: Frame,
) -> Result<Option<Frame>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    feed_frame(ws, first).await?;
    let mut close = None;
    for _ in 1..MAX_WRITE_BATCH {
        match rx.try_recv() {
            Ok(Outbound::Frame(frame)) => feed_frame(ws, frame).await?,
            Ok(Outbound::Close(frame)) => {
                close = Some(frame);
                break;
            }
            Err(_) => break,
        }
    }
    ws.flush().await?;
    Ok(close)
}

/// Size at which tungstenite writes its buffer to the socket, and the size
/// of the fragments large messages are cut into.
const WRITE_BUFFER: usize = 16 << 10;

/// Queues one text message, cut into websocket fragments (RFC 6455 §5.4)
/// when it is larger than [`WRITE_BUFFER`]; receivers see one message.
async fn feed_frame<S>(ws: &mut Ws<S>, frame: Frame) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio_tungstenite::tungstenite::protocol::frame::Frame as WireFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let message = frame_message(frame);
    let Message::Text(text) = &message else {
        return ws.feed(message).await;
    };
    if text.len() <= WRITE_BUFFER {
        return ws.feed(message).await;
    }
    let bytes = Bytes::from(text.clone());
    let mut start = 0;
    while start < bytes.len() {
        let end = (start + WRITE_BUFFER).min(bytes.len());
        let opcode = if start == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let fragment = WireFrame::message(bytes.slice(start..end), opcode, end == bytes.len());
        ws.feed(Message::Frame(fragment)).await?;
        start = end;
    }
    Ok(())
}

/// Sends a close frame (best effort, bounded in time).
async fn close<S>(ws: &mut Ws<S>, code: CloseCode, reason: &'static str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = timeout(CLOSE_TIMEOUT, ws.close(Some(frame))).await;
}

/// Sends `error`, a close frame, and lingers so both reach the node even if
/// it still has unread data in flight (an oversized frame, say).
async fn close_with_error<S>(ws: &mut Ws<S>, rejection: &Rejection, shutdown: &CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let code = match rejection.code {
        ErrorCode::MessageTooLarge => CloseCode::Size,
        ErrorCode::Internal => CloseCode::Error,
        _ => CloseCode::Policy,
    };
    let _ = timeout(CLOSE_TIMEOUT, async {
        ws.feed(frame_message(rejection.frame())).await?;
        ws.send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(rejection.code.to_string()),
        })))
        .await
    })
    .await;
    linger(ws.get_mut(), shutdown).await;
}
