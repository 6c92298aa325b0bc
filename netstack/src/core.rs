//! The sans-IO core: one smoltcp `Interface` plus the bookkeeping smoltcp leaves to its user
//! (demultiplexing, listen backlogs, socket reclaim, ephemeral ports, close reasons).
//!
//! Everything here runs under the netstack's single mutex and never blocks, sleeps or reads the
//! clock: the driver passes `now` into [`Core::poll`], and application operations act on the
//! state as of the last poll. Operations that give smoltcp something to do mark their socket
//! dirty and set [`Core::wake_driver`]; the caller notifies the driver after releasing the lock.
//!
//! # Blocking operations
//!
//! The core knows nothing of tasks or wakers. An application operation that cannot complete yet
//! (no data to read, a full send buffer, a handshake in progress, nothing to accept) returns
//! [`WouldBlock`] naming its [`Waiter`], and the core notes the interest. Whenever a poll or
//! another operation changes a socket so that a noted operation may now complete, the core
//! clears the interest and appends the waiter to its ready list, which the caller drains with
//! [`Core::take_ready`] before releasing the lock. Each noted interest is reported once. The
//! TCP checks are the negations of the conditions under which the operations block (see
//! `Conn::recv_ready` and its siblings), a receive on a UDP or echo socket is ready when a
//! datagram arrived, and a send on one whenever egress ran for its socket (the only thing that
//! frees queue room). Readiness changes only through ingress, egress, reclaim and the
//! operations themselves, which all run the checks, so no wake-up is missed.
//!
//! # One `SocketSet` per socket
//!
//! smoltcp scans every socket of a `SocketSet` for each inbound TCP segment, and its egress pass
//! visits every socket but emits at most one packet per socket, so with one shared set the cost
//! of each packet grows with the number of sockets (100 idle connections cut bulk throughput
//! five-fold). Here every socket lives in a set of its own. Inbound packets are demultiplexed
//! by 4-tuple (TCP), port (UDP) or echo identifier (ICMP echo replies, see `icmp`) before
//! smoltcp sees them; packets nobody owns go to an empty
//! set, so smoltcp still answers them (RST, ICMP port unreachable, echo reply). Egress runs only
//! for sockets that are dirty — they received a packet, the application acted on them, or their
//! smoltcp timer fell due (a min-heap keyed by each socket's `poll_at`).
//!
//! # Connection records
//!
//! Every TCP socket belongs to a [`Conn`] record addressed by a generational [`ConnId`], so a
//! handle never reaches a reused slot. A record is owned by a listener (handshake in progress or
//! waiting for `accept`), by the application (a `TcpStream` or a pending `connect`), or is an
//! orphan (its handle was dropped; it finishes its close and is reclaimed).
//!
//! # Reclaim
//!
//! smoltcp never frees sockets. Records that may be ending — a FIN or RST arrived for their
//! 4-tuple, the application shut down or dropped them — are *watched*: after every poll each
//! watched socket that reached TIME-WAIT or CLOSED is dropped. TIME-WAIT is not kept in a full
//! socket: the buffers are freed at once and only the 4-tuple is remembered for the TIME-WAIT
//! period, so ephemeral ports are not reused towards the same peer too early (a late
//! retransmitted FIN is answered with RST instead of ACK, which ends the peer's LAST-ACK all the
//! same). Unread data of a cleanly closed stream is kept in the record for the application.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, RecvError, State};
use smoltcp::socket::udp;
use smoltcp::time::{Duration as SmolDuration, Instant as SmolInstant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};

use crate::device::{PacketQueues, QueueDevice};
use crate::inspect::{self, Class, TcpSummary};
use crate::{
    ConnectError, ListenError, NetstackConfig, NetstackError, NetstackStats, UdpBindError,
};

mod icmp;

pub(crate) use icmp::IcmpEntry;

/// Inbound packets processed per `poll`; the rest wait for the next call (which `poll` asks for
/// with a zero delay), so one flood cannot hold the lock indefinitely.
const MAX_INBOUND_PER_POLL: usize = 256;
/// Outbound packets socket egress may emit per `poll`.
const MAX_OUTBOUND_PER_POLL: usize = 1024;
/// How long the 4-tuple of a closed connection stays reserved (smoltcp's TIME-WAIT duration).
const TIME_WAIT: Duration = Duration::from_secs(10);
/// Sockets created for a listener give up when the peer stays silent this long during the
/// handshake or while waiting for `accept()` (smoltcp retransmits SYN|ACK forever otherwise).
const PENDING_TIMEOUT: Duration = Duration::from_secs(60);
/// Ephemeral port range (RFC 6335 §6).
const EPHEMERAL_FIRST: u16 = 49152;
const EPHEMERAL_COUNT: u16 = 16384;
/// smoltcp's per-interface address limit (raised by the `iface-max-addr-count-8` feature).
pub(crate) const MAX_ADDRESSES: usize = 8;

type Tuple = (SocketAddr, SocketAddr);

/// A (local, remote) 4-tuple packed for hashing: one `write` into the keyed (DoS-resistant)
/// default hasher instead of a dozen for two `SocketAddr`s. Layout: family, local address,
/// remote address (IPv4 in the first 4 of 16 bytes), local port, remote port.
#[derive(Clone, Copy, PartialEq, Eq)]
struct TupleKey([u8; 37]);

impl TupleKey {
    fn new((local, remote): &Tuple) -> Self {
        let mut key = [0u8; 37];
        key[0] = u8::from(local.is_ipv6());
        let mut put_ip = |at: usize, ip: IpAddr| match ip {
            IpAddr::V4(v4) => key[at..at + 4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => key[at..at + 16].copy_from_slice(&v6.octets()),
        };
        put_ip(1, local.ip());
        put_ip(17, remote.ip());
        key[33..35].copy_from_slice(&local.port().to_be_bytes());
        key[35..37].copy_from_slice(&remote.port().to_be_bytes());
        Self(key)
    }
}

impl std::hash::Hash for TupleKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(&self.0);
    }
}

/// Stable identity of a TCP connection record; never reused for a different record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ConnId {
    index: u32,
    generation: u32,
}

/// Who holds a connection record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// Created for the listener on this port; not yet accepted.
    Listener(u16),
    /// A `TcpStream` or an in-progress `connect` holds it.
    App,
    /// The handle was dropped; reset if the close is not done by `deadline`. The deadline is
    /// set by the first poll after the drop (`None` until then): the time of the previous poll
    /// may be long past when an idle stack's handle is dropped.
    Orphan { deadline: Option<SmolInstant> },
}

/// How a connection ended, as reported to the application once its socket is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The peer closed cleanly: reads return end-of-stream after the buffered data.
    Fin,
    /// The peer reset the connection.
    Reset,
    /// The connection ended without FIN or RST: `tcp_timeout` expired, or the local address
    /// was removed.
    Aborted,
}

