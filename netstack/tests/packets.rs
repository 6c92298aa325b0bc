//! Packet-level tests on a single netstack: crafted IP packets in, emitted IP packets checked.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, IpRepr, Ipv4Packet,
    Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};
use tailnode_netstack::testing::{A_V4, A_V6, B_V4, B_V6};
use tailnode_netstack::{Netstack, NetstackConfig, PacketQueues};

fn stack(config: NetstackConfig) -> (Netstack, Instant) {
    let now = Instant::now();
    (Netstack::new(config, now).unwrap(), now)
}

fn config_a() -> NetstackConfig {
    NetstackConfig {
        seed: 7,
        ..NetstackConfig::with_addresses(vec![A_V4.into(), A_V6.into()])
    }
}

fn emit_ip(src: IpAddr, dst: IpAddr, proto: IpProtocol, payload_len: usize) -> (IpRepr, Vec<u8>) {
    let ip = IpRepr::new(
        IpAddress::from(src),
        IpAddress::from(dst),
        proto,
        payload_len,
        64,
    );
    let mut buf = vec![0u8; ip.buffer_len()];
    let caps = ChecksumCapabilities::default();
    match ip {
        IpRepr::Ipv4(v4) => {
            Ipv4Repr::emit(&v4, &mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps)
        }
        IpRepr::Ipv6(v6) => Ipv6Repr::emit(&v6, &mut Ipv6Packet::new_unchecked(&mut buf[..])),
    }
    (ip, buf)
}

fn ip_payload_mut(buf: &mut [u8]) -> &mut [u8] {
    if buf[0] >> 4 == 4 {
        let hl = usize::from(buf[0] & 0x0f) * 4;
        &mut buf[hl..]
    } else {
        &mut buf[40..]
    }
}

fn ip_payload(buf: &[u8]) -> &[u8] {
    if buf[0] >> 4 == 4 {
        let hl = usize::from(buf[0] & 0x0f) * 4;
        &buf[hl..]
    } else {
        &buf[40..]
    }
}

fn syn(src: SocketAddr, dst: SocketAddr, seq: i32) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(seq),
        ack_number: None,
        window_len: 64240,
        window_scale: Some(7),
        max_seg_size: Some(1380),
        sack_permitted: true,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    let (ip, mut buf) = emit_ip(src.ip(), dst.ip(), IpProtocol::Tcp, tcp.buffer_len());
    tcp.emit(
        &mut TcpPacket::new_unchecked(ip_payload_mut(&mut buf)),
        &ip.src_addr(),
        &ip.dst_addr(),
        &ChecksumCapabilities::default(),
    );
    buf
}

fn parse_tcp(packet: &[u8]) -> (IpAddr, IpAddr, TcpRepr<'_>) {
    let (src, dst): (IpAddr, IpAddr) = if packet[0] >> 4 == 4 {
        let p = Ipv4Packet::new_checked(packet).unwrap();
        assert_eq!(p.next_header(), IpProtocol::Tcp);
        (p.src_addr().into(), p.dst_addr().into())
    } else {
        let p = Ipv6Packet::new_checked(packet).unwrap();
        assert_eq!(p.next_header(), IpProtocol::Tcp);
        (p.src_addr().into(), p.dst_addr().into())
    };
    let tcp = TcpPacket::new_checked(ip_payload(packet)).unwrap();
    let repr = TcpRepr::parse(
        &tcp,
        &IpAddress::from(src),
        &IpAddress::from(dst),
        &ChecksumCapabilities::default(),
    )
    .unwrap();
    (src, dst, repr)
}

fn run(stack: &Netstack, now: Instant, packets: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut q = PacketQueues::new();
    q.inbound.extend(packets);
    stack.poll(now, &mut q);
    q.outbound.into_iter().collect()
}

