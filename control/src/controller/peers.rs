//! The node's view of its peers: a sans-IO state machine that turns what the
//! coordinator says (snapshots, peer updates) and what happens to our own
//! session into data-plane actions, and expires lost peers on injected time.
//!
//! # States
//!
//! ```text
//!            node / snapshot(online)            lost update / our session broke
//!   (new) ───────────────────────────▶ Connected ─────────────────────────▶ Lost{since}
//!                                          ▲   node / snapshot(online)          │
//!                                          └────────────────────────────────────┤
//!                                                                              │ deadline, no fresh handshake
//!          node / snapshot  (Upsert{fresh_session: true})                       ▼
//!   Connected or Lost ◀──────────────────────────────────────────────────── Expired
//!
//!   disconnected update: Connected / Lost / Expired ──▶ forgotten (Remove{Disconnected} if in the data plane)
//!   missing from a snapshot: Connected ──▶ Lost{now}; Lost keeps its timer;
//!                                Expired ──▶ forgotten
//! ```
//!
//! - `Connected` and `Lost` peers are in the data plane; `Expired` ones were
//!   removed from it and are remembered so the next snapshot (or `node`
//!   update) rebuilds them with a fresh WireGuard session.
//! - A lost peer's deadline is `max(since, last_handshake) + lost_peer_timeout`.
//!   When it comes, the caller feeds the data plane's latest handshake times
//!   ([`PeerLifecycle::handle_handshakes`]) and then calls
//!   [`PeerLifecycle::handle_timeout`]: a peer that completed a handshake
//!   within the timeout is kept and re-checked at `last_handshake + timeout`;
//!   otherwise it is removed (`Remove{Expired}`).
//! - Unchanged peers produce no action at all: after a reconnect, peers that
//!   never left the data plane keep their sessions and their traffic.
//! - A peer missing from a snapshot is treated as lost, not removed: a
//!   coordinator that restarted sends partial snapshots while its nodes
//!   reconnect one by one, and dropping a peer whose traffic is flowing would
//!   break its connections for nothing. If the peer does not come back, the
//!   lost-peer timeout removes it once its handshakes go stale.
//!
//! The same table answers name lookups ([`PeerLifecycle::resolve`]) for the
//! node's SOCKS proxy: `name` and `name.<domain>` map to a peer's (or our
//! own) addresses while the peer is in the data plane.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::proto::{NodeKey, PeerInfo, PeerStatus, UpdateKind};

/// Default time a lost peer is kept without a fresh handshake.
pub const DEFAULT_LOST_PEER_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Where a peer stands, from this node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// In the data plane; the coordinator says the peer is online.
    Connected,
    /// In the data plane; the peer was announced lost, or our own
    /// coordinator session broke, at `since`.
    Lost {
        /// When the peer became lost (kept across repeated loss events).
        since: Instant,
    },
    /// Removed from the data plane after the lost-peer timeout; rebuilt with a
    /// fresh session when the coordinator lists it again.
    Expired {
        /// When it was removed.
        since: Instant,
    },
}

impl PeerState {
    /// Whether the peer is in the data plane.
    pub fn is_active(&self) -> bool {
        !matches!(self, PeerState::Expired { .. })
    }

    /// A short label for status output and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            PeerState::Connected => "connected",
            PeerState::Lost { .. } => "lost",
            PeerState::Expired { .. } => "expired",
        }
    }
}

/// Why a peer leaves the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemoveReason {
    /// Lost for longer than the lost-peer timeout without a handshake.
    Expired,
    /// The peer said goodbye.
    Disconnected,
}

/// What the data plane must do. Apply actions in order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum PeerAction {
    /// Add the peer, or update its endpoints/addresses in place.
    Upsert {
        /// The peer as it is now.
        peer: PeerInfo,
        /// The peer had been removed (expired): build it with a new
        /// WireGuard session rather than reusing any old state.
        fresh_session: bool,
    },
    /// Remove the peer from the data plane.
    Remove {
        /// The peer's key.
        key: NodeKey,
        /// Why.
        reason: RemoveReason,
    },
}

/// One peer as the lifecycle knows it (read-only view for status).
#[derive(Debug, Clone)]
pub struct PeerEntry {
    info: PeerInfo,
    state: PeerState,
    state_since: Instant,
    last_handshake: Option<Instant>,
    deadline: Option<Instant>,
}

