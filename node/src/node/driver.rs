//! The packet task: the one owner of the WireGuard engine, the datagram socket
//! ([`DatagramIo`]: the host's UDP socket or a simulated one) and the netstack's
//! packet queues.
//!
//! Per wake-up it drains every ready datagram (bounded by [`MAX_BATCH`]),
//! decrypts straight into buffers that the netstack consumes without a copy,
//! polls the netstack once, and encrypts whatever the stack produced straight
//! into the UDP send buffer. Commands from the rest of the node (peer changes,
//! status queries) arrive on a channel and are applied between batches, so a
//! peer change never races a packet.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tailnode_netstack::{Netstack, PacketQueues};
use tailnode_wg::{DatagramOutcome, Engine, Event, PacketOutcome};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace};

use super::datagram::DatagramIo;
use super::{Command, DataPlaneCounters};

/// Datagrams handled per wake-up before the stack is polled and the loop
/// yields, so a flood on the socket cannot starve commands or timers.
pub(crate) const MAX_BATCH: usize = 64;

/// Size of the receive and send buffers: the largest UDP payload, so no
/// datagram is truncated, plus boringtun's 32 bytes of overhead.
const BUF_LEN: usize = 65_536 + 32;

/// Size of pooled inbound packet buffers: a full-MTU datagram fits (the
/// engine needs `max(datagram_len, 148)` bytes); larger datagrams, which only
/// a peer with a larger MTU sends, get a buffer of their own.
pub(crate) fn pooled_len(mtu: usize) -> usize {
    mtu.max(1500) + 64
}

/// Upper bound on sleeping when neither the engine nor the stack asks for a
/// wake-up: timers are re-checked at least this often.
const IDLE_TICK: Duration = Duration::from_secs(1);

pub(crate) struct Driver<D> {
    pub engine: Engine,
    pub netstack: Netstack,
    pub udp: D,
    pub commands: mpsc::Receiver<Command>,
    pub cancel: CancellationToken,
    pub counters: DataPlaneCounters,
    /// See [`pooled_len`].
    pub pooled_len: usize,
}

