//! ICMP echo sockets in the core: echo requests out (RFC 792 type 8, RFC 4443 §4.1 type 128),
//! echo replies in (type 0 / 129).
//!
//! An echo socket is a smoltcp `icmp::Socket` bound to an echo identifier, in a `SocketSet` of
//! its own like every other socket, and registered in `Core::icmp` under that identifier.
//! Demultiplexing (see `inspect::Class::EchoReply`) hands a socket only the echo replies that are
//! addressed to one of our addresses and carry its identifier. Echo *requests* never reach a
//! socket, whatever their identifier: they go to the empty set, where smoltcp's
//! `auto-icmp-echo-reply` answers them, so a node keeps answering pings while it sends its own.
//! Replies nobody waits for go to the empty set too, which ignores them.
//!
//! Requests leave from our address of the destination's family (smoltcp picks the first one,
//! which is what `Core::local_address_for` returns). smoltcp re-parses the queued message and
//! emits it with a fresh checksum, so the message is queued without computing one.

use std::io;
use std::net::IpAddr;

use rand::Rng;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::icmp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress};

use super::{Core, Interest, PollResult, Slot, Waiter, WouldBlock};
use crate::device::QueueDevice;
use crate::icmp::{EchoReply, IcmpBindError};

/// Echo sockets alive at once (each holds two small packet buffers).
const MAX_ICMP_SOCKETS: usize = 1024;
/// Messages each direction of an echo socket buffers.
const ICMP_BUFFER_PACKETS: usize = 16;
/// ICMP echo header: type, code, checksum, identifier, sequence number.
const ECHO_HEADER: usize = 8;

/// An echo socket, keyed by its identifier.
pub(crate) struct IcmpEntry {
    slot: Slot,
    /// The handle was dropped; removed once the queued requests are sent.
    orphan: bool,
    dirty: bool,
    /// Receives or sends blocked on this socket.
    interest: Interest,
}

impl Slot {
    fn icmp(&mut self) -> &mut icmp::Socket<'static> {
        self.set.get_mut::<icmp::Socket>(self.handle)
    }

    fn icmp_ref(&self) -> &icmp::Socket<'static> {
        self.set.get::<icmp::Socket>(self.handle)
    }
}

impl IcmpEntry {
    /// The smoltcp set of this socket, for ingress.
    pub(super) fn set(&mut self) -> &mut smoltcp::iface::SocketSet<'static> {
        &mut self.slot.set
    }

    /// After ingress: whether a blocked receive may now complete (clears its interest if so).
    pub(super) fn take_recv_ready(&mut self) -> bool {
        let ready = self.interest.recv && self.slot.icmp_ref().can_recv();
        if ready {
            self.interest.recv = false;
        }
        ready
    }
}

impl Core {
    /// Opens an echo socket with identifier `ident` (a random free one if `None`).
    pub(crate) fn icmp_bind(&mut self, ident: Option<u16>) -> Result<u16, IcmpBindError> {
        if self.icmp.len() >= MAX_ICMP_SOCKETS {
            return Err(IcmpBindError::TooManySockets);
        }
        let ident = match ident {
            Some(id) if self.icmp.contains_key(&id) => return Err(IcmpBindError::InUse(id)),
            Some(id) => id,
            None => {
                // At most MAX_ICMP_SOCKETS of 65536 identifiers are taken: a free one exists.
                let start = self.rng.gen_range(0..=u16::MAX);
                (0..=u16::MAX)
                    .map(|i| start.wrapping_add(i))
                    .find(|id| !self.icmp.contains_key(id))
                    .ok_or(IcmpBindError::TooManySockets)?
            }
        };
        let len = ICMP_BUFFER_PACKETS * self.cfg.mtu;
        let buffer = || {
            icmp::PacketBuffer::new(
                vec![icmp::PacketMetadata::EMPTY; ICMP_BUFFER_PACKETS],
                vec![0u8; len],
            )
        };
        let mut sock = icmp::Socket::new(buffer(), buffer());
        if sock.bind(icmp::Endpoint::Ident(ident)).is_err() {
            // A fresh socket with a specified endpoint always binds.
            return Err(IcmpBindError::InUse(ident));
        }
        self.icmp.insert(
            ident,
            IcmpEntry {
                slot: Slot::new(sock),
                orphan: false,
                dirty: false,
                interest: Interest::default(),
            },
        );
        tracing::debug!(ident, "netstack: ICMP echo socket opened");
        Ok(ident)
    }

