//! A userspace TCP/IP stack for the node's tailnet addresses: one [smoltcp] interface behind
//! async [`TcpStream`], [`TcpListener`] and [`UdpSocket`] handles.
//!
//! # Architecture
//!
//! ```text
//!   applications (SOCKS, forwards, exposure)         driver task (in the node, not here)
//!   TcpStream / TcpListener / UdpSocket               PacketQueues { inbound, outbound, free }
//!            │  lock, act, register waker                      │ poll(now, &mut queues)
//!            ▼                                                 ▼
//!   ┌───────────────────────── Netstack (Arc<Mutex<Core>>) ─────────────────────────┐
//!   │ smoltcp Interface (Medium::Ip, /32 + /128 addresses, default routes)           │
//!   │ demux by 4-tuple / port ──► one SocketSet per socket; dirty list + timer heap   │
//!   │ connection records: listen backlogs, reclaim, ephemeral ports, close reasons    │
//!   └─────────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! The netstack knows nothing about WireGuard. A single driver task owned by the node moves IP
//! packets: it appends decrypted packets to [`PacketQueues::inbound`], calls [`Netstack::poll`],
//! encrypts and sends [`PacketQueues::outbound`], returns spent buffers to
//! [`PacketQueues::free`], and then sleeps until the delay `poll` returned elapses, new packets
//! arrive, or [`Netstack::wait_for_work`] completes because an application did something that
//! needs a poll (wrote data, read enough to reopen the window, connected, closed...).
//!
//! ```no_run
//! # async fn driver(stack: tailnode_netstack::Netstack) {
//! use tailnode_netstack::PacketQueues;
//! let mut queues = PacketQueues::new();
//! loop {
//!     // ... push received IP packets to queues.inbound ...
//!     let delay = stack.poll(std::time::Instant::now(), &mut queues);
//!     // ... send queues.outbound, move the buffers to queues.free ...
//!     let sleep = async {
//!         match delay {
//!             Some(d) => tokio::time::sleep(d).await,
//!             None => std::future::pending().await,
//!         }
//!     };
//!     tokio::select! {
//!         _ = stack.wait_for_work() => {}
//!         _ = sleep => {}
//!         // _ = packets_from_the_tunnel => {}
//!     }
//! }
//! # }
//! ```
//!
//! # Contract
//!
//! - **Sans-IO core.** `poll` takes `now`; smoltcp sees time only through it (relative to the
//!   instant given to [`Netstack::new`]). Application handles never read the clock.
//! - **Packet path.** Inbound buffers are moved into smoltcp, parsed in place, and their payload
//!   copied once into the socket buffer; outbound packets are written straight into pooled
//!   buffers. No allocation per packet once the free pool is warm. Inbound checksums are not
//!   verified by default (WireGuard authenticated the packet); see
//!   [`NetstackConfig::verify_checksums`].
//! - **Cost per packet independent of the number of sockets.** Each socket sits in a smoltcp
//!   `SocketSet` of its own; inbound packets are demultiplexed by 4-tuple or port (one hash
//!   lookup), and egress runs only for sockets that received a packet, were used by the
//!   application, or whose timer is due. (With one shared set, smoltcp visits every socket per
//!   packet: 100 idle connections cost a bulk transfer 80% of its throughput.)
//! - **Locking.** One `std::sync::Mutex` guards the interface and all sockets; it is held for one
//!   operation or one `poll` (bounded to 256 inbound and 1024 outbound packets) and never across
//!   an `.await`. The core has no notion of tasks: a blocked operation returns `WouldBlock` and
//!   the core lists the operations that may complete after a `poll`. The handles keep the
//!   wakers beside the core under the same lock, register them in the same critical section as
//!   the operation that blocked, and wake the listed ones before unlocking, so no wake-up is lost.
//! - **Listening on any port.** smoltcp cannot listen on "any port", and its listening socket
//!   becomes the connection it accepts. `poll` looks at every inbound SYN first: for a port with a
//!   [`TcpListener`] it opens a LISTEN socket that the SYN turns into the new connection, bounded
//!   by [`NetstackConfig::listen_backlog`] (SYNs beyond it are dropped, and the client retries)
//!   and [`NetstackConfig::max_tcp_sockets`]. SYNs to ports nobody listens on get smoltcp's RST.
//! - **Reclaim.** Every socket leaves the `SocketSet` once it is closed: TIME-WAIT (whose 4-tuple
//!   is then only remembered, see `core`), reset, refused or cancelled connects, dropped handles.
//!   Dropping a [`TcpStream`] closes gracefully (FIN after queued data; RST if unread data was
//!   pending, as Linux does), and an orphan that does not finish within
//!   [`NetstackConfig::orphan_timeout`] is reset. [`Netstack::stats`] shows what is alive.
//! - **TCP tuning.** Nagle off, window scaling on, buffers from the config, delayed ACK off by
//!   default (ACKs go out once per poll, i.e. per burst of inbound packets).
//! - **ICMP.** Echo requests to our addresses are answered by smoltcp, whatever sockets are
//!   open; datagrams to closed UDP ports get ICMP port unreachable. An [`IcmpSocket`] (see
//!   [`Netstack::bind_icmp`]) sends echo requests and receives the echo replies addressed to us
//!   that carry its identifier: replies are demultiplexed by identifier like UDP by port.
//!
//! # Limitations
//!
//! Loss recovery is smoltcp's, as patched in the workspace's copy (`third_party/smoltcp/TAILNODE.md`):
//! fast retransmit after three duplicate ACKs (SACKed ones count even when the peer's window
//! grew), NewReno partial ACKs, lost-retransmission detection from SACK blocks, a tail loss
//! probe after two round trips, and a 200 ms minimum retransmission timeout. It does not
//! retransmit several holes per round trip from SACK information (no SACK scoreboard), so heavy
//! loss still costs timeouts: 5% random loss each way slows a 4 MiB upload to a Linux peer to
//! about 2 s.
//!
//! IP fragments are dropped (smoltcp is built without reassembly; counted in
//! [`NetstackStats::fragments_dropped`]). IPv6 extension headers other than hop-by-hop, routing
//! and destination options hide the transport header from the demultiplexer, so such a TCP
//! segment is answered with RST. At most 8 addresses. Datagrams
//! larger than the MTU are refused, not fragmented. Connect uses a distinct ephemeral port per
//! connection (16384 concurrent outbound connections). The peer's RST is inferred from the
//! inbound segment, so an out-of-window RST followed by a silent close is reported as a reset.
//!
//! # Layout
//!
//! - `config` — [`NetstackConfig`] and validation.
//! - `device` — [`PacketQueues`] and the smoltcp device over them.
//! - `inspect` — allocation-free TCP header look-up for inbound packets.
//! - `core` — the sans-IO state behind the mutex: interface, sockets, records, reclaim, and
//!   which blocked operations may complete.
//! - `wake` — the wakers of the tasks blocked on the core.
//! - `tcp`, `udp`, `icmp` — the async application handles (`core::icmp` is the echo sockets'
//!   side of the core).
//! - `testing` (feature `testing`) — two netstacks wired back to back in memory (tests and
//!   benchmarks).

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

