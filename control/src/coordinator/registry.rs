//! The sans-IO heart of the coordinator: who is in the tailnet, under which
//! identity, and which frames go to which session.
//!
//! [`Registry`] owns no socket, spawns no task and reads no clock. The driver
//! feeds it session events (`handle_hello`, `handle_update`,
//! `handle_goodbye`, `handle_closed`, `handle_timeout`), each with `now`, and
//! drains [`Output`]s with [`Registry::poll_output`]: frames for sessions,
//! "close this session" orders and "persist the state" requests.
//!
//! # Invariants
//!
//! - A node key is bound to at most one admitted session; a second session of
//!   the same key replaces the first ([`ErrorCode::Replaced`]), and the
//!   replaced session's later end is *not* announced as `lost`.
//! - A node is `Online` (admitted session), `Lost` (session ended without
//!   `goodbye`, kept in snapshots until the lost-entry expiry) or `Offline`
//!   (said goodbye, expired, or never seen since start-up). Identities
//!   (name, addresses) outlive all three and are persisted.
//! - A session receives `welcome` and `snapshot` before any `peer_update`,
//!   because both are queued by the same `handle_hello` call that makes the
//!   session a broadcast recipient.
//! - Every fanned-out message is serialized once; each recipient gets a
//!   reference-counted clone of the same [`Frame`]. Each node's `PeerInfo` is
//!   kept pre-serialized, so a snapshot is a concatenation, not a
//!   serialization of every peer.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::{Ipv4Net, Ipv6Net};
use subtle::ConstantTimeEq;
use tracing::{debug, info, warn};

use super::CoordinatorError;
use super::state::{NodeRecord, STATE_VERSION, StateFile};
use crate::proto::{
    ClientMessage, ErrorCode, MAX_ENDPOINTS, MAX_NAME_LEN, NodeKey, PROTOCOL_VERSION, PeerInfo,
    PeerStatus, ServerMessage, UpdateKind, sanitize_name,
};

/// Identifies one websocket session; chosen by the driver, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// A serialized [`ServerMessage`] (JSON, so valid UTF-8), ready for a websocket text frame.
/// Cloning is a reference-count increment, so one frame can go to any number
/// of sessions.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame(Bytes);

impl Frame {
    /// Serializes a message.
    pub fn encode(message: &ServerMessage) -> Self {
        Self::from_string(message.to_json())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        // Always valid: frames are only made from `String`s.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Decodes the frame back into a message (for tests and logs).
    ///
    /// # Errors
    /// Only if the frame was not made from a valid message.
    pub fn decode(&self) -> Result<ServerMessage, crate::proto::DecodeError> {
        ServerMessage::from_json(self.as_str())
    }

    /// The frame's bytes (UTF-8 JSON), shared with every clone.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    fn from_string(s: String) -> Self {
        Frame(Bytes::from(s))
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.as_str();
        match s.char_indices().nth(120) {
            Some((end, _)) => write!(f, "Frame({}...)", &s[..end]),
            None => write!(f, "Frame({s})"),
        }
    }
}

/// Why a session's message was refused: the `error` the coordinator sends
/// before it closes the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation (never contains the auth key).
    pub reason: String,
}

impl Rejection {
    /// A rejection with `code` and `reason`.
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Rejection {
            code,
            reason: reason.into(),
        }
    }

    /// The `error` frame for this rejection.
    pub fn frame(&self) -> Frame {
        Frame::encode(&ServerMessage::Error {
            code: self.code,
            reason: self.reason.clone(),
        })
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.reason)
    }
}

/// The tailnet's shared auth key. Compared in constant time; never printed.
#[derive(Clone)]
pub struct AuthKey(String);

impl AuthKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        AuthKey(key.into())
    }

    /// Whether `offered` is this key. The time taken depends only on the
    /// length of the expected key, not on where `offered` differs from it.
    pub fn matches(&self, offered: &str) -> bool {
        let expected = self.0.as_bytes();
        let offered = offered.as_bytes();
        let mut equal = (expected.len() as u64).ct_eq(&(offered.len() as u64));
        for (i, e) in expected.iter().enumerate() {
            let o = offered.get(i).copied().unwrap_or(0);
            equal &= e.ct_eq(&o);
        }
        bool::from(equal)
    }

    /// Whether the key is empty (an empty key is refused at start-up).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthKey(<redacted>)")
    }
}

/// The fields of a `hello` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the node speaks.
    pub version: u32,
    /// The auth key the node offers.
    pub auth_key: String,
    /// The node's WireGuard public key.
    pub node_key: NodeKey,
    /// The name the node asks for.
    pub name: String,
    /// The node's WireGuard UDP port.
    pub udp_port: u16,
    /// Endpoints the node reported.
    pub endpoints: Vec<SocketAddr>,
}

impl Hello {
    /// The hello carried by `message`, or `None` if it is another message.
    pub fn from_message(message: ClientMessage) -> Option<Self> {
        match message {
            ClientMessage::Hello {
                version,
                auth_key,
                node_key,
                name,
                udp_port,
                endpoints,
            } => Some(Hello {
                version,
                auth_key,
                node_key,
                name,
                udp_port,
                endpoints,
            }),
            ClientMessage::Update { .. } | ClientMessage::Goodbye => None,
        }
    }
}

/// The tailnet-wide settings the registry needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// DNS domain of the tailnet, sent in `welcome`.
    pub domain: String,
    /// IPv4 range addresses are assigned from.
    pub ipv4_range: Ipv4Net,
    /// IPv6 prefix addresses are assigned from (same host number as IPv4).
    pub ipv6_prefix: Ipv6Net,
    /// How long a lost node stays in snapshots.
    pub lost_expiry: Duration,
}

