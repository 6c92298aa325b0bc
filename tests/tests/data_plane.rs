//! Two `tailnode` processes on loopback, configured from wg-quick files:
//! bulk transfers through SOCKS5 and through a port forward, checked with
//! SHA-256 in both directions, and many concurrent connections.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use tailnode_tests::process::{Proc, TempDir, WgPeer, wg_quick};
use tailnode_tests::transfer::{run_client, start_server};
use tailnode_tests::{free_tcp_port, free_udp_port, wait_for_tcp};
use tailnode_wg::PrivateKey;
use tokio_socks::tcp::Socks5Stream;

const MIB: u64 = 1 << 20;

/// Node A (SOCKS5 + a forward) and node B (exposing a transfer server), as
/// two processes.
struct Pair {
    _dir: TempDir,
    a: Proc,
    b: Proc,
    socks: SocketAddr,
    forward: SocketAddr,
    service_port: u16,
}

async fn start_pair(name: &str) -> Pair {
    let dir = TempDir::new(name);
    let (server_addr, _server) = start_server("127.0.0.1:0".parse().unwrap()).await;
    std::mem::forget(_server); // lives as long as the test's runtime
    let key_a = PrivateKey::generate();
    let key_b = PrivateKey::generate();
    let (udp_a, udp_b) = (free_udp_port(), free_udp_port());
    let conf_a = wg_quick(
        &key_a,
        &["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
        udp_a,
        &[WgPeer {
            public_key: key_b.public_key(),
            allowed_ips: vec!["100.64.0.2/32".into(), "fd7a:115c:a1e0::2/128".into()],
            endpoint: Some(format!("127.0.0.1:{udp_b}")),
            persistent_keepalive: None,
        }],
    );
    let conf_b = wg_quick(
        &key_b,
        &["100.64.0.2/32", "fd7a:115c:a1e0::2/128"],
        udp_b,
        &[WgPeer {
            public_key: key_a.public_key(),
            allowed_ips: vec!["100.64.0.1/32".into(), "fd7a:115c:a1e0::1/128".into()],
            endpoint: Some(format!("[::1]:{udp_a}")),
            persistent_keepalive: Some(25),
        }],
    );
    let path_a = dir.write("a.conf", &conf_a);
    let path_b = dir.write("b.conf", &conf_b);
    let socks: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let forward: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let service_port = 7000;
    let b = Proc::tailnode(
        "node-b",
        &dir,
        &[
            "up".into(),
            "--wg-config".into(),
            path_b.display().to_string(),
            "--socks5".into(),
            "off".into(),
            "--expose".into(),
            format!("{service_port}={server_addr}"),
        ],
    );
    let a = Proc::tailnode(
        "node-a",
        &dir,
        &[
            "up".into(),
            "--wg-config".into(),
            path_a.display().to_string(),
            "--socks5".into(),
            socks.to_string(),
            "--forward".into(),
            format!("tcp:{forward}=100.64.0.2:{service_port}"),
        ],
    );
    wait_for_tcp(socks, Duration::from_secs(20)).await;
    wait_for_tcp(forward, Duration::from_secs(20)).await;
    Pair {
        _dir: dir,
        a,
        b,
        socks,
        forward,
        service_port,
    }
}

async fn via_socks(pair: &Pair, target: &str, up: u64, down: u64, seed: u64) {
    let stream = tokio::time::timeout(
        Duration::from_secs(20),
        Socks5Stream::connect(pair.socks, target),
    )
    .await
    .expect("SOCKS5 connect timed out")
    .expect("SOCKS5 connect");
    tokio::time::timeout(Duration::from_secs(120), run_client(stream, up, down, seed))
        .await
        .expect("transfer timed out")
        .expect("transfer through SOCKS5");
}

async fn via_forward(pair: &Pair, up: u64, down: u64, seed: u64) {
    let stream = tokio::net::TcpStream::connect(pair.forward).await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), run_client(stream, up, down, seed))
        .await
        .expect("transfer timed out")
        .expect("transfer through the forward");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_64_mib_each_way_through_socks5_and_forward() {
    tailnode_tests::init_tracing();
    let mut pair = start_pair("bulk").await;
    let target = format!("100.64.0.2:{}", pair.service_port);
    via_socks(&pair, &target, 64 * MIB, 64 * MIB, 1).await;
    via_forward(&pair, 64 * MIB, 64 * MIB, 2).await;
    // IPv6 inside the tunnel as well.
    let target6 = format!("[fd7a:115c:a1e0::2]:{}", pair.service_port);
    via_socks(&pair, &target6, 8 * MIB, 8 * MIB, 3).await;
    assert!(pair.a.is_running() && pair.b.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_connections_all_checked() {
    tailnode_tests::init_tracing();
    let pair = start_pair("concurrent").await;
    let target = format!("100.64.0.2:{}", pair.service_port);
    // Warm up the handshake so that the 50 connections start together.
    via_socks(&pair, &target, 1024, 1024, 99).await;
    let pair = std::sync::Arc::new(pair);
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let pair = pair.clone();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let (up, down) = (MIB + i * 4099, MIB / 2 + i * 7919);
            if i % 5 == 0 {
                via_forward(&pair, up, down, 1000 + i).await;
            } else {
                via_socks(&pair, &target, up, down, 1000 + i).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("connection task");
    }
}
