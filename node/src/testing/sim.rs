//! An in-memory network for whole nodes in one process, on tokio's clock.
//!
//! Hosts are IP addresses. Between any two hosts there is a link whose [`LinkConditions`]
//! (loss, delay, blackhole) apply to both directions. Two kinds of traffic cross it:
//!
//! - datagrams between [`SimSocket`]s (a node's WireGuard socket: [`crate::DatagramIo`]): lost
//!   with the link's probability, delivered after its delay, dropped while it is blackholed or
//!   when the receiver's queue is full (as a UDP receive buffer would);
//! - byte streams between [`SimListener`]s and [`SimNetwork::connect`] (the control plane:
//!   [`SimConnector`] for the controller, [`SimListener`] for the coordinator). A connection
//!   attempt over a blackholed link never completes (the SYN is dropped: the caller's timeout
//!   ends it); an established connection stops delivering bytes while its link is
//!   blackholed (writes are buffered until the buffer is full) and resumes when it lifts. Loss
//!   and delay do not apply to streams (TCP hides loss; delay is not simulated).
//!
//! With a paused runtime (`#[tokio::test(start_paused = true)]`), minutes of simulated time
//! pass in milliseconds of wall time: tokio's clock jumps whenever every task waits.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tailnode_control::controller::{Connector, DialError};
use tailnode_control::coordinator::ConnectionListener;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::{Notify, mpsc};

use crate::node::DatagramIo;

/// Datagrams a socket queues before it drops new ones.
pub const SOCKET_QUEUE: usize = 4096;
/// Bytes a stream buffers in each direction.
pub const STREAM_BUFFER: usize = 256 * 1024;
/// Pending connections a listener queues before it refuses new ones.
const ACCEPT_QUEUE: usize = 128;
/// The first port handed out for port 0.
const FIRST_EPHEMERAL_PORT: u16 = 49_152;

/// How a link treats what crosses it (both directions).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkConditions {
    /// Probability in `[0, 1]` that a datagram is lost.
    pub loss: f64,
    /// One-way delay of every datagram.
    pub delay: Duration,
    /// Nothing crosses: datagrams are dropped, stream bytes held, connection attempts hang.
    pub blackholed: bool,
}

/// Counts of what the network did with datagrams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimCounters {
    /// Datagrams put in a receiver's queue.
    pub delivered: u64,
    /// Datagrams dropped by a blackholed link.
    pub blackholed: u64,
    /// Datagrams lost by the link's loss probability.
    pub lost: u64,
    /// Datagrams to an address nobody is bound to, or to a full queue.
    pub undeliverable: u64,
}

/// The network; cheap to clone (all clones are the same network).
#[derive(Clone)]
pub struct SimNetwork {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
}

struct State {
    links: HashMap<(IpAddr, IpAddr), LinkConditions>,
    sockets: HashMap<SocketAddr, Arc<SocketQueue>>,
    listeners: HashMap<SocketAddr, mpsc::Sender<(DuplexStream, SocketAddr)>>,
    next_port: HashMap<IpAddr, u16>,
    /// Stream readers waiting for a link to lift.
    held_readers: Vec<Waker>,
    rng: StdRng,
    counters: SimCounters,
}

impl std::fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNetwork").finish_non_exhaustive()
    }
}

impl Default for SimNetwork {
    fn default() -> Self {
        Self::new(0)
    }
}

/// The key of the link between `a` and `b`, the same for both directions.
fn link_key(a: IpAddr, b: IpAddr) -> (IpAddr, IpAddr) {
    if a <= b { (a, b) } else { (b, a) }
}

impl SimNetwork {
    /// A network where every link is perfect; `seed` drives the loss decisions.
    pub fn new(seed: u64) -> Self {
        SimNetwork {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    links: HashMap::new(),
                    sockets: HashMap::new(),
                    listeners: HashMap::new(),
                    next_port: HashMap::new(),
                    held_readers: Vec::new(),
                    rng: StdRng::seed_from_u64(seed),
                    counters: SimCounters::default(),
                }),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the conditions of the link between hosts `a` and `b`.
    pub fn set_link(&self, a: IpAddr, b: IpAddr, conditions: LinkConditions) {
        let waiters = {
            let mut state = self.lock();
            state.links.insert(link_key(a, b), conditions);
            std::mem::take(&mut state.held_readers)
        };
        waiters.into_iter().for_each(Waker::wake);
    }