/// An application operation that waits for the core: what [`WouldBlock`] names and the ready
/// list reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Waiter {
    /// A read of this connection.
    TcpRecv(ConnId),
    /// A write to this connection, or its `connect` waiting for the handshake.
    TcpSend(ConnId),
    /// An `accept` on the listener of this port.
    Accept(u16),
    /// A receive on the UDP socket of this port.
    UdpRecv(u16),
    /// A send on the UDP socket of this port.
    UdpSend(u16),
    /// A receive on the ICMP echo socket with this identifier.
    IcmpRecv(u16),
    /// A send on the ICMP echo socket with this identifier.
    IcmpSend(u16),
}

/// The operation cannot complete yet; the core noted the interest and reports the waiter in its
/// ready list (see [`Core::take_ready`]) once the operation may complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(crate) struct WouldBlock(pub(crate) Waiter);

/// The blocked operations of one socket whose readiness the core watches.
#[derive(Debug, Clone, Copy, Default)]
struct Interest {
    recv: bool,
    send: bool,
}

/// One smoltcp socket in a `SocketSet` of its own.
struct Slot {
    set: SocketSet<'static>,
    handle: SocketHandle,
}

impl Slot {
    fn new(socket: impl smoltcp::socket::AnySocket<'static>) -> Self {
        let mut set = SocketSet::new(Vec::with_capacity(1));
        let handle = set.add(socket);
        Self { set, handle }
    }

    fn tcp(&mut self) -> &mut tcp::Socket<'static> {
        self.set.get_mut::<tcp::Socket>(self.handle)
    }

    fn tcp_ref(&self) -> &tcp::Socket<'static> {
        self.set.get::<tcp::Socket>(self.handle)
    }

    fn udp(&mut self) -> &mut udp::Socket<'static> {
        self.set.get_mut::<udp::Socket>(self.handle)
    }

    fn udp_ref(&self) -> &udp::Socket<'static> {
        self.set.get::<udp::Socket>(self.handle)
    }
}

/// One TCP connection (or a socket created for a listener).
pub(crate) struct Conn {
    /// The smoltcp socket; `None` once reclaimed (the record may outlive it for the app).
    slot: Option<Slot>,
    owner: Owner,
    /// (local, remote), registered in `Core::tuples` while the socket exists.
    tuple: Option<Tuple>,
    /// Our address of the connection (kept after the socket is gone, for error reporting).
    local: IpAddr,
    /// Ephemeral port reserved by `connect`.
    connect_port: Option<u16>,
    /// An RST for this 4-tuple arrived.
    rst_seen: bool,
    /// We sent (or queued) our FIN.
    shut_wr: bool,
    watched: bool,
    /// In `Core::dirty`: egress must run for this socket.
    dirty: bool,
    /// The smoltcp `poll_at` this record is scheduled for in `Core::timers`.
    timer: Option<SmolInstant>,
    end: Option<End>,
    /// Unread data of a connection whose socket was already reclaimed, and the read offset.
    leftover: Vec<u8>,
    leftover_pos: usize,
    /// Reads or writes (or the `connect`) blocked on this connection.
    interest: Interest,
}

impl Conn {
    fn new(slot: Slot, owner: Owner, tuple: Tuple) -> Self {
        Self {
            slot: Some(slot),
            owner,
            tuple: Some(tuple),
            local: tuple.0.ip(),
            connect_port: None,
            rst_seen: false,
            shut_wr: false,
            watched: false,
            dirty: false,
            timer: None,
            end: None,
            leftover: Vec::new(),
            leftover_pos: 0,
            interest: Interest::default(),
        }
    }

    /// Whether a read blocked on this connection may complete now: data, end of stream or an
    /// error (the negation of the condition under which `Core::tcp_recv` blocks).
    fn recv_ready(&self) -> bool {
        let Some(slot) = self.slot.as_ref() else {
            return true;
        };
        let sock = slot.tcp_ref();
        if sock.may_recv() {
            sock.recv_queue() > 0
        } else {
            // A FIN received always leaves the handshake states behind.
            !handshaking(sock.state())
        }
    }

    /// Whether a write (or the `connect`) blocked on this connection may complete now: room in
    /// the send buffer, or the handshake is over (the negation of the conditions under which
    /// `Core::tcp_send` and `Core::connect_finish` block).
    fn send_ready(&self) -> bool {
        let Some(slot) = self.slot.as_ref() else {
            return true;
        };
        let sock = slot.tcp_ref();
        if sock.may_send() {
            sock.send_queue() < sock.send_capacity()
        } else {
            !handshaking(sock.state())
        }
    }

    /// Whether this connection, created for a listener, can be accepted (see `Core::accept`).
    fn accept_ready(&self) -> bool {
        self.slot.as_ref().is_some_and(|slot| {
            !matches!(
                slot.tcp_ref().state(),
                State::SynReceived | State::Listen | State::Closed | State::TimeWait
            )
        })
    }

    /// The I/O error for a connection that can no longer carry data in the given direction;
    /// `address_kept` tells whether our address of the connection is still assigned.
    fn broken(&self, writing: bool, address_kept: bool) -> io::Error {
        let kind = if self.end == Some(End::Reset) || self.rst_seen {
            io::ErrorKind::ConnectionReset
        } else if writing && (self.shut_wr || self.end == Some(End::Fin)) {
            io::ErrorKind::BrokenPipe
        } else if !address_kept {
            io::ErrorKind::AddrNotAvailable
        } else {
            // Closed without FIN or RST while the address stayed: `tcp_timeout` expired.
            io::ErrorKind::TimedOut
        };
        io::Error::from(kind)
    }
}

/// A port with a `TcpListener`.
struct Listener {
    /// Records owned by this listener: handshakes and connections awaiting accept.
    pending: Vec<ConnId>,
    /// An `accept` is blocked: a pending record becoming acceptable makes it ready.
    interest: bool,
}

/// A UDP socket, keyed by its port.
struct UdpEntry {
    slot: Slot,
    /// The handle was dropped; removed once the queued datagrams are sent.
    orphan: bool,
    dirty: bool,
    /// Receives or sends blocked on this socket.
    interest: Interest,
}

/// Where an inbound TCP segment goes.
enum Route {
    /// To this connection's socket.
    Conn(ConnId),
    /// To no socket: smoltcp answers with RST (or ignores an RST).
    Nobody,
    /// Dropped before smoltcp (SYN beyond a full backlog).
    Drop,
}

/// A generational slab of connection records.
#[derive(Default)]
struct Slab {
    slots: Vec<(u32, Option<Conn>)>,
    free: Vec<u32>,
    len: usize,
}

impl Slab {
    fn insert(&mut self, conn: Conn) -> ConnId {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.0 = slot.0.wrapping_add(1);
            slot.1 = Some(conn);
            return ConnId {
                index,
                generation: slot.0,
            };
        }
        let index = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        self.slots.push((0, Some(conn)));
        ConnId {
            index,
            generation: 0,
        }
    }

    fn get(&self, id: ConnId) -> Option<&Conn> {
        match self.slots.get(id.index as usize) {
            Some((generation, Some(conn))) if *generation == id.generation => Some(conn),
            _ => None,
        }
    }

    fn get_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        match self.slots.get_mut(id.index as usize) {
            Some((generation, Some(conn))) if *generation == id.generation => Some(conn),
            _ => None,
        }
    }

    fn remove(&mut self, id: ConnId) -> Option<Conn> {
        match self.slots.get_mut(id.index as usize) {
            Some((generation, slot @ Some(_))) if *generation == id.generation => {
                self.len -= 1;
                self.free.push(id.index);
                slot.take()
            }
            _ => None,
        }
    }
}

