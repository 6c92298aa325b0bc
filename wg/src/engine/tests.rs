//! Engine tests: in-memory networks of engines (see `crate::testing`).

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::testing::{PROTO_TEST, TestNet, ipv4_packet, ipv6_packet, udp_packet};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn msg_type(payload: &[u8]) -> u8 {
    payload[0]
}

fn key_of(t: &TestNet, i: usize) -> PublicKey {
    t.nodes[i].public_key()
}

#[test]
fn handshake_then_packets_both_ways_ipv4_and_ipv6() {
    let mut t = TestNet::new(2, 1);
    let (k0, k1) = (key_of(&t, 0), key_of(&t, 1));

    // First packet: no session, so a handshake initiation goes out and the
    // packet waits inside the engine.
    let first = t.v4_packet(0, 1, b"first");
    let outcome = t.send_ip(0, &first);
    assert!(matches!(outcome, PacketOutcome::Transmit { dst, .. } if dst == t.nodes[1].endpoint));
    assert_eq!(msg_type(&t.in_flight[0].payload), MSG_INIT);
    assert_eq!(t.in_flight[0].payload.len(), HANDSHAKE_INIT_LEN);
    // A second packet while the handshake is in flight is queued.
    let second = t.v6_packet(0, 1, b"second");
    assert_eq!(t.send_ip(0, &second), PacketOutcome::Queued);

    // init -> response -> keepalive + the two flushed packets.
    let delivered = t.run();
    assert_eq!(delivered, 5);
    assert_eq!(
        t.nodes[1].delivered,
        vec![(k0, first.clone()), (k0, second.clone())]
    );
    let ep0 = t.nodes[0].endpoint;
    let ep1 = t.nodes[1].endpoint;
    assert_eq!(
        t.nodes[0].events,
        vec![Event::HandshakeCompleted {
            peer: k1,
            endpoint: ep1,
            initiator: true
        }]
    );
    assert_eq!(
        t.nodes[1].events,
        vec![Event::HandshakeCompleted {
            peer: k0,
            endpoint: ep0,
            initiator: false
        }]
    );

    // Replies flow the other way on the established session, v4 and v6.
    for packet in [t.v4_packet(1, 0, b"pong4"), t.v6_packet(1, 0, b"pong6")] {
        let outcome = t.send_ip(1, &packet);
        let PacketOutcome::Transmit { dst, len } = outcome else {
            panic!("expected transmit, got {outcome:?}");
        };
        assert_eq!(dst, ep0);
        assert_eq!(len, packet.len() + DATA_OVERHEAD);
        assert_eq!(msg_type(&t.in_flight[0].payload), MSG_DATA);
        t.run();
        assert_eq!(t.nodes[0].delivered.pop(), Some((k1, packet)));
    }

    // Statistics on both sides.
    let s0 = t.nodes[0].engine.peer_stats(&k1, t.now).unwrap();
    assert_eq!(s0.endpoint, Some(ep1));
    assert_eq!(s0.last_handshake, Some(t.now));
    assert!(s0.has_session);
    assert_eq!(s0.tx_packets, 4, "init, keepalive, two flushed packets");
    assert_eq!(s0.rx_packets, 3, "response and two data packets");
    let s1 = t.nodes[1].engine.peer_stats(&k0, t.now).unwrap();
    assert_eq!(s1.rx_packets, 4);
    assert_eq!(s1.tx_packets, 3);
    assert_eq!(s1.rx_bytes, s0.tx_bytes);
    assert_eq!(s1.tx_bytes, s0.rx_bytes);
    assert_eq!(t.nodes[1].engine.stats().packets_delivered, 2);
    assert_eq!(t.nodes[1].engine.stats().dropped_total(), 0);
}

