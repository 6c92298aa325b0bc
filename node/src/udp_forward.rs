//! UDP port forwards: a local UDP socket whose datagrams are carried to a fixed tailnet
//! address, written `udp:LOCAL_ADDR:PORT=TAILNET_ADDR:PORT`.
//!
//! # Flows
//!
//! UDP has no connections, so the forward keeps *flows*, like a NAT: each distinct local client
//! source (IP and port) gets its own netstack UDP socket, hence its own tailnet source port, and
//! the replies arriving on that socket (from the forward's tailnet address only) go back to that
//! client and nobody else. A flow ends after [`UdpForwardConfig::idle_timeout`] without a datagram
//! in either direction; when [`UdpForwardConfig::max_flows`] flows exist, a new client evicts the
//! least recently active one.
//!
//! # Layout
//!
//! - [`FlowTable`]: the sans-IO core. Flows keyed by client address, last activity, idle expiry
//!   and eviction, with the time passed in. Generic over the per-flow value, so it is tested
//!   without sockets.
//! - [`UdpForward`]: the tokio driver. One task reads the local socket and sends each datagram
//!   through its flow's netstack socket; each flow has one task that reads replies from its
//!   netstack socket and sends them to its client from the local socket. Reply activity reaches
//!   the table through an atomic timestamp, read only when a flow looks idle: the hot path has no
//!   channel hop, no lock shared between flows and no allocation (a flow's buffers and task are
//!   created once, with the flow).
//!
//! Datagrams are limited by the tunnel MTU (the netstack does not fragment); larger ones are
//! dropped and counted.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tailnode_netstack::UdpSocket as TailnetSocket;
use tokio::net::UdpSocket;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, trace, warn};

use crate::node::NodeHandle;

/// Default idle time after which a flow is closed.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default bound on concurrent flows of one forward.
pub const DEFAULT_MAX_FLOWS: usize = 256;
/// Receive buffer size: any UDP datagram fits (pages never written are not resident).
const MAX_DATAGRAM: usize = 65_536;
/// Pause after a failed receive on the local socket that is not a transient error.
const RECV_BACKOFF: Duration = Duration::from_millis(50);

/// Settings of a [`UdpForward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpForwardConfig {
    /// A flow with no datagram either way for this long is closed and its tailnet socket
    /// released.
    pub idle_timeout: Duration,
    /// Maximum number of flows (local clients) at once; the least recently active one is
    /// evicted for a new client. At least 1.
    pub max_flows: usize,
}

impl Default for UdpForwardConfig {
    fn default() -> Self {
        Self {
            idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
            max_flows: DEFAULT_MAX_FLOWS,
        }
    }
}

/// Activity a flow value observed outside the table (replies, read by the flow's own task).
pub trait FlowActivity {
    /// When the flow last received a reply, if ever.
    fn last_reply(&self) -> Option<Instant>;
}

/// The flows of a forward, keyed by client address: the sans-IO core of [`UdpForward`].
#[derive(Debug)]
pub struct FlowTable<T> {
    flows: HashMap<SocketAddr, FlowEntry<T>>,
    idle_timeout: Duration,
    max_flows: usize,
    /// No flow expires before this (a lower bound: activity only moves deadlines later).
    next_check: Option<Instant>,
}

#[derive(Debug)]
struct FlowEntry<T> {
    value: T,
    last_seen: Instant,
}

impl<T: FlowActivity> FlowTable<T> {
    /// An empty table.
    pub fn new(config: UdpForwardConfig) -> Self {
        Self {
            flows: HashMap::new(),
            idle_timeout: config.idle_timeout,
            max_flows: config.max_flows.max(1),
            next_check: None,
        }
    }

    /// The flow of `client`, marked active at `now`, if it exists.
    pub fn handle_datagram(&mut self, client: SocketAddr, now: Instant) -> Option<&T> {
        let entry = self.flows.get_mut(&client)?;
        entry.last_seen = now;
        Some(&entry.value)
    }

    /// Adds the flow of a new `client` (which must not have one) and returns the flow evicted to
    /// make room, if the table was full: the one with the oldest activity.
    pub fn insert(
        &mut self,
        client: SocketAddr,
        value: T,
        now: Instant,
    ) -> Option<(SocketAddr, T)> {
        let mut evicted = None;
        if self.flows.len() >= self.max_flows && !self.flows.contains_key(&client) {
            let oldest = self
                .flows
                .iter()
                .min_by_key(|(_, entry)| entry.last_active())
                .map(|(addr, _)| *addr);
            evicted = oldest.and_then(|addr| self.flows.remove(&addr).map(|e| (addr, e.value)));
        }
        self.flows.insert(
            client,
            FlowEntry {
                value,
                last_seen: now,
            },
        );
        let deadline = now + self.idle_timeout;
        self.next_check = Some(self.next_check.map_or(deadline, |next| next.min(deadline)));
        evicted
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next, if any flow exists.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_check
    }

