//! `tailnode up`: start a node from its configuration and serve the proxies,
//! forwards and exposures until cancelled.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use tailnode_control::controller::{
    Controller, ControllerConfig, CoordinatorUrl, PeerDirectory, WebSocketTransport,
};
use tailnode_wg::config::{Endpoint, PeerSection, WgQuickConfig};
use tailnode_wg::{PeerConfig, PublicKey};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::api::{self, ApiAddr, ControlHandles, StatusSource, default_api};
use crate::coordinated::{NodeDataPlane, node_key};
use crate::dialer::{DEFAULT_CONNECT_TIMEOUT, DirectPolicy, TailnetDialer};
use crate::expose::{ExposeSpec, serve_exposure};
use crate::forward::{ForwardSpec, Protocol, serve_tcp_forward};
use crate::http_proxy::{HttpProxyConfig, HttpProxyServer};
use crate::identity::{default_key_file, load_or_create_key};
use crate::metrics::MetricsSource;
use crate::node::{Node, NodeConfig, NodeHandle};
use crate::socks5::{Credentials, Socks5Config, Socks5Server};
use crate::udp_forward::{DEFAULT_UDP_IDLE_TIMEOUT, UdpForward, UdpForwardConfig};

/// How long shutdown waits for connections to drain before giving up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Options of `tailnode up`.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// TOML file with any of these settings (keys named like the flags, e.g.
    /// `socks5_direct = true`, `forward = ["tcp:..."]`); TAILNODE_* variables
    /// and flags override it.
    #[arg(long, value_name = "FILE", env = "TAILNODE_CONFIG")]
    pub config: Option<PathBuf>,

    /// WireGuard / wg-quick configuration file with static peers: [Interface]
    /// PrivateKey, Address, ListenPort, MTU; [Peer] PublicKey, PresharedKey,
    /// AllowedIPs, Endpoint, PersistentKeepalive.
    #[arg(
        long,
        value_name = "FILE",
        env = "TAILNODE_WG_CONFIG",
        required_unless_present = "coordinator"
    )]
    pub wg_config: Option<PathBuf>,

    /// Coordination server to join: ws://HOST:PORT, wss://HOST:PORT (or the
    /// http:// / https:// spellings). A URL without a path reaches the
    /// coordinator's node endpoint.
    #[arg(long, value_name = "URL", env = "TAILNODE_COORDINATOR")]
    pub coordinator: Option<CoordinatorUrl>,

    /// Name to ask the coordinator for (made DNS-safe and unique by it).
    /// Default: the host name.
    #[arg(long, value_name = "NAME", env = "TAILNODE_NAME")]
    pub name: Option<String>,

    /// The tailnet's auth key (needed with --coordinator).
    #[arg(
        long,
        value_name = "KEY",
        env = "TAILNODE_AUTH_KEY",
        hide_env_values = true
    )]
    pub auth_key: Option<String>,

    /// Private key file of the node, created (mode 0600) when missing; keeps
    /// the node's identity and addresses across restarts. Default:
    /// $STATE_DIRECTORY, $XDG_STATE_HOME/tailnode or ~/.local/state/tailnode,
    /// file node.key. Not used with --wg-config, whose PrivateKey wins.
    #[arg(long, value_name = "FILE", env = "TAILNODE_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// Extra CA certificate (PEM) to trust for a wss:// coordinator.
    #[arg(long, value_name = "FILE", env = "TAILNODE_COORDINATOR_CA")]
    pub coordinator_ca: Option<PathBuf>,

    /// Time allowed for one dial of the coordinator: TCP connect, TLS, the
    /// websocket upgrade and the hello/welcome exchange.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration, env = "TAILNODE_DIAL_TIMEOUT")]
    pub dial_timeout: Duration,

    /// Cap of the exponential, jittered backoff between coordinator dials.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration, env = "TAILNODE_RETRY_MAX_BACKOFF")]
    pub retry_max_backoff: Duration,

    /// Ping the coordinator this often; no answer within two intervals and
    /// the session is dropped and redialled.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration, env = "TAILNODE_PING_INTERVAL")]
    pub ping_interval: Duration,

    /// A peer announced lost (or every peer, while our own coordinator
    /// session is down) is removed after this long without a WireGuard
    /// handshake.
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = humantime::parse_duration, env = "TAILNODE_LOST_PEER_TIMEOUT")]
    pub lost_peer_timeout: Duration,

    /// UDP endpoint to advertise to peers instead of the discovered interface
    /// addresses (repeatable; e.g. a port forwarded on a NAT). In the
    /// environment: comma separated.
    #[arg(
        long = "endpoint",
        value_name = "ADDR",
        env = "TAILNODE_ENDPOINT",
        value_delimiter = ','
    )]
    pub endpoints: Vec<SocketAddr>,

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

    /// Username SOCKS5 clients must present (RFC 1929); needs --socks5-pass.
    #[arg(long, value_name = "USER", env = "TAILNODE_SOCKS5_USER")]
    pub socks5_user: Option<String>,

    /// Password SOCKS5 clients must present; needs --socks5-user. Prefer the
    /// environment variable: command lines are visible to other users.
    #[arg(
        long,
        value_name = "PASS",
        env = "TAILNODE_SOCKS5_PASS",
        hide_env_values = true
    )]
    pub socks5_pass: Option<String>,

    /// Allow SOCKS5 on a non-loopback address without credentials: anyone
    /// who can reach that address can then use the tailnet (and, with
    /// --socks5-direct, the host's network) through it.
    #[arg(long, env = "TAILNODE_SOCKS5_INSECURE_PUBLIC")]
    pub socks5_insecure_public: bool,

    /// Port forward, repeatable: tcp:LOCAL_ADDR:PORT=TAILNET_ADDR:PORT or
    /// udp:LOCAL_ADDR:PORT=TAILNET_ADDR:PORT (LOCAL_ADDR:PORT may be a bare
    /// port, meaning 127.0.0.1). In the environment: comma separated.
    #[arg(
        long,
        value_name = "SPEC",
        env = "TAILNODE_FORWARD",
        value_delimiter = ','
    )]
    pub forward: Vec<ForwardSpec>,

    /// UDP forward flows and SOCKS5 UDP associations with no datagram either
    /// way for this long are closed (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration, env = "TAILNODE_UDP_IDLE_TIMEOUT")]
    pub udp_idle_timeout: Duration,

    /// Expose a local TCP service to the tailnet, repeatable: PORT (to
    /// 127.0.0.1:PORT) or PORT=HOST:PORT. In the environment: comma separated.
    #[arg(
        long,
        value_name = "SPEC",
        env = "TAILNODE_EXPOSE",
        value_delimiter = ','
    )]
    pub expose: Vec<ExposeSpec>,

    /// Time allowed to establish a connection (tailnet or direct), e.g. 15s.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = humantime::parse_duration, env = "TAILNODE_CONNECT_TIMEOUT")]
    pub connect_timeout: Duration,

    /// HTTP proxy listen address (CONNECT tunnels and absolute-URI
    /// requests; usable as HTTP_PROXY/HTTPS_PROXY), or `off`. Uses the same
    /// credentials as SOCKS5 (Basic proxy authentication).
    #[arg(
        long,
        value_name = "ADDR|off",
        default_value = "off",
        env = "TAILNODE_HTTP_PROXY"
    )]
    pub http_proxy: ListenAddr,

    /// WireGuard UDP port, overriding ListenPort (0 picks one).
    #[arg(long, value_name = "PORT", env = "TAILNODE_LISTEN_PORT")]
    pub listen_port: Option<u16>,

    /// Local API for `tailnode status`: 127.0.0.1:PORT, [::1]:PORT,
    /// unix:/path, or off. Never reachable from the tailnet.
    #[arg(long, value_name = "ADDR|unix:PATH|off", env = "TAILNODE_API")]
    pub api: Option<ApiAddr>,

    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9100).
    /// Off by default.
    #[arg(long, value_name = "ADDR", env = "TAILNODE_METRICS")]
    pub metrics: Option<SocketAddr>,
}