/// What the registry asks the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Output {
    /// Queue `frame` for `session`.
    Send {
        /// Recipient.
        session: SessionId,
        /// The frame.
        frame: Frame,
    },
    /// Queue `frame` (an `error`) for `session`, then close it. The registry
    /// has already forgotten the session: its end is not announced.
    Close {
        /// The session to close.
        session: SessionId,
        /// The last frame it gets.
        frame: Frame,
    },
    /// The identity table changed: write [`Registry::state_file`] to disk.
    PersistState,
}

/// The registry of nodes and sessions; see the module docs.
#[derive(Debug)]
pub struct Registry {
    config: RegistryConfig,
    /// Usable host numbers are `1..=host_count`.
    host_count: u64,
    next_host: u64,
    nodes: HashMap<NodeKey, Node>,
    names: HashMap<String, NodeKey>,
    used_v4: HashSet<Ipv4Addr>,
    used_v6: HashSet<Ipv6Addr>,
    sessions: HashMap<SessionId, SessionState>,
    /// Lost nodes by the time they were lost, for expiry.
    lost: BTreeSet<(Instant, NodeKey)>,
    outputs: VecDeque<Output>,
}

#[derive(Debug)]
struct Node {
    record: NodeRecord,
    presence: Presence,
    /// `PeerInfo` as JSON, valid while the node is online or lost.
    info_json: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Presence {
    Offline,
    Online {
        session: SessionId,
        remote: SocketAddr,
        udp_port: u16,
        endpoints: Vec<SocketAddr>,
    },
    Lost {
        since: Instant,
        endpoints: Vec<SocketAddr>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionState {
    Admitted(NodeKey),
    Replaced,
}

impl Registry {
    /// A registry with the identities from `state` (all nodes offline).
    ///
    /// # Errors
    /// [`CoordinatorError::Config`] if the address ranges are too small or
    /// the domain is empty.
    pub fn new(config: RegistryConfig, state: StateFile) -> Result<Self, CoordinatorError> {
        let v4_bits = 32 - u32::from(config.ipv4_range.prefix_len());
        let v6_bits = 128 - u32::from(config.ipv6_prefix.prefix_len());
        if v4_bits < 2 {
            return Err(CoordinatorError::Config(format!(
                "IPv4 range {} has no room for nodes (use a prefix of /30 or shorter)",
                config.ipv4_range
            )));
        }
        if v6_bits < 2 {
            return Err(CoordinatorError::Config(format!(
                "IPv6 prefix {} has no room for nodes",
                config.ipv6_prefix
            )));
        }
        if config.domain.is_empty() {
            return Err(CoordinatorError::Config(
                "the tailnet domain is empty".into(),
            ));
        }
        // Host 0 is the network address; the last IPv4 address is broadcast.
        let v4_hosts = (1u64 << v4_bits) - 2;
        let v6_hosts = if v6_bits >= 64 {
            u64::MAX
        } else {
            (1u64 << v6_bits) - 1
        };
        let mut registry = Registry {
            host_count: v4_hosts.min(v6_hosts),
            next_host: 1,
            config,
            nodes: HashMap::new(),
            names: HashMap::new(),
            used_v4: HashSet::new(),
            used_v6: HashSet::new(),
            sessions: HashMap::new(),
            lost: BTreeSet::new(),
            outputs: VecDeque::new(),
        };
        for record in state.nodes {
            if !registry.config.ipv4_range.contains(&record.ipv4)
                || !registry.config.ipv6_prefix.contains(&record.ipv6)
            {
                warn!(
                    name = %record.name,
                    ipv4 = %record.ipv4,
                    ipv6 = %record.ipv6,
                    "stored addresses are outside the configured ranges; keeping them"
                );
            }
            registry.used_v4.insert(record.ipv4);
            registry.used_v6.insert(record.ipv6);
            registry.names.insert(record.name.clone(), record.node_key);
            registry.nodes.insert(
                record.node_key,
                Node {
                    record,
                    presence: Presence::Offline,
                    info_json: String::new(),
                },
            );
        }
        Ok(registry)
    }

    /// A session sent `hello`. Checks, in order: not already admitted,
    /// version, auth key, node key; then admits the session, queues
    /// `welcome` and `snapshot` for it and a `peer_update{node}` for every
    /// other session.
    ///
    /// # Errors
    /// A [`Rejection`] to send before closing the session; the registry is
    /// unchanged then.
    pub fn handle_hello(
        &mut self,
        session: SessionId,
        hello: Hello,
        remote: SocketAddr,
        auth: &AuthKey,
        now: Instant,
    ) -> Result<(), Rejection> {
        let _ = now;
        if self.sessions.contains_key(&session) {
            return Err(Rejection::new(
                ErrorCode::ProtocolViolation,
                "a second hello on the same session",
            ));
        }
        if hello.version != PROTOCOL_VERSION {
            return Err(Rejection::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "the node speaks protocol version {}, this coordinator speaks version {}",
                    hello.version, PROTOCOL_VERSION
                ),
            ));
        }
        if !auth.matches(&hello.auth_key) {
            return Err(Rejection::new(
                ErrorCode::BadAuthKey,
                "the auth key is not valid for this tailnet",
            ));
        }
        let key = hello.node_key;
        if !key.is_valid_x25519() {
            return Err(Rejection::new(
                ErrorCode::InvalidNodeKey,
                "the node key is not a usable X25519 public key (small-order point)",
            ));
        }
        let identity_changed = self.assign_identity(key, &hello.name)?;

        let remote = canonical(remote);
        let endpoints = effective_endpoints(remote, hello.udp_port, &hello.endpoints);
        let Some(node) = self.nodes.get_mut(&key) else {
            return Err(internal("identity vanished"));
        };
        // Whatever the node was, it is now online under this session.
        match std::mem::replace(
            &mut node.presence,
            Presence::Online {
                session,
                remote,
                udp_port: hello.udp_port,
                endpoints,
            },
        ) {
            Presence::Online { session: old, .. } => {
                info!(
                    name = %node.record.name,
                    key = %key.short(),
                    old = %old,
                    new = %session,
                    "session replaced by a newer one of the same node"
                );
                self.sessions.insert(old, SessionState::Replaced);
                self.outputs.push_back(Output::Close {
                    session: old,
                    frame: Rejection::new(
                        ErrorCode::Replaced,
                        "a newer session of this node replaced this one",
                    )
                    .frame(),
                });
            }
            Presence::Lost { since, .. } => {
                self.lost.remove(&(since, key));
            }
            Presence::Offline => {}
        }
        node.info_json = peer_info_json(&node.record, &node.presence);
        self.sessions.insert(session, SessionState::Admitted(key));

        let welcome = Frame::encode(&ServerMessage::Welcome {
            version: PROTOCOL_VERSION,
            name: node.record.name.clone(),
            ipv4: node.record.ipv4,
            ipv6: node.record.ipv6,
            domain: self.config.domain.clone(),
            observed_addr: remote,
        });
        info!(
            name = %node.record.name,
            key = %key.short(),
            ipv4 = %node.record.ipv4,
            %remote,
            session = %session,
            "node joined"
        );
        self.outputs.push_back(Output::Send {
            session,
            frame: welcome,
        });
        let snapshot = self.snapshot_frame(&key);
        self.outputs.push_back(Output::Send {
            session,
            frame: snapshot,
        });
        self.broadcast_update(key, UpdateKind::Node);
        if identity_changed {
            self.outputs.push_back(Output::PersistState);
        }
        Ok(())
    }

    /// An admitted session reported new endpoints. Fans out
    /// `peer_update{node}` if the effective endpoint list changed.
    ///
    /// # Errors
    /// [`ErrorCode::ProtocolViolation`] before `hello`,
    /// [`ErrorCode::Replaced`] on a replaced session.
    pub fn handle_update(
        &mut self,
        session: SessionId,
        endpoints: &[SocketAddr],
        now: Instant,
    ) -> Result<(), Rejection> {
        let _ = now;
        let key = self.admitted(session, "update")?;
        let Some(node) = self.nodes.get_mut(&key) else {
            return Err(internal("session without node"));
        };
        let Presence::Online {
            remote,
            udp_port,
            endpoints: current,
            ..
        } = &mut node.presence
        else {
            return Err(internal("admitted node not online"));
        };
        let new = effective_endpoints(*remote, *udp_port, endpoints);
        if new == *current {
            debug!(name = %node.record.name, "update without endpoint change");
            return Ok(());
        }
        debug!(name = %node.record.name, endpoints = ?new, "node endpoints changed");
        *current = new;
        node.info_json = peer_info_json(&node.record, &node.presence);
        self.broadcast_update(key, UpdateKind::Node);
        Ok(())
    }

    /// An admitted session said `goodbye`: the node goes offline and every
    /// other session gets `peer_update{disconnected}`. The driver closes the
    /// session; its later [`handle_closed`](Self::handle_closed) is a no-op.
    ///
    /// # Errors
    /// As [`handle_update`](Self::handle_update).
    pub fn handle_goodbye(&mut self, session: SessionId, now: Instant) -> Result<(), Rejection> {
        let _ = now;
        let key = self.admitted(session, "goodbye")?;
        self.sessions.remove(&session);
        let Some(node) = self.nodes.get_mut(&key) else {
            return Err(internal("session without node"));
        };
        // The disconnected announcement carries the node as it was.
        let last = peer_info_json_with_status(&node.record, &node.presence, PeerStatus::Lost);
        node.presence = Presence::Offline;
        node.info_json = String::new();
        info!(name = %node.record.name, key = %key.short(), session = %session, "node left (goodbye)");
        let frame = update_frame(UpdateKind::Disconnected, &last);
        self.broadcast(Some(session), &frame);
        Ok(())
    }

    /// A session ended (EOF, error, ping timeout, queue overflow, a refused
    /// message). If it was the node's admitted session the node becomes
    /// `lost` and every other session gets `peer_update{lost}`; otherwise
    /// (never admitted, said goodbye, replaced) nothing happens.
    pub fn handle_closed(&mut self, session: SessionId, now: Instant) {
        let Some(SessionState::Admitted(key)) = self.sessions.remove(&session) else {
            return;
        };
        let Some(node) = self.nodes.get_mut(&key) else {
            return;
        };
        let endpoints = match &mut node.presence {
            Presence::Online { endpoints, .. } => std::mem::take(endpoints),
            Presence::Lost { .. } | Presence::Offline => return,
        };
        node.presence = Presence::Lost {
            since: now,
            endpoints,
        };
        node.info_json = peer_info_json(&node.record, &node.presence);
        self.lost.insert((now, key));
        info!(name = %node.record.name, key = %key.short(), session = %session, "node lost (session ended without goodbye)");
        self.broadcast_update(key, UpdateKind::Lost);
    }

    /// Expires lost nodes older than the lost-entry expiry: they leave the
    /// snapshots (peers have dropped them on their own by then).
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(since, key)) = self.lost.first() {
            if now.saturating_duration_since(since) < self.config.lost_expiry {
                break;
            }
            self.lost.pop_first();
            if let Some(node) = self.nodes.get_mut(&key) {
                debug!(name = %node.record.name, "lost node expired from snapshots");
                node.presence = Presence::Offline;
                node.info_json = String::new();
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.lost
            .first()
            .map(|&(since, _)| since + self.config.lost_expiry)
    }

    /// The next thing for the driver to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The persistent part of the registry.
    pub fn state_file(&self) -> StateFile {
        let mut nodes: Vec<NodeRecord> = self.nodes.values().map(|n| n.record.clone()).collect();
        nodes.sort_by_key(|r| u32::from(r.ipv4));
        StateFile {
            version: STATE_VERSION,
            nodes,
        }
    }

    /// Number of admitted sessions (online nodes).
    pub fn online_count(&self) -> usize {
        self.sessions
            .values()
            .filter(|s| matches!(s, SessionState::Admitted(_)))
            .count()
    }

    /// The peer info of `key` as others see it, if the node is online or lost.
    pub fn peer(&self, key: &NodeKey) -> Option<PeerInfo> {
        let node = self.nodes.get(key)?;
        peer_info(&node.record, &node.presence)
    }

    /// The stored identity of `key`, if it was ever admitted.
    pub fn identity(&self, key: &NodeKey) -> Option<&NodeRecord> {
        self.nodes.get(key).map(|n| &n.record)
    }

    fn admitted(&self, session: SessionId, what: &str) -> Result<NodeKey, Rejection> {
        match self.sessions.get(&session) {
            Some(SessionState::Admitted(key)) => Ok(*key),
            Some(SessionState::Replaced) => Err(Rejection::new(
                ErrorCode::Replaced,
                "a newer session of this node replaced this one",
            )),
            None => Err(Rejection::new(
                ErrorCode::ProtocolViolation,
                format!("{what} before hello: the first message must be hello"),
            )),
        }
    }

    /// Looks up or creates the identity of `key` for the name it asks for.
    /// Returns whether the stored identity changed.
    fn assign_identity(&mut self, key: NodeKey, wanted: &str) -> Result<bool, Rejection> {
        let requested = sanitize_name(wanted);
        if let Some(node) = self.nodes.get(&key) {
            if node.record.requested_name == requested {
                return Ok(false);
            }
            // Same node, new name: free the old one first so a node can take
            // back its own base name.
            let old = node.record.name.clone();
            self.names.remove(&old);
            let name = self.unique_name(&requested);
            self.names.insert(name.clone(), key);
            if let Some(node) = self.nodes.get_mut(&key) {
                info!(old = %old, new = %name, key = %key.short(), "node renamed");
                node.record.name = name;
                node.record.requested_name = requested;
            }
            return Ok(true);
        }
        let Some((ipv4, ipv6)) = self.allocate_addresses() else {
            warn!(
                range = %self.config.ipv4_range,
                "address space exhausted; refusing a new node"
            );
            return Err(internal("the tailnet's address space is exhausted"));
        };
        let name = self.unique_name(&requested);
        self.names.insert(name.clone(), key);
        self.used_v4.insert(ipv4);
        self.used_v6.insert(ipv6);
        self.nodes.insert(
            key,
            Node {
                record: NodeRecord {
                    node_key: key,
                    name,
                    requested_name: requested,
                    ipv4,
                    ipv6,
                },
                presence: Presence::Offline,
                info_json: String::new(),
            },
        );
        Ok(true)
    }

    /// `base`, or `base-2`, `base-3`, ... whichever is free first, within
    /// [`MAX_NAME_LEN`]. Names are unique over every known identity, online
    /// or not, so a name always means the same node.
    fn unique_name(&self, base: &str) -> String {
        if !self.names.contains_key(base) {
            return base.to_owned();
        }
        // At most `names.len() + 1` candidates can be tried before a free one.
        let mut n: u64 = 2;
        loop {
            let suffix = format!("-{n}");
            let mut stem: String = base
                .chars()
                .take(MAX_NAME_LEN.saturating_sub(suffix.len()))
                .collect();
            while stem.ends_with('-') {
                stem.pop();
            }
            let candidate = format!("{stem}{suffix}");
            if !self.names.contains_key(&candidate) {
                return candidate;
            }
            n += 1;
        }
    }

    /// The first free host number at or after the cursor, as addresses.
    fn allocate_addresses(&mut self) -> Option<(Ipv4Addr, Ipv6Addr)> {
        let v4_base = u32::from(self.config.ipv4_range.network());
        let v6_base = u128::from(self.config.ipv6_prefix.network());
        for _ in 0..self.host_count.min(u64::from(u32::MAX)) {
            let host = self.next_host;
            self.next_host = host % self.host_count + 1;
            let Ok(host32) = u32::try_from(host) else {
                continue;
            };
            let ipv4 = Ipv4Addr::from(v4_base.wrapping_add(host32));
            let ipv6 = Ipv6Addr::from(v6_base.wrapping_add(u128::from(host)));
            if !self.used_v4.contains(&ipv4) && !self.used_v6.contains(&ipv6) {
                return Some((ipv4, ipv6));
            }
        }
        None
    }

    /// `snapshot` for `key`'s session: every other online or lost node.
    fn snapshot_frame(&self, key: &NodeKey) -> Frame {
        let mut peers: Vec<&Node> = self
            .nodes
            .iter()
            .filter(|(k, n)| *k != key && n.presence != Presence::Offline)
            .map(|(_, n)| n)
            .collect();
        // Deterministic order helps tests and diffs.
        peers.sort_by_key(|n| u32::from(n.record.ipv4));
        let len: usize = peers.iter().map(|n| n.info_json.len() + 1).sum();
        let mut json = String::with_capacity(len + 32);
        json.push_str(r#"{"type":"snapshot","peers":["#);
        for (i, node) in peers.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&node.info_json);
        }
        json.push_str("]}");
        Frame::from_string(json)
    }

