//! Interop with a WireGuard implementation we did not write: wireguard-go on
//! a TUN device in a network namespace, its kernel TCP/IP stack on the other
//! side of our netstack. Needs root (CI runs as root).

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use tailnode_tests::netns::{Slot, WireguardGo, require_root};
use tailnode_tests::process::{Proc, TempDir};
use tailnode_tests::transfer::{run_client, start_server};
use tailnode_tests::{free_tcp_port, free_udp_port, retry, testkit_bin, wait_for_tcp};
use tailnode_wg::PrivateKey;
use tokio_socks::tcp::Socks5Stream;

const MIB: u64 = 1 << 20;
const SERVICE_IN_NS: u16 = 7100;
const EXPOSED: u16 = 7200;
const NOT_EXPOSED: u16 = 7300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnode_and_wireguard_go_both_ways_v4_and_v6() {
    require_root();
    tailnode_tests::init_tracing();
    let dir = TempDir::new("interop");
    let slot = Slot(11);
    let key = PrivateKey::generate();
    let udp = free_udp_port();
    let wg = WireguardGo::start(
        slot,
        &dir,
        key.public_key(),
        Some(SocketAddr::new(slot.host_underlay(), udp)),
    );
    // A transfer server on wireguard-go's side, on both tailnet addresses.
    let _server_in_ns = wg.serve_transfers(&dir, SERVICE_IN_NS);
    // A local service for the namespace to reach through --expose.
    let (local_service, _local) = start_server("127.0.0.1:0".parse().unwrap()).await;

    let conf = wg.node_config(&key, udp, Some(25));
    let conf_path = dir.write("node.conf", &conf);
    let socks: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let _node = Proc::tailnode(
        "node",
        &dir,
        &[
            "up".into(),
            "--wg-config".into(),
            conf_path.display().to_string(),
            "--socks5".into(),
            socks.to_string(),
            "--expose".into(),
            format!("{EXPOSED}={local_service}"),
        ],
    );
    wait_for_tcp(socks, Duration::from_secs(20)).await;

    // 1. Our node reaches the server on wireguard-go's side through SOCKS5.
    for (i, target) in [
        format!("{}:{SERVICE_IN_NS}", slot.peer_v4()),
        format!("[{}]:{SERVICE_IN_NS}", slot.peer_v6()),
    ]
    .iter()
    .enumerate()
    {
        // The server process in the namespace may still be starting.
        let stream = retry(50, Duration::from_millis(100), || {
            Socks5Stream::connect(socks, target.as_str())
        })
        .await
        .unwrap_or_else(|e| panic!("SOCKS5 connect to {target}: {e}\n{}", wg.dump()));
        tokio::time::timeout(
            Duration::from_secs(120),
            run_client(stream, 16 * MIB, 16 * MIB, 10 + i as u64),
        )
        .await
        .expect("transfer timed out")
        .unwrap_or_else(|e| panic!("transfer to {target}: {e:#}"));
    }

    // 2. The namespace reaches our exposed service, over IPv4 and IPv6.
    for (i, addr) in [
        format!("{}:{EXPOSED}", slot.node_v4()),
        format!("[{}]:{EXPOSED}", slot.node_v6()),
    ]
    .iter()
    .enumerate()
    {
        let out = wg.netns().exec_unchecked(&[
            testkit_bin().to_str().unwrap(),
            "client",
            addr,
            &(4 * MIB).to_string(),
            &(4 * MIB).to_string(),
            &(20 + i).to_string(),
        ]);
        assert!(
            out.status.success(),
            "client in the namespace -> {addr} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // 3. A port that is not exposed is refused at once (RST), not timed out.
    let out = wg.netns().exec_unchecked(&[
        testkit_bin().to_str().unwrap(),
        "client",
        &format!("{}:{NOT_EXPOSED}", slot.node_v4()),
        "1",
        "1",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a non-exposed port must not accept");
    assert!(
        stderr.contains("refused"),
        "expected connection refused, got: {stderr}"
    );

    // 4. Ping our tailnet addresses from the namespace, IPv4 and IPv6.
    for (flag, addr) in [("-4", slot.node_v4()), ("-6", slot.node_v6())] {
        let out = wg
            .netns()
            .exec_unchecked(&["ping", flag, "-c", "3", "-i", "0.2", "-W", "2", &addr]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("3 received"),
            "ping {addr} from the namespace: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