mod config;
mod core;
mod device;
mod icmp;
mod inspect;
mod tcp;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;
mod udp;
mod wake;

pub use crate::config::NetstackConfig;
pub use crate::device::PacketQueues;
pub use crate::icmp::{EchoReply, IcmpBindError, IcmpSocket};
pub use crate::tcp::{TcpListener, TcpStream};
pub use crate::udp::UdpSocket;

use crate::core::{Core, Waiter, WouldBlock};
use crate::wake::Wakers;

/// Errors creating or reconfiguring a [`Netstack`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum NetstackError {
    /// A configuration value smoltcp cannot work with.
    #[error("invalid netstack configuration: {0}")]
    InvalidConfig(&'static str),
    /// An address that cannot be assigned to an interface (unspecified, multicast, broadcast).
    #[error("address {0} cannot be assigned to the netstack")]
    InvalidAddress(IpAddr),
    /// More addresses than the interface can hold.
    #[error("too many addresses (at most {max})")]
    TooManyAddresses {
        /// The limit.
        max: usize,
    },
}

/// Errors of [`Netstack::connect`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// The peer answered the SYN with a reset (nothing listens on that port).
    #[error("connection refused")]
    Refused,
    /// The attempt ended without an answer: [`NetstackConfig::tcp_timeout`] expired (or the
    /// local address was removed). Without `tcp_timeout` the SYN is retried until the caller's
    /// own timeout drops the `connect` future.
    #[error("connection attempt timed out")]
    TimedOut,
    /// The node has no address of the destination's family (yet).
    #[error("no local address of the destination's address family")]
    NoAddress,
    /// The destination is unspecified, multicast, broadcast, or has port 0.
    #[error("invalid destination {0}")]
    InvalidAddress(SocketAddr),
    /// [`NetstackConfig::max_tcp_sockets`] sockets are alive.
    #[error("too many TCP sockets")]
    TooManySockets,
    /// Every ephemeral port is in use.
    #[error("no free ephemeral port")]
    NoFreePort,
}

