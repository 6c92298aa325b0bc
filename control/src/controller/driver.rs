//! The controller's async driver: the retry loop around coordinator
//! sessions, and the task that applies the peer lifecycle to the data plane.
//!
//! [`Controller::run`] joins two loops (no spawned tasks):
//!
//! - the **connection loop**: `dial (within dial_timeout) → hello → welcome →
//!   session (snapshot, peer updates, pings) → session lost → backoff → dial
//!   again`. It ends **only** when the cancellation token is cancelled. Every
//!   error — dial timeout, refused, DNS, TLS, HTTP status, websocket or
//!   protocol error, `error{bad_auth_key}` from the coordinator, a dead
//!   session — is logged once (WARN), recorded in [`ControlStatus`], and
//!   followed by a backoff sleep and another dial.
//! - the **lifecycle loop**: owns the timers of [`PeerLifecycle`] (lost-peer
//!   expiry), fed by the connection loop through a channel; it keeps running
//!   while the connection loop dials or sleeps, and applies the resulting
//!   [`PeerAction`]s to the [`DataPlane`] in order.
//!
//! Backoff is reset only when a session proved healthy (its first snapshot
//! arrived). Sessions are watched with pings every `ping_interval`; one with
//! no sign of life (pong or message) since the previous ping is dropped at
//! the next tick, i.e. about two intervals after it was last heard from.
//!
//! On cancellation with an open session, `run` sends `goodbye` and closes the
//! websocket, bounded by [`GOODBYE_TIMEOUT`], so peers see a graceful
//! disconnect; then it returns. A node's SIGINT/SIGTERM handler therefore
//! only cancels the token and awaits `run`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::peers::{
    DEFAULT_LOST_PEER_TIMEOUT, PeerAction, PeerCounts, PeerLifecycle, SelfAddresses,
};
use super::transport::{DialError, Incoming, Session, SessionError, Transport};
use super::url::CoordinatorUrl;
use crate::proto::{
    ClientMessage, MAX_ENDPOINTS, NodeKey, PROTOCOL_VERSION, PeerInfo, ServerMessage, UpdateKind,
};

/// Default bound on one dial (TCP, TLS, upgrade, hello → welcome).
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default first retry delay.
pub const DEFAULT_RETRY_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Default cap on the retry delay.
pub const DEFAULT_RETRY_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Default interval between pings on an open session.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long a graceful stop waits for `goodbye` and the close.
pub const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything the controller needs to know.
#[derive(Clone)]
pub struct ControllerConfig {
    /// The coordinator.
    pub url: CoordinatorUrl,
    /// The tailnet's auth key (never logged).
    pub auth_key: String,
    /// This node's WireGuard public key.
    pub node_key: NodeKey,
    /// The name this node asks for.
    pub name: String,
    /// This node's WireGuard UDP port.
    pub udp_port: u16,
    /// Bound on one dial, including the hello → welcome exchange.
    pub dial_timeout: Duration,
    /// First retry delay.
    pub retry_initial_backoff: Duration,
    /// Cap on the retry delay.
    pub retry_max_backoff: Duration,
    /// Interval between pings; a session silent for about two intervals
    /// (a ping unanswered until the next one is due) is dropped.
    pub ping_interval: Duration,
    /// How long lost peers are kept without a fresh handshake.
    pub lost_peer_timeout: Duration,
    /// Seed for the backoff jitter.
    pub seed: u64,
}

impl ControllerConfig {
    /// A configuration with the default timeouts and a random jitter seed.
    pub fn new(
        url: CoordinatorUrl,
        auth_key: String,
        node_key: NodeKey,
        name: String,
        udp_port: u16,
    ) -> Self {
        ControllerConfig {
            url,
            auth_key,
            node_key,
            name,
            udp_port,
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            retry_initial_backoff: DEFAULT_RETRY_INITIAL_BACKOFF,
            retry_max_backoff: DEFAULT_RETRY_MAX_BACKOFF,
            ping_interval: DEFAULT_PING_INTERVAL,
            lost_peer_timeout: DEFAULT_LOST_PEER_TIMEOUT,
            seed: rand::random(),
        }
    }
}

impl fmt::Debug for ControllerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControllerConfig")
            .field("url", &self.url)
            .field("auth_key", &"<redacted>")
            .field("node_key", &self.node_key)
            .field("name", &self.name)
            .field("udp_port", &self.udp_port)
            .field("dial_timeout", &self.dial_timeout)
            .field("retry_initial_backoff", &self.retry_initial_backoff)
            .field("retry_max_backoff", &self.retry_max_backoff)
            .field("ping_interval", &self.ping_interval)
            .field("lost_peer_timeout", &self.lost_peer_timeout)
            .finish_non_exhaustive()
    }
}

