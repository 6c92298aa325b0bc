//! A minimal, allocation-free look at inbound IP packets before smoltcp sees them.
//!
//! The netstack demultiplexes every inbound packet itself: each socket lives in its own smoltcp
//! `SocketSet`, so the packet must be handed to the right one. For TCP it needs the 4-tuple and
//! the SYN/FIN/RST/ACK flags (RFC 9293 §3.1): SYNs to a listened port open a socket, FINs and
//! RSTs mark a connection for the post-poll reclaim pass. For UDP it needs the destination port.
//! This parser reads just enough of the IPv4 (RFC 791) or IPv6 (RFC 8200, skipping hop-by-hop,
//! routing and destination-options headers) header to find the transport header. Everything
//! else goes to smoltcp unchanged, which validates it fully and drops what is malformed.
//!
//! Fragments (IPv4 MF/offset, IPv6 fragment header) are reported as such: smoltcp is built
//! without reassembly and would misread a first fragment as a whole datagram.
//!
//! ICMP echo replies (RFC 792 type 0, RFC 4443 type 129) are reported with their destination and
//! identifier, so a reply reaches the ICMP socket that sent the request; every other ICMP message
//! (echo requests included, which smoltcp answers itself) is `Other`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// TCP FIN flag.
pub(crate) const FIN: u8 = 0x01;
/// TCP SYN flag.
pub(crate) const SYN: u8 = 0x02;
/// TCP RST flag.
pub(crate) const RST: u8 = 0x04;
/// TCP ACK flag.
pub(crate) const ACK: u8 = 0x10;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// ICMP (RFC 792) echo reply type.
const ICMP_ECHO_REPLY: u8 = 0;
/// ICMPv6 (RFC 4443 §4.2) echo reply type.
const ICMPV6_ECHO_REPLY: u8 = 129;
/// Bytes of an echo message header: type, code, checksum, identifier, sequence number.
const ECHO_HEADER: usize = 8;
const V6_HOP_BY_HOP: u8 = 0;
const V6_ROUTING: u8 = 43;
const V6_FRAGMENT: u8 = 44;
const V6_DEST_OPTS: u8 = 60;
/// Extension headers walked before giving up (a packet may chain several).
const V6_MAX_EXTENSIONS: usize = 4;
const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
/// Bytes of the TCP header we need: ports (4), seq (4), ack (4), offset (1), flags (1).
const TCP_PREFIX: usize = 14;

/// The parts of a TCP segment the netstack acts on before smoltcp processes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcpSummary {
    /// Source address and port (the remote end of the connection).
    pub src: SocketAddr,
    /// Destination address and port (our end).
    pub dst: SocketAddr,
    /// The TCP flags byte (FIN, SYN, RST, PSH, ACK, URG, ECE, CWR).
    pub flags: u8,
}

impl TcpSummary {
    /// Whether this segment opens a connection: SYN without ACK or RST.
    pub(crate) fn is_syn(&self) -> bool {
        self.flags & (SYN | ACK | RST) == SYN
    }

    /// Whether this segment may end a connection (FIN or RST).
    pub(crate) fn is_fin_or_rst(&self) -> bool {
        self.flags & (FIN | RST) != 0
    }

    /// Whether this segment is a reset.
    pub(crate) fn is_rst(&self) -> bool {
        self.flags & RST != 0
    }
}

/// What an inbound packet is, as far as demultiplexing is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// A whole TCP segment.
    Tcp(TcpSummary),
    /// A whole UDP datagram to this port.
    Udp {
        /// Destination port.
        dst_port: u16,
    },
    /// A whole ICMP or ICMPv6 echo reply.
    EchoReply {
        /// Destination address (ours, if the reply is for us).
        dst: IpAddr,
        /// The echo identifier.
        ident: u16,
    },
    /// An IPv4 or IPv6 fragment.
    Fragment,
    /// Anything else (ICMP, other protocols, truncated or garbage input).
    Other,
}