#[test]
fn real_udp_packets_pass_unchanged() {
    let mut t = TestNet::new(2, 2);
    let src = SocketAddr::new(t.nodes[0].ipv6.into(), 4000);
    let dst = SocketAddr::new(t.nodes[1].ipv6.into(), 53);
    let packet = udp_packet(src, dst, &[7u8; 1200]);
    let _ = t.send_ip(0, &packet);
    t.run();
    assert_eq!(t.nodes[1].delivered.len(), 1);
    assert_eq!(t.nodes[1].delivered[0].1, packet);
}

#[test]
fn many_peers_full_mesh() {
    let n = 12;
    let mut t = TestNet::new(n, 3);
    for i in 0..n {
        for j in 0..n {
            if i != j {
                assert!(t.connect(i, j), "{i} -> {j}");
            }
        }
    }
    for node in &t.nodes {
        assert_eq!(node.engine.peer_count(), n - 1);
        for stats in node.engine.peers(t.now) {
            assert!(stats.has_session);
        }
    }
}

#[test]
fn longest_prefix_match_with_overlaps_and_moves() {
    let mut t = TestNet::unconnected(5, 4);
    let keys: Vec<PublicKey> = (0..5).map(|i| key_of(&t, i)).collect();
    let now = t.now;
    let e = &mut t.nodes[0].engine;
    let add = |e: &mut Engine, k: PublicKey, nets: &[&str]| {
        let change = e
            .upsert_peer(
                PeerConfig::new(k, nets.iter().map(|s| net(s)).collect()),
                now,
            )
            .unwrap();
        assert_eq!(change, PeerChange::Added);
    };
    add(e, keys[1], &["10.0.0.0/8", "::/0"]);
    add(e, keys[2], &["10.1.0.0/16", "fd00::/8"]);
    add(e, keys[3], &["10.1.2.3/32", "fd00::1/128"]);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(e.route(ip("10.1.2.3")), Some(keys[3]));
    assert_eq!(e.route(ip("10.1.2.4")), Some(keys[2]));
    assert_eq!(e.route(ip("10.200.0.1")), Some(keys[1]));
    assert_eq!(e.route(ip("192.168.1.1")), None);
    assert_eq!(e.route(ip("fd00::1")), Some(keys[3]));
    assert_eq!(e.route(ip("fd00::2")), Some(keys[2]));
    assert_eq!(e.route(ip("2001:db8::1")), Some(keys[1]));

    // An identical prefix moves to the peer that claims it last.
    add(e, keys[4], &["10.1.0.0/16"]);
    assert_eq!(e.route(ip("10.1.2.4")), Some(keys[4]));
    let s2 = e.peer_stats(&keys[2], now).unwrap();
    assert_eq!(s2.allowed_ips, vec![net("fd00::/8")]);
    // Removing the new owner does not give it back (as in wg).
    assert!(e.remove_peer(&keys[4]));
    assert_eq!(e.route(ip("10.1.2.4")), Some(keys[1]));

    // Outgoing packets follow the routes; outside them there is no route.
    let mut out = vec![0u8; MAX_DATAGRAM];
    let p = ipv4_packet(
        Ipv4Addr::new(100, 64, 0, 1),
        Ipv4Addr::new(192, 168, 1, 1),
        PROTO_TEST,
        b"x",
    );
    assert_eq!(
        e.handle_ip_packet(&p, &mut out, now),
        PacketOutcome::NoRoute
    );
    let p = ipv4_packet(
        Ipv4Addr::new(100, 64, 0, 1),
        Ipv4Addr::new(10, 1, 2, 3),
        PROTO_TEST,
        b"x",
    );
    assert_eq!(
        e.handle_ip_packet(&p, &mut out, now),
        PacketOutcome::NoEndpoint { peer: keys[3] }
    );
}

