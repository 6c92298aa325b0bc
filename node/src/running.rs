//! [`Tailnode`]: a whole node started from a [`Config`] — the data plane, the controller when a
//! coordinator is configured, the static peers, the proxies, forwards, exposures, the local API
//! and the metrics endpoint — and the handle an embedder keeps while it runs.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tailnode_control::controller::{
    Connector, ControlStatus, Controller, ControllerConfig, PeerDirectory, TcpConnector,
    TlsSetupError, WebSocketTransport,
};
use tailnode_netstack::{ListenError, TcpListener as TailnetListener};
use tailnode_wg::config::{Endpoint, PeerSection, WgQuickConfig};
use tailnode_wg::{PeerConfig, PrivateKey, PublicKey};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::api::{self, ApiAddr, ApiBindError, default_api};
use crate::config::{Config, ConfigError, ListenAddr, StaticPeer};
use crate::coordinated::{NodeDataPlane, PeerChange, node_key};
use crate::dial::{DirectPolicy, TailnetDialer};
use crate::expose::serve_exposure;
use crate::forward::{Protocol, serve_tcp_forward};
use crate::http_proxy::{HttpProxyConfig, HttpProxyServer};
use crate::identity::{KeyFileError, default_key_file, load_or_create_key};
use crate::metrics::MetricsSource;
use crate::node::{
    DEFAULT_MTU, DatagramIo, Node, NodeConfig, NodeError, NodeHandle, NodeStopped, PeerUpdateError,
};
use crate::socks5::{Socks5Config, Socks5Server};
use crate::status::{ControlHandles, Status, StatusSource};
use crate::udp_forward::{UdpForward, UdpForwardConfig};

