//! Shared machinery for tailnode's end-to-end tests: spawning `tailnode`
//! processes from config files, a transfer protocol that checks bytes end to
//! end with SHA-256, SOCKS5 clients, and network namespaces with a foreign
//! WireGuard peer (wireguard-go).
//!
//! Everything here talks only to loopback or to namespaces it created itself
//! (198.18.0.0/15 between namespaces, 100.64.0.0/10 and fd7a:115c:a1e0::/48
//! inside the tailnet), bounds every wait, and cleans up on drop.

#![allow(clippy::unwrap_used, missing_docs)]

pub mod control;
pub mod http_origin;
pub mod inproc;
pub mod netns;
pub mod process;
pub mod relay;
pub mod transfer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Path of a binary built in the same target directory as the running test
/// (`cargo test --workspace` builds every binary of the workspace first).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run the tests with `cargo test --workspace` so that it is built",
        path.display()
    );
    path
}

/// The `tailnode` binary under test.
pub fn tailnode_bin() -> PathBuf {
    workspace_bin("tailnode")
}

/// The test helper binary (transfer server/client usable inside namespaces).
pub fn testkit_bin() -> PathBuf {
    workspace_bin("tailnode-testkit")
}

/// A loopback TCP port that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A UDP port that was free a moment ago (on both IPv4 and IPv6 wildcard).
pub fn free_udp_port() -> u16 {
    for _ in 0..100 {
        let sock = std::net::UdpSocket::bind("[::]:0").expect("bind [::]:0");
        let port = sock.local_addr().expect("local addr").port();
        drop(sock);
        if std::net::UdpSocket::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free UDP port found");
}

/// Waits until something accepts TCP connections at `addr`.
pub async fn wait_for_tcp(addr: SocketAddr, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listening on {addr} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `f` until it succeeds, at most `attempts` times, `pause` apart.
pub async fn retry<T, E: std::fmt::Debug, Fut>(
    attempts: usize,
    pause: Duration,
    mut f: impl FnMut() -> Fut,
) -> Result<T, E>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut last = None;
    for _ in 0..attempts {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(pause).await;
    }
    Err(last.expect("at least one attempt"))
}

/// Turns on test logging once: `RUST_LOG` if set, else `info`. Output goes
/// through the test harness, so it shows only for a failing test.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