impl PeerEntry {
    /// What the coordinator last said about the peer.
    pub fn info(&self) -> &PeerInfo {
        &self.info
    }

    /// The peer's state.
    pub fn state(&self) -> PeerState {
        self.state
    }

    /// When the peer entered its current state.
    pub fn state_since(&self) -> Instant {
        self.state_since
    }

    /// The latest WireGuard handshake the data plane reported.
    pub fn last_handshake(&self) -> Option<Instant> {
        self.last_handshake
    }

    /// When a lost peer is next checked for expiry.
    pub fn expiry_check(&self) -> Option<Instant> {
        self.deadline
    }
}

/// How many peers are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounts {
    /// Connected peers.
    pub connected: usize,
    /// Lost peers still in the data plane.
    pub lost: usize,
    /// Expired peers (out of the data plane, remembered).
    pub expired: usize,
}

/// This node's own identity as assigned by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfAddresses {
    /// Our name.
    pub name: String,
    /// Our IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Our IPv6 address.
    pub ipv6: Ipv6Addr,
    /// The tailnet's DNS domain.
    pub domain: String,
}

/// The peer-lifecycle state machine. See the module docs.
#[derive(Debug)]
pub struct PeerLifecycle {
    self_key: NodeKey,
    lost_peer_timeout: Duration,
    peers: BTreeMap<NodeKey, PeerEntry>,
    /// Lowercase name -> key (every remembered peer).
    names: HashMap<String, NodeKey>,
    /// Pending expiry checks, ordered by time.
    deadlines: BTreeSet<(Instant, NodeKey)>,
    me: Option<SelfAddresses>,
    actions: VecDeque<PeerAction>,
}

impl PeerLifecycle {
    /// An empty peer table for the node `self_key` (entries with that key
    /// are ignored), expiring lost peers after `lost_peer_timeout`.
    pub fn new(self_key: NodeKey, lost_peer_timeout: Duration) -> Self {
        PeerLifecycle {
            self_key,
            lost_peer_timeout,
            peers: BTreeMap::new(),
            names: HashMap::new(),
            deadlines: BTreeSet::new(),
            me: None,
            actions: VecDeque::new(),
        }
    }

    // ---- inputs ----

    /// Our own identity (from `welcome`), for [`resolve`](Self::resolve).
    pub fn handle_self(&mut self, me: SelfAddresses) {
        self.me = Some(SelfAddresses {
            name: me.name.to_ascii_lowercase(),
            domain: me.domain.trim_matches('.').to_ascii_lowercase(),
            ..me
        });
    }

    /// The coordinator's full peer set (after every `welcome`).
    ///
    /// Listed peers are added, updated (if changed), rebuilt (if expired) or
    /// left alone (if unchanged and in the data plane); peers listed as lost
    /// start their lost timer, or keep it if they were already lost. Peers
    /// not listed become lost (see the module docs); expired ones not listed
    /// are forgotten.
    pub fn handle_snapshot(&mut self, peers: Vec<PeerInfo>, now: Instant) {
        let before = self.actions.len();
        let listed: HashSet<NodeKey> = peers.iter().map(|p| p.node_key).collect();
        for peer in peers {
            let lost = peer.status == PeerStatus::Lost;
            self.apply_peer(peer, lost, now);
        }
        let missing: Vec<(NodeKey, bool)> = self
            .peers
            .iter()
            .filter(|(k, _)| !listed.contains(k))
            .map(|(k, e)| (*k, e.state.is_active()))
            .collect();
        for (key, active) in &missing {
            if *active {
                self.mark_lost(key, now);
            } else {
                // Already out of the data plane: only the record goes.
                self.forget(key, RemoveReason::Expired);
            }
        }
        tracing::info!(
            listed = listed.len(),
            actions = self.actions.len() - before,
            unlisted = missing.len(),
            "peer snapshot applied"
        );
    }