/// How long shutdown waits for the goodbye, then for connections to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a node could not start. [`is_config_problem`](Self::is_config_problem) tells the user's
/// mistakes (bad settings, unreadable files) from failures of the environment (a port in use).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting that cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The wg-quick file cannot be read.
    #[error("{}: cannot read: {source}", path.display())]
    WgConfigRead {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The wg-quick file is not valid.
    #[error("{}: {source}", path.display())]
    WgConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        source: tailnode_wg::ConfigError,
    },
    /// The key file cannot be read or created.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// The coordinator CA file cannot be used.
    #[error("coordinator_ca: {0}")]
    CoordinatorCa(#[from] TlsSetupError),
    /// The data plane could not start (UDP socket, netstack).
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A static peer could not be added (the node's own key, or the node stopped meanwhile).
    #[error("cannot add a static peer: {0}")]
    Peer(#[from] PeerUpdateError),
    /// A local listener could not be bound.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Listen {
        /// What it was for ("SOCKS5", "forward tcp:...").
        what: String,
        /// Where.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// An exposed port could not be opened on the tailnet.
    #[error("cannot expose port {port}: {source}")]
    Expose {
        /// The port.
        port: u16,
        /// Why.
        source: ListenError,
    },
    /// The local API could not be bound.
    #[error("cannot listen for the API on {addr}: {source}")]
    Api {
        /// Where.
        addr: ApiAddr,
        /// Why.
        source: ApiBindError,
    },
}

impl StartError {
    /// Whether the user's configuration is at fault (`tailnode up` exits 2), as opposed to the
    /// environment (exit 1).
    pub fn is_config_problem(&self) -> bool {
        matches!(
            self,
            Self::Config(_)
                | Self::WgConfigRead { .. }
                | Self::WgConfig { .. }
                | Self::KeyFile(_)
                | Self::CoordinatorCa(_)
                | Self::Peer(PeerUpdateError::Rejected(_))
        )
    }
}

/// Reads and parses a wg-quick file; errors name the file and the line. Warnings about ignored
/// kernel-only keys are logged.
///
/// # Errors
/// [`StartError::WgConfigRead`] or [`StartError::WgConfig`].
pub fn load_wg_config(path: &std::path::Path) -> Result<WgQuickConfig, StartError> {
    let text = std::fs::read_to_string(path).map_err(|source| StartError::WgConfigRead {
        path: path.to_owned(),
        source,
    })?;
    let config = tailnode_wg::config::parse(&text).map_err(|source| StartError::WgConfig {
        path: path.to_owned(),
        source,
    })?;
    for w in &config.warnings {
        warn!("{}: {w}", path.display());
    }
    Ok(config)
}

/// A running node.
///
/// Dropping it does not stop it; cancel the token given to [`Tailnode::start`] or call
/// [`Tailnode::shutdown`], which also says goodbye to the coordinator and waits (bounded) for
/// connections to drain.
pub struct Tailnode {
    node: Node,
    dialer: Arc<TailnetDialer>,
    status: StatusSource,
    control: Option<ControlHandles>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    controller_task: Option<JoinHandle<()>>,
    /// The controller's data plane, when a coordinator is configured.
    coordinated: Option<Arc<NodeDataPlane>>,
    bound: Bound,
}

/// The local addresses the node's listeners were bound to.
#[derive(Debug, Clone, Default)]
struct Bound {
    socks5: Option<SocketAddr>,
    http_proxy: Option<SocketAddr>,
    forwards: Vec<SocketAddr>,
    metrics: Option<SocketAddr>,
    api: Option<ApiAddr>,
}

impl Tailnode {
    /// Starts a node: checks `config`, loads its files, binds the WireGuard socket and every
    /// listener, starts the controller when a coordinator is set, adds the static peers. The
    /// node runs until `cancel` fires (or [`shutdown`](Self::shutdown)).
    ///
    /// On error, whatever was started is stopped again.
    ///
    /// # Errors
    /// [`StartError`] naming the setting, file or address at fault.
    pub async fn start(config: Config, cancel: CancellationToken) -> Result<Self, StartError> {
        let no_socket: Option<tokio::net::UdpSocket> = None;
        Self::start_inner(config, no_socket, TcpConnector, cancel).await
    }

    /// Starts a node as [`start`](Self::start) does, but on another network: WireGuard
    /// datagrams go through `datagrams` (`listen_port` is not used) and connections to the
    /// coordinator are opened by `connector`. This is how whole nodes run on the simulated
    /// network of the `testing` feature.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub async fn start_with<D: DatagramIo, C: Connector>(
        config: Config,
        datagrams: D,
        connector: C,
        cancel: CancellationToken,
    ) -> Result<Self, StartError> {
        Self::start_inner(config, Some(datagrams), connector, cancel).await
    }

    async fn start_inner<D: DatagramIo, C: Connector>(
        config: Config,
        datagrams: Option<D>,
        connector: C,
        cancel: CancellationToken,
    ) -> Result<Self, StartError> {
        let cancel = cancel.child_token();
        let started = start(config, datagrams, connector, cancel.clone()).await;
        if started.is_err() {
            cancel.cancel();
        }
        started
    }

    /// The data plane: the WireGuard engine, the netstack and the UDP socket.
    pub fn handle(&self) -> NodeHandle {
        self.node.handle()
    }

    /// The node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.node.handle().public_key()
    }

    /// The node's tailnet addresses now (static ones, and those the coordinator assigned).
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.node.handle().netstack().addresses()
    }

    /// The dialer the proxies use: TCP and UDP to tailnet addresses and peer names (and, with
    /// `socks5_direct`, to the host network).
    pub fn dialer(&self) -> &Arc<TailnetDialer> {
        &self.dialer
    }

    /// Accepts TCP connections from the tailnet on `port` of this node's addresses.
    ///
    /// # Errors
    /// [`ListenError`] when the port is taken (e.g. exposed) or the socket limit is reached.
    pub fn listen(&self, port: u16) -> Result<TailnetListener, ListenError> {
        self.node.handle().netstack().listen(port)
    }

    /// The status document (what `tailnode status --json` shows).
    pub async fn status(&self) -> Status {
        self.status.status().await
    }

    /// The controller's state, when a coordinator is configured.
    pub fn control_status(&self) -> Option<watch::Receiver<ControlStatus>> {
        self.control.as_ref().map(|c| c.status.clone())
    }

    /// Every change the controller makes to the coordinated peers from now on (peers joining,
    /// updated, expired, rebuilt, leaving), when a coordinator is configured. Static peers are
    /// changed only through [`add_peer`](Self::add_peer) and [`remove_peer`](Self::remove_peer).
    pub fn peer_changes(&self) -> Option<tokio::sync::broadcast::Receiver<PeerChange>> {
        self.coordinated.as_ref().map(|c| c.peer_changes())
    }

    /// The coordinated peers and their lifecycle states, when a coordinator is configured.
    pub fn directory(&self) -> Option<&PeerDirectory> {
        self.control.as_ref().map(|c| &c.directory)
    }

    /// Adds (or updates) a static peer, in place when this returns; a host-name endpoint is
    /// resolved in the background and retried while it fails.
    ///
    /// # Errors
    /// [`PeerUpdateError`] when the engine refuses the peer or the node has stopped.
    pub async fn add_peer(&self, peer: StaticPeer) -> Result<(), PeerUpdateError> {
        add_static_peer(&self.tasks, &self.node.handle(), peer.into(), &self.cancel).await
    }

    /// Removes a peer; returns whether it existed.
    ///
    /// # Errors
    /// [`crate::node::NodeStopped`] once the node has stopped.
    pub async fn remove_peer(&self, key: PublicKey) -> Result<bool, NodeStopped> {
        self.node.handle().remove_peer(key).await
    }

    /// Where the SOCKS5 proxy listens.
    pub fn socks5_addr(&self) -> Option<SocketAddr> {
        self.bound.socks5
    }

    /// Where the HTTP proxy listens.
    pub fn http_proxy_addr(&self) -> Option<SocketAddr> {
        self.bound.http_proxy
    }

    /// Where the port forwards listen, in the order of [`Config::forward`].
    pub fn forward_addrs(&self) -> &[SocketAddr] {
        &self.bound.forwards
    }

    /// Where the metrics endpoint listens.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.bound.metrics
    }

    /// Where the local API listens.
    pub fn api_addr(&self) -> Option<&ApiAddr> {
        self.bound.api.as_ref()
    }

    /// Stops the node: says goodbye to the coordinator (about a second at most), closes the
    /// listeners, waits up to two seconds for connections to drain, then stops the data plane.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        info!("shutting down");
        if let Some(task) = self.controller_task {
            // The controller sends goodbye (bounded to about a second) and returns.
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, task).await;
        }
        self.tasks.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, self.tasks.wait())
            .await
            .is_err()
        {
            warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
        }
        self.node.shutdown().await;
    }
}

