//! Two netstacks wired back to back in memory, for tests and benchmarks.
//!
//! [`Pair`] spawns one tokio task that polls both stacks and moves the outbound packets of each
//! to the inbound queue of the other, through an optional [`LinkFilter`] (drop, inspect or count
//! packets). Time is real time plus an offset the test can push forward with
//! [`Pair::advance`], so timers (retransmission, TIME-WAIT, orphan deadlines) fire without
//! sleeping. Must be created inside a tokio runtime.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::{Netstack, NetstackConfig, NetstackError, PacketQueues};

/// IPv4 address of stack `a`.
pub const A_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// IPv4 address of stack `b`.
pub const B_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
/// IPv6 address of stack `a`.
pub const A_V6: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 1);
/// IPv6 address of stack `b`.
pub const B_V6: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 2);

/// How long [`Pair::wait_until`] waits (real time) before giving up.
const WAIT_LIMIT: Duration = Duration::from_secs(20);
/// How often [`Pair::wait_until`] re-checks its condition between driver rounds.
const RECHECK: Duration = Duration::from_millis(10);
/// Spare packet buffers kept between rounds.
const POOL_LIMIT: usize = 4096;

/// Direction of a packet on the in-memory link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From stack `a` to stack `b`.
    AToB,
    /// From stack `b` to stack `a`.
    BToA,
}

/// Sees every packet on the link; returning `false` drops it.
pub type LinkFilter = Box<dyn FnMut(Direction, &[u8]) -> bool + Send>;

struct Control {
    /// `Some(origin)`: the clock is frozen at `origin` plus the offset (only `advance` moves it).
    frozen: Option<Instant>,
    offset_micros: AtomicU64,
    clock_changed: Notify,
    filter: Mutex<Option<LinkFilter>>,
}

impl Control {
    fn now(&self) -> Instant {
        self.frozen.unwrap_or_else(Instant::now)
            + Duration::from_micros(self.offset_micros.load(Ordering::Relaxed))
    }
}

/// Two netstacks connected by an in-memory link, driven by a background task.
pub struct Pair {
    /// Stack `a` (100.64.0.1, fd7a:115c:a1e0::1 with [`Pair::configs`]).
    pub a: Netstack,
    /// Stack `b` (100.64.0.2, fd7a:115c:a1e0::2 with [`Pair::configs`]).
    pub b: Netstack,
    control: Arc<Control>,
    /// (rounds completed, whether the driver is now waiting for work).
    rounds: watch::Receiver<(u64, bool)>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("a", &self.a)
            .field("b", &self.b)
            .finish()
    }
}

impl Pair {
    /// Default configurations for `a` and `b` with the addresses above and fixed seeds.
    pub fn configs() -> (NetstackConfig, NetstackConfig) {
        let a = NetstackConfig {
            seed: 1,
            ..NetstackConfig::with_addresses(vec![IpAddr::V4(A_V4), IpAddr::V6(A_V6)])
        };
        let b = NetstackConfig {
            seed: 2,
            ..NetstackConfig::with_addresses(vec![IpAddr::V4(B_V4), IpAddr::V6(B_V6)])
        };
        (a, b)
    }

    /// Starts a pair with [`Pair::configs`].
    ///
    /// # Errors
    ///
    /// Never with the default configurations; see [`Pair::with_configs`].
    pub fn start() -> Result<Self, NetstackError> {
        let (a, b) = Self::configs();
        Self::with_configs(a, b)
    }

    /// Starts a pair with the given configurations.
    ///
    /// # Errors
    ///
    /// [`NetstackError`] if a configuration is invalid.
    pub fn with_configs(a: NetstackConfig, b: NetstackConfig) -> Result<Self, NetstackError> {
        Self::build(a, b, false)
    }

    /// Like [`Pair::with_configs`], but the stacks' clock stands still unless
    /// [`advance`](Self::advance)d: no timer (retransmission, probe, delayed ACK) ever fires on
    /// its own, so a test proves progress that does not depend on timers.
    ///
    /// # Errors
    ///
    /// [`NetstackError`] if a configuration is invalid.
    pub fn with_frozen_clock(a: NetstackConfig, b: NetstackConfig) -> Result<Self, NetstackError> {
        Self::build(a, b, true)
    }

