//! `tailnode up`: start a node from its configuration and serve the proxies,
//! forwards and exposures until cancelled.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use tailnode_wg::PeerConfig;
use tailnode_wg::config::{Endpoint, PeerSection, WgQuickConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::dialer::{DEFAULT_CONNECT_TIMEOUT, DirectPolicy, TailnetDialer};
use crate::expose::{ExposeSpec, serve_exposure};
use crate::forward::{ForwardSpec, Protocol, serve_tcp_forward};
use crate::node::{Node, NodeConfig, NodeHandle};
use crate::socks5::{Socks5Config, Socks5Server};

/// How long shutdown waits for connections to drain before giving up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Options of `tailnode up`.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// WireGuard / wg-quick configuration file: [Interface] PrivateKey, Address,
    /// ListenPort, MTU; [Peer] PublicKey, PresharedKey, AllowedIPs, Endpoint,
    /// PersistentKeepalive.
    #[arg(long, value_name = "FILE", env = "TAILNODE_WG_CONFIG")]
    pub wg_config: PathBuf,

    /// SOCKS5 listen address, or `off`.
    #[arg(
        long,
        value_name = "ADDR|off",
        default_value = "127.0.0.1:1080",
        env = "TAILNODE_SOCKS5"
    )]
    pub socks5: ListenAddr,

    /// Connect SOCKS5 destinations outside the tailnet from the host network
    /// instead of refusing them.
    #[arg(long, env = "TAILNODE_SOCKS5_DIRECT")]
    pub socks5_direct: bool,

    /// Port forward, repeatable: tcp:LOCAL_ADDR:PORT=TAILNET_ADDR:PORT
    /// (LOCAL_ADDR:PORT may be a bare port, meaning 127.0.0.1).
    #[arg(long, value_name = "SPEC")]
    pub forward: Vec<ForwardSpec>,

    /// Expose a local TCP service to the tailnet, repeatable: PORT (to
    /// 127.0.0.1:PORT) or PORT=HOST:PORT.
    #[arg(long, value_name = "SPEC")]
    pub expose: Vec<ExposeSpec>,

    /// Time allowed to establish a connection (tailnet or direct), e.g. 15s.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// WireGuard UDP port, overriding ListenPort (0 picks one).
    #[arg(long, value_name = "PORT")]
    pub listen_port: Option<u16>,
}

/// A listen address that can be switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenAddr {
    /// Listen here.
    On(SocketAddr),
    /// Do not listen.
    Off,
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" | "" => Ok(ListenAddr::Off),
            _ => s
                .parse()
                .map(ListenAddr::On)
                .map_err(|_| format!("{s:?} is not IP:PORT, [IPv6]:PORT or off")),
        }
    }
}

/// A problem with the user's configuration (exit code 2), as opposed to a
/// failure while running.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigProblem(pub String);

/// Reads and parses a wg-quick file; errors name the file and the line.
///
/// # Errors
/// [`ConfigProblem`] when the file cannot be read or is not valid.
pub fn load_wg_config(path: &Path) -> Result<WgQuickConfig, ConfigProblem> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigProblem(format!("{}: cannot read: {e}", path.display())))?;
    let config = tailnode_wg::config::parse(&text)
        .map_err(|e| ConfigProblem(format!("{}: {e}", path.display())))?;
    for w in &config.warnings {
        warn!("{}: {w}", path.display());
    }
    Ok(config)
}

/// Runs a node until `cancel` fires.
///
/// # Errors
/// [`ConfigProblem`] (wrapped) for configuration errors, other errors when a
/// listener cannot be opened.
pub async fn run_up(args: UpArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let wg = load_wg_config(&args.wg_config)?;
    let mut config = NodeConfig::new(wg.interface.private_key.clone());
    config.addresses = wg
        .interface
        .addresses
        .iter()
        .map(|net| net.addr())
        .collect();
    config.listen_port = args.listen_port.or(wg.interface.listen_port).unwrap_or(0);
    if let Some(mtu) = wg.interface.mtu {
        config.mtu = usize::from(mtu);
    }
    let node = Node::start(config, cancel.child_token())
        .await
        .context("starting the node")?;
    let handle = node.handle();
    let tasks = TaskTracker::new();
    for peer in &wg.peers {
        spawn_peer_setup(&tasks, handle.clone(), peer.clone(), cancel.clone());
    }
    serve_everything(&args, &handle, &tasks, &cancel).await?;
    cancel.cancelled().await;
    info!("shutting down");
    tasks.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tasks.wait())
        .await
        .is_err()
    {
        warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
    }
    node.shutdown().await;
    Ok(())
}