async fn start<D: DatagramIo, C: Connector>(
    config: Config,
    datagrams: Option<D>,
    connector: C,
    cancel: CancellationToken,
) -> Result<Tailnode, StartError> {
    config.validate()?;
    let wg = match &config.wg_config {
        Some(path) => Some(load_wg_config(path)?),
        None => None,
    };
    let key = node_private_key(&config, wg.as_ref())?;
    let mut static_addresses = config.addresses.clone();
    for ip in wg
        .iter()
        .flat_map(|wg| wg.interface.addresses.iter().map(|net| net.addr()))
    {
        if !static_addresses.contains(&ip) {
            static_addresses.push(ip);
        }
    }
    let mut node_config = NodeConfig::new(key.clone());
    node_config.addresses = static_addresses.clone();
    node_config.listen_port = config
        .listen_port
        .or(wg.as_ref().and_then(|wg| wg.interface.listen_port))
        .unwrap_or(0);
    node_config.mtu = config
        .mtu
        .or(wg.as_ref().and_then(|wg| wg.interface.mtu))
        .map_or(DEFAULT_MTU, usize::from);
    let node = match datagrams {
        Some(io) => Node::start_with_io(node_config, io, cancel.clone())?,
        None => Node::start(node_config, cancel.clone()).await?,
    };
    let handle = node.handle();
    let tasks = TaskTracker::new();
    let static_peers: Vec<PeerSection> = wg
        .map(|wg| wg.peers)
        .unwrap_or_default()
        .into_iter()
        .chain(config.peers.iter().cloned().map(PeerSection::from))
        .collect();
    let static_keys: Vec<PublicKey> = static_peers.iter().map(|p| p.public_key).collect();
    for peer in static_peers {
        add_static_peer(&tasks, &handle, peer, &cancel).await?;
    }

    let mut control = None;
    let mut controller_task = None;
    let mut coordinated = None;
    if let Some(url) = config.coordinator.clone() {
        let transport =
            WebSocketTransport::new(config.coordinator_ca.as_deref())?.with_connector(connector);
        let name = config.name.clone().unwrap_or_else(host_name);
        let mut cc = ControllerConfig::new(
            url.clone(),
            config.auth_key.clone().unwrap_or_default(),
            node_key(&key.public_key()),
            name,
            // Explicit endpoints replace discovery entirely: port 0 tells the
            // coordinator not to derive one from the address it sees.
            if config.endpoints.is_empty() {
                handle.udp_addr().port()
            } else {
                0
            },
        );
        cc.dial_timeout = config.dial_timeout;
        cc.retry_max_backoff = config.retry_max_backoff;
        cc.retry_initial_backoff = cc.retry_initial_backoff.min(config.retry_max_backoff);
        cc.ping_interval = config.ping_interval;
        cc.lost_peer_timeout = config.lost_peer_timeout;
        let data_plane =
            NodeDataPlane::new(handle.clone(), static_addresses, config.endpoints.clone());
        tasks.spawn(data_plane.clone().probe_endpoints(cancel.clone()));
        coordinated = Some(Arc::clone(&data_plane));
        let controller = Controller::new(cc, transport, data_plane);
        control = Some(ControlHandles {
            status: controller.status(),
            directory: controller.directory(),
            url: Some(url),
        });
        // Not tracked with the others: shutdown waits for it first, so the
        // goodbye leaves before anything else closes.
        controller_task = Some(tokio::spawn(controller.run(cancel.clone())));
    }

    let direct = if config.socks5_direct {
        DirectPolicy::Allow
    } else {
        DirectPolicy::Refuse
    };
    let mut dialer = TailnetDialer::new(handle.clone(), direct, config.connect_timeout);
    if let Some(control) = &control {
        dialer = dialer.with_names(control.directory.clone());
    }
    let dialer = Arc::new(dialer);
    let mut bound = serve_proxies(&config, &handle, &dialer, &tasks, &cancel).await?;

    let status = StatusSource::new(handle.clone(), control.clone(), static_keys);
    if let Some(addr) = config.metrics {
        let listener = bind_tcp(addr, "metrics").await?;
        bound.metrics = listener.local_addr().ok();
        let metrics = MetricsSource::new(status.clone());
        tasks.spawn(crate::metrics::serve(listener, metrics, cancel.clone()));
    }
    if let Some(addr) = config
        .api
        .clone()
        .or_else(default_api)
        .filter(|a| *a != ApiAddr::Off)
    {
        match api::bind(&addr).await {
            Ok(listener) => {
                info!(api = %addr, "local API listening");
                bound.api = Some(listener.addr());
                tasks.spawn(api::serve(listener, status.clone(), cancel.clone()));
            }
            Err(source) if config.api.is_some() => return Err(StartError::Api { addr, source }),
            Err(e) => warn!(api = %addr, error = %e, "local API not available"),
        }
    }
    Ok(Tailnode {
        node,
        dialer,
        status,
        control,
        cancel,
        tasks,
        controller_task,
        coordinated,
        bound,
    })
}