#[test]
fn syn_to_unlistened_port_gets_rst() {
    for (src_ip, dst_ip) in [
        (IpAddr::V4(B_V4), IpAddr::V4(A_V4)),
        (B_V6.into(), A_V6.into()),
    ] {
        let (stack, now) = stack(config_a());
        let src = SocketAddr::new(src_ip, 40000);
        let dst = SocketAddr::new(dst_ip, 81);
        let out = run(&stack, now, vec![syn(src, dst, 1000)]);
        assert_eq!(out.len(), 1, "exactly one reply");
        let (s, d, tcp) = parse_tcp(&out[0]);
        assert_eq!((s, d), (dst_ip, src_ip));
        assert_eq!(tcp.control, TcpControl::Rst);
        assert_eq!(tcp.ack_number, Some(TcpSeqNumber(1001)));
        assert_eq!((tcp.src_port, tcp.dst_port), (81, 40000));
        assert_eq!(stack.stats().tcp_sockets, 0);
    }
}

#[tokio::test]
async fn syn_to_listened_port_gets_synack_and_backlog_bounds_sockets() {
    let config = NetstackConfig {
        listen_backlog: 2,
        ..config_a()
    };
    let (stack, now) = stack(config);
    let _listener = stack.listen(80).unwrap();
    let dst = SocketAddr::new(A_V4.into(), 80);
    for i in 0..2u16 {
        let src = SocketAddr::new(B_V4.into(), 40000 + i);
        let out = run(&stack, now, vec![syn(src, dst, 5000)]);
        assert_eq!(out.len(), 1);
        let (_, _, tcp) = parse_tcp(&out[0]);
        assert_eq!(tcp.control, TcpControl::Syn, "SYN|ACK for connection {i}");
        assert_eq!(tcp.ack_number, Some(TcpSeqNumber(5001)));
        assert!(tcp.window_scale.is_some(), "window scaling offered");
        assert_eq!(tcp.max_seg_size, Some(1420 - 40));
    }
    // Third handshake: the backlog (2) is full; the SYN is dropped silently (not reset).
    let src = SocketAddr::new(B_V4.into(), 40002);
    let out = run(&stack, now, vec![syn(src, dst, 5000)]);
    assert!(out.is_empty(), "SYN beyond the backlog is dropped");
    let stats = stack.stats();
    assert_eq!(stats.syn_dropped, 1);
    assert_eq!(stats.tcp_sockets, 2);
    // A retransmitted SYN of an admitted handshake reaches its socket (smoltcp answers it with
    // its own SYN|ACK retransmission timer), it neither opens a socket nor counts as dropped.
    let src = SocketAddr::new(B_V4.into(), 40000);
    run(&stack, now, vec![syn(src, dst, 5000)]);
    assert_eq!(stack.stats().tcp_sockets, 2);
    assert_eq!(stack.stats().syn_dropped, 1);
}

#[test]
fn dropping_listener_frees_its_sockets() {
    let (stack, now) = stack(config_a());
    let listener = stack.listen(80).unwrap();
    let dst = SocketAddr::new(A_V4.into(), 80);
    let out = run(
        &stack,
        now,
        vec![syn(SocketAddr::new(B_V4.into(), 40000), dst, 1)],
    );
    assert_eq!(out.len(), 1);
    assert_eq!(stack.stats().tcp_sockets, 1);
    drop(listener);
    // The half-open connection is reset and its socket reclaimed.
    let out = run(&stack, now, vec![]);
    assert_eq!(out.len(), 1);
    assert_eq!(parse_tcp(&out[0]).2.control, TcpControl::Rst);
    let stats = stack.stats();
    assert_eq!(
        (
            stats.tcp_sockets,
            stats.tcp_connections,
            stats.tcp_listeners
        ),
        (0, 0, 0)
    );
    // And the port is closed again.
    let out = run(
        &stack,
        now,
        vec![syn(SocketAddr::new(B_V4.into(), 40001), dst, 1)],
    );
    assert_eq!(parse_tcp(&out[0]).2.control, TcpControl::Rst);
}

#[test]
fn icmpv4_echo_is_answered() {
    let (stack, now) = stack(config_a());
    let data = b"ping payload 0123456789";
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 0x1234,
        seq_no: 7,
        data,
    };
    let (_, mut buf) = emit_ip(
        B_V4.into(),
        A_V4.into(),
        IpProtocol::Icmp,
        icmp.buffer_len(),
    );
    icmp.emit(
        &mut Icmpv4Packet::new_unchecked(ip_payload_mut(&mut buf)),
        &ChecksumCapabilities::default(),
    );
    let out = run(&stack, now, vec![buf]);
    assert_eq!(out.len(), 1);
    let ip = Ipv4Packet::new_checked(&out[0][..]).unwrap();
    assert_eq!((ip.src_addr(), ip.dst_addr()), (A_V4, B_V4));
    assert!(ip.verify_checksum());
    let reply = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert!(reply.verify_checksum());
    let repr = Icmpv4Repr::parse(&reply, &ChecksumCapabilities::default()).unwrap();
    assert_eq!(
        repr,
        Icmpv4Repr::EchoReply {
            ident: 0x1234,
            seq_no: 7,
            data
        }
    );
}

