//! The core's blocking operations without tasks or wakers: two cores joined by a loop that
//! moves their packets, `WouldBlock` from the operations and the ready list after each poll.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::{ConnId, Core, Waiter, WouldBlock};
use crate::{NetstackConfig, PacketQueues};

const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const PORT: u16 = 80;

/// Two cores back to back; `a` listens, `b` connects.
struct Link {
    a: Core,
    b: Core,
    qa: PacketQueues,
    qb: PacketQueues,
    now: Instant,
}

impl Link {
    fn new(tcp_tx_buffer: usize) -> Self {
        let now = Instant::now();
        let config = |addr: Ipv4Addr, seed| NetstackConfig {
            tcp_tx_buffer,
            seed,
            ..NetstackConfig::with_addresses(vec![IpAddr::V4(addr)])
        };
        Self {
            a: Core::new(config(A, 1), now).unwrap(),
            b: Core::new(config(B, 2), now).unwrap(),
            qa: PacketQueues::new(),
            qb: PacketQueues::new(),
            now,
        }
    }

    /// Polls both cores and moves packets between them until the link is quiet.
    fn run(&mut self) {
        for _ in 0..1000 {
            self.now += Duration::from_millis(1);
            self.a.poll(self.now, &mut self.qa);
            self.b.poll(self.now, &mut self.qb);
            if self.qa.outbound.is_empty() && self.qb.outbound.is_empty() {
                return;
            }
            self.qb.inbound.extend(self.qa.outbound.drain(..));
            self.qa.inbound.extend(self.qb.outbound.drain(..));
        }
        panic!("the link did not settle");
    }

    /// Connects `b` to `a`, checking the blocked `accept` and `connect` on the way.
    fn connect(&mut self) -> (ConnId, ConnId) {
        self.a.listen(PORT).unwrap();
        assert_eq!(
            self.a.accept(PORT).err(),
            Some(WouldBlock(Waiter::Accept(PORT)))
        );
        let remote = SocketAddr::from((A, PORT));
        let b_id = self.b.connect_start(remote).unwrap();
        assert_eq!(
            self.b.connect_finish(b_id).err(),
            Some(WouldBlock(Waiter::TcpSend(b_id)))
        );
        assert!(ready(&mut self.a).is_empty());
        assert!(ready(&mut self.b).is_empty());
        self.run();
        assert_eq!(ready(&mut self.a), [Waiter::Accept(PORT)]);
        assert_eq!(ready(&mut self.b), [Waiter::TcpSend(b_id)]);
        let (local, peer) = self.b.connect_finish(b_id).unwrap().unwrap();
        assert_eq!(peer, remote);
        let (a_id, (_, from)) = self.a.accept(PORT).unwrap().unwrap();
        assert_eq!(from, local);
        (a_id, b_id)
    }
}

fn ready(core: &mut Core) -> Vec<Waiter> {
    core.take_ready().collect()
}

/// Reads what `id` has; panics if the read would block.
fn recv(core: &mut Core, id: ConnId) -> Vec<u8> {
    let mut out = Vec::new();
    let n = core
        .tcp_recv(id, 1 << 20, |data| out.extend_from_slice(data))
        .unwrap()
        .unwrap();
    assert_eq!(n, out.len());
    out
}

#[test]
fn a_blocked_read_is_reported_once_data_arrives() {
    let mut link = Link::new(1 << 20);
    let (a_id, b_id) = link.connect();
    assert_eq!(
        link.a
            .tcp_recv(a_id, 100, |_| panic!("nothing to read"))
            .err(),
        Some(WouldBlock(Waiter::TcpRecv(a_id)))
    );
    assert_eq!(link.b.tcp_send(b_id, b"hello").unwrap().unwrap(), 5);
    link.run();
    assert_eq!(ready(&mut link.a), [Waiter::TcpRecv(a_id)]);
    assert_eq!(recv(&mut link.a, a_id), b"hello");

    // Reported once per blocked call: more data without a new `WouldBlock` reports nothing.
    assert_eq!(link.b.tcp_send(b_id, b" world").unwrap().unwrap(), 6);
    link.run();
    assert!(ready(&mut link.a).is_empty());
    assert_eq!(recv(&mut link.a, a_id), b" world");
    assert!(ready(&mut link.b).is_empty());
}

#[test]
fn the_peers_fin_makes_a_blocked_read_ready_with_end_of_stream() {
    let mut link = Link::new(1 << 20);
    let (a_id, b_id) = link.connect();
    assert!(link.a.tcp_recv(a_id, 100, |_| {}).is_err());
    link.b.tcp_shutdown(b_id).unwrap();
    link.run();
    assert_eq!(ready(&mut link.a), [Waiter::TcpRecv(a_id)]);
    assert_eq!(link.a.tcp_recv(a_id, 100, |_| {}).unwrap().unwrap(), 0);
}

#[test]
fn a_blocked_write_is_reported_once_acknowledgements_free_the_buffer() {
    let mut link = Link::new(4096);
    let (a_id, b_id) = link.connect();
    let chunk = [7u8; 1000];
    let mut sent = 0;
    loop {
        match link.b.tcp_send(b_id, &chunk) {
            Ok(n) => sent += n.unwrap(),
            Err(blocked) => {
                assert_eq!(blocked, WouldBlock(Waiter::TcpSend(b_id)));
                break;
            }
        }
    }
    assert_eq!(sent, 4096);
    link.run();
    assert_eq!(ready(&mut link.b), [Waiter::TcpSend(b_id)]);
    assert_eq!(recv(&mut link.a, a_id).len(), 4096);
    assert_eq!(link.b.tcp_send(b_id, &chunk).unwrap().unwrap(), 1000);
}

#[test]
fn a_blocked_udp_receive_is_reported_when_a_datagram_arrives() {
    let mut link = Link::new(1 << 20);
    assert_eq!(link.a.udp_bind(Some(53)).unwrap(), 53);
    let mut buf = [0u8; 64];
    assert_eq!(
        link.a.udp_recv(53, &mut buf).err(),
        Some(WouldBlock(Waiter::UdpRecv(53)))
    );
    let port = link.b.udp_bind(None).unwrap();
    let target = SocketAddr::from((A, 53));
    assert_eq!(link.b.udp_send(port, b"query", target).unwrap().unwrap(), 5);
    link.run();
    assert_eq!(ready(&mut link.a), [Waiter::UdpRecv(53)]);
    let (n, from) = link.a.udp_recv(53, &mut buf).unwrap().unwrap();
    assert_eq!(
        (&buf[..n], from),
        (&b"query"[..], SocketAddr::from((B, port)))
    );
}
