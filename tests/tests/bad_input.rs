//! Bad input on the WireGuard socket leaves the node serving everyone else:
//! random and truncated datagrams, replayed valid packets, a handshake from
//! an unknown key and a decrypted packet with a spoofed source address are
//! all dropped and counted, while a transfer between two good peers runs on,
//! checked byte for byte.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tailnode_tests::inproc::{
    addresses, loopback_endpoint, peer_config, serve_transfers, start_node,
};
use tailnode_tests::relay::UdpRelay;
use tailnode_tests::transfer::run_client;
use tailnode_wg::testing::udp_packet;
use tailnode_wg::{
    DatagramOutcome, DropReason, Engine, EngineConfig, PacketOutcome, PeerConfig, PrivateKey,
};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

const PORT: u16 = 7000;
const MIB: u64 = 1 << 20;

/// A WireGuard peer driven by hand from the test: our engine on a real UDP socket.
struct HandPeer {
    engine: Engine,
    sock: UdpSocket,
    buf: Vec<u8>,
}

impl HandPeer {
    async fn new(key: PrivateKey, peer: PeerConfig) -> Self {
        let now = Instant::now();
        let mut engine = Engine::new(EngineConfig::new(key), now);
        engine.upsert_peer(peer, now).unwrap();
        Self {
            engine,
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            buf: vec![0u8; 65_536 + 64],
        }
    }

    /// Encrypts `packet` and sends whatever the engine produces; then
    /// answers the peer until nothing more comes within `settle`.
    async fn send_packet(&mut self, packet: &[u8], settle: Duration) {
        let now = Instant::now();
        match self.engine.handle_ip_packet(packet, &mut self.buf, now) {
            PacketOutcome::Transmit { dst, len } => {
                self.sock.send_to(&self.buf[..len], dst).await.unwrap();
            }
            PacketOutcome::Queued => {}
            other => panic!("cannot send: {other:?}"),
        }
        self.flush().await;
        let mut rx = vec![0u8; 65_536];
        while let Ok(Ok((n, from))) =
            tokio::time::timeout(settle, self.sock.recv_from(&mut rx)).await
        {
            match self
                .engine
                .handle_datagram(from, &rx[..n], &mut self.buf, Instant::now())
            {
                DatagramOutcome::Reply { dst, len } => {
                    self.sock.send_to(&self.buf[..len], dst).await.unwrap();
                }
                DatagramOutcome::Deliver { .. }
                | DatagramOutcome::Done
                | DatagramOutcome::Dropped(_) => {}
            }
            self.flush().await;
        }
    }