/// Monotonic counters kept by the core.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    packets_in: u64,
    packets_out: u64,
    syn_dropped: u64,
    fragments_dropped: u64,
}

/// The state behind the netstack's mutex.
pub(crate) struct Core {
    iface: Interface,
    cfg: NetstackConfig,
    base: Instant,
    /// smoltcp time of the latest poll.
    now: SmolInstant,
    rng: StdRng,
    addresses: Vec<IpAddr>,
    conns: Slab,
    tuples: HashMap<TupleKey, ConnId>,
    listeners: HashMap<u16, Listener>,
    watch: Vec<ConnId>,
    /// Connections whose egress must run at the next poll.
    dirty: Vec<ConnId>,
    /// smoltcp timers: (poll_at, connection), stale entries skipped (see `Conn::timer`).
    timers: BinaryHeap<Reverse<(SmolInstant, ConnId)>>,
    connect_ports: HashSet<u16>,
    time_wait: VecDeque<(SmolInstant, Tuple)>,
    time_wait_set: HashSet<Tuple>,
    udp: HashMap<u16, UdpEntry>,
    udp_dirty: Vec<u16>,
    /// ICMP echo sockets by identifier (see `icmp`).
    icmp: HashMap<u16, IcmpEntry>,
    icmp_dirty: Vec<u16>,
    /// A set without sockets, for packets no socket owns.
    nobody: SocketSet<'static>,
    tcp_sockets: usize,
    counters: Counters,
    /// Set by operations that gave smoltcp work; cleared by whoever notifies the driver.
    pub(crate) wake_driver: bool,
    /// Blocked operations that may now complete (see [`Core::take_ready`]).
    ready: Vec<Waiter>,
}

impl Core {
    /// Builds the interface for `cfg` at time `now`.
    pub(crate) fn new(cfg: NetstackConfig, now: Instant) -> Result<Self, NetstackError> {
        cfg.validate()?;
        let mut free = Vec::new();
        let mut outbound = VecDeque::new();
        let mut device = QueueDevice {
            rx: None,
            rx_done: None,
            outbound: &mut outbound,
            free: &mut free,
            tx_budget: 0,
            mtu: cfg.mtu,
            verify_checksums: cfg.verify_checksums,
        };
        let mut iface_cfg = Config::new(HardwareAddress::Ip);
        iface_cfg.random_seed = cfg.seed;
        let iface = Interface::new(iface_cfg, &mut device, SmolInstant::ZERO);
        let addresses = cfg.addresses.clone();
        let mut core = Self {
            iface,
            rng: StdRng::seed_from_u64(cfg.seed ^ 0x5eed_7a11_0de0_0001),
            cfg,
            base: now,
            now: SmolInstant::ZERO,
            addresses: Vec::new(),
            conns: Slab::default(),
            tuples: HashMap::new(),
            listeners: HashMap::new(),
            watch: Vec::new(),
            dirty: Vec::new(),
            timers: BinaryHeap::new(),
            connect_ports: HashSet::new(),
            time_wait: VecDeque::new(),
            time_wait_set: HashSet::new(),
            udp: HashMap::new(),
            udp_dirty: Vec::new(),
            icmp: HashMap::new(),
            icmp_dirty: Vec::new(),
            nobody: SocketSet::new(Vec::new()),
            tcp_sockets: 0,
            counters: Counters::default(),
            wake_driver: false,
            ready: Vec::new(),
        };
        core.set_addresses(addresses)?;
        Ok(core)
    }

    /// The node's addresses.
    pub(crate) fn addresses(&self) -> Vec<IpAddr> {
        self.addresses.clone()
    }

