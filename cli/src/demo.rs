//! `tailnode demo`: an embedded coordinator and two nodes in one process,
//! talking WireGuard over loopback UDP; a small HTTP service exposed on the
//! node named `web`, the other node's SOCKS5 proxy on a local port. Nothing
//! to prepare, nothing outside loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tailnode_control::coordinator::{AuthKeySource, CoordinatorConfig, CoordinatorServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use tailnode::api::ApiAddr;
use tailnode::expose::ExposeSpec;
use tailnode::{Config, ListenAddr, Tailnode};

/// Name of the node that serves HTTP.
pub const WEB: &str = "web";
/// Name of the node whose SOCKS5 proxy the user talks to.
pub const LAPTOP: &str = "laptop";

/// Runs the demo until `cancel` fires. Prints the curl command that fetches
/// the service through the tunnel once it works.
///
/// # Errors
/// When a listener cannot be bound (for example the SOCKS5 port is taken).
pub async fn run_demo(socks5: SocketAddr, cancel: CancellationToken) -> anyhow::Result<()> {
    let dir = DemoDir::create()?;
    let tasks = TaskTracker::new();

    let http = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .context("binding the demo HTTP service")?;
    let http_addr = http.local_addr()?;
    tasks.spawn(serve_hello(http, cancel.clone()));

    let auth_key = format!("demo-{:016x}", rand::random::<u64>());
    let mut config = CoordinatorConfig::new(
        AuthKeySource::Fixed(auth_key.clone()),
        dir.0.join("coordinator.json"),
    );
    config.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let coordinator = CoordinatorServer::bind(config)
        .await
        .context("starting the embedded coordinator")?;
    let url = format!("ws://{}", coordinator.local_addr());
    {
        let cancel = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = coordinator.run(cancel).await {
                tracing::error!(error = %e, "embedded coordinator stopped");
            }
        });
    }

    let config =
        |name: &str, socks5: ListenAddr, expose: Vec<ExposeSpec>| -> anyhow::Result<Config> {
            Ok(Config {
                coordinator: Some(url.parse().map_err(|e| anyhow::anyhow!("{e}"))?),
                name: Some(name.to_string()),
                auth_key: Some(auth_key.clone()),
                key_file: Some(dir.0.join(format!("{name}.key"))),
                socks5,
                expose,
                api: Some(ApiAddr::Off),
                ..Config::default()
            })
        };
    let web = config(
        WEB,
        ListenAddr::Off,
        vec![ExposeSpec {
            port: 80,
            host: http_addr.ip().to_string(),
            target_port: http_addr.port(),
        }],
    )?;
    let laptop = config(LAPTOP, ListenAddr::On(socks5), Vec::new())?;
    let mut nodes = Vec::new();
    for config in [web, laptop] {
        let name = config.name.clone().unwrap_or_default();
        let node = Tailnode::start(config, cancel.clone())
            .await
            .with_context(|| format!("starting the demo node {name}"))?;
        nodes.push(node);
    }

    // Wait until the page really comes through the tunnel, then tell the user.
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if fetch_through_socks(socks5, WEB, 80).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    tokio::select! {
        () = cancel.cancelled() => {}
        r = ready => {
            r.context("the demo nodes did not connect within 30 s")?;
            println!("tailnode demo: a coordinator ({url}) and two nodes joined over WireGuard on loopback UDP");
            println!("  {LAPTOP:<7} SOCKS5 proxy on {socks5}");
            println!("  {WEB:<7} exposes port 80 (a small HTTP service)");
            println!();
            println!("Fetch {WEB}'s page through the tunnel, by peer name:");
            println!("  curl --socks5-hostname {socks5} http://{WEB}/");
            println!("  curl --socks5-hostname {socks5} http://{WEB}.{}/", tailnode_control::coordinator::DEFAULT_DOMAIN);
            println!();
            println!("Ctrl-C to stop.");
        }
    }
    cancel.cancelled().await;
    for node in nodes {
        node.shutdown().await;
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
    Ok(())
}

/// A scratch directory for the demo's keys and coordinator state, removed at the end.
struct DemoDir(PathBuf);

impl DemoDir {
    fn create() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("tailnode-demo-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// GET / through a SOCKS5 proxy (hostname target); Ok when an HTTP 200 comes back.
async fn fetch_through_socks(socks: SocketAddr, host: &str, port: u16) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(socks).await?;
    s.write_all(&[5, 1, 0]).await?;
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply).await?;
    anyhow::ensure!(reply == [5, 0], "SOCKS5 method refused");
    let mut req = vec![5, 1, 0, 3, u8::try_from(host.len())?];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut head = [0u8; 10];
    s.read_exact(&mut head).await?;
    anyhow::ensure!(head[1] == 0, "SOCKS5 reply {}", head[1]);
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut body)).await??;
    anyhow::ensure!(body.starts_with(b"HTTP/1.0 200"), "unexpected answer");
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
            let body = "Hello from web, a tailnode demo node: this page came through WireGuard and two userspace TCP/IP stacks.\n";
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