    async fn flush(&mut self) {
        while let Some((dst, len)) = self.engine.poll_transmit(&mut self.buf) {
            self.sock.send_to(&self.buf[..len], dst).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_replays_unknown_keys_and_spoofing_do_not_disturb_good_peers() {
    tailnode_tests::init_tracing();
    let cancel = CancellationToken::new();
    let a = start_node(1, &cancel).await.handle();
    let b = start_node(2, &cancel).await.handle();
    serve_transfers(&b, PORT);
    // A reaches B through a relay that records A's datagrams for replaying.
    let relay = UdpRelay::start(loopback_endpoint(&b)).await;
    a.upsert_peer(peer_config(&b, 2, Some(relay.addr())))
        .await
        .unwrap();
    b.upsert_peer(peer_config(&a, 1, None)).await.unwrap();
    // E is a legitimate peer of B owning 100.64.0.5 only.
    let e_key = PrivateKey::generate();
    let e_addr = Ipv4Addr::new(100, 64, 0, 5);
    b.upsert_peer(PeerConfig {
        public_key: e_key.public_key(),
        preshared_key: None,
        allowed_ips: vec![ipnet::IpNet::from(IpAddr::V4(e_addr))],
        endpoint: None,
        persistent_keepalive: None,
    })
    .await
    .unwrap();
    let b_udp = loopback_endpoint(&b);
    let b_key_peer = PeerConfig {
        public_key: b.public_key(),
        preshared_key: None,
        allowed_ips: vec!["100.64.0.0/10".parse().unwrap()],
        endpoint: Some(b_udp),
        persistent_keepalive: None,
    };

    let target = SocketAddr::new(addresses(2)[0], PORT);
    let connect = move |a: tailnode::node::NodeHandle| async move {
        tokio::time::timeout(Duration::from_secs(10), a.netstack().connect(target))
            .await
            .expect("connect timed out")
            .expect("connect")
    };
    // Warm up so the relay has recorded valid handshake and data packets.
    run_client(connect(a.clone()).await, MIB, MIB, 1)
        .await
        .unwrap();
    let recorded = relay.recorded();
    assert!(
        recorded.len() > 50,
        "relay recorded {} datagrams",
        recorded.len()
    );

    // The good transfer that must survive everything below.
    let good = {
        let a = a.clone();
        tokio::spawn(async move { run_client(connect(a).await, 32 * MIB, 32 * MIB, 2).await })
    };

    let before = b.engine_stats().await.unwrap();
    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // 1. Random datagrams, some with valid message-type prefixes.
    for i in 0..2000 {
        let len = rng.gen_range(0..1600);
        let mut d: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
        if len >= 4 && i % 2 == 0 {
            d[..4].copy_from_slice(&(1 + (i % 4) as u32).to_le_bytes());
        }
        let _ = attacker.send_to(&d, b_udp).await;
    }
    // 2. Truncated valid datagrams.
    for d in recorded.iter().take(500) {
        let cut = rng.gen_range(0..d.len());
        let _ = attacker.send_to(&d[..cut], b_udp).await;
    }
    // 3. Replayed valid datagrams, from another address.
    for d in &recorded {
        let _ = attacker.send_to(d, b_udp).await;
    }
    // 4. A handshake from a key B does not know.
    let mut stranger = HandPeer::new(PrivateKey::generate(), b_key_peer.clone()).await;
    let probe = udp_packet(
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 9)), 1000),
        SocketAddr::new(addresses(2)[0], 9),
        b"hello",
    );
    stranger
        .send_packet(&probe, Duration::from_millis(300))
        .await;
    assert!(
        !stranger.engine.peers(Instant::now())[0].has_session,
        "B must not complete a handshake with an unknown key"
    );
    // 5. A legitimate peer (E) sends a packet claiming to come from A's address.
    let mut e = HandPeer::new(e_key, b_key_peer).await;
    let honest = udp_packet(
        SocketAddr::new(IpAddr::V4(e_addr), 1000),
        SocketAddr::new(addresses(2)[0], 9),
        b"honest",
    );
    e.send_packet(&honest, Duration::from_millis(300)).await;
    assert!(
        e.engine.peers(Instant::now())[0].has_session,
        "E handshakes with B"
    );
    let spoofed = udp_packet(
        SocketAddr::new(addresses(1)[0], 1000),
        SocketAddr::new(addresses(2)[0], 9),
        b"spoofed",
    );
    for _ in 0..5 {
        e.send_packet(&spoofed, Duration::from_millis(50)).await;
    }

    // The good transfer finished intact, and a new one works.
    tokio::time::timeout(Duration::from_secs(60), good)
        .await
        .expect("the transfer during the attack stalled")
        .unwrap()
        .expect("transfer during the attack");
    run_client(connect(a.clone()).await, MIB, MIB, 3)
        .await
        .unwrap();

    let after = b.engine_stats().await.unwrap();
    let delta = |r: DropReason| after.dropped(r) - before.dropped(r);
    assert!(delta(DropReason::SpoofedSource) >= 5, "spoofed: {after:?}");
    assert!(
        delta(DropReason::UnknownPeer) >= 1,
        "unknown key: {after:?}"
    );
    assert!(delta(DropReason::Replay) >= 1, "replays: {after:?}");
    assert!(delta(DropReason::Malformed) >= 500, "garbage: {after:?}");
    assert!(
        after.dropped_total() - before.dropped_total() >= 2000,
        "every bad datagram is counted: {after:?}"
    );
    // B still talks to A at the relay (replays from the attacker's address
    // did not move A's endpoint on B), and never to the attacker.
    let a_on_b = b
        .peers()
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.public_key == a.public_key())
        .unwrap();
    assert_ne!(a_on_b.endpoint, Some(attacker.local_addr().unwrap()));
    cancel.cancel();
}
