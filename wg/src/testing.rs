//! Test helpers: hand-built IP packets and an in-memory network of engines.
//!
//! [`TestNet`] is a full mesh of [`Engine`]s joined by an in-memory "wire":
//! datagrams that an engine transmits are queued in [`TestNet::in_flight`] and
//! handed to the engine whose endpoint they are addressed to when the test
//! calls [`TestNet::run`] (or [`TestNet::step`]). Tests may inspect, drop,
//! duplicate or rewrite in-flight datagrams in between. Time is a plain
//! `Instant` field advanced by [`TestNet::advance`].
//!
//! Node `i` (0-based) has tailnet addresses `100.64.0.{i+1}` and
//! `fd7a:115c:a1e0::{i+1}` (each peer's allowed IPs are those two host
//! prefixes) and endpoint `192.0.2.{i+1}:51820`.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::engine::{
    DatagramOutcome, Engine, EngineConfig, Event, MAX_DATAGRAM, PacketOutcome, PeerConfig,
};
use crate::keys::{PrivateKey, PublicKey};

/// IP protocol number reserved for experimentation and testing (RFC 3692).
pub const PROTO_TEST: u8 = 253;

/// A minimal IPv4 or IPv6 packet (chosen by the address family) with the
/// given protocol number and payload; the IPv4 header checksum is valid.
///
/// # Panics
///
/// If the families differ or the payload exceeds 65515 bytes.
pub fn ip_packet(src: IpAddr, dst: IpAddr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_packet(s, d, protocol, payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_packet(s, d, protocol, payload),
        _ => panic!("ip_packet: mixed address families"),
    }
}

/// A 20-byte-header IPv4 packet with a valid header checksum.
///
/// # Panics
///
/// If the payload exceeds 65515 bytes.
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("IPv4 packet too long");
    let mut p = Vec::with_capacity(usize::from(total));
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0]); // id, DF
    p.extend_from_slice(&[64, protocol, 0, 0]); // TTL, protocol, checksum
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let checksum = internet_checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&checksum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// A 40-byte-header IPv6 packet.
///
/// # Panics
///
/// If the payload exceeds 65535 bytes.
pub fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).expect("IPv6 payload too long");
    let mut p = Vec::with_capacity(40 + payload.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[protocol, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A UDP datagram in an IPv4 or IPv6 packet, with valid checksums (what a
/// real stack such as smoltcp accepts).
///
/// # Panics
///
/// If the families differ or the packet would be too long.
pub fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let udp_len = u16::try_from(8 + payload.len()).expect("UDP datagram too long");
    let mut udp = Vec::with_capacity(usize::from(udp_len));
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    // Pseudo-header sum (RFC 768, RFC 8200 §8.1).
    let mut pseudo = 0u32;
    let mut add = |bytes: &[u8]| {
        for chunk in bytes.chunks(2) {
            let hi = u32::from(chunk[0]) << 8;
            let lo = chunk.get(1).map_or(0, |b| u32::from(*b));
            pseudo += hi | lo;
        }
    };
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            add(&s.octets());
            add(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            add(&s.octets());
            add(&d.octets());
        }
        _ => panic!("udp_packet: mixed address families"),
    }
    pseudo += 17 + u32::from(udp_len);
    let mut checksum = internet_checksum(&udp, pseudo);
    if checksum == 0 {
        checksum = 0xffff;
    }
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
    ip_packet(src.ip(), dst.ip(), 17, &udp)
}

/// Source and destination addresses of an IPv4 or IPv6 packet.
pub fn ip_addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            let dst: [u8; 4] = packet[16..20].try_into().ok()?;
            Some((src.into(), dst.into()))
        }
        6 if packet.len() >= 40 => {
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            Some((src.into(), dst.into()))
        }
        _ => None,
    }
}

