//! SOCKS5 reply codes from a real node for each kind of failure, and the
//! direct-egress policy, with a real SOCKS client (tokio-socks).

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use tailnode_tests::process::{Proc, TempDir, WgPeer, wg_quick};
use tailnode_tests::transfer::{run_client, start_server};
use tailnode_tests::{free_tcp_port, free_udp_port, wait_for_tcp};
use tailnode_wg::PrivateKey;
use tokio_socks::Error as SocksError;
use tokio_socks::tcp::Socks5Stream;

struct Node {
    _proc: Proc,
    socks: SocketAddr,
}

/// Node A with peers: B (a real node, exposing a transfer server on 7000),
/// C (no endpoint), D (an endpoint nobody answers on).
async fn start(dir: &TempDir, name: &str, extra: &[&str]) -> (Node, Proc, SocketAddr) {
    let (service, _server) = start_server("127.0.0.1:0".parse().unwrap()).await;
    std::mem::forget(_server);
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (ua, ub, silent) = (free_udp_port(), free_udp_port(), free_udp_port());
    let peer = |key: &PrivateKey, ip: &str, endpoint: Option<String>| WgPeer {
        public_key: key.public_key(),
        allowed_ips: vec![format!("{ip}/32")],
        endpoint,
        persistent_keepalive: None,
    };
    let conf_a = wg_quick(
        &ka,
        &["100.64.9.1/32"],
        ua,
        &[
            peer(&kb, "100.64.9.2", Some(format!("127.0.0.1:{ub}"))),
            peer(&PrivateKey::generate(), "100.64.9.3", None),
            peer(
                &PrivateKey::generate(),
                "100.64.9.4",
                Some(format!("127.0.0.1:{silent}")),
            ),
        ],
    );
    let conf_b = wg_quick(
        &kb,
        &["100.64.9.2/32"],
        ub,
        &[peer(&ka, "100.64.9.1", None)],
    );
    let pa = dir.write(&format!("{name}-a.conf"), &conf_a);
    let pb = dir.write(&format!("{name}-b.conf"), &conf_b);
    let b = Proc::tailnode(
        &format!("{name}-b"),
        dir,
        &[
            "up".into(),
            "--wg-config".into(),
            pb.display().to_string(),
            "--socks5".into(),
            "off".into(),
            "--api".into(),
            "off".into(),
            "--expose".into(),
            format!("7000={service}"),
        ],
    );
    let socks: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let mut args = vec![
        "up".to_string(),
        "--wg-config".into(),
        pa.display().to_string(),
        "--socks5".into(),
        socks.to_string(),
        "--api".into(),
        "off".into(),
        "--connect-timeout".into(),
        "1s".into(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_string()));
    let a = Proc::tailnode(&format!("{name}-a"), dir, &args);
    wait_for_tcp(socks, Duration::from_secs(20)).await;
    (Node { _proc: a, socks }, b, service)
}

async fn connect(
    node: &Node,
    target: &str,
) -> Result<Socks5Stream<tokio::net::TcpStream>, SocksError> {
    tokio::time::timeout(
        Duration::from_secs(10),
        Socks5Stream::connect(node.socks, target),
    )
    .await
    .expect("the proxy answers within its connect timeout")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_gets_its_reply_code_and_direct_egress_is_a_policy() {
    tailnode_tests::init_tracing();
    let dir = TempDir::new("socks-replies");
    let (a, _b, service) = start(&dir, "strict", &[]).await;

    // Works: a tailnet destination, bytes checked.
    let s = connect(&a, "100.64.9.2:7000").await.unwrap();
    run_client(s, 1 << 20, 1 << 20, 1).await.unwrap();
    // 05 connection refused: nothing listens there (RST from B's netstack).
    assert!(matches!(
        connect(&a, "100.64.9.2:7001").await,
        Err(SocksError::ConnectionRefused)
    ));
    // 04 host unreachable: the peer has no endpoint.
    assert!(matches!(
        connect(&a, "100.64.9.3:80").await,
        Err(SocksError::HostUnreachable)
    ));
    // 06 TTL expired: the peer never answers, the connect times out.
    assert!(matches!(
        connect(&a, "100.64.9.4:80").await,
        Err(SocksError::TtlExpired)
    ));
    // 02 not allowed: outside the tailnet without --socks5-direct.
    assert!(matches!(
        connect(&a, &service.to_string()).await,
        Err(SocksError::ConnectionNotAllowedByRuleset)
    ));
    // 04 for a host name without direct egress (the host's DNS is not asked).
    assert!(matches!(
        connect(&a, "localhost:80").await,
        Err(SocksError::HostUnreachable)
    ));

    // With --socks5-direct, the same destination is reached from the host.
    let (direct, _b2, service2) = start(&dir, "direct", &["--socks5-direct"]).await;
    let s = connect(&direct, &service2.to_string()).await.unwrap();
    run_client(s, 1 << 20, 1 << 20, 2).await.unwrap();
    let s = connect(&direct, &format!("localhost:{}", service2.port()))
        .await
        .unwrap();
    run_client(s, 1 << 16, 1 << 16, 3).await.unwrap();
    // The tailnet still goes through the tunnel.
    let s = connect(&direct, "100.64.9.2:7000").await.unwrap();
    run_client(s, 1 << 20, 1 << 20, 4).await.unwrap();
}
