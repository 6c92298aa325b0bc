//! A node: the WireGuard engine, the netstack and the UDP socket wired
//! together, and a handle through which the rest of the program changes the
//! peer set and asks for state while the node runs.
//!
//! The engine (`tailnode-wg`) and the netstack (`tailnode-netstack`) never
//! see each other: the packet task in [`driver`] moves packets between them.
//! Everything else talks to that task through [`NodeHandle`], whose commands
//! are applied between packet batches.

mod datagram;
mod driver;

pub use datagram::DatagramIo;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tailnode_netstack::{Netstack, NetstackConfig};
use tailnode_wg::{
    Engine, EngineConfig, EngineStats, PeerChange, PeerConfig, PeerError, PeerStats, PrivateKey,
    PublicKey,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Default IP MTU inside the tunnel (WireGuard's usual 1420).
pub const DEFAULT_MTU: usize = 1420;
/// Default size of the UDP socket's send and receive buffers.
pub const DEFAULT_UDP_BUFFER: usize = 4 << 20;
/// Keep-alive probe interval on idle tailnet TCP connections.
pub const TCP_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(30);
/// A tailnet TCP connection whose peer stays silent this long (unanswered
/// data or keep-alives) is aborted.
pub const TCP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);
/// Default per-connection TCP buffer in the netstack, each direction.
pub const DEFAULT_TCP_BUFFER: usize = 1 << 20;

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's static private key.
    pub private_key: PrivateKey,
    /// The node's tailnet addresses (may be empty until the control plane assigns them).
    pub addresses: Vec<IpAddr>,
    /// UDP port for WireGuard (0 picks one).
    pub listen_port: u16,
    /// IP MTU inside the tunnel.
    pub mtu: usize,
    /// Static peers present from the start.
    pub peers: Vec<PeerConfig>,
    /// UDP socket buffer size (each direction).
    pub udp_buffer: usize,
    /// Per-connection TCP buffer size in the netstack (each direction).
    pub tcp_buffer: usize,
}

