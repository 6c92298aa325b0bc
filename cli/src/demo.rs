//! `tailnode demo`: two nodes in one process talking WireGuard over loopback
//! UDP, a small HTTP service exposed on the second, the first one's SOCKS5
//! proxy on a local port. Nothing to prepare, nothing outside loopback.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use tailnode_wg::{PeerConfig, PrivateKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::expose::ExposeSpec;
use crate::node::{Node, NodeConfig};
use crate::up::{ListenAddr, UpArgs, serve_everything};

/// Tailnet addresses of the demo's two nodes.
pub const DEMO_A: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1)),
    IpAddr::V6(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 1)),
];
/// Tailnet addresses of the node that serves HTTP.
pub const DEMO_B: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)),
    IpAddr::V6(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 2)),
];

/// Runs the demo until `cancel` fires. Prints the curl command that fetches
/// the service through the tunnel.
///
/// # Errors
/// When a listener cannot be bound (for example the SOCKS5 port is taken).
pub async fn run_demo(socks5: SocketAddr, cancel: CancellationToken) -> anyhow::Result<()> {
    let http = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .context("binding the demo HTTP service")?;
    let http_addr = http.local_addr()?;
    let tasks = TaskTracker::new();
    tasks.spawn(serve_hello(http, cancel.clone()));

    let key_a = PrivateKey::generate();
    let key_b = PrivateKey::generate();
    let a = start_node(key_a.clone(), &DEMO_A, &cancel).await?;
    let b = start_node(key_b.clone(), &DEMO_B, &cancel).await?;
    connect(&a, &b, &DEMO_B).await?;
    connect(&b, &a, &DEMO_A).await?;

    let expose_b = UpArgs {
        expose: vec![ExposeSpec {
            port: 80,
            host: http_addr.ip().to_string(),
            target_port: http_addr.port(),
        }],
        ..demo_args(ListenAddr::Off)
    };
    serve_everything(&expose_b, &b.handle(), &tasks, &cancel).await?;
    serve_everything(
        &demo_args(ListenAddr::On(socks5)),
        &a.handle(),
        &tasks,
        &cancel,
    )
    .await?;

    println!("tailnode demo: two nodes joined over WireGuard on loopback UDP");
    println!(
        "  node A  {} / {}  udp {}  SOCKS5 on {socks5}",
        DEMO_A[0],
        DEMO_A[1],
        a.handle().udp_addr()
    );
    println!(
        "  node B  {} / {}  udp {}  exposes port 80 (HTTP)",
        DEMO_B[0],
        DEMO_B[1],
        b.handle().udp_addr()
    );
    println!();
    println!("Fetch node B's service through the tunnel:");
    println!("  curl --socks5-hostname {socks5} http://{}/", DEMO_B[0]);
    println!(
        "  curl --socks5-hostname {socks5} 'http://[{}]/'",
        DEMO_B[1]
    );
    println!();
    println!("Ctrl-C to stop.");

    cancel.cancelled().await;
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

fn demo_args(socks5: ListenAddr) -> UpArgs {
    UpArgs {
        wg_config: Default::default(),
        socks5,
        socks5_direct: false,
        forward: Vec::new(),
        expose: Vec::new(),
        connect_timeout: crate::up::default_connect_timeout(),
        listen_port: None,
    }
}

async fn start_node(
    key: PrivateKey,
    addrs: &[IpAddr],
    cancel: &CancellationToken,
) -> anyhow::Result<Node> {
    let mut config = NodeConfig::new(key);
    config.addresses = addrs.to_vec();
    Ok(Node::start(config, cancel.child_token()).await?)
}

/// Makes `to` a peer of `from`, reachable over loopback.
async fn connect(from: &Node, to: &Node, to_addrs: &[IpAddr]) -> anyhow::Result<()> {
    let to = to.handle();
    let endpoint = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), to.udp_addr().port());
    from.handle()
        .upsert_peer(PeerConfig {
            public_key: to.public_key(),
            preshared_key: None,
            allowed_ips: to_addrs.iter().map(|ip| ipnet::IpNet::from(*ip)).collect(),
            endpoint: Some(endpoint),
            persistent_keepalive: None,
        })
        .await?;
    Ok(())
}

/// A tiny HTTP/1.0 responder: enough for curl, one response per connection.
async fn serve_hello(listener: TcpListener, cancel: CancellationToken) {
    loop {
        let (mut stream, peer) = tokio::select! {
            () = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut used = 0;
            // Read the request head (bounded); the content does not matter.
            while used < buf.len() {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[used..]))
                    .await
                {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(n)) => used += n,
                }
                if buf[..used].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let body = "Hello from node B of the tailnode demo: this page came through WireGuard and two userspace TCP/IP stacks.\n";
            let response = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = stream.write_all(response.as_bytes()).await {
                debug!(%peer, error = %e, "demo HTTP write failed");
            }
            let _ = stream.shutdown().await;
        });
    }
}
