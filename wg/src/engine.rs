//! The sans-IO WireGuard engine: many peers over boringtun's `noise::Tunn`.
//!
//! [`Engine`] owns the peer table, one boringtun [`Tunn`] per peer, the
//! cryptokey routing table and a shared handshake rate limiter. It owns no
//! socket and spawns nothing: a driver feeds it every UDP datagram
//! ([`Engine::handle_datagram`]) and every IP packet from the local stack
//! ([`Engine::handle_ip_packet`]), calls [`Engine::handle_timeout`] when
//! [`Engine::poll_timeout`] says so, and drains [`Engine::poll_transmit`] and
//! [`Engine::poll_event`] after each input.
//!
//! # Demultiplexing (WireGuard whitepaper §5.4)
//!
//! Every datagram first goes through the engine's rate limiter
//! (`verify_packet`: MAC1 check, and under load a cookie reply unless MAC2 is
//! valid). Then:
//! - a handshake initiation is attributed to a peer by decrypting the
//!   initiator's static key (`parse_handshake_anon`); unknown keys are dropped;
//! - responses, cookie replies and data carry our `receiver_index`; each peer's
//!   `Tunn` is created with a unique random 24-bit index and boringtun uses
//!   `index << 8 | n` as its session indices, so `receiver_index >> 8` finds
//!   the peer with one hash probe.
//!
//! Because boringtun's `Tunn::decapsulate` runs `verify_packet` again on the
//! same shared limiter, every handshake message is counted twice; the limiter
//! is therefore built with twice the configured limit, which makes both checks
//! agree exactly (the `k`-th message is counted at `2k` and `2k + 1`).
//!
//! # Routing
//!
//! Outgoing packets go to the peer with the longest AllowedIPs prefix
//! containing the destination. Every decrypted packet whose source does not
//! route back to the peer that sent it is dropped ([`DropReason::SpoofedSource`]).
//!
//! # Time
//!
//! boringtun reads its own monotonic clock: [`Engine::handle_timeout`] calls
//! `Tunn::update_timers` for every peer every [`TIMER_TICK`] (as boringtun's own
//! device does), which performs handshake retransmission, rekeying and passive
//! keepalives. Everything else uses the caller's `now`: statistics timestamps,
//! the tick schedule, and persistent keepalives, which the engine sends itself
//! (boringtun cannot change a `Tunn`'s keepalive interval in place, and a timer
//! on injected time is testable).
//!
//! `update_timers` is called for peers without an endpoint too: boringtun only
//! advances a `Tunn`'s notion of "now" there, and a stale clock would make a
//! handshake received later look ancient and be expired at once.
//!
//! # Addresses
//!
//! Source addresses are canonicalised ([`crate::udp::canonical_addr`]:
//! IPv4-mapped IPv6 becomes IPv4) before they are compared or stored, so
//! endpoints in outcomes, events and stats are canonical. A driver sending on
//! a dual-stack IPv6 socket maps them back with [`crate::udp::addr_for_socket`].
//!
//! # Buffers
//!
//! `out` buffers are written from index 0. boringtun panics on short buffers,
//! so the engine checks first and returns [`DropReason::BufferTooSmall`]:
//! - [`Engine::handle_ip_packet`]: `out.len() >= max(packet.len() + 32, 148)`;
//! - [`Engine::handle_datagram`]: `out.len() >= max(datagram.len(), 148)`;
//! - [`Engine::poll_transmit`]: `out.len() >= max(largest packet given to
//!   handle_ip_packet + 32, 148)` (use one buffer size for everything, e.g.
//!   [`MAX_DATAGRAM`]).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::{debug, info, trace};

use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use crate::routing::RoutingTable;
use crate::udp::canonical_addr;

/// How often [`Engine::handle_timeout`] runs boringtun's timers.
pub const TIMER_TICK: Duration = Duration::from_millis(250);

/// WireGuard's data message overhead: type, receiver index, counter, AEAD tag.
pub const DATA_OVERHEAD: usize = 32;

/// The size of a handshake initiation, the largest non-data message.
pub const HANDSHAKE_INIT_LEN: usize = 148;

/// A buffer of this size is enough for every engine call with IP packets of
/// up to 65535 bytes.
pub const MAX_DATAGRAM: usize = 65535 + DATA_OVERHEAD;

/// Default number of handshake messages per second before cookies are required
/// (boringtun's device uses the same value).
pub const DEFAULT_HANDSHAKE_RATE_LIMIT: u64 = 100;

const RATE_LIMIT_RESET: Duration = Duration::from_secs(1);

// WireGuard message types (first byte, little-endian u32).
const MSG_INIT: u8 = 1;
const MSG_RESPONSE: u8 = 2;
const MSG_COOKIE: u8 = 3;
const MSG_DATA: u8 = 4;

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This node's static private key.
    pub private_key: PrivateKey,
    /// Handshake messages per second accepted before the engine answers with
    /// cookie replies (WireGuard's DoS mitigation).
    pub handshake_rate_limit: u64,
    /// Seed for the receiver indices given to peers; `None` draws one from the
    /// OS. Set it in tests for reproducible runs.
    pub seed: Option<u64>,
}