#[test]
fn icmpv6_echo_is_answered() {
    let (stack, now) = stack(config_a());
    let data = b"v6 ping";
    let icmp = Icmpv6Repr::EchoRequest {
        ident: 9,
        seq_no: 3,
        data,
    };
    let (_, mut buf) = emit_ip(
        B_V6.into(),
        A_V6.into(),
        IpProtocol::Icmpv6,
        icmp.buffer_len(),
    );
    icmp.emit(
        &B_V6,
        &A_V6,
        &mut Icmpv6Packet::new_unchecked(ip_payload_mut(&mut buf)),
        &ChecksumCapabilities::default(),
    );
    let out = run(&stack, now, vec![buf]);
    assert_eq!(out.len(), 1);
    let ip = Ipv6Packet::new_checked(&out[0][..]).unwrap();
    assert_eq!((ip.src_addr(), ip.dst_addr()), (A_V6, B_V6));
    let reply = Icmpv6Packet::new_checked(ip.payload()).unwrap();
    let repr = Icmpv6Repr::parse(&A_V6, &B_V6, &reply, &ChecksumCapabilities::default()).unwrap();
    assert_eq!(
        repr,
        Icmpv6Repr::EchoReply {
            ident: 9,
            seq_no: 3,
            data
        }
    );
}

#[test]
fn echo_to_foreign_address_is_ignored() {
    let (stack, now) = stack(config_a());
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 1,
        seq_no: 1,
        data: b"x",
    };
    let other = std::net::Ipv4Addr::new(100, 64, 0, 99);
    let (_, mut buf) = emit_ip(
        B_V4.into(),
        other.into(),
        IpProtocol::Icmp,
        icmp.buffer_len(),
    );
    icmp.emit(
        &mut Icmpv4Packet::new_unchecked(ip_payload_mut(&mut buf)),
        &ChecksumCapabilities::default(),
    );
    assert!(run(&stack, now, vec![buf]).is_empty());
}

#[tokio::test]
async fn connect_emits_syn_to_any_destination_and_cancel_frees_socket() {
    let (stack, now) = stack(config_a());
    // A destination outside every prefix of ours: the default routes send it to the device.
    let remote: SocketAddr = "100.100.1.2:443".parse().unwrap();
    let mut attempt = Box::pin(tokio::time::timeout(
        Duration::from_millis(1),
        stack.connect(remote),
    ));
    let mut q = PacketQueues::new();
    // Start the attempt, then poll the stack: the SYN goes out.
    assert!(futures_poll(&mut attempt).is_none());
    stack.poll(now, &mut q);
    assert_eq!(q.outbound.len(), 1);
    let (src, dst, tcp) = parse_tcp(&q.outbound[0]);
    assert_eq!((src, dst), (IpAddr::V4(A_V4), remote.ip()));
    assert_eq!(tcp.control, TcpControl::Syn);
    assert!((49152..=65535).contains(&tcp.src_port));
    assert!(tcp.window_scale.is_some());
    assert_eq!(stack.stats().tcp_sockets, 1);
    // The caller gives up: dropping the future resets the attempt and frees the socket.
    drop(attempt);
    q.outbound.clear();
    stack.poll(now, &mut q);
    assert_eq!(q.outbound.len(), 1);
    assert_eq!(parse_tcp(&q.outbound[0]).2.control, TcpControl::Rst);
    let stats = stack.stats();
    assert_eq!((stats.tcp_sockets, stats.tcp_connections), (0, 0));
}

/// Polls a future once with a no-op waker.
fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(f).poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