#[test]
fn spoofed_source_is_dropped() {
    let mut t = TestNet::new(3, 5);
    assert!(t.connect(0, 1));
    // Node 0 sends a packet claiming node 2's address (which node 1 routes to node 2).
    let spoofed = ipv4_packet(t.nodes[2].ipv4, t.nodes[1].ipv4, PROTO_TEST, b"evil");
    let _ = t.send_ip(0, &spoofed);
    t.run();
    assert!(t.nodes[1].delivered.is_empty());
    assert_eq!(
        t.nodes[1].outcomes.last(),
        Some(&DatagramOutcome::Dropped(DropReason::SpoofedSource))
    );
    // And a source outside every allowed IP.
    let spoofed = ipv6_packet(
        "2001:db8::1".parse().unwrap(),
        t.nodes[1].ipv6,
        PROTO_TEST,
        b"evil",
    );
    let _ = t.send_ip(0, &spoofed);
    t.run();
    assert!(t.nodes[1].delivered.is_empty());
    assert_eq!(
        t.nodes[1].engine.stats().dropped(DropReason::SpoofedSource),
        2
    );
}

#[test]
fn initiation_from_unknown_key_is_dropped() {
    let mut t = TestNet::unconnected(2, 6);
    // Node 1 knows node 0; node 0 does not know node 1.
    let peer0 = t.nodes[0].as_peer();
    let now = t.now;
    t.nodes[1].engine.upsert_peer(peer0, now).unwrap();
    let packet = t.v4_packet(1, 0, b"hello");
    let _ = t.send_ip(1, &packet);
    assert_eq!(t.run(), 1);
    assert_eq!(
        t.nodes[0].outcomes,
        vec![DatagramOutcome::Dropped(DropReason::UnknownPeer)]
    );
    assert_eq!(
        t.nodes[0].engine.stats().dropped(DropReason::UnknownPeer),
        1
    );
    assert!(t.nodes[0].events.is_empty());
}

#[test]
fn replayed_data_packet_is_dropped() {
    let mut t = TestNet::new(2, 7);
    assert!(t.connect(0, 1));
    let packet = t.v4_packet(0, 1, b"once");
    let _ = t.send_ip(0, &packet);
    let datagram = t.in_flight.front().cloned().unwrap();
    t.run();
    assert_eq!(t.nodes[1].delivered.len(), 1);
    let outcome = t.deliver(1, datagram.from, &datagram.payload);
    assert_eq!(outcome, DatagramOutcome::Dropped(DropReason::Replay));
    assert_eq!(t.nodes[1].delivered.len(), 1);
    assert_eq!(t.nodes[1].engine.stats().dropped(DropReason::Replay), 1);
}

#[test]
fn replayed_handshake_initiation_is_dropped() {
    let mut t = TestNet::new(2, 8);
    let packet = t.v4_packet(0, 1, b"x");
    let _ = t.send_ip(0, &packet);
    let init = t.in_flight.front().cloned().unwrap();
    t.run();
    let outcome = t.deliver(1, init.from, &init.payload);
    assert_eq!(outcome, DatagramOutcome::Dropped(DropReason::Replay));
}

#[test]
fn updating_a_peer_keeps_its_session() {
    let mut t = TestNet::new(2, 9);
    assert!(t.connect(0, 1));
    let k1 = key_of(&t, 1);
    let now = t.now;
    let mut config = t.nodes[1].as_peer();
    assert_eq!(
        t.nodes[0].engine.upsert_peer(config.clone(), now),
        Ok(PeerChange::Unchanged)
    );
    config.allowed_ips.push(net("10.9.0.0/24"));
    config.persistent_keepalive = Some(25);
    assert_eq!(
        t.nodes[0].engine.upsert_peer(config.clone(), now),
        Ok(PeerChange::Updated)
    );
    // Host bits and order do not matter for "unchanged".
    config.allowed_ips.reverse();
    config.allowed_ips[0] = net("10.9.0.77/24");
    assert_eq!(
        t.nodes[0].engine.upsert_peer(config, now),
        Ok(PeerChange::Unchanged)
    );
    // The next packet is data on the existing session: no handshake.
    let packet = ipv4_packet(
        t.nodes[0].ipv4,
        Ipv4Addr::new(10, 9, 0, 1),
        PROTO_TEST,
        b"x",
    );
    assert!(matches!(
        t.send_ip(0, &packet),
        PacketOutcome::Transmit { .. }
    ));
    assert_eq!(msg_type(&t.in_flight[0].payload), MSG_DATA);
    t.nodes[0].events.clear();
    t.run();
    assert!(t.nodes[0].events.is_empty());
    let stats = t.nodes[0].engine.peer_stats(&k1, now).unwrap();
    assert_eq!(stats.persistent_keepalive, Some(25));
    assert!(stats.allowed_ips.contains(&net("10.9.0.0/24")));
}