impl EngineConfig {
    /// Settings with the default rate limit and an OS-random seed.
    pub fn new(private_key: PrivateKey) -> Self {
        Self {
            private_key,
            handshake_rate_limit: DEFAULT_HANDSHAKE_RATE_LIMIT,
            seed: None,
        }
    }
}

/// The desired configuration of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's static public key: its identity.
    pub public_key: PublicKey,
    /// Optional symmetric key mixed into handshakes.
    pub preshared_key: Option<PresharedKey>,
    /// Prefixes routed to this peer and accepted as source addresses from it.
    pub allowed_ips: Vec<IpNet>,
    /// Where to send datagrams. `None` keeps whatever endpoint the peer
    /// roamed to (or none, until it sends an authenticated packet).
    pub endpoint: Option<SocketAddr>,
    /// Send a keepalive after this many seconds without traffic (wg's
    /// `PersistentKeepalive`).
    pub persistent_keepalive: Option<u16>,
}

impl PeerConfig {
    /// A peer with no preshared key, endpoint or keepalive.
    pub fn new(public_key: PublicKey, allowed_ips: Vec<IpNet>) -> Self {
        Self {
            public_key,
            preshared_key: None,
            allowed_ips,
            endpoint: None,
            persistent_keepalive: None,
        }
    }
}

/// What [`Engine::upsert_peer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerChange {
    /// A new peer.
    Added,
    /// Endpoint, allowed IPs or keepalive changed; the session was kept.
    Updated,
    /// Nothing changed.
    Unchanged,
    /// The preshared key changed: the peer starts over with a fresh session.
    Rebuilt,
}

/// A peer configuration the engine refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The key is a small-order point: no handshake could ever succeed.
    #[error("peer public key is not a usable X25519 key")]
    InvalidPublicKey,
    /// The key is this node's own public key.
    #[error("peer public key is this node's own key")]
    OwnKey,
}

/// Result of [`Engine::handle_datagram`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramOutcome {
    /// A decrypted IP packet, its source checked against the peer's allowed
    /// IPs, is in `out[..len]`: hand it to the local stack.
    Deliver {
        /// The peer that sent it.
        peer: PublicKey,
        /// Length of the packet in `out`.
        len: usize,
    },
    /// Send `out[..len]` to `dst` (handshake response, cookie reply, or the
    /// keepalive that confirms a handshake). Then drain [`Engine::poll_transmit`].
    Reply {
        /// Where to send it (the datagram's source).
        dst: SocketAddr,
        /// Length of the datagram in `out`.
        len: usize,
    },
    /// Consumed, nothing to do (keepalive received, cookie stored).
    Done,
    /// Dropped and counted in [`EngineStats`]; never an error for the caller.
    Dropped(DropReason),
}

/// Result of [`Engine::handle_ip_packet`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketOutcome {
    /// Send `out[..len]` to `dst`: the encrypted packet, or a handshake
    /// initiation (the packet then waits inside the engine for the session).
    Transmit {
        /// The peer's endpoint.
        dst: SocketAddr,
        /// Length of the datagram in `out`.
        len: usize,
    },
    /// Queued: a handshake with the peer is already in flight.
    Queued,
    /// The destination is outside every peer's allowed IPs.
    NoRoute,
    /// The destination routes to a peer whose endpoint is not known yet.
    NoEndpoint {
        /// The peer the packet would go to.
        peer: PublicKey,
    },
    /// Dropped and counted in [`EngineStats`].
    Dropped(DropReason),
}

