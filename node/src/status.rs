//! The status document (`GET /v1/status`, `tailnode status --json`) and what it is made from:
//! the data plane's peers, the controller's state and the coordinated peers' lifecycle.
//!
//! Its fields are stable: new fields may be added, existing ones keep their name and meaning
//! (`version` changes otherwise). Durations are seconds as floating point numbers, ages are
//! "seconds ago".

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tailnode_control::controller::{
    ConnectionState, ControlStatus, CoordinatorUrl, PeerDirectory, PeerState,
};
use tailnode_wg::PublicKey;
use tokio::sync::watch;

use crate::coordinated::node_key;
use crate::endpoints::local_endpoints;
use crate::node::{Counter, NodeHandle};

/// Version of the [`Status`] document.
pub const STATUS_VERSION: u32 = 1;
/// What the control plane exposes to the API.
#[derive(Clone)]
pub struct ControlHandles {
    /// The controller's status.
    pub status: watch::Receiver<ControlStatus>,
    /// Coordinated peers and their lifecycle states.
    pub directory: PeerDirectory,
    /// The coordinator.
    pub url: Option<CoordinatorUrl>,
}

/// Everything the status document is made from.
#[derive(Clone)]
pub struct StatusSource {
    node: NodeHandle,
    control: Option<ControlHandles>,
    static_peers: Vec<PublicKey>,
    /// API requests answered with an error status (4xx, 5xx); shared by clones.
    errors: Counter,
}

impl StatusSource {
    /// A source for `node`.
    pub fn new(
        node: NodeHandle,
        control: Option<ControlHandles>,
        static_peers: Vec<PublicKey>,
    ) -> Self {
        Self {
            node,
            control,
            static_peers,
            errors: Counter::default(),
        }
    }

    /// The node.
    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    /// The control plane's handles, when the node is coordinated.
    pub fn control(&self) -> Option<&ControlHandles> {
        self.control.as_ref()
    }

    /// Counts an API request answered with an error status.
    pub(crate) fn count_api_error(&self) {
        self.errors.increment();
    }

    /// API requests answered with an error status so far.
    pub fn api_errors(&self) -> u64 {
        self.errors.value()
    }

