//! (f) Node A in its own network namespace; an nftables rule there drops its
//! packets to the coordinator, so its connects time out in the kernel (the
//! reference failure); the rule is deleted and A recovers without a restart.
//! Needs root (CI runs as root).

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tailnode_tests::control::{CoordinatorProc, NodeOptions, NodeProc, peer_in_state};
use tailnode_tests::netns::{LinkedNetns, Slot, require_root};
use tailnode_tests::process::TempDir;
use tailnode_tests::transfer::start_server;
use tailnode_tests::{free_tcp_port, testkit_bin};

const KEY: &str = "netns-key";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_drop_of_coordinator_packets_then_recovery_without_restart() {
    require_root();
    tailnode_tests::init_tracing();
    let dir = TempDir::new("cp-netns");
    let link = LinkedNetns::new(Slot(21));
    let ns = &link.netns;
    let coord_addr = SocketAddr::new(link.slot.host_underlay(), free_tcp_port());
    let coord = CoordinatorProc::start(&dir, "coordinator", coord_addr, KEY).await;

    let (service, _server) = start_server("127.0.0.1:0".parse().unwrap()).await;
    let b = NodeProc::start(
        &dir,
        NodeOptions {
            name: "b",
            coordinator: coord.url(),
            auth_key: KEY,
            socks: false,
            extra: vec!["--expose".into(), format!("7000={service}")],
            netns: None,
            udp_port: None,
        },
    )
    .await;
    let b_status = b
        .wait_status(Duration::from_secs(15), "to join", |s| {
            s.node.control.state == "connected"
        })
        .await;
    let b_v4 = b_status
        .node
        .addresses
        .iter()
        .find(|ip| ip.is_ipv4())
        .copied()
        .unwrap();

    // A lives in the namespace; a forward there reaches B's exposed service.
    let forward_port = 17000;
    let a = NodeProc::start(
        &dir,
        NodeOptions {
            name: "a",
            coordinator: coord.url(),
            auth_key: KEY,
            socks: false,
            extra: vec![
                "--forward".into(),
                format!("tcp:127.0.0.1:{forward_port}={b_v4}:7000"),
            ],
            netns: Some(&ns.name),
            udp_port: None,
        },
    )
    .await;
    a.wait_status(Duration::from_secs(15), "peer b", |s| {
        peer_in_state(s, "b", "active")
    })
    .await;
    let transfer = |seed: u64| {
        ns.exec_unchecked(&[
            testkit_bin().to_str().unwrap(),
            "client",
            &format!("127.0.0.1:{forward_port}"),
            "1048576",
            "1048576",
            &seed.to_string(),
        ])
    };
    let first = transfer(1);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );

    // Drop every packet from A to the coordinator inside A's namespace.
    let IpAddr::V4(coord_ip) = coord_addr.ip() else {
        unreachable!()
    };
    ns.exec(&["nft", "add", "table", "inet", "tailnode_test"]);
    ns.exec(&[
        "nft",
        "add",
        "chain",
        "inet",
        "tailnode_test",
        "out",
        "{ type filter hook output priority 0 ; }",
    ]);
    ns.exec(&[
        "nft",
        "add",
        "rule",
        "inet",
        "tailnode_test",
        "out",
        "ip",
        "daddr",
        &coord_ip.to_string(),
        "tcp",
        "dport",
        &coord_addr.port().to_string(),
        "drop",
    ]);
    let dark = a
        .wait_status(Duration::from_secs(20), "repeated dial timeouts", |s| {
            s.node
                .control
                .dial_failures
                .get("timeout")
                .copied()
                .unwrap_or(0)
                >= 3
        })
        .await;
    assert_ne!(dark.node.control.state, "connected");
    assert_ne!(dark.node.control.state, "stopped");
    // The data plane keeps running meanwhile.
    let during = transfer(2);
    assert!(
        during.status.success(),
        "{}",
        String::from_utf8_lossy(&during.stderr)
    );

    ns.exec(&["nft", "delete", "table", "inet", "tailnode_test"]);
    let pid = a.proc.pid();
    a.wait_status(Duration::from_secs(20), "recovery", |s| {
        s.node.control.state == "connected" && peer_in_state(s, "b", "active")
    })
    .await;
    let after = transfer(3);
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
    assert_eq!(a.proc.pid(), pid, "not restarted");
}