/// Why a datagram or packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The caller's `out` buffer is smaller than the documented minimum.
    BufferTooSmall,
    /// Not a well-formed WireGuard message (or an outgoing packet that is not IPv4/IPv6,
    /// or a decrypted payload that is not a valid IP packet).
    Malformed,
    /// A handshake message whose MAC1 is wrong (not meant for our key).
    InvalidMac,
    /// A handshake message refused by the rate limiter.
    RateLimited,
    /// A handshake initiation from a public key that is not a peer.
    UnknownPeer,
    /// A message whose receiver index belongs to no peer.
    UnknownIndex,
    /// A replayed data counter or handshake timestamp.
    Replay,
    /// Decryption or authentication failed.
    AuthenticationFailed,
    /// A data message for a session that does not exist (any more).
    NoSession,
    /// A decrypted packet whose source address does not route back to its sender.
    SpoofedSource,
    /// A message that is valid but not expected now (e.g. a stray handshake response).
    Unexpected,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 11] = [
        DropReason::BufferTooSmall,
        DropReason::Malformed,
        DropReason::InvalidMac,
        DropReason::RateLimited,
        DropReason::UnknownPeer,
        DropReason::UnknownIndex,
        DropReason::Replay,
        DropReason::AuthenticationFailed,
        DropReason::NoSession,
        DropReason::SpoofedSource,
        DropReason::Unexpected,
    ];

    /// A stable snake_case name, for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BufferTooSmall => "buffer_too_small",
            DropReason::Malformed => "malformed",
            DropReason::InvalidMac => "invalid_mac",
            DropReason::RateLimited => "rate_limited",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::UnknownIndex => "unknown_index",
            DropReason::Replay => "replay",
            DropReason::AuthenticationFailed => "authentication_failed",
            DropReason::NoSession => "no_session",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::Unexpected => "unexpected",
        }
    }

    fn from_wg(error: &WireGuardError) -> Self {
        match error {
            WireGuardError::DestinationBufferTooSmall => DropReason::BufferTooSmall,
            WireGuardError::IncorrectPacketLength
            | WireGuardError::InvalidPacket
            | WireGuardError::WrongPacketType => DropReason::Malformed,
            WireGuardError::InvalidMac => DropReason::InvalidMac,
            WireGuardError::UnderLoad => DropReason::RateLimited,
            WireGuardError::DuplicateCounter
            | WireGuardError::InvalidCounter
            | WireGuardError::WrongTai64nTimestamp => DropReason::Replay,
            WireGuardError::InvalidAeadTag
            | WireGuardError::WrongKey
            | WireGuardError::WrongIndex
            | WireGuardError::InvalidTai64nTimestamp => DropReason::AuthenticationFailed,
            WireGuardError::NoCurrentSession => DropReason::NoSession,
            WireGuardError::UnexpectedPacket
            | WireGuardError::LockFailed
            | WireGuardError::ConnectionExpired => DropReason::Unexpected,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to a peer, for the node to act on or log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A handshake completed: a new session is in use.
    HandshakeCompleted {
        /// The peer.
        peer: PublicKey,
        /// Where the peer was reached.
        endpoint: SocketAddr,
        /// Whether this node initiated the handshake.
        initiator: bool,
    },
    /// boringtun gave up on the peer: no handshake response within
    /// REKEY_ATTEMPT_TIME (90 s), or no new session for 540 s after the last
    /// one. Its sessions and queued packets are gone; new traffic (or
    /// [`Engine::reset_peer`]) starts over. Reported once per expiry, and only
    /// if a handshake had been attempted since the previous one.
    HandshakeExpired {
        /// The peer.
        peer: PublicKey,
    },
    /// The peer's endpoint changed because an authenticated packet came from
    /// a new address (roaming).
    EndpointChanged {
        /// The peer.
        peer: PublicKey,
        /// The new endpoint.
        endpoint: SocketAddr,
    },
}

/// A snapshot of one peer, for status output and the peer-lifecycle logic.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStats {
    /// The peer's public key.
    pub public_key: PublicKey,
    /// The engine's local 24-bit index for the peer (used in logs).
    pub index: u32,
    /// Where datagrams to the peer go.
    pub endpoint: Option<SocketAddr>,
    /// The prefixes currently routed to this peer (a prefix claimed later by
    /// another peer is not listed).
    pub allowed_ips: Vec<IpNet>,
    /// When the last handshake completed (engine time); `None` if never since
    /// the peer was added or reset.
    pub last_handshake: Option<Instant>,
    /// Whether a session key is currently usable for sending.
    pub has_session: bool,
    /// Bytes of authenticated datagrams received from the peer (wire size).
    pub rx_bytes: u64,
    /// Bytes of datagrams sent to the peer (wire size, handshakes included).
    pub tx_bytes: u64,
    /// Authenticated datagrams received from the peer.
    pub rx_packets: u64,
    /// Datagrams sent to the peer.
    pub tx_packets: u64,
    /// The persistent keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
    /// Whether a preshared key is configured.
    pub has_preshared_key: bool,
    /// boringtun's estimate of inbound packet loss, 0.0..=1.0.
    pub estimated_loss: f32,
    /// Round-trip time of the last handshake in milliseconds, if measured.
    pub handshake_rtt_ms: Option<u32>,
}

/// Engine-wide counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Datagrams given to [`Engine::handle_datagram`].
    pub datagrams_received: u64,
    /// Decrypted packets delivered to the local stack.
    pub packets_delivered: u64,
    /// Datagrams handed to the caller for sending (replies, transmits, polled).
    pub datagrams_sent: u64,
    /// Cookie replies sent because of load.
    pub cookie_replies: u64,
    /// Drops, indexed like [`DropReason::ALL`]; see [`EngineStats::dropped`].
    pub drops: [u64; DropReason::ALL.len()],
}

impl EngineStats {
    /// How many datagrams or packets were dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// All drops together.
    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// One peer: its configuration, boringtun state and counters.
struct Peer {
    config: PeerConfig,
    tunn: Tunn,
    index: u32,
    endpoint: Option<SocketAddr>,
    last_handshake: Option<Instant>,
    /// Last authenticated packet sent or received, for persistent keepalive.
    last_traversal: Option<Instant>,
    rx_bytes: u64,
    tx_bytes: u64,
    rx_packets: u64,
    tx_packets: u64,
    /// boringtun may hold packets for this peer, waiting for a session.
    queued: bool,
    /// The largest packet possibly queued, to size the flush buffer.
    queued_max_len: usize,
    /// Already in the engine's flush list.
    flush_scheduled: bool,
    /// A handshake was attempted since the last expiry report.
    handshake_attempted: bool,
    /// The current expiry has been reported.
    expired_reported: bool,
}

impl Peer {
    fn count_tx(&mut self, len: usize, now: Instant) {
        self.tx_bytes += len as u64;
        self.tx_packets += 1;
        self.last_traversal = Some(now);
    }

    fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }

    fn stats(&self, routes: &RoutingTable<usize>, slot: usize) -> PeerStats {
        let (_, _, _, loss, rtt) = self.tunn.stats();
        PeerStats {
            public_key: self.config.public_key,
            index: self.index,
            endpoint: self.endpoint,
            allowed_ips: self
                .config
                .allowed_ips
                .iter()
                .copied()
                .filter(|net| routes.owner(*net) == Some(slot))
                .collect(),
            last_handshake: self.last_handshake,
            has_session: self.has_session(),
            rx_bytes: self.rx_bytes,
            tx_bytes: self.tx_bytes,
            rx_packets: self.rx_packets,
            tx_packets: self.tx_packets,
            persistent_keepalive: self.config.persistent_keepalive,
            has_preshared_key: self.config.preshared_key.is_some(),
            estimated_loss: loss,
            handshake_rtt_ms: rtt,
        }
    }
}

/// A small datagram produced by a timer, waiting for [`Engine::poll_transmit`].
struct PendingTransmit {
    dst: SocketAddr,
    len: usize,
    buf: [u8; HANDSHAKE_INIT_LEN],
}

/// The WireGuard engine. See the module documentation.
pub struct Engine {
    static_private: x25519::StaticSecret,
    static_public: x25519::PublicKey,
    public_key: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    rng: StdRng,
    /// Peer slots; `None` slots are free and listed in `free`.
    peers: Vec<Option<Peer>>,
    free: Vec<usize>,
    by_key: HashMap<PublicKey, usize>,
    /// 24-bit receiver index (without the low session byte) -> slot.
    by_index: HashMap<u32, usize>,
    routes: RoutingTable<usize>,
    pending: VecDeque<PendingTransmit>,
    /// Slots whose queued packets can now be sent.
    flush: VecDeque<usize>,
    events: VecDeque<Event>,
    next_tick: Instant,
    next_rate_reset: Instant,
    stats: EngineStats,
    /// Output buffer for timers, and for flushing when the caller's is too small.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("public_key", &self.public_key)
            .field("peers", &self.by_key.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A new engine with no peers.
    pub fn new(config: EngineConfig, now: Instant) -> Self {
        let static_private = config.private_key.to_static_secret();
        let static_public = x25519::PublicKey::from(&static_private);
        // Doubled: see the module docs (each handshake message is verified twice).
        let limit = config.handshake_rate_limit.saturating_mul(2);
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        let public_key = config.private_key.public_key();
        info!(public_key = %public_key.short(), "wireguard engine started");
        Self {
            rate_limiter: Arc::new(RateLimiter::new(&static_public, limit)),
            static_private,
            static_public,
            public_key,
            rng,
            peers: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            routes: RoutingTable::new(),
            pending: VecDeque::new(),
            flush: VecDeque::new(),
            events: VecDeque::new(),
            next_tick: now + TIMER_TICK,
            next_rate_reset: now + RATE_LIMIT_RESET,
            stats: EngineStats::default(),
            scratch: vec![0; HANDSHAKE_INIT_LEN],
        }
    }

    /// This node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// Adds a peer or updates one in place.
    ///
    /// Updating the endpoint, allowed IPs or keepalive keeps the live session;
    /// a changed preshared key rebuilds it. New allowed IPs claim their
    /// prefixes from any other peer (as `wg set` does).
    ///
    /// # Errors
    ///
    /// [`PeerError`] if the key is unusable or is this node's own key.
    pub fn upsert_peer(
        &mut self,
        config: PeerConfig,
        now: Instant,
    ) -> Result<PeerChange, PeerError> {
        if config.public_key == self.public_key {
            return Err(PeerError::OwnKey);
        }
        if !config.public_key.is_valid_x25519() {
            return Err(PeerError::InvalidPublicKey);
        }
        let config = normalize_config(config);
        let Some(&slot) = self.by_key.get(&config.public_key) else {
            self.add_peer(config);
            return Ok(PeerChange::Added);
        };
        let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) else {
            // Unreachable by construction (by_key only lists live slots).
            return Err(PeerError::InvalidPublicKey);
        };
        if peer.config == config {
            return Ok(PeerChange::Unchanged);
        }
        let rebuild = peer.config.preshared_key != config.preshared_key;
        if peer.config.endpoint != config.endpoint
            && let Some(endpoint) = config.endpoint
        {
            peer.endpoint = Some(endpoint);
        }
        let old_ips = std::mem::take(&mut peer.config.allowed_ips);
        let new_ips = config.allowed_ips.clone();
        peer.config = config;
        if old_ips != new_ips {
            for net in &old_ips {
                self.routes.remove_if(*net, slot);
            }
            for net in &new_ips {
                self.routes.insert(*net, slot);
            }
        }
        if rebuild {
            self.rebuild_tunn(slot, now);
            info!(
                peer_idx = self.index_of(slot),
                "peer rebuilt (preshared key changed)"
            );
            Ok(PeerChange::Rebuilt)
        } else {
            debug!(peer_idx = self.index_of(slot), "peer updated");
            Ok(PeerChange::Updated)
        }
    }