/// The one's-complement Internet checksum (RFC 1071) of `data`, starting
/// from a partial sum.
fn internet_checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let hi = u32::from(chunk[0]) << 8;
        let lo = chunk.get(1).map_or(0, |b| u32::from(*b));
        sum += hi | lo;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A datagram on the in-memory wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Sender's endpoint.
    pub from: SocketAddr,
    /// Receiver's endpoint.
    pub to: SocketAddr,
    /// The WireGuard message.
    pub payload: Vec<u8>,
}

/// One engine on the in-memory network, with what it has produced so far.
#[derive(Debug)]
pub struct TestNode {
    /// The engine.
    pub engine: Engine,
    /// The node's private key.
    pub private_key: PrivateKey,
    /// Where the node receives datagrams (change it to simulate roaming).
    pub endpoint: SocketAddr,
    /// The node's tailnet IPv4 address.
    pub ipv4: Ipv4Addr,
    /// The node's tailnet IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Decrypted packets delivered to this node, with the sending peer.
    pub delivered: Vec<(PublicKey, Vec<u8>)>,
    /// Events the engine reported.
    pub events: Vec<Event>,
    /// Outcomes of `handle_datagram` calls, in order.
    pub outcomes: Vec<DatagramOutcome>,
}

impl TestNode {
    /// The node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.engine.public_key()
    }

    /// The peer configuration other nodes use for this node.
    pub fn as_peer(&self) -> PeerConfig {
        PeerConfig {
            public_key: self.public_key(),
            preshared_key: None,
            allowed_ips: vec![
                IpNet::from(IpAddr::V4(self.ipv4)),
                IpNet::from(IpAddr::V6(self.ipv6)),
            ],
            endpoint: Some(self.endpoint),
            persistent_keepalive: None,
        }
    }
}

/// A full mesh of engines on an in-memory wire. See the module docs.
#[derive(Debug)]
pub struct TestNet {
    /// The nodes, indexed as in the module docs.
    pub nodes: Vec<TestNode>,
    /// Datagrams sent and not yet delivered, oldest first.
    pub in_flight: VecDeque<Datagram>,
    /// Datagrams addressed to no node's endpoint.
    pub undeliverable: Vec<Datagram>,
    /// The simulated clock.
    pub now: Instant,
    buf: Vec<u8>,
}