    /// One `peer_update` from the coordinator.
    ///
    /// `node` adds/updates the peer (rebuilding it if expired; a lost peer
    /// whose update says online is connected again and its timer cancelled);
    /// `lost` starts its lost timer; `disconnected` removes it at once.
    pub fn handle_peer_update(&mut self, kind: UpdateKind, peer: PeerInfo, now: Instant) {
        match kind {
            UpdateKind::Node => {
                let lost = peer.status == PeerStatus::Lost;
                self.apply_peer(peer, lost, now);
            }
            UpdateKind::Lost => self.apply_peer(peer, true, now),
            UpdateKind::Disconnected => {
                if peer.node_key != self.self_key {
                    self.forget(&peer.node_key, RemoveReason::Disconnected);
                }
            }
        }
    }

    /// Our own coordinator session broke: every connected peer becomes lost
    /// at `now` (already lost peers keep their earlier `since`). The data
    /// plane keeps running; nothing is removed yet.
    pub fn handle_session_lost(&mut self, now: Instant) {
        let connected: Vec<NodeKey> = self
            .peers
            .iter()
            .filter(|(_, e)| e.state == PeerState::Connected)
            .map(|(k, _)| *k)
            .collect();
        for key in &connected {
            self.mark_lost(key, now);
        }
        if !connected.is_empty() {
            tracing::info!(
                peers = connected.len(),
                "coordinator session lost: treating peers as lost"
            );
        }
    }

    /// The data plane's latest WireGuard handshake per peer. Call it with
    /// fresh data before [`handle_timeout`](Self::handle_timeout) when a
    /// lost-peer deadline is due. Times only move forward.
    pub fn handle_handshakes(&mut self, handshakes: &HashMap<NodeKey, Instant>) {
        for (key, at) in handshakes {
            if let Some(e) = self.peers.get_mut(key)
                && e.state.is_active()
            {
                e.last_handshake = Some(e.last_handshake.map_or(*at, |old| old.max(*at)));
            }
        }
    }