    /// Moves every flow idle for the whole idle timeout at `now` (counting replies) into
    /// `expired`.
    pub fn handle_timeout(&mut self, now: Instant, expired: &mut Vec<(SocketAddr, T)>) {
        if self.next_check.is_none_or(|next| now < next) {
            return;
        }
        let idle = self.idle_timeout;
        let idle_flows = self.flows.extract_if(|_, entry| {
            entry.last_seen = entry.last_active();
            now >= entry.last_seen + idle
        });
        expired.extend(idle_flows.map(|(addr, entry)| (addr, entry.value)));
        self.next_check = self.flows.values().map(|e| e.last_seen + idle).min();
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether there is no flow.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}

impl<T: FlowActivity> FlowEntry<T> {
    fn last_active(&self) -> Instant {
        self.value
            .last_reply()
            .map_or(self.last_seen, |reply| reply.max(self.last_seen))
    }
}

/// Live counters of a [`UdpForward`], readable while it runs.
#[derive(Debug, Default)]
pub struct UdpForwardCounters {
    flows: AtomicU64,
    flows_created: AtomicU64,
    flows_expired: AtomicU64,
    flows_evicted: AtomicU64,
    datagrams_up: AtomicU64,
    datagrams_down: AtomicU64,
    dropped: AtomicU64,
}

/// A snapshot of [`UdpForwardCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpForwardStats {
    /// Flows alive now.
    pub flows: u64,
    /// Flows created so far.
    pub flows_created: u64,
    /// Flows closed after their idle timeout.
    pub flows_expired: u64,
    /// Flows evicted to make room for a new client.
    pub flows_evicted: u64,
    /// Datagrams from local clients sent into the tailnet.
    pub datagrams_up: u64,
    /// Replies sent back to local clients.
    pub datagrams_down: u64,
    /// Datagrams dropped: no tailnet socket available, send failures (e.g. above the MTU),
    /// replies from an address other than the forward's target.
    pub dropped: u64,
}

impl UdpForwardCounters {
    /// The current values.
    pub fn snapshot(&self) -> UdpForwardStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        UdpForwardStats {
            flows: get(&self.flows),
            flows_created: get(&self.flows_created),
            flows_expired: get(&self.flows_expired),
            flows_evicted: get(&self.flows_evicted),
            datagrams_up: get(&self.datagrams_up),
            datagrams_down: get(&self.datagrams_down),
            dropped: get(&self.dropped),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A UDP forward: a bound local socket and its target, ready to [`serve`](Self::serve).
pub struct UdpForward {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    remote: SocketAddr,
    node: NodeHandle,
    config: UdpForwardConfig,
    counters: Arc<UdpForwardCounters>,
}

impl fmt::Debug for UdpForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpForward")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("config", &self.config)
            .finish()
    }
}

impl UdpForward {
    /// Binds the local socket at `local`; datagrams will go to `remote` in the tailnet of `node`.
    ///
    /// # Errors
    ///
    /// When the local socket cannot be bound.
    pub async fn bind(
        local: SocketAddr,
        remote: SocketAddr,
        node: NodeHandle,
        config: UdpForwardConfig,
    ) -> io::Result<Self> {
        let socket = UdpSocket::bind(local).await?;
        let local = socket.local_addr()?;
        Ok(Self {
            socket: Arc::new(socket),
            local,
            remote,
            node,
            config,
            counters: Arc::new(UdpForwardCounters::default()),
        })
    }

    /// The bound local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The forward's live counters (they outlive [`serve`](Self::serve)).
    pub fn counters(&self) -> Arc<UdpForwardCounters> {
        Arc::clone(&self.counters)
    }