    /// Removes a peer, its routes and sessions. Returns whether it existed.
    pub fn remove_peer(&mut self, key: &PublicKey) -> bool {
        let Some(slot) = self.by_key.remove(key) else {
            return false;
        };
        let Some(peer) = self.peers.get_mut(slot).and_then(Option::take) else {
            return false;
        };
        self.by_index.remove(&peer.index);
        for net in &peer.config.allowed_ips {
            self.routes.remove_if(*net, slot);
        }
        self.flush.retain(|s| *s != slot);
        self.free.push(slot);
        info!(peer_idx = peer.index, "peer removed");
        true
    }

    /// Drops the peer's sessions and queued packets and starts from a fresh
    /// `Tunn` with a new receiver index (used when an expired peer is rebuilt).
    /// Endpoint, routes and byte counters are kept; `last_handshake` is
    /// cleared. Returns whether the peer exists.
    pub fn reset_peer(&mut self, key: &PublicKey, now: Instant) -> bool {
        let Some(&slot) = self.by_key.get(key) else {
            return false;
        };
        self.rebuild_tunn(slot, now);
        info!(peer_idx = self.index_of(slot), "peer reset");
        true
    }

    /// A snapshot of one peer.
    pub fn peer_stats(&self, key: &PublicKey, _now: Instant) -> Option<PeerStats> {
        let slot = *self.by_key.get(key)?;
        let peer = self.peers.get(slot)?.as_ref()?;
        Some(peer.stats(&self.routes, slot))
    }

    /// Snapshots of every peer, ordered by public key (for status; not the hot path).
    pub fn peers(&self, _now: Instant) -> Vec<PeerStats> {
        let mut all: Vec<PeerStats> = self
            .peers
            .iter()
            .enumerate()
            .filter_map(|(slot, p)| p.as_ref().map(|p| p.stats(&self.routes, slot)))
            .collect();
        all.sort_by_key(|s| s.public_key);
        all
    }

    /// Number of peers.
    pub fn peer_count(&self) -> usize {
        self.by_key.len()
    }

    /// The peer whose allowed IPs contain `dst` most specifically.
    pub fn route(&self, dst: IpAddr) -> Option<PublicKey> {
        let slot = self.routes.lookup(dst)?;
        Some(self.peers.get(slot)?.as_ref()?.config.public_key)
    }