    fn build(a: NetstackConfig, b: NetstackConfig, frozen: bool) -> Result<Self, NetstackError> {
        let now = Instant::now();
        let a = Netstack::new(a, now)?;
        let b = Netstack::new(b, now)?;
        let control = Arc::new(Control {
            frozen: frozen.then_some(now),
            offset_micros: AtomicU64::new(0),
            clock_changed: Notify::new(),
            filter: Mutex::new(None),
        });
        let (tx, rounds) = watch::channel((0, false));
        let task = tokio::spawn(drive(a.clone(), b.clone(), control.clone(), tx));
        Ok(Self {
            a,
            b,
            control,
            rounds,
            task,
        })
    }

    /// Moves both stacks' clock forward by `by` and wakes the driver.
    pub fn advance(&self, by: Duration) {
        let micros = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.control
            .offset_micros
            .fetch_add(micros, Ordering::Relaxed);
        self.control.clock_changed.notify_one();
    }

    /// Moves the clock forward without waking the driver: an idle period in which nothing
    /// polls the stacks, as happens on a quiet node.
    pub fn advance_idle(&self, by: Duration) {
        let micros = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.control
            .offset_micros
            .fetch_add(micros, Ordering::Relaxed);
    }

    /// Installs (or removes) the link filter.
    pub fn set_filter(&self, filter: Option<LinkFilter>) {
        *self
            .control
            .filter
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = filter;
    }

    /// Moves the clock forward by `by`, then waits until the driver has handled everything
    /// that became due (it polled after the jump and went idle).
    ///
    /// # Panics
    ///
    /// If the driver does not settle within 20 s of real time.
    pub async fn advance_settled(&self, by: Duration) {
        let start = self.rounds.borrow().0;
        self.advance(by);
        self.wait_until("the driver settled", |p| {
            let (round, idle) = *p.rounds.borrow();
            round > start && idle
        })
        .await;
    }

    /// Waits until `cond` holds, checking it after every round of the driver (and every 10 ms).
    ///
    /// # Panics
    ///
    /// If `cond` does not hold within 20 s of real time or the driver task ended: the test
    /// fails with `what` in the message.
    pub async fn wait_until(&self, what: &str, mut cond: impl FnMut(&Pair) -> bool) {
        let mut rounds = self.rounds.clone();
        let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
        loop {
            if cond(self) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "timed out waiting until {what}: a={:?} b={:?}",
                    self.a, self.b
                );
            }
            // Re-check after every driver round, and every few milliseconds for conditions
            // that application tasks make true after the driver went idle.
            tokio::select! {
                changed = rounds.changed() => {
                    if changed.is_err() {
                        panic!("netstack pair driver stopped while waiting until {what}");
                    }
                }
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn drive(
    a: Netstack,
    b: Netstack,
    control: Arc<Control>,
    rounds: watch::Sender<(u64, bool)>,
) {
    let mut qa = PacketQueues::new();
    let mut qb = PacketQueues::new();
    let mut round = 0u64;
    loop {
        let now = control.now();
        // One pool of spare buffers serves both stacks, whichever is sending more.
        qa.free.append(&mut qb.free);
        let delay_a = a.poll(now, &mut qa);
        transfer(&mut qa, &mut qb, Direction::AToB, &control);
        qb.free.append(&mut qa.free);
        let delay_b = b.poll(now, &mut qb);
        transfer(&mut qb, &mut qa, Direction::BToA, &control);
        qb.free.truncate(POOL_LIMIT);

        round += 1;
        let busy = !qa.inbound.is_empty()
            || !qb.inbound.is_empty()
            || delay_a == Some(Duration::ZERO)
            || delay_b == Some(Duration::ZERO);
        rounds.send_replace((round, !busy));
        if busy {
            // Let the applications run between rounds (matters on a current-thread runtime).
            tokio::task::yield_now().await;
            continue;
        }
        let delay = match (delay_a, delay_b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        let sleep = async {
            match delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = a.wait_for_work() => {}
            _ = b.wait_for_work() => {}
            _ = control.clock_changed.notified() => {}
            _ = sleep => {}
        }
    }
}

fn transfer(from: &mut PacketQueues, to: &mut PacketQueues, dir: Direction, control: &Control) {
    let mut filter = control
        .filter
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    while let Some(packet) = from.outbound.pop_front() {
        let pass = filter.as_mut().is_none_or(|f| f(dir, &packet));
        if pass {
            to.inbound.push_back(packet);
        } else {
            from.free.push(packet);
        }
    }
}