    /// Forwards datagrams until `cancel` fires; returns once every flow is closed.
    pub async fn serve(self, cancel: CancellationToken) {
        info!(local = %self.local, remote = %self.remote, "UDP forward listening");
        let origin = tokio::time::Instant::now();
        let tasks = TaskTracker::new();
        let mut table: FlowTable<Flow> = FlowTable::new(self.config);
        let mut expired = Vec::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let next = table.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                () = sleep_until_some(next) => {
                    table.handle_timeout(tokio::time::Instant::now().into_std(), &mut expired);
                    for (client, _flow) in expired.drain(..) {
                        bump(&self.counters.flows_expired);
                        debug!(%client, remote = %self.remote, "UDP forward: flow expired");
                    }
                    self.counters.flows.store(table.len() as u64, Ordering::Relaxed);
                }
                received = self.socket.recv_from(&mut buf) => {
                    let (len, client) = match received {
                        Ok(received) => received,
                        Err(error) => {
                            debug!(%error, "UDP forward: receive failed");
                            tokio::time::sleep(RECV_BACKOFF).await;
                            continue;
                        }
                    };
                    let now = tokio::time::Instant::now().into_std();
                    if table.handle_datagram(client, now).is_none() {
                        let Some(flow) = self.open_flow(client, origin, &cancel, &tasks) else {
                            bump(&self.counters.dropped);
                            continue;
                        };
                        if let Some((evicted, _flow)) = table.insert(client, flow, now) {
                            bump(&self.counters.flows_evicted);
                            debug!(client = %evicted, "UDP forward: flow evicted (flow limit)");
                        }
                        self.counters.flows.store(table.len() as u64, Ordering::Relaxed);
                    }
                    let Some(flow) = table.handle_datagram(client, now) else {
                        continue;
                    };
                    match flow.socket.send_to(&buf[..len], self.remote).await {
                        Ok(_) => {
                            bump(&self.counters.datagrams_up);
                            trace!(%client, len, "UDP forward: datagram sent");
                        }
                        Err(error) => {
                            bump(&self.counters.dropped);
                            debug!(%client, len, %error, "UDP forward: datagram dropped");
                        }
                    }
                }
            }
        }
        drop(table);
        self.counters.flows.store(0, Ordering::Relaxed);
        tasks.close();
        tasks.wait().await;
        info!(local = %self.local, "UDP forward stopped");
    }

    /// Binds the tailnet socket of a new flow and starts its reply task.
    fn open_flow(
        &self,
        client: SocketAddr,
        origin: tokio::time::Instant,
        cancel: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Option<Flow> {
        let socket = match self.node.netstack().bind_udp(None) {
            Ok(socket) => Arc::new(socket),
            Err(error) => {
                warn!(%client, %error, "UDP forward: no tailnet socket for a new flow");
                return None;
            }
        };
        let activity = Arc::new(ReplyClock {
            origin,
            nanos: AtomicU64::new(0),
        });
        let token = cancel.child_token();
        tasks.spawn(forward_replies(
            Arc::clone(&socket),
            Arc::clone(&self.socket),
            client,
            self.remote,
            Arc::clone(&activity),
            Arc::clone(&self.counters),
            token.clone(),
        ));
        bump(&self.counters.flows_created);
        debug!(%client, tailnet_port = socket.local_port(), remote = %self.remote, "UDP forward: new flow");
        Some(Flow {
            socket,
            activity,
            _task: token.drop_guard(),
        })
    }
}

/// One flow's resources; dropping it stops the reply task and releases the tailnet socket.
struct Flow {
    socket: Arc<TailnetSocket>,
    activity: Arc<ReplyClock>,
    _task: DropGuard,
}

impl FlowActivity for Flow {
    fn last_reply(&self) -> Option<Instant> {
        self.activity.last()
    }
}

/// The time of a flow's last reply, written by its reply task.
struct ReplyClock {
    origin: tokio::time::Instant,
    /// Nanoseconds since `origin` plus one; 0 means never.
    nanos: AtomicU64,
}

impl ReplyClock {
    fn touch(&self) {
        let since = self.origin.elapsed().as_nanos();
        let value = u64::try_from(since).unwrap_or(u64::MAX - 1) + 1;
        self.nanos.store(value, Ordering::Relaxed);
    }

    fn last(&self) -> Option<Instant> {
        match self.nanos.load(Ordering::Relaxed) {
            0 => None,
            n => Some((self.origin + Duration::from_nanos(n - 1)).into_std()),
        }
    }
}