impl UpArgs {
    /// Options with every default and nothing to join (for embedding).
    pub fn empty() -> Self {
        Self {
            config: None,
            wg_config: None,
            coordinator: None,
            name: None,
            auth_key: None,
            key_file: None,
            coordinator_ca: None,
            dial_timeout: tailnode_control::controller::DEFAULT_DIAL_TIMEOUT,
            retry_max_backoff: tailnode_control::controller::DEFAULT_RETRY_MAX_BACKOFF,
            ping_interval: tailnode_control::controller::DEFAULT_PING_INTERVAL,
            lost_peer_timeout: tailnode_control::controller::DEFAULT_LOST_PEER_TIMEOUT,
            endpoints: Vec::new(),
            socks5: ListenAddr::Off,
            socks5_direct: false,
            socks5_user: None,
            socks5_pass: None,
            socks5_insecure_public: false,
            forward: Vec::new(),
            udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
            expose: Vec::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            listen_port: None,
            api: None,
            metrics: None,
            http_proxy: ListenAddr::Off,
        }
    }

    fn check(&self) -> Result<(), ConfigProblem> {
        for (flag, value) in [
            ("--dial-timeout", self.dial_timeout),
            ("--retry-max-backoff", self.retry_max_backoff),
            ("--ping-interval", self.ping_interval),
            ("--lost-peer-timeout", self.lost_peer_timeout),
            ("--connect-timeout", self.connect_timeout),
            ("--udp-idle-timeout", self.udp_idle_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigProblem(format!("{flag} must be greater than 0")));
            }
        }
        if self.coordinator.is_some() && self.auth_key.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigProblem(
                "--coordinator needs an auth key: --auth-key KEY or TAILNODE_AUTH_KEY".into(),
            ));
        }
        if let Some(name) = &self.name
            && name.trim().is_empty()
        {
            return Err(ConfigProblem("--name must not be empty".into()));
        }
        let credentials = self.proxy_credentials()?;
        for (proxy, listen) in [("SOCKS5", self.socks5), ("the HTTP proxy", self.http_proxy)] {
            if let ListenAddr::On(addr) = listen
                && !addr.ip().to_canonical().is_loopback()
                && credentials.is_none()
                && !self.socks5_insecure_public
            {
                return Err(ConfigProblem(format!(
                    "refusing to serve {proxy} on {addr} without credentials: anyone who can \
                     reach it could use the tailnet through it. Set --socks5-user and \
                     --socks5-pass (or TAILNODE_SOCKS5_USER and TAILNODE_SOCKS5_PASS), listen \
                     on a loopback address, or pass --socks5-insecure-public if this is really \
                     wanted"
                )));
            }
        }
        Ok(())
    }

    /// The credentials proxy clients must present (`--socks5-user` and
    /// `--socks5-pass`), or `None` when neither is set.
    ///
    /// # Errors
    /// [`ConfigProblem`] when only one of the two is set, or one is empty or
    /// longer than 255 bytes (RFC 1929).
    pub fn proxy_credentials(&self) -> Result<Option<Credentials>, ConfigProblem> {
        match (&self.socks5_user, &self.socks5_pass) {
            (None, None) => Ok(None),
            (Some(user), Some(pass)) => Credentials::new(user.as_str(), pass.as_str())
                .map(Some)
                .map_err(|e| ConfigProblem(format!("--socks5-user/--socks5-pass: {e}"))),
            (Some(_), None) => Err(ConfigProblem(
                "--socks5-user needs --socks5-pass (or TAILNODE_SOCKS5_PASS)".into(),
            )),
            (None, Some(_)) => Err(ConfigProblem(
                "--socks5-pass needs --socks5-user (or TAILNODE_SOCKS5_USER)".into(),
            )),
        }
    }
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
    args.check()?;
    let wg = match &args.wg_config {
        Some(path) => Some(load_wg_config(path)?),
        None => None,
    };
    let key = match &wg {
        Some(wg) => {
            if args.key_file.is_some() {
                warn!("--key-file is ignored: the wg-quick file's PrivateKey is the node's key");
            }
            wg.interface.private_key.clone()
        }
        None => {
            let path = args.key_file.clone().unwrap_or_else(default_key_file);
            load_or_create_key(&path).map_err(|e| ConfigProblem(e.to_string()))?
        }
    };
    let mut config = NodeConfig::new(key.clone());
    let static_addresses: Vec<_> = wg
        .as_ref()
        .map(|wg| {
            wg.interface
                .addresses
                .iter()
                .map(|net| net.addr())
                .collect()
        })
        .unwrap_or_default();
    config.addresses = static_addresses.clone();
    config.listen_port = args
        .listen_port
        .or(wg.as_ref().and_then(|wg| wg.interface.listen_port))
        .unwrap_or(0);
    if let Some(mtu) = wg.as_ref().and_then(|wg| wg.interface.mtu) {
        config.mtu = usize::from(mtu);
    }
    let node = Node::start(config, cancel.child_token())
        .await
        .context("starting the node")?;
    let handle = node.handle();
    let tasks = TaskTracker::new();
    let static_peers: Vec<PublicKey> = wg
        .as_ref()
        .map(|wg| wg.peers.iter().map(|p| p.public_key).collect())
        .unwrap_or_default();
    for peer in wg.iter().flat_map(|wg| wg.peers.iter()) {
        spawn_peer_setup(&tasks, handle.clone(), peer.clone(), cancel.clone());
    }

    let mut control = None;
    let mut controller_task = None;
    if let Some(url) = args.coordinator.clone() {
        let transport = WebSocketTransport::new(args.coordinator_ca.as_deref())
            .map_err(|e| ConfigProblem(format!("--coordinator-ca: {e}")))?;
        let name = args.name.clone().unwrap_or_else(host_name);
        let mut cc = ControllerConfig::new(
            url,
            args.auth_key.clone().unwrap_or_default(),
            node_key(&key.public_key()),
            name,
            // Explicit endpoints replace discovery entirely: port 0 tells the
            // coordinator not to derive one from the address it sees.
            if args.endpoints.is_empty() {
                handle.udp_addr().port()
            } else {
                0
            },
        );
        cc.dial_timeout = args.dial_timeout;
        cc.retry_max_backoff = args.retry_max_backoff;
        cc.retry_initial_backoff = cc.retry_initial_backoff.min(args.retry_max_backoff);
        cc.ping_interval = args.ping_interval;
        cc.lost_peer_timeout = args.lost_peer_timeout;
        let data_plane = NodeDataPlane::new(
            handle.clone(),
            static_addresses.clone(),
            args.endpoints.clone(),
        );
        tasks.spawn(data_plane.clone().probe_endpoints(cancel.clone()));
        let controller = Controller::new(cc, transport, data_plane);
        control = Some(ControlHandles {
            status: controller.status(),
            directory: controller.directory(),
            url: args.coordinator.clone(),
        });
        // Not tracked with the others: shutdown waits for it first, so the
        // goodbye leaves before anything else closes.
        controller_task = Some(tokio::spawn(controller.run(cancel.clone())));
    }

    let names = control.as_ref().map(|c| c.directory.clone());
    serve_everything(&args, &handle, names, &tasks, &cancel).await?;
    let source = StatusSource::new(handle.clone(), control.clone(), static_peers);
    if let Some(addr) = args.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        let metrics = MetricsSource::new(source.clone());
        tasks.spawn(crate::metrics::serve(listener, metrics, cancel.clone()));
    }
    if let Some(api) = args
        .api
        .clone()
        .or_else(default_api)
        .filter(|a| *a != ApiAddr::Off)
    {
        match api::bind(&api).await {
            Ok(listener) => {
                info!(api = %api, "local API listening");
                tasks.spawn(api::serve(listener, source, cancel.clone()));
            }
            Err(e) if args.api.is_some() => {
                return Err(e.context(format!("cannot listen for the API on {api}")));
            }
            Err(e) => warn!(api = %api, error = %e, "local API not available"),
        }
    }
    cancel.cancelled().await;
    info!("shutting down");
    if let Some(task) = controller_task {
        // The controller sends goodbye (bounded to about a second) and returns.
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, task).await;
    }
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