    /// Engine-wide counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Handles a UDP datagram that arrived from `from`.
    ///
    /// `out.len()` must be at least `max(datagram.len(), 148)`. Whatever the
    /// bytes, this never panics: bad input is counted and dropped. After a
    /// [`DatagramOutcome::Reply`] or a completed handshake, drain
    /// [`Engine::poll_transmit`]: packets queued for the peer may now go out.
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> DatagramOutcome {
        let from = canonical_addr(from);
        self.stats.datagrams_received += 1;
        if out.len() < datagram.len().max(HANDSHAKE_INIT_LEN) {
            return self.drop_datagram(DropReason::BufferTooSmall, from);
        }

        // 1. MAC and load check, then demultiplex to a peer slot.
        let slot = match self
            .rate_limiter
            .verify_packet(Some(from.ip()), datagram, out)
        {
            Ok(Packet::HandshakeInit(init)) => {
                match parse_handshake_anon(&self.static_private, &self.static_public, &init) {
                    Ok(half) => {
                        let key = PublicKey::from_bytes(half.peer_static_public);
                        match self.by_key.get(&key) {
                            Some(&slot) => slot,
                            None => return self.drop_datagram(DropReason::UnknownPeer, from),
                        }
                    }
                    Err(e) => return self.drop_datagram(DropReason::from_wg(&e), from),
                }
            }
            Ok(Packet::HandshakeResponse(p)) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(&slot) => slot,
                None => return self.drop_datagram(DropReason::UnknownIndex, from),
            },
            Ok(Packet::PacketCookieReply(p)) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(&slot) => slot,
                None => return self.drop_datagram(DropReason::UnknownIndex, from),
            },
            Ok(Packet::PacketData(p)) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(&slot) => slot,
                None => return self.drop_datagram(DropReason::UnknownIndex, from),
            },
            Err(TunnResult::WriteToNetwork(cookie)) => {
                let len = cookie.len();
                self.stats.cookie_replies += 1;
                self.stats.datagrams_sent += 1;
                trace!(%from, "under load: cookie reply");
                return DatagramOutcome::Reply { dst: from, len };
            }
            Err(TunnResult::Err(e)) => return self.drop_datagram(DropReason::from_wg(&e), from),
            Err(_) => return self.drop_datagram(DropReason::Malformed, from),
        };
        let msg_type = datagram.first().copied().unwrap_or(0);

        // 2. Let the peer's Tunn process it.
        let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) else {
            return self.drop_datagram(DropReason::UnknownIndex, from);
        };
        enum Step {
            Reply(usize),
            Packet(usize, IpAddr),
            Done,
            Drop(DropReason),
        }
        let step = match peer.tunn.decapsulate(Some(from.ip()), datagram, out) {
            TunnResult::WriteToNetwork(reply) => Step::Reply(reply.len()),
            TunnResult::WriteToTunnelV4(packet, src) => Step::Packet(packet.len(), src.into()),
            TunnResult::WriteToTunnelV6(packet, src) => Step::Packet(packet.len(), src.into()),
            TunnResult::Done => Step::Done,
            TunnResult::Err(e) => Step::Drop(DropReason::from_wg(&e)),
        };
        // boringtun writes every output at the start of `out`.
        let reply_type = out.first().copied().unwrap_or(0);

        // Authenticated: data (incl. keepalives), a handshake initiation we
        // answered, a handshake response we confirmed.
        let authenticated = match step {
            Step::Reply(_) => reply_type != MSG_COOKIE,
            Step::Packet(..) => true,
            Step::Done => msg_type == MSG_DATA,
            Step::Drop(_) => false,
        };
        if authenticated {
            peer.rx_bytes += datagram.len() as u64;
            peer.rx_packets += 1;
            peer.last_traversal = Some(now);
            if peer.endpoint != Some(from) {
                peer.endpoint = Some(from);
                info!(peer_idx = peer.index, endpoint = %from, "peer endpoint changed");
                self.events.push_back(Event::EndpointChanged {
                    peer: peer.config.public_key,
                    endpoint: from,
                });
            }
            let completed = match (msg_type, &step) {
                (MSG_INIT, Step::Reply(_)) if reply_type == MSG_RESPONSE => Some(false),
                (MSG_RESPONSE, Step::Reply(_)) if reply_type == MSG_DATA => Some(true),
                _ => None,
            };
            if let Some(initiator) = completed {
                peer.last_handshake = Some(now);
                peer.handshake_attempted = true;
                peer.expired_reported = false;
                debug!(peer = %peer.config.public_key.short(), initiator, "handshake completed");
                self.events.push_back(Event::HandshakeCompleted {
                    peer: peer.config.public_key,
                    endpoint: from,
                    initiator,
                });
            }
            if peer.queued && !peer.flush_scheduled && peer.has_session() {
                peer.flush_scheduled = true;
                self.flush.push_back(slot);
            }
        }

        match step {
            Step::Reply(len) => {
                peer.count_tx(len, now);
                self.stats.datagrams_sent += 1;
                trace!(peer_idx = peer.index, len, "reply");
                DatagramOutcome::Reply { dst: from, len }
            }
            Step::Packet(len, src) => {
                if self.routes.lookup(src) != Some(slot) {
                    return self.drop_datagram(DropReason::SpoofedSource, from);
                }
                self.stats.packets_delivered += 1;
                trace!(peer_idx = peer.index, len, "deliver");
                DatagramOutcome::Deliver {
                    peer: peer.config.public_key,
                    len,
                }
            }
            Step::Done => DatagramOutcome::Done,
            Step::Drop(reason) => self.drop_datagram(reason, from),
        }
    }

    /// Handles an IP packet from the local stack that is to go to a peer.
    ///
    /// `out.len()` must be at least `max(packet.len() + 32, 148)`. With no
    /// session yet, the packet is queued inside the engine and the result is
    /// either a handshake initiation to send ([`PacketOutcome::Transmit`]) or
    /// [`PacketOutcome::Queued`]; it is sent (through
    /// [`Engine::poll_transmit`]) once the handshake completes.
    pub fn handle_ip_packet(
        &mut self,
        packet: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> PacketOutcome {
        let Some(dst_ip) = Tunn::dst_address(packet) else {
            return self.drop_packet(DropReason::Malformed);
        };
        let Some(slot) = self.routes.lookup(dst_ip) else {
            trace!(dst = %dst_ip, "no route");
            return PacketOutcome::NoRoute;
        };
        let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) else {
            return PacketOutcome::NoRoute;
        };
        let Some(endpoint) = peer.endpoint else {
            return PacketOutcome::NoEndpoint {
                peer: peer.config.public_key,
            };
        };
        if out.len() < (packet.len() + DATA_OVERHEAD).max(HANDSHAKE_INIT_LEN) {
            return self.drop_packet(DropReason::BufferTooSmall);
        }
        let result = match peer.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(datagram) => Ok(datagram.len()),
            TunnResult::Done => Err(None),
            TunnResult::Err(e) => Err(Some(DropReason::from_wg(&e))),
            // encapsulate returns nothing else.
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                Err(Some(DropReason::Unexpected))
            }
        };
        match result {
            Ok(len) => {
                if out.first() == Some(&MSG_INIT) {
                    // No session: the packet was queued and a handshake started.
                    peer.queued = true;
                    peer.queued_max_len = peer.queued_max_len.max(packet.len());
                    peer.handshake_attempted = true;
                    debug!(peer = %peer.config.public_key.short(), "handshake initiation (on demand)");
                }
                peer.count_tx(len, now);
                self.stats.datagrams_sent += 1;
                trace!(peer_idx = peer.index, len, "transmit");
                PacketOutcome::Transmit { dst: endpoint, len }
            }
            Err(None) => {
                peer.queued = true;
                peer.queued_max_len = peer.queued_max_len.max(packet.len());
                trace!(peer_idx = peer.index, "queued behind handshake");
                PacketOutcome::Queued
            }
            Err(Some(reason)) => self.drop_packet(reason),
        }
    }

    /// The next datagram the engine wants to send on its own: timer output
    /// (handshake retransmissions, keepalives, rekeying) and packets that were
    /// queued behind a handshake. Call until `None` after every input.
    ///
    /// `out` must be as large as the buffers given to
    /// [`Engine::handle_ip_packet`]; queued packets that do not fit are dropped
    /// and counted as [`DropReason::BufferTooSmall`].
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> Option<(SocketAddr, usize)> {
        if let Some(pending) = self.pending.front() {
            if out.len() >= pending.len {
                let pending = self.pending.pop_front()?;
                out[..pending.len].copy_from_slice(&pending.buf[..pending.len]);
                self.stats.datagrams_sent += 1;
                return Some((pending.dst, pending.len));
            }
            self.pending.pop_front();
            self.count_drop(DropReason::BufferTooSmall);
        }
        while let Some(&slot) = self.flush.front() {
            let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) else {
                self.flush.pop_front();
                continue;
            };
            let Some(endpoint) = peer.endpoint else {
                peer.flush_scheduled = false;
                self.flush.pop_front();
                continue;
            };
            let needed = (peer.queued_max_len + DATA_OVERHEAD).max(HANDSHAKE_INIT_LEN);
            if out.len() >= needed {
                if let TunnResult::WriteToNetwork(datagram) = peer.tunn.decapsulate(None, &[], out)
                {
                    let len = datagram.len();
                    // No `now` here: the datagram that made the flush possible
                    // already refreshed `last_traversal`.
                    peer.tx_bytes += len as u64;
                    peer.tx_packets += 1;
                    self.stats.datagrams_sent += 1;
                    trace!(peer_idx = peer.index, len, "flush queued packet");
                    return Some((endpoint, len));
                }
            } else {
                // Drain into scratch so the queue cannot get stuck.
                self.scratch.resize(needed, 0);
                let mut dropped = 0;
                while let TunnResult::WriteToNetwork(_) =
                    peer.tunn.decapsulate(None, &[], &mut self.scratch)
                {
                    dropped += 1;
                }
                self.stats.drops[DropReason::BufferTooSmall.index()] += dropped;
            }
            peer.queued = false;
            peer.queued_max_len = 0;
            peer.flush_scheduled = false;
            self.flush.pop_front();
        }
        None
    }

    /// Runs the timers that are due: boringtun's per-peer timers (every
    /// [`TIMER_TICK`]), persistent keepalives, the rate limiter's reset.
    /// Datagrams they produce come out of [`Engine::poll_transmit`].
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TIMER_TICK;
        if now >= self.next_rate_reset {
            self.rate_limiter.reset_count();
            self.next_rate_reset = now + RATE_LIMIT_RESET;
        }
        if self.scratch.len() < HANDSHAKE_INIT_LEN {
            self.scratch.resize(HANDSHAKE_INIT_LEN, 0);
        }
        let scratch = &mut self.scratch[..HANDSHAKE_INIT_LEN];
        for peer in self.peers.iter_mut().flatten() {
            // boringtun's timers (real clock).
            let output = match peer.tunn.update_timers(scratch) {
                TunnResult::WriteToNetwork(datagram) => Some(datagram.len()),
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    if peer.handshake_attempted && !peer.expired_reported {
                        peer.expired_reported = true;
                        peer.handshake_attempted = false;
                        peer.queued = false;
                        peer.queued_max_len = 0;
                        info!(peer_idx = peer.index, "handshake expired");
                        self.events.push_back(Event::HandshakeExpired {
                            peer: peer.config.public_key,
                        });
                    }
                    None
                }
                TunnResult::Err(e) => {
                    debug!(peer_idx = peer.index, error = ?e, "timer error");
                    None
                }
                _ => None,
            };
            if !peer.tunn.is_expired() {
                peer.expired_reported = false;
            }
            if let Some(len) = output {
                queue_timer_output(peer, &mut self.pending, scratch, len, now);
            }

            // Persistent keepalive (our clock).
            if let (Some(interval), Some(_)) = (peer.config.persistent_keepalive, peer.endpoint) {
                let interval = Duration::from_secs(u64::from(interval));
                let due = peer
                    .last_traversal
                    .is_none_or(|t| now.saturating_duration_since(t) >= interval);
                if interval > Duration::ZERO && due {
                    peer.last_traversal = Some(now);
                    match peer.tunn.encapsulate(&[], scratch) {
                        TunnResult::WriteToNetwork(datagram) => {
                            let len = datagram.len();
                            trace!(peer_idx = peer.index, "persistent keepalive");
                            queue_timer_output(peer, &mut self.pending, scratch, len, now);
                        }
                        // Queued behind a handshake in flight.
                        _ => peer.queued = true,
                    }
                }
            }
        }
    }

    /// When [`Engine::handle_timeout`] wants to run next, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        Some((self.next_tick, "wireguard timers"))
    }

    /// The next event, if any. Call until `None` after every input.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn add_peer(&mut self, config: PeerConfig) {
        let index = self.fresh_index();
        let tunn = new_tunn(&self.static_private, &self.rate_limiter, &config, index);
        let peer = Peer {
            endpoint: config.endpoint,
            tunn,
            index,
            last_handshake: None,
            last_traversal: None,
            rx_bytes: 0,
            tx_bytes: 0,
            rx_packets: 0,
            tx_packets: 0,
            queued: false,
            queued_max_len: 0,
            flush_scheduled: false,
            handshake_attempted: false,
            expired_reported: false,
            config,
        };
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.peers.push(None);
                self.peers.len() - 1
            }
        };
        for net in &peer.config.allowed_ips {
            self.routes.insert(*net, slot);
        }
        self.by_key.insert(peer.config.public_key, slot);
        self.by_index.insert(index, slot);
        info!(
            peer_idx = index,
            allowed_ips = peer.config.allowed_ips.len(),
            "peer added"
        );
        debug!(peer_idx = index, peer = %peer.config.public_key.short(), "peer key");
        self.peers[slot] = Some(peer);
    }

    fn rebuild_tunn(&mut self, slot: usize, _now: Instant) {
        let index = self.fresh_index();
        let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let tunn = new_tunn(
            &self.static_private,
            &self.rate_limiter,
            &peer.config,
            index,
        );
        self.by_index.remove(&peer.index);
        self.by_index.insert(index, slot);
        peer.tunn = tunn;
        peer.index = index;
        peer.last_handshake = None;
        peer.last_traversal = None;
        peer.queued = false;
        peer.queued_max_len = 0;
        peer.handshake_attempted = false;
        peer.expired_reported = false;
        if peer.flush_scheduled {
            peer.flush_scheduled = false;
            self.flush.retain(|s| *s != slot);
        }
    }

    /// A random unused 24-bit peer index.
    fn fresh_index(&mut self) -> u32 {
        loop {
            let index = self.rng.gen_range(1..(1u32 << 24));
            if !self.by_index.contains_key(&index) {
                return index;
            }
        }
    }

    fn index_of(&self, slot: usize) -> u32 {
        self.peers
            .get(slot)
            .and_then(Option::as_ref)
            .map_or(0, |p| p.index)
    }

    fn count_drop(&mut self, reason: DropReason) {
        self.stats.drops[reason.index()] += 1;
    }

    fn drop_datagram(&mut self, reason: DropReason, from: SocketAddr) -> DatagramOutcome {
        self.count_drop(reason);
        trace!(%from, %reason, "datagram dropped");
        DatagramOutcome::Dropped(reason)
    }

    fn drop_packet(&mut self, reason: DropReason) -> PacketOutcome {
        self.count_drop(reason);
        trace!(%reason, "packet dropped");
        PacketOutcome::Dropped(reason)
    }
}