/// This node's identity as the coordinator assigned it (`welcome`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfInfo {
    /// Our unique name.
    pub name: String,
    /// Our IPv4 tailnet address.
    pub ipv4: Ipv4Addr,
    /// Our IPv6 tailnet address.
    pub ipv6: Ipv6Addr,
    /// The tailnet's DNS domain.
    pub domain: String,
    /// The address the coordinator saw us connect from.
    pub observed_addr: SocketAddr,
}

/// What the controller drives: the node's WireGuard peers. Implemented by
/// the node (cli crate) on top of `wg`.
pub trait DataPlane: Send + Sync + 'static {
    /// Our identity (after every `welcome`; addresses are stable per key).
    fn set_self(&self, me: SelfInfo) -> impl Future<Output = ()> + Send;

    /// Adds a peer or updates it in place. `fresh_session`: the peer had
    /// been removed (expired) and is rebuilt; start a new WireGuard session.
    fn upsert_peer(&self, peer: &PeerInfo, fresh_session: bool) -> impl Future<Output = ()> + Send;

    /// Removes a peer.
    fn remove_peer(&self, key: &NodeKey) -> impl Future<Output = ()> + Send;

    /// The latest WireGuard handshake time per peer (peers without one may be
    /// omitted). Asked when a lost peer's expiry check is due.
    fn last_handshakes(&self) -> impl Future<Output = HashMap<NodeKey, Instant>> + Send;

    /// The node's current local UDP endpoints, reported in `hello` and, when
    /// they change, in `update`.
    fn endpoints(&self) -> Vec<SocketAddr>;
}

/// Where the connection loop is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Dialling (attempt `attempt` since the last healthy session).
    Connecting {
        /// When this dial started.
        since: Instant,
        /// Attempt number since the last healthy session (1-based).
        attempt: u32,
    },
    /// A session is open (welcome received).
    Connected {
        /// When the welcome arrived.
        since: Instant,
    },
    /// Waiting before the next dial.
    Backoff {
        /// When the next dial starts.
        until: Instant,
        /// Failed attempts since the last healthy session.
        attempts: u32,
    },
    /// `run` has returned (cancelled).
    Stopped,
}

/// The most recent failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastError {
    /// `DialError::kind` or `SessionError::kind`.
    pub kind: &'static str,
    /// The error message.
    pub message: String,
    /// When it happened.
    pub at: Instant,
}

/// The controller's health, published on a watch channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlStatus {
    /// Where the connection loop is.
    pub state: ConnectionState,
    /// The last dial failure or session loss.
    pub last_error: Option<LastError>,
    /// When the last message from the coordinator arrived.
    pub last_coordination: Option<Instant>,
    /// Dials that reached `welcome`.
    pub sessions_started: u64,
    /// Sessions that delivered their snapshot (proved healthy).
    pub sessions_healthy: u64,
    /// Dials started.
    pub dials: u64,
    /// Failed dials by [`DialError::kind`].
    pub dial_failures_by_kind: BTreeMap<&'static str, u64>,
    /// Ended sessions by [`SessionError::kind`].
    pub session_losses_by_kind: BTreeMap<&'static str, u64>,
    /// Our identity, once welcomed.
    pub self_info: Option<SelfInfo>,
}

impl ControlStatus {
    fn new() -> Self {
        ControlStatus {
            state: ConnectionState::Connecting {
                since: now(),
                attempt: 0,
            },
            last_error: None,
            last_coordination: None,
            sessions_started: 0,
            sessions_healthy: 0,
            dials: 0,
            dial_failures_by_kind: BTreeMap::new(),
            session_losses_by_kind: BTreeMap::new(),
            self_info: None,
        }
    }
}

/// A shared, read-only handle on the controller's peer table: name
/// resolution for the SOCKS proxy and per-peer state for status.
#[derive(Clone)]
pub struct PeerDirectory(Arc<RwLock<PeerLifecycle>>);

impl fmt::Debug for PeerDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerDirectory({:?})", self.read().counts())
    }
}

impl PeerDirectory {
    /// Addresses of the peer (or this node) called `name` or
    /// `name.<domain>`, if it is in the data plane.
    pub fn resolve(&self, host: &str) -> Option<(Ipv4Addr, Ipv6Addr)> {
        self.read().resolve(host)
    }

    /// Peers per state.
    pub fn counts(&self) -> PeerCounts {
        self.read().counts()
    }