/// Opens the SOCKS5 server, the forwards and the exposures of `args` on a
/// running node. Each runs until `cancel` fires.
///
/// # Errors
/// When a listener cannot be bound.
pub async fn serve_everything(
    args: &UpArgs,
    handle: &NodeHandle,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let direct = if args.socks5_direct {
        DirectPolicy::Allow
    } else {
        DirectPolicy::Refuse
    };
    if let ListenAddr::On(addr) = args.socks5 {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for SOCKS5 on {addr}"))?;
        let dialer = Arc::new(TailnetDialer::new(
            handle.clone(),
            direct,
            args.connect_timeout,
        ));
        let config = Socks5Config {
            connect_timeout: args.connect_timeout,
            ..Socks5Config::default()
        };
        let server = Socks5Server::new(config, dialer);
        let cancel = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = server.serve(listener, cancel).await {
                warn!(error = %e, "SOCKS5 server stopped");
            }
        });
    }
    for spec in &args.forward {
        match spec.protocol {
            Protocol::Tcp => {
                let listener = tokio::net::TcpListener::bind(spec.local)
                    .await
                    .with_context(|| format!("cannot listen for forward {spec}"))?;
                info!(%spec, "forward listening");
                tasks.spawn(serve_tcp_forward(
                    listener,
                    spec.remote,
                    handle.clone(),
                    args.connect_timeout,
                    cancel.clone(),
                    tasks.clone(),
                ));
            }
            Protocol::Udp => {
                return Err(
                    ConfigProblem(format!("{spec}: UDP forwards are not supported yet")).into(),
                );
            }
        }
    }
    for spec in &args.expose {
        let listener = handle
            .netstack()
            .listen(spec.port)
            .with_context(|| format!("cannot expose port {}", spec.port))?;
        info!(%spec, "exposed to the tailnet");
        tasks.spawn(serve_exposure(
            listener,
            spec.clone(),
            args.connect_timeout,
            cancel.clone(),
            tasks.clone(),
        ));
    }
    Ok(())
}

/// Adds a static peer; a host-name endpoint is resolved first, retried with
/// backoff while it fails (the peer is added without endpoint meanwhile, so
/// it can still answer if it reaches us first).
fn spawn_peer_setup(
    tasks: &TaskTracker,
    node: NodeHandle,
    peer: PeerSection,
    cancel: CancellationToken,
) {
    tasks.spawn(async move {
        let mut config = peer_config(&peer, None);
        match &peer.endpoint {
            None => {}
            Some(Endpoint::Addr(addr)) => config.endpoint = Some(*addr),
            Some(Endpoint::Host { host, port }) => {
                let _ = node.upsert_peer(config.clone()).await;
                let mut delay = Duration::from_millis(500);
                loop {
                    match resolve_endpoint(host, *port).await {
                        Ok(addr) => {
                            config.endpoint = Some(addr);
                            break;
                        }
                        Err(e) => {
                            warn!(peer = %peer.public_key.short(), %host, error = %e, "cannot resolve endpoint; retrying in {delay:?}");
                        }
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
        if node.upsert_peer(config).await.is_err() {
            warn!("node stopped before its peers were configured");
        }
    });
}

async fn resolve_endpoint(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    // Prefer IPv4, as wg(8) does when a name has both.
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs
        .into_iter()
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"))
}

/// The engine's view of a `[Peer]` section.
pub fn peer_config(peer: &PeerSection, endpoint: Option<SocketAddr>) -> PeerConfig {
    PeerConfig {
        public_key: peer.public_key,
        preshared_key: peer.preshared_key.clone(),
        allowed_ips: peer.allowed_ips.clone(),
        endpoint,
        persistent_keepalive: peer.persistent_keepalive,
    }
}

/// The default connect timeout, for callers that build [`UpArgs`] by hand.
pub fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