#[test]
fn changing_the_preshared_key_rebuilds_the_session() {
    let mut t = TestNet::new(2, 10);
    assert!(t.connect(0, 1));
    let now = t.now;
    let psk = PresharedKey::from_bytes([9; 32]);
    let mut c1 = t.nodes[1].as_peer();
    c1.preshared_key = Some(psk.clone());
    let mut c0 = t.nodes[0].as_peer();
    c0.preshared_key = Some(psk);
    assert_eq!(
        t.nodes[0].engine.upsert_peer(c1, now),
        Ok(PeerChange::Rebuilt)
    );
    assert_eq!(
        t.nodes[1].engine.upsert_peer(c0, now),
        Ok(PeerChange::Rebuilt)
    );
    let packet = t.v4_packet(0, 1, b"after psk");
    let _ = t.send_ip(0, &packet);
    assert_eq!(msg_type(&t.in_flight[0].payload), MSG_INIT);
    t.run();
    assert_eq!(t.nodes[1].delivered.last().map(|d| &d.1), Some(&packet));
}

#[test]
fn mismatched_preshared_keys_never_deliver() {
    let mut t = TestNet::new(2, 11);
    let now = t.now;
    let mut c1 = t.nodes[1].as_peer();
    c1.preshared_key = Some(PresharedKey::from_bytes([1; 32]));
    let _ = t.nodes[0].engine.upsert_peer(c1, now).unwrap();
    assert!(!t.connect(0, 1));
    // The preshared key enters the handshake at the response, which the
    // initiator cannot authenticate.
    assert_eq!(
        t.nodes[0].outcomes,
        vec![DatagramOutcome::Dropped(DropReason::AuthenticationFailed)]
    );
    assert!(t.nodes[0].events.is_empty());
}

#[test]
fn removed_peer_is_neither_routed_nor_accepted() {
    let mut t = TestNet::new(2, 12);
    assert!(t.connect(0, 1));
    let k0 = key_of(&t, 0);
    let k1 = key_of(&t, 1);
    assert!(t.nodes[0].engine.remove_peer(&k1));
    assert!(!t.nodes[0].engine.remove_peer(&k1));
    assert_eq!(t.nodes[0].engine.route(t.nodes[1].ipv4.into()), None);
    let packet = t.v4_packet(0, 1, b"x");
    assert_eq!(t.send_ip(0, &packet), PacketOutcome::NoRoute);
    assert!(t.nodes[0].engine.peer_stats(&k1, t.now).is_none());
    // Data from the removed peer is for an unknown index now.
    let packet = t.v4_packet(1, 0, b"y");
    let _ = t.send_ip(1, &packet);
    t.run();
    assert_eq!(
        t.nodes[0].outcomes.last(),
        Some(&DatagramOutcome::Dropped(DropReason::UnknownIndex))
    );
    // The slot is reused cleanly by the next peer.
    let now = t.now;
    let c1 = t.nodes[1].as_peer();
    assert_eq!(
        t.nodes[0].engine.upsert_peer(c1, now),
        Ok(PeerChange::Added)
    );
    assert!(t.nodes[1].engine.reset_peer(&k0, now));
    assert!(t.connect(0, 1));
}

