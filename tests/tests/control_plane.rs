//! The control plane end to end: a real coordinator, real nodes, a
//! controllable TCP proxy in front of the coordinator and UDP relays in the
//! WireGuard paths, shortened timers from the command line, and real SOCKS5
//! transfers checked with SHA-256.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tailnode_tests::control::{
    CoordinatorProc, LOST_PEER_TIMEOUT, NodeOptions, NodeProc, peer, peer_in_state,
};
use tailnode_tests::process::TempDir;
use tailnode_tests::relay::{Mode, TcpProxy, UdpRelay};
use tailnode_tests::transfer::{run_client, start_server};
use tokio_socks::tcp::Socks5Stream;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "test-auth-key";
const MIB: u64 = 1 << 20;

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// One checked transfer from `from` to `target` (e.g. "b:7000") through SOCKS5.
async fn transfer(from: &NodeProc, target: &str, bytes: u64, seed: u64) -> anyhow::Result<()> {
    let socks = from.socks.expect("node has SOCKS5");
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        Socks5Stream::connect(socks, target),
    )
    .await??;
    tokio::time::timeout(
        Duration::from_secs(60),
        run_client(stream, bytes, bytes, seed),
    )
    .await??;
    Ok(())
}

/// Retries a transfer until it works (bounded), for paths that are recovering.
async fn transfer_eventually(
    from: &NodeProc,
    target: &str,
    bytes: u64,
    seed: u64,
    within: Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match transfer(from, target, bytes, seed).await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "transfer not yet possible");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!(
                "{}: transfer to {target} never worked: {e:#}\n{}",
                from.name,
                from.proc.log()
            ),
        }
    }
}

fn expose(port: u16, service: SocketAddr) -> Vec<String> {
    vec!["--expose".into(), format!("{port}={service}")]
}

/// (a) The reference scenario: A's control path and its WireGuard path to B
/// are blackholed for longer than the lost-peer timeout, so A's dials time
/// out again and again and B expires on A. When the blackhole is lifted, A
/// recoordinates on its own — nothing restarted — and reaches B by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_scenario_blackhole_longer_than_lost_peer_timeout_then_recover() {
    tailnode_tests::init_tracing();
    let dir = TempDir::new("cp-reference");
    let (service, _server) = start_server(localhost()).await;
    let coord = CoordinatorProc::start(&dir, "coordinator", localhost(), KEY).await;
    let control_a = TcpProxy::start(coord.addr).await;

    // Both WireGuard paths cross relays that the nodes advertise as their endpoints.
    let port_a = tailnode_tests::free_udp_port();
    let port_b = tailnode_tests::free_udp_port();
    let relay_a = UdpRelay::start(SocketAddr::from(([127, 0, 0, 1], port_a))).await;
    let relay_b = UdpRelay::start(SocketAddr::from(([127, 0, 0, 1], port_b))).await;
    let node = |name: &'static str,
                url: String,
                port: u16,
                relay: SocketAddr,
                socks: bool,
                extra: Vec<String>| {
        let mut extra = extra;
        extra.extend(["--endpoint".into(), relay.to_string()]);
        NodeOptions {
            name,
            coordinator: url,
            auth_key: KEY,
            socks,
            extra,
            netns: None,
            udp_port: Some(port),
        }
    };
    let _b = NodeProc::start(
        &dir,
        node(
            "b",
            coord.url(),
            port_b,
            relay_b.addr(),
            false,
            expose(7000, service),
        ),
    )
    .await;
    let a = NodeProc::start(
        &dir,
        node(
            "a",
            format!("ws://{}", control_a.addr()),
            port_a,
            relay_a.addr(),
            true,
            vec![],
        ),
    )
    .await;
    a.wait_status(Duration::from_secs(15), "peer b active", |s| {
        peer_in_state(s, "b", "active")
    })
    .await;
    transfer_eventually(&a, "b:7000", MIB, 1, Duration::from_secs(15)).await;
    let pid_a = a.proc.pid();

    // Blackhole A's control path and both WireGuard paths.
    control_a.set_mode(Mode::Blackhole);
    relay_a.set_mode(Mode::Blackhole);
    relay_b.set_mode(Mode::Blackhole);
    // A notices the silent session in seconds, then every dial times out.
    let during = a
        .wait_status(
            Duration::from_secs(30),
            "b to expire after repeated dial timeouts",
            |s| {
                peer_in_state(s, "b", "expired")
                    && s.node
                        .control
                        .dial_failures
                        .get("timeout")
                        .copied()
                        .unwrap_or(0)
                        >= 3
            },
        )
        .await;
    assert_ne!(during.node.control.state, "connected");
    assert_ne!(
        during.node.control.state, "stopped",
        "the retry loop must never stop on its own"
    );
    assert!(during.node.control.last_error.is_some());
    // Keep it dark a little longer: the loop keeps dialling.
    let dials_before = during.node.control.dials;
    tokio::time::sleep(LOST_PEER_TIMEOUT / 2).await;
    let later = a.status().await.unwrap();
    assert!(
        later.node.control.dials > dials_before,
        "still dialling: {later:?}"
    );

    // Lift the blackhole. Nothing is restarted.
    control_a.set_mode(Mode::Pass);
    relay_a.set_mode(Mode::Pass);
    relay_b.set_mode(Mode::Pass);
    a.wait_status(Duration::from_secs(20), "recoordination", |s| {
        s.node.control.state == "connected" && peer_in_state(s, "b", "active")
    })
    .await;
    transfer_eventually(&a, "b:7000", 4 * MIB, 2, Duration::from_secs(20)).await;
    assert_eq!(a.proc.pid(), pid_a, "A was not restarted");
}