    /// The conditions of the link between `a` and `b`.
    pub fn link(&self, a: IpAddr, b: IpAddr) -> LinkConditions {
        self.lock()
            .links
            .get(&link_key(a, b))
            .copied()
            .unwrap_or_default()
    }

    /// Blackholes (or restores) the link between `a` and `b`, keeping its loss and delay.
    pub fn set_blackholed(&self, a: IpAddr, b: IpAddr, blackholed: bool) {
        let conditions = LinkConditions {
            blackholed,
            ..self.link(a, b)
        };
        self.set_link(a, b, conditions);
    }

    /// What the network did with datagrams so far.
    pub fn counters(&self) -> SimCounters {
        self.lock().counters
    }

    fn bind_addr(state: &mut State, addr: SocketAddr) -> io::Result<SocketAddr> {
        if addr.port() != 0 {
            return Ok(addr);
        }
        let next = state
            .next_port
            .entry(addr.ip())
            .or_insert(FIRST_EPHEMERAL_PORT);
        let port = *next;
        *next = next
            .checked_add(1)
            .ok_or_else(|| io::Error::new(io::ErrorKind::AddrInUse, "no free port"))?;
        Ok(SocketAddr::new(addr.ip(), port))
    }

    /// Binds a datagram socket on `addr` (port 0: the next free port of that host).
    ///
    /// # Errors
    /// `AddrInUse` when a socket is bound there already.
    pub fn bind(&self, addr: SocketAddr) -> io::Result<SimSocket> {
        let mut state = self.lock();
        let local = Self::bind_addr(&mut state, addr)?;
        if state.sockets.contains_key(&local) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{local} is bound already"),
            ));
        }
        let queue = Arc::new(SocketQueue::default());
        state.sockets.insert(local, Arc::clone(&queue));
        Ok(SimSocket {
            net: self.clone(),
            local,
            queue,
        })
    }

    /// Listens for stream connections on `addr`.
    ///
    /// # Errors
    /// `AddrInUse` when something listens there already.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<SimListener> {
        let mut state = self.lock();
        let local = Self::bind_addr(&mut state, addr)?;
        if state.listeners.contains_key(&local) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{local} is listened on already"),
            ));
        }
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        state.listeners.insert(local, tx);
        Ok(SimListener {
            net: self.clone(),
            local,
            incoming: rx,
        })
    }

    /// Opens a stream from host `from` to `to`. Over a blackholed link this waits until the link
    /// lifts (bound it with a timeout, as a TCP connect is).
    ///
    /// # Errors
    /// `ConnectionRefused` when nothing listens on `to`.
    pub async fn connect(&self, from: IpAddr, to: SocketAddr) -> io::Result<SimStream> {
        loop {
            let lifted = {
                let notify = Arc::new(Notify::new());
                let mut state = self.lock();
                if !state
                    .links
                    .get(&link_key(from, to.ip()))
                    .is_some_and(|l| l.blackholed)
                {
                    break;
                }
                // Woken through the same list as held stream readers.
                let waker_notify = Arc::clone(&notify);
                state
                    .held_readers
                    .push(Waker::from(Arc::new(NotifyWaker(waker_notify))));
                notify
            };
            lifted.notified().await;
        }
        let (local, listener) = {
            let mut state = self.lock();
            let local = Self::bind_addr(&mut state, SocketAddr::new(from, 0))?;
            let listener = state.listeners.get(&to).cloned();
            (local, listener)
        };
        let Some(listener) = listener else {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("nothing listens on {to}"),
            ));
        };
        let (client, server) = tokio::io::duplex(STREAM_BUFFER);
        listener.try_send((server, local)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{to} does not accept connections"),
            )
        })?;
        Ok(SimStream {
            net: self.clone(),
            link: (from, to.ip()),
            inner: client,
        })
    }

    /// Sends a datagram from `from` to `to` under the link's conditions.
    fn send_datagram(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) {
        let (conditions, receiver) = {
            let mut state = self.lock();
            let conditions = state
                .links
                .get(&link_key(from.ip(), to.ip()))
                .copied()
                .unwrap_or_default();
            if conditions.blackholed {
                state.counters.blackholed += 1;
                return;
            }
            if conditions.loss > 0.0 && state.rng.gen_bool(conditions.loss.clamp(0.0, 1.0)) {
                state.counters.lost += 1;
                return;
            }
            (conditions, state.sockets.get(&to).cloned())
        };
        let Some(receiver) = receiver else {
            self.lock().counters.undeliverable += 1;
            return;
        };
        let datagram = (payload.to_vec(), from);
        if conditions.delay.is_zero() {
            self.deliver(&receiver, datagram);
        } else {
            let net = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(conditions.delay).await;
                net.deliver(&receiver, datagram);
            });
        }
    }

    fn deliver(&self, receiver: &SocketQueue, datagram: (Vec<u8>, SocketAddr)) {
        let delivered = {
            let mut queue = receiver.lock();
            if queue.len() < SOCKET_QUEUE {
                queue.push_back(datagram);
                true
            } else {
                false
            }
        };
        let mut state = self.lock();
        if delivered {
            state.counters.delivered += 1;
            drop(state);
            receiver.ready.notify_one();
        } else {
            state.counters.undeliverable += 1;
        }
    }

    fn is_blackholed(&self, link: (IpAddr, IpAddr), cx: &mut Context<'_>) -> bool {
        let mut state = self.lock();
        let held = state
            .links
            .get(&link_key(link.0, link.1))
            .is_some_and(|l| l.blackholed);
        if held && !state.held_readers.iter().any(|w| w.will_wake(cx.waker())) {
            state.held_readers.push(cx.waker().clone());
        }
        held
    }
}