/// Sends replies arriving on a flow's tailnet socket to its client, until cancelled.
async fn forward_replies(
    socket: Arc<TailnetSocket>,
    local: Arc<UdpSocket>,
    client: SocketAddr,
    remote: SocketAddr,
    activity: Arc<ReplyClock>,
    counters: Arc<UdpForwardCounters>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let received = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            received = socket.recv_from(&mut buf) => received,
        };
        let (len, from) = match received {
            Ok(received) => received,
            Err(error) => {
                debug!(%client, %error, "UDP forward: tailnet receive failed; flow stops replying");
                return;
            }
        };
        if from != remote {
            bump(&counters.dropped);
            trace!(%client, %from, "UDP forward: reply from another address dropped");
            continue;
        }
        activity.touch();
        match local.send_to(&buf[..len], client).await {
            Ok(_) => {
                bump(&counters.datagrams_down);
                trace!(%client, len, "UDP forward: reply sent");
            }
            Err(error) => debug!(%client, %error, "UDP forward: reply to the client failed"),
        }
    }
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[derive(Debug, Default)]
    struct Fake {
        id: u32,
        reply: Cell<Option<Instant>>,
    }

    impl FlowActivity for Fake {
        fn last_reply(&self) -> Option<Instant> {
            self.reply.get()
        }
    }

    fn fake(id: u32) -> Fake {
        Fake {
            id,
            reply: Cell::new(None),
        }
    }

    fn client(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    const IDLE: Duration = Duration::from_secs(60);

    fn table(max_flows: usize) -> FlowTable<Fake> {
        FlowTable::new(UdpForwardConfig {
            idle_timeout: IDLE,
            max_flows,
        })
    }

    #[test]
    fn flows_are_per_client_address() {
        let t0 = Instant::now();
        let mut t = table(8);
        assert!(t.handle_datagram(client(1), t0).is_none());
        assert!(t.insert(client(1), fake(1), t0).is_none());
        assert!(t.insert(client(2), fake(2), t0).is_none());
        assert_eq!(t.handle_datagram(client(1), t0).unwrap().id, 1);
        assert_eq!(t.handle_datagram(client(2), t0).unwrap().id, 2);
        assert!(t.handle_datagram(client(3), t0).is_none());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn idle_flows_expire_and_active_ones_stay() {
        let t0 = Instant::now();
        let mut t = table(8);
        let _ = t.insert(client(1), fake(1), t0);
        let _ = t.insert(client(2), fake(2), t0);
        let _ = t.insert(client(3), fake(3), t0);
        assert_eq!(t.poll_timeout(), Some(t0 + IDLE));
        // Client 2 sends at 30 s; flow 3 only receives a reply at 40 s.
        let _ = t.handle_datagram(client(2), t0 + Duration::from_secs(30));
        t.handle_datagram(client(3), t0)
            .unwrap()
            .reply
            .set(Some(t0 + Duration::from_secs(40)));
        let mut expired = Vec::new();
        t.handle_timeout(t0 + IDLE - Duration::from_millis(1), &mut expired);
        assert!(expired.is_empty(), "nothing expires before its deadline");
        t.handle_timeout(t0 + IDLE, &mut expired);
        assert_eq!(
            expired.iter().map(|(_, f)| f.id).collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(t.poll_timeout(), Some(t0 + Duration::from_secs(90)));
        expired.clear();
        t.handle_timeout(t0 + Duration::from_secs(100), &mut expired);
        let mut ids: Vec<_> = expired.iter().map(|(_, f)| f.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![2, 3]);
        assert!(t.is_empty());
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn full_table_evicts_the_least_recently_active_flow() {
        let t0 = Instant::now();
        let mut t = table(3);
        for i in 1..=3u16 {
            let _ = t.insert(
                client(i),
                fake(u32::from(i)),
                t0 + Duration::from_secs(u64::from(i)),
            );
        }
        // Flow 1 is the oldest by its datagrams but had a reply recently.
        t.handle_datagram(client(1), t0 + Duration::from_secs(1))
            .unwrap()
            .reply
            .set(Some(t0 + Duration::from_secs(10)));
        let (addr, evicted) = t
            .insert(client(4), fake(4), t0 + Duration::from_secs(11))
            .unwrap();
        assert_eq!((addr, evicted.id), (client(2), 2));
        assert_eq!(t.len(), 3);
        assert!(t.handle_datagram(client(2), t0).is_none());
    }

    #[test]
    fn a_zero_flow_limit_still_serves_one_client() {
        let t0 = Instant::now();
        let mut t = table(0);
        assert!(t.insert(client(1), fake(1), t0).is_none());
        assert_eq!(t.insert(client(2), fake(2), t0).unwrap().1.id, 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn reply_clock_round_trips() {
        let clock = ReplyClock {
            origin: tokio::time::Instant::now(),
            nanos: AtomicU64::new(0),
        };
        assert_eq!(clock.last(), None);
        clock.touch();
        let last = clock.last().unwrap();
        assert!(last >= clock.origin.into_std());
        assert!(last <= Instant::now());
    }
}