/// Classifies an inbound IP packet.
pub(crate) fn classify(packet: &[u8]) -> Class {
    let Some((proto, src_ip, dst_ip, payload)) = transport(packet) else {
        return Class::Other;
    };
    match proto {
        Some(PROTO_TCP) if payload.len() >= TCP_PREFIX => {
            let src_port = u16::from_be_bytes([payload[0], payload[1]]);
            let dst_port = u16::from_be_bytes([payload[2], payload[3]]);
            Class::Tcp(TcpSummary {
                src: SocketAddr::new(src_ip, src_port),
                dst: SocketAddr::new(dst_ip, dst_port),
                flags: payload[13],
            })
        }
        Some(PROTO_UDP) if payload.len() >= 8 => Class::Udp {
            dst_port: u16::from_be_bytes([payload[2], payload[3]]),
        },
        Some(proto @ (PROTO_ICMP | PROTO_ICMPV6))
            if payload.len() >= ECHO_HEADER
                && payload[1] == 0
                && payload[0]
                    == if proto == PROTO_ICMP {
                        ICMP_ECHO_REPLY
                    } else {
                        ICMPV6_ECHO_REPLY
                    }
                // ICMP over IPv6 or ICMPv6 over IPv4 is not an echo reply of ours.
                && (proto == PROTO_ICMP) == dst_ip.is_ipv4() =>
        {
            Class::EchoReply {
                dst: dst_ip,
                ident: u16::from_be_bytes([payload[4], payload[5]]),
            }
        }
        None => Class::Fragment,
        _ => Class::Other,
    }
}

/// Classifies an IP packet as a TCP segment, or returns `None` for anything else.
#[cfg(test)]
pub(crate) fn tcp_summary(packet: &[u8]) -> Option<TcpSummary> {
    match classify(packet) {
        Class::Tcp(summary) => Some(summary),
        _ => None,
    }
}

/// The transport protocol (`None` for a fragment), addresses, and transport payload.
fn transport(packet: &[u8]) -> Option<(Option<u8>, IpAddr, IpAddr, &[u8])> {
    match packet.first()? >> 4 {
        4 => {
            if packet.len() < IPV4_MIN_HEADER {
                return None;
            }
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            if header_len < IPV4_MIN_HEADER || total_len < header_len || total_len > packet.len() {
                return None;
            }
            let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
            // More-fragments flag or a non-zero fragment offset: not a whole datagram.
            let frag = u16::from_be_bytes([packet[6], packet[7]]);
            let proto = (frag & 0x3fff == 0).then_some(packet[9]);
            Some((
                proto,
                src.into(),
                dst.into(),
                &packet[header_len..total_len],
            ))
        }
        6 => {
            if packet.len() < IPV6_HEADER {
                return None;
            }
            let payload_len = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            let end = IPV6_HEADER.checked_add(payload_len)?;
            if end > packet.len() {
                return None;
            }
            let src = ipv6_at(packet, 8)?;
            let dst = ipv6_at(packet, 24)?;
            let mut next = packet[6];
            let mut offset = IPV6_HEADER;
            for _ in 0..V6_MAX_EXTENSIONS {
                match next {
                    V6_HOP_BY_HOP | V6_ROUTING | V6_DEST_OPTS => {
                        let ext = packet.get(offset..offset + 2)?;
                        next = ext[0];
                        offset += (usize::from(ext[1]) + 1) * 8;
                        if offset > end {
                            return None;
                        }
                    }
                    V6_FRAGMENT => return Some((None, src.into(), dst.into(), &[])),
                    _ => break,
                }
            }
            Some((Some(next), src.into(), dst.into(), &packet[offset..end]))
        }
        _ => None,
    }
}

/// The destination address of an IP packet, if the header is long enough to hold one.
pub(crate) fn destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= IPV4_MIN_HEADER => {
            Some(Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]).into())
        }
        6 => ipv6_at(packet, 24).map(IpAddr::from),
        _ => None,
    }
}