#[test]
fn reset_peer_forces_a_new_handshake() {
    let mut t = TestNet::new(2, 13);
    assert!(t.connect(0, 1));
    let k1 = key_of(&t, 1);
    let now = t.now;
    assert!(t.nodes[0].engine.reset_peer(&k1, now));
    let stats = t.nodes[0].engine.peer_stats(&k1, now).unwrap();
    assert_eq!(stats.last_handshake, None);
    assert!(!stats.has_session);
    assert_eq!(stats.endpoint, Some(t.nodes[1].endpoint), "endpoint kept");
    t.nodes[0].events.clear();
    let packet = t.v4_packet(0, 1, b"again");
    let _ = t.send_ip(0, &packet);
    assert_eq!(msg_type(&t.in_flight[0].payload), MSG_INIT);
    t.run();
    assert_eq!(t.nodes[1].delivered.last().map(|d| &d.1), Some(&packet));
    assert!(matches!(
        t.nodes[0].events.as_slice(),
        [Event::HandshakeCompleted {
            initiator: true,
            ..
        }]
    ));
    assert!(
        !t.nodes[0]
            .engine
            .reset_peer(&PublicKey::from_bytes([3; 32]), now)
    );
}

#[test]
fn endpoint_roams_to_source_of_authenticated_packets() {
    let mut t = TestNet::new(2, 14);
    assert!(t.connect(0, 1));
    let k0 = key_of(&t, 0);
    t.nodes[1].events.clear();
    let roamed: SocketAddr = "198.51.100.7:4000".parse().unwrap();
    t.nodes[0].endpoint = roamed;
    let packet = t.v4_packet(0, 1, b"from elsewhere");
    let _ = t.send_ip(0, &packet);
    t.run();
    assert_eq!(
        t.nodes[1].events,
        vec![Event::EndpointChanged {
            peer: k0,
            endpoint: roamed
        }]
    );
    assert_eq!(
        t.nodes[1].engine.peer_stats(&k0, t.now).unwrap().endpoint,
        Some(roamed)
    );
    // Replies go to the new address.
    let reply = t.v4_packet(1, 0, b"back");
    assert!(matches!(
        t.send_ip(1, &reply),
        PacketOutcome::Transmit { dst, .. } if dst == roamed
    ));
    t.run();
    assert_eq!(t.nodes[0].delivered.last().map(|d| &d.1), Some(&reply));

    // An unauthenticated datagram from a third address does not move it,
    // and an IPv4-mapped source is the same endpoint as plain IPv4.
    let mut garbage = vec![4u8, 0, 0, 0];
    garbage.extend_from_slice(&[0xee; 60]);
    let _ = t.deliver(1, "203.0.113.1:1".parse().unwrap(), &garbage);
    let mapped: SocketAddr = "[::ffff:198.51.100.7]:4000".parse().unwrap();
    let packet = t.v4_packet(0, 1, b"mapped");
    let _ = t.send_ip(0, &packet);
    let datagram = t.in_flight.pop_front().unwrap();
    let _ = t.deliver(1, mapped, &datagram.payload);
    assert_eq!(t.nodes[1].events.len(), 1, "no further EndpointChanged");
    assert_eq!(
        t.nodes[1].engine.peer_stats(&k0, t.now).unwrap().endpoint,
        Some(roamed)
    );
}

#[test]
fn endpoint_is_learned_from_an_initiation() {
    let mut t = TestNet::unconnected(2, 15);
    let now = t.now;
    let k1 = key_of(&t, 1);
    let mut c1 = t.nodes[1].as_peer();
    c1.endpoint = None;
    t.nodes[0].engine.upsert_peer(c1, now).unwrap();
    let c0 = t.nodes[0].as_peer();
    t.nodes[1].engine.upsert_peer(c0, now).unwrap();
    let packet = t.v4_packet(0, 1, b"x");
    assert_eq!(
        t.send_ip(0, &packet),
        PacketOutcome::NoEndpoint { peer: k1 }
    );
    assert!(t.connect(1, 0));
    assert!(t.nodes[0].events.contains(&Event::EndpointChanged {
        peer: k1,
        endpoint: t.nodes[1].endpoint
    }));
    assert!(t.connect(0, 1));
}