    /// Runs `f` on the peer table (keep it short: the controller waits).
    pub fn with<R>(&self, f: impl FnOnce(&PeerLifecycle) -> R) -> R {
        f(&self.read())
    }

    fn read(&self) -> RwLockReadGuard<'_, PeerLifecycle> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, PeerLifecycle> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps a node coordinated. See the module docs.
pub struct Controller<T, D> {
    config: ControllerConfig,
    transport: T,
    data_plane: Arc<D>,
    status: watch::Sender<ControlStatus>,
    peers: PeerDirectory,
}

/// Inputs from the connection loop to the lifecycle loop.
enum LifecycleInput {
    SelfAddresses(SelfAddresses),
    Snapshot(Vec<PeerInfo>),
    Update(UpdateKind, PeerInfo),
    SessionLost,
}

/// How a session ended.
enum SessionEnd {
    Cancelled,
    Lost(SessionError),
}

impl<T: Transport, D: DataPlane> Controller<T, D> {
    /// A controller that will dial `config.url` over `transport` and apply
    /// the peer set to `data_plane`. Nothing happens until [`run`](Self::run).
    pub fn new(config: ControllerConfig, transport: T, data_plane: Arc<D>) -> Self {
        let peers = PeerDirectory(Arc::new(RwLock::new(PeerLifecycle::new(
            config.node_key,
            config.lost_peer_timeout,
        ))));
        let (status, _) = watch::channel(ControlStatus::new());
        Controller {
            config,
            transport,
            data_plane,
            status,
            peers,
        }
    }

    /// The controller's status, updated as it changes.
    pub fn status(&self) -> watch::Receiver<ControlStatus> {
        self.status.subscribe()
    }

    /// The peer table (names, states).
    pub fn directory(&self) -> PeerDirectory {
        self.peers.clone()
    }

    /// Keeps the node coordinated until `cancel` is cancelled — and only
    /// then: no error ends it. On cancellation with an open session it sends
    /// `goodbye` and closes (bounded by [`GOODBYE_TIMEOUT`]) before returning.
    pub async fn run(self, cancel: CancellationToken) {
        tracing::info!(url = %self.config.url, name = %self.config.name, "controller starting");
        let (tx, rx) = mpsc::unbounded_channel();
        let lifecycle = lifecycle_loop(
            self.peers.clone(),
            Arc::clone(&self.data_plane),
            rx,
            cancel.clone(),
        );
        tokio::join!(self.connection_loop(tx, &cancel), lifecycle);
        self.status
            .send_modify(|s| s.state = ConnectionState::Stopped);
        tracing::info!("controller stopped");
    }