fn ipv6_at(packet: &[u8], offset: usize) -> Option<Ipv6Addr> {
    let bytes: [u8; 16] = packet.get(offset..offset + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(bytes))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        IpAddress, IpProtocol, IpRepr, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpControl,
        TcpPacket, TcpRepr, TcpSeqNumber,
    };

    fn segment(src: SocketAddr, dst: SocketAddr, control: TcpControl, ack: bool) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
            control,
            seq_number: TcpSeqNumber(1000),
            ack_number: ack.then_some(TcpSeqNumber(5)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: b"hello",
        };
        let ip = IpRepr::new(
            IpAddress::from(src.ip()),
            IpAddress::from(dst.ip()),
            IpProtocol::Tcp,
            tcp.buffer_len(),
            64,
        );
        let mut buf = vec![0u8; ip.buffer_len()];
        let caps = ChecksumCapabilities::default();
        match ip {
            IpRepr::Ipv4(v4) => {
                let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
                Ipv4Repr::emit(&v4, &mut p, &caps);
                let mut t = TcpPacket::new_unchecked(p.payload_mut());
                tcp.emit(&mut t, &ip.src_addr(), &ip.dst_addr(), &caps);
            }
            IpRepr::Ipv6(v6) => {
                let mut p = Ipv6Packet::new_unchecked(&mut buf[..]);
                Ipv6Repr::emit(&v6, &mut p);
                let mut t = TcpPacket::new_unchecked(p.payload_mut());
                tcp.emit(&mut t, &ip.src_addr(), &ip.dst_addr(), &caps);
            }
        }
        buf
    }

    #[test]
    fn classifies_ipv4_syn() {
        let src: SocketAddr = "100.64.0.2:50000".parse().unwrap();
        let dst: SocketAddr = "100.64.0.1:80".parse().unwrap();
        let pkt = segment(src, dst, TcpControl::Syn, false);
        let s = tcp_summary(&pkt).unwrap();
        assert_eq!((s.src, s.dst), (src, dst));
        assert!(s.is_syn());
        assert!(!s.is_fin_or_rst());
        assert_eq!(destination(&pkt), Some(dst.ip()));
    }

    #[test]
    fn classifies_ipv6_rst_and_fin() {
        let src: SocketAddr = "[fd7a:115c:a1e0::2]:50000".parse().unwrap();
        let dst: SocketAddr = "[fd7a:115c:a1e0::1]:443".parse().unwrap();
        let rst = tcp_summary(&segment(src, dst, TcpControl::Rst, true)).unwrap();
        assert!(rst.is_rst() && rst.is_fin_or_rst() && !rst.is_syn());
        let fin = tcp_summary(&segment(src, dst, TcpControl::Fin, true)).unwrap();
        assert!(!fin.is_rst() && fin.is_fin_or_rst());
        assert_eq!((fin.src, fin.dst), (src, dst));
        let synack = tcp_summary(&segment(src, dst, TcpControl::Syn, true)).unwrap();
        assert!(!synack.is_syn(), "SYN|ACK does not open a connection");
    }

    #[test]
    fn rejects_fragments_and_truncation() {
        let src: SocketAddr = "100.64.0.2:50000".parse().unwrap();
        let dst: SocketAddr = "100.64.0.1:80".parse().unwrap();
        let mut pkt = segment(src, dst, TcpControl::Syn, false);
        pkt[6] |= 0x20; // more fragments
        assert_eq!(tcp_summary(&pkt), None);
        assert_eq!(classify(&pkt), Class::Fragment);
        let mut pkt = segment(src, dst, TcpControl::Syn, false);
        pkt[7] = 1; // offset 8 bytes
        assert_eq!(classify(&pkt), Class::Fragment);
        let pkt = segment(src, dst, TcpControl::Syn, false);
        assert_eq!(tcp_summary(&pkt[..30]), None);
        assert_eq!(tcp_summary(&[]), None);
        assert_eq!(tcp_summary(&[0x45]), None);
    }

    /// Inserts an IPv6 extension header of `len8` 8-octet units after the fixed header.
    fn with_extension(mut pkt: Vec<u8>, kind: u8, len8: u8) -> Vec<u8> {
        let size = (usize::from(len8) + 1) * 8;
        let mut ext = vec![0u8; size];
        ext[0] = pkt[6];
        ext[1] = len8;
        pkt[6] = kind;
        let payload_len = u16::from_be_bytes([pkt[4], pkt[5]]) as usize + size;
        pkt[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
        pkt.splice(40..40, ext);
        pkt
    }

    #[test]
    fn walks_ipv6_extension_headers() {
        let src: SocketAddr = "[fd7a:115c:a1e0::2]:5000".parse().unwrap();
        let dst: SocketAddr = "[fd7a:115c:a1e0::1]:22".parse().unwrap();
        let pkt = segment(src, dst, TcpControl::Syn, false);
        let pkt = with_extension(pkt, V6_DEST_OPTS, 1);
        let pkt = with_extension(pkt, V6_HOP_BY_HOP, 0);
        let s = tcp_summary(&pkt).unwrap();
        assert_eq!((s.src, s.dst), (src, dst));
        assert!(s.is_syn());
        let frag = with_extension(segment(src, dst, TcpControl::Syn, false), V6_FRAGMENT, 0);
        assert_eq!(classify(&frag), Class::Fragment);
        // An extension header running past the payload is not followed.
        let mut bad = with_extension(segment(src, dst, TcpControl::Syn, false), V6_ROUTING, 0);
        bad[41] = 200;
        assert_eq!(classify(&bad), Class::Other);
    }

    #[test]
    fn classifies_udp_by_destination_port() {
        // IPv4 header + UDP header, port 5353.
        let mut pkt = vec![0u8; 28];
        pkt[0] = 0x45;
        pkt[2..4].copy_from_slice(&28u16.to_be_bytes());
        pkt[9] = PROTO_UDP;
        pkt[22..24].copy_from_slice(&5353u16.to_be_bytes());
        assert_eq!(classify(&pkt), Class::Udp { dst_port: 5353 });
        assert_eq!(classify(&pkt[..27]), Class::Other);
    }

    /// An ICMP (IPv4) or ICMPv6 echo request or reply.
    fn echo(src: IpAddr, dst: IpAddr, reply: bool, ident: u16, seq_no: u16) -> Vec<u8> {
        use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr};
        let data = b"ping payload";
        let caps = ChecksumCapabilities::default();
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let icmp = if reply {
                    Icmpv4Repr::EchoReply {
                        ident,
                        seq_no,
                        data,
                    }
                } else {
                    Icmpv4Repr::EchoRequest {
                        ident,
                        seq_no,
                        data,
                    }
                };
                let ip = Ipv4Repr {
                    src_addr: s,
                    dst_addr: d,
                    next_header: IpProtocol::Icmp,
                    payload_len: icmp.buffer_len(),
                    hop_limit: 64,
                };
                let mut buf = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
                let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
                ip.emit(&mut p, &caps);
                icmp.emit(&mut Icmpv4Packet::new_unchecked(p.payload_mut()), &caps);
                buf
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let icmp = if reply {
                    Icmpv6Repr::EchoReply {
                        ident,
                        seq_no,
                        data,
                    }
                } else {
                    Icmpv6Repr::EchoRequest {
                        ident,
                        seq_no,
                        data,
                    }
                };
                let ip = Ipv6Repr {
                    src_addr: s,
                    dst_addr: d,
                    next_header: IpProtocol::Icmpv6,
                    payload_len: icmp.buffer_len(),
                    hop_limit: 64,
                };
                let mut buf = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
                let mut p = Ipv6Packet::new_unchecked(&mut buf[..]);
                ip.emit(&mut p);
                icmp.emit(
                    &s,
                    &d,
                    &mut Icmpv6Packet::new_unchecked(p.payload_mut()),
                    &caps,
                );
                buf
            }
            _ => unreachable!("mixed families"),
        }
    }

    #[test]
    fn classifies_echo_replies_by_destination_and_ident() {
        for (src, dst) in [
            ("100.64.0.2", "100.64.0.1"),
            ("fd7a:115c:a1e0::2", "fd7a:115c:a1e0::1"),
        ] {
            let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let reply = echo(src, dst, true, 0xbeef, 7);
            assert_eq!(classify(&reply), Class::EchoReply { dst, ident: 0xbeef });
            // Echo requests go to smoltcp's automatic reply, not to a socket.
            assert_eq!(classify(&echo(src, dst, false, 0xbeef, 7)), Class::Other);
            // A reply cut short of its identifier is not an echo reply.
            let header = if dst.is_ipv4() { 20 } else { 40 };
            let mut short = reply[..header + 5].to_vec();
            if dst.is_ipv4() {
                let len = short.len() as u16;
                short[2..4].copy_from_slice(&len.to_be_bytes());
            } else {
                short[4..6].copy_from_slice(&5u16.to_be_bytes());
            }
            assert_eq!(classify(&short), Class::Other);
        }
        // An ICMPv4 echo reply carried over IPv6 (next header 1) is not ours.
        let src: IpAddr = "fd7a:115c:a1e0::2".parse().unwrap();
        let dst: IpAddr = "fd7a:115c:a1e0::1".parse().unwrap();
        let mut pkt = echo(src, dst, true, 1, 1);
        pkt[6] = PROTO_ICMP;
        pkt[40] = ICMP_ECHO_REPLY;
        assert_eq!(classify(&pkt), Class::Other);
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = classify(&bytes);
            let _ = destination(&bytes);
        }

        #[test]
        fn never_panics_on_mutated_segments(
            v6 in any::<bool>(),
            flips in proptest::collection::vec((0usize..80, any::<u8>()), 0..8),
            cut in 0usize..100,
        ) {
            let (src, dst): (SocketAddr, SocketAddr) = if v6 {
                ("[fd7a:115c:a1e0::2]:1".parse().unwrap(), "[fd7a:115c:a1e0::1]:2".parse().unwrap())
            } else {
                ("100.64.0.2:1".parse().unwrap(), "100.64.0.1:2".parse().unwrap())
            };
            let mut pkt = segment(src, dst, TcpControl::Syn, false);
            for (at, value) in flips {
                if let Some(b) = pkt.get_mut(at) { *b = value; }
            }
            pkt.truncate(cut);
            if let Some(s) = tcp_summary(&pkt) {
                // Whatever it reports lies inside the buffer it was given.
                prop_assert!(pkt.len() >= 34);
                prop_assert_eq!(s.src.is_ipv4(), s.dst.is_ipv4());
            }
        }

        #[test]
        fn round_trips_echo_replies(ident in any::<u16>(), seq in any::<u16>(), v6 in any::<bool>()) {
            let (src, dst): (IpAddr, IpAddr) = if v6 {
                ("fd7a:115c:a1e0::2".parse().unwrap(), "fd7a:115c:a1e0::1".parse().unwrap())
            } else {
                ("100.64.0.2".parse().unwrap(), "100.64.0.1".parse().unwrap())
            };
            prop_assert_eq!(classify(&echo(src, dst, true, ident, seq)), Class::EchoReply { dst, ident });
            prop_assert_eq!(classify(&echo(src, dst, false, ident, seq)), Class::Other);
        }

        #[test]
        fn round_trips_well_formed_segments(
            sport in 1u16.., dport in 1u16.., fin in any::<bool>(), v6 in any::<bool>(),
        ) {
            let (src, dst): (SocketAddr, SocketAddr) = if v6 {
                (SocketAddr::new("fd7a:115c:a1e0::2".parse().unwrap(), sport),
                 SocketAddr::new("fd7a:115c:a1e0::1".parse().unwrap(), dport))
            } else {
                (SocketAddr::new("100.64.0.2".parse().unwrap(), sport),
                 SocketAddr::new("100.64.0.1".parse().unwrap(), dport))
            };
            let control = if fin { TcpControl::Fin } else { TcpControl::Syn };
            let s = tcp_summary(&segment(src, dst, control, fin)).unwrap();
            prop_assert_eq!(s.src, src);
            prop_assert_eq!(s.dst, dst);
            prop_assert_eq!(s.is_syn(), !fin);
            prop_assert_eq!(s.is_fin_or_rst(), fin);
        }
    }
}
