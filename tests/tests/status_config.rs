//! `tailnode status --json` against reality, and configuration precedence
//! (file < TAILNODE_* environment < flags), with real processes.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use tailnode::api::ApiAddr;
use tailnode::status::Status;
use tailnode_tests::control::{CoordinatorProc, LOST_PEER_TIMEOUT, NodeOptions, NodeProc, peer};
use tailnode_tests::process::{Proc, TempDir};
use tailnode_tests::transfer::{run_client, start_server};
use tailnode_tests::{free_tcp_port, tailnode_bin, wait_for_tcp};
use tokio_socks::tcp::Socks5Stream;

const KEY: &str = "status-key";
const MIB: u64 = 1 << 20;

/// `tailnode status --json --api ...`, run as the user would.
fn status_cli(api: &ApiAddr) -> Status {
    let out = Command::new(tailnode_bin())
        .args(["status", "--json", "--api", &api.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is a status document")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_follows_reality() {
    tailnode_tests::init_tracing();
    let dir = TempDir::new("status");
    let (service, _server) = start_server("127.0.0.1:0".parse().unwrap()).await;
    let coord =
        CoordinatorProc::start(&dir, "coordinator", "127.0.0.1:0".parse().unwrap(), KEY).await;
    let opts = |name, socks, extra| NodeOptions {
        name,
        coordinator: coord.url(),
        auth_key: KEY,
        socks,
        extra,
        netns: None,
        udp_port: None,
    };
    let mut b = NodeProc::start(
        &dir,
        opts(
            "b",
            false,
            vec!["--expose".into(), format!("7000={service}")],
        ),
    )
    .await;
    let a = NodeProc::start(&dir, opts("a", true, vec![])).await;
    a.wait_status(Duration::from_secs(15), "peer b", |s| {
        peer(s, "b").is_some_and(|p| p.state == "active")
    })
    .await;

    // A transfer makes a handshake and moves the byte counters.
    let before = status_cli(&a.api);
    assert_eq!(before.node.name.as_deref(), Some("a"));
    assert_eq!(before.node.control.state, "connected");
    assert_eq!(before.node.addresses.len(), 2);
    let b_before = peer(&before, "b").unwrap().clone();
    assert_eq!(b_before.source, "coordinated");
    let stream = Socks5Stream::connect(a.socks.unwrap(), "b:7000")
        .await
        .unwrap();
    run_client(stream, 3 * MIB, 2 * MIB, 1).await.unwrap();
    let after = status_cli(&a.api);
    let b_after = peer(&after, "b").unwrap();
    assert!(
        b_after.tx_bytes >= b_before.tx_bytes + 3 * MIB,
        "{b_after:?}"
    );
    assert!(
        b_after.rx_bytes >= b_before.rx_bytes + 2 * MIB,
        "{b_after:?}"
    );
    let age1 = b_after
        .last_handshake_seconds_ago
        .expect("a handshake happened");
    assert!(b_after.endpoint.is_some());
    // Handshake ages move forward.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let age2 = peer(&status_cli(&a.api), "b")
        .unwrap()
        .last_handshake_seconds_ago
        .unwrap();
    assert!(age2 >= age1 + 1.0, "handshake age {age1} -> {age2}");

    // A killed peer turns lost, then expired.
    b.proc
        .signal_and_wait("KILL", Duration::from_secs(5))
        .unwrap();
    let lost = a
        .wait_status(Duration::from_secs(3), "b lost", |s| {
            peer(s, "b").is_some_and(|p| p.state == "lost")
        })
        .await;
    assert!(peer(&lost, "b").unwrap().state_seconds.unwrap() < LOST_PEER_TIMEOUT.as_secs_f64());
    a.wait_status(
        LOST_PEER_TIMEOUT + Duration::from_secs(5),
        "b expired",
        |s| peer(s, "b").is_some_and(|p| p.state == "expired"),
    )
    .await;
    let expired = status_cli(&a.api);
    assert_eq!(peer(&expired, "b").unwrap().state, "expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_precedence_file_then_env_then_flag() {
    tailnode_tests::init_tracing();
    let dir = TempDir::new("precedence");
    let key = tailnode_wg::PrivateKey::generate();
    let wg = dir.write(
        "node.conf",
        &format!(
            "[Interface]\nPrivateKey = {}\nAddress = 100.64.7.1/32\n",
            key.to_base64()
        ),
    );
    let (file_port, env_port, flag_port) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
    let api = dir.path().join("api.sock");
    let config = dir.write(
        "tailnode.toml",
        &format!(
            "wg_config = \"{}\"\nsocks5 = \"127.0.0.1:{file_port}\"\napi = \"unix:{}\"\nconnect_timeout = \"20s\"\n",
            wg.display(),
            api.display()
        ),
    );
    let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let start = |name: &str, envs: Vec<(&'static str, String)>, extra: Vec<String>| {
        let mut args = vec![
            "up".to_string(),
            "--config".into(),
            config.display().to_string(),
        ];
        args.extend(extra);
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Proc::spawn(
            name,
            &tailnode_bin(),
            &args,
            &envs,
            dir.path().join(format!("{name}.log")),
        )
    };

    // The file alone.
    let mut p = start("file", vec![], vec![]);
    wait_for_tcp(addr(file_port), Duration::from_secs(20)).await;
    let s = tailnode::api::fetch_status(&ApiAddr::Unix(api.clone()))
        .await
        .unwrap();
    assert_eq!(
        s.node.addresses,
        vec!["100.64.7.1".parse::<std::net::IpAddr>().unwrap()]
    );
    p.signal_and_wait("TERM", Duration::from_secs(10)).unwrap();

    // The environment beats the file.
    let mut p = start(
        "env",
        vec![("TAILNODE_SOCKS5", format!("127.0.0.1:{env_port}"))],
        vec![],
    );
    wait_for_tcp(addr(env_port), Duration::from_secs(20)).await;
    assert!(
        tokio::net::TcpStream::connect(addr(file_port))
            .await
            .is_err()
    );
    p.signal_and_wait("TERM", Duration::from_secs(10)).unwrap();

    // A flag beats both.
    let mut p = start(
        "flag",
        vec![("TAILNODE_SOCKS5", format!("127.0.0.1:{env_port}"))],
        vec!["--socks5".into(), format!("127.0.0.1:{flag_port}")],
    );
    wait_for_tcp(addr(flag_port), Duration::from_secs(20)).await;
    assert!(
        tokio::net::TcpStream::connect(addr(env_port))
            .await
            .is_err()
    );
    assert!(
        tokio::net::TcpStream::connect(addr(file_port))
            .await
            .is_err()
    );
    p.signal_and_wait("TERM", Duration::from_secs(10)).unwrap();

    // A bad value in the file names the file and the setting, exit code 2.
    let bad = dir.write("bad.toml", "connect_timeout = \"soon\"\n");
    let out = Command::new(tailnode_bin())
        .args(["up", "--config", &bad.display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.toml") && stderr.contains("connect_timeout"),
        "{stderr}"
    );
    let unknown = dir.write("unknown.toml", "sock5 = \"127.0.0.1:1\"\n");
    let out = Command::new(tailnode_bin())
        .args(["up", "--config", &unknown.display().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown setting `sock5`"));
}
