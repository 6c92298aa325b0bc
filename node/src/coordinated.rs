//! The node as the controller's data plane: coordinated peers become
//! WireGuard peers of the engine, the assigned addresses become the
//! netstack's, and each peer's candidate endpoints are tried in turn until a
//! handshake succeeds.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tailnode_control::controller::{DataPlane, SelfInfo};
use tailnode_control::proto::{NodeKey, PeerInfo};
use tailnode_wg::{PeerConfig, PublicKey};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::endpoints::local_endpoints;
use crate::node::NodeHandle;

/// How long one candidate endpoint is tried without a handshake before the
/// next one: a little more than one handshake retransmission (5 s).
pub const ENDPOINT_TRY_TIME: Duration = Duration::from_millis(5_500);

/// A handshake younger than this means the peer's current endpoint works
/// (WireGuard's REJECT_AFTER_TIME: sessions are never older).
const SESSION_FRESH: Duration = Duration::from_secs(180);

/// How often candidates are re-examined.
const PROBE_TICK: Duration = Duration::from_secs(1);

/// Converts between the control plane's and the engine's key types.
pub fn public_key(key: &NodeKey) -> PublicKey {
    PublicKey::from_bytes(*key.as_bytes())
}

/// Converts between the engine's and the control plane's key types.
pub fn node_key(key: &PublicKey) -> NodeKey {
    NodeKey(*key.as_bytes())
}

/// How many peer changes a slow [`NodeDataPlane::peer_changes`] subscriber may fall behind
/// before it misses some (it is told how many, as `RecvError::Lagged`).
pub const PEER_CHANGES_BACKLOG: usize = 256;

/// A change the controller made to the node's coordinated peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    /// A peer was added to the data plane or updated in place.
    Upserted {
        /// The peer's WireGuard key.
        public_key: PublicKey,
        /// Its name in the tailnet.
        name: String,
        /// It had been removed (expired) and was rebuilt with a new WireGuard session.
        fresh_session: bool,
    },
    /// A peer left the data plane (expired, or it said goodbye).
    Removed {
        /// The peer's WireGuard key.
        public_key: PublicKey,
    },
}

/// The node seen by the controller.
pub struct NodeDataPlane {
    node: NodeHandle,
    changes: tokio::sync::broadcast::Sender<PeerChange>,
    /// Addresses from a wg-quick file, kept beside the assigned ones.
    static_addresses: Vec<IpAddr>,
    /// Endpoints given with `--endpoint`; when set they replace discovery.
    advertised: Vec<SocketAddr>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    me: Option<SelfInfo>,
    peers: HashMap<NodeKey, Candidates>,
}

/// A peer's endpoints, best first, and which one is being tried.
struct Candidates {
    list: Vec<SocketAddr>,
    current: usize,
    since: Instant,
}

impl NodeDataPlane {
    /// A data plane over `node`.
    pub fn new(
        node: NodeHandle,
        static_addresses: Vec<IpAddr>,
        advertised: Vec<SocketAddr>,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            changes: tokio::sync::broadcast::channel(PEER_CHANGES_BACKLOG).0,
            static_addresses,
            advertised,
            state: Mutex::new(State::default()),
        })
    }

    /// Every change to the coordinated peers from now on.
    pub fn peer_changes(&self) -> tokio::sync::broadcast::Receiver<PeerChange> {
        self.changes.subscribe()
    }

    /// What the coordinator assigned, once welcomed.
    pub fn self_info(&self) -> Option<SelfInfo> {
        self.lock().me.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Orders a peer's endpoints: loopback ones are useful only when we
    /// reach the coordinator over loopback too (same host); otherwise they
    /// would point at our own machine.
    fn candidates(&self, endpoints: &[SocketAddr]) -> Vec<SocketAddr> {
        let me_local = self
            .lock()
            .me
            .as_ref()
            .is_some_and(|m| m.observed_addr.ip().is_loopback());
        endpoints
            .iter()
            .copied()
            .filter(|e| me_local || !e.ip().is_loopback())
            .collect()
    }

    /// Tries the next candidate endpoint of every peer that has had no
    /// handshake on its current one for [`ENDPOINT_TRY_TIME`]. Runs until
    /// `cancel`.
    pub async fn probe_endpoints(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(PROBE_TICK) => {}
            }
            let Ok(stats) = self.node.peers().await else {
                return;
            };
            let now = tokio::time::Instant::now().into_std();
            let mut switches = Vec::new();
            {
                let mut state = self.lock();
                for s in &stats {
                    let key = node_key(&s.public_key);
                    let Some(c) = state.peers.get_mut(&key) else {
                        continue;
                    };
                    let fresh = s
                        .last_handshake
                        .is_some_and(|h| now.saturating_duration_since(h) < SESSION_FRESH);
                    if fresh || c.list.len() < 2 {
                        c.since = now;
                        continue;
                    }
                    if now.saturating_duration_since(c.since) >= ENDPOINT_TRY_TIME {
                        c.current = (c.current + 1) % c.list.len();
                        c.since = now;
                        switches.push((s.clone(), c.list[c.current]));
                    }
                }
            }
            for (s, endpoint) in switches {
                debug!(peer = %s.public_key.short(), %endpoint, "no handshake yet; trying the next endpoint");
                let config = PeerConfig {
                    public_key: s.public_key,
                    preshared_key: None,
                    allowed_ips: s.allowed_ips.clone(),
                    endpoint: Some(endpoint),
                    persistent_keepalive: s.persistent_keepalive,
                };
                if self.node.upsert_peer(config).await.is_err() {
                    return;
                }
            }
        }
    }
}