impl<D: DatagramIo> Driver<D> {
    /// Runs until the node's cancellation token fires.
    pub async fn run(mut self) {
        let mut queues = PacketQueues::new();
        let mut recv_buf = vec![0u8; BUF_LEN];
        let mut send_buf = vec![0u8; BUF_LEN];
        let local = self
            .udp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut stack_delay: Option<Duration> = Some(Duration::ZERO);
        loop {
            let now = Instant::now();
            let deadline = self.next_deadline(now, stack_delay);
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => break,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.handle_command(cmd, now.into_std()),
                    None => break,
                },
                ready = self.udp.readable() => {
                    if let Err(e) = ready {
                        debug!(error = %e, "UDP socket not readable");
                    }
                }
                () = self.netstack.wait_for_work() => {}
                () = sleep_until(deadline) => {}
            }
            let now = Instant::now().into_std();
            if self.engine.poll_timeout().is_some_and(|(at, _)| at <= now) {
                self.engine.handle_timeout(now);
            }
            self.receive_batch(&mut queues, &mut recv_buf, local, now)
                .await;
            self.flush_engine(&mut send_buf, local).await;
            stack_delay = self.netstack.poll(now, &mut queues);
            self.send_outbound(&mut queues, &mut send_buf, local, now)
                .await;
            self.flush_engine(&mut send_buf, local).await;
            self.drain_events();
        }
        debug!("packet task stopped");
    }

    fn next_deadline(&self, now: Instant, stack_delay: Option<Duration>) -> Instant {
        let mut deadline = now + IDLE_TICK;
        if let Some(delay) = stack_delay {
            deadline = deadline.min(now + delay);
        }
        if let Some((at, _reason)) = self.engine.poll_timeout() {
            deadline = deadline.min(Instant::from_std(at));
        }
        deadline
    }

    fn handle_command(&mut self, cmd: Command, now: std::time::Instant) {
        let addresses = self.netstack.addresses();
        cmd.apply(&mut self.engine, &addresses, now);
    }

    /// Drains up to [`MAX_BATCH`] datagrams into the netstack's inbound queue.
    async fn receive_batch(
        &mut self,
        queues: &mut PacketQueues,
        recv_buf: &mut [u8],
        local: SocketAddr,
        now: std::time::Instant,
    ) {
        // Counted once per batch: no shared-counter traffic per datagram.
        let (mut datagrams, mut bytes) = (0u64, 0u64);
        for _ in 0..MAX_BATCH {
            let (len, from) = match self.udp.try_recv_from(recv_buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ICMP errors from earlier sends surface here (ECONNREFUSED and
                    // friends); they concern one datagram, not the socket.
                    trace!(error = %e, "UDP receive error");
                    continue;
                }
            };
            datagrams += 1;
            bytes += len as u64;
            let from = tailnode_wg::udp::canonical_addr(from);
            let mut out = queues.free.pop().unwrap_or_default();
            // Only the tail beyond the previous packet is zeroed: a few
            // hundred bytes, not the whole buffer.
            out.resize(self.pooled_len.max(len), 0);
            match self
                .engine
                .handle_datagram(from, &recv_buf[..len], &mut out, now)
            {
                DatagramOutcome::Deliver { len, .. } => {
                    out.truncate(len);
                    queues.inbound.push_back(out);
                }
                DatagramOutcome::Reply { dst, len } => {
                    send(&self.udp, &out[..len], dst, local, &self.counters).await;
                    queues.free.push(out);
                }
                DatagramOutcome::Done => queues.free.push(out),
                DatagramOutcome::Dropped(reason) => {
                    trace!(%from, ?reason, "datagram dropped");
                    queues.free.push(out);
                }
            }
        }
        if datagrams > 0 {
            self.counters.rx_datagrams.add(datagrams);
            self.counters.rx_bytes.add(bytes);
        }
    }

    /// Encrypts and sends every packet the netstack produced.
    async fn send_outbound(
        &mut self,
        queues: &mut PacketQueues,
        send_buf: &mut [u8],
        local: SocketAddr,
        now: std::time::Instant,
    ) {
        while let Some(packet) = queues.outbound.pop_front() {
            match self.engine.handle_ip_packet(&packet, send_buf, now) {
                PacketOutcome::Transmit { dst, len } => {
                    send(&self.udp, &send_buf[..len], dst, local, &self.counters).await;
                }
                PacketOutcome::Queued => {}
                PacketOutcome::NoRoute => trace!("outbound packet without a route"),
                PacketOutcome::NoEndpoint { peer } => {
                    trace!(peer = %peer.short(), "outbound packet for a peer without endpoint");
                }
                PacketOutcome::Dropped(reason) => trace!(?reason, "outbound packet dropped"),
            }
            queues.free.push(packet);
        }
        recycle_excess(&mut queues.free);
    }

    /// Takes the engine's events (it queues them until asked), logging
    /// peer lifecycle at INFO.
    fn drain_events(&mut self) {
        while let Some(event) = self.engine.poll_event() {
            match event {
                Event::HandshakeCompleted {
                    peer,
                    endpoint,
                    initiator,
                } => {
                    self.counters.handshakes_completed.increment();
                    debug!(peer = %peer.short(), %endpoint, initiator, "handshake completed");
                }
                Event::HandshakeExpired { peer } => {
                    self.counters.handshakes_failed.increment();
                    info!(peer = %peer.short(), "no handshake answer; WireGuard session given up until new traffic");
                }
                Event::EndpointChanged { peer, endpoint } => {
                    info!(peer = %peer.short(), %endpoint, "peer endpoint changed");
                }
            }
        }
    }

    /// Sends what the engine wants to send on its own (handshakes, keepalives,
    /// packets queued during a handshake).
    async fn flush_engine(&mut self, send_buf: &mut [u8], local: SocketAddr) {
        while let Some((dst, len)) = self.engine.poll_transmit(send_buf) {
            send(&self.udp, &send_buf[..len], dst, local, &self.counters).await;
        }
    }
}

/// Keeps the buffer pool from growing without bound after a burst.
fn recycle_excess(free: &mut Vec<Vec<u8>>) {
    const MAX_POOLED: usize = 1024;
    if free.len() > MAX_POOLED {
        free.truncate(MAX_POOLED);
    }
}

/// Sends one datagram. A full socket buffer waits for room (backpressure on
/// the whole packet path); any other error drops the datagram, as the network
/// would, and is counted.
async fn send<D: DatagramIo>(
    udp: &D,
    payload: &[u8],
    dst: SocketAddr,
    local: SocketAddr,
    counters: &DataPlaneCounters,
) {
    let dst = tailnode_wg::udp::addr_for_socket(dst, local);
    let result = match udp.try_send_to(payload, dst) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => udp.send_to(payload, dst).await,
        other => other,
    };
    match result {
        Ok(len) => {
            counters.tx_datagrams.increment();
            counters.tx_bytes.add(len as u64);
        }
        Err(e) => {
            counters.udp_send_errors.increment();
            debug!(%dst, error = %e, "UDP send failed");
        }
    }
}