    /// Queues one echo request to `dst` from the socket `ident`. Blocks (as
    /// [`Waiter::IcmpSend`]) while the send queue is full.
    pub(crate) fn icmp_send(
        &mut self,
        ident: u16,
        dst: IpAddr,
        seq_no: u16,
        data: &[u8],
    ) -> Result<io::Result<()>, WouldBlock> {
        let dst = dst.to_canonical();
        let unusable = match dst {
            IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast(),
            IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
        };
        if unusable {
            return Ok(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot ping {dst}: not a unicast address"),
            )));
        }
        let Some(local) = self.local_address_for(dst) else {
            return Ok(Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "no local address of the destination's family",
            )));
        };
        let ip_header = if dst.is_ipv4() { 20 } else { 40 };
        let max = self.cfg.mtu - ip_header - ECHO_HEADER;
        if data.len() > max {
            return Ok(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "echo payload of {} bytes exceeds the {max}-byte limit of the tunnel MTU",
                    data.len()
                ),
            )));
        }
        let Some(entry) = self.icmp.get_mut(&ident) else {
            return Ok(Err(io::ErrorKind::NotConnected.into()));
        };
        let sock = entry.slot.icmp();
        // smoltcp computes the checksum when it emits the packet.
        let caps = ChecksumCapabilities::ignored();
        let queued = match (local, dst) {
            (_, IpAddr::V4(d)) => {
                let repr = Icmpv4Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                };
                sock.send(repr.buffer_len(), IpAddress::Ipv4(d))
                    .map(|buf| repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps))
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let repr = Icmpv6Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                };
                sock.send(repr.buffer_len(), IpAddress::Ipv6(d)).map(|buf| {
                    repr.emit(&s, &d, &mut Icmpv6Packet::new_unchecked(buf), &caps);
                })
            }
            // `local_address_for` returns an address of the destination's family.
            (IpAddr::V4(_), IpAddr::V6(_)) => {
                return Ok(Err(io::ErrorKind::AddrNotAvailable.into()));
            }
        };
        match queued {
            Ok(()) => {
                tracing::trace!(ident, seq_no, %dst, "netstack: echo request queued");
                self.touch_icmp(ident);
                Ok(Ok(()))
            }
            Err(icmp::SendError::BufferFull) => {
                entry.interest.send = true;
                Err(WouldBlock(Waiter::IcmpSend(ident)))
            }
            Err(icmp::SendError::Unaddressable) => Ok(Err(io::ErrorKind::InvalidInput.into())),
        }
    }

    /// Takes one echo reply of the socket `ident`, its payload copied (truncated) into `buf`.
    /// Blocks (as [`Waiter::IcmpRecv`]) while none is queued.
    pub(crate) fn icmp_recv(
        &mut self,
        ident: u16,
        buf: &mut [u8],
    ) -> Result<io::Result<EchoReply>, WouldBlock> {
        let Some(entry) = self.icmp.get_mut(&ident) else {
            return Ok(Err(io::ErrorKind::NotConnected.into()));
        };
        let sock = entry.slot.icmp();
        loop {
            let Ok((message, from)) = sock.recv() else {
                entry.interest.recv = true;
                return Err(WouldBlock(Waiter::IcmpRecv(ident)));
            };
            let caps = ChecksumCapabilities::ignored();
            let reply = match from {
                IpAddress::Ipv4(_) => Icmpv4Packet::new_checked(message)
                    .and_then(|p| Icmpv4Repr::parse(&p, &caps))
                    .ok()
                    .and_then(|repr| match repr {
                        Icmpv4Repr::EchoReply {
                            ident: id,
                            seq_no,
                            data,
                        } => Some((id, seq_no, data)),
                        _ => None,
                    }),
                IpAddress::Ipv6(src) => Icmpv6Packet::new_checked(message)
                    // The checksum was checked (or not) on ingress; addresses only feed it.
                    .and_then(|p| Icmpv6Repr::parse(&src, &src, &p, &caps))
                    .ok()
                    .and_then(|repr| match repr {
                        Icmpv6Repr::EchoReply {
                            ident: id,
                            seq_no,
                            data,
                        } => Some((id, seq_no, data)),
                        _ => None,
                    }),
            };
            // Demultiplexing only routes echo replies with our identifier here; anything else
            // is skipped rather than trusted.
            let Some((id, seq, data)) = reply else {
                continue;
            };
            if id != ident {
                continue;
            }
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            tracing::trace!(ident, seq, from = %from, "netstack: echo reply");
            return Ok(Ok(EchoReply {
                from: IpAddr::from(from),
                seq,
                len: data.len(),
            }));
        }
    }

    /// Closes the echo socket `ident` once its queued requests are sent.
    pub(crate) fn icmp_close(&mut self, ident: u16) {
        let Some(entry) = self.icmp.get_mut(&ident) else {
            return;
        };
        if entry.slot.icmp_ref().send_queue() == 0 {
            self.icmp.remove(&ident);
        } else {
            entry.orphan = true;
            entry.interest = Interest::default();
            self.touch_icmp(ident);
        }
        tracing::debug!(ident, "netstack: ICMP echo socket closed");
    }

    fn touch_icmp(&mut self, ident: u16) {
        if let Some(entry) = self.icmp.get_mut(&ident) {
            if !entry.dirty {
                entry.dirty = true;
                self.icmp_dirty.push(ident);
            }
            self.wake_driver = true;
        }
    }

    /// Runs egress for the dirty echo sockets. Returns whether work is left because the outbound
    /// budget ran out.
    pub(super) fn icmp_egress(&mut self, ts: SmolInstant, device: &mut QueueDevice<'_>) -> bool {
        let mut j = 0;
        while let Some(&ident) = self.icmp_dirty.get(j) {
            if device.tx_budget == 0 {
                break;
            }
            j += 1;
            let Some(entry) = self.icmp.get_mut(&ident) else {
                continue;
            };
            entry.dirty = false;
            while self.iface.poll_egress(ts, device, &mut entry.slot.set) != PollResult::None {}
            // Only egress frees room in the send queue.
            if entry.interest.send {
                entry.interest.send = false;
                self.ready.push(Waiter::IcmpSend(ident));
            }
            if device.tx_budget == 0 && entry.slot.icmp_ref().send_queue() > 0 {
                entry.dirty = true;
                j -= 1;
                break;
            }
        }
        self.icmp_dirty.drain(..j);
        !self.icmp_dirty.is_empty()
    }

    /// Removes dropped echo sockets whose requests have all been sent.
    pub(super) fn process_icmp_orphans(&mut self) {
        self.icmp
            .retain(|_, entry| !entry.orphan || entry.slot.icmp_ref().send_queue() > 0);
    }
}
