//! ICMP echo sockets on two netstacks back to back in memory (`testing::Pair`).
#![allow(clippy::unwrap_used, missing_docs)]

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tailnode_netstack::testing::{A_V4, A_V6, B_V4, B_V6, Direction, Pair};
use tailnode_netstack::{IcmpBindError, IcmpSocket, NetstackConfig};

/// Bound on every wait for a reply that must come (real time; the in-memory link answers in
/// microseconds).
const MUST_ARRIVE: Duration = Duration::from_secs(10);

async fn reply(sock: &IcmpSocket) -> (tailnode_netstack::EchoReply, Vec<u8>) {
    let mut buf = vec![0u8; 2048];
    let r = tokio::time::timeout(MUST_ARRIVE, sock.recv_reply(&mut buf))
        .await
        .expect("echo reply within the bound")
        .unwrap();
    buf.truncate(r.len.min(buf.len()));
    (r, buf)
}

/// Byte offset of the ICMP header in an IP packet without options/extensions.
fn icmp_offset(packet: &[u8]) -> usize {
    if packet[0] >> 4 == 4 { 20 } else { 40 }
}

/// Whether `packet` is an ICMP/ICMPv6 echo reply; returns its sequence number.
fn echo_reply_seq(packet: &[u8]) -> Option<u16> {
    let at = icmp_offset(packet);
    let v4 = packet[0] >> 4 == 4;
    let proto = if v4 { packet[9] } else { packet[6] };
    let reply = if v4 { (1, 0) } else { (58, 129) };
    (proto == reply.0 && packet.get(at) == Some(&reply.1))
        .then(|| u16::from_be_bytes([packet[at + 6], packet[at + 7]]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_round_trips_over_ipv4_and_ipv6() {
    let pair = Pair::start().unwrap();
    let sock = pair.a.bind_icmp(None).unwrap();
    assert_eq!(pair.a.stats().icmp_sockets, 1);
    for (seq, dst) in [(1u16, IpAddr::V4(B_V4)), (2, IpAddr::V6(B_V6))] {
        let payload: Vec<u8> = (0..56u8).map(|i| i ^ seq as u8).collect();
        sock.send_echo(dst, seq, &payload).await.unwrap();
        let (r, data) = reply(&sock).await;
        assert_eq!(r.from, dst);
        assert_eq!(r.seq, seq);
        assert_eq!(r.len, payload.len());
        assert_eq!(data, payload, "the peer echoes the payload");
    }
    // A payload larger than the buffer is reported with its full length and truncated.
    sock.send_echo(IpAddr::V4(B_V4), 3, &[7u8; 1000])
        .await
        .unwrap();
    let mut small = [0u8; 10];
    let r = tokio::time::timeout(MUST_ARRIVE, sock.recv_reply(&mut small))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((r.seq, r.len, small), (3, 1000, [7u8; 10]));
    drop(sock);
    pair.wait_until("the socket is released", |p| p.a.stats().icmp_sockets == 0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_reach_only_the_socket_with_their_identifier() {
    let pair = Pair::start().unwrap();
    let one = pair.a.bind_icmp(Some(100)).unwrap();
    let two = pair.a.bind_icmp(Some(200)).unwrap();
    assert_eq!((one.ident(), two.ident()), (100, 200));
    assert_eq!(
        pair.a.bind_icmp(Some(100)).unwrap_err(),
        IcmpBindError::InUse(100)
    );
    for seq in 1..=3 {
        one.send_echo(IpAddr::V4(B_V4), seq, b"one").await.unwrap();
        assert_eq!(reply(&one).await.0.seq, seq);
    }
    // If `two` had been handed any of `one`'s replies, it would read them before its own.
    two.send_echo(IpAddr::V6(B_V6), 77, b"two").await.unwrap();
    let (r, data) = reply(&two).await;
    assert_eq!(
        (r.seq, r.from, data.as_slice()),
        (77, IpAddr::V6(B_V6), &b"two"[..])
    );
}

/// An echo reply from `src` to `dst`, built with smoltcp's wire types (valid checksums).
fn echo_reply(src: IpAddr, dst: IpAddr, ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv4Packet, Ipv4Repr,
        Ipv6Packet, Ipv6Repr,
    };
    let caps = ChecksumCapabilities::default();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let icmp = Icmpv4Repr::EchoReply {
                ident,
                seq_no,
                data,
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
            let icmp = Icmpv6Repr::EchoReply {
                ident,
                seq_no,
                data,
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
        _ => panic!("mixed address families"),
    }
}

/// Driven by hand (no driver task): forged replies go straight into the inbound queue, and the
/// socket is polled with a no-op waker, so "nothing arrived" is checked without any waiting.
#[test]
fn replies_with_a_foreign_identifier_or_destination_are_ignored() {
    use std::task::{Context, Poll, Waker};
    use std::time::Instant;
    use tailnode_netstack::{Netstack, PacketQueues};

    let now = Instant::now();
    let stack = Netstack::new(Pair::configs().0, now).unwrap();
    let sock = stack.bind_icmp(Some(0x1234)).unwrap();
    let mut queues = PacketQueues::new();
    let mut cx = Context::from_waker(Waker::noop());
    let mut buf = [0u8; 64];
    let mut pending =
        |sock: &IcmpSocket| matches!(sock.poll_recv_reply(&mut cx, &mut buf), Poll::Pending);
    for (ours, peer, elsewhere) in [
        (
            IpAddr::V4(A_V4),
            IpAddr::V4(B_V4),
            IpAddr::V4(Ipv4Addr::new(100, 64, 0, 99)),
        ),
        (
            IpAddr::V6(A_V6),
            IpAddr::V6(B_V6),
            "fd7a:115c:a1e0::99".parse().unwrap(),
        ),
    ] {
        // The request leaves from our address of the family, with the socket's identifier.
        let mut sent = false;
        let waker_cx = &mut Context::from_waker(Waker::noop());
        assert!(sock.poll_send_echo(waker_cx, peer, 9, b"ping").is_ready());
        stack.poll(now, &mut queues);
        while let Some(p) = queues.outbound.pop_front() {
            let at = icmp_offset(&p);
            let src: IpAddr = if ours.is_ipv4() {
                Ipv4Addr::new(p[12], p[13], p[14], p[15]).into()
            } else {
                std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&p[8..24]).unwrap()).into()
            };
            assert_eq!(src, ours);
            assert_eq!(u16::from_be_bytes([p[at + 4], p[at + 5]]), 0x1234);
            sent = true;
        }
        assert!(sent, "an echo request went out");
        // Another identifier, another destination: not for this socket.
        queues
            .inbound
            .push_back(echo_reply(peer, ours, 0x4321, 9, b"ping"));
        queues
            .inbound
            .push_back(echo_reply(peer, elsewhere, 0x1234, 9, b"ping"));
        stack.poll(now, &mut queues);
        assert!(queues.outbound.is_empty(), "replies are never answered");
        assert!(pending(&sock), "a foreign reply reached the socket");
        // The genuine reply does.
        queues
            .inbound
            .push_back(echo_reply(peer, ours, 0x1234, 9, b"ping"));
        stack.poll(now, &mut queues);
        match sock.poll_recv_reply(&mut Context::from_waker(Waker::noop()), &mut [0u8; 8]) {
            Poll::Ready(Ok(r)) => assert_eq!((r.from, r.seq, r.len), (peer, 9, 4)),
            other => panic!("expected the reply, got {other:?}"),
        }
        assert!(pending(&sock));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_requests_are_answered_even_when_a_socket_holds_their_identifier() {
    let pair = Pair::start().unwrap();
    let on_a = pair.a.bind_icmp(Some(4242)).unwrap();
    let on_b = pair.b.bind_icmp(Some(4242)).unwrap();
    for dst in [IpAddr::V4(B_V4), IpAddr::V6(B_V6)] {
        on_a.send_echo(dst, 1, b"from a").await.unwrap();
        let (r, _) = reply(&on_a).await;
        assert_eq!((r.from, r.seq), (dst, 1));
    }
    // B's socket saw neither request: its first message is the reply to its own ping.
    on_b.send_echo(IpAddr::V4(A_V4), 50, b"from b")
        .await
        .unwrap();
    let (r, data) = reply(&on_b).await;
    assert_eq!(
        (r.from, r.seq, data.as_slice()),
        (IpAddr::V4(A_V4), 50, &b"from b"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_reply_is_the_callers_timeout_and_later_replies_still_arrive() {
    let pair = Pair::start().unwrap();
    let sock = pair.a.bind_icmp(None).unwrap();
    // Lose B's replies to sequence 1 (both families); everything else passes.
    pair.set_filter(Some(Box::new(|dir, packet: &[u8]| {
        !(dir == Direction::BToA && echo_reply_seq(packet) == Some(1))
    })));
    for dst in [IpAddr::V4(B_V4), IpAddr::V6(B_V6)] {
        sock.send_echo(dst, 1, b"lost").await.unwrap();
        let mut buf = [0u8; 64];
        let waited = tokio::time::timeout(Duration::from_millis(200), sock.recv_reply(&mut buf));
        assert!(waited.await.is_err(), "no reply may arrive for {dst}");
        // The next echo is answered, and it is the first thing the socket reads.
        sock.send_echo(dst, 2, b"kept").await.unwrap();
        let (r, data) = reply(&sock).await;
        assert_eq!((r.from, r.seq, data.as_slice()), (dst, 2, &b"kept"[..]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_can_ping_its_own_addresses() {
    let pair = Pair::start().unwrap();
    let sock = pair.a.bind_icmp(None).unwrap();
    for dst in [IpAddr::V4(A_V4), IpAddr::V6(A_V6)] {
        sock.send_echo(dst, 5, b"self").await.unwrap();
        let (r, _) = reply(&sock).await;
        assert_eq!((r.from, r.seq), (dst, 5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_destinations_and_payloads_are_refused() {
    let (a, b) = Pair::configs();
    let a = NetstackConfig {
        addresses: vec![IpAddr::V4(A_V4)],
        ..a
    };
    let pair = Pair::with_configs(a, b).unwrap();
    let sock = pair.a.bind_icmp(None).unwrap();
    let kind = |r: io::Result<()>| r.unwrap_err().kind();
    assert_eq!(
        kind(sock.send_echo(IpAddr::V6(B_V6), 1, b"x").await),
        io::ErrorKind::AddrNotAvailable,
        "no IPv6 address on A"
    );
    for dst in ["0.0.0.0", "224.0.0.1", "255.255.255.255", "ff02::1", "::"] {
        assert_eq!(
            kind(sock.send_echo(dst.parse().unwrap(), 1, b"x").await),
            io::ErrorKind::InvalidInput,
            "{dst}"
        );
    }
    let max = pair_mtu() - 20 - 8;
    assert_eq!(
        kind(
            sock.send_echo(IpAddr::V4(B_V4), 1, &vec![0u8; max + 1])
                .await
        ),
        io::ErrorKind::InvalidInput
    );
    sock.send_echo(IpAddr::V4(B_V4), 1, &vec![1u8; max])
        .await
        .unwrap();
    let (r, _) = reply(&sock).await;
    assert_eq!((r.seq, r.len), (1, max));
}

fn pair_mtu() -> usize {
    Pair::configs().0.mtu
}