    /// The status document now.
    pub async fn status(&self) -> Status {
        let now = Instant::now();
        let ago = |t: Instant| secs(now.saturating_duration_since(t));
        let engine_peers = self.node.peers().await.unwrap_or_default();
        let control_status = self.control.as_ref().map(|c| c.status.borrow().clone());
        let me = control_status.as_ref().and_then(|s| s.self_info.clone());
        // Lifecycle states of coordinated peers, by key.
        let lifecycle: HashMap<
            tailnode_control::proto::NodeKey,
            (String, PeerState, Instant, Vec<IpAddr>),
        > = self
            .control
            .as_ref()
            .map(|c| {
                c.directory.with(|l| {
                    l.peers()
                        .map(|(k, e)| {
                            let info = e.info();
                            (
                                *k,
                                (
                                    info.name.clone(),
                                    e.state(),
                                    e.state_since(),
                                    vec![IpAddr::V4(info.ipv4), IpAddr::V6(info.ipv6)],
                                ),
                            )
                        })
                        .collect()
                })
            })
            .unwrap_or_default();

        let mut peers = Vec::new();
        for p in &engine_peers {
            let coordinated = lifecycle.get(&node_key(&p.public_key));
            let (state, state_seconds) = match coordinated {
                Some((_, PeerState::Lost { .. }, since, _)) => ("lost", Some(ago(*since))),
                Some((_, _, since, _)) => ("active", Some(ago(*since))),
                None => ("active", None),
            };
            peers.push(PeerStatus {
                name: coordinated.map(|c| c.0.clone()),
                public_key: p.public_key.to_base64(),
                allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
                endpoint: p.endpoint,
                last_handshake_seconds_ago: p.last_handshake.map(ago),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                rx_packets: p.rx_packets,
                tx_packets: p.tx_packets,
                state: state.to_string(),
                state_seconds,
                source: if self.static_peers.contains(&p.public_key) && coordinated.is_none() {
                    "static"
                } else {
                    "coordinated"
                }
                .to_string(),
            });
        }
        // Expired peers are out of the engine; the lifecycle remembers them.
        for (key, (name, state, since, addrs)) in &lifecycle {
            if let PeerState::Expired { .. } = state {
                peers.push(PeerStatus {
                    name: Some(name.clone()),
                    public_key: key.to_string(),
                    allowed_ips: addrs
                        .iter()
                        .map(|ip| ipnet::IpNet::from(*ip).to_string())
                        .collect(),
                    endpoint: None,
                    last_handshake_seconds_ago: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    rx_packets: 0,
                    tx_packets: 0,
                    state: "expired".to_string(),
                    state_seconds: Some(ago(*since)),
                    source: "coordinated".to_string(),
                });
            }
        }
        peers.sort_by(|a, b| a.name.cmp(&b.name).then(a.public_key.cmp(&b.public_key)));

        let udp = self.node.udp_addr();
        Status {
            version: STATUS_VERSION,
            node: NodeStatus {
                name: me.as_ref().map(|m| m.name.clone()),
                public_key: self.node.public_key().to_base64(),
                addresses: self.node.netstack().addresses(),
                domain: me.as_ref().map(|m| m.domain.clone()),
                udp_port: udp.port(),
                endpoints: local_endpoints(udp.port(), udp.is_ipv6()),
                observed_addr: me.as_ref().map(|m| m.observed_addr),
                control: control_json(self.control.as_ref(), control_status.as_ref(), now),
            },
            peers,
        }
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn control_json(
    handles: Option<&ControlHandles>,
    status: Option<&ControlStatus>,
    now: Instant,
) -> ControlJson {
    let (Some(handles), Some(status)) = (handles, status) else {
        return ControlJson {
            coordinator: None,
            state: "disabled".to_string(),
            ..ControlJson::default()
        };
    };
    let ago = |t: Instant| secs(now.saturating_duration_since(t));
    let (state, state_seconds, attempts, next_dial_in) = match status.state {
        ConnectionState::Connecting { since, attempt } => {
            ("connecting", Some(ago(since)), attempt, None)
        }
        ConnectionState::Connected { since } => ("connected", Some(ago(since)), 0, None),
        ConnectionState::Backoff { until, attempts } => (
            "backoff",
            None,
            attempts,
            Some(secs(until.saturating_duration_since(now))),
        ),
        ConnectionState::Stopped => ("stopped", None, 0, None),
    };
    ControlJson {
        coordinator: handles.url.as_ref().map(ToString::to_string),
        state: state.to_string(),
        state_seconds,
        attempts,
        next_dial_in_seconds: next_dial_in,
        last_error: status.last_error.as_ref().map(|e| LastErrorJson {
            kind: e.kind.to_string(),
            message: e.message.clone(),
            seconds_ago: ago(e.at),
        }),
        last_coordination_seconds_ago: status.last_coordination.map(ago),
        sessions_started: status.sessions_started,
        dials: status.dials,
        dial_failures: status
            .dial_failures_by_kind
            .iter()
            .map(|(k, v)| ((*k).to_string(), *v))
            .collect(),
    }
}

/// The status document (`GET /v1/status`, `tailnode status --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Document version ([`STATUS_VERSION`]).
    pub version: u32,
    /// This node.
    pub node: NodeStatus,
    /// Every peer: in the engine (active, lost) or remembered (expired).
    pub peers: Vec<PeerStatus>,
}

/// This node in the status document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Name assigned by the coordinator (none without one).
    pub name: Option<String>,
    /// WireGuard public key (base64).
    pub public_key: String,
    /// Tailnet addresses.
    pub addresses: Vec<IpAddr>,
    /// The tailnet's DNS domain.
    pub domain: Option<String>,
    /// WireGuard UDP port.
    pub udp_port: u16,
    /// UDP endpoints on local interfaces.
    pub endpoints: Vec<SocketAddr>,
    /// The address the coordinator saw us connect from.
    pub observed_addr: Option<SocketAddr>,
    /// Control-plane state.
    pub control: ControlJson,
}

/// Control-plane state in the status document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlJson {
    /// Coordinator URL (none when the node has only static peers).
    pub coordinator: Option<String>,
    /// `disabled`, `connecting`, `connected`, `backoff` or `stopped`.
    pub state: String,
    /// Seconds in the current state (connecting, connected).
    pub state_seconds: Option<f64>,
    /// Failed attempts since the last healthy session.
    pub attempts: u32,
    /// Seconds until the next dial (backoff).
    pub next_dial_in_seconds: Option<f64>,
    /// The most recent failure.
    pub last_error: Option<LastErrorJson>,
    /// Seconds since the coordinator was last heard from.
    pub last_coordination_seconds_ago: Option<f64>,
    /// Sessions opened since start.
    pub sessions_started: u64,
    /// Dials since start.
    pub dials: u64,
    /// Dial failures by cause (`timeout`, `refused`, `dns`, `tls`, ...).
    pub dial_failures: BTreeMap<String, u64>,
}

/// A control-plane failure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastErrorJson {
    /// Cause (`timeout`, `refused`, `dns`, `tls`, `http`, `websocket`, `protocol`, `rejected`, ...).
    pub kind: String,
    /// The message.
    pub message: String,
    /// When, in seconds ago.
    pub seconds_ago: f64,
}

/// One peer in the status document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Name (coordinated peers).
    pub name: Option<String>,
    /// WireGuard public key (base64).
    pub public_key: String,
    /// Allowed IPs (the peer's addresses for coordinated peers).
    pub allowed_ips: Vec<String>,
    /// Current UDP endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Seconds since the last completed handshake.
    pub last_handshake_seconds_ago: Option<f64>,
    /// Bytes received from the peer (WireGuard datagrams).
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
    /// Datagrams received.
    pub rx_packets: u64,
    /// Datagrams sent.
    pub tx_packets: u64,
    /// `active`, `lost` or `expired`.
    pub state: String,
    /// Seconds in that state (coordinated peers).
    pub state_seconds: Option<f64>,
    /// `static` (wg-quick file) or `coordinated`.
    pub source: String,
}