    /// Expires lost peers whose deadline has come and that have no handshake
    /// within the lost-peer timeout; re-schedules those that do.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, key)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.remove(&(at, key));
            let Some(e) = self.peers.get_mut(&key) else {
                continue;
            };
            e.deadline = None;
            if !matches!(e.state, PeerState::Lost { .. }) {
                continue;
            }
            let keep_until = e
                .last_handshake
                .map(|h| h + self.lost_peer_timeout)
                .filter(|until| *until > now);
            match keep_until {
                Some(until) => {
                    tracing::debug!(peer = %e.info.name, key = %key.short(), "lost peer still has handshakes, kept");
                    e.deadline = Some(until);
                    self.deadlines.insert((until, key));
                }
                None => {
                    tracing::info!(peer = %e.info.name, key = %key.short(), "lost peer expired: no handshake within the timeout");
                    e.state = PeerState::Expired { since: now };
                    e.state_since = now;
                    e.last_handshake = None;
                    self.actions.push_back(PeerAction::Remove {
                        key,
                        reason: RemoveReason::Expired,
                    });
                }
            }
        }
    }

    // ---- outputs ----

    /// The next data-plane action, in order.
    pub fn poll_action(&mut self) -> Option<PeerAction> {
        self.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        self.deadlines
            .first()
            .map(|(at, _)| (*at, "lost peer expiry check"))
    }

    // ---- queries ----

    /// Addresses for a tailnet host name: `name` or `name.<domain>`
    /// (case-insensitive, trailing dot allowed), for peers in the data plane
    /// and for this node itself.
    pub fn resolve(&self, host: &str) -> Option<(Ipv4Addr, Ipv6Addr)> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let label = match &self.me {
            Some(me) if !me.domain.is_empty() => host
                .strip_suffix(me.domain.as_str())
                .and_then(|h| h.strip_suffix('.'))
                .unwrap_or(&host),
            _ => &host,
        };
        if label.is_empty() || label.contains('.') {
            return None;
        }
        if let Some(me) = &self.me
            && me.name == label
        {
            return Some((me.ipv4, me.ipv6));
        }
        let entry = self.peers.get(self.names.get(label)?)?;
        entry
            .state
            .is_active()
            .then_some((entry.info.ipv4, entry.info.ipv6))
    }

    /// One peer.
    pub fn peer(&self, key: &NodeKey) -> Option<&PeerEntry> {
        self.peers.get(key)
    }

    /// Every remembered peer, ordered by key.
    pub fn peers(&self) -> impl Iterator<Item = (&NodeKey, &PeerEntry)> {
        self.peers.iter()
    }

    /// Peers per state.
    pub fn counts(&self) -> PeerCounts {
        let mut c = PeerCounts::default();
        for e in self.peers.values() {
            match e.state {
                PeerState::Connected => c.connected += 1,
                PeerState::Lost { .. } => c.lost += 1,
                PeerState::Expired { .. } => c.expired += 1,
            }
        }
        c
    }

    /// Our identity, once a `welcome` arrived.
    pub fn self_addresses(&self) -> Option<&SelfAddresses> {
        self.me.as_ref()
    }

    // ---- internals ----

    fn apply_peer(&mut self, info: PeerInfo, lost: bool, now: Instant) {
        let key = info.node_key;
        if key == self.self_key {
            tracing::debug!("coordinator listed this node as its own peer; ignored");
            return;
        }
        self.index_name(&key, &info.name);
        let Some(e) = self.peers.get_mut(&key) else {
            tracing::debug!(peer = %info.name, key = %key.short(), lost, "new peer");
            self.actions.push_back(PeerAction::Upsert {
                peer: info.clone(),
                fresh_session: false,
            });
            self.peers.insert(
                key,
                PeerEntry {
                    info,
                    state: PeerState::Connected,
                    state_since: now,
                    last_handshake: None,
                    deadline: None,
                },
            );
            if lost {
                self.mark_lost(&key, now);
            }
            return;
        };
        if let PeerState::Expired { .. } = e.state {
            tracing::info!(peer = %info.name, key = %key.short(), "expired peer listed again: rebuilding with a fresh session");
            self.actions.push_back(PeerAction::Upsert {
                peer: info.clone(),
                fresh_session: true,
            });
            e.info = info;
            e.state = PeerState::Connected;
            e.state_since = now;
            e.last_handshake = None;
            if lost {
                self.mark_lost(&key, now);
            }
            return;
        }
        if !same_except_status(&e.info, &info) {
            tracing::debug!(peer = %info.name, key = %key.short(), "peer changed");
            self.actions.push_back(PeerAction::Upsert {
                peer: info.clone(),
                fresh_session: false,
            });
        }
        e.info = info;
        match (lost, e.state) {
            (true, PeerState::Connected) => self.mark_lost(&key, now),
            (false, PeerState::Lost { .. }) => {
                tracing::info!(peer = %e.info.name, key = %key.short(), "lost peer is back");
                e.state = PeerState::Connected;
                e.state_since = now;
                if let Some(at) = e.deadline.take() {
                    self.deadlines.remove(&(at, key));
                }
            }
            _ => {}
        }
    }

    /// Connected -> Lost{now} with its expiry deadline. Lost peers are left alone.
    fn mark_lost(&mut self, key: &NodeKey, now: Instant) {
        let Some(e) = self.peers.get_mut(key) else {
            return;
        };
        if e.state != PeerState::Connected {
            return;
        }
        tracing::debug!(peer = %e.info.name, key = %key.short(), "peer lost");
        e.state = PeerState::Lost { since: now };
        e.state_since = now;
        let from = e.last_handshake.map_or(now, |h| h.max(now));
        let at = from + self.lost_peer_timeout;
        if let Some(old) = e.deadline.replace(at) {
            self.deadlines.remove(&(old, *key));
        }
        self.deadlines.insert((at, *key));
    }

    fn forget(&mut self, key: &NodeKey, reason: RemoveReason) {
        let Some(e) = self.peers.remove(key) else {
            return;
        };
        if let Some(at) = e.deadline {
            self.deadlines.remove(&(at, *key));
        }
        let lower = e.info.name.to_ascii_lowercase();
        if self.names.get(&lower) == Some(key) {
            self.names.remove(&lower);
        }
        if e.state.is_active() {
            tracing::info!(peer = %e.info.name, key = %key.short(), ?reason, "peer removed");
            self.actions
                .push_back(PeerAction::Remove { key: *key, reason });
        }
    }

    fn index_name(&mut self, key: &NodeKey, name: &str) {
        let lower = name.to_ascii_lowercase();
        if let Some(old) = self
            .peers
            .get(key)
            .map(|e| e.info.name.to_ascii_lowercase())
            && old != lower
            && self.names.get(&old) == Some(key)
        {
            self.names.remove(&old);
        }
        self.names.insert(lower, *key);
    }
}