impl TestNet {
    /// `n` nodes (at most 250), each configured with every other as a peer.
    /// Keys and receiver indices derive from `seed`.
    pub fn new(n: usize, seed: u64) -> Self {
        let mut net = Self::unconnected(n, seed);
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    let peer = net.nodes[j].as_peer();
                    let now = net.now;
                    net.nodes[i]
                        .engine
                        .upsert_peer(peer, now)
                        .expect("test keys are valid");
                }
            }
        }
        net
    }

    /// `n` nodes that know no peers yet.
    pub fn unconnected(n: usize, seed: u64) -> Self {
        assert!(n <= 250, "TestNet supports at most 250 nodes");
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed);
        let nodes = (0..n)
            .map(|i| {
                let mut bytes = [0u8; 32];
                rng.fill_bytes(&mut bytes);
                let private_key = PrivateKey::from_bytes(bytes);
                let mut config = EngineConfig::new(private_key.clone());
                config.seed = Some(rng.next_u64());
                let host = u8::try_from(i + 1).expect("at most 250 nodes");
                TestNode {
                    engine: Engine::new(config, now),
                    private_key,
                    endpoint: SocketAddr::new(Ipv4Addr::new(192, 0, 2, host).into(), 51820),
                    ipv4: Ipv4Addr::new(100, 64, 0, host),
                    ipv6: Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, u16::from(host)),
                    delivered: Vec::new(),
                    events: Vec::new(),
                    outcomes: Vec::new(),
                }
            })
            .collect();
        Self {
            nodes,
            in_flight: VecDeque::new(),
            undeliverable: Vec::new(),
            now,
            buf: vec![0; MAX_DATAGRAM],
        }
    }

    /// Node `from` sends `packet` into its engine; a resulting datagram goes
    /// on the wire (followed by anything `poll_transmit` yields).
    pub fn send_ip(&mut self, from: usize, packet: &[u8]) -> PacketOutcome {
        let now = self.now;
        let node = &mut self.nodes[from];
        let outcome = node.engine.handle_ip_packet(packet, &mut self.buf, now);
        if let PacketOutcome::Transmit { dst, len } = outcome {
            self.in_flight.push_back(Datagram {
                from: node.endpoint,
                to: dst,
                payload: self.buf[..len].to_vec(),
            });
        }
        self.drain(from);
        outcome
    }

    /// A test-protocol IPv4 packet from node `a` to node `b`.
    pub fn v4_packet(&self, a: usize, b: usize, payload: &[u8]) -> Vec<u8> {
        ipv4_packet(self.nodes[a].ipv4, self.nodes[b].ipv4, PROTO_TEST, payload)
    }

    /// A test-protocol IPv6 packet from node `a` to node `b`.
    pub fn v6_packet(&self, a: usize, b: usize, payload: &[u8]) -> Vec<u8> {
        ipv6_packet(self.nodes[a].ipv6, self.nodes[b].ipv6, PROTO_TEST, payload)
    }

    /// Delivers the oldest in-flight datagram. Returns `false` if there was none.
    pub fn step(&mut self) -> bool {
        let Some(datagram) = self.in_flight.pop_front() else {
            return false;
        };
        let Some(i) = self.nodes.iter().position(|n| n.endpoint == datagram.to) else {
            self.undeliverable.push(datagram);
            return true;
        };
        let _ = self.deliver(i, datagram.from, &datagram.payload);
        true
    }

    /// Hands `payload` to node `i` as if it came from `from`, and puts the
    /// node's answers on the wire. Returns the engine's outcome.
    pub fn deliver(&mut self, i: usize, from: SocketAddr, payload: &[u8]) -> DatagramOutcome {
        let now = self.now;
        let node = &mut self.nodes[i];
        let outcome = node
            .engine
            .handle_datagram(from, payload, &mut self.buf, now);
        match outcome {
            DatagramOutcome::Deliver { peer, len } => {
                node.delivered.push((peer, self.buf[..len].to_vec()));
            }
            DatagramOutcome::Reply { dst, len } => self.in_flight.push_back(Datagram {
                from: node.endpoint,
                to: dst,
                payload: self.buf[..len].to_vec(),
            }),
            DatagramOutcome::Done | DatagramOutcome::Dropped(_) => {}
        }
        node.outcomes.push(outcome);
        self.drain(i);
        outcome
    }

    /// Delivers datagrams until the wire is empty (at most 100 000, to stop
    /// runaway loops). Returns how many were delivered.
    pub fn run(&mut self) -> usize {
        let mut n = 0;
        while n < 100_000 && self.step() {
            n += 1;
        }
        n
    }

    /// Advances the clock by `by` in [`crate::engine::TIMER_TICK`] steps,
    /// running every engine's timers and delivering what they send.
    pub fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        while self.now < end {
            let step = crate::engine::TIMER_TICK.min(end - self.now);
            self.now += step;
            for i in 0..self.nodes.len() {
                let now = self.now;
                self.nodes[i].engine.handle_timeout(now);
                self.drain(i);
            }
            self.run();
        }
    }

    /// Makes `a` send one IPv4 packet to `b` and runs the wire, which
    /// completes a handshake if there was no session. Returns whether the
    /// packet arrived at `b` (its delivered list is cleared).
    pub fn connect(&mut self, a: usize, b: usize) -> bool {
        let packet = self.v4_packet(a, b, b"connect");
        let _ = self.send_ip(a, &packet);
        self.run();
        let arrived = self.nodes[b].delivered.iter().any(|(_, p)| *p == packet);
        self.nodes[b].delivered.clear();
        arrived
    }

    /// Drains node `i`'s transmits and events.
    fn drain(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        while let Some((dst, len)) = node.engine.poll_transmit(&mut self.buf) {
            self.in_flight.push_back(Datagram {
                from: node.endpoint,
                to: dst,
                payload: self.buf[..len].to_vec(),
            });
        }
        while let Some(event) = node.engine.poll_event() {
            node.events.push(event);
        }
    }
}
