//! Driver tests: real listeners on 127.0.0.1 with a real SOCKS5 client (`tokio-socks`) and raw
//! byte clients, plus in-memory streams on paused time for the deadlines.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio_socks::tcp::Socks5Stream;
use tokio_util::sync::CancellationToken;

use super::server::{ConnAddrs, Outcome, Shared, serve_connection};
use super::*;

/// Bounds how long a test waits for something that must happen promptly; a hang is a failure.
async fn guard<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("timed out")
}

/// Connects IP targets directly (or to the address `routes` maps them to) and resolves domain
/// names through `routes`.
#[derive(Default)]
struct LocalDialer {
    routes: HashMap<TargetAddr, SocketAddr>,
}

impl LocalDialer {
    fn with(routes: impl IntoIterator<Item = (TargetAddr, SocketAddr)>) -> Self {
        Self {
            routes: routes.into_iter().collect(),
        }
    }
}

impl Dialer for LocalDialer {
    type Stream = TcpStream;

    async fn connect(&self, target: &TargetAddr) -> Result<(TcpStream, SocketAddr), DialError> {
        let addr = match (self.routes.get(target), target) {
            (Some(addr), _) => *addr,
            (None, TargetAddr::Ip(addr)) => *addr,
            (None, TargetAddr::Domain(..)) => return Err(DialError::HostUnreachable),
        };
        let stream = TcpStream::connect(addr).await.map_err(|e| match e.kind() {
            io::ErrorKind::ConnectionRefused => DialError::ConnectionRefused,
            _ => DialError::from_io(&e),
        })?;
        let local = stream.local_addr().map_err(|e| DialError::from_io(&e))?;
        Ok((stream, local))
    }
}

/// Fails every dial with the same error.
struct FailDialer(DialError);

impl Dialer for FailDialer {
    type Stream = TcpStream;

    async fn connect(&self, _: &TargetAddr) -> Result<(TcpStream, SocketAddr), DialError> {
        Err(self.0.clone())
    }
}

/// Never finishes a dial.
struct PendingDialer;

impl Dialer for PendingDialer {
    type Stream = TcpStream;

    async fn connect(&self, _: &TargetAddr) -> Result<(TcpStream, SocketAddr), DialError> {
        std::future::pending().await
    }
}

struct Running {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<io::Result<()>>,
}

async fn start<D: Dialer>(config: Socks5Config, dialer: D) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let server = Socks5Server::new(config, Arc::new(dialer));
    let task = tokio::spawn(server.serve(listener, cancel.clone()));
    Running { addr, cancel, task }
}

/// Echoes every connection until its EOF, then closes.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Reads each connection to EOF, then answers the SHA-256 of what it read and closes: it only
/// answers if the client's half-close reached it.
async fn hash_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut data = Vec::new();
                stream.read_to_end(&mut data).await.unwrap();
                stream.write_all(&Sha256::digest(&data)).await.unwrap();
                stream.shutdown().await.unwrap();
            });
        }
    });
    addr
}

/// Deterministic pseudo-random bytes (xorshift).
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Sends `data` through `stream` while reading the echo; returns the SHA-256 of the echo.
async fn echo_hash<S>(stream: S, data: Vec<u8>) -> [u8; 32]
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut echoed = Vec::new();
    r.read_to_end(&mut echoed).await.unwrap();
    writer.await.unwrap();
    Sha256::digest(&echoed).into()
}