    async fn connection_loop(
        &self,
        tx: mpsc::UnboundedSender<LifecycleInput>,
        cancel: &CancellationToken,
    ) {
        let cfg = &self.config;
        let mut backoff = Backoff::new(cfg.retry_initial_backoff, cfg.retry_max_backoff, cfg.seed);
        // Attempts since the last healthy session.
        let mut attempt: u32 = 0;
        loop {
            // Also covers a zero-length backoff: never dial after cancel.
            if cancel.is_cancelled() {
                return;
            }
            attempt = attempt.saturating_add(1);
            self.status.send_modify(|s| {
                s.state = ConnectionState::Connecting {
                    since: now(),
                    attempt,
                };
                s.dials += 1;
            });
            tracing::debug!(attempt, url = %cfg.url, "dialling the coordinator");
            let dial = tokio::time::timeout(cfg.dial_timeout, self.establish());
            let result = tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                r = dial => r.unwrap_or(Err(DialError::Timeout)),
            };
            match result {
                Err(e) => {
                    tracing::warn!(attempt, kind = e.kind(), error = %e, url = %cfg.url, "coordinator dial failed; will retry");
                    self.status.send_modify(|s| {
                        *s.dial_failures_by_kind.entry(e.kind()).or_insert(0) += 1;
                        s.last_error = Some(LastError {
                            kind: e.kind(),
                            message: e.to_string(),
                            at: now(),
                        });
                    });
                }
                Ok((session, me)) => {
                    let end = self
                        .session(session, me, &tx, cancel, &mut backoff, &mut attempt)
                        .await;
                    // Whatever happened, peers are lost until the next snapshot.
                    let _ = tx.send(LifecycleInput::SessionLost);
                    match end {
                        SessionEnd::Cancelled => return,
                        SessionEnd::Lost(e) => {
                            tracing::warn!(kind = e.kind(), error = %e, "coordinator session lost; will redial");
                            self.status.send_modify(|s| {
                                *s.session_losses_by_kind.entry(e.kind()).or_insert(0) += 1;
                                s.last_error = Some(LastError {
                                    kind: e.kind(),
                                    message: e.to_string(),
                                    at: now(),
                                });
                            });
                        }
                    }
                }
            }
            let delay = backoff.next_delay();
            let until = tokio::time::Instant::now() + delay;
            self.status.send_modify(|s| {
                s.state = ConnectionState::Backoff {
                    until: until.into_std(),
                    attempts: attempt,
                };
            });
            tracing::debug!(?delay, "waiting before the next dial");
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Dial, hello, welcome. The caller bounds it with the dial timeout.
    async fn establish(&self) -> Result<(T::Session, SelfInfo), DialError> {
        let cfg = &self.config;
        let mut session = self.transport.dial(&cfg.url).await?;
        let hello = ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            auth_key: cfg.auth_key.clone(),
            node_key: cfg.node_key,
            name: cfg.name.clone(),
            udp_port: cfg.udp_port,
            endpoints: self.endpoints(),
        };
        session.send(&hello).await?;
        loop {
            match session.recv().await? {
                Incoming::Pong => {}
                Incoming::Message(ServerMessage::Welcome {
                    version,
                    name,
                    ipv4,
                    ipv6,
                    domain,
                    observed_addr,
                }) => {
                    if version != PROTOCOL_VERSION {
                        tracing::warn!(
                            version,
                            ours = PROTOCOL_VERSION,
                            "coordinator speaks another protocol version"
                        );
                    }
                    let me = SelfInfo {
                        name,
                        ipv4,
                        ipv6,
                        domain,
                        observed_addr,
                    };
                    return Ok((session, me));
                }
                Incoming::Message(ServerMessage::Error { code, reason }) => {
                    return Err(DialError::Rejected { code, reason });
                }
                Incoming::Message(other) => {
                    return Err(DialError::Protocol(format!(
                        "expected welcome, got {}",
                        message_type(&other)
                    )));
                }
            }
        }
    }

    /// Runs one welcomed session until it breaks or `cancel`.
    async fn session(
        &self,
        mut session: T::Session,
        me: SelfInfo,
        tx: &mpsc::UnboundedSender<LifecycleInput>,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
        attempt: &mut u32,
    ) -> SessionEnd {
        let cfg = &self.config;
        tracing::info!(name = %me.name, ipv4 = %me.ipv4, ipv6 = %me.ipv6, observed = %me.observed_addr, "coordinator session established");
        let started = tokio::time::Instant::now();
        self.status.send_modify(|s| {
            s.state = ConnectionState::Connected {
                since: started.into_std(),
            };
            s.sessions_started += 1;
            s.last_coordination = Some(started.into_std());
            s.self_info = Some(me.clone());
        });
        let _ = tx.send(LifecycleInput::SelfAddresses(SelfAddresses {
            name: me.name.clone(),
            ipv4: me.ipv4,
            ipv6: me.ipv6,
            domain: me.domain.clone(),
        }));
        self.data_plane.set_self(me).await;

        let interval = cfg.ping_interval.max(Duration::from_millis(1));
        let mut ticker = tokio::time::interval_at(started + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = started;
        let mut healthy = false;
        let mut endpoints = self.endpoints();
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    self.goodbye(&mut session).await;
                    return SessionEnd::Cancelled;
                }
                _ = ticker.tick() => {
                    // Pongs arrive just after a tick, so a live session was last
                    // heard about one interval ago here. 1.5 intervals of silence
                    // means the previous ping went unanswered: the session is
                    // dropped two intervals after its last sign of life.
                    if last_heard.elapsed() >= interval * 3 / 2 {
                        return SessionEnd::Lost(SessionError::PingTimeout);
                    }
                    match tokio::time::timeout(interval, session.ping()).await {
                        Err(_) => return SessionEnd::Lost(SessionError::SendTimeout),
                        Ok(Err(e)) => return SessionEnd::Lost(e),
                        Ok(Ok(())) => {}
                    }
                    let current = self.endpoints();
                    if current != endpoints {
                        tracing::info!(endpoints = ?current, "local endpoints changed; telling the coordinator");
                        let update = ClientMessage::Update { endpoints: current.clone() };
                        match tokio::time::timeout(interval, session.send(&update)).await {
                            Err(_) => return SessionEnd::Lost(SessionError::SendTimeout),
                            Ok(Err(e)) => return SessionEnd::Lost(e),
                            Ok(Ok(())) => endpoints = current,
                        }
                    }
                }
                r = session.recv() => {
                    let msg = match r {
                        Err(e) => return SessionEnd::Lost(e),
                        Ok(Incoming::Pong) => {
                            last_heard = tokio::time::Instant::now();
                            continue;
                        }
                        Ok(Incoming::Message(msg)) => msg,
                    };
                    last_heard = tokio::time::Instant::now();
                    self.status.send_modify(|s| s.last_coordination = Some(last_heard.into_std()));
                    match msg {
                        ServerMessage::Snapshot { peers } => {
                            tracing::debug!(peers = peers.len(), "snapshot received");
                            let _ = tx.send(LifecycleInput::Snapshot(peers));
                            if !healthy {
                                // The session proved itself: start retries afresh next time.
                                healthy = true;
                                backoff.reset();
                                *attempt = 0;
                                self.status.send_modify(|s| s.sessions_healthy += 1);
                                tracing::info!("recoordinated with the coordinator");
                            }
                        }
                        ServerMessage::PeerUpdate { kind, peer } => {
                            tracing::debug!(?kind, peer = %peer.name, key = %peer.node_key.short(), "peer update");
                            let _ = tx.send(LifecycleInput::Update(kind, peer));
                        }
                        ServerMessage::Error { code, reason } => {
                            return SessionEnd::Lost(SessionError::Rejected { code, reason });
                        }
                        ServerMessage::Welcome { .. } => {
                            return SessionEnd::Lost(SessionError::Protocol(
                                "second welcome in one session".into(),
                            ));
                        }
                    }
                }
            }
        }
    }

    /// Graceful stop: `goodbye`, then close, bounded by [`GOODBYE_TIMEOUT`].
    async fn goodbye(&self, session: &mut T::Session) {
        let polite = async {
            if let Err(e) = session.send(&ClientMessage::Goodbye).await {
                tracing::debug!(error = %e, "goodbye not sent");
                return false;
            }
            session.close().await;
            true
        };
        match tokio::time::timeout(GOODBYE_TIMEOUT, polite).await {
            Ok(true) => tracing::info!("said goodbye to the coordinator"),
            Ok(false) => {}
            Err(_) => tracing::warn!("goodbye to the coordinator timed out"),
        }
    }

    fn endpoints(&self) -> Vec<SocketAddr> {
        let mut eps = self.data_plane.endpoints();
        eps.truncate(MAX_ENDPOINTS);
        eps
    }
}