#[tokio::test]
async fn connect_without_address_of_family_fails_until_assigned() {
    let config = NetstackConfig {
        seed: 3,
        ..NetstackConfig::with_addresses(vec![A_V4.into()])
    };
    let (stack, now) = stack(config);
    let remote = SocketAddr::new(B_V6.into(), 80);
    assert_eq!(
        stack.connect(remote).await.unwrap_err(),
        tailnode_netstack::ConnectError::NoAddress
    );
    stack.set_addresses(vec![A_V4.into(), A_V6.into()]).unwrap();
    assert_eq!(stack.addresses(), vec![IpAddr::V4(A_V4), IpAddr::V6(A_V6)]);
    let mut attempt = Box::pin(stack.connect(remote));
    assert!(futures_poll(&mut attempt).is_none());
    let mut q = PacketQueues::new();
    stack.poll(now, &mut q);
    let (src, _, tcp) = parse_tcp(&q.outbound[0]);
    assert_eq!(src, IpAddr::V6(A_V6));
    assert_eq!(tcp.control, TcpControl::Syn);
    // Invalid addresses are refused without touching the configured ones.
    assert!(
        stack
            .set_addresses(vec!["224.0.0.1".parse().unwrap()])
            .is_err()
    );
    assert_eq!(stack.addresses().len(), 2);
}

#[test]
fn invalid_configs_are_refused() {
    let now = Instant::now();
    for bad in [
        NetstackConfig {
            mtu: 500,
            ..config_a()
        },
        NetstackConfig {
            tcp_rx_buffer: 0,
            ..config_a()
        },
        NetstackConfig {
            listen_backlog: 0,
            ..config_a()
        },
        NetstackConfig {
            addresses: vec!["0.0.0.0".parse().unwrap()],
            ..config_a()
        },
    ] {
        assert!(Netstack::new(bad, now).is_err());
    }
}

#[test]
fn udp_to_closed_port_gets_port_unreachable() {
    let (stack, now) = stack(config_a());
    // UDP header (8 bytes) + 4 bytes payload; checksum 0 is "none" for IPv4.
    let mut udp = vec![0u8; 12];
    udp[0..2].copy_from_slice(&5000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&53u16.to_be_bytes());
    udp[4..6].copy_from_slice(&12u16.to_be_bytes());
    let (_, mut buf) = emit_ip(B_V4.into(), A_V4.into(), IpProtocol::Udp, udp.len());
    ip_payload_mut(&mut buf).copy_from_slice(&udp);
    let out = run(&stack, now, vec![buf]);
    assert_eq!(out.len(), 1);
    let ip = Ipv4Packet::new_checked(&out[0][..]).unwrap();
    assert_eq!(ip.next_header(), IpProtocol::Icmp);
    let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert_eq!(
        icmp.msg_type(),
        smoltcp::wire::Icmpv4Message::DstUnreachable
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Garbage and damaged packets never panic the stack and leave it able to work.
    #[test]
    fn garbage_never_panics(
        packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 1..16),
        damage in proptest::collection::vec((0usize..60, any::<u8>()), 0..6),
        cut in 0usize..80,
        v6 in any::<bool>(),
    ) {
        let (stack, now) = stack(config_a());
        let _listener = stack.listen(80).unwrap();
        let _udp = stack.bind_udp(Some(53)).unwrap();
        let (src, dst): (IpAddr, IpAddr) = if v6 { (B_V6.into(), A_V6.into()) } else { (B_V4.into(), A_V4.into()) };
        let mut damaged = syn(SocketAddr::new(src, 40000), SocketAddr::new(dst, 80), 1);
        for (at, value) in damage {
            if let Some(b) = damaged.get_mut(at) { *b = value; }
        }
        damaged.truncate(cut.max(1));
        let mut inbound = packets;
        // Random bytes that claim to be IPv4 / IPv6 get further into the parsers.
        for (i, p) in inbound.iter_mut().enumerate() {
            if let Some(b) = p.first_mut() { *b = (*b & 0x0f) | if i % 2 == 0 { 0x40 } else { 0x60 }; }
        }
        inbound.push(damaged);
        let _ = run(&stack, now, inbound);
        // Still alive: a valid SYN is answered.
        let out = run(&stack, now, vec![syn(SocketAddr::new(src, 40001), SocketAddr::new(dst, 80), 1)]);
        prop_assert_eq!(out.len(), 1);
        prop_assert_eq!(parse_tcp(&out[0]).2.control, TcpControl::Syn);
    }
}