/// Writes `bytes` to the proxy, half-closes if asked, and returns everything it answers until it
/// closes.
async fn raw_exchange(proxy: SocketAddr, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    if half_close {
        stream.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    guard(stream.read_to_end(&mut answer)).await.unwrap();
    answer
}

fn failure(code: u8) -> Vec<u8> {
    vec![5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

fn connect_request(target: &TargetAddr) -> Vec<u8> {
    let mut bytes = Vec::new();
    proto::Request {
        command: Command::Connect,
        target: target.clone(),
    }
    .encode(&mut bytes);
    bytes
}

#[tokio::test]
async fn tokio_socks_connect_relays_bytes_exactly() {
    let echo = echo_server().await;
    let tailnet_v6: SocketAddr = "[fd7a:115c:a1e0::1]:80".parse().unwrap();
    let dialer = LocalDialer::with([
        (TargetAddr::Domain("echo.test".into(), 7), echo),
        (TargetAddr::Ip(tailnet_v6), echo),
    ]);
    let server = start(Socks5Config::default(), dialer).await;

    let data = payload(1 << 20, 7);
    let expected: [u8; 32] = Sha256::digest(&data).into();
    let by_ip = guard(Socks5Stream::connect(server.addr, echo))
        .await
        .unwrap();
    assert_eq!(guard(echo_hash(by_ip, data.clone())).await, expected);
    let by_name = guard(Socks5Stream::connect(server.addr, ("echo.test", 7)))
        .await
        .unwrap();
    assert_eq!(guard(echo_hash(by_name, data.clone())).await, expected);
    let by_v6 = guard(Socks5Stream::connect(server.addr, tailnet_v6))
        .await
        .unwrap();
    assert_eq!(guard(echo_hash(by_v6, data)).await, expected);
}

#[tokio::test]
async fn success_reply_carries_the_dialed_bound_address_and_early_data_is_forwarded() {
    let echo = echo_server().await;
    let server = start(Socks5Config::default(), LocalDialer::default()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // Greeting, request and payload in one write: a pipelining client.
    let mut bytes = vec![5, 1, 0];
    bytes.extend(connect_request(&TargetAddr::Ip(echo)));
    bytes.extend_from_slice(b"ping");
    stream.write_all(&bytes).await.unwrap();

    let mut answer = [0u8; 2 + 10 + 4];
    guard(stream.read_exact(&mut answer)).await.unwrap();
    assert_eq!(answer[..6], [5, 0, 5, 0, 0, 1]);
    assert_eq!(
        answer[6..10],
        [127, 0, 0, 1],
        "BND.ADDR is the dialed socket's address"
    );
    assert_ne!(u16::from_be_bytes([answer[10], answer[11]]), 0);
    assert_eq!(&answer[12..], b"ping");
}

#[tokio::test]
async fn every_dial_error_gets_its_rfc1928_reply_code() {
    let cases = [
        (DialError::NodeStopped, 0x01),
        (DialError::NotAllowed, 0x02),
        (DialError::NetworkUnreachable, 0x03),
        (DialError::HostUnreachable, 0x04),
        (DialError::ConnectionRefused, 0x05),
        (DialError::TimedOut, 0x06),
        (DialError::AddressTypeNotSupported, 0x08),
    ];
    for (error, code) in cases {
        assert_eq!(error.reply_code().code(), code);
        let server = start(Socks5Config::default(), FailDialer(error.clone())).await;
        let mut bytes = vec![5, 1, 0];
        bytes.extend(connect_request(&TargetAddr::Domain("peer".into(), 22)));
        let answer = raw_exchange(server.addr, &bytes, false).await;
        assert_eq!(answer, [vec![5, 0], failure(code)].concat(), "{error:?}");
        server.cancel.cancel();
    }
}

#[tokio::test]
async fn refused_target_through_a_real_dial_gets_0x05() {
    // A port nobody listens on: bind, learn the port, close.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let server = start(Socks5Config::default(), LocalDialer::default()).await;
    let mut bytes = vec![5, 1, 0];
    bytes.extend(connect_request(&TargetAddr::Ip(closed)));
    let answer = raw_exchange(server.addr, &bytes, false).await;
    assert_eq!(answer, [vec![5, 0], failure(0x05)].concat());
}

#[tokio::test]
async fn client_half_close_reaches_the_target_and_the_answer_comes_back() {
    let hasher = hash_server().await;
    let server = start(Socks5Config::default(), LocalDialer::default()).await;
    let mut stream = guard(Socks5Stream::connect(server.addr, hasher))
        .await
        .unwrap();
    let data = payload(300_000, 3);
    stream.write_all(&data).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    guard(stream.read_to_end(&mut answer)).await.unwrap();
    assert_eq!(answer, Sha256::digest(&data).to_vec());
}

#[tokio::test]
async fn target_half_close_reaches_the_client_which_can_still_send() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let (received_tx, received_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"banner").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut received = Vec::new();
        stream.read_to_end(&mut received).await.unwrap();
        let _ = received_tx.send(received);
    });
    let server = start(Socks5Config::default(), LocalDialer::default()).await;
    let mut stream = guard(Socks5Stream::connect(server.addr, target))
        .await
        .unwrap();
    let mut banner = Vec::new();
    guard(stream.read_to_end(&mut banner)).await.unwrap();
    assert_eq!(banner, b"banner");
    stream.write_all(b"after the target's FIN").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(guard(received_rx).await.unwrap(), b"after the target's FIN");
}

#[tokio::test]
async fn malformed_clients_get_their_reply_and_a_close_while_a_good_client_keeps_working() {
    let echo = echo_server().await;
    let server = start(Socks5Config::default(), LocalDialer::default()).await;
    let mut good = guard(Socks5Stream::connect(server.addr, echo))
        .await
        .unwrap();
    good.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    guard(good.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"before");

    let ok = vec![5u8, 0];
    let v4 = |cmd: u8| vec![5, cmd, 0, 1, 127, 0, 0, 1, 0, 80];
    let mut long_domain = vec![5, 1, 0, 3, 254];
    long_domain.extend(std::iter::repeat_n(b'a', 254));
    long_domain.extend_from_slice(&[0, 80]);
    let mut flood = vec![5, 1, 0, 0xFF];
    flood.extend(payload(200_000, 9));
    // (name, bytes sent after the greeting [5 1 0] or instead of it, half-close, expected answer)
    let cases: Vec<(&str, Vec<u8>, bool, Vec<u8>)> = vec![
        ("bad greeting version", vec![4, 1, 0], false, vec![5, 0xFF]),
        ("zero methods", vec![5, 0], false, vec![5, 0xFF]),
        (
            "http garbage",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
            vec![5, 0xFF],
        ),
        ("only gssapi", vec![5, 1, 1], false, vec![5, 0xFF]),
        ("only user/pass", vec![5, 1, 2], false, vec![5, 0xFF]),
        ("truncated greeting", vec![5, 3, 0], true, vec![]),
        (
            "truncated request",
            vec![5, 1, 0, 5, 1, 0, 1, 127],
            true,
            ok.clone(),
        ),
        (
            "bad request version",
            [vec![5, 1, 0], vec![4, 1, 0, 1, 1, 2, 3, 4, 0, 80]].concat(),
            false,
            [ok.clone(), failure(1)].concat(),
        ),
        (
            "unknown command",
            [vec![5, 1, 0], v4(9)].concat(),
            false,
            [ok.clone(), failure(7)].concat(),
        ),
        (
            "bind",
            [vec![5, 1, 0], v4(2)].concat(),
            false,
            [ok.clone(), failure(7)].concat(),
        ),
        (
            "udp associate",
            [vec![5, 1, 0], v4(3)].concat(),
            false,
            [ok.clone(), failure(7)].concat(),
        ),
        (
            "unknown atyp",
            vec![5, 1, 0, 5, 1, 0, 2, 1, 2, 3, 4, 0, 80],
            false,
            [ok.clone(), failure(8)].concat(),
        ),
        (
            "empty domain",
            vec![5, 1, 0, 5, 1, 0, 3, 0, 0, 80],
            false,
            [ok.clone(), failure(1)].concat(),
        ),
        (
            "oversize domain",
            [vec![5, 1, 0], long_domain].concat(),
            false,
            [ok.clone(), failure(1)].concat(),
        ),
        (
            "non-utf8 domain",
            vec![5, 1, 0, 5, 1, 0, 3, 2, 0xC3, 0x28, 0, 80],
            false,
            [ok.clone(), failure(1)].concat(),
        ),
        (
            "garbage flood after greeting",
            [vec![5, 1, 0], flood].concat(),
            false,
            [ok.clone(), failure(8)].concat(),
        ),
    ];
    let mut clients = JoinSet::new();
    for (name, bytes, half_close, expected) in cases {
        let proxy = server.addr;
        clients.spawn(async move {
            let answer = raw_exchange(proxy, &bytes, half_close).await;
            assert_eq!(answer, expected, "{name}");
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }

    let data = payload(100_000, 1);
    let expected: [u8; 32] = Sha256::digest([&b"before"[..], &data].concat()).into();
    let (mut r, mut w) = tokio::io::split(good);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut echoed = b"before".to_vec();
    guard(r.read_to_end(&mut echoed)).await.unwrap();
    writer.await.unwrap();
    assert_eq!(<[u8; 32]>::from(Sha256::digest(&echoed)), expected);
}

#[tokio::test]
async fn user_pass_auth() {
    let echo = echo_server().await;
    let config = Socks5Config {
        auth: Some(Credentials::new("alice", "s3cret").unwrap()),
        ..Socks5Config::default()
    };
    let server = start(config, LocalDialer::default()).await;

    let stream = guard(Socks5Stream::connect_with_password(
        server.addr,
        echo,
        "alice",
        "s3cret",
    ))
    .await
    .unwrap();
    let data = payload(50_000, 5);
    assert_eq!(
        guard(echo_hash(stream, data.clone())).await,
        <[u8; 32]>::from(Sha256::digest(&data))
    );

    assert!(
        guard(Socks5Stream::connect_with_password(
            server.addr,
            echo,
            "alice",
            "wrong"
        ))
        .await
        .is_err()
    );
    assert!(
        guard(Socks5Stream::connect(server.addr, echo))
            .await
            .is_err()
    );

    let mut wrong = vec![5, 1, 2];
    proto::encode_user_pass(b"alice", b"wrong", &mut wrong);
    assert_eq!(raw_exchange(server.addr, &wrong, false).await, [5, 2, 1, 1]);
    assert_eq!(
        raw_exchange(server.addr, &[5, 1, 0], false).await,
        [5, 0xFF]
    );
    assert_eq!(
        raw_exchange(server.addr, &[5, 2, 2, 1, 1, 0], false).await,
        [5, 2, 1, 1]
    );

    let mut right = vec![5, 1, 2];
    proto::encode_user_pass(b"alice", b"s3cret", &mut right);
    right.extend(connect_request(&TargetAddr::Domain("nowhere".into(), 1)));
    assert_eq!(
        raw_exchange(server.addr, &right, false).await,
        [vec![5, 2, 1, 0], failure(0x04)].concat()
    );
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once_and_permits_come_back() {
    let echo = echo_server().await;
    let config = Socks5Config {
        max_connections: 1,
        handshake_timeout: Duration::from_secs(600),
        ..Socks5Config::default()
    };
    let server = start(config, LocalDialer::default()).await;

    // Holds the only slot, mid-greeting.
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    first.write_all(&[5]).await.unwrap();

    // Closed long before the 600 s handshake timeout, without a byte.
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    let mut answer = Vec::new();
    match guard(second.read_to_end(&mut answer)).await {
        Ok(_) => assert!(answer.is_empty()),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
    }

    // The first client was not disturbed.
    first.write_all(&[1, 0]).await.unwrap();
    first
        .write_all(&connect_request(&TargetAddr::Ip(echo)))
        .await
        .unwrap();
    let mut reply = [0u8; 12];
    guard(first.read_exact(&mut reply)).await.unwrap();
    assert_eq!(reply[..3], [5, 0, 5]);
    assert_eq!(reply[3], 0, "succeeded");
    drop(first);

    // Its slot is released once its task ends; poll until a new client gets in.
    let mut admitted = false;
    for _ in 0..500 {
        let mut third = TcpStream::connect(server.addr).await.unwrap();
        third.write_all(&[5, 1, 0]).await.unwrap();
        let mut reply = [0u8; 2];
        if guard(third.read_exact(&mut reply)).await.is_ok() {
            assert_eq!(reply, [5, 0]);
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        admitted,
        "the slot of a finished connection was never released"
    );
}

#[tokio::test]
async fn cancel_stops_accepting_ends_relays_and_serve_returns() {
    let echo = echo_server().await;
    let server = start(Socks5Config::default(), LocalDialer::default()).await;
    let mut relayed = guard(Socks5Stream::connect(server.addr, echo))
        .await
        .unwrap();
    relayed.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    guard(relayed.read_exact(&mut byte)).await.unwrap();

    server.cancel.cancel();
    guard(server.task).await.unwrap().unwrap();

    let mut rest = Vec::new();
    match guard(relayed.read_to_end(&mut rest)).await {
        Ok(_) => assert!(rest.is_empty()),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
    }
    assert_eq!(
        TcpStream::connect(server.addr).await.unwrap_err().kind(),
        io::ErrorKind::ConnectionRefused
    );
}

// Deadlines, on paused time with in-memory streams: deterministic and instant.

/// What a server would share with its connections, without UDP.
fn shared<D: Dialer>(config: Socks5Config, dialer: D) -> Shared<D, NoUdp> {
    shared_udp(config, dialer, None)
}

fn shared_udp<D: Dialer, U: UdpDialer>(
    config: Socks5Config,
    dialer: D,
    udp: Option<U>,
) -> Shared<D, U> {
    Shared {
        udp_slots: Arc::new(tokio::sync::Semaphore::new(config.max_udp_associations)),
        config: Arc::new(config),
        dialer: Arc::new(dialer),
        udp: udp.map(Arc::new),
        counters: Arc::new(Socks5Counters::default()),
    }
}

/// A loopback client connection.
fn addrs() -> ConnAddrs {
    ConnAddrs {
        local: "127.0.0.1:1080".parse().unwrap(),
        peer: "127.0.0.1:40000".parse().unwrap(),
    }
}

fn timeouts() -> Socks5Config {
    Socks5Config {
        handshake_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(30),
        ..Socks5Config::default()
    }
}

#[tokio::test(start_paused = true)]
async fn silent_client_is_dropped_at_the_handshake_deadline() {
    let (mut client, server_side) = tokio::io::duplex(4096);
    let start = tokio::time::Instant::now();
    let outcome = serve_connection(server_side, addrs(), &shared(timeouts(), PendingDialer)).await;
    assert!(matches!(outcome, Outcome::HandshakeTimeout), "{outcome:?}");
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(
        client.read(&mut [0u8; 8]).await.unwrap(),
        0,
        "closed without a byte"
    );
}

#[tokio::test(start_paused = true)]
async fn slow_client_is_dropped_at_the_handshake_deadline() {
    let (mut client, server_side) = tokio::io::duplex(4096);
    // One byte per second: each read makes progress, but the deadline is absolute.
    let trickle = tokio::spawn(async move {
        for byte in [5u8, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80] {
            if client.write_all(&[byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        client
    });
    let start = tokio::time::Instant::now();
    let outcome = serve_connection(server_side, addrs(), &shared(timeouts(), PendingDialer)).await;
    assert!(matches!(outcome, Outcome::HandshakeTimeout), "{outcome:?}");
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    let mut client = trickle.await.unwrap();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, [5, 0], "only the method selection was sent");
}

#[tokio::test(start_paused = true)]
async fn dial_exceeding_the_connect_timeout_gets_0x06() {
    let (mut client, server_side) = tokio::io::duplex(4096);
    let mut bytes = vec![5, 1, 0];
    bytes.extend(connect_request(&TargetAddr::Domain(
        "slow.peer".into(),
        443,
    )));
    client.write_all(&bytes).await.unwrap();
    client.shutdown().await.unwrap();
    let start = tokio::time::Instant::now();
    let outcome = serve_connection(server_side, addrs(), &shared(timeouts(), PendingDialer)).await;
    assert!(
        matches!(
            &outcome,
            Outcome::DialFailed {
                error: DialError::TimedOut,
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, [vec![5, 0], failure(0x06)].concat());
}

#[tokio::test(start_paused = true)]
async fn relay_outcome_counts_bytes_both_ways() {
    let (mut client, server_side) = tokio::io::duplex(1 << 16);
    let (upstream, mut target) = tokio::io::duplex(1 << 16);

    /// Hands out one prepared in-memory stream.
    struct OnceDialer(std::sync::Mutex<Option<tokio::io::DuplexStream>>);
    impl Dialer for OnceDialer {
        type Stream = tokio::io::DuplexStream;
        async fn connect(
            &self,
            _: &TargetAddr,
        ) -> Result<(tokio::io::DuplexStream, SocketAddr), DialError> {
            let stream = self.0.lock().unwrap().take();
            stream
                .map(|s| (s, "100.64.0.1:40000".parse().unwrap()))
                .ok_or(DialError::HostUnreachable)
        }
    }

    let dialer = OnceDialer(std::sync::Mutex::new(Some(upstream)));
    let shared = shared(timeouts(), dialer);
    let serve = serve_connection(server_side, addrs(), &shared);
    let drive = async {
        let mut bytes = vec![5, 1, 0];
        bytes.extend(connect_request(&TargetAddr::Ip(
            "100.64.0.2:80".parse().unwrap(),
        )));
        bytes.extend_from_slice(b"early");
        client.write_all(&bytes).await.unwrap();
        let mut reply = [0u8; 12];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, [5, 0, 5, 0, 0, 1, 100, 64, 0, 1, 0x9c, 0x40]);
        client.write_all(b"-more").await.unwrap();
        client.shutdown().await.unwrap();
        let mut up = Vec::new();
        target.read_to_end(&mut up).await.unwrap();
        assert_eq!(up, b"early-more");
        target.write_all(b"response").await.unwrap();
        target.shutdown().await.unwrap();
        let mut down = Vec::new();
        client.read_to_end(&mut down).await.unwrap();
        assert_eq!(down, b"response");
    };
    let (outcome, ()) = tokio::join!(serve, drive);
    assert!(
        matches!(
            outcome,
            Outcome::Relayed {
                up: 10,
                down: 8,
                ..
            }
        ),
        "{outcome:?}"
    );
}

// UDP ASSOCIATE, with real UDP sockets on loopback and a host-socket egress.

/// Sends datagrams from one host UDP socket per association; names resolve through `routes`.
#[derive(Default)]
struct LocalUdp {
    live: Arc<std::sync::atomic::AtomicUsize>,
    routes: HashMap<String, SocketAddr>,
}

struct LocalEgress {
    socket: tokio::net::UdpSocket,
    live: Arc<std::sync::atomic::AtomicUsize>,
    routes: HashMap<String, SocketAddr>,
}

impl Drop for LocalEgress {
    fn drop(&mut self) {
        self.live.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl UdpDialer for LocalUdp {
    type Egress = LocalEgress;

    async fn open_udp(&self) -> Result<LocalEgress, DialError> {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .map_err(|e| DialError::from_io(&e))?;
        self.live.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(LocalEgress {
            socket,
            live: Arc::clone(&self.live),
            routes: self.routes.clone(),
        })
    }
}

impl UdpEgress for LocalEgress {
    async fn send_to(
        &mut self,
        target: &TargetAddr,
        payload: &[u8],
    ) -> Result<SocketAddr, DialError> {
        let addr = match target {
            TargetAddr::Ip(addr) => *addr,
            TargetAddr::Domain(name, _) => {
                *self.routes.get(name).ok_or(DialError::HostUnreachable)?
            }
        };
        self.socket
            .send_to(payload, addr)
            .await
            .map_err(|e| DialError::from_io(&e))?;
        Ok(addr)
    }

    async fn recv_from(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.socket.recv_from(buf).await
    }
}

/// A UDP echo server on loopback.
async fn udp_echo() -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

struct RunningUdp {
    running: Running,
    counters: Arc<Socks5Counters>,
    live: Arc<std::sync::atomic::AtomicUsize>,
}

async fn start_udp(config: Socks5Config, udp: LocalUdp) -> RunningUdp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let live = Arc::clone(&udp.live);
    let server =
        Socks5Server::new(config, Arc::new(LocalDialer::default())).with_udp(Arc::new(udp));
    let counters = server.counters();
    let task = tokio::spawn(server.serve(listener, cancel.clone()));
    RunningUdp {
        running: Running { addr, cancel, task },
        counters,
        live,
    }
}

/// Opens an association with raw bytes (no auth); returns the control connection and the relay.
async fn associate(proxy: SocketAddr, requested: &[u8]) -> (TcpStream, SocketAddr) {
    let mut control = TcpStream::connect(proxy).await.unwrap();
    let mut bytes = vec![5, 1, 0, 5, 3, 0];
    bytes.extend_from_slice(requested);
    control.write_all(&bytes).await.unwrap();
    let mut reply = [0u8; 12];
    guard(control.read_exact(&mut reply)).await.unwrap();
    assert_eq!(
        &reply[..5],
        &[5, 0, 5, 0, 0],
        "method selection and success"
    );
    assert_eq!(reply[5], 1, "IPv4 relay address for an IPv4 client");
    let ip = std::net::Ipv4Addr::new(reply[6], reply[7], reply[8], reply[9]);
    let relay = SocketAddr::from((ip, u16::from_be_bytes([reply[10], reply[11]])));
    (control, relay)
}

const ANY_SOURCE: [u8; 7] = [1, 0, 0, 0, 0, 0, 0];

fn udp_datagram(target: &TargetAddr, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    proto::encode_udp_header(target, &mut out);
    out.extend_from_slice(payload);
    out
}

/// Receives one datagram and decodes its §7 header.
async fn recv_reply(socket: &tokio::net::UdpSocket) -> (TargetAddr, Vec<u8>) {
    let mut buf = vec![0u8; 70_000];
    let (n, _) = guard(socket.recv_from(&mut buf)).await.unwrap();
    let d = proto::decode_udp_datagram(&buf[..n]).unwrap();
    (d.target, d.payload.to_vec())
}

/// Waits (bounded) until `f` holds; for state another task changes.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn udp_associate_relays_to_ips_and_names_with_the_source_in_each_reply() {
    let (echo_a, echo_b) = (udp_echo().await, udp_echo().await);
    let udp = LocalUdp {
        routes: [("echo.b".to_string(), echo_b)].into(),
        ..LocalUdp::default()
    };
    let server = start_udp(Socks5Config::default(), udp).await;
    let (_control, relay) = associate(server.running.addr, &ANY_SOURCE).await;
    assert_eq!(
        relay.ip(),
        server.running.addr.ip(),
        "relay on the IP the client reached"
    );
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..50u32 {
        let data = payload(1 + (i as usize * 97) % 1400, u64::from(i));
        let (target, expected_source) = if i % 2 == 0 {
            (TargetAddr::Ip(echo_a), echo_a)
        } else {
            (TargetAddr::Domain("echo.b".into(), 9), echo_b)
        };
        client
            .send_to(&udp_datagram(&target, &data), relay)
            .await
            .unwrap();
        let (source, echoed) = recv_reply(&client).await;
        assert_eq!(source, TargetAddr::Ip(expected_source), "datagram {i}");
        assert_eq!(
            Sha256::digest(&echoed),
            Sha256::digest(&data),
            "datagram {i}"
        );
    }
    // An empty payload is a datagram too.
    client
        .send_to(&udp_datagram(&TargetAddr::Ip(echo_a), b""), relay)
        .await
        .unwrap();
    assert_eq!(recv_reply(&client).await.1, b"");
    let stats = server.counters.snapshot();
    assert_eq!((stats.udp_datagrams_up, stats.udp_datagrams_down), (51, 51));
    assert_eq!(stats.udp_associations_active, 1);
}

#[tokio::test]
async fn fragments_foreign_sources_garbage_and_unknown_names_are_dropped_and_counted() {
    let echo = udp_echo().await;
    let config = Socks5Config {
        udp_max_datagram: 1000,
        ..Socks5Config::default()
    };
    let server = start_udp(config, LocalUdp::default()).await;
    let (_control, relay) = associate(server.running.addr, &ANY_SOURCE).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let intruder = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let good = udp_datagram(&TargetAddr::Ip(echo), b"hello");
    let mut frag = good.clone();
    frag[2] = 1;

    // A fragment first: dropped, and it does not claim the association for its port.
    client.send_to(&frag, relay).await.unwrap();
    client.send_to(&good, relay).await.unwrap();
    assert_eq!(recv_reply(&client).await.1, b"hello");
    // Now the client's port is fixed: another socket of the same host is foreign.
    intruder.send_to(&good, relay).await.unwrap();
    client.send_to(&frag, relay).await.unwrap();
    client.send_to(&[0, 0, 0, 9, 1, 2, 3], relay).await.unwrap();
    client
        .send_to(
            &udp_datagram(&TargetAddr::Domain("nowhere".into(), 1), b"x"),
            relay,
        )
        .await
        .unwrap();
    client
        .send_to(&udp_datagram(&TargetAddr::Ip(echo), &[7u8; 1001]), relay)
        .await
        .unwrap();
    let limit = udp_datagram(&TargetAddr::Ip(echo), &[7u8; 1000]);
    client.send_to(&limit, relay).await.unwrap();
    // Datagrams are handled in order: once the last one is echoed, the others were dropped.
    assert_eq!(recv_reply(&client).await.1, [7u8; 1000]);
    let stats = server.counters.snapshot();
    assert_eq!(stats.udp_dropped_fragments, 2);
    assert_eq!(stats.udp_dropped_foreign, 1);
    assert_eq!(stats.udp_dropped_malformed, 1);
    assert_eq!(stats.udp_dropped_egress, 1);
    assert_eq!(stats.udp_dropped_oversize, 1);
    assert_eq!((stats.udp_datagrams_up, stats.udp_datagrams_down), (2, 2));
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(100), intruder.recv_from(&mut buf))
            .await
            .is_err(),
        "the intruder got an answer"
    );
}

#[tokio::test]
async fn request_port_fixes_the_client_source() {
    let echo = udp_echo().await;
    let server = start_udp(Socks5Config::default(), LocalUdp::default()).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let other = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = client.local_addr().unwrap().port().to_be_bytes();
    let (_control, relay) =
        associate(server.running.addr, &[1, 127, 0, 0, 1, port[0], port[1]]).await;
    let good = udp_datagram(&TargetAddr::Ip(echo), b"mine");
    // The other socket speaks first, but the request named the client's port.
    other.send_to(&good, relay).await.unwrap();
    client.send_to(&good, relay).await.unwrap();
    assert_eq!(recv_reply(&client).await.1, b"mine");
    assert_eq!(server.counters.snapshot().udp_dropped_foreign, 1);
}

#[tokio::test]
async fn association_ends_with_its_control_connection_and_releases_its_sockets() {
    let echo = udp_echo().await;
    let server = start_udp(Socks5Config::default(), LocalUdp::default()).await;
    let (control, relay) = associate(server.running.addr, &ANY_SOURCE).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(&udp_datagram(&TargetAddr::Ip(echo), b"ping"), relay)
        .await
        .unwrap();
    assert_eq!(recv_reply(&client).await.1, b"ping");
    assert_eq!(server.live.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(control);
    let (counters, live) = (Arc::clone(&server.counters), Arc::clone(&server.live));
    eventually("association closed", || {
        counters.snapshot().udp_associations_active == 0
            && live.load(std::sync::atomic::Ordering::SeqCst) == 0
    })
    .await;
    // The relay socket is gone too: the port can be bound again.
    let rebound = tokio::net::UdpSocket::bind(relay).await;
    assert!(rebound.is_ok(), "relay port still bound: {rebound:?}");
}

#[tokio::test]
async fn association_limit_refuses_with_0x01_and_frees_slots() {
    let config = Socks5Config {
        max_udp_associations: 1,
        ..Socks5Config::default()
    };
    let server = start_udp(config, LocalUdp::default()).await;
    let (first, _) = associate(server.running.addr, &ANY_SOURCE).await;
    let mut request = vec![5, 3, 0];
    request.extend_from_slice(&ANY_SOURCE);
    let answer = raw_exchange(
        server.running.addr,
        &[&[5, 1, 0][..], &request].concat(),
        false,
    )
    .await;
    assert_eq!(answer, [vec![5, 0], failure(1)].concat());
    assert_eq!(server.counters.snapshot().udp_associations_refused, 1);
    drop(first);
    let counters = Arc::clone(&server.counters);
    eventually("first association closed", || {
        counters.snapshot().udp_associations_active == 0
    })
    .await;
    let (_second, _) = associate(server.running.addr, &ANY_SOURCE).await;
}

#[tokio::test]
async fn udp_associate_with_credentials() {
    let echo = udp_echo().await;
    let config = Socks5Config {
        auth: Some(Credentials::new("alice", "s3cret").unwrap()),
        ..Socks5Config::default()
    };
    let server = start_udp(config, LocalUdp::default()).await;
    let mut control = TcpStream::connect(server.running.addr).await.unwrap();
    let mut bytes = vec![5, 1, 2];
    proto::encode_user_pass(b"alice", b"s3cret", &mut bytes);
    bytes.extend_from_slice(&[5, 3, 0]);
    bytes.extend_from_slice(&ANY_SOURCE);
    control.write_all(&bytes).await.unwrap();
    let mut reply = [0u8; 14];
    guard(control.read_exact(&mut reply)).await.unwrap();
    assert_eq!(&reply[..7], &[5, 2, 1, 0, 5, 0, 0]);
    let relay = SocketAddr::from((
        [reply[8], reply[9], reply[10], reply[11]],
        u16::from_be_bytes([reply[12], reply[13]]),
    ));
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(&udp_datagram(&TargetAddr::Ip(echo), b"authed"), relay)
        .await
        .unwrap();
    assert_eq!(recv_reply(&client).await.1, b"authed");
}

#[tokio::test]
async fn shutdown_ends_associations() {
    let server = start_udp(Socks5Config::default(), LocalUdp::default()).await;
    let (mut control, _relay) = associate(server.running.addr, &ANY_SOURCE).await;
    server.running.cancel.cancel();
    guard(server.running.task).await.unwrap().unwrap();
    assert_eq!(server.live.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(server.counters.snapshot().udp_associations_active, 0);
    let mut rest = Vec::new();
    let _ = guard(control.read_to_end(&mut rest)).await;
}

#[tokio::test(start_paused = true)]
async fn idle_association_is_closed_at_its_deadline() {
    let (mut client, server_side) = tokio::io::duplex(4096);
    let config = Socks5Config {
        udp_idle_timeout: Duration::from_secs(45),
        ..timeouts()
    };
    let shared = shared_udp(config, PendingDialer, Some(LocalUdp::default()));
    let mut bytes = vec![5, 1, 0, 5, 3, 0];
    bytes.extend_from_slice(&ANY_SOURCE);
    client.write_all(&bytes).await.unwrap();
    let start = tokio::time::Instant::now();
    let outcome = serve_connection(server_side, addrs(), &shared).await;
    assert!(
        matches!(
            outcome,
            Outcome::UdpClosed {
                end: udp::UdpEnd::Idle,
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(45));
    assert_eq!(
        shared
            .udp
            .as_ref()
            .unwrap()
            .live
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.unwrap();
    assert_eq!(
        answer.len(),
        12,
        "method selection and success reply, then EOF"
    );
}

#[tokio::test]
async fn ipv6_clients_get_an_ipv6_relay_on_the_address_they_reached() {
    let echo = udp_echo().await;
    let Ok(listener) = TcpListener::bind("[::1]:0").await else {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    };
    let proxy = listener.local_addr().unwrap();
    let server = Socks5Server::new(Socks5Config::default(), Arc::new(LocalDialer::default()))
        .with_udp(Arc::new(LocalUdp::default()));
    let cancel = CancellationToken::new();
    tokio::spawn(server.serve(listener, cancel.clone()));
    let mut control = TcpStream::connect(proxy).await.unwrap();
    control
        .write_all(&[5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let mut reply = [0u8; 2 + 22];
    guard(control.read_exact(&mut reply)).await.unwrap();
    assert_eq!(&reply[..6], &[5, 0, 5, 0, 0, 4], "IPv6 BND.ADDR");
    let ip: [u8; 16] = reply[6..22].try_into().unwrap();
    let relay = SocketAddr::from((ip, u16::from_be_bytes([reply[22], reply[23]])));
    assert_eq!(relay.ip(), proxy.ip());
    let client = tokio::net::UdpSocket::bind("[::1]:0").await.unwrap();
    client
        .send_to(&udp_datagram(&TargetAddr::Ip(echo), b"six"), relay)
        .await
        .unwrap();
    assert_eq!(
        recv_reply(&client).await,
        (TargetAddr::Ip(echo), b"six".to_vec())
    );
    cancel.cancel();
}