impl From<ConnectError> for io::Error {
    fn from(e: ConnectError) -> Self {
        let kind = match e {
            ConnectError::Refused => io::ErrorKind::ConnectionRefused,
            ConnectError::TimedOut => io::ErrorKind::TimedOut,
            ConnectError::NoAddress | ConnectError::NoFreePort => io::ErrorKind::AddrNotAvailable,
            ConnectError::InvalidAddress(_) => io::ErrorKind::InvalidInput,
            ConnectError::TooManySockets => io::ErrorKind::OutOfMemory,
        };
        io::Error::new(kind, e)
    }
}

/// Errors of [`Netstack::listen`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ListenError {
    /// Port 0 cannot be listened on.
    #[error("cannot listen on port 0")]
    PortZero,
    /// Another [`TcpListener`] holds this port.
    #[error("port {0} already has a listener")]
    InUse(u16),
}

/// Errors of [`Netstack::bind_udp`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum UdpBindError {
    /// Another [`UdpSocket`] is bound to this port.
    #[error("UDP port {0} already in use")]
    InUse(u16),
    /// [`NetstackConfig::max_udp_sockets`] sockets are alive.
    #[error("too many UDP sockets")]
    TooManySockets,
    /// Every ephemeral port is in use.
    #[error("no free ephemeral UDP port")]
    NoFreePort,
}

/// A snapshot of the netstack's resources and counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetstackStats {
    /// smoltcp TCP sockets alive (connecting, open, closing, listener sockets).
    pub tcp_sockets: usize,
    /// TCP connection records, including finished connections whose `TcpStream` is still held.
    pub tcp_connections: usize,
    /// Ports with a [`TcpListener`].
    pub tcp_listeners: usize,
    /// Closed connections whose 4-tuple is still reserved (TIME-WAIT, no socket).
    pub tcp_time_wait: usize,
    /// UDP sockets alive (including dropped ones still sending queued datagrams).
    pub udp_sockets: usize,
    /// ICMP echo sockets alive (including dropped ones still sending queued requests).
    pub icmp_sockets: usize,
    /// Inbound packets handed to `poll` so far.
    pub packets_in: u64,
    /// Outbound packets produced by `poll` so far.
    pub packets_out: u64,
    /// SYNs dropped because a listener's backlog (or the socket limit) was full.
    pub syn_dropped: u64,
    /// Inbound IP fragments dropped (smoltcp is built without reassembly).
    pub fragments_dropped: u64,
}

/// State shared by the netstack handle, the driver and every socket handle.
pub(crate) struct Shared {
    state: Mutex<State>,
    work: tokio::sync::Notify,
}

/// What the netstack's one lock guards: the sans-IO core and the tasks blocked on it.
struct State {
    core: Core,
    wakers: Wakers,
}