impl NodeConfig {
    /// A configuration with defaults for everything but the key.
    pub fn new(private_key: PrivateKey) -> Self {
        Self {
            private_key,
            addresses: Vec::new(),
            listen_port: 0,
            mtu: DEFAULT_MTU,
            peers: Vec::new(),
            udp_buffer: DEFAULT_UDP_BUFFER,
            tcp_buffer: DEFAULT_TCP_BUFFER,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The UDP socket could not be bound.
    #[error("cannot bind the WireGuard UDP socket on port {port}: {source}")]
    Bind {
        /// The port asked for.
        port: u16,
        /// The OS error.
        source: std::io::Error,
    },
    /// The netstack rejected its configuration.
    #[error("netstack: {0}")]
    Netstack(#[from] tailnode_netstack::NetstackError),
}

/// The node's packet task has stopped (the node was shut down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the node has stopped")]
pub struct NodeStopped;

/// Why a peer could not be added or updated.
#[derive(Debug, thiserror::Error)]
pub enum PeerUpdateError {
    /// The node has stopped.
    #[error(transparent)]
    Stopped(#[from] NodeStopped),
    /// The engine refused the peer (invalid key, the node's own key).
    #[error(transparent)]
    Rejected(#[from] PeerError),
}

/// Where the tailnet sends a destination address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// One of this node's own addresses.
    Local,
    /// A peer's allowed IPs cover it.
    Peer {
        /// The peer that gets the packets.
        peer: PublicKey,
        /// Whether the peer has an endpoint to send to.
        has_endpoint: bool,
    },
    /// Outside the tailnet.
    None,
}

/// A monotonically increasing counter shared between tasks.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds one.
    pub fn increment(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn value(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters of the packet path that the engine does not keep itself.
#[derive(Debug, Clone, Default)]
pub struct DataPlaneCounters {
    /// UDP datagrams the OS refused to send.
    pub udp_send_errors: Counter,
    /// Datagrams received on the WireGuard UDP socket (valid or not).
    pub rx_datagrams: Counter,
    /// Bytes of those datagrams (UDP payload).
    pub rx_bytes: Counter,
    /// Datagrams sent on the WireGuard UDP socket.
    pub tx_datagrams: Counter,
    /// Bytes of those datagrams (UDP payload).
    pub tx_bytes: Counter,
    /// WireGuard handshakes completed (either side initiating).
    pub handshakes_completed: Counter,
    /// Times a peer's handshake attempts were given up (no answer within 90 s).
    pub handshakes_failed: Counter,
}

/// Client connections of one proxy: open now, and accepted so far.
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    active: AtomicU64,
    total: AtomicU64,
}

impl ConnectionCounters {
    /// Counts a connection as accepted and open until the returned guard is dropped.
    pub fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(Arc::clone(self))
    }
    /// Connections open now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
    /// Connections accepted so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// One open connection of [`ConnectionCounters`]; closing it (dropping) decrements `active`.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<ConnectionCounters>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connection counters of the proxies served on a node, for metrics. The proxies find them
/// through [`NodeHandle::proxy_counters`].
#[derive(Debug, Clone, Default)]
pub struct ProxyCounters {
    /// The SOCKS5 proxy.
    pub socks5: Arc<ConnectionCounters>,
    /// The HTTP proxy.
    pub http: Arc<ConnectionCounters>,
}

/// A request to the packet task.
pub(crate) enum Command {
    Upsert(
        Box<PeerConfig>,
        oneshot::Sender<Result<PeerChange, PeerError>>,
    ),
    Remove(PublicKey, oneshot::Sender<bool>),
    Reset(PublicKey, oneshot::Sender<bool>),
    Peers(oneshot::Sender<Vec<PeerStats>>),
    EngineStats(oneshot::Sender<EngineStats>),
    Route(IpAddr, oneshot::Sender<Route>),
}

impl Command {
    fn apply(self, engine: &mut Engine, addresses: &[IpAddr], now: Instant) {
        // A dropped receiver means the caller gave up waiting; nothing to do.
        match self {
            Command::Upsert(peer, reply) => {
                let key = peer.public_key;
                let change = engine.upsert_peer(*peer, now);
                match &change {
                    Ok(change) => debug!(peer = %key.short(), ?change, "peer configured"),
                    Err(e) => warn!(peer = %key.short(), error = %e, "peer rejected"),
                }
                let _ = reply.send(change);
            }
            Command::Remove(key, reply) => {
                let removed = engine.remove_peer(&key);
                if removed {
                    info!(peer = %key.short(), "peer removed");
                }
                let _ = reply.send(removed);
            }
            Command::Reset(key, reply) => {
                let _ = reply.send(engine.reset_peer(&key, now));
            }
            Command::Peers(reply) => {
                let _ = reply.send(engine.peers(now));
            }
            Command::EngineStats(reply) => {
                let _ = reply.send(engine.stats().clone());
            }
            Command::Route(ip, reply) => {
                let route = if addresses.contains(&ip) {
                    Route::Local
                } else {
                    match engine.route(ip) {
                        Some(peer) => Route::Peer {
                            peer,
                            has_endpoint: engine
                                .peer_stats(&peer, now)
                                .is_some_and(|s| s.endpoint.is_some()),
                        },
                        None => Route::None,
                    }
                };
                let _ = reply.send(route);
            }
        }
    }
}

/// A running node. Dropping it does not stop it: cancel the token given to
/// [`Node::start`] (or call [`Node::shutdown`]).
pub struct Node {
    handle: NodeHandle,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Node {
    /// Binds the UDP socket, builds the engine and the netstack, and starts
    /// the packet task. The node stops when `cancel` fires.
    ///
    /// # Errors
    /// [`NodeError`] when the socket cannot be bound or the netstack config is bad.
    pub async fn start(config: NodeConfig, cancel: CancellationToken) -> Result<Self, NodeError> {
        let udp = bind_dual_stack(config.listen_port, config.udp_buffer)?;
        Self::start_with_io(config, udp, cancel)
    }

    /// Starts the node on the datagram socket `io` instead of binding one (`listen_port` and
    /// `udp_buffer` are not used). Time is tokio's clock, so a paused runtime drives the whole
    /// node.
    ///
    /// # Errors
    /// [`NodeError`] when the socket has no local address or the netstack config is bad.
    pub fn start_with_io<D: DatagramIo>(
        config: NodeConfig,
        io: D,
        cancel: CancellationToken,
    ) -> Result<Self, NodeError> {
        let udp = io;
        let local_udp = udp.local_addr().map_err(|source| NodeError::Bind {
            port: config.listen_port,
            source,
        })?;
        let now = tokio::time::Instant::now().into_std();
        let mut engine = Engine::new(EngineConfig::new(config.private_key.clone()), now);
        for peer in config.peers {
            let key = peer.public_key;
            if let Err(e) = engine.upsert_peer(peer, now) {
                warn!(peer = %key.short(), error = %e, "peer rejected");
            }
        }
        let mut stack_config = NetstackConfig::with_addresses(config.addresses.clone());
        stack_config.mtu = config.mtu;
        stack_config.tcp_rx_buffer = config.tcp_buffer;
        stack_config.tcp_tx_buffer = config.tcp_buffer;
        // A peer that vanished must not pin connections (and their buffers)
        // forever: probe idle connections, give up on silent ones.
        stack_config.tcp_keep_alive = Some(TCP_KEEP_ALIVE);
        stack_config.tcp_timeout = Some(TCP_TIMEOUT);
        let netstack = Netstack::new(stack_config, now)?;
        let (tx, rx) = mpsc::channel(64);
        let counters = DataPlaneCounters::default();
        let handle = NodeHandle {
            inner: Arc::new(HandleInner {
                netstack: netstack.clone(),
                commands: tx,
                public_key: config.private_key.public_key(),
                local_udp,
                counters: counters.clone(),
                proxies: ProxyCounters::default(),
            }),
        };
        let driver = driver::Driver {
            engine,
            netstack,
            udp,
            commands: rx,
            cancel: cancel.clone(),
            counters,
            pooled_len: driver::pooled_len(config.mtu),
        };
        let tasks = TaskTracker::new();
        tasks.spawn(driver.run());
        info!(
            public_key = %handle.public_key().short(),
            udp = %local_udp,
            addresses = ?config.addresses,
            "node started"
        );
        Ok(Self {
            handle,
            cancel,
            tasks,
        })
    }

    /// A handle to the running node.
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Stops the node and waits for its packet task to end.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

fn bind_dual_stack(port: u16, buffer: usize) -> Result<tokio::net::UdpSocket, NodeError> {
    let v6 = SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), port);
    match tailnode_wg::udp::bind_udp(v6, buffer) {
        Ok(sock) => Ok(sock),
        Err(e6) => {
            // Hosts and containers without IPv6: fall back to IPv4 only.
            let v4 = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port);
            tailnode_wg::udp::bind_udp(v4, buffer).map_err(|e4| {
                tracing::debug!(error = %e6, "IPv6 UDP bind failed");
                NodeError::Bind { port, source: e4 }
            })
        }
    }
}

struct HandleInner {
    netstack: Netstack,
    commands: mpsc::Sender<Command>,
    public_key: PublicKey,
    local_udp: SocketAddr,
    counters: DataPlaneCounters,
    proxies: ProxyCounters,
}

/// A cheap, cloneable handle to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    inner: Arc<HandleInner>,
}

impl NodeHandle {
    /// The node's netstack, for opening and accepting tailnet connections.
    pub fn netstack(&self) -> &Netstack {
        &self.inner.netstack
    }

    /// The node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.inner.public_key
    }

    /// The local address of the WireGuard UDP socket.
    pub fn udp_addr(&self) -> SocketAddr {
        self.inner.local_udp
    }

    /// Counters of the packet path.
    pub fn counters(&self) -> &DataPlaneCounters {
        &self.inner.counters
    }

    /// Connection counters for the proxies serving this node.
    pub fn proxy_counters(&self) -> &ProxyCounters {
        &self.inner.proxies
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NodeStopped> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commands
            .send(make(tx))
            .await
            .map_err(|_| NodeStopped)?;
        rx.await.map_err(|_| NodeStopped)
    }

    /// Adds a peer, or updates one in place without disturbing its session.
    ///
    /// # Errors
    /// [`PeerUpdateError`] when the node has shut down or the engine refuses the peer.
    pub async fn upsert_peer(&self, peer: PeerConfig) -> Result<PeerChange, PeerUpdateError> {
        Ok(self.ask(|tx| Command::Upsert(Box::new(peer), tx)).await??)
    }

    /// Removes a peer; returns whether it existed.
    ///
    /// # Errors
    /// [`NodeStopped`] once the node has shut down.
    pub async fn remove_peer(&self, key: PublicKey) -> Result<bool, NodeStopped> {
        self.ask(|tx| Command::Remove(key, tx)).await
    }

    /// Drops a peer's sessions so that the next packet starts a fresh handshake.
    ///
    /// # Errors
    /// [`NodeStopped`] once the node has shut down.
    pub async fn reset_peer(&self, key: PublicKey) -> Result<bool, NodeStopped> {
        self.ask(|tx| Command::Reset(key, tx)).await
    }

    /// Every peer with its statistics.
    ///
    /// # Errors
    /// [`NodeStopped`] once the node has shut down.
    pub async fn peers(&self) -> Result<Vec<PeerStats>, NodeStopped> {
        self.ask(Command::Peers).await
    }

    /// The WireGuard engine's counters (datagrams, drops by reason).
    ///
    /// # Errors
    /// [`NodeStopped`] once the node has shut down.
    pub async fn engine_stats(&self) -> Result<EngineStats, NodeStopped> {
        self.ask(Command::EngineStats).await
    }

    /// Where the tailnet would send packets for `ip`.
    ///
    /// # Errors
    /// [`NodeStopped`] once the node has shut down.
    pub async fn route(&self, ip: IpAddr) -> Result<Route, NodeStopped> {
        self.ask(|tx| Command::Route(ip, tx)).await
    }
}