/// A fresh boringtun tunnel for a peer. Persistent keepalive is run by the
/// engine on its own clock, so boringtun's is off.
fn new_tunn(
    static_private: &x25519::StaticSecret,
    rate_limiter: &Arc<RateLimiter>,
    config: &PeerConfig,
    index: u32,
) -> Tunn {
    Tunn::new(
        static_private.clone(),
        config.public_key.to_dalek(),
        config.preshared_key.as_ref().map(PresharedKey::to_bytes),
        None,
        index,
        Some(Arc::clone(rate_limiter)),
    )
}

/// Copies a timer-produced datagram (at most a handshake initiation) into the
/// pending queue, addressed to the peer's endpoint.
fn queue_timer_output(
    peer: &mut Peer,
    pending: &mut VecDeque<PendingTransmit>,
    scratch: &[u8],
    len: usize,
    now: Instant,
) {
    let Some(dst) = peer.endpoint else {
        return;
    };
    if len > HANDSHAKE_INIT_LEN || len > scratch.len() {
        return;
    }
    if scratch.first() == Some(&MSG_INIT) {
        peer.handshake_attempted = true;
        debug!(peer = %peer.config.public_key.short(), "handshake initiation (timer)");
    }
    let mut buf = [0u8; HANDSHAKE_INIT_LEN];
    buf[..len].copy_from_slice(&scratch[..len]);
    peer.count_tx(len, now);
    pending.push_back(PendingTransmit { dst, len, buf });
}

/// Canonical form of a peer config: endpoint addresses unmapped, allowed IPs
/// truncated to their network address, sorted and deduplicated.
fn normalize_config(mut config: PeerConfig) -> PeerConfig {
    config.endpoint = config.endpoint.map(canonical_addr);
    for net in &mut config.allowed_ips {
        *net = net.trunc();
    }
    config.allowed_ips.sort();
    config.allowed_ips.dedup();
    config
}

#[cfg(test)]
mod tests;
