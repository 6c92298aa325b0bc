//! The controller's retry loop, session watchdog and peer lifecycle, driven
//! through a scripted in-memory transport on tokio's paused clock: twenty
//! simulated minutes take milliseconds and nothing sleeps for real.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tailnode_control::controller::{
    ConnectionState, ControlStatus, Controller, ControllerConfig, CoordinatorUrl, DataPlane,
    DialError, Incoming, SelfInfo, Session, SessionError, Transport,
};
use tailnode_control::proto::{
    ClientMessage, ErrorCode, NodeKey, PeerInfo, PeerStatus, ServerMessage, UpdateKind,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SEC: Duration = Duration::from_secs(1);
const MIN: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Fake coordinator transport
// ---------------------------------------------------------------------------

/// What one dial does.
#[derive(Clone)]
enum Plan {
    /// The dial fails at once with this error.
    Fail(DialError),
    /// The dial fails and cancels the controller's token while doing so.
    FailAndCancel(DialError, CancellationToken),
    /// The dial never completes (blackholed coordinator).
    Hang,
    /// The dial succeeds; after `hello` the session delivers `replies` in
    /// order, then whatever the test pushes through its handle.
    Session {
        replies: Vec<Reply>,
        answer_pings: bool,
    },
}

#[derive(Clone)]
enum Reply {
    Msg(ServerMessage),
    Fail(SessionError),
}

/// A coordinator that welcomes and sends `peers` as the snapshot.
fn coordinator(peers: Vec<PeerInfo>) -> Plan {
    Plan::Session {
        replies: vec![Reply::Msg(welcome()), Reply::Msg(snapshot(peers))],
        answer_pings: true,
    }
}

fn welcome() -> ServerMessage {
    ServerMessage::Welcome {
        version: 1,
        name: "me".into(),
        ipv4: Ipv4Addr::new(100, 64, 0, 1),
        ipv6: "fd7a:115c:a1e0::1".parse().unwrap(),
        domain: "tailnet.internal".into(),
        observed_addr: "198.51.100.7:40000".parse().unwrap(),
    }
}

fn snapshot(peers: Vec<PeerInfo>) -> ServerMessage {
    ServerMessage::Snapshot { peers }
}

/// The test's grip on one established session.
#[derive(Clone)]
struct SessionHandle {
    inbound: mpsc::UnboundedSender<Result<Incoming, SessionError>>,
    sent: Arc<Mutex<Vec<ClientMessage>>>,
    closed: Arc<AtomicBool>,
    answer_pings: Arc<AtomicBool>,
    stall_sends: Arc<AtomicBool>,
    pong_delay: Arc<Mutex<Duration>>,
}

impl SessionHandle {
    fn push(&self, msg: ServerMessage) {
        self.inbound.send(Ok(Incoming::Message(msg))).unwrap();
    }
    fn fail(&self, e: SessionError) {
        self.inbound.send(Err(e)).unwrap();
    }
    fn sent(&self) -> Vec<ClientMessage> {
        self.sent.lock().unwrap().clone()
    }
}

#[derive(Default)]
struct FakeState {
    plans: VecDeque<Plan>,
    default: Option<Plan>,
    dials: Vec<Instant>,
    sessions: Vec<SessionHandle>,
}

#[derive(Clone, Default)]
struct FakeTransport(Arc<Mutex<FakeState>>);

impl FakeTransport {
    fn new(plans: Vec<Plan>, default: Plan) -> Self {
        FakeTransport(Arc::new(Mutex::new(FakeState {
            plans: plans.into(),
            default: Some(default),
            ..FakeState::default()
        })))
    }
    fn dials(&self) -> Vec<Instant> {
        self.0.lock().unwrap().dials.clone()
    }
    fn dial_count(&self) -> usize {
        self.0.lock().unwrap().dials.len()
    }
    fn session(&self, i: usize) -> SessionHandle {
        self.0.lock().unwrap().sessions[i].clone()
    }
    fn set_default(&self, plan: Plan) {
        self.0.lock().unwrap().default = Some(plan);
    }
}

struct FakeSession {
    inbound: mpsc::UnboundedReceiver<Result<Incoming, SessionError>>,
    handle: SessionHandle,
    replies: Vec<Reply>,
}

impl Transport for FakeTransport {
    type Session = FakeSession;

    async fn dial(&self, _url: &CoordinatorUrl) -> Result<FakeSession, DialError> {
        let plan = {
            let mut st = self.0.lock().unwrap();
            st.dials.push(Instant::now());
            let default = st.default.clone().unwrap();
            st.plans.pop_front().unwrap_or(default)
        };
        match plan {
            Plan::Fail(e) => Err(e),
            Plan::FailAndCancel(e, token) => {
                token.cancel();
                Err(e)
            }
            Plan::Hang => std::future::pending().await,
            Plan::Session {
                replies,
                answer_pings,
            } => {
                let (tx, rx) = mpsc::unbounded_channel();
                let handle = SessionHandle {
                    inbound: tx,
                    sent: Arc::default(),
                    closed: Arc::default(),
                    answer_pings: Arc::new(AtomicBool::new(answer_pings)),
                    stall_sends: Arc::default(),
                    pong_delay: Arc::default(),
                };
                self.0.lock().unwrap().sessions.push(handle.clone());
                Ok(FakeSession {
                    inbound: rx,
                    handle,
                    replies,
                })
            }
        }
    }
}

impl Session for FakeSession {
    async fn send(&mut self, msg: &ClientMessage) -> Result<(), SessionError> {
        if self.handle.stall_sends.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.handle.sent.lock().unwrap().push(msg.clone());
        if matches!(msg, ClientMessage::Hello { .. }) {
            for r in self.replies.drain(..) {
                let item = match r {
                    Reply::Msg(m) => Ok(Incoming::Message(m)),
                    Reply::Fail(e) => Err(e),
                };
                self.handle.inbound.send(item).unwrap();
            }
        }
        Ok(())
    }

    async fn recv(&mut self) -> Result<Incoming, SessionError> {
        // The handle keeps a sender alive, so this waits forever when the
        // script is exhausted: a silent (blackholed) connection.
        match self.inbound.recv().await {
            Some(item) => item,
            None => std::future::pending().await,
        }
    }

    async fn ping(&mut self) -> Result<(), SessionError> {
        if self.handle.answer_pings.load(Ordering::SeqCst) {
            let delay = *self.handle.pong_delay.lock().unwrap();
            let inbound = self.handle.inbound.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = inbound.send(Ok(Incoming::Pong));
            });
        }
        Ok(())
    }

    async fn close(&mut self) {
        self.handle.closed.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------
// Fake data plane
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    SetSelf(String),
    Upsert(NodeKey, bool),
    Remove(NodeKey),
}