impl Shared {
    /// Runs `f` under the lock; wakes the tasks whose operations `f` made ready, and notifies
    /// the driver afterwards if `f` gave it work.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Core) -> R) -> R {
        self.locked(|core, _| f(core))
    }

    /// Runs an operation that may block: its result, or `Pending` with `cx`'s waker registered
    /// for the waiter the core named, in the same critical section as the operation.
    pub(crate) fn poll_with<T>(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut Core) -> Result<T, WouldBlock>,
    ) -> Poll<T> {
        self.locked(|core, wakers| match f(core) {
            Ok(done) => Poll::Ready(done),
            Err(WouldBlock(waiter)) => {
                wakers.register(waiter, cx.waker());
                Poll::Pending
            }
        })
    }

    /// A handle lets go: runs `f` and drops the wakers registered for `waiters`.
    pub(crate) fn release(&self, waiters: &[Waiter], f: impl FnOnce(&mut Core)) {
        self.locked(|core, wakers| {
            for &waiter in waiters {
                wakers.forget(waiter);
            }
            f(core);
        });
    }

    fn locked<R>(&self, f: impl FnOnce(&mut Core, &mut Wakers) -> R) -> R {
        let mut state = self.lock();
        let State { core, wakers } = &mut *state;
        let result = f(core, wakers);
        // Waking only schedules the tasks; they lock again once this returns.
        for waiter in core.take_ready() {
            wakers.wake(waiter);
        }
        let wake = std::mem::take(&mut core.wake_driver);
        drop(state);
        if wake {
            self.work.notify_one();
        }
        result
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves smoltcp's state consistent enough to keep
        // serving (smoltcp does not unwind mid-update on its own), so poisoning is ignored.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The node's TCP/IP stack: a cheap, cloneable handle shared by the driver and applications.
#[derive(Clone)]
pub struct Netstack {
    shared: Arc<Shared>,
}

impl fmt::Debug for Netstack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netstack")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Netstack {
    /// Creates a netstack; `now` is the origin of its clock.
    ///
    /// # Errors
    ///
    /// [`NetstackError`] if the configuration or an address is invalid.
    pub fn new(config: NetstackConfig, now: Instant) -> Result<Self, NetstackError> {
        let core = Core::new(config, now)?;
        Ok(Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    core,
                    wakers: Wakers::default(),
                }),
                work: tokio::sync::Notify::new(),
            }),
        })
    }

    /// The node's addresses.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.shared.with(|core| core.addresses())
    }

    /// Replaces the node's addresses at run time (the control plane assigns them). Connections
    /// bound to a removed address are closed.
    ///
    /// # Errors
    ///
    /// [`NetstackError::InvalidAddress`] or [`NetstackError::TooManyAddresses`]; the previous
    /// addresses stay in place.
    pub fn set_addresses(&self, addresses: Vec<IpAddr>) -> Result<(), NetstackError> {
        self.shared.with(|core| core.set_addresses(addresses))
    }

    /// Driver side: feeds `queues.inbound` to the stack, runs smoltcp, and appends outbound IP
    /// packets to `queues.outbound` (buffers come from `queues.free`; consumed inbound buffers
    /// are returned there). Returns the delay after which `poll` must run again even without
    /// new input, or `None` if only new input or application work (see
    /// [`wait_for_work`](Self::wait_for_work)) needs a poll. `Some(Duration::ZERO)` means more
    /// work is ready now (inbound packets left over from a bounded batch, for example).
    pub fn poll(&self, now: Instant, queues: &mut PacketQueues) -> Option<Duration> {
        self.shared.with(|core| core.poll(now, queues))
    }

    /// Driver side: completes when an application did something that needs a [`poll`](Self::poll).
    /// Notifications coalesce: one pending notification is kept if nobody waits.
    pub async fn wait_for_work(&self) {
        self.shared.work.notified().await;
    }

    /// Opens a TCP connection to `remote` from an ephemeral port (random in 49152..=65535) of
    /// our address of the same family. Apply a timeout with `tokio::time::timeout`: dropping
    /// the future resets the attempt and frees its socket.
    ///
    /// # Errors
    ///
    /// [`ConnectError`]: refused (RST), timed out (see [`NetstackConfig::tcp_timeout`]), no
    /// address of that family, invalid destination, or resource limits.
    pub async fn connect(&self, remote: SocketAddr) -> Result<TcpStream, ConnectError> {
        tcp::connect(&self.shared, remote).await
    }

    /// Accepts TCP connections to `port` on all of the node's addresses (including ones added
    /// later).
    ///
    /// # Errors
    ///
    /// [`ListenError`] for port 0 or a port that already has a listener.
    pub fn listen(&self, port: u16) -> Result<TcpListener, ListenError> {
        self.shared.with(|core| core.listen(port))?;
        Ok(TcpListener::new(self.shared.clone(), port))
    }

    /// Binds a UDP socket to `local_port` (or an ephemeral port) on all of the node's addresses.
    ///
    /// # Errors
    ///
    /// [`UdpBindError`] if the port is taken or a limit is reached.
    pub fn bind_udp(&self, local_port: Option<u16>) -> Result<UdpSocket, UdpBindError> {
        let port = self.shared.with(|core| core.udp_bind(local_port))?;
        Ok(UdpSocket::new(self.shared.clone(), port))
    }

    /// Opens an ICMP echo socket with echo identifier `ident` (a random free one if `None`), for
    /// pinging tailnet addresses over IPv4 and IPv6.
    ///
    /// # Errors
    ///
    /// [`IcmpBindError`] if the identifier is taken or too many echo sockets are open.
    pub fn bind_icmp(&self, ident: Option<u16>) -> Result<IcmpSocket, IcmpBindError> {
        let ident = self.shared.with(|core| core.icmp_bind(ident))?;
        Ok(IcmpSocket::new(self.shared.clone(), ident))
    }

    /// Live sockets and counters.
    pub fn stats(&self) -> NetstackStats {
        self.shared.with(|core| core.stats())
    }
}
