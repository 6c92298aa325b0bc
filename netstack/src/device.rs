//! The smoltcp [`Device`] behind the netstack: packet queues owned by the caller.
//!
//! Inbound packets are owned `Vec<u8>` buffers; one at a time is *moved* into an rx token, smoltcp
//! parses it in place and copies the payload into the socket buffer (the only copy on the receive
//! path), and the emptied buffer goes back to the free pool. Outbound packets are written by
//! smoltcp directly into buffers taken from the free pool, and the filled buffers are appended to
//! the outbound queue. A buffer is allocated only when the pool is empty, so a driver that returns
//! the buffers it is done with reaches a steady state without allocation.

use std::collections::VecDeque;

use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant as SmolInstant;

/// The packet queues shared between the netstack and the driver that moves IP packets.
///
/// The driver pushes received IP packets to `inbound`, calls [`crate::Netstack::poll`], then takes
/// the IP packets to send from `outbound`. Buffers it no longer needs (sent packets) go back to
/// `free`, from which the netstack takes buffers for new outbound packets; the netstack also
/// returns every inbound buffer it consumed to `free`. The driver decides how large `free` may
/// grow (trim it if a burst left it large).
#[derive(Debug, Default)]
pub struct PacketQueues {
    /// IP packets received from the tunnel, oldest first, each a whole IPv4 or IPv6 packet.
    pub inbound: VecDeque<Vec<u8>>,
    /// IP packets the netstack wants sent, oldest first.
    pub outbound: VecDeque<Vec<u8>>,
    /// Spare buffers, reused for outbound packets (contents and length are irrelevant).
    pub free: Vec<Vec<u8>>,
}

impl PacketQueues {
    /// Creates empty queues.
    pub fn new() -> Self {
        Self::default()
    }
}

/// A device over [`PacketQueues`] for one `poll`: it offers at most one inbound packet (placed in
/// `rx` by the caller) and accepts up to `tx_budget` outbound packets from socket egress.
pub(crate) struct QueueDevice<'q> {
    /// The inbound packet smoltcp will receive next, if any.
    pub rx: Option<Vec<u8>>,
    /// Where a consumed inbound buffer is parked until the caller returns it to the pool.
    pub rx_done: Option<Vec<u8>>,
    pub outbound: &'q mut VecDeque<Vec<u8>>,
    pub free: &'q mut Vec<Vec<u8>>,
    /// Outbound packets socket egress may still emit in this poll (replies to inbound packets
    /// are not counted: smoltcp emits at most one per inbound packet).
    pub tx_budget: usize,
    /// Buffer capacity for fresh allocations.
    pub mtu: usize,
    /// Whether inbound checksums are verified.
    pub verify_checksums: bool,
}

impl QueueDevice<'_> {
    /// Moves a consumed inbound buffer back to the free pool.
    pub(crate) fn recycle_rx(&mut self) {
        if let Some(buf) = self.rx_done.take() {
            self.free.push(buf);
        }
        // A packet smoltcp declined to receive (it never does for Medium::Ip) is recycled too.
        if let Some(buf) = self.rx.take() {
            self.free.push(buf);
        }
    }
}

/// Device capabilities for an interface of the given IP MTU.
pub(crate) fn capabilities(mtu: usize, verify_checksums: bool) -> DeviceCapabilities {
    let mut caps = DeviceCapabilities::default();
    caps.medium = Medium::Ip;
    caps.max_transmission_unit = mtu;
    caps.max_burst_size = None;
    caps.checksum = if verify_checksums {
        ChecksumCapabilities::default()
    } else {
        // Compute checksums on transmit (peers check them), skip verification on receive:
        // every inbound packet was authenticated by WireGuard already.
        let mut c = ChecksumCapabilities::default();
        c.ipv4 = phy::Checksum::Tx;
        c.udp = phy::Checksum::Tx;
        c.tcp = phy::Checksum::Tx;
        c.icmpv4 = phy::Checksum::Tx;
        c.icmpv6 = phy::Checksum::Tx;
        c
    };
    caps
}

impl phy::Device for QueueDevice<'_> {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: SmolInstant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let buffer = self.rx.take()?;
        Some((
            RxToken {
                buffer,
                done: &mut self.rx_done,
            },
            TxToken {
                outbound: self.outbound,
                free: self.free,
                mtu: self.mtu,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: SmolInstant) -> Option<TxToken<'_>> {
        if self.tx_budget == 0 {
            return None;
        }
        self.tx_budget -= 1;
        Some(TxToken {
            outbound: self.outbound,
            free: self.free,
            mtu: self.mtu,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        capabilities(self.mtu, self.verify_checksums)
    }
}

/// Receive token: owns the inbound buffer, hands it back for recycling after use.
pub(crate) struct RxToken<'a> {
    buffer: Vec<u8>,
    done: &'a mut Option<Vec<u8>>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let result = f(&self.buffer);
        *self.done = Some(self.buffer);
        result
    }
}

/// Transmit token: fills a pooled buffer and queues it outbound.
pub(crate) struct TxToken<'a> {
    outbound: &'a mut VecDeque<Vec<u8>>,
    free: &'a mut Vec<Vec<u8>>,
    mtu: usize,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = self
            .free
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.mtu.max(len)));
        // smoltcp writes every byte of the `len` it asked for, so stale contents are harmless and
        // only growth needs initialising.
        if buf.len() < len {
            buf.resize(len, 0);
        } else {
            buf.truncate(len);
        }
        let result = f(&mut buf);
        tracing::trace!(len, "netstack: packet out");
        self.outbound.push_back(buf);
        result
    }
}
