//! Two netstacks back to back in memory (`testing::Pair`): end-to-end TCP and UDP behaviour.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tailnode_netstack::testing::{A_V4, A_V6, B_V4, B_V6, Direction, Pair};
use tailnode_netstack::{ConnectError, NetstackConfig, TcpStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Deterministic pseudo-random bytes (xorshift64*).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn v4(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn v6(ip: std::net::Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(ip), port)
}

async fn connect_accept(pair: &Pair, port: u16, to: SocketAddr) -> (TcpStream, TcpStream) {
    let listener = pair.b.listen(port).unwrap();
    let (client, server) = tokio::join!(pair.a.connect(to), listener.accept());
    let client = client.unwrap();
    let (server, peer) = server.unwrap();
    assert_eq!(peer, client.local_addr());
    assert_eq!(server.peer_addr(), client.local_addr());
    assert_eq!(server.local_addr(), to);
    assert_eq!(client.peer_addr(), to);
    (client, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_accept_over_ipv4_and_ipv6() {
    let pair = Pair::start().unwrap();
    for (port, to, from_ip) in [
        (80, v4(B_V4, 80), IpAddr::V4(A_V4)),
        (81, v6(B_V6, 81), IpAddr::V6(A_V6)),
    ] {
        let (mut client, mut server) = connect_accept(&pair, port, to).await;
        assert_eq!(client.local_addr().ip(), from_ip);
        assert!((49152..=65535).contains(&client.local_addr().port()));
        client.write_all(b"hello over the tailnet").await.unwrap();
        let mut buf = [0u8; 22];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello over the tailnet");
        server.write_all(b"pong").await.unwrap();
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }
}

async fn send_all_hashed(mut w: impl AsyncWriteExt + Unpin, data: Arc<Vec<u8>>) -> [u8; 32] {
    for chunk in data.chunks(64 * 1024) {
        w.write_all(chunk).await.unwrap();
    }
    w.shutdown().await.unwrap();
    Sha256::digest(&data[..]).into()
}

async fn read_all_hashed(mut r: impl AsyncReadExt + Unpin) -> (usize, [u8; 32]) {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        total += n;
        hasher.update(&buf[..n]);
    }
    (total, hasher.finalize().into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_16_mib_each_way_with_half_close() {
    const LEN: usize = 16 << 20;
    let (a, b) = Pair::configs();
    // Frozen clock: progress must not depend on any timer (retransmission, probes).
    let pair = Pair::with_frozen_clock(a, b).unwrap();
    let (client, server) = connect_accept(&pair, 5001, v4(B_V4, 5001)).await;
    let up = Arc::new(pattern(LEN, 1));
    let down = Arc::new(pattern(LEN, 2));
    let (client_r, client_w) = tokio::io::split(client);
    let (server_r, server_w) = tokio::io::split(server);
    let started = Instant::now();
    let (sent_up, sent_down, (got_down_len, got_down), (got_up_len, got_up)) = tokio::join!(
        tokio::spawn(send_all_hashed(client_w, up.clone())),
        tokio::spawn(send_all_hashed(server_w, down.clone())),
        tokio::spawn(read_all_hashed(client_r)),
        tokio::spawn(read_all_hashed(server_r)),
    )
    .pipe(|(a, b, c, d)| (a.unwrap(), b.unwrap(), c.unwrap(), d.unwrap()));
    let elapsed = started.elapsed();
    assert_eq!(got_up_len, LEN);
    assert_eq!(got_down_len, LEN);
    assert_eq!(got_up, sent_up, "upstream bytes intact");
    assert_eq!(got_down, sent_down, "downstream bytes intact");
    // Sanity figure only, no timing assertion (debug builds, shared machine).
    eprintln!(
        "16 MiB each way in {elapsed:?}: {:.0} MB/s aggregate",
        (2 * LEN) as f64 / elapsed.as_secs_f64() / 1e6
    );
    // Both sides closed: every socket is reclaimed.
    pair.wait_until("all sockets reclaimed", |p| {
        p.a.stats().tcp_sockets == 0 && p.b.stats().tcp_sockets == 0
    })
    .await;
}

/// `tokio::join!` on four handles gives a tuple; this keeps the call site readable.
trait Pipe: Sized {
    fn pipe<R>(self, f: impl FnOnce(Self) -> R) -> R {
        f(self)
    }
}
impl<T> Pipe for T {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_with_small_window_makes_progress() {
    let (a, b) = Pair::configs();
    let small = |c: NetstackConfig| NetstackConfig {
        tcp_rx_buffer: 16 * 1024,
        tcp_tx_buffer: 16 * 1024,
        ..c
    };
    // Frozen clock: no retransmission or zero-window probe can rescue a missed window update.
    let pair = Pair::with_frozen_clock(small(a), small(b)).unwrap();
    let (client, mut server) = connect_accept(&pair, 5002, v4(B_V4, 5002)).await;
    let data = Arc::new(pattern(2 << 20, 3));
    let sender = tokio::spawn(send_all_hashed(client, data));
    // The reader is slower than the sender: the window closes again and again, and each read
    // must reopen it. The timeout is a liveness bound, not a performance target.
    let reader = async move {
        let mut hasher = Sha256::new();
        let mut buf = [0u8; 1000];
        let mut total = 0;
        loop {
            let n = server.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
            hasher.update(&buf[..n]);
            tokio::task::yield_now().await;
        }
        (total, <[u8; 32]>::from(hasher.finalize()))
    };
    let (total, got) = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("transfer stalled");
    assert_eq!(total, 2 << 20);
    assert_eq!(got, sender.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_in_both_directions() {
    let (a, b) = Pair::configs();
    // Frozen clock: progress must not depend on any timer (retransmission, probes).
    let pair = Pair::with_frozen_clock(a, b).unwrap();
    let (mut client, mut server) = connect_accept(&pair, 7, v6(B_V6, 7)).await;
    // Client sends a request and closes its sending half.
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let mut req = Vec::new();
    server.read_to_end(&mut req).await.unwrap();
    assert_eq!(req, b"request");
    // The server can still answer over the other half, which the client still reads.
    server.write_all(b"response after your FIN").await.unwrap();
    // Writing after our own shutdown fails.
    assert_eq!(
        client.write_all(b"late").await.unwrap_err().kind(),
        io::ErrorKind::BrokenPipe
    );
    server.shutdown().await.unwrap();
    let mut resp = Vec::new();
    client.read_to_end(&mut resp).await.unwrap();
    assert_eq!(resp, b"response after your FIN");
    // EOF is sticky.
    let mut one = [0u8; 1];
    assert_eq!(client.read(&mut one).await.unwrap(), 0);
    assert_eq!(server.read(&mut one).await.unwrap(), 0);
    // Sockets are gone even though both handles are still held (TIME-WAIT keeps no socket).
    pair.wait_until("sockets reclaimed while handles live", |p| {
        p.a.stats().tcp_sockets + p.b.stats().tcp_sockets == 0
    })
    .await;
    assert_eq!(client.read(&mut one).await.unwrap(), 0);
    drop((client, server));
    pair.wait_until("records released", |p| {
        p.a.stats().tcp_connections + p.b.stats().tcp_connections == 0
    })
    .await;
    let time_wait = pair.a.stats().tcp_time_wait + pair.b.stats().tcp_time_wait;
    assert_eq!(time_wait, 1, "the side that closed first holds TIME-WAIT");
    pair.advance(Duration::from_secs(11));
    pair.wait_until("TIME-WAIT expired", |p| {
        p.a.stats().tcp_time_wait + p.b.stats().tcp_time_wait == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_data_survives_reclaim_of_a_closed_connection() {
    let pair = Pair::start().unwrap();
    let (mut client, mut server) = connect_accept(&pair, 8, v4(B_V4, 8)).await;
    let data = pattern(300_000, 9);
    client.shutdown().await.unwrap();
    server.write_all(&data).await.unwrap();
    server.shutdown().await.unwrap();
    drop(server);
    // The client's socket reaches TIME-WAIT and is reclaimed before the client reads anything.
    pair.wait_until("client socket reclaimed", |p| p.a.stats().tcp_sockets == 0)
        .await;
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_closed_port_is_refused() {
    let pair = Pair::start().unwrap();
    for to in [v4(B_V4, 9), v6(B_V6, 9)] {
        let err = pair.a.connect(to).await.unwrap_err();
        assert_eq!(err, ConnectError::Refused);
        assert_eq!(
            io::Error::from(err).kind(),
            io::ErrorKind::ConnectionRefused
        );
    }
    pair.wait_until("refused sockets reclaimed", |p| {
        let s = p.a.stats();
        s.tcp_sockets == 0 && s.tcp_connections == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_abort_is_connection_reset() {
    let pair = Pair::start().unwrap();
    let (mut client, server) = connect_accept(&pair, 10, v4(B_V4, 10)).await;
    server.abort();
    let mut buf = [0u8; 8];
    let err = client.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    let err = client.write_all(b"x").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    pair.wait_until("reset sockets reclaimed", |p| {
        p.a.stats().tcp_sockets + p.b.stats().tcp_sockets == 0
    })
    .await;
    drop(client);
    pair.wait_until("records released", |p| {
        p.a.stats().tcp_connections + p.b.stats().tcp_connections == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_with_unread_data_resets_the_peer() {
    let pair = Pair::start().unwrap();
    let (mut client, mut server) = connect_accept(&pair, 11, v4(B_V4, 11)).await;
    client.write_all(b"never read").await.unwrap();
    // Make sure the data arrived before the server drops its stream.
    let mut first = [0u8; 1];
    server.read_exact(&mut first).await.unwrap();
    drop(server);
    let mut buf = [0u8; 8];
    let err = client.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_connect_close_cycles_leave_nothing_behind() {
    let (a, b) = Pair::configs();
    // Frozen clock: progress must not depend on any timer (retransmission, probes).
    let pair = Pair::with_frozen_clock(a, b).unwrap();
    let listener = pair.b.listen(7000).unwrap();
    let server = tokio::spawn(async move {
        for _ in 0..1000 {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(&b).await.unwrap();
            // Drop: graceful close.
        }
        listener
    });
    for i in 0..1000u32 {
        let to = if i % 2 == 0 {
            v4(B_V4, 7000)
        } else {
            v6(B_V6, 7000)
        };
        let mut c = pair.a.connect(to).await.unwrap();
        let byte = [i as u8];
        c.write_all(&byte).await.unwrap();
        let mut back = [0u8; 1];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, byte);
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
    let listener = server.await.unwrap();
    pair.wait_until("every socket reclaimed", |p| {
        let (a, b) = (p.a.stats(), p.b.stats());
        a.tcp_sockets == 0 && b.tcp_sockets == 0 && a.tcp_connections == 0 && b.tcp_connections == 0
    })
    .await;
    drop(listener);
    assert_eq!(pair.b.stats().tcp_listeners, 0);
    pair.advance(Duration::from_secs(11));
    pair.wait_until("TIME-WAIT table drained", |p| {
        p.a.stats().tcp_time_wait + p.b.stats().tcp_time_wait == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_connections() {
    let (a, b) = Pair::configs();
    // Frozen clock: progress must not depend on any timer (retransmission, probes).
    let pair = Pair::with_frozen_clock(a, b).unwrap();
    let listener = pair.b.listen(9000).unwrap();
    let server = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (s, _) = listener.accept().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let mut clients = Vec::new();
    for i in 0..50u64 {
        let stack = pair.a.clone();
        clients.push(tokio::spawn(async move {
            let to = if i % 2 == 0 {
                v4(B_V4, 9000)
            } else {
                v6(B_V6, 9000)
            };
            let c = stack.connect(to).await.unwrap();
            let data = Arc::new(pattern(256 * 1024, i + 100));
            let (r, w) = tokio::io::split(c);
            let (sent, (len, got)) = tokio::join!(send_all_hashed(w, data), read_all_hashed(r));
            assert_eq!(len, 256 * 1024);
            assert_eq!(sent, got, "connection {i} echoed intact");
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    server.await.unwrap();
    pair.wait_until("all reclaimed", |p| {
        p.a.stats().tcp_sockets + p.b.stats().tcp_sockets == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_round_trip_v4_and_v6() {
    let pair = Pair::start().unwrap();
    let server = pair.b.bind_udp(Some(5353)).unwrap();
    assert_eq!(server.local_port(), 5353);
    assert!(pair.b.bind_udp(Some(5353)).is_err(), "port taken");
    let client = pair.a.bind_udp(None).unwrap();
    assert!((49152..=65535).contains(&client.local_port()));
    for (to, from_ip) in [
        (v4(B_V4, 5353), IpAddr::V4(A_V4)),
        (v6(B_V6, 5353), IpAddr::V6(A_V6)),
    ] {
        let msg = pattern(1000, to.port().into());
        assert_eq!(client.send_to(&msg, to).await.unwrap(), 1000);
        let mut buf = vec![0u8; 2000];
        let (n, from) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &msg[..]);
        assert_eq!(from, SocketAddr::new(from_ip, client.local_port()));
        server.send_to(b"reply", from).await.unwrap();
        let (n, from) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"reply");
        assert_eq!(from, to);
    }
    // Datagrams above the MTU are refused rather than silently dropped.
    let err = client
        .send_to(&vec![0u8; 1500], v4(B_V4, 5353))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    // Truncation: the datagram is cut to the buffer.
    client.send_to(b"0123456789", v4(B_V4, 5353)).await.unwrap();
    let mut small = [0u8; 4];
    let (n, _) = server.recv_from(&mut small).await.unwrap();
    assert_eq!((n, &small), (4, b"0123"));
    drop((client, server));
    pair.wait_until("UDP sockets closed", |p| {
        p.a.stats().udp_sockets + p.b.stats().udp_sockets == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_backlog_bounds_pending_connections() {
    let (a, b) = Pair::configs();
    let b = NetstackConfig {
        listen_backlog: 2,
        ..b
    };
    let pair = Pair::with_configs(a, b).unwrap();
    let listener = pair.b.listen(6000).unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let stack = pair.a.clone();
        let done = done.clone();
        clients.push(tokio::spawn(async move {
            let c = stack.connect(v4(B_V4, 6000)).await.unwrap();
            done.fetch_add(1, Ordering::SeqCst);
            c
        }));
    }
    // Only the backlog's worth completes the handshake; the other SYNs are dropped, not reset.
    pair.wait_until("two SYNs dropped", |p| p.b.stats().syn_dropped >= 2)
        .await;
    pair.wait_until("two connections established", |_| {
        done.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(pair.b.stats().tcp_sockets, 2);
    // Accepting frees backlog slots; the clients' SYN retransmissions (after the 1 s RTO, on the
    // injected clock) get through.
    let accept = || tokio::time::timeout(Duration::from_secs(20), listener.accept());
    let (_s1, _) = accept().await.unwrap().unwrap();
    let (_s2, _) = accept().await.unwrap().unwrap();
    for _ in 0..10 {
        if done.load(Ordering::SeqCst) == 4 {
            break;
        }
        pair.advance_settled(Duration::from_secs(1)).await;
    }
    pair.wait_until("all four connected", |_| done.load(Ordering::SeqCst) == 4)
        .await;
    let (_s3, _) = accept().await.unwrap().unwrap();
    let (_s4, _) = accept().await.unwrap().unwrap();
    for c in clients {
        c.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_drop_frees_socket() {
    let pair = Pair::start().unwrap();
    // Black hole: nothing reaches b.
    pair.set_filter(Some(Box::new(|dir, _| dir != Direction::AToB)));
    let attempt =
        tokio::time::timeout(Duration::from_millis(50), pair.a.connect(v4(B_V4, 80))).await;
    assert!(attempt.is_err(), "no answer within the caller's timeout");
    pair.wait_until("cancelled attempt reclaimed", |p| {
        let s = p.a.stats();
        s.tcp_sockets == 0 && s.tcp_connections == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_timeout_reports_timed_out() {
    let (a, b) = Pair::configs();
    let a = NetstackConfig {
        tcp_timeout: Some(Duration::from_secs(5)),
        ..a
    };
    let pair = Pair::with_configs(a, b).unwrap();
    pair.set_filter(Some(Box::new(|dir, _| dir != Direction::AToB)));
    let stack = pair.a.clone();
    let attempt = tokio::spawn(async move { stack.connect(v4(B_V4, 80)).await });
    pair.wait_until("SYN sent", |p| p.a.stats().packets_out >= 1)
        .await;
    pair.advance(Duration::from_secs(6));
    assert_eq!(attempt.await.unwrap().unwrap_err(), ConnectError::TimedOut);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_that_cannot_close_is_reset_and_reclaimed() {
    let pair = Pair::start().unwrap();
    let (client, server) = connect_accept(&pair, 12, v4(B_V4, 12)).await;
    // The peer vanishes: our FIN is never acknowledged.
    pair.set_filter(Some(Box::new(|_, _| false)));
    let sent = pair.a.stats().packets_out;
    drop(client);
    // The orphan's deadline starts at the first poll after the drop (the one sending the FIN).
    pair.wait_until("FIN sent", |p| p.a.stats().packets_out > sent)
        .await;
    assert_eq!(pair.a.stats().tcp_sockets, 1, "closing, not yet reclaimed");
    pair.advance(Duration::from_secs(61));
    pair.wait_until("orphan reclaimed", |p| {
        let s = p.a.stats();
        s.tcp_sockets == 0 && s.tcp_connections == 0
    })
    .await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_after_idle_period_still_closes_gracefully() {
    let pair = Pair::start().unwrap();
    let (client, mut server) = connect_accept(&pair, 14, v4(B_V4, 14)).await;
    // Nothing polls for longer than the orphan timeout, then the client goes away: its close
    // deadline starts now, not at the last poll, so the peer sees FIN, not RST.
    let resets = Arc::new(AtomicUsize::new(0));
    let seen = resets.clone();
    pair.set_filter(Some(Box::new(move |_, packet| {
        if tcp_flags(packet).is_some_and(|f| f & 0x04 != 0) {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        true
    })));
    pair.advance_idle(Duration::from_secs(120));
    drop(client);
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    drop(server);
    pair.wait_until("both sides closed", |p| {
        p.a.stats().tcp_connections + p.b.stats().tcp_connections == 0
    })
    .await;
    assert_eq!(resets.load(Ordering::SeqCst), 0, "closed with FINs only");
}

/// TCP flags of an IPv4 or IPv6 (no extension headers) TCP packet.
fn tcp_flags(packet: &[u8]) -> Option<u8> {
    let offset = match packet.first()? >> 4 {
        4 if packet.get(9) == Some(&6) => usize::from(packet[0] & 0x0f) * 4,
        6 if packet.get(6) == Some(&6) => 40,
        _ => return None,
    };
    packet.get(offset + 13).copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_reaches_its_own_address() {
    let pair = Pair::start().unwrap();
    let listener = pair.a.listen(22).unwrap();
    let (client, server) = tokio::join!(pair.a.connect(v4(A_V4, 22)), listener.accept());
    let mut client = client.unwrap();
    let (mut server, _) = server.unwrap();
    client.write_all(b"self").await.unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"self");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_round_trips() {
    let (a, b) = Pair::configs();
    // Frozen clock: progress must not depend on any timer (retransmission, probes).
    let pair = Pair::with_frozen_clock(a, b).unwrap();
    let (mut client, mut server) = connect_accept(&pair, 13, v4(B_V4, 13)).await;
    let echo = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        for _ in 0..1000 {
            server.read_exact(&mut buf).await.unwrap();
            server.write_all(&buf).await.unwrap();
        }
    });
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    let started = Instant::now();
    for _ in 0..1000 {
        client.write_all(&msg).await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg);
    }
    eprintln!("64-byte round trip: {:?} average", started.elapsed() / 1000);
    echo.await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn works_on_a_current_thread_runtime() {
    let pair = Pair::start().unwrap();
    let (client, server) = connect_accept(&pair, 15, v6(B_V6, 15)).await;
    let data = Arc::new(pattern(4 << 20, 5));
    let (sent, (len, got)) = tokio::join!(send_all_hashed(client, data), read_all_hashed(server));
    assert_eq!(len, 4 << 20);
    assert_eq!(sent, got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_idle_connections_stay_independent() {
    const N: u32 = 300;
    let (a, b) = Pair::configs();
    let pair = Pair::with_frozen_clock(a, b).unwrap();
    let listener = pair.b.listen(7100).unwrap();
    let mut conns = Vec::new();
    for i in 0..N {
        let to = if i % 2 == 0 {
            v4(B_V4, 7100)
        } else {
            v6(B_V6, 7100)
        };
        let (client, server) = tokio::join!(pair.a.connect(to), listener.accept());
        conns.push((client.unwrap(), server.unwrap().0));
    }
    assert_eq!(pair.a.stats().tcp_sockets, N as usize);
    // A bulk transfer next to them.
    let (client, server) = connect_accept(&pair, 7101, v4(B_V4, 7101)).await;
    let data = Arc::new(pattern(4 << 20, 11));
    let (sent, (len, got)) = tokio::join!(send_all_hashed(client, data), read_all_hashed(server));
    assert_eq!((len, sent), (4 << 20, got));
    // Every idle connection still carries its own bytes, in both directions.
    for (i, (client, server)) in conns.iter_mut().enumerate().rev() {
        client.write_all(&(i as u32).to_be_bytes()).await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(u32::from_be_bytes(buf), i as u32);
        server
            .write_all(&(i as u32 * 7).to_be_bytes())
            .await
            .unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(u32::from_be_bytes(buf), i as u32 * 7);
    }
    drop(conns);
    pair.wait_until("all reclaimed", |p| {
        p.a.stats().tcp_sockets + p.b.stats().tcp_sockets == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_keeps_connections_and_timeout_detects_dead_peers() {
    let (a, b) = Pair::configs();
    let tuned = |c: NetstackConfig| NetstackConfig {
        tcp_keep_alive: Some(Duration::from_secs(10)),
        tcp_timeout: Some(Duration::from_secs(35)),
        ..c
    };
    let pair = Pair::with_frozen_clock(tuned(a), tuned(b)).unwrap();
    let listener = pair.b.listen(7200).unwrap();
    let mut conns = Vec::new();
    for _ in 0..20 {
        let (client, server) = tokio::join!(pair.a.connect(v4(B_V4, 7200)), listener.accept());
        conns.push((client.unwrap(), server.unwrap().0));
    }
    // Idle for 75 s: keep-alives are answered, nothing times out.
    for _ in 0..15 {
        pair.advance_settled(Duration::from_secs(5)).await;
    }
    assert_eq!(pair.a.stats().tcp_sockets, 20);
    for (client, server) in &mut conns {
        client.write_all(b"k").await.unwrap();
        let mut buf = [0u8; 1];
        server.read_exact(&mut buf).await.unwrap();
    }
    // The peer vanishes: every connection times out on both sides.
    pair.set_filter(Some(Box::new(|_, _| false)));
    for _ in 0..10 {
        pair.advance_settled(Duration::from_secs(5)).await;
    }
    for (client, server) in &mut conns {
        let mut buf = [0u8; 1];
        assert_eq!(
            client.read(&mut buf).await.unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        assert_eq!(
            server.read(&mut buf).await.unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
    }
    drop(conns);
    pair.wait_until("timed-out sockets reclaimed", |p| {
        let (a, b) = (p.a.stats(), p.b.stats());
        a.tcp_sockets + b.tcp_sockets + a.tcp_connections + b.tcp_connections == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_address_ends_its_connections() {
    let pair = Pair::start().unwrap();
    let (mut client, _server) = connect_accept(&pair, 7300, v6(B_V6, 7300)).await;
    pair.a.set_addresses(vec![A_V4.into()]).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        client.read(&mut buf).await.unwrap_err().kind(),
        io::ErrorKind::AddrNotAvailable
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_link_still_delivers_every_byte() {
    let (a, b) = Pair::configs();
    let pair = Arc::new(Pair::with_frozen_clock(a, b).unwrap());
    let (client, server) = connect_accept(&pair, 7400, v4(B_V4, 7400)).await;
    // Deterministic loss: every 97th packet a→b and every 89th b→a (data and ACKs alike).
    let mut count = [0u64; 2];
    pair.set_filter(Some(Box::new(move |dir, _| {
        let (i, every) = match dir {
            Direction::AToB => (0, 97),
            Direction::BToA => (1, 89),
        };
        count[i] += 1;
        count[i] % every != 0
    })));
    // Virtual time runs 100x faster than real time: retransmission timeouts (>= 1 s in
    // smoltcp) fire after ~10 ms.
    let clock = {
        let pair = pair.clone();
        tokio::spawn(async move {
            loop {
                pair.advance(Duration::from_millis(100));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let up = Arc::new(pattern(4 << 20, 21));
    let down = Arc::new(pattern(1 << 20, 22));
    let (client_r, client_w) = tokio::io::split(client);
    let (server_r, server_w) = tokio::io::split(server);
    let (sent_up, sent_down, (down_len, got_down), (up_len, got_up)) = tokio::join!(
        send_all_hashed(client_w, up),
        send_all_hashed(server_w, down),
        read_all_hashed(client_r),
        read_all_hashed(server_r),
    );
    clock.abort();
    assert_eq!((up_len, got_up), (4 << 20, sent_up));
    assert_eq!((down_len, got_down), (1 << 20, sent_down));
}

/// `(sequence number, payload length)` of an IPv4 TCP segment.
fn tcp_v4_segment(packet: &[u8]) -> Option<(u32, usize)> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    if packet.first()? >> 4 != 4 || *packet.get(9)? != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    let tcp = packet.get(ihl..total)?;
    let seq = u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?);
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    Some((seq, tcp.len().checked_sub(data_offset)?))
}

/// Two segments lost in one window near the end of a transfer, so that no new data follows
/// them: fast retransmit repairs the first hole and the partial ACK that comes back makes the
/// sender retransmit the second at once (NewReno, RFC 6582, in the workspace's smoltcp). The
/// clock is frozen, so a retransmission timeout can never fire: the transfer completes only if
/// the recovery needed none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_losses_in_one_window_are_repaired_without_a_timeout() {
    const LEN: usize = 256 << 10;
    let (a, b) = Pair::configs();
    let pair = Pair::with_frozen_clock(a, b).unwrap();
    let (client, server) = connect_accept(&pair, 7500, v4(B_V4, 7500)).await;
    // Offsets in the stream whose first carrying segment is dropped.
    let holes = [LEN - 9000, LEN - 4000];
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut first_seq = None;
    let mut done = [false; 2];
    let counter = Arc::clone(&dropped);
    pair.set_filter(Some(Box::new(move |dir, packet| {
        let Some((seq, len)) = tcp_v4_segment(packet) else {
            return true;
        };
        if dir != Direction::AToB || len == 0 {
            return true;
        }
        // No data went out before the filter was set: the first segment starts the stream.
        let offset = seq.wrapping_sub(*first_seq.get_or_insert(seq)) as usize;
        for (hole, done) in holes.iter().zip(done.iter_mut()) {
            if !*done && (offset..offset + len).contains(hole) {
                *done = true;
                counter.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        true
    })));
    let data = Arc::new(pattern(LEN, 31));
    let (_, client_w) = tokio::io::split(client);
    let (server_r, _server_w) = tokio::io::split(server);
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(send_all_hashed(client_w, data), read_all_hashed(server_r))
    })
    .await;
    assert_eq!(dropped.load(Ordering::Relaxed), 2, "both holes were made");
    let (sent, (len, got)) = outcome.expect("the transfer stalled: recovery waited for a timeout");
    assert_eq!((len, got), (LEN, sent));
}