impl DataPlane for NodeDataPlane {
    async fn set_self(&self, me: SelfInfo) {
        let mut addresses = self.static_addresses.clone();
        for ip in [IpAddr::V4(me.ipv4), IpAddr::V6(me.ipv6)] {
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
        if let Err(e) = self.node.netstack().set_addresses(addresses.clone()) {
            warn!(error = %e, "cannot use the assigned addresses");
        }
        info!(name = %me.name, ipv4 = %me.ipv4, ipv6 = %me.ipv6, domain = %me.domain, "joined the tailnet");
        self.lock().me = Some(me);
    }

    async fn upsert_peer(&self, peer: &PeerInfo, fresh_session: bool) {
        let list = self.candidates(&peer.endpoints);
        let endpoint = {
            let mut state = self.lock();
            match state.peers.get_mut(&peer.node_key) {
                // Same candidates: keep the endpoint in use (it may have roamed).
                Some(c) if c.list == list && !fresh_session => None,
                _ => {
                    state.peers.insert(
                        peer.node_key,
                        Candidates {
                            list: list.clone(),
                            current: 0,
                            since: tokio::time::Instant::now().into_std(),
                        },
                    );
                    list.first().copied()
                }
            }
        };
        let config = PeerConfig {
            public_key: public_key(&peer.node_key),
            preshared_key: None,
            allowed_ips: vec![
                ipnet::IpNet::from(IpAddr::V4(peer.ipv4)),
                ipnet::IpNet::from(IpAddr::V6(peer.ipv6)),
            ],
            endpoint,
            persistent_keepalive: None,
        };
        match self.node.upsert_peer(config).await {
            Ok(change) => debug!(peer = %peer.name, ?change, "coordinated peer applied"),
            Err(e) => warn!(peer = %peer.name, error = %e, "coordinated peer refused"),
        }
        if fresh_session {
            let _ = self.node.reset_peer(public_key(&peer.node_key)).await;
        }
        // Nobody listening is fine.
        let _ = self.changes.send(PeerChange::Upserted {
            public_key: public_key(&peer.node_key),
            name: peer.name.clone(),
            fresh_session,
        });
    }

    async fn remove_peer(&self, key: &NodeKey) {
        self.lock().peers.remove(key);
        let _ = self.node.remove_peer(public_key(key)).await;
        let _ = self.changes.send(PeerChange::Removed {
            public_key: public_key(key),
        });
    }

    async fn last_handshakes(&self) -> HashMap<NodeKey, Instant> {
        self.node
            .peers()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| p.last_handshake.map(|h| (node_key(&p.public_key), h)))
            .collect()
    }

    fn endpoints(&self) -> Vec<SocketAddr> {
        if self.advertised.is_empty() {
            local_endpoints(self.node.udp_addr().port(), self.node.udp_addr().is_ipv6())
        } else {
            self.advertised.clone()
        }
    }
}