#[test]
fn persistent_keepalive_runs_on_engine_time() {
    let mut t = TestNet::new(2, 16);
    assert!(t.connect(0, 1));
    let now = t.now;
    let mut c1 = t.nodes[1].as_peer();
    c1.persistent_keepalive = Some(25);
    assert_eq!(
        t.nodes[0].engine.upsert_peer(c1, now),
        Ok(PeerChange::Updated)
    );
    let keepalives = |t: &TestNet| {
        t.nodes[1]
            .outcomes
            .iter()
            .filter(|o| **o == DatagramOutcome::Done)
            .count()
    };
    let before = keepalives(&t);
    t.advance(Duration::from_secs(24));
    assert_eq!(keepalives(&t), before, "nothing before the interval");
    t.advance(Duration::from_millis(1500));
    assert_eq!(keepalives(&t), before + 1, "one keepalive after 25 s");
    t.advance(Duration::from_secs(25));
    assert_eq!(keepalives(&t), before + 2);
    // Traffic postpones it.
    t.advance(Duration::from_secs(20));
    assert!(t.connect(0, 1));
    t.advance(Duration::from_secs(20));
    assert_eq!(keepalives(&t), before + 2);
}

#[test]
fn persistent_keepalive_starts_a_handshake() {
    let mut t = TestNet::new(2, 17);
    let now = t.now;
    let mut c1 = t.nodes[1].as_peer();
    c1.persistent_keepalive = Some(10);
    let _ = t.nodes[0].engine.upsert_peer(c1, now).unwrap();
    t.advance(TIMER_TICK);
    assert!(matches!(
        t.nodes[0].events.as_slice(),
        [Event::HandshakeCompleted {
            initiator: true,
            ..
        }]
    ));
    assert!(matches!(
        t.nodes[1].events.as_slice(),
        [Event::HandshakeCompleted {
            initiator: false,
            ..
        }]
    ));
}

#[test]
fn timeouts_follow_the_tick() {
    let t = TestNet::new(2, 18);
    let mut e = t.nodes.into_iter().next().unwrap().engine;
    let start = t.now;
    let (deadline, reason) = e.poll_timeout().unwrap();
    assert_eq!(deadline, start + TIMER_TICK);
    assert_eq!(reason, "wireguard timers");
    e.handle_timeout(start + Duration::from_millis(100));
    assert_eq!(e.poll_timeout().unwrap().0, deadline, "not due yet");
    e.handle_timeout(deadline);
    assert_eq!(e.poll_timeout().unwrap().0, deadline + TIMER_TICK);
    // Fresh peers with no traffic produce nothing.
    let mut out = vec![0u8; MAX_DATAGRAM];
    assert_eq!(e.poll_transmit(&mut out), None);
    assert_eq!(e.poll_event(), None);
}

#[test]
fn small_buffers_are_refused_not_panicked_on() {
    let mut t = TestNet::new(2, 19);
    assert!(t.connect(0, 1));
    let now = t.now;
    let packet = t.v4_packet(0, 1, &[0u8; 500]);
    let mut small = vec![0u8; 500];
    assert_eq!(
        t.nodes[0].engine.handle_ip_packet(&packet, &mut small, now),
        PacketOutcome::Dropped(DropReason::BufferTooSmall)
    );
    let mut out = vec![0u8; MAX_DATAGRAM];
    let PacketOutcome::Transmit { len, .. } =
        t.nodes[0].engine.handle_ip_packet(&packet, &mut out, now)
    else {
        panic!("expected transmit");
    };
    let mut tiny = vec![0u8; 100];
    let from = t.nodes[0].endpoint;
    assert_eq!(
        t.nodes[1]
            .engine
            .handle_datagram(from, &out[..len], &mut tiny, now),
        DatagramOutcome::Dropped(DropReason::BufferTooSmall)
    );
    assert_eq!(
        t.nodes[1]
            .engine
            .stats()
            .dropped(DropReason::BufferTooSmall),
        1
    );
}