/// The host's name, for `--name`'s default.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

/// Opens the SOCKS5 server, the forwards and the exposures of `args` on a
/// running node. Each runs until `cancel` fires.
///
/// # Errors
/// When a listener cannot be bound.
pub async fn serve_everything(
    args: &UpArgs,
    handle: &NodeHandle,
    names: Option<PeerDirectory>,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let direct = if args.socks5_direct {
        DirectPolicy::Allow
    } else {
        DirectPolicy::Refuse
    };
    let mut dialer = TailnetDialer::new(handle.clone(), direct, args.connect_timeout);
    if let Some(names) = names {
        dialer = dialer.with_names(names);
    }
    let dialer = Arc::new(dialer);
    if let ListenAddr::On(addr) = args.http_proxy {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for the HTTP proxy on {addr}"))?;
        let config = HttpProxyConfig {
            auth: args.proxy_credentials()?,
            connect_timeout: args.connect_timeout,
            connections: Some(handle.proxy_counters().http.clone()),
            ..HttpProxyConfig::default()
        };
        let server = HttpProxyServer::new(config, Arc::clone(&dialer));
        let cancel = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = server.serve(listener, cancel).await {
                warn!(error = %e, "HTTP proxy stopped");
            }
        });
    }
    if let ListenAddr::On(addr) = args.socks5 {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for SOCKS5 on {addr}"))?;
        let config = Socks5Config {
            auth: args.proxy_credentials()?,
            connect_timeout: args.connect_timeout,
            udp_idle_timeout: args.udp_idle_timeout,
            connections: Some(handle.proxy_counters().socks5.clone()),
            ..Socks5Config::default()
        };
        let server = Socks5Server::new(config, Arc::clone(&dialer)).with_udp(dialer);
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
                let config = UdpForwardConfig {
                    idle_timeout: args.udp_idle_timeout,
                    ..UdpForwardConfig::default()
                };
                let forward = UdpForward::bind(spec.local, spec.remote, handle.clone(), config)
                    .await
                    .with_context(|| format!("cannot listen for forward {spec}"))?;
                tasks.spawn(forward.serve(cancel.clone()));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn socks_on(addr: &str) -> UpArgs {
        let mut args = UpArgs::empty();
        args.socks5 = ListenAddr::On(addr.parse().expect("addr"));
        args
    }

    #[test]
    fn public_socks5_needs_credentials_or_the_explicit_flag() {
        for loopback in [
            "127.0.0.1:1080",
            "127.3.4.5:1080",
            "[::1]:1080",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(socks_on(loopback).check().is_ok(), "{loopback}");
        }
        for public in ["0.0.0.0:1080", "[::]:1080", "192.0.2.1:1080"] {
            let error = socks_on(public).check().expect_err(public).to_string();
            assert!(error.contains("--socks5-insecure-public"), "{error}");
            let mut args = socks_on(public);
            args.socks5_insecure_public = true;
            assert!(args.check().is_ok(), "{public} with the flag");
            let mut args = socks_on(public);
            args.socks5_user = Some("alice".into());
            args.socks5_pass = Some("s3cret".into());
            assert!(args.check().is_ok(), "{public} with credentials");
        }
    }

    #[test]
    fn credentials_come_in_pairs_and_fit_rfc1929() {
        let mut args = UpArgs::empty();
        assert!(matches!(args.proxy_credentials(), Ok(None)));
        args.socks5_user = Some("alice".into());
        assert!(args.check().is_err(), "user without password");
        args.socks5_pass = Some("s3cret".into());
        let credentials = args.proxy_credentials().expect("valid").expect("some");
        assert!(credentials.verify(b"alice", b"s3cret"));
        args.socks5_user = None;
        assert!(args.check().is_err(), "password without user");
        args.socks5_user = Some("u".repeat(256));
        assert!(args.check().is_err(), "username too long");
        args.socks5_user = Some(String::new());
        assert!(args.check().is_err(), "empty username");
    }
}