    /// Sends `peer_update{kind}` about `key` to every other admitted session.
    fn broadcast_update(&mut self, key: NodeKey, kind: UpdateKind) {
        let Some(node) = self.nodes.get(&key) else {
            return;
        };
        let except = match node.presence {
            Presence::Online { session, .. } => Some(session),
            Presence::Lost { .. } | Presence::Offline => None,
        };
        let frame = update_frame(kind, &node.info_json);
        self.broadcast(except, &frame);
    }

    fn broadcast(&mut self, except: Option<SessionId>, frame: &Frame) {
        for (&session, state) in &self.sessions {
            if Some(session) == except || !matches!(state, SessionState::Admitted(_)) {
                continue;
            }
            self.outputs.push_back(Output::Send {
                session,
                frame: frame.clone(),
            });
        }
    }
}

/// The endpoints peers should try for a node, best first: the address the
/// coordinator saw the node connect from with the node's UDP port, then the
/// endpoints the node reported; unspecified addresses and port 0 dropped,
/// duplicates dropped, at most [`MAX_ENDPOINTS`].
pub fn effective_endpoints(
    remote: SocketAddr,
    udp_port: u16,
    reported: &[SocketAddr],
) -> Vec<SocketAddr> {
    let observed = SocketAddr::new(canonical(remote).ip(), udp_port);
    let mut out: Vec<SocketAddr> = Vec::with_capacity(reported.len().min(MAX_ENDPOINTS) + 1);
    for candidate in std::iter::once(observed).chain(reported.iter().map(|a| canonical(*a))) {
        if out.len() == MAX_ENDPOINTS {
            break;
        }
        if candidate.ip().is_unspecified() || candidate.port() == 0 || out.contains(&candidate) {
            continue;
        }
        out.push(candidate);
    }
    out
}