fn same_except_status(a: &PeerInfo, b: &PeerInfo) -> bool {
    a.node_key == b.node_key
        && a.name == b.name
        && a.ipv4 == b.ipv4
        && a.ipv6 == b.ipv6
        && a.endpoints == b.endpoints
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    const TIMEOUT: Duration = DEFAULT_LOST_PEER_TIMEOUT;

    fn key(b: u8) -> NodeKey {
        NodeKey([b; 32])
    }

    fn peer(b: u8, status: PeerStatus) -> PeerInfo {
        PeerInfo {
            node_key: key(b),
            name: format!("peer{b}"),
            ipv4: Ipv4Addr::new(100, 64, 0, b),
            ipv6: Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, u16::from(b)),
            endpoints: vec![format!("192.0.2.{b}:41641").parse().unwrap()],
            status,
        }
    }

    fn online(b: u8) -> PeerInfo {
        peer(b, PeerStatus::Online)
    }

    fn drain(l: &mut PeerLifecycle) -> Vec<PeerAction> {
        std::iter::from_fn(|| l.poll_action()).collect()
    }

    fn upsert(p: PeerInfo, fresh_session: bool) -> PeerAction {
        PeerAction::Upsert {
            peer: p,
            fresh_session,
        }
    }

    fn remove(b: u8, reason: RemoveReason) -> PeerAction {
        PeerAction::Remove {
            key: key(b),
            reason,
        }
    }

    fn lifecycle() -> PeerLifecycle {
        PeerLifecycle::new(key(0), TIMEOUT)
    }

    /// Runs every due timeout up to `now` with the given handshakes.
    fn advance(l: &mut PeerLifecycle, now: Instant, hs: &HashMap<NodeKey, Instant>) {
        while let Some((at, _)) = l.poll_timeout() {
            if at > now {
                break;
            }
            l.handle_handshakes(hs);
            l.handle_timeout(at);
        }
    }

    #[test]
    fn snapshot_adds_peers_and_ignores_self() {
        let t0 = Instant::now();
        let mut l = lifecycle();
        l.handle_snapshot(vec![online(1), online(0), peer(2, PeerStatus::Lost)], t0);
        assert_eq!(
            drain(&mut l),
            vec![
                upsert(online(1), false),
                upsert(peer(2, PeerStatus::Lost), false)
            ]
        );
        assert_eq!(l.peer(&key(1)).unwrap().state(), PeerState::Connected);
        assert_eq!(
            l.peer(&key(2)).unwrap().state(),
            PeerState::Lost { since: t0 }
        );
        assert_eq!(l.poll_timeout().unwrap().0, t0 + TIMEOUT);
        assert!(l.peer(&key(0)).is_none());
    }

    #[test]
    fn lost_peer_removed_at_timeout_without_handshake() {
        let t0 = Instant::now();
        let mut l = lifecycle();
        l.handle_snapshot(vec![online(1)], t0);
        drain(&mut l);
        l.handle_peer_update(UpdateKind::Lost, peer(1, PeerStatus::Lost), t0 + MIN);
        assert!(
            drain(&mut l).is_empty(),
            "a lost peer stays in the data plane"
        );
        let (at, _) = l.poll_timeout().unwrap();
        assert_eq!(at, t0 + MIN + TIMEOUT);
        // Nothing happens before the deadline.
        l.handle_timeout(at - Duration::from_secs(1));
        assert!(drain(&mut l).is_empty());
        l.handle_handshakes(&HashMap::new());
        l.handle_timeout(at);
        assert_eq!(drain(&mut l), vec![remove(1, RemoveReason::Expired)]);
        assert_eq!(
            l.peer(&key(1)).unwrap().state(),
            PeerState::Expired { since: at }
        );
        assert!(l.poll_timeout().is_none());
        assert_eq!(l.resolve("peer1"), None, "expired peers do not resolve");
    }

    #[test]
    fn lost_peer_with_recent_handshake_is_kept_and_rechecked() {
        let t0 = Instant::now();
        let mut l = lifecycle();
        l.handle_snapshot(vec![online(1)], t0);
        drain(&mut l);
        l.handle_peer_update(UpdateKind::Lost, peer(1, PeerStatus::Lost), t0);
        let (at, _) = l.poll_timeout().unwrap();
        // A handshake 10 minutes into the loss.
        let hs = HashMap::from([(key(1), t0 + 10 * MIN)]);
        l.handle_handshakes(&hs);
        l.handle_timeout(at);
        assert!(
            drain(&mut l).is_empty(),
            "kept: handshake within the timeout"
        );
        let (again, _) = l.poll_timeout().unwrap();
        assert_eq!(again, t0 + 10 * MIN + TIMEOUT);
        // No newer handshake by then: expired.
        l.handle_handshakes(&hs);
        l.handle_timeout(again);
        assert_eq!(drain(&mut l), vec![remove(1, RemoveReason::Expired)]);
    }

    #[test]
    fn handshake_known_before_loss_extends_the_first_deadline() {
        let t0 = Instant::now();
        let mut l = lifecycle();
        l.handle_snapshot(vec![online(1)], t0);
        drain(&mut l);
        // A handshake "in the future" relative to the loss (clock skew between
        // data plane and controller) pushes the deadline out.
        l.handle_handshakes(&HashMap::from([(key(1), t0 + 2 * MIN)]));
        l.handle_session_lost(t0 + MIN);
        assert_eq!(l.poll_timeout().unwrap().0, t0 + 2 * MIN + TIMEOUT);
    }

    #[test]
    fn node_update_cancels_lost_timer() {
        let t0 = Instant::now();
        let mut l = lifecycle();
        l.handle_snapshot(vec![online(1)], t0);
        drain(&mut l);
        l.handle_peer_update(UpdateKind::Lost, peer(1, PeerStatus::Lost), t0);
        assert!(l.poll_timeout().is_some());
        l.handle_peer_update(UpdateKind::Node, online(1), t0 + MIN);
        assert!(
            drain(&mut l).is_empty(),
            "unchanged peer: no data-plane action"
        );
        assert!(l.poll_timeout().is_none(), "timer cancelled");
        assert_eq!(l.peer(&key(1)).unwrap().state(), PeerState::Connected);
        l.handle_timeout(t0 + 2 * TIMEOUT);
        assert!(drain(&mut l).is_empty());
    }

    #[test]
    fn disconnected_removes_at_once() {
        let t0 = Instant::now();
        let mut l = lifecycle();
        l.handle_snapshot(vec![online(1), online(2)], t0);
        drain(&mut l);
        l.handle_peer_update(UpdateKind::Disconnected, online(1), t0);
        assert_eq!(drain(&mut l), vec![remove(1, RemoveReason::Disconnected)]);
        assert!(l.peer(&key(1)).is_none(), "forgotten");
        // A lost peer that then says goodbye: removed, timer gone.
        l.handle_peer_update(UpdateKind::Lost, peer(2, PeerStatus::Lost), t0);
        l.handle_peer_update(UpdateKind::Disconnected, peer(2, PeerStatus::Lost), t0);
        assert_eq!(drain(&mut l), vec![remove(2, RemoveReason::Disconnected)]);
        assert!(l.poll_timeout().is_none());
        // Unknown peer: nothing.
        l.handle_peer_update(UpdateKind::Disconnected, online(9), t0);
        assert!(drain(&mut l).is_empty());
    }

    #[test]
    fn own_session_loss_then_expiry_then_snapshot_rebuilds() {
        let t0 = Instant::now();
        let mut l = lifecycle();
        l.handle_snapshot(vec![online(1), online(2), online(3), online(4)], t0);
        drain(&mut l);
        // Peer 4 was already lost earlier: its `since` is kept.
        l.handle_peer_update(UpdateKind::Lost, peer(4, PeerStatus::Lost), t0);
        let t1 = t0 + 5 * MIN;
        l.handle_session_lost(t1);
        assert!(drain(&mut l).is_empty(), "the data plane keeps running");
        assert_eq!(
            l.peer(&key(1)).unwrap().state(),
            PeerState::Lost { since: t1 }
        );
        assert_eq!(
            l.peer(&key(4)).unwrap().state(),
            PeerState::Lost { since: t0 }
        );
        // Peer 3 keeps handshaking during the outage.
        let t2 = t1 + TIMEOUT + MIN;
        let hs = HashMap::from([(key(3), t1 + TIMEOUT)]);
        advance(&mut l, t2, &hs);
        let mut removed = drain(&mut l);
        removed.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(
            removed,
            vec![
                remove(1, RemoveReason::Expired),
                remove(2, RemoveReason::Expired),
                remove(4, RemoveReason::Expired),
            ]
        );
        assert_eq!(
            l.peer(&key(3)).unwrap().state(),
            PeerState::Lost { since: t1 }
        );
        assert_eq!(
            l.counts(),
            PeerCounts {
                connected: 0,
                lost: 1,
                expired: 3
            }
        );

        // Reconnected: 1 unchanged (rebuilt, it expired), 2 changed (rebuilt),
        // 3 unchanged and still active (untouched), 4 missing (forgotten,
        // already out of the data plane), 5 new.
        let mut changed2 = online(2);
        changed2.endpoints = vec!["198.51.100.2:5000".parse().unwrap()];
        l.handle_snapshot(vec![online(1), changed2.clone(), online(3), online(5)], t2);
        assert_eq!(
            drain(&mut l),
            vec![
                upsert(online(1), true),
                upsert(changed2, true),
                upsert(online(5), false),
            ]
        );
        assert_eq!(
            l.counts(),
            PeerCounts {
                connected: 4,
                lost: 0,
                expired: 0
            }
        );
        assert!(l.poll_timeout().is_none());
        assert!(l.peer(&key(4)).is_none());
    }

    #[test]
    fn snapshot_updates_changed_keeps_missing_as_lost_and_keeps_lost_since() {
        let t0 = Instant::now();
        let mut l = lifecycle();
        l.handle_snapshot(vec![online(1), online(2), online(3)], t0);
        drain(&mut l);
        l.handle_session_lost(t0 + MIN);
        let mut renamed = peer(1, PeerStatus::Online);
        renamed.name = "db".into();
        // 2 is lost per the coordinator, 3 is not listed (e.g. a restarted
        // coordinator that has not heard from it yet): it stays, lost.
        l.handle_snapshot(
            vec![renamed.clone(), peer(2, PeerStatus::Lost)],
            t0 + 2 * MIN,
        );
        assert_eq!(drain(&mut l), vec![upsert(renamed, false)]);
        assert_eq!(
            l.peer(&key(3)).unwrap().state(),
            PeerState::Lost { since: t0 + MIN },
            "an unlisted peer is kept as lost, with its earlier since"
        );
        assert_eq!(l.peer(&key(1)).unwrap().state(), PeerState::Connected);
        assert_eq!(
            l.peer(&key(2)).unwrap().state(),
            PeerState::Lost { since: t0 + MIN },
            "an already lost peer keeps its since"
        );
        assert_eq!(l.poll_timeout().unwrap().0, t0 + MIN + TIMEOUT);
        assert_eq!(l.resolve("peer1"), None, "old name dropped");
        assert!(l.resolve("db").is_some());
    }

    #[test]
    fn node_update_rebuilds_expired_peer() {
        let t0 = Instant::now();
        let mut l = lifecycle();
        l.handle_snapshot(vec![online(1)], t0);
        drain(&mut l);
        l.handle_session_lost(t0);
        l.handle_timeout(t0 + TIMEOUT);
        assert_eq!(drain(&mut l), vec![remove(1, RemoveReason::Expired)]);
        l.handle_peer_update(UpdateKind::Node, online(1), t0 + TIMEOUT + MIN);
        assert_eq!(drain(&mut l), vec![upsert(online(1), true)]);
        assert_eq!(l.peer(&key(1)).unwrap().last_handshake(), None);
    }

    #[test]
    fn resolve_names() {
        let t0 = Instant::now();
        let mut l = lifecycle();
        l.handle_self(SelfAddresses {
            name: "me".into(),
            ipv4: Ipv4Addr::new(100, 64, 0, 100),
            ipv6: "fd7a:115c:a1e0::100".parse().unwrap(),
            domain: "tailnet.internal".into(),
        });
        l.handle_snapshot(vec![online(1)], t0);
        let want = Some((online(1).ipv4, online(1).ipv6));
        assert_eq!(l.resolve("peer1"), want);
        assert_eq!(l.resolve("PEER1.tailnet.internal."), want);
        assert_eq!(l.resolve("peer1.other.example"), None);
        assert_eq!(l.resolve("peer1.tailnet"), None);
        assert_eq!(l.resolve(""), None);
        assert_eq!(l.resolve("tailnet.internal"), None);
        assert_eq!(
            l.resolve("me.tailnet.internal").map(|a| a.0),
            Some(Ipv4Addr::new(100, 64, 0, 100))
        );
        assert_eq!(l.resolve("nobody"), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Snapshot(Vec<(u8, u8, bool)>),
        Update(u8, u8, u8, bool),
        SessionLost,
        Advance(u32, Vec<(u8, u32)>),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            proptest::collection::vec((1u8..7, 0u8..2, any::<bool>()), 0..7).prop_map(Op::Snapshot),
            (0u8..3, 0u8..7, 0u8..2, any::<bool>()).prop_map(|(k, p, v, l)| Op::Update(k, p, v, l)),
            Just(Op::SessionLost),
            (
                0u32..40,
                proptest::collection::vec((1u8..7, 0u32..40), 0..4)
            )
                .prop_map(|(m, hs)| Op::Advance(m, hs)),
        ]
    }

    proptest::proptest! {
        /// Applying the actions to a model data plane always yields exactly
        /// the lifecycle's active peers, with their latest info; removals
        /// only target present peers and fresh rebuilds only absent ones.
        #[test]
        fn actions_keep_the_data_plane_in_sync(ops in proptest::collection::vec(op(), 1..40)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut l = lifecycle();
            let mut dp: HashMap<NodeKey, PeerInfo> = HashMap::new();
            let variant = |b: u8, v: u8, lost: bool| {
                let mut p = peer(b, if lost { PeerStatus::Lost } else { PeerStatus::Online });
                if v == 1 {
                    p.endpoints = vec!["203.0.113.1:1".parse().unwrap()];
                }
                p
            };
            for op in ops {
                match op {
                    Op::Snapshot(list) => l.handle_snapshot(
                        list.into_iter().map(|(b, v, lost)| variant(b, v, lost)).collect(),
                        now,
                    ),
                    Op::Update(kind, b, v, lost) => {
                        let kind = [UpdateKind::Node, UpdateKind::Lost, UpdateKind::Disconnected][usize::from(kind)];
                        l.handle_peer_update(kind, variant(b, v, lost), now);
                    }
                    Op::SessionLost => l.handle_session_lost(now),
                    Op::Advance(minutes, hs) => {
                        let hs: HashMap<NodeKey, Instant> =
                            hs.into_iter().map(|(b, m)| (key(b), t0 + MIN * m)).collect();
                        now += MIN * minutes;
                        advance(&mut l, now, &hs);
                    }
                }
                while let Some(a) = l.poll_action() {
                    match a {
                        PeerAction::Upsert { peer, fresh_session } => {
                            proptest::prop_assert!(peer.node_key != key(0), "self upserted");
                            if fresh_session {
                                proptest::prop_assert!(!dp.contains_key(&peer.node_key), "fresh rebuild of a present peer");
                            }
                            dp.insert(peer.node_key, peer);
                        }
                        PeerAction::Remove { key, .. } => {
                            proptest::prop_assert!(dp.remove(&key).is_some(), "removal of an absent peer");
                        }
                    }
                }
                let active: HashMap<NodeKey, PeerInfo> = l
                    .peers()
                    .filter(|(_, e)| e.state().is_active())
                    .map(|(k, e)| (*k, e.info().clone()))
                    .collect();
                proptest::prop_assert_eq!(dp.len(), active.len());
                for (k, info) in &active {
                    let have = dp.get(k).unwrap();
                    proptest::prop_assert!(same_except_status(have, info), "stale info for {:?}", k);
                }
                // Lost peers are exactly the ones with a pending expiry check.
                for (_, e) in l.peers() {
                    let lost = matches!(e.state(), PeerState::Lost { .. });
                    proptest::prop_assert_eq!(lost, e.expiry_check().is_some());
                    if let Some(at) = e.expiry_check() {
                        proptest::prop_assert!(at > now, "overdue check left behind");
                    }
                }
            }
        }
    }
}