/// The node's key: the wg-quick file's, else the configured one, else the key file's.
fn node_private_key(config: &Config, wg: Option<&WgQuickConfig>) -> Result<PrivateKey, StartError> {
    if let Some(wg) = wg {
        if config.key_file.is_some() || config.private_key.is_some() {
            warn!(
                "key_file and private_key are ignored: the wg-quick file's PrivateKey is the node's key"
            );
        }
        return Ok(wg.interface.private_key.clone());
    }
    if let Some(key) = &config.private_key {
        return Ok(key.clone());
    }
    let path = config.key_file.clone().unwrap_or_else(default_key_file);
    Ok(load_or_create_key(&path)?)
}

async fn bind_tcp(addr: SocketAddr, what: &str) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen {
            what: what.to_string(),
            addr,
            source,
        })
}

/// Opens the SOCKS5 and HTTP proxies, the forwards and the exposures. Each runs until `cancel`.
async fn serve_proxies(
    config: &Config,
    handle: &NodeHandle,
    dialer: &Arc<TailnetDialer>,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<Bound, StartError> {
    let mut bound = Bound::default();
    let credentials = config.proxy_credentials()?;
    if let ListenAddr::On(addr) = config.http_proxy {
        let listener = bind_tcp(addr, "the HTTP proxy").await?;
        bound.http_proxy = listener.local_addr().ok();
        let proxy_config = HttpProxyConfig {
            auth: credentials.clone(),
            connect_timeout: config.connect_timeout,
            connections: Some(handle.proxy_counters().http.clone()),
            ..HttpProxyConfig::default()
        };
        let server = HttpProxyServer::new(proxy_config, Arc::clone(dialer));
        let cancel = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = server.serve(listener, cancel).await {
                warn!(error = %e, "HTTP proxy stopped");
            }
        });
    }
    if let ListenAddr::On(addr) = config.socks5 {
        let listener = bind_tcp(addr, "SOCKS5").await?;
        bound.socks5 = listener.local_addr().ok();
        let socks_config = Socks5Config {
            auth: credentials,
            connect_timeout: config.connect_timeout,
            udp_idle_timeout: config.udp_idle_timeout,
            connections: Some(handle.proxy_counters().socks5.clone()),
            ..Socks5Config::default()
        };
        let server =
            Socks5Server::new(socks_config, Arc::clone(dialer)).with_udp(Arc::clone(dialer));
        let cancel = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = server.serve(listener, cancel).await {
                warn!(error = %e, "SOCKS5 server stopped");
            }
        });
    }
    for spec in &config.forward {
        match spec.protocol {
            Protocol::Tcp => {
                let listener = bind_tcp(spec.local, &format!("forward {spec}")).await?;
                bound
                    .forwards
                    .push(listener.local_addr().unwrap_or(spec.local));
                info!(%spec, "forward listening");
                tasks.spawn(serve_tcp_forward(
                    listener,
                    spec.remote,
                    handle.clone(),
                    config.connect_timeout,
                    cancel.clone(),
                ));
            }
            Protocol::Udp => {
                let forward_config = UdpForwardConfig {
                    idle_timeout: config.udp_idle_timeout,
                    ..UdpForwardConfig::default()
                };
                let forward =
                    UdpForward::bind(spec.local, spec.remote, handle.clone(), forward_config)
                        .await
                        .map_err(|source| StartError::Listen {
                            what: format!("forward {spec}"),
                            addr: spec.local,
                            source,
                        })?;
                bound.forwards.push(forward.local_addr());
                tasks.spawn(forward.serve(cancel.clone()));
            }
        }
    }
    for spec in &config.expose {
        let listener =
            handle
                .netstack()
                .listen(spec.port)
                .map_err(|source| StartError::Expose {
                    port: spec.port,
                    source,
                })?;
        info!(%spec, "exposed to the tailnet");
        tasks.spawn(serve_exposure(
            listener,
            spec.clone(),
            config.connect_timeout,
            cancel.clone(),
        ));
    }
    Ok(bound)
}