/// IPv4-mapped IPv6 addresses (from a dual-stack listener) as plain IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => SocketAddr::new(v6.to_canonical(), addr.port()),
        IpAddr::V4(_) => addr,
    }
}

fn internal(reason: &str) -> Rejection {
    Rejection::new(ErrorCode::Internal, reason)
}

fn peer_info(record: &NodeRecord, presence: &Presence) -> Option<PeerInfo> {
    let (endpoints, status) = match presence {
        Presence::Offline => return None,
        Presence::Online { endpoints, .. } => (endpoints.clone(), PeerStatus::Online),
        Presence::Lost { endpoints, .. } => (endpoints.clone(), PeerStatus::Lost),
    };
    Some(PeerInfo {
        node_key: record.node_key,
        name: record.name.clone(),
        ipv4: record.ipv4,
        ipv6: record.ipv6,
        endpoints,
        status,
    })
}

fn peer_info_json(record: &NodeRecord, presence: &Presence) -> String {
    match peer_info(record, presence) {
        // Serializing plain data cannot fail.
        Some(info) => serde_json::to_string(&info).unwrap_or_default(),
        None => String::new(),
    }
}

fn peer_info_json_with_status(
    record: &NodeRecord,
    presence: &Presence,
    status: PeerStatus,
) -> String {
    match peer_info(record, presence) {
        Some(mut info) => {
            info.status = status;
            serde_json::to_string(&info).unwrap_or_default()
        }
        None => String::new(),
    }
}

