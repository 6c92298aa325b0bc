//! Whole nodes on the simulated network (`tailnode::testing::sim`), on a paused clock: the
//! defining scenario of the project, end to end, in seconds of wall time.
//!
//! A coordinator and three [`Tailnode`]s run in this process. Their WireGuard sockets are
//! simulated sockets, their control connections simulated streams carrying the real websocket
//! protocol; everything else (engine, netstack, controller, registry) is the production code.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tailnode::dial::TargetAddr;
use tailnode::testing::sim::{SimConnector, SimNetwork};
use tailnode::{Config, PeerChange, Tailnode};
use tailnode_control::controller::ConnectionState;
use tailnode_control::coordinator::{AuthKeySource, CoordinatorConfig, CoordinatorServer};
use tailnode_tests::inproc::serve_transfers;
use tailnode_tests::process::TempDir;
use tailnode_tests::transfer::run_client;
use tailnode_wg::PrivateKey;
use tokio_util::sync::CancellationToken;

const AUTH_KEY: &str = "sim-auth-key";
const TRANSFER_PORT: u16 = 7000;
const WG_PORT: u16 = 41641;
/// Bytes each way per transfer.
const TRANSFER_BYTES: u64 = 256 * 1024;

fn coordinator_ip() -> IpAddr {
    IpAddr::from([198, 18, 0, 1])
}

fn node_ip(n: u8) -> IpAddr {
    IpAddr::from([198, 18, 0, 10 + n])
}

fn name(n: u8) -> String {
    format!("sim{n}")
}

struct SimTailnet {
    net: SimNetwork,
    nodes: Vec<Tailnode>,
    cancel: CancellationToken,
    _dir: TempDir,
}

impl SimTailnet {
    /// A coordinator on 198.18.0.1:443 and nodes `sim1..=sim3` on 198.18.0.11.., all with the
    /// production defaults (15-minute lost-peer timeout, 30 s dial timeout, 5 s pings).
    async fn start() -> Self {
        let net = SimNetwork::new(0x7a11);
        let dir = TempDir::new("sim");
        let cancel = CancellationToken::new();
        let coordinator_addr = SocketAddr::new(coordinator_ip(), 443);
        let mut coordinator = CoordinatorConfig::new(
            AuthKeySource::Fixed(AUTH_KEY.into()),
            dir.path().join("coordinator-state.json"),
        );
        coordinator.listen = coordinator_addr;
        let listener = net.listen(coordinator_addr).expect("listen");
        let server = CoordinatorServer::from_listener(coordinator, listener)
            .await
            .expect("coordinator");
        tokio::spawn(server.run(cancel.clone()));

        let mut nodes = Vec::new();
        for n in 1..=3u8 {
            let endpoint = SocketAddr::new(node_ip(n), WG_PORT);
            let config = Config {
                coordinator: Some(
                    format!("ws://{coordinator_addr}")
                        .parse()
                        .expect("coordinator url"),
                ),
                auth_key: Some(AUTH_KEY.into()),
                name: Some(name(n)),
                private_key: Some(PrivateKey::generate()),
                endpoints: vec![endpoint],
                ..Config::embedded()
            };
            let socket = net.bind(endpoint).expect("bind");
            let node = Tailnode::start_with(
                config,
                socket,
                SimConnector::new(&net, node_ip(n)),
                cancel.clone(),
            )
            .await
            .expect("start node");
            serve_transfers(&node.handle(), TRANSFER_PORT);
            nodes.push(node);
        }
        SimTailnet {
            net,
            nodes,
            cancel,
            _dir: dir,
        }
    }

    fn blackhole_coordinator(&self, blackholed: bool) {
        for n in 1..=3 {
            self.net
                .set_blackholed(coordinator_ip(), node_ip(n), blackholed);
        }
    }

    /// The coordinated peers of node `i` (0-based) and their lifecycle states.
    async fn peer_states(&self, i: usize) -> Vec<(String, String)> {
        let mut states: Vec<_> = self.nodes[i]
            .status()
            .await
            .peers
            .into_iter()
            .map(|p| (p.name.unwrap_or_default(), p.state))
            .collect();
        states.sort();
        states
    }