/// Wakes a [`Notify`] (a connect waiting for its link to lift).
struct NotifyWaker(Arc<Notify>);

impl std::task::Wake for NotifyWaker {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
}

#[derive(Default)]
struct SocketQueue {
    datagrams: Mutex<VecDeque<(Vec<u8>, SocketAddr)>>,
    ready: Notify,
}

impl SocketQueue {
    fn lock(&self) -> MutexGuard<'_, VecDeque<(Vec<u8>, SocketAddr)>> {
        self.datagrams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A datagram socket on the simulated network; unbound when dropped.
pub struct SimSocket {
    net: SimNetwork,
    local: SocketAddr,
    queue: Arc<SocketQueue>,
}

impl std::fmt::Debug for SimSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimSocket")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Drop for SimSocket {
    fn drop(&mut self) {
        self.net.lock().sockets.remove(&self.local);
    }
}

impl SimSocket {
    /// Receives one datagram, waiting for it.
    ///
    /// # Errors
    /// None today; the signature matches a UDP socket's.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            self.readable().await?;
            match self.try_recv_from(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
        }
    }
}

impl DatagramIo for SimSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    async fn readable(&self) -> io::Result<()> {
        loop {
            let notified = self.queue.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.queue.lock().is_empty() {
                return Ok(());
            }
            notified.await;
        }
    }

    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let Some((payload, from)) = self.queue.lock().pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        // As a UDP socket does: the tail of an oversize datagram is cut.
        let len = payload.len().min(buf.len());
        buf[..len].copy_from_slice(&payload[..len]);
        Ok((len, from))
    }

    fn try_send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize> {
        self.net.send_datagram(self.local, dst, buf);
        Ok(buf.len())
    }

    async fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize> {
        self.try_send_to(buf, dst)
    }
}

/// A listener for stream connections; stops listening when dropped.
pub struct SimListener {
    net: SimNetwork,
    local: SocketAddr,
    incoming: mpsc::Receiver<(DuplexStream, SocketAddr)>,
}

impl std::fmt::Debug for SimListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimListener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Drop for SimListener {
    fn drop(&mut self) {
        self.net.lock().listeners.remove(&self.local);
    }
}

impl ConnectionListener for SimListener {
    type Stream = SimStream;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    async fn accept(&mut self) -> io::Result<(SimStream, SocketAddr)> {
        let (inner, remote) =
            self.incoming.recv().await.ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotConnected, "the network is gone")
            })?;
        Ok((
            SimStream {
                net: self.net.clone(),
                link: (self.local.ip(), remote.ip()),
                inner,
            },
            remote,
        ))
    }
}