/// `peer_update` around a pre-serialized `PeerInfo`; byte-identical to
/// serializing [`ServerMessage::PeerUpdate`].
fn update_frame(kind: UpdateKind, info_json: &str) -> Frame {
    let kind = match kind {
        UpdateKind::Node => "node",
        UpdateKind::Disconnected => "disconnected",
        UpdateKind::Lost => "lost",
    };
    let mut json = String::with_capacity(info_json.len() + 48);
    json.push_str(r#"{"type":"peer_update","kind":""#);
    json.push_str(kind);
    json.push_str(r#"","peer":"#);
    json.push_str(info_json);
    json.push('}');
    Frame::from_string(json)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const AUTH: &str = "tailnet-secret";

    fn config() -> RegistryConfig {
        RegistryConfig {
            domain: "tailnet.internal".into(),
            ipv4_range: "100.64.0.0/10".parse().unwrap(),
            ipv6_prefix: "fd7a:115c:a1e0::/48".parse().unwrap(),
            lost_expiry: Duration::from_secs(3600),
        }
    }

    fn registry() -> Registry {
        Registry::new(config(), StateFile::empty()).unwrap()
    }

    fn key(seed: u8) -> NodeKey {
        let secret = x25519_dalek::StaticSecret::from([seed; 32]);
        NodeKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    fn hello(seed: u8, name: &str) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            auth_key: AUTH.into(),
            node_key: key(seed),
            name: name.into(),
            udp_port: 41641,
            endpoints: vec!["192.168.1.10:41641".parse().unwrap()],
        }
    }

    fn remote(last: u8) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, last], 50000))
    }

    fn auth() -> AuthKey {
        AuthKey::new(AUTH)
    }

    /// Drains outputs as (session, message) pairs; closes as `(s, Error)`
    /// with a flag.
    fn drain(r: &mut Registry) -> Vec<(SessionId, ServerMessage, bool)> {
        let mut out = Vec::new();
        while let Some(o) = r.poll_output() {
            match o {
                Output::Send { session, frame } => {
                    out.push((session, frame.decode().unwrap(), false))
                }
                Output::Close { session, frame } => {
                    out.push((session, frame.decode().unwrap(), true))
                }
                Output::PersistState => {}
            }
        }
        out
    }

    fn join(
        r: &mut Registry,
        s: u64,
        seed: u8,
        name: &str,
        now: Instant,
    ) -> (String, Ipv4Addr, Ipv6Addr) {
        r.handle_hello(SessionId(s), hello(seed, name), remote(seed), &auth(), now)
            .unwrap();
        let out = drain(r);
        match &out[0] {
            (
                sess,
                ServerMessage::Welcome {
                    name, ipv4, ipv6, ..
                },
                false,
            ) if *sess == SessionId(s) => (name.clone(), *ipv4, *ipv6),
            other => panic!("expected welcome first, got {other:?}"),
        }
    }

    #[test]
    fn join_sends_welcome_snapshot_and_fans_out() {
        let mut r = registry();
        let now = Instant::now();
        r.handle_hello(SessionId(1), hello(1, "db"), remote(1), &auth(), now)
            .unwrap();
        let mut persisted = false;
        let mut out = Vec::new();
        while let Some(o) = r.poll_output() {
            match o {
                Output::PersistState => persisted = true,
                Output::Send { session, frame } => out.push((session, frame.decode().unwrap())),
                Output::Close { .. } => panic!("unexpected close"),
            }
        }
        assert!(persisted, "a new identity must be persisted");
        assert_eq!(out.len(), 2, "{out:?}");
        let ServerMessage::Welcome {
            name,
            ipv4,
            ipv6,
            domain,
            observed_addr,
            version,
        } = &out[0].1
        else {
            panic!("{out:?}")
        };
        assert_eq!((name.as_str(), *version), ("db", PROTOCOL_VERSION));
        assert_eq!(*ipv4, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(*ipv6, "fd7a:115c:a1e0::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(domain, "tailnet.internal");
        assert_eq!(*observed_addr, remote(1));
        assert_eq!(out[1].1, ServerMessage::Snapshot { peers: vec![] });

        // The second "db" becomes "db-2", gets the first in its snapshot,
        // and the first gets a node update.
        r.handle_hello(SessionId(2), hello(2, "db"), remote(2), &auth(), now)
            .unwrap();
        let out = drain(&mut r);
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(
            matches!(&out[0].1, ServerMessage::Welcome { name, ipv4, .. }
            if name == "db-2" && *ipv4 == Ipv4Addr::new(100, 64, 0, 2))
        );
        let ServerMessage::Snapshot { peers } = &out[1].1 else {
            panic!("{out:?}")
        };
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].node_key, key(1));
        assert_eq!(peers[0].status, PeerStatus::Online);
        assert_eq!(
            peers[0].endpoints,
            vec![
                "198.51.100.1:41641".parse().unwrap(),
                "192.168.1.10:41641".parse().unwrap()
            ]
        );
        assert_eq!(out[2].0, SessionId(1));
        assert!(
            matches!(&out[2].1, ServerMessage::PeerUpdate { kind: UpdateKind::Node, peer }
            if peer.name == "db-2" && peer.status == PeerStatus::Online)
        );
    }

    #[test]
    fn prebuilt_frames_match_serde() {
        let mut r = registry();
        let now = Instant::now();
        join(&mut r, 1, 1, "a", now);
        r.handle_hello(SessionId(2), hello(2, "b"), remote(2), &auth(), now)
            .unwrap();
        let frames: Vec<Frame> = std::iter::from_fn(|| r.poll_output())
            .filter_map(|o| match o {
                Output::Send { frame, .. } => Some(frame),
                _ => None,
            })
            .collect();
        for f in frames {
            let msg = f.decode().unwrap();
            assert_eq!(f.as_str(), msg.to_json(), "frame text must equal serde's");
        }
    }

    #[test]
    fn checks_run_in_order_and_leave_no_trace() {
        let mut r = registry();
        let now = Instant::now();
        let mut h = hello(1, "x");
        h.version = 7;
        h.auth_key = "wrong".into();
        h.node_key = NodeKey([0; 32]);
        let err = r
            .handle_hello(SessionId(1), h.clone(), remote(1), &auth(), now)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsupportedVersion);
        assert!(
            err.reason.contains('7') && err.reason.contains('1'),
            "{err}"
        );
        h.version = PROTOCOL_VERSION;
        let err = r
            .handle_hello(SessionId(1), h.clone(), remote(1), &auth(), now)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::BadAuthKey);
        assert!(!err.reason.contains(AUTH) && !err.reason.contains("wrong"));
        h.auth_key = AUTH.into();
        let err = r
            .handle_hello(SessionId(1), h, remote(1), &auth(), now)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidNodeKey);
        assert!(r.poll_output().is_none());
        assert_eq!(r.online_count(), 0);
        assert!(r.state_file().nodes.is_empty());
    }

    #[test]
    fn messages_out_of_order_are_violations() {
        let mut r = registry();
        let now = Instant::now();
        let e = r.handle_update(SessionId(1), &[], now).unwrap_err();
        assert_eq!(e.code, ErrorCode::ProtocolViolation);
        let e = r.handle_goodbye(SessionId(1), now).unwrap_err();
        assert_eq!(e.code, ErrorCode::ProtocolViolation);
        join(&mut r, 1, 1, "a", now);
        let e = r
            .handle_hello(SessionId(1), hello(1, "a"), remote(1), &auth(), now)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::ProtocolViolation);
        assert!(e.reason.contains("second hello"));
    }

    #[test]
    fn goodbye_disconnects_and_close_loses() {
        let mut r = registry();
        let now = Instant::now();
        join(&mut r, 1, 1, "a", now);
        join(&mut r, 2, 2, "b", now);
        join(&mut r, 3, 3, "c", now);

        r.handle_goodbye(SessionId(2), now).unwrap();
        let out = drain(&mut r);
        let mut to: Vec<SessionId> = out.iter().map(|o| o.0).collect();
        to.sort();
        assert_eq!(to, vec![SessionId(1), SessionId(3)]);
        for (_, m, _) in &out {
            assert!(
                matches!(m, ServerMessage::PeerUpdate { kind: UpdateKind::Disconnected, peer } if peer.name == "b")
            );
        }
        r.handle_closed(SessionId(2), now);
        assert!(r.poll_output().is_none(), "closing after goodbye is silent");
        assert!(
            r.peer(&key(2)).is_none(),
            "disconnected nodes leave snapshots"
        );

        r.handle_closed(SessionId(3), now);
        let out = drain(&mut r);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, SessionId(1));
        assert!(
            matches!(&out[0].1, ServerMessage::PeerUpdate { kind: UpdateKind::Lost, peer }
            if peer.name == "c" && peer.status == PeerStatus::Lost)
        );

        // A newcomer sees the lost node (status lost) but not the one that left.
        join(&mut r, 4, 4, "d", now);
        r.handle_hello(SessionId(5), hello(5, "e"), remote(5), &auth(), now)
            .unwrap();
        let out = drain(&mut r);
        let ServerMessage::Snapshot { peers } = &out[1].1 else {
            panic!("{out:?}")
        };
        let names: Vec<(&str, PeerStatus)> =
            peers.iter().map(|p| (p.name.as_str(), p.status)).collect();
        assert_eq!(
            names,
            vec![
                ("a", PeerStatus::Online),
                ("c", PeerStatus::Lost),
                ("d", PeerStatus::Online)
            ]
        );

        // The lost node comes back: everyone gets `node` again, same identity.
        let (name, ipv4, _) = {
            r.handle_hello(SessionId(6), hello(3, "c"), remote(3), &auth(), now)
                .unwrap();
            let out = drain(&mut r);
            let kinds: Vec<_> = out[2..]
                .iter()
                .map(|(_, m, _)| match m {
                    ServerMessage::PeerUpdate { kind, peer } => (*kind, peer.status),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(kinds.len(), 3);
            assert!(
                kinds
                    .iter()
                    .all(|k| *k == (UpdateKind::Node, PeerStatus::Online))
            );
            match &out[0].1 {
                ServerMessage::Welcome {
                    name, ipv4, ipv6, ..
                } => (name.clone(), *ipv4, *ipv6),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!((name.as_str(), ipv4), ("c", Ipv4Addr::new(100, 64, 0, 3)));
        assert_eq!(r.poll_timeout(), None, "a returning node is no longer lost");
    }

    #[test]
    fn replaced_session_is_closed_without_lost() {
        let mut r = registry();
        let now = Instant::now();
        join(&mut r, 1, 1, "a", now);
        join(&mut r, 2, 2, "b", now);
        r.handle_hello(SessionId(3), hello(2, "b"), remote(9), &auth(), now)
            .unwrap();
        let out = drain(&mut r);
        assert_eq!(out[0].0, SessionId(2));
        assert!(out[0].2, "the old session is closed");
        assert!(matches!(
            &out[0].1,
            ServerMessage::Error {
                code: ErrorCode::Replaced,
                ..
            }
        ));
        assert!(matches!(&out[1].1, ServerMessage::Welcome { name, .. } if name == "b"));
        // The other node hears about the new endpoint.
        let update = out.iter().find(|o| o.0 == SessionId(1)).unwrap();
        assert!(
            matches!(&update.1, ServerMessage::PeerUpdate { kind: UpdateKind::Node, peer }
            if peer.endpoints[0] == "198.51.100.9:41641".parse().unwrap())
        );
        // The old session cannot act any more; its end is silent.
        let e = r.handle_update(SessionId(2), &[], now).unwrap_err();
        assert_eq!(e.code, ErrorCode::Replaced);
        r.handle_closed(SessionId(2), now);
        assert!(r.poll_output().is_none());
        assert_eq!(r.online_count(), 2);
    }

    #[test]
    fn update_fans_out_only_changes() {
        let mut r = registry();
        let now = Instant::now();
        join(&mut r, 1, 1, "a", now);
        join(&mut r, 2, 2, "b", now);
        r.handle_update(SessionId(2), &["192.168.1.10:41641".parse().unwrap()], now)
            .unwrap();
        assert!(r.poll_output().is_none(), "no change, no fan-out");
        r.handle_update(SessionId(2), &["10.1.2.3:41641".parse().unwrap()], now)
            .unwrap();
        let out = drain(&mut r);
        assert_eq!(out.len(), 1);
        assert!(
            matches!(&out[0].1, ServerMessage::PeerUpdate { kind: UpdateKind::Node, peer }
            if peer.endpoints == vec!["198.51.100.2:41641".parse().unwrap(), "10.1.2.3:41641".parse().unwrap()])
        );
    }

    #[test]
    fn identity_is_stable_and_renames_deduplicate() {
        let mut r = registry();
        let now = Instant::now();
        let first = join(&mut r, 1, 1, "My Laptop!", now);
        assert_eq!(first.0, "my-laptop");
        join(&mut r, 2, 2, "db", now);
        r.handle_goodbye(SessionId(1), now).unwrap();
        r.handle_closed(SessionId(1), now);
        drain(&mut r);
        // Back with the same name: same identity, nothing to persist.
        r.handle_hello(SessionId(3), hello(1, "my laptop"), remote(1), &auth(), now)
            .unwrap();
        let outs: Vec<Output> = std::iter::from_fn(|| r.poll_output()).collect();
        assert!(!outs.contains(&Output::PersistState));
        assert_eq!(r.identity(&key(1)).unwrap().ipv4, first.1);
        // Renamed to a taken name: deduplicated, same addresses, persisted.
        r.handle_goodbye(SessionId(3), now).unwrap();
        r.handle_hello(SessionId(4), hello(1, "db"), remote(1), &auth(), now)
            .unwrap();
        let outs: Vec<Output> = std::iter::from_fn(|| r.poll_output()).collect();
        assert!(outs.contains(&Output::PersistState));
        let id = r.identity(&key(1)).unwrap();
        assert_eq!(
            (id.name.as_str(), id.ipv4, id.ipv6),
            ("db-2", first.1, first.2)
        );
        // The old name is free again.
        assert_eq!(join(&mut r, 5, 5, "my-laptop", now).0, "my-laptop");
    }

    #[test]
    fn long_names_stay_dns_labels_when_suffixed() {
        let mut r = registry();
        let now = Instant::now();
        let long = "a".repeat(80);
        let n1 = join(&mut r, 1, 1, &long, now).0;
        let n2 = join(&mut r, 2, 2, &long, now).0;
        assert_eq!(n1.len(), MAX_NAME_LEN);
        assert_eq!(n2.len(), MAX_NAME_LEN);
        assert!(n2.ends_with("-2"));
        assert_ne!(n1, n2);
    }

    #[test]
    fn lost_nodes_expire_from_snapshots() {
        let mut r = registry();
        let t0 = Instant::now();
        join(&mut r, 1, 1, "a", t0);
        join(&mut r, 2, 2, "b", t0);
        r.handle_closed(SessionId(2), t0);
        drain(&mut r);
        assert_eq!(r.poll_timeout(), Some(t0 + Duration::from_secs(3600)));
        r.handle_timeout(t0 + Duration::from_secs(3599));
        assert_eq!(r.peer(&key(2)).unwrap().status, PeerStatus::Lost);
        r.handle_timeout(t0 + Duration::from_secs(3600));
        assert!(r.peer(&key(2)).is_none());
        assert_eq!(r.poll_timeout(), None);
        // Expiry is silent and keeps the identity.
        assert!(r.poll_output().is_none());
        assert_eq!(r.identity(&key(2)).unwrap().name, "b");
    }

    #[test]
    fn addresses_run_out_cleanly_and_skip_used() {
        let mut cfg = config();
        cfg.ipv4_range = "100.64.0.0/30".parse().unwrap();
        let mut r = Registry::new(cfg, StateFile::empty()).unwrap();
        let now = Instant::now();
        assert_eq!(join(&mut r, 1, 1, "a", now).1, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(join(&mut r, 2, 2, "b", now).1, Ipv4Addr::new(100, 64, 0, 2));
        let e = r
            .handle_hello(SessionId(3), hello(3, "c"), remote(3), &auth(), now)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(e.reason.contains("exhausted"));
        // Known nodes still get in.
        r.handle_goodbye(SessionId(1), now).unwrap();
        drain(&mut r);
        join(&mut r, 4, 1, "a", now);
    }

    #[test]
    fn state_round_trips_through_a_new_registry() {
        let mut r = registry();
        let now = Instant::now();
        let a = join(&mut r, 1, 1, "a", now);
        let b = join(&mut r, 2, 2, "a", now);
        let state = r.state_file();
        let mut r2 = Registry::new(config(), state).unwrap();
        // Reversed join order on the new registry: same identities anyway.
        assert_eq!(join(&mut r2, 1, 2, "a", now), b);
        assert_eq!(join(&mut r2, 2, 1, "a", now), a);
        // A newcomer does not collide with stored addresses.
        assert_eq!(
            join(&mut r2, 3, 3, "a", now).1,
            Ipv4Addr::new(100, 64, 0, 3)
        );
    }

    #[test]
    fn bad_ranges_are_config_errors() {
        let mut cfg = config();
        cfg.ipv4_range = "100.64.0.0/31".parse().unwrap();
        assert!(matches!(
            Registry::new(cfg, StateFile::empty()),
            Err(CoordinatorError::Config(_))
        ));
    }

    #[test]
    fn auth_key_comparison() {
        let k = AuthKey::new("secret");
        assert!(k.matches("secret"));
        assert!(!k.matches("secreT"));
        assert!(!k.matches("secret2"));
        assert!(!k.matches("secre"));
        assert!(!k.matches(""));
        assert_eq!(format!("{k:?}"), "AuthKey(<redacted>)");
    }

    #[test]
    fn endpoints_are_filtered() {
        let remote: SocketAddr = "[::ffff:203.0.113.5]:999".parse().unwrap();
        let reported: Vec<SocketAddr> = vec![
            "203.0.113.5:41641".parse().unwrap(),
            "0.0.0.0:41641".parse().unwrap(),
            "[::]:41641".parse().unwrap(),
            "10.0.0.1:0".parse().unwrap(),
            "10.0.0.1:41641".parse().unwrap(),
            "10.0.0.1:41641".parse().unwrap(),
        ];
        assert_eq!(
            effective_endpoints(remote, 41641, &reported),
            vec![
                "203.0.113.5:41641".parse().unwrap(),
                "10.0.0.1:41641".parse().unwrap()
            ]
        );
        let many: Vec<SocketAddr> = (1..100u16)
            .map(|p| SocketAddr::from(([10, 0, 0, 1], p)))
            .collect();
        let out = effective_endpoints(remote, 41641, &many);
        assert_eq!(out.len(), MAX_ENDPOINTS);
        assert_eq!(out[0], "203.0.113.5:41641".parse().unwrap());
        // Port 0 from the node itself: the observed endpoint is dropped too.
        assert!(effective_endpoints(remote, 0, &[]).is_empty());
    }

    #[test]
    fn fan_out_serializes_once() {
        // 2 000 nodes: one change reaches 1 999 sessions as clones of one
        // buffer, and names and addresses stay unique.
        const NODES: u16 = 2000;
        let mut r = registry();
        let now = Instant::now();
        let mut seen_v4 = HashSet::new();
        for i in 0..NODES {
            let mut seed = [7u8; 32];
            // Bytes 1 and 2: clamping only touches bytes 0 and 31.
            seed[1..3].copy_from_slice(&i.to_le_bytes());
            let secret = x25519_dalek::StaticSecret::from(seed);
            let mut h = hello(1, "n");
            h.node_key = NodeKey(x25519_dalek::PublicKey::from(&secret).to_bytes());
            r.handle_hello(SessionId(u64::from(i)), h, remote(1), &auth(), now)
                .unwrap();
            // The welcome comes first; the rest is not decoded (time).
            let Some(Output::Send { frame, .. }) = r.poll_output() else {
                panic!("welcome expected")
            };
            let ServerMessage::Welcome { ipv4, .. } = frame.decode().unwrap() else {
                panic!("welcome expected")
            };
            assert!(seen_v4.insert(ipv4));
            while r.poll_output().is_some() {}
        }
        assert_eq!(seen_v4.len(), usize::from(NODES));
        assert_eq!(r.online_count(), usize::from(NODES));
        assert_eq!(r.names.len(), usize::from(NODES));
        r.handle_update(SessionId(0), &["10.9.9.9:1".parse().unwrap()], now)
            .unwrap();
        let frames: Vec<(SessionId, Frame)> = std::iter::from_fn(|| r.poll_output())
            .filter_map(|o| match o {
                Output::Send { session, frame } => Some((session, frame)),
                _ => None,
            })
            .collect();
        assert_eq!(frames.len(), usize::from(NODES) - 1);
        assert!(frames.iter().all(|(s, _)| *s != SessionId(0)));
        let first = frames[0].1.as_str().as_ptr();
        assert!(
            frames.iter().all(|(_, f)| f.as_str().as_ptr() == first),
            "every recipient shares one serialized buffer"
        );
    }
}