/// The host's name, the default `name`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

/// Adds a static peer before `start` returns; an endpoint given as a host name is resolved in
/// a tracked task (retried with backoff until it resolves or the node stops) and set then.
async fn add_static_peer(
    tasks: &TaskTracker,
    node: &NodeHandle,
    peer: PeerSection,
    cancel: &CancellationToken,
) -> Result<(), PeerUpdateError> {
    let mut config = peer_config(&peer, None);
    if let Some(Endpoint::Addr(addr)) = &peer.endpoint {
        config.endpoint = Some(*addr);
    }
    node.upsert_peer(config.clone()).await?;
    let Some(Endpoint::Host { host, port }) = peer.endpoint.clone() else {
        return Ok(());
    };
    let (node, cancel) = (node.clone(), cancel.clone());
    tasks.spawn(async move {
        let mut delay = Duration::from_millis(500);
        loop {
            match resolve_endpoint(&host, port).await {
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
        if node.upsert_peer(config).await.is_err() {
            debug!("node stopped before a peer's endpoint was resolved");
        }
    });
    Ok(())
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
fn peer_config(peer: &PeerSection, endpoint: Option<SocketAddr>) -> PeerConfig {
    PeerConfig {
        public_key: peer.public_key,
        preshared_key: peer.preshared_key.clone(),
        allowed_ips: peer.allowed_ips.clone(),
        endpoint,
        persistent_keepalive: peer.persistent_keepalive,
    }
}