/// One end of a stream connection. Reads hold while the link is blackholed.
pub struct SimStream {
    net: SimNetwork,
    link: (IpAddr, IpAddr),
    inner: DuplexStream,
}

impl std::fmt::Debug for SimStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimStream")
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for SimStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.net.is_blackholed(this.link, cx) {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Opens the controller's streams to the coordinator over the simulated network, from `host`.
/// The coordinator URL's host must be an IP address of the network.
#[derive(Debug, Clone)]
pub struct SimConnector {
    net: SimNetwork,
    host: IpAddr,
}

impl SimConnector {
    /// Connections from `host` on `net`.
    pub fn new(net: &SimNetwork, host: IpAddr) -> Self {
        SimConnector {
            net: net.clone(),
            host,
        }
    }
}

impl Connector for SimConnector {
    type Stream = SimStream;

    async fn connect(&self, host: &str, port: u16) -> Result<SimStream, DialError> {
        let ip: IpAddr = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| DialError::Dns(format!("{host}: not an address of the network")))?;
        let to = SocketAddr::new(ip, port);
        self.net
            .connect(self.host, to)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::ConnectionRefused => DialError::Refused(to.to_string()),
                _ => DialError::Io(format!("{to}: {e}")),
            })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 0, last])
    }

    #[tokio::test(start_paused = true)]
    async fn datagrams_obey_delay_loss_and_blackholes() {
        let net = SimNetwork::new(7);
        let a = net.bind(SocketAddr::new(ip(1), 1000)).unwrap();
        let b = net.bind(SocketAddr::new(ip(2), 0)).unwrap();
        let b_addr = b.local_addr().unwrap();
        assert_eq!(b_addr.port(), FIRST_EPHEMERAL_PORT);
        let mut buf = [0u8; 16];

        a.try_send_to(b"hi", b_addr).unwrap();
        let (n, from) = b.recv_from(&mut buf).await.unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"hi"[..], SocketAddr::new(ip(1), 1000))
        );

        let delay = Duration::from_millis(250);
        net.set_link(
            ip(1),
            ip(2),
            LinkConditions {
                delay,
                ..LinkConditions::default()
            },
        );
        let sent = tokio::time::Instant::now();
        a.try_send_to(b"late", b_addr).unwrap();
        b.recv_from(&mut buf).await.unwrap();
        assert_eq!(sent.elapsed(), delay);

        net.set_blackholed(ip(2), ip(1), true);
        a.try_send_to(b"gone", b_addr).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(b.try_recv_from(&mut buf).is_err());
        assert_eq!(net.counters().blackholed, 1);

        net.set_link(
            ip(1),
            ip(2),
            LinkConditions {
                loss: 0.5,
                ..LinkConditions::default()
            },
        );
        for _ in 0..1000 {
            a.try_send_to(b"x", b_addr).unwrap();
        }
        let lost = net.counters().lost;
        assert!((350..650).contains(&lost), "lost {lost} of 1000 at 50%");
    }

    #[tokio::test(start_paused = true)]
    async fn streams_hold_while_blackholed_and_connects_hang() {
        let net = SimNetwork::new(1);
        let server_addr = SocketAddr::new(ip(1), 443);
        let mut listener = net.listen(server_addr).unwrap();
        let refused = net.connect(ip(2), SocketAddr::new(ip(1), 80)).await;
        assert_eq!(
            refused.unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );

        let mut client = net.connect(ip(2), server_addr).await.unwrap();
        let (mut server, remote) = listener.accept().await.unwrap();
        assert_eq!(remote.ip(), ip(2));

        net.set_blackholed(ip(1), ip(2), true);
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        let held = tokio::time::timeout(Duration::from_secs(60), server.read_exact(&mut buf)).await;
        assert!(held.is_err(), "no bytes cross a blackholed link");
        let attempt =
            tokio::time::timeout(Duration::from_secs(60), net.connect(ip(3), server_addr));
        // ip(3) has its own link: only the 1-2 link is blackholed.
        assert!(attempt.await.is_ok());
        let hung = tokio::time::timeout(Duration::from_secs(60), net.connect(ip(2), server_addr));
        assert!(
            hung.await.is_err(),
            "a connect over a blackhole never completes"
        );

        net.set_blackholed(ip(1), ip(2), false);
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
}