/// (b) + (c) The coordinator is killed: an open connection keeps flowing and
/// a new one by address works; restarted, the nodes reconnect with the same
/// addresses and traffic by name resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_down_then_restarted() {
    tailnode_tests::init_tracing();
    let dir = TempDir::new("cp-restart");
    let (service, _server) = start_server(localhost()).await;
    let mut coord = CoordinatorProc::start(&dir, "coordinator", localhost(), KEY).await;
    let opts = |name, socks, extra| NodeOptions {
        name,
        coordinator: coord.url(),
        auth_key: KEY,
        socks,
        extra,
        netns: None,
        udp_port: None,
    };
    let b = NodeProc::start(&dir, opts("b", false, expose(7000, service))).await;
    let a = NodeProc::start(&dir, opts("a", true, vec![])).await;
    let before = a
        .wait_status(Duration::from_secs(15), "peer b active", |s| {
            peer_in_state(s, "b", "active")
        })
        .await;
    let b_before = b.status().await.unwrap();
    transfer_eventually(&a, "b:7000", MIB, 1, Duration::from_secs(15)).await;

    // An open connection, made before the outage.
    let open = Socks5Stream::connect(a.socks.unwrap(), "b:7000")
        .await
        .unwrap();
    coord
        .proc
        .signal_and_wait("KILL", Duration::from_secs(5))
        .expect("coordinator killed");
    a.wait_status(Duration::from_secs(10), "the session to drop", |s| {
        s.node.control.state != "connected"
    })
    .await;
    // (c) The open connection keeps flowing, and a new one by address works.
    run_client(open, 8 * MIB, 8 * MIB, 2)
        .await
        .expect("open connection during the outage");
    let b_addr = b_before
        .node
        .addresses
        .iter()
        .find(|ip| ip.is_ipv4())
        .unwrap();
    transfer(&a, &format!("{b_addr}:7000"), MIB, 3)
        .await
        .expect("new connection by address");

    // (b) Restart on the same port and state file.
    coord = coord.restart(&dir, "coordinator2", KEY).await;
    let _ = &coord;
    let after = a
        .wait_status(Duration::from_secs(20), "reconnect", |s| {
            s.node.control.state == "connected" && peer_in_state(s, "b", "active")
        })
        .await;
    assert_eq!(
        after.node.addresses, before.node.addresses,
        "A keeps its addresses"
    );
    let b_after = b
        .wait_status(Duration::from_secs(20), "B reconnects", |s| {
            s.node.control.state == "connected"
        })
        .await;
    assert_eq!(
        b_after.node.addresses, b_before.node.addresses,
        "B keeps its addresses"
    );
    transfer_eventually(&a, "b:7000", 2 * MIB, 4, Duration::from_secs(10)).await;
}

/// (d) A graceful stop is a disconnect (dropped at once); a kill is a loss
/// (kept until the lost-peer timeout, then expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goodbye_drops_at_once_kill_expires_after_timeout() {
    tailnode_tests::init_tracing();
    let dir = TempDir::new("cp-goodbye");
    let coord = CoordinatorProc::start(&dir, "coordinator", localhost(), KEY).await;
    let opts = |name| NodeOptions {
        name,
        coordinator: coord.url(),
        auth_key: KEY,
        socks: false,
        extra: vec![],
        netns: None,
        udp_port: None,
    };
    let a = NodeProc::start(&dir, opts("a")).await;
    let mut b = NodeProc::start(&dir, opts("b")).await;
    a.wait_status(Duration::from_secs(15), "peer b", |s| {
        peer_in_state(s, "b", "active")
    })
    .await;
    let status = b
        .proc
        .signal_and_wait("TERM", Duration::from_secs(10))
        .expect("b exits");
    assert_eq!(status.code(), Some(0));
    // Gone well before the lost-peer timeout could have removed it.
    a.wait_status(LOST_PEER_TIMEOUT / 2, "b to be dropped at once", |s| {
        peer(s, "b").is_none()
    })
    .await;

    let mut c = NodeProc::start(&dir, opts("c")).await;
    a.wait_status(Duration::from_secs(15), "peer c", |s| {
        peer_in_state(s, "c", "active")
    })
    .await;
    c.proc
        .signal_and_wait("KILL", Duration::from_secs(5))
        .expect("c killed");
    let lost = a
        .wait_status(Duration::from_secs(3), "c to be lost", |s| {
            peer_in_state(s, "c", "lost")
        })
        .await;
    assert!(peer(&lost, "c").unwrap().state_seconds.unwrap() < LOST_PEER_TIMEOUT.as_secs_f64());
    a.wait_status(
        LOST_PEER_TIMEOUT + Duration::from_secs(5),
        "c to expire",
        |s| peer_in_state(s, "c", "expired"),
    )
    .await;
}