#[test]
fn queued_packets_larger_than_the_poll_buffer_are_dropped_not_stuck() {
    let mut t = TestNet::new(2, 20);
    let now = t.now;
    let big = t.v4_packet(0, 1, &[1u8; 1000]);
    let mut out = vec![0u8; MAX_DATAGRAM];
    let PacketOutcome::Transmit { len, .. } =
        t.nodes[0].engine.handle_ip_packet(&big, &mut out, now)
    else {
        panic!("expected handshake initiation");
    };
    let init = out[..len].to_vec();
    let from0 = t.nodes[0].endpoint;
    let from1 = t.nodes[1].endpoint;
    let DatagramOutcome::Reply { len, .. } = t.nodes[1]
        .engine
        .handle_datagram(from0, &init, &mut out, now)
    else {
        panic!("expected response");
    };
    let response = out[..len].to_vec();
    let DatagramOutcome::Reply { .. } = t.nodes[0]
        .engine
        .handle_datagram(from1, &response, &mut out, now)
    else {
        panic!("expected keepalive");
    };
    let mut small = vec![0u8; 200];
    assert_eq!(t.nodes[0].engine.poll_transmit(&mut small), None);
    assert_eq!(
        t.nodes[0]
            .engine
            .stats()
            .dropped(DropReason::BufferTooSmall),
        1
    );
    assert_eq!(t.nodes[0].engine.poll_transmit(&mut out), None);
}

#[test]
fn cookie_reply_under_load() {
    let mut t = TestNet::unconnected(2, 21);
    let now = t.now;
    // Node 1 accepts one handshake message per second before asking for cookies.
    let mut config = EngineConfig::new(t.nodes[1].private_key.clone());
    config.handshake_rate_limit = 1;
    t.nodes[1].engine = Engine::new(config, now);
    let (c0, c1) = (t.nodes[0].as_peer(), t.nodes[1].as_peer());
    t.nodes[0].engine.upsert_peer(c1, now).unwrap();
    t.nodes[1].engine.upsert_peer(c0, now).unwrap();
    let k1 = key_of(&t, 1);

    assert!(t.connect(0, 1), "first handshake is within the limit");
    assert!(t.nodes[0].engine.reset_peer(&k1, now));
    let packet = t.v4_packet(0, 1, b"x");
    let _ = t.send_ip(0, &packet);
    let init = t.in_flight.pop_front().unwrap();
    let outcome = t.deliver(1, init.from, &init.payload);
    assert!(matches!(outcome, DatagramOutcome::Reply { len: 64, .. }));
    let cookie = t.in_flight.pop_front().unwrap();
    assert_eq!(msg_type(&cookie.payload), MSG_COOKIE);
    assert_eq!(t.nodes[1].engine.stats().cookie_replies, 1);
    // The initiator accepts the cookie (stored for its next initiation).
    assert_eq!(
        t.deliver(0, cookie.from, &cookie.payload),
        DatagramOutcome::Done
    );
    assert_eq!(t.nodes[0].engine.stats().dropped_total(), 0);
}

#[test]
fn own_and_invalid_keys_are_refused() {
    let mut t = TestNet::unconnected(1, 22);
    let now = t.now;
    let own = key_of(&t, 0);
    let e = &mut t.nodes[0].engine;
    assert_eq!(
        e.upsert_peer(PeerConfig::new(own, vec![]), now),
        Err(PeerError::OwnKey)
    );
    assert_eq!(
        e.upsert_peer(PeerConfig::new(PublicKey::from_bytes([0; 32]), vec![]), now),
        Err(PeerError::InvalidPublicKey)
    );
}