/// Applies lifecycle inputs and timers to the data plane, in order, until
/// the connection loop is gone or `cancel`.
async fn lifecycle_loop<D: DataPlane>(
    peers: PeerDirectory,
    data_plane: Arc<D>,
    mut rx: mpsc::UnboundedReceiver<LifecycleInput>,
    cancel: CancellationToken,
) {
    loop {
        let deadline = peers.read().poll_timeout().map(|(at, _)| at);
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        let input = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            msg = rx.recv() => match msg {
                Some(msg) => Some(msg),
                None => return,
            },
            () = sleep => None,
        };
        match input {
            Some(input) => {
                let now = now();
                let mut table = peers.write();
                match input {
                    LifecycleInput::SelfAddresses(me) => table.handle_self(me),
                    LifecycleInput::Snapshot(list) => table.handle_snapshot(list, now),
                    LifecycleInput::Update(kind, peer) => {
                        table.handle_peer_update(kind, peer, now);
                    }
                    LifecycleInput::SessionLost => table.handle_session_lost(now),
                }
            }
            None => {
                let handshakes = data_plane.last_handshakes().await;
                let mut table = peers.write();
                table.handle_handshakes(&handshakes);
                table.handle_timeout(now());
            }
        }
        let actions: Vec<PeerAction> = {
            let mut table = peers.write();
            std::iter::from_fn(|| table.poll_action()).collect()
        };
        for action in actions {
            match action {
                PeerAction::Upsert {
                    peer,
                    fresh_session,
                } => data_plane.upsert_peer(&peer, fresh_session).await,
                PeerAction::Remove { key, .. } => data_plane.remove_peer(&key).await,
            }
        }
    }
}

fn message_type(msg: &ServerMessage) -> &'static str {
    match msg {
        ServerMessage::Welcome { .. } => "welcome",
        ServerMessage::Snapshot { .. } => "snapshot",
        ServerMessage::PeerUpdate { .. } => "peer_update",
        ServerMessage::Error { .. } => "error",
    }
}

/// The driver's clock: tokio's (pausable in tests), as a std `Instant` for
/// the sans-IO core and the data plane.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