/// (e) A wrong auth key is a clear error and the node keeps retrying; it
/// joins once the coordinator takes its key. Garbage, oversized frames and a
/// wrong version are refused while the other nodes keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_auth_key_retries_and_bad_clients_do_not_disturb_others() {
    tailnode_tests::init_tracing();
    let dir = TempDir::new("cp-auth");
    let (service, _server) = start_server(localhost()).await;
    let mut coord = CoordinatorProc::start(&dir, "coordinator", localhost(), "old-key").await;
    let coord_url = coord.url();
    let opts = |name, key, socks, extra| NodeOptions {
        name,
        coordinator: coord_url.clone(),
        auth_key: key,
        socks,
        extra,
        netns: None,
        udp_port: None,
    };
    let d = NodeProc::start(&dir, opts("d", "new-key", false, vec![])).await;
    let rejected = d
        .wait_status(Duration::from_secs(10), "rejections", |s| {
            s.node
                .control
                .dial_failures
                .get("rejected")
                .copied()
                .unwrap_or(0)
                >= 2
        })
        .await;
    let err = rejected.node.control.last_error.unwrap();
    assert!(
        err.message.contains("auth key"),
        "clear reason: {}",
        err.message
    );

    // The coordinator is restarted with the node's key: it joins on its own.
    coord.proc.signal_and_wait("TERM", Duration::from_secs(10));
    let _coord = coord.restart(&dir, "coordinator2", "new-key").await;
    d.wait_status(Duration::from_secs(15), "to join", |s| {
        s.node.control.state == "connected"
    })
    .await;

    // Two good nodes, then bad clients hammer the coordinator.
    let b = NodeProc::start(&dir, opts("b", "new-key", false, expose(7000, service))).await;
    let a = NodeProc::start(&dir, opts("a", "new-key", true, vec![])).await;
    let before = a
        .wait_status(Duration::from_secs(15), "peer b", |s| {
            peer_in_state(s, "b", "active")
        })
        .await;
    let url = format!("{coord_url}/tailnode/v1/node");
    let bad_frames: Vec<Message> = vec![
        Message::text("garbage{"),
        Message::text(format!(
            r#"{{"type":"hello","version":99,"auth_key":"new-key","node_key":"{}","name":"x","udp_port":1,"endpoints":[]}}"#,
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
        )),
        Message::text("x".repeat(200_000)),
        Message::binary(vec![1, 2, 3]),
    ];
    for frame in bad_frames {
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        let _ = ws.send(frame).await;
        // An error message (for frames it could read) and then a close.
        let answer = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
        match answer {
            Ok(Some(Ok(Message::Text(t)))) => assert!(t.contains(r#""type":"error""#), "{t}"),
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {}
            other => panic!("unexpected answer: {other:?}"),
        }
    }
    transfer(&a, "b:7000", MIB, 5)
        .await
        .expect("transfer after the bad clients");
    let after = a.status().await.unwrap();
    assert_eq!(after.node.control.state, "connected");
    assert_eq!(
        after.node.control.sessions_started, before.node.control.sessions_started,
        "A's session was not disturbed"
    );
    drop(b);
}

/// A restarted node keeps its key file, hence its name and addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_keeps_identity_from_its_key_file() {
    tailnode_tests::init_tracing();
    let dir = TempDir::new("cp-identity");
    let coord = CoordinatorProc::start(&dir, "coordinator", localhost(), KEY).await;
    let opts = || NodeOptions {
        name: "stable",
        coordinator: coord.url(),
        auth_key: KEY,
        socks: false,
        extra: vec![],
        netns: None,
        udp_port: None,
    };
    let mut first = NodeProc::start(&dir, opts()).await;
    let before = first
        .wait_status(Duration::from_secs(15), "to join", |s| {
            s.node.control.state == "connected"
        })
        .await;
    let key_file = dir.path().join("stable.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "key file created with mode 0600");
    first
        .proc
        .signal_and_wait("TERM", Duration::from_secs(10))
        .unwrap();
    let second = NodeProc::start(&dir, opts()).await;
    let after = second
        .wait_status(Duration::from_secs(15), "to rejoin", |s| {
            s.node.control.state == "connected"
        })
        .await;
    assert_eq!(after.node.public_key, before.node.public_key);
    assert_eq!(after.node.addresses, before.node.addresses);
    assert_eq!(after.node.name, before.node.name);
}