#[derive(Default)]
struct FakeDataPlane {
    events: Mutex<Vec<Event>>,
    upserted: Mutex<Vec<PeerInfo>>,
    /// Fixed handshake times.
    handshakes: Mutex<HashMap<NodeKey, std::time::Instant>>,
    /// Peers that handshake continuously (reported as "now").
    alive: Mutex<HashSet<NodeKey>>,
    endpoints: Mutex<Vec<SocketAddr>>,
}

impl FakeDataPlane {
    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }
    fn peer_events(&self) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| !matches!(e, Event::SetSelf(_)))
            .collect()
    }
}

impl DataPlane for FakeDataPlane {
    async fn set_self(&self, me: SelfInfo) {
        self.events.lock().unwrap().push(Event::SetSelf(me.name));
    }
    async fn upsert_peer(&self, peer: &PeerInfo, fresh_session: bool) {
        self.upserted.lock().unwrap().push(peer.clone());
        self.events
            .lock()
            .unwrap()
            .push(Event::Upsert(peer.node_key, fresh_session));
    }
    async fn remove_peer(&self, key: &NodeKey) {
        self.events.lock().unwrap().push(Event::Remove(*key));
    }
    async fn last_handshakes(&self) -> HashMap<NodeKey, std::time::Instant> {
        let mut map = self.handshakes.lock().unwrap().clone();
        let now = Instant::now().into_std();
        for k in self.alive.lock().unwrap().iter() {
            map.insert(*k, now);
        }
        map
    }
    fn endpoints(&self) -> Vec<SocketAddr> {
        self.endpoints.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

fn key(b: u8) -> NodeKey {
    NodeKey([b; 32])
}

fn peer(b: u8) -> PeerInfo {
    PeerInfo {
        node_key: key(b),
        name: format!("peer{b}"),
        ipv4: Ipv4Addr::new(100, 64, 0, b),
        ipv6: Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, u16::from(b)),
        endpoints: vec![format!("192.0.2.{b}:41641").parse().unwrap()],
        status: PeerStatus::Online,
    }
}

fn config() -> ControllerConfig {
    let mut c = ControllerConfig::new(
        "ws://coordinator.test".parse().unwrap(),
        "secret-auth-key".into(),
        key(200),
        "me".into(),
        41641,
    );
    c.seed = 7;
    c
}

struct Harness {
    transport: FakeTransport,
    dp: Arc<FakeDataPlane>,
    status: watch::Receiver<ControlStatus>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
    directory: tailnode_control::controller::PeerDirectory,
}

fn start(cfg: ControllerConfig, transport: FakeTransport) -> Harness {
    start_with(cfg, transport, CancellationToken::new())
}

fn start_with(
    cfg: ControllerConfig,
    transport: FakeTransport,
    cancel: CancellationToken,
) -> Harness {
    let dp = Arc::new(FakeDataPlane::default());
    let controller = Controller::new(cfg, transport.clone(), Arc::clone(&dp));
    let status = controller.status();
    let directory = controller.directory();
    let task = tokio::spawn(controller.run(cancel.clone()));
    Harness {
        transport,
        dp,
        status,
        cancel,
        task,
        directory,
    }
}

/// Advances simulated time in small steps until `cond` holds; false if it
/// did not within `within`.
async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Harness {
    fn status(&self) -> ControlStatus {
        self.status.borrow().clone()
    }

    /// Cancels and waits for `run` to return (bounded in simulated time).
    async fn stop(self) -> FakeTransport {
        self.cancel.cancel();
        tokio::time::timeout(5 * SEC, self.task)
            .await
            .expect("run returns promptly after cancel")
            .unwrap();
        self.transport
    }
}

// ---------------------------------------------------------------------------
// The retry loop never stops on an error
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn every_error_kind_is_followed_by_another_dial() {
    let rejected = |code| DialError::Rejected {
        code,
        reason: "no".into(),
    };
    let cases: Vec<(&str, Plan, &str)> = vec![
        ("dial timeout", Plan::Hang, "timeout"),
        ("os timeout", Plan::Fail(DialError::Timeout), "timeout"),
        (
            "refused",
            Plan::Fail(DialError::Refused("x".into())),
            "refused",
        ),
        ("dns", Plan::Fail(DialError::Dns("x".into())), "dns"),
        ("io", Plan::Fail(DialError::Io("x".into())), "io"),
        ("tls", Plan::Fail(DialError::Tls("bad cert".into())), "tls"),
        (
            "http 401",
            Plan::Fail(DialError::Http { status: 401 }),
            "http",
        ),
        (
            "http 503",
            Plan::Fail(DialError::Http { status: 503 }),
            "http",
        ),
        (
            "websocket",
            Plan::Fail(DialError::WebSocket("x".into())),
            "websocket",
        ),
        (
            "protocol",
            Plan::Fail(DialError::Protocol("x".into())),
            "protocol",
        ),
        (
            "rejected by the transport",
            Plan::Fail(rejected(ErrorCode::BadAuthKey)),
            "rejected",
        ),
        (
            "error{bad_auth_key} reply to hello",
            Plan::Session {
                replies: vec![Reply::Msg(ServerMessage::Error {
                    code: ErrorCode::BadAuthKey,
                    reason: "wrong auth key".into(),
                })],
                answer_pings: true,
            },
            "rejected",
        ),
        (
            "garbage instead of welcome",
            Plan::Session {
                replies: vec![Reply::Msg(snapshot(vec![]))],
                answer_pings: true,
            },
            "protocol",
        ),
        (
            "connection closed before welcome",
            Plan::Session {
                replies: vec![Reply::Fail(SessionError::Closed(String::new()))],
                answer_pings: true,
            },
            "websocket",
        ),
        (
            "hello never answered",
            Plan::Session {
                replies: vec![],
                answer_pings: true,
            },
            "timeout",
        ),
    ];
    for (name, plan, kind) in cases {
        let h = start(
            config(),
            FakeTransport::new(vec![plan], coordinator(vec![peer(1)])),
        );
        let ok = wait_until(2 * MIN, || h.status().sessions_healthy == 1).await;
        assert!(ok, "{name}: no second, successful dial; {:?}", h.status());
        let st = h.status();
        assert_eq!(h.transport.dial_count(), 2, "{name}");
        assert_eq!(
            st.dial_failures_by_kind.get(kind),
            Some(&1),
            "{name}: {st:?}"
        );
        assert_eq!(st.last_error.as_ref().map(|e| e.kind), Some(kind), "{name}");
        assert_eq!(
            h.dp.peer_events(),
            vec![Event::Upsert(key(1), false)],
            "{name}"
        );
        assert!(!h.task.is_finished(), "{name}: run ended without cancel");
        h.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_session_that_dies_midway_is_redialled() {
    for (name, err) in [
        ("io", SessionError::Io("reset".into())),
        ("closed", SessionError::Closed("1001 going away".into())),
        ("websocket", SessionError::WebSocket("bad frame".into())),
        ("protocol", SessionError::Protocol("bad json".into())),
    ] {
        let h = start(
            config(),
            FakeTransport::new(vec![], coordinator(vec![peer(1)])),
        );
        assert!(
            wait_until(MIN, || h.status().sessions_healthy == 1).await,
            "{name}"
        );
        h.transport.session(0).fail(err.clone());
        assert!(
            wait_until(MIN, || h.status().sessions_healthy == 2).await,
            "{name}"
        );
        let st = h.status();
        assert_eq!(
            st.session_losses_by_kind.get(err.kind()),
            Some(&1),
            "{name}"
        );
        assert_eq!(h.transport.dial_count(), 2, "{name}");
        // Same peers after the reconnect: the data plane was not touched again.
        assert_eq!(
            h.dp.peer_events(),
            vec![Event::Upsert(key(1), false)],
            "{name}"
        );
        h.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn coordinator_error_mid_session_is_redialled() {
    let h = start(config(), FakeTransport::new(vec![], coordinator(vec![])));
    assert!(wait_until(MIN, || h.status().sessions_healthy == 1).await);
    h.transport.session(0).push(ServerMessage::Error {
        code: ErrorCode::Replaced,
        reason: "newer session".into(),
    });
    assert!(wait_until(MIN, || h.status().sessions_healthy == 2).await);
    assert_eq!(h.status().session_losses_by_kind.get("rejected"), Some(&1));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn twenty_minutes_of_blackhole_then_recoordinates() {
    let transport = FakeTransport::new(vec![], Plan::Hang);
    let h = start(config(), transport);
    let t0 = Instant::now();
    tokio::time::sleep(20 * MIN).await;
    let dials = h.transport.dial_count();
    // Each attempt: 30 s dial timeout + backoff (100 ms doubling to 10 s, jittered).
    assert!(
        (28..=40).contains(&dials),
        "expected ~20min/(30s+backoff) dials, got {dials}"
    );
    let times = h.transport.dials();
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= 30 * SEC && gap <= 40 * SEC + Duration::from_millis(1),
            "gap {gap:?}"
        );
    }
    assert!(
        times.last().unwrap().duration_since(t0) > 19 * MIN,
        "kept dialling to the end"
    );
    let st = h.status();
    let timeouts = st
        .dial_failures_by_kind
        .get("timeout")
        .copied()
        .unwrap_or(0);
    assert!(
        timeouts + 1 >= dials as u64 && timeouts <= dials as u64,
        "{st:?}"
    );
    assert_eq!(st.dial_failures_by_kind.len(), 1, "only timeouts: {st:?}");
    assert!(!h.task.is_finished());

    h.transport.set_default(coordinator(vec![peer(1), peer(2)]));
    assert!(wait_until(MIN, || h.status().sessions_healthy == 1).await);
    assert_eq!(
        h.dp.events(),
        vec![
            Event::SetSelf("me".into()),
            Event::Upsert(key(1), false),
            Event::Upsert(key(2), false)
        ]
    );
    assert_eq!(
        h.directory.resolve("peer2.tailnet.internal").map(|a| a.0),
        Some(peer(2).ipv4)
    );
    h.stop().await;
}

// ---------------------------------------------------------------------------
// Cancellation is the only way out
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn cancel_during_a_dial_ends_the_loop() {
    let h = start(config(), FakeTransport::new(vec![], Plan::Hang));
    assert!(wait_until(SEC, || h.transport.dial_count() == 1).await);
    tokio::time::sleep(5 * SEC).await;
    let t = Instant::now();
    let transport = h.stop().await;
    assert!(
        Instant::now() - t < SEC,
        "did not wait for the dial timeout"
    );
    tokio::time::sleep(10 * MIN).await;
    assert_eq!(transport.dial_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn cancel_during_backoff_ends_the_loop() {
    let mut cfg = config();
    cfg.retry_initial_backoff = MIN;
    cfg.retry_max_backoff = MIN;
    let h = start(
        cfg,
        FakeTransport::new(vec![], Plan::Fail(DialError::Refused("x".into()))),
    );
    assert!(
        wait_until(SEC, || matches!(
            h.status().state,
            ConnectionState::Backoff { .. }
        ))
        .await
    );
    tokio::time::sleep(10 * SEC).await;
    let mut status = h.status.clone();
    let transport = h.stop().await;
    assert_eq!(status.borrow_and_update().state, ConnectionState::Stopped);
    tokio::time::sleep(10 * MIN).await;
    assert_eq!(transport.dial_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn cancel_right_before_a_zero_length_backoff_stops_before_the_next_dial() {
    let mut cfg = config();
    cfg.retry_initial_backoff = Duration::ZERO;
    cfg.retry_max_backoff = Duration::ZERO;
    let cancel = CancellationToken::new();
    let plan = Plan::FailAndCancel(DialError::Refused("x".into()), cancel.clone());
    let h = start_with(cfg, FakeTransport::new(vec![], plan), cancel);
    tokio::time::timeout(SEC, async {
        while !h.task.is_finished() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("run ended");
    assert_eq!(h.transport.dial_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn zero_backoff_keeps_dialling_until_cancelled() {
    // The control for the test above: without the cancel, a zero backoff
    // dials again at once.
    let mut cfg = config();
    cfg.retry_initial_backoff = Duration::ZERO;
    cfg.retry_max_backoff = Duration::ZERO;
    let h = start(
        cfg,
        FakeTransport::new(
            vec![Plan::Fail(DialError::Refused("x".into())); 5],
            coordinator(vec![]),
        ),
    );
    assert!(wait_until(SEC, || h.status().sessions_healthy == 1).await);
    assert_eq!(h.transport.dial_count(), 6);
    h.stop().await;
}

// ---------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn backoff_grows_and_resets_only_after_a_healthy_session() {
    let mut cfg = config();
    cfg.retry_initial_backoff = SEC;
    cfg.retry_max_backoff = 1000 * SEC;
    let refused = || Plan::Fail(DialError::Refused("x".into()));
    // Upgrades and welcomes, then dies before any snapshot.
    let unhealthy = || Plan::Session {
        replies: vec![
            Reply::Msg(welcome()),
            Reply::Fail(SessionError::Io("reset".into())),
        ],
        answer_pings: true,
    };
    let healthy_then_dies = Plan::Session {
        replies: vec![
            Reply::Msg(welcome()),
            Reply::Msg(snapshot(vec![])),
            Reply::Fail(SessionError::Io("reset".into())),
        ],
        answer_pings: true,
    };
    let plans = vec![
        refused(),
        refused(),
        refused(),
        unhealthy(),
        unhealthy(),
        healthy_then_dies,
        refused(),
    ];
    let h = start(cfg, FakeTransport::new(plans, Plan::Hang));
    assert!(wait_until(10 * MIN, || h.transport.dial_count() == 8).await);
    let t = h.transport.dials();
    let gaps: Vec<Duration> = t.windows(2).map(|w| w[1] - w[0]).collect();
    let within = |g: Duration, lo: u32, hi: u32| g >= SEC * lo / 2 && g <= SEC * hi;
    // Bases 1, 2, 4 s after refusals; the two sessions without a snapshot do
    // not reset: 8, 16 s; the healthy one does: 1 s, then 2 s.
    let expected = [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (1, 1), (2, 2)];
    for (i, (g, (lo, hi))) in gaps.iter().zip(expected).enumerate() {
        assert!(
            within(*g, lo, hi),
            "gap {i} = {g:?}, expected [{lo}/2, {hi}] s; all {gaps:?}"
        );
    }
    let st = h.status();
    assert_eq!(st.sessions_started, 3);
    assert_eq!(st.sessions_healthy, 1);
    h.stop().await;
}

// ---------------------------------------------------------------------------
// Ping watchdog
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_session_that_stops_answering_pings_is_dropped_after_two_intervals() {
    let h = start(
        config(),
        FakeTransport::new(vec![], coordinator(vec![peer(1)])),
    );
    assert!(wait_until(SEC, || h.status().sessions_healthy == 1).await);
    // Pongs take 100 ms: the watchdog must not need a third interval.
    *h.transport.session(0).pong_delay.lock().unwrap() = Duration::from_millis(100);
    // Healthy for a minute while pings are answered.
    tokio::time::sleep(MIN).await;
    assert_eq!(h.transport.dial_count(), 1);
    h.transport
        .session(0)
        .answer_pings
        .store(false, Ordering::SeqCst);
    let silent_from = Instant::now();
    assert!(wait_until(MIN, || h.transport.dial_count() == 2).await);
    let redial = h.transport.dials()[1];
    let detected = redial - silent_from;
    // Last pong up to one interval before the silence; dropped at two
    // intervals after it; then a reset backoff (<= 100 ms).
    assert!(
        detected >= 5 * SEC && detected <= 10 * SEC + Duration::from_millis(200),
        "{detected:?}"
    );
    assert_eq!(
        h.status().session_losses_by_kind.get("ping_timeout"),
        Some(&1)
    );
    // The peers were kept through the blip (lost, not removed).
    assert_eq!(h.dp.peer_events(), vec![Event::Upsert(key(1), false)]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn slow_pongs_do_not_drop_a_live_session() {
    let h = start(config(), FakeTransport::new(vec![], coordinator(vec![])));
    assert!(wait_until(SEC, || h.status().sessions_healthy == 1).await);
    // A round trip of 4.5 s against a 5 s ping interval.
    *h.transport.session(0).pong_delay.lock().unwrap() = Duration::from_millis(4500);
    tokio::time::sleep(10 * MIN).await;
    assert_eq!(h.transport.dial_count(), 1, "{:?}", h.status());
    assert!(h.status().session_losses_by_kind.is_empty());
    h.stop().await;
}

// ---------------------------------------------------------------------------
// Lifecycle through the driver
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn peers_expire_while_disconnected_and_are_rebuilt_on_recoordination() {
    let h = start(
        config(),
        FakeTransport::new(vec![], coordinator(vec![peer(1), peer(2), peer(4)])),
    );
    assert!(wait_until(SEC, || h.status().sessions_healthy == 1).await);
    let t_lost = Instant::now();
    // Peer 4 keeps handshaking; peer 2 handshook 10 minutes into the outage.
    h.dp.alive.lock().unwrap().insert(key(4));
    h.dp.handshakes
        .lock()
        .unwrap()
        .insert(key(2), (t_lost + 10 * MIN).into_std());
    h.transport
        .set_default(Plan::Fail(DialError::Refused("down".into())));
    h.transport
        .session(0)
        .fail(SessionError::Io("reset".into()));

    tokio::time::sleep(15 * MIN - SEC).await;
    assert_eq!(
        h.dp.peer_events().len(),
        3,
        "nothing removed before the timeout"
    );
    tokio::time::sleep(2 * SEC).await;
    assert_eq!(
        h.dp.peer_events()[3..],
        [Event::Remove(key(1))],
        "peer 1 expired at the timeout, while the loop was dialling"
    );
    tokio::time::sleep(10 * MIN).await;
    assert_eq!(
        h.dp.peer_events()[3..],
        [Event::Remove(key(1)), Event::Remove(key(2))]
    );
    assert!(h.transport.dial_count() > 50, "kept dialling throughout");

    let mut changed2 = peer(2);
    changed2.endpoints = vec!["203.0.113.2:9".parse().unwrap()];
    h.transport.set_default(coordinator(vec![
        peer(1),
        changed2.clone(),
        peer(4),
        peer(5),
    ]));
    assert!(wait_until(MIN, || h.status().sessions_healthy == 2).await);
    assert_eq!(
        h.dp.peer_events()[5..],
        [
            Event::Upsert(key(1), true),
            Event::Upsert(key(2), true),
            Event::Upsert(key(5), false)
        ],
        "expired peers rebuilt fresh, peer 4 untouched"
    );
    assert_eq!(
        h.dp.upserted.lock().unwrap().last().unwrap().node_key,
        key(5)
    );
    assert!(h.dp.upserted.lock().unwrap().contains(&changed2));
    assert_eq!(h.directory.counts().connected, 4);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn peer_updates_reach_the_data_plane() {
    let h = start(
        config(),
        FakeTransport::new(vec![], coordinator(vec![peer(1), peer(2)])),
    );
    assert!(wait_until(SEC, || h.status().sessions_healthy == 1).await);
    let s = h.transport.session(0);
    s.push(ServerMessage::PeerUpdate {
        kind: UpdateKind::Node,
        peer: peer(3),
    });
    s.push(ServerMessage::PeerUpdate {
        kind: UpdateKind::Disconnected,
        peer: peer(1),
    });
    let mut lost = peer(2);
    lost.status = PeerStatus::Lost;
    s.push(ServerMessage::PeerUpdate {
        kind: UpdateKind::Lost,
        peer: lost,
    });
    assert!(wait_until(SEC, || h.dp.peer_events().len() == 4).await);
    assert_eq!(
        h.dp.peer_events()[2..],
        [Event::Upsert(key(3), false), Event::Remove(key(1))]
    );
    // The lost peer goes after 15 minutes without handshakes (session still up).
    tokio::time::sleep(15 * MIN + SEC).await;
    assert_eq!(h.dp.peer_events()[4..], [Event::Remove(key(2))]);
    assert_eq!(h.transport.dial_count(), 1);
    h.stop().await;
}

// ---------------------------------------------------------------------------
// Graceful stop, endpoint updates, hello contents
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn graceful_stop_sends_goodbye_and_closes() {
    let h = start(config(), FakeTransport::new(vec![], coordinator(vec![])));
    assert!(wait_until(SEC, || h.status().sessions_healthy == 1).await);
    let transport = h.stop().await;
    let s = transport.session(0);
    let sent = s.sent();
    assert!(
        matches!(&sent[0], ClientMessage::Hello { auth_key, name, udp_port: 41641, version: 1, .. } if auth_key == "secret-auth-key" && name == "me")
    );
    assert_eq!(sent.last(), Some(&ClientMessage::Goodbye));
    assert!(s.closed.load(Ordering::SeqCst));
    assert_eq!(transport.dial_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn goodbye_is_bounded_when_the_connection_is_stuck() {
    let h = start(config(), FakeTransport::new(vec![], coordinator(vec![])));
    assert!(wait_until(SEC, || h.status().sessions_healthy == 1).await);
    h.transport
        .session(0)
        .stall_sends
        .store(true, Ordering::SeqCst);
    let t = Instant::now();
    h.stop().await;
    let took = Instant::now() - t;
    assert!(
        took >= SEC && took <= SEC + Duration::from_millis(100),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn endpoint_changes_are_reported() {
    let h = start(config(), FakeTransport::new(vec![], coordinator(vec![])));
    assert!(wait_until(SEC, || h.status().sessions_healthy == 1).await);
    let ep: SocketAddr = "192.0.2.99:41641".parse().unwrap();
    h.dp.endpoints.lock().unwrap().push(ep);
    let s = h.transport.session(0);
    assert!(
        wait_until(6 * SEC, || s.sent().contains(&ClientMessage::Update {
            endpoints: vec![ep]
        }))
        .await
    );
    // Reported once, not on every ping.
    tokio::time::sleep(MIN).await;
    let updates = s
        .sent()
        .iter()
        .filter(|m| matches!(m, ClientMessage::Update { .. }))
        .count();
    assert_eq!(updates, 1);
    h.stop().await;
}
