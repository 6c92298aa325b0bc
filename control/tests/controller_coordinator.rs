//! Controllers against the real coordinator on 127.0.0.1: two nodes see
//! each other, a graceful stop is a `disconnected` for the other node, and a
//! coordinator restart is survived (both redial and recoordinate). Real
//! sockets, real clock, short intervals, generous upper bounds only.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tailnode_control::controller::{
    ControlStatus, Controller, ControllerConfig, DataPlane, PeerDirectory, SelfInfo,
    WebSocketTransport,
};
use tailnode_control::coordinator::{AuthKeySource, CoordinatorConfig, serve};
use tailnode_control::proto::{NodeKey, PeerInfo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const TEST_TIMEOUT: Duration = Duration::from_secs(20);
const AUTH: &str = "interop-auth-key";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Upsert(NodeKey),
    Remove(NodeKey),
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
    present: Mutex<HashMap<NodeKey, PeerInfo>>,
}

impl DataPlane for Recorder {
    async fn set_self(&self, _me: SelfInfo) {}
    async fn upsert_peer(&self, peer: &PeerInfo, _fresh_session: bool) {
        self.events
            .lock()
            .unwrap()
            .push(Event::Upsert(peer.node_key));
        self.present
            .lock()
            .unwrap()
            .insert(peer.node_key, peer.clone());
    }
    async fn remove_peer(&self, key: &NodeKey) {
        self.events.lock().unwrap().push(Event::Remove(*key));
        self.present.lock().unwrap().remove(key);
    }
    async fn last_handshakes(&self) -> HashMap<NodeKey, Instant> {
        HashMap::new()
    }
    fn endpoints(&self) -> Vec<SocketAddr> {
        Vec::new()
    }
}

struct Node {
    key: NodeKey,
    dp: Arc<Recorder>,
    status: watch::Receiver<ControlStatus>,
    directory: PeerDirectory,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

fn node_key(seed: u8) -> NodeKey {
    let secret = x25519_dalek::StaticSecret::from([seed; 32]);
    NodeKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
}

fn start_node(addr: SocketAddr, seed: u8, name: &str) -> Node {
    let key = node_key(seed);
    let mut cfg = ControllerConfig::new(
        format!("http://{addr}").parse().unwrap(),
        AUTH.into(),
        key,
        name.into(),
        41641,
    );
    cfg.dial_timeout = Duration::from_secs(2);
    cfg.retry_initial_backoff = Duration::from_millis(20);
    cfg.retry_max_backoff = Duration::from_millis(200);
    cfg.ping_interval = Duration::from_millis(200);
    let dp = Arc::new(Recorder::default());
    let controller = Controller::new(cfg, WebSocketTransport::new(None).unwrap(), Arc::clone(&dp));
    let status = controller.status();
    let directory = controller.directory();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(controller.run(cancel.clone()));
    Node {
        key,
        dp,
        status,
        directory,
        cancel,
        task,
    }
}

impl Node {
    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(TEST_TIMEOUT, self.task)
            .await
            .unwrap()
            .unwrap();
    }

    fn has(&self, other: &NodeKey) -> bool {
        self.dp.present.lock().unwrap().contains_key(other)
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Coordinator {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

async fn start_coordinator(listener: TcpListener, state: PathBuf) -> Coordinator {
    let mut cfg = CoordinatorConfig::new(AuthKeySource::Fixed(AUTH.into()), state);
    cfg.ping_interval = Duration::from_millis(200);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let task = tokio::spawn(async move {
        serve(cfg, listener, c).await.unwrap();
    });
    Coordinator { cancel, task }
}

#[tokio::test]
async fn two_nodes_coordinate_through_the_real_coordinator() {
    let dir = std::env::temp_dir().join(format!("tailnode-ctl-interop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("coordinator.json");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let coord = start_coordinator(listener, state.clone()).await;

    let a = start_node(addr, 1, "alpha");
    let b = start_node(addr, 2, "beta");
    eventually("a sees b", || a.has(&b.key)).await;
    eventually("b sees a", || b.has(&a.key)).await;
    let b_addrs = a.directory.resolve("beta.tailnet.internal").unwrap();
    let b_self = b.status.borrow().self_info.clone().unwrap();
    assert_eq!(b_addrs, (b_self.ipv4, b_self.ipv6));

    // Graceful stop: goodbye -> `disconnected` -> removed at once.
    let b_key = b.key;
    b.stop().await;
    eventually("a drops b after its goodbye", || !a.has(&b_key)).await;
    assert_eq!(
        a.dp.events.lock().unwrap().last(),
        Some(&Event::Remove(b_key))
    );

    // B comes back with the same key: same addresses.
    let b = start_node(addr, 2, "beta");
    eventually("a sees b again", || a.has(&b.key)).await;
    assert_eq!(a.directory.resolve("beta"), Some(b_addrs));

    // The coordinator restarts on the same port and state file.
    coord.cancel.cancel();
    tokio::time::timeout(TEST_TIMEOUT, coord.task)
        .await
        .unwrap()
        .unwrap();
    let healthy = |n: &Node| n.status.borrow().sessions_healthy;
    let (a_before, b_before) = (healthy(&a), healthy(&b));
    let listener = TcpListener::bind(addr).await.unwrap();
    let coord = start_coordinator(listener, state).await;
    eventually("both recoordinate", || {
        healthy(&a) > a_before && healthy(&b) > b_before
    })
    .await;
    eventually("a sees b after the restart", || a.has(&b.key)).await;
    eventually("b sees a after the restart", || b.has(&a.key)).await;
    assert_eq!(
        a.directory.resolve("beta"),
        Some(b_addrs),
        "stable addresses"
    );
    assert!(!a.task.is_finished() && !b.task.is_finished());

    a.stop().await;
    b.stop().await;
    coord.cancel.cancel();
    let _ = coord.task.await;
    let _ = std::fs::remove_dir_all(&dir);
}