/// Real messages from a short exchange: initiation, response, keepalive, data.
fn captured_messages(t: &mut TestNet) -> Vec<Vec<u8>> {
    let packet = t.v4_packet(0, 1, b"capture");
    let _ = t.send_ip(0, &packet);
    let mut captured = Vec::new();
    while let Some(d) = t.in_flight.front().cloned() {
        captured.push(d.payload);
        t.step();
    }
    captured
}

#[test]
fn truncated_and_corrupted_real_messages_are_counted_drops() {
    let mut t = TestNet::new(2, 23);
    let captured = captured_messages(&mut t);
    assert!(captured.len() >= 4);
    let from = t.nodes[0].endpoint;
    for message in &captured {
        for cut in 0..message.len() {
            let before = t.nodes[1].engine.stats().dropped_total();
            let outcome = t.deliver(1, from, &message[..cut]);
            assert!(
                matches!(outcome, DatagramOutcome::Dropped(_)),
                "{outcome:?}"
            );
            assert_eq!(t.nodes[1].engine.stats().dropped_total(), before + 1);
        }
        for i in 1..message.len() {
            let mut corrupted = message.clone();
            corrupted[i] ^= 0x5a;
            let outcome = t.deliver(1, from, &corrupted);
            assert!(
                matches!(outcome, DatagramOutcome::Dropped(_)),
                "{i}: {outcome:?}"
            );
        }
    }
    assert!(t.nodes[1].delivered.len() == 1, "only the real packet");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes never panic the engine and are always counted drops.
    #[test]
    fn random_datagrams_are_dropped_and_counted(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        kind in 0u8..6,
    ) {
        let mut t = TestNet::new(2, 24);
        prop_assert!(t.connect(0, 1));
        let mut bytes = bytes;
        // Steer some inputs into each message type and its exact length.
        match kind {
            1 => { bytes.resize(148, 0); bytes[..4].copy_from_slice(&[1, 0, 0, 0]); }
            2 => { bytes.resize(92, 0); bytes[..4].copy_from_slice(&[2, 0, 0, 0]); }
            3 => { bytes.resize(64, 0); bytes[..4].copy_from_slice(&[3, 0, 0, 0]); }
            4 => { bytes.resize(bytes.len().max(32), 0); bytes[..4].copy_from_slice(&[4, 0, 0, 0]); }
            5 => {
                // A data message for node 1's live session with random contents.
                let packet = t.v4_packet(0, 1, b"template");
                let _ = t.send_ip(0, &packet);
                let real = t.in_flight.pop_front().unwrap().payload;
                bytes.resize(bytes.len().max(32), 0);
                bytes[..8].copy_from_slice(&real[..8]);
            }
            _ => {}
        }
        let from = t.nodes[0].endpoint;
        let before = t.nodes[1].engine.stats().dropped_total();
        let outcome = t.deliver(1, from, &bytes);
        prop_assert!(matches!(outcome, DatagramOutcome::Dropped(_)), "{:?}", outcome);
        prop_assert_eq!(t.nodes[1].engine.stats().dropped_total(), before + 1);
        // The session still works afterwards.
        prop_assert!(t.connect(0, 1));
    }

    /// Arbitrary "IP packets" from the local side never panic either.
    #[test]
    fn random_ip_packets_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut t = TestNet::new(2, 25);
        let outcome = t.send_ip(0, &bytes);
        let is_ip = matches!(bytes.first().map(|b| b >> 4), Some(4) if bytes.len() >= 20)
            || matches!(bytes.first().map(|b| b >> 4), Some(6) if bytes.len() >= 40);
        if !is_ip {
            prop_assert_eq!(outcome, PacketOutcome::Dropped(DropReason::Malformed));
        }
        t.run();
    }
}