    /// Replaces the node's addresses (each as a /32 or /128) and the default routes.
    ///
    /// Connections whose local address disappears are closed by smoltcp without an RST at
    /// their next egress, which this marks due for every connection.
    pub(crate) fn set_addresses(&mut self, addrs: Vec<IpAddr>) -> Result<(), NetstackError> {
        let mut unique: Vec<IpAddr> = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let addr = addr.to_canonical();
            let valid = match addr {
                IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
                IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
            };
            if !valid {
                return Err(NetstackError::InvalidAddress(addr));
            }
            if !unique.contains(&addr) {
                unique.push(addr);
            }
        }
        if unique.len() > MAX_ADDRESSES {
            return Err(NetstackError::TooManyAddresses { max: MAX_ADDRESSES });
        }
        self.iface.update_ip_addrs(|ips| {
            ips.clear();
            for addr in &unique {
                let prefix = if addr.is_ipv4() { 32 } else { 128 };
                // Capacity was checked above; a failed push cannot happen.
                let _ = ips.push(IpCidr::new(IpAddress::from(*addr), prefix));
            }
        });
        // Every destination is off-link: default routes send it to the device, whose next hop
        // (WireGuard's cryptokey routing) is decided outside the netstack. With Medium::Ip the
        // gateway address is never resolved; our own address of the family stands in for it.
        let v4 = unique.iter().find_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        });
        let v6 = unique.iter().find_map(|a| match a {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        });
        let routes = self.iface.routes_mut();
        routes.update(|r| r.clear());
        if let Some(gw) = v4 {
            let _ = routes.add_default_ipv4_route(gw);
        }
        if let Some(gw) = v6 {
            let _ = routes.add_default_ipv6_route(gw);
        }
        tracing::info!(addresses = ?unique, "netstack: addresses set");
        let removed = self.addresses.iter().any(|a| !unique.contains(a));
        self.addresses = unique;
        if removed {
            let ids: Vec<ConnId> = self.tuples.values().copied().collect();
            for id in ids {
                self.touch(id);
            }
        }
        self.wake_driver = true;
        Ok(())
    }

    /// Current statistics.
    pub(crate) fn stats(&self) -> NetstackStats {
        NetstackStats {
            tcp_sockets: self.tcp_sockets,
            tcp_connections: self.conns.len,
            tcp_listeners: self.listeners.len(),
            tcp_time_wait: self.time_wait.len(),
            udp_sockets: self.udp.len(),
            icmp_sockets: self.icmp.len(),
            packets_in: self.counters.packets_in,
            packets_out: self.counters.packets_out,
            syn_dropped: self.counters.syn_dropped,
            fragments_dropped: self.counters.fragments_dropped,
        }
    }

    /// Takes the waiters whose blocked operation may now complete, in the order they became
    /// ready. Each was returned in a [`WouldBlock`] and is reported once per such return.
    pub(crate) fn take_ready(&mut self) -> std::vec::Drain<'_, Waiter> {
        self.ready.drain(..)
    }

    /// Moves the blocked operations of connection `id` that may now complete (and a blocked
    /// `accept` of its listener) to the ready list.
    fn check_ready(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if conn.interest.recv && conn.recv_ready() {
            conn.interest.recv = false;
            self.ready.push(Waiter::TcpRecv(id));
        }
        if conn.interest.send && conn.send_ready() {
            conn.interest.send = false;
            self.ready.push(Waiter::TcpSend(id));
        }
        if let Owner::Listener(port) = conn.owner
            && let Some(listener) = self.listeners.get_mut(&port)
            && listener.interest
            && conn.accept_ready()
        {
            listener.interest = false;
            self.ready.push(Waiter::Accept(port));
        }
    }

    fn smol_instant(&self, now: Instant) -> SmolInstant {
        let micros = now.saturating_duration_since(self.base).as_micros();
        SmolInstant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    fn local_address_for(&self, remote: IpAddr) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == remote.is_ipv4())
    }

    /// Marks a connection for egress at the next poll and asks for that poll.
    fn touch(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(id) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(id);
            }
            self.wake_driver = true;
        }
    }

    fn touch_udp(&mut self, port: u16) {
        if let Some(entry) = self.udp.get_mut(&port) {
            if !entry.dirty {
                entry.dirty = true;
                self.udp_dirty.push(port);
            }
            self.wake_driver = true;
        }
    }

    // ---------------------------------------------------------------------------------------
    // Driver side
    // ---------------------------------------------------------------------------------------

    /// Feeds inbound packets, runs smoltcp, reclaims finished sockets and collects outbound
    /// packets. Returns the delay until the next poll is needed (`None`: only on new input).
    pub(crate) fn poll(&mut self, now: Instant, queues: &mut PacketQueues) -> Option<Duration> {
        // Time never runs backwards for smoltcp, whatever the driver passes.
        let ts = self.smol_instant(now).max(self.now);
        self.now = ts;
        self.expire_time_wait(ts);

        let out_before = queues.outbound.len();
        let mut device = QueueDevice {
            rx: None,
            rx_done: None,
            outbound: &mut queues.outbound,
            free: &mut queues.free,
            tx_budget: MAX_OUTBOUND_PER_POLL,
            mtu: self.cfg.mtu,
            verify_checksums: self.cfg.verify_checksums,
        };
        let mut processed = 0;
        while processed < MAX_INBOUND_PER_POLL {
            let Some(packet) = queues.inbound.pop_front() else {
                break;
            };
            processed += 1;
            self.counters.packets_in += 1;
            tracing::trace!(len = packet.len(), "netstack: packet in");
            self.ingress(ts, &mut device, packet);
        }

        self.fire_timers(ts);
        let mut pending_egress = self.egress(ts, &mut device);

        let orphan_deadline = self.process_watch(ts);
        self.process_udp_orphans();
        self.process_icmp_orphans();
        // Aborts issued by the watch pass have an RST to send.
        pending_egress |= !self.dirty.is_empty();
        let looped = self.loop_back(queues, out_before);
        let emitted = queues.outbound.len() - out_before;
        self.counters.packets_out += emitted as u64;
        // The poll itself handled whatever the applications asked for.
        self.wake_driver = false;

        if !queues.inbound.is_empty() || pending_egress || looped {
            return Some(Duration::ZERO);
        }
        let mut next = self.next_timer();
        for deadline in [orphan_deadline, self.time_wait.front().map(|(t, _)| *t)]
            .into_iter()
            .flatten()
        {
            next = Some(next.map_or(deadline, |n| n.min(deadline)));
        }
        next.map(|at| {
            if at > ts {
                Duration::from_micros((at - ts).total_micros())
            } else {
                Duration::ZERO
            }
        })
    }

    /// Hands one inbound packet to the socket that owns it (or to nobody).
    fn ingress(&mut self, ts: SmolInstant, device: &mut QueueDevice<'_>, packet: Vec<u8>) {
        match inspect::classify(&packet) {
            Class::Tcp(segment) => match self.route_tcp(&segment) {
                Route::Conn(id) => {
                    let Some(slot) = self.conns.get_mut(id).and_then(|c| c.slot.as_mut()) else {
                        device.free.push(packet);
                        return;
                    };
                    device.rx = Some(packet);
                    self.iface.poll_ingress_single(ts, device, &mut slot.set);
                    device.recycle_rx();
                    if slot.tcp_ref().state() == State::Listen {
                        // The SYN that opened this socket was not accepted by smoltcp.
                        self.discard(id);
                    } else {
                        self.touch(id);
                        self.check_ready(id);
                    }
                }
                Route::Nobody => {
                    device.rx = Some(packet);
                    self.iface.poll_ingress_single(ts, device, &mut self.nobody);
                    device.recycle_rx();
                }
                Route::Drop => device.free.push(packet),
            },
            Class::Udp { dst_port } => {
                device.rx = Some(packet);
                match self.udp.get_mut(&dst_port) {
                    Some(entry) => {
                        self.iface
                            .poll_ingress_single(ts, device, &mut entry.slot.set);
                        if entry.interest.recv && entry.slot.udp_ref().can_recv() {
                            entry.interest.recv = false;
                            self.ready.push(Waiter::UdpRecv(dst_port));
                        }
                    }
                    None => {
                        self.iface.poll_ingress_single(ts, device, &mut self.nobody);
                    }
                }
                device.recycle_rx();
            }
            Class::EchoReply { dst, ident } => {
                device.rx = Some(packet);
                match self.icmp.get_mut(&ident) {
                    // Only replies addressed to us: smoltcp checks the destination as well, but
                    // a reply to somebody else must not reach (or wake) the socket.
                    Some(entry) if self.addresses.contains(&dst) => {
                        self.iface.poll_ingress_single(ts, device, entry.set());
                        if entry.take_recv_ready() {
                            self.ready.push(Waiter::IcmpRecv(ident));
                        }
                    }
                    _ => {
                        self.iface.poll_ingress_single(ts, device, &mut self.nobody);
                    }
                }
                device.recycle_rx();
            }
            Class::Fragment => {
                self.counters.fragments_dropped += 1;
                tracing::trace!("netstack: dropping fragment");
                device.free.push(packet);
            }
            Class::Other => {
                device.rx = Some(packet);
                self.iface.poll_ingress_single(ts, device, &mut self.nobody);
                device.recycle_rx();
            }
        }
    }

    /// Finds the connection of an inbound segment; opens a socket for a SYN to a listened port
    /// (or drops the SYN when the backlog is full); marks connections a FIN or RST is addressed
    /// to for the reclaim pass.
    fn route_tcp(&mut self, segment: &TcpSummary) -> Route {
        if let Some(&id) = self.tuples.get(&TupleKey::new(&(segment.dst, segment.src))) {
            if segment.is_fin_or_rst() {
                if let Some(conn) = self.conns.get_mut(id)
                    && segment.is_rst()
                {
                    conn.rst_seen = true;
                }
                self.watch(id);
            }
            return Route::Conn(id);
        }
        let port = segment.dst.port();
        if segment.is_syn()
            && self.listeners.contains_key(&port)
            && self.addresses.contains(&segment.dst.ip())
        {
            return self.admit_syn(segment);
        }
        Route::Nobody
    }

    fn admit_syn(&mut self, segment: &TcpSummary) -> Route {
        let port = segment.dst.port();
        // Count handshakes and unaccepted connections; drop dead ones on the way.
        let mut in_progress = 0;
        let mut i = 0;
        while let Some(&id) = self.listeners.get(&port).and_then(|l| l.pending.get(i)) {
            let state = self
                .conns
                .get(id)
                .and_then(|c| c.slot.as_ref())
                .map(|s| s.tcp_ref().state());
            match state {
                // Timed out, reset, or back in LISTEN after an RST during the handshake.
                None | Some(State::Closed | State::Listen) => self.drop_pending(port, i),
                Some(_) => {
                    in_progress += 1;
                    i += 1;
                }
            }
        }
        if in_progress >= self.cfg.listen_backlog || self.tcp_sockets >= self.cfg.max_tcp_sockets {
            self.counters.syn_dropped += 1;
            tracing::trace!(%segment.src, port, "netstack: backlog full, dropping SYN");
            return Route::Drop;
        }
        let mut sock = self.new_tcp_socket();
        sock.set_timeout(Some(to_smol(PENDING_TIMEOUT)));
        if sock.listen(port).is_err() {
            // Port is non-zero and the socket fresh: listen cannot fail.
            return Route::Nobody;
        }
        self.tcp_sockets += 1;
        let tuple = (segment.dst, segment.src);
        let id = self
            .conns
            .insert(Conn::new(Slot::new(sock), Owner::Listener(port), tuple));
        self.tuples.insert(TupleKey::new(&tuple), id);
        if let Some(listener) = self.listeners.get_mut(&port) {
            listener.pending.push(id);
        }
        tracing::trace!(port, remote = %segment.src, "netstack: SYN for listener");
        Route::Conn(id)
    }

    /// Removes a record and its socket at once, wherever it is referenced.
    fn discard(&mut self, id: ConnId) {
        let Some(conn) = self.conns.remove(id) else {
            return;
        };
        if conn.slot.is_some() {
            self.tcp_sockets -= 1;
        }
        if let Some(tuple) = conn.tuple {
            self.tuples.remove(&TupleKey::new(&tuple));
        }
        if let Some(port) = conn.connect_port {
            self.connect_ports.remove(&port);
        }
        if let Owner::Listener(port) = conn.owner
            && let Some(listener) = self.listeners.get_mut(&port)
        {
            listener.pending.retain(|p| *p != id);
        }
    }

    /// Removes the `i`-th pending record of the listener on `port` (and the record itself).
    fn drop_pending(&mut self, port: u16, i: usize) {
        let Some(listener) = self.listeners.get_mut(&port) else {
            return;
        };
        if i < listener.pending.len() {
            let id = listener.pending.swap_remove(i);
            self.discard(id);
        }
    }

    /// Marks due smoltcp timers dirty.
    fn fire_timers(&mut self, ts: SmolInstant) {
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > ts {
                break;
            }
            self.timers.pop();
            if let Some(conn) = self.conns.get_mut(id)
                && conn.timer == Some(at)
            {
                conn.timer = None;
                if !conn.dirty {
                    conn.dirty = true;
                    self.dirty.push(id);
                }
            }
        }
    }

    /// The earliest live smoltcp timer.
    fn next_timer(&mut self) -> Option<SmolInstant> {
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if self.conns.get(id).is_some_and(|c| c.timer == Some(at)) {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    /// Runs egress for every dirty socket and schedules their timers. Returns whether work is
    /// left because the outbound budget ran out.
    fn egress(&mut self, ts: SmolInstant, device: &mut QueueDevice<'_>) -> bool {
        let mut i = 0;
        while let Some(&id) = self.dirty.get(i) {
            if device.tx_budget == 0 {
                break;
            }
            i += 1;
            let Some(conn) = self.conns.get_mut(id) else {
                continue;
            };
            conn.dirty = false;
            let Some(slot) = conn.slot.as_mut() else {
                continue;
            };
            while self.iface.poll_egress(ts, device, &mut slot.set) != PollResult::None {}
            if device.tx_budget == 0 {
                // Possibly more to send: stays dirty for the next poll.
                conn.dirty = true;
                i -= 1;
                self.check_ready(id);
                break;
            }
            // A deadline already past means "at the next poll".
            let at = self.iface.poll_at(ts, &slot.set).map(|at| at.max(ts));
            if at != conn.timer {
                conn.timer = at;
                if let Some(at) = at {
                    self.timers.push(Reverse((at, id)));
                }
            }
            // Timers (retransmission limits, timeouts) change states on egress.
            self.check_ready(id);
        }
        self.dirty.drain(..i);
        if self.timers.len() > 2 * self.conns.len + 1024 {
            self.rebuild_timers();
        }

        let mut j = 0;
        while let Some(&port) = self.udp_dirty.get(j) {
            if device.tx_budget == 0 {
                break;
            }
            j += 1;
            let Some(entry) = self.udp.get_mut(&port) else {
                continue;
            };
            entry.dirty = false;
            while self.iface.poll_egress(ts, device, &mut entry.slot.set) != PollResult::None {}
            // Only egress frees room in the send queue.
            if entry.interest.send {
                entry.interest.send = false;
                self.ready.push(Waiter::UdpSend(port));
            }
            if device.tx_budget == 0 && entry.slot.udp_ref().send_queue() > 0 {
                entry.dirty = true;
                j -= 1;
                break;
            }
        }
        self.udp_dirty.drain(..j);
        let icmp_left = self.icmp_egress(ts, device);
        !self.dirty.is_empty() || !self.udp_dirty.is_empty() || icmp_left
    }

    /// Drops stale heap entries (left behind by rescheduled or removed connections).
    fn rebuild_timers(&mut self) {
        let live: Vec<_> = self
            .timers
            .drain()
            .filter(|Reverse((at, id))| self.conns.get(*id).is_some_and(|c| c.timer == Some(*at)))
            .collect();
        self.timers.extend(live);
    }

    fn watch(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(id)
            && !conn.watched
        {
            conn.watched = true;
            self.watch.push(id);
        }
    }

    /// Reclaims watched sockets that are done; resets orphans past their deadline or with
    /// unread data. Returns the earliest orphan deadline still pending.
    fn process_watch(&mut self, now: SmolInstant) -> Option<SmolInstant> {
        let mut next = None;
        let mut i = 0;
        while let Some(&id) = self.watch.get(i) {
            if self.check_watched(id, now, &mut next) {
                i += 1;
            } else {
                if let Some(conn) = self.conns.get_mut(id) {
                    conn.watched = false;
                }
                self.watch.swap_remove(i);
            }
        }
        next
    }

    /// Returns whether `id` must stay watched.
    fn check_watched(
        &mut self,
        id: ConnId,
        now: SmolInstant,
        next: &mut Option<SmolInstant>,
    ) -> bool {
        let orphan_timeout = to_smol(self.cfg.orphan_timeout);
        let Some(conn) = self.conns.get_mut(id) else {
            return false;
        };
        let owner = conn.owner;
        let Some(slot) = conn.slot.as_mut() else {
            if owner != Owner::App {
                self.discard(id);
            }
            return false;
        };
        let sock = slot.tcp();
        match sock.state() {
            State::TimeWait => {
                self.finish(id, true);
                false
            }
            // Closed and nothing left to send (a pending RST clears the endpoint once sent).
            State::Closed if sock.remote_endpoint().is_none() => {
                self.finish(id, false);
                false
            }
            State::Listen if owner != Owner::App => {
                self.finish(id, false);
                false
            }
            _ => {
                if let Owner::Orphan { deadline } = owner {
                    let deadline = deadline.unwrap_or(now + orphan_timeout);
                    conn.owner = Owner::Orphan {
                        deadline: Some(deadline),
                    };
                    if now >= deadline || sock.recv_queue() > 0 {
                        // Past the close deadline, or data arrived nobody will read: like
                        // Linux on close() with unread data, reset (RFC 2525 §2.17).
                        tracing::debug!(?id, "netstack: resetting orphaned connection");
                        sock.abort();
                        self.touch(id);
                    } else {
                        *next = Some(next.map_or(deadline, |n: SmolInstant| n.min(deadline)));
                    }
                }
                true
            }
        }
    }

    /// Drops the socket of a finished connection. If the application still holds the record,
    /// unread data of a clean close is kept for it and the way the connection ended recorded.
    fn finish(&mut self, id: ConnId, time_wait: bool) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let Some(mut slot) = conn.slot.take() else {
            return;
        };
        self.tcp_sockets -= 1;
        let sock = slot.tcp();
        if time_wait
            && let (Some(local), Some(remote)) = (sock.local_endpoint(), sock.remote_endpoint())
        {
            let tuple = (SocketAddr::from(local), SocketAddr::from(remote));
            if self.time_wait_set.insert(tuple) {
                self.time_wait
                    .push_back((self.now + to_smol(TIME_WAIT), tuple));
            }
        }
        if conn.owner == Owner::App {
            let mut leftover = std::mem::take(&mut conn.leftover);
            leftover.clear();
            while let Ok(n) = sock.recv(|data| {
                leftover.extend_from_slice(data);
                (data.len(), data.len())
            }) {
                if n == 0 {
                    break;
                }
            }
            let fin = matches!(sock.recv(|_| (0, ())), Err(RecvError::Finished));
            let end = if fin {
                End::Fin
            } else if conn.rst_seen {
                End::Reset
            } else {
                End::Aborted
            };
            if end != End::Fin {
                leftover = Vec::new();
            }
            conn.end = Some(end);
            conn.leftover = leftover;
            conn.leftover_pos = 0;
            tracing::debug!(?id, ?end, "netstack: connection finished");
        }
        conn.timer = None;
        let tuple = conn.tuple.take();
        let port = conn.connect_port.take();
        let owner = conn.owner;
        if let Some(tuple) = tuple {
            self.tuples.remove(&TupleKey::new(&tuple));
        }
        if let Some(port) = port {
            self.connect_ports.remove(&port);
        }
        if owner == Owner::App {
            // Reads and writes now complete from the record alone.
            self.check_ready(id);
        } else {
            self.discard(id);
        }
    }

    fn expire_time_wait(&mut self, now: SmolInstant) {
        while let Some(&(deadline, tuple)) = self.time_wait.front() {
            if deadline > now {
                break;
            }
            self.time_wait.pop_front();
            self.time_wait_set.remove(&tuple);
        }
    }

    fn process_udp_orphans(&mut self) {
        self.udp
            .retain(|_, entry| !entry.orphan || entry.slot.udp_ref().send_queue() > 0);
    }

    /// Moves packets addressed to one of our own addresses from `outbound[from..]` back to
    /// `inbound`, so the node can reach itself. Returns whether any packet was moved.
    fn loop_back(&self, queues: &mut PacketQueues, from: usize) -> bool {
        let mut looped = false;
        let mut i = from;
        while let Some(packet) = queues.outbound.get(i) {
            let ours = inspect::destination(packet).is_some_and(|d| self.addresses.contains(&d));
            if ours && let Some(packet) = queues.outbound.remove(i) {
                queues.inbound.push_back(packet);
                looped = true;
            } else {
                i += 1;
            }
        }
        looped
    }

    // ---------------------------------------------------------------------------------------
    // TCP sockets
    // ---------------------------------------------------------------------------------------

    fn new_tcp_socket(&self) -> tcp::Socket<'static> {
        let rx = tcp::SocketBuffer::new(vec![0u8; self.cfg.tcp_rx_buffer]);
        let tx = tcp::SocketBuffer::new(vec![0u8; self.cfg.tcp_tx_buffer]);
        let mut sock = tcp::Socket::new(rx, tx);
        sock.set_nagle_enabled(false);
        sock.set_ack_delay(self.cfg.tcp_ack_delay.map(to_smol));
        sock.set_keep_alive(self.cfg.tcp_keep_alive.map(to_smol));
        sock.set_timeout(self.cfg.tcp_timeout.map(to_smol));
        sock
    }

    fn pick_port(&mut self, local: IpAddr, remote: SocketAddr) -> Option<u16> {
        let start = self.rng.gen_range(0..EPHEMERAL_COUNT);
        (0..EPHEMERAL_COUNT)
            .map(|i| EPHEMERAL_FIRST + (start + i) % EPHEMERAL_COUNT)
            .find(|&port| {
                !self.connect_ports.contains(&port)
                    && !self.listeners.contains_key(&port)
                    && !self
                        .time_wait_set
                        .contains(&(SocketAddr::new(local, port), remote))
            })
    }

    /// Starts an active open towards `remote` from an ephemeral port.
    pub(crate) fn connect_start(&mut self, remote: SocketAddr) -> Result<ConnId, ConnectError> {
        let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
        let ip = remote.ip();
        let unusable = match ip {
            IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast(),
            IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
        };
        if unusable || remote.port() == 0 {
            return Err(ConnectError::InvalidAddress(remote));
        }
        let local_ip = self.local_address_for(ip).ok_or(ConnectError::NoAddress)?;
        if self.tcp_sockets >= self.cfg.max_tcp_sockets {
            return Err(ConnectError::TooManySockets);
        }
        let port = self
            .pick_port(local_ip, remote)
            .ok_or(ConnectError::NoFreePort)?;
        let local = SocketAddr::new(local_ip, port);
        let mut sock = self.new_tcp_socket();
        if sock
            .connect(
                self.iface.context(),
                IpEndpoint::from(remote),
                IpEndpoint::from(local),
            )
            .is_err()
        {
            return Err(ConnectError::InvalidAddress(remote));
        }
        self.tcp_sockets += 1;
        let mut conn = Conn::new(Slot::new(sock), Owner::App, (local, remote));
        conn.connect_port = Some(port);
        let id = self.conns.insert(conn);
        self.tuples.insert(TupleKey::new(&(local, remote)), id);
        self.connect_ports.insert(port);
        self.touch(id);
        tracing::debug!(%local, %remote, "netstack: connecting");
        Ok(id)
    }

    /// The outcome of the active open `id`: the connection's (local, remote) once the handshake
    /// finished; blocks (as [`Waiter::TcpSend`]) while it is in progress.
    pub(crate) fn connect_finish(
        &mut self,
        id: ConnId,
    ) -> Result<Result<Tuple, ConnectError>, WouldBlock> {
        let Some(conn) = self.conns.get_mut(id) else {
            return Ok(Err(ConnectError::TimedOut));
        };
        let failed = if conn.rst_seen || conn.end == Some(End::Reset) {
            ConnectError::Refused
        } else {
            ConnectError::TimedOut
        };
        let tuple = conn.tuple;
        let (Some(slot), Some(tuple)) = (conn.slot.as_mut(), tuple) else {
            return Ok(Err(failed));
        };
        match slot.tcp().state() {
            State::SynSent | State::SynReceived => {
                conn.interest.send = true;
                Err(WouldBlock(Waiter::TcpSend(id)))
            }
            State::Closed | State::Listen | State::TimeWait => Ok(Err(failed)),
            _ => Ok(Ok(tuple)),
        }
    }

    /// The application lets go of `id` (stream or connect attempt dropped, or `abort`).
    /// Graceful: FIN after queued data, unless unread data is pending (then RST).
    pub(crate) fn release(&mut self, id: ConnId, graceful: bool) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let Some(slot) = conn.slot.as_mut() else {
            self.discard(id);
            return;
        };
        let sock = slot.tcp();
        if graceful && sock.recv_queue() == 0 {
            sock.close();
            conn.shut_wr = true;
        } else {
            sock.abort();
        }
        conn.owner = Owner::Orphan { deadline: None };
        // Nobody is left to wait for it.
        conn.interest = Interest::default();
        self.watch(id);
        self.touch(id);
    }

    /// Reads up to `max` bytes from `id`, handing them to `put` in order (in one or more
    /// non-empty pieces): the number of bytes read, 0 at the end of the stream (or if `max` is
    /// 0). Blocks (as [`Waiter::TcpRecv`]) while there is nothing to read.
    pub(crate) fn tcp_recv(
        &mut self,
        id: ConnId,
        max: usize,
        mut put: impl FnMut(&[u8]),
    ) -> Result<io::Result<usize>, WouldBlock> {
        let Some(conn) = self.conns.get_mut(id) else {
            return Ok(Err(io::ErrorKind::NotConnected.into()));
        };
        if max == 0 {
            return Ok(Ok(0));
        }
        let Some(slot) = conn.slot.as_mut() else {
            let rest = &conn.leftover[conn.leftover_pos.min(conn.leftover.len())..];
            if !rest.is_empty() {
                let n = rest.len().min(max);
                put(&rest[..n]);
                conn.leftover_pos += n;
                if conn.leftover_pos >= conn.leftover.len() {
                    conn.leftover = Vec::new();
                    conn.leftover_pos = 0;
                }
                return Ok(Ok(n));
            }
            return Ok(match conn.end {
                Some(End::Fin) | None => Ok(0),
                _ => Err(conn.broken(false, self.addresses.contains(&conn.local))),
            });
        };
        let sock = slot.tcp();
        let capacity = sock.recv_capacity();
        let window_before = capacity - sock.recv_queue();
        let mut read = 0;
        let mut outcome = None;
        while read < max {
            match sock.recv(|data| {
                let n = data.len().min(max - read);
                if n > 0 {
                    put(&data[..n]);
                }
                (n, n)
            }) {
                Ok(0) => break,
                Ok(n) => read += n,
                Err(RecvError::Finished) => {
                    outcome = Some(Ok(()));
                    break;
                }
                Err(RecvError::InvalidState) => {
                    outcome = Some(Err(()));
                    break;
                }
            }
        }
        if read > 0 {
            // smoltcp announces a reopened window only when it at least doubled; if the window
            // was below half the buffer, this read may be what the sender is waiting for.
            if window_before < capacity / 2 {
                self.touch(id);
            }
            return Ok(Ok(read));
        }
        match outcome {
            Some(Ok(())) => Ok(Ok(0)),
            Some(Err(())) if !handshaking(sock.state()) => {
                Ok(Err(conn.broken(false, self.addresses.contains(&conn.local))))
            }
            _ => {
                conn.interest.recv = true;
                Err(WouldBlock(Waiter::TcpRecv(id)))
            }
        }
    }

    /// Queues `data` for sending on `id`: the number of bytes queued. Blocks (as
    /// [`Waiter::TcpSend`]) while the send buffer is full or the handshake is in progress.
    pub(crate) fn tcp_send(
        &mut self,
        id: ConnId,
        data: &[u8],
    ) -> Result<io::Result<usize>, WouldBlock> {
        let Some(conn) = self.conns.get_mut(id) else {
            return Ok(Err(io::ErrorKind::NotConnected.into()));
        };
        let address_kept = self.addresses.contains(&conn.local);
        let Some(slot) = conn.slot.as_mut() else {
            return Ok(Err(conn.broken(true, address_kept)));
        };
        let sock = slot.tcp();
        if !sock.may_send() {
            if handshaking(sock.state()) {
                conn.interest.send = true;
                return Err(WouldBlock(Waiter::TcpSend(id)));
            }
            return Ok(Err(conn.broken(true, address_kept)));
        }
        if data.is_empty() {
            return Ok(Ok(0));
        }
        match sock.send_slice(data) {
            Ok(0) => {
                conn.interest.send = true;
                Err(WouldBlock(Waiter::TcpSend(id)))
            }
            Ok(n) => {
                self.touch(id);
                Ok(Ok(n))
            }
            Err(_) => Ok(Err(conn.broken(true, address_kept))),
        }
    }

    /// Closes the sending half of `id` (FIN after the queued data).
    pub(crate) fn tcp_shutdown(&mut self, id: ConnId) -> io::Result<()> {
        let Some(conn) = self.conns.get_mut(id) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let Some(slot) = conn.slot.as_mut() else {
            return match conn.end {
                Some(End::Reset) => Err(io::ErrorKind::ConnectionReset.into()),
                _ => Ok(()),
            };
        };
        let sock = slot.tcp();
        if sock.state() == State::Closed && conn.rst_seen {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        sock.close();
        conn.shut_wr = true;
        self.watch(id);
        self.touch(id);
        // A write blocked on a full buffer now fails.
        self.check_ready(id);
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Listeners
    // ---------------------------------------------------------------------------------------

    /// Starts accepting connections to `port` on all our addresses.
    pub(crate) fn listen(&mut self, port: u16) -> Result<(), ListenError> {
        if port == 0 {
            return Err(ListenError::PortZero);
        }
        if self.listeners.contains_key(&port) {
            return Err(ListenError::InUse(port));
        }
        self.listeners.insert(
            port,
            Listener {
                pending: Vec::new(),
                interest: false,
            },
        );
        tracing::info!(port, "netstack: listening");
        Ok(())
    }

    /// Stops listening on `port`; connections not yet accepted are reset.
    pub(crate) fn unlisten(&mut self, port: u16) {
        let Some(listener) = self.listeners.remove(&port) else {
            return;
        };
        for id in listener.pending {
            let Some(conn) = self.conns.get_mut(id) else {
                continue;
            };
            let Some(slot) = conn.slot.as_mut() else {
                self.discard(id);
                continue;
            };
            slot.tcp().abort();
            conn.owner = Owner::Orphan {
                deadline: Some(self.now),
            };
            self.watch(id);
            self.touch(id);
        }
        self.wake_driver = true;
        tracing::info!(port, "netstack: stopped listening");
    }

    /// Takes an established connection from the listener on `port`. Blocks (as
    /// [`Waiter::Accept`]) while none is.
    pub(crate) fn accept(&mut self, port: u16) -> Result<io::Result<(ConnId, Tuple)>, WouldBlock> {
        let mut i = 0;
        loop {
            let Some(listener) = self.listeners.get_mut(&port) else {
                return Ok(Err(io::ErrorKind::NotConnected.into()));
            };
            let Some(&id) = listener.pending.get(i) else {
                listener.interest = true;
                return Err(WouldBlock(Waiter::Accept(port)));
            };
            let Some(conn) = self.conns.get_mut(id) else {
                listener.pending.swap_remove(i);
                continue;
            };
            let (Some(slot), Some(tuple)) = (conn.slot.as_mut(), conn.tuple) else {
                self.drop_pending(port, i);
                continue;
            };
            let sock = slot.tcp();
            match sock.state() {
                State::SynReceived => i += 1,
                State::Closed | State::Listen | State::TimeWait => self.drop_pending(port, i),
                _ => {
                    sock.set_timeout(self.cfg.tcp_timeout.map(to_smol));
                    conn.owner = Owner::App;
                    listener.pending.swap_remove(i);
                    // The timeout changed: reschedule its timer.
                    self.touch(id);
                    tracing::debug!(local = %tuple.0, remote = %tuple.1, "netstack: accepted");
                    return Ok(Ok((id, tuple)));
                }
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // UDP sockets
    // ---------------------------------------------------------------------------------------

    /// Binds a UDP socket to `port` (an ephemeral port if `None` or 0) on all our addresses.
    pub(crate) fn udp_bind(&mut self, port: Option<u16>) -> Result<u16, UdpBindError> {
        if self.udp.len() >= self.cfg.max_udp_sockets {
            return Err(UdpBindError::TooManySockets);
        }
        let port = match port {
            Some(p) if p != 0 => {
                if self.udp.contains_key(&p) {
                    return Err(UdpBindError::InUse(p));
                }
                p
            }
            _ => {
                let start = self.rng.gen_range(0..EPHEMERAL_COUNT);
                (0..EPHEMERAL_COUNT)
                    .map(|i| EPHEMERAL_FIRST + (start + i) % EPHEMERAL_COUNT)
                    .find(|p| !self.udp.contains_key(p))
                    .ok_or(UdpBindError::NoFreePort)?
            }
        };
        let buffer = || {
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; self.cfg.udp_buffer_packets],
                vec![0u8; self.cfg.udp_buffer_bytes],
            )
        };
        let mut sock = udp::Socket::new(buffer(), buffer());
        if sock.bind(port).is_err() {
            return Err(UdpBindError::InUse(port));
        }
        self.udp.insert(
            port,
            UdpEntry {
                slot: Slot::new(sock),
                orphan: false,
                dirty: false,
                interest: Interest::default(),
            },
        );
        tracing::debug!(port, "netstack: UDP socket bound");
        Ok(port)
    }

    /// Queues one datagram from `port` to `target`: its length. Blocks (as
    /// [`Waiter::UdpSend`]) while the send queue is full.
    pub(crate) fn udp_send(
        &mut self,
        port: u16,
        data: &[u8],
        target: SocketAddr,
    ) -> Result<io::Result<usize>, WouldBlock> {
        let target = SocketAddr::new(target.ip().to_canonical(), target.port());
        if target.port() == 0 || target.ip().is_unspecified() {
            return Ok(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unspecified UDP destination",
            )));
        }
        let Some(local) = self.local_address_for(target.ip()) else {
            return Ok(Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "no local address of the destination's family",
            )));
        };
        let ip_header = if target.is_ipv4() { 20 } else { 40 };
        let max = self.cfg.mtu - ip_header - 8;
        if data.len() > max {
            return Ok(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "datagram of {} bytes exceeds the {max}-byte limit of the tunnel MTU",
                    data.len()
                ),
            )));
        }
        let Some(entry) = self.udp.get_mut(&port) else {
            return Ok(Err(io::ErrorKind::NotConnected.into()));
        };
        let sock = entry.slot.udp();
        let mut meta = udp::UdpMetadata::from(IpEndpoint::from(target));
        meta.local_address = Some(IpAddress::from(local));
        match sock.send_slice(data, meta) {
            Ok(()) => {
                self.touch_udp(port);
                Ok(Ok(data.len()))
            }
            Err(udp::SendError::BufferFull) => {
                entry.interest.send = true;
                Err(WouldBlock(Waiter::UdpSend(port)))
            }
            Err(udp::SendError::Unaddressable) => Ok(Err(io::ErrorKind::InvalidInput.into())),
        }
    }

    /// Takes one received datagram into `buf` (truncated to its length): the length and the
    /// sender. Blocks (as [`Waiter::UdpRecv`]) while none is queued.
    pub(crate) fn udp_recv(
        &mut self,
        port: u16,
        buf: &mut [u8],
    ) -> Result<io::Result<(usize, SocketAddr)>, WouldBlock> {
        let Some(entry) = self.udp.get_mut(&port) else {
            return Ok(Err(io::ErrorKind::NotConnected.into()));
        };
        let sock = entry.slot.udp();
        match sock.recv() {
            Ok((data, meta)) => {
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                Ok(Ok((n, SocketAddr::from(meta.endpoint))))
            }
            Err(_) => {
                entry.interest.recv = true;
                Err(WouldBlock(Waiter::UdpRecv(port)))
            }
        }
    }

    /// Closes the UDP socket on `port` once its queued datagrams are sent.
    pub(crate) fn udp_close(&mut self, port: u16) {
        let Some(entry) = self.udp.get_mut(&port) else {
            return;
        };
        if entry.slot.udp_ref().send_queue() == 0 {
            self.udp.remove(&port);
        } else {
            entry.orphan = true;
            entry.interest = Interest::default();
            self.touch_udp(port);
        }
    }
}

/// Whether a TCP socket is in its opening handshake (reads and writes wait for it to finish).
fn handshaking(state: State) -> bool {
    matches!(state, State::SynSent | State::SynReceived)
}

fn to_smol(d: Duration) -> SmolDuration {
    SmolDuration::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
