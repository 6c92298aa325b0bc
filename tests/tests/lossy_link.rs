//! A lossy underlay between tailnode and a foreign WireGuard peer
//! (wireguard-go in a network namespace; nftables drops a share of the UDP
//! datagrams both ways at random): transfers through SOCKS5 in both
//! directions still arrive byte for byte, over IPv4 and IPv6. Needs root (CI runs as root).

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use tailnode_tests::netns::{Slot, WireguardGo, require_root};
use tailnode_tests::process::{Proc, TempDir};
use tailnode_tests::transfer::run_client;
use tailnode_tests::{free_tcp_port, free_udp_port, retry, wait_for_tcp};
use tailnode_wg::PrivateKey;
use tokio_socks::tcp::Socks5Stream;

const MIB: u64 = 1 << 20;
const SERVICE_IN_NS: u16 = 7100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_survive_random_loss_both_ways() {
    require_root();
    tailnode_tests::init_tracing();
    let dir = TempDir::new("lossy");
    let slot = Slot(41);
    let key = PrivateKey::generate();
    let udp = free_udp_port();
    let wg = WireguardGo::start(
        slot,
        &dir,
        key.public_key(),
        Some(SocketAddr::new(slot.host_underlay(), udp)),
    );
    let _server_in_ns = wg.serve_transfers(&dir, SERVICE_IN_NS);
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
        ],
    );
    wait_for_tcp(socks, Duration::from_secs(20)).await;

    // 2% on IPv4, then 5% on IPv6 (each costs smoltcp retransmission
    // timeouts: see the netstack's limitations; the time is printed).
    let cases = [
        (20u32, format!("{}:{SERVICE_IN_NS}", slot.peer_v4())),
        (50, format!("[{}]:{SERVICE_IN_NS}", slot.peer_v6())),
    ];
    for (i, (per_mille, target)) in cases.into_iter().enumerate() {
        let name = format!("{}.{}% UDP loss each way", per_mille / 10, per_mille % 10);
        wg.link().udp_loss(per_mille);
        // Connects are retried: the first SYN (or the handshake before
        // it) may be lost, and the server may still be starting.
        let stream = retry(20, Duration::from_millis(500), || async {
            match tokio::time::timeout(
                Duration::from_secs(10),
                Socks5Stream::connect(socks, target.as_str()),
            )
            .await
            {
                Ok(connected) => connected.map_err(|e| e.to_string()),
                Err(_) => Err("timed out".to_string()),
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{name}: SOCKS5 connect to {target}: {e}\n{}", wg.dump()));
        let started = std::time::Instant::now();
        tokio::time::timeout(
            Duration::from_secs(120),
            run_client(stream, 4 * MIB, 4 * MIB, 40 + i as u64),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: transfer to {target} timed out"))
        .unwrap_or_else(|e| panic!("{name}: transfer to {target}: {e:#}"));
        eprintln!(
            "{name}: 4 MiB each way with {target} in {:?}",
            started.elapsed()
        );
        let dropped = wg.link().udp_dropped();
        assert!(dropped > 0, "{name}: the loss rules dropped nothing");
        eprintln!("{name}: {dropped} datagrams dropped");
    }
}