    /// Waits (on the simulated clock, 1 s steps, at most `limit`) until every node has the two
    /// others as active peers; panics with the states otherwise.
    async fn wait_until_meshed(&self, limit: Duration) {
        let started = tokio::time::Instant::now();
        loop {
            let mut meshed = true;
            let mut seen = Vec::new();
            for i in 0..self.nodes.len() {
                let states = self.peer_states(i).await;
                meshed &= states.len() == 2 && states.iter().all(|(_, s)| s == "active");
                seen.push(states);
            }
            if meshed {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "no full mesh after {limit:?} of simulated time: {seen:?}"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Each node sends to and receives from the next, by peer name; both directions hashed.
    async fn exchange_bytes(&self, seed: u64) {
        for i in 0..self.nodes.len() {
            let to = (i + 1) % self.nodes.len();
            let target = TargetAddr::Domain(name(to as u8 + 1), TRANSFER_PORT);
            let (stream, _) = self.nodes[i]
                .dialer()
                .dial(&target)
                .await
                .unwrap_or_else(|e| panic!("sim{} -> {target}: {e}", i + 1));
            let report = run_client(stream, TRANSFER_BYTES, TRANSFER_BYTES, seed + i as u64)
                .await
                .unwrap_or_else(|e| panic!("sim{} -> {target}: {e:#}", i + 1));
            assert_eq!(
                (report.uploaded, report.downloaded),
                (TRANSFER_BYTES, TRANSFER_BYTES)
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn nodes_recoordinate_after_the_coordinator_was_blackholed_past_the_lost_peer_timeout() {
    let started = tokio::time::Instant::now();
    let tailnet = SimTailnet::start().await;
    tailnet.wait_until_meshed(Duration::from_secs(60)).await;
    tailnet.exchange_bytes(1).await;

    let mut changes = tailnet.nodes[0].peer_changes().expect("coordinated");
    // The coordinator vanishes without a FIN: sessions go silent, dials time out.
    tailnet.blackhole_coordinator(true);
    tokio::time::sleep(Duration::from_secs(16 * 60)).await;
    for (i, node) in tailnet.nodes.iter().enumerate() {
        let control = node.control_status().expect("coordinated").borrow().clone();
        assert_ne!(
            control.state,
            ConnectionState::Stopped,
            "the retry loop ended"
        );
        assert!(
            control
                .dial_failures_by_kind
                .get("timeout")
                .copied()
                .unwrap_or(0)
                >= 3,
            "sim{}: dials should have failed by timeout while blackholed: {:?}",
            i + 1,
            control.dial_failures_by_kind
        );
        let states = tailnet.peer_states(i).await;
        assert!(
            states.len() == 2 && states.iter().all(|(_, s)| s == "expired"),
            "sim{}: peers not expired after 16 minutes without coordination: {states:?}",
            i + 1
        );
        let target = TargetAddr::Domain(name(((i + 1) % 3) as u8 + 1), TRANSFER_PORT);
        assert!(
            node.dialer().dial(&target).await.is_err(),
            "an expired peer is out of the data plane"
        );
    }
    tokio::time::sleep(Duration::from_secs(4 * 60)).await;

    // 20 minutes later the coordinator is back: no restart, the nodes find it and each other.
    tailnet.blackhole_coordinator(false);
    tailnet.wait_until_meshed(Duration::from_secs(120)).await;
    tailnet.exchange_bytes(100).await;

    // What sim1's controller did to its peers: both removed (expired), then rebuilt with a
    // new WireGuard session.
    let (mut removed, mut rebuilt) = (Vec::new(), Vec::new());
    while let Ok(change) = changes.try_recv() {
        match change {
            PeerChange::Removed { public_key } => removed.push(public_key),
            PeerChange::Upserted {
                public_key,
                fresh_session: true,
                ..
            } => rebuilt.push(public_key),
            PeerChange::Upserted { .. } => {}
        }
    }
    let mut others: Vec<_> = tailnet.nodes[1..]
        .iter()
        .map(Tailnode::public_key)
        .collect();
    others.sort_by_key(|k| k.to_base64());
    for list in [&mut removed, &mut rebuilt] {
        list.sort_by_key(|k| k.to_base64());
        list.dedup();
    }
    assert_eq!(removed, others, "sim1 removed its expired peers");
    assert_eq!(rebuilt, others, "sim1 rebuilt them with fresh sessions");

    for node in &tailnet.nodes {
        let control = node.control_status().expect("coordinated").borrow().clone();
        assert!(
            control.sessions_healthy >= 2,
            "a second healthy session: {control:?}"
        );
    }
    eprintln!(
        "simulated {:?}; datagrams {:?}; sim1 control: {:?}",
        started.elapsed(),
        tailnet.net.counters(),
        tailnet.nodes[0]
            .control_status()
            .map(|s| s.borrow().clone())
    );
    tailnet.cancel.cancel();
    for node in tailnet.nodes {
        node.shutdown().await;
    }
}
