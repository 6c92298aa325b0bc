//! UDP through the tailnet, and the proxy's credentials and safety check.
//!
//! - SOCKS5 UDP ASSOCIATE driven by PySocks (a client we did not write), against a UDP echo
//!   server on the peer node's netstack, with and without credentials, over IPv4 and IPv6
//!   tailnet addresses; replies checked by SHA-256 and source address.
//! - Hand-made §7 datagrams: FRAG = 1 gets no answer and is counted while normal datagrams keep
//!   working; names and the direct-egress policy; the association and its netstack socket end
//!   with the TCP control connection.
//! - UDP forwards: 8 local clients x 200 datagrams at once, each getting only its own echoes;
//!   idle expiry and eviction, with the netstack sockets released.
//! - curl through SOCKS5 with right and wrong credentials; `tailnode up` refusing a
//!   credential-less public SOCKS5 listener (exit 2) unless told otherwise.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tailnode::dial::{DEFAULT_CONNECT_TIMEOUT, DirectPolicy, TailnetDialer, TargetAddr};
use tailnode::node::{Node, NodeHandle};
use tailnode::socks5::proto::{decode_udp_datagram, encode_udp_header};
use tailnode::socks5::{Socks5Config, Socks5Counters, Socks5Server};
use tailnode::udp_forward::{UdpForward, UdpForwardConfig, UdpForwardCounters};
use tailnode::{Config, ListenAddr};
use tailnode_tests::inproc::{addresses, link, start_node, start_tailnode_linked};
use tailnode_tests::process::{Proc, TempDir, wg_quick};
use tailnode_tests::{free_tcp_port, free_udp_port, wait_for_tcp};
use tailnode_wg::PrivateKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

const ECHO_PORT: u16 = 5353;
const HTTP_PORT: u16 = 80;
const PYTHON: &str = "/usr/bin/python3";

/// Bounds a wait that must end promptly.
async fn guard<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Polls `f` until it holds (bounded): for state other tasks change.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Node 1 (the client side) and node 2 (running a UDP echo and an HTTP service on its netstack),
/// linked over loopback.
struct Net {
    cancel: CancellationToken,
    a: NodeHandle,
    b: NodeHandle,
    _nodes: (Node, Node),
}

impl Drop for Net {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn two_nodes() -> Net {
    tailnode_tests::init_tracing();
    let cancel = CancellationToken::new();
    let (na, nb) = (start_node(1, &cancel).await, start_node(2, &cancel).await);
    let (a, b) = (na.handle(), nb.handle());
    link(&a, 1, &b, 2).await;
    udp_echo_on(&b, ECHO_PORT);
    http_on(&b, HTTP_PORT);
    Net {
        cancel,
        a,
        b,
        _nodes: (na, nb),
    }
}

/// Echoes every datagram to `port` of the node's tailnet addresses.
fn udp_echo_on(node: &NodeHandle, port: u16) {
    let socket = node.netstack().bind_udp(Some(port)).unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
}

const HTTP_BODY: &str = "hello from the tailnet\n";

/// A minimal HTTP service: answers every request with [`HTTP_BODY`] and closes.
fn http_on(node: &NodeHandle, port: u16) {
    let listener = node.netstack().listen(port).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{HTTP_BODY}",
                    HTTP_BODY.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
}

fn echo_target(n: u8, v6: bool) -> SocketAddr {
    SocketAddr::new(addresses(n)[usize::from(v6)], ECHO_PORT)
}

/// A SOCKS5 server with UDP on node `node` (library API, so its counters are visible).
async fn socks_server(
    node: &NodeHandle,
    direct: DirectPolicy,
    cancel: &CancellationToken,
) -> (SocketAddr, Arc<Socks5Counters>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dialer = Arc::new(TailnetDialer::new(
        node.clone(),
        direct,
        DEFAULT_CONNECT_TIMEOUT,
    ));
    let server = Socks5Server::new(Socks5Config::default(), Arc::clone(&dialer)).with_udp(dialer);
    let counters = server.counters();
    tokio::spawn(server.serve(listener, cancel.child_token()));
    (addr, counters)
}

// ---------------------------------------------------------------------------
// PySocks

/// PySocks client: sends COUNT datagrams of varied sizes to the targets in turn through the
/// proxy, and checks that each echo has the SHA-256 of what was sent and the target as its
/// source. A lost datagram is resent (up to 5 times); echoes of earlier datagrams are skipped.
const PYSOCKS_CLIENT: &str = r#"
import hashlib, json, os, socket, sys
import socks

host, port, user, password, count, targets = sys.argv[1:7]
targets = json.loads(targets)
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, host, int(port), username=user or None, password=password or None)
s.settimeout(2)
sent = set()
for i in range(int(count)):
    thost, tport = targets[i % len(targets)]
    payload = os.urandom(1 + (i * 131) % 1200)
    digest = hashlib.sha256(payload).digest()
    sent.add(digest)
    for attempt in range(5):
        s.sendto(payload, (thost, tport))
        try:
            while True:
                data, source = s.recvfrom(65535)
                got = hashlib.sha256(data).digest()
                if got == digest:
                    break
                if got not in sent:
                    sys.exit("an echo of something never sent")
        except socket.timeout:
            continue
        break
    else:
        sys.exit("no echo for datagram %d" % i)
    if (source[0], source[1]) != (thost, tport):
        sys.exit("reply source %r, expected %r" % (source, (thost, tport)))
s.close()
print(json.dumps({"echoed": int(count)}))
"#;

async fn pysocks(
    proxy: SocketAddr,
    auth: Option<(&str, &str)>,
    count: usize,
    targets: &[SocketAddr],
) -> Output {
    let probe = tokio::process::Command::new(PYTHON)
        .args(["-c", "import socks"])
        .output()
        .await
        .expect("run /usr/bin/python3");
    assert!(
        probe.status.success(),
        "PySocks is missing: install python3-socks (scripts/test.sh does, as root)"
    );
    let targets: Vec<(String, u16)> = targets
        .iter()
        .map(|t| (t.ip().to_string(), t.port()))
        .collect();
    let (user, password) = auth.unwrap_or(("", ""));
    let output = tokio::process::Command::new(PYTHON)
        .args(["-c", PYSOCKS_CLIENT])
        .arg(proxy.ip().to_string())
        .arg(proxy.port().to_string())
        .args([user, password])
        .arg(count.to_string())
        .arg(serde_json::to_string(&targets).unwrap())
        .kill_on_drop(true)
        .output();
    guard("PySocks client", output).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pysocks_udp_associate_echoes_over_ipv4_and_ipv6_and_releases_the_socket() {
    let net = two_nodes().await;
    let (proxy, counters) = socks_server(&net.a, DirectPolicy::Refuse, &net.cancel).await;
    let baseline = net.a.netstack().stats().udp_sockets;
    let targets = [echo_target(2, false), echo_target(2, true)];
    let out = pysocks(proxy, None, 300, &targets).await;
    assert!(
        out.status.success(),
        "PySocks failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"echoed": 300}"#
    );
    // Each reply is counted right after it was sent: the script may be done before the count.
    eventually("300 datagrams and replies counted", || {
        let stats = counters.snapshot();
        stats.udp_datagrams_up >= 300 && stats.udp_datagrams_down >= 300
    })
    .await;
    let stats = counters.snapshot();
    assert_eq!(stats.udp_associations, 1);
    assert!(
        stats.udp_datagrams_up >= 300 && stats.udp_datagrams_down >= 300,
        "{stats:?}"
    );
    // The script closed its socket, hence the control connection: the association and its
    // netstack socket are gone.
    eventually("association released", || {
        counters.snapshot().udp_associations_active == 0
            && net.a.netstack().stats().udp_sockets == baseline
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pysocks_with_credentials_through_a_whole_tailnode() {
    let net = two_nodes().await;
    let socks: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let config = Config {
        socks5: ListenAddr::On(socks),
        socks5_user: Some("alice".into()),
        socks5_pass: Some("s3cret".into()),
        ..Config::embedded()
    };
    let _node = start_tailnode_linked(3, config, &net.b, 2, &net.cancel).await;
    wait_for_tcp(socks, Duration::from_secs(5)).await;
    let targets = [echo_target(2, false)];

    let out = pysocks(socks, Some(("alice", "s3cret")), 50, &targets).await;
    assert!(
        out.status.success(),
        "with the right credentials: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (user, password) in [("alice", "wrong"), ("bob", "s3cret")] {
        let out = pysocks(socks, Some((user, password)), 1, &targets).await;
        assert!(!out.status.success(), "{user}:{password} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("SOCKS5"), "{stderr}");
    }
    let out = pysocks(socks, None, 1, &targets).await;
    assert!(!out.status.success(), "no credentials were accepted");
}

// ---------------------------------------------------------------------------
// Hand-made datagrams

/// Opens an association with raw bytes; returns the control connection and the relay.
async fn associate(proxy: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut control = TcpStream::connect(proxy).await.unwrap();
    control
        .write_all(&[5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let mut reply = [0u8; 12];
    guard("associate reply", control.read_exact(&mut reply))
        .await
        .unwrap();
    assert_eq!(&reply[..6], &[5, 0, 5, 0, 0, 1]);
    let relay = SocketAddr::from((
        [reply[6], reply[7], reply[8], reply[9]],
        u16::from_be_bytes([reply[10], reply[11]]),
    ));
    (control, relay)
}

fn datagram(target: &TargetAddr, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_udp_header(target, &mut out);
    out.extend_from_slice(payload);
    out
}

async fn recv_reply(socket: &UdpSocket) -> (TargetAddr, Vec<u8>) {
    let mut buf = vec![0u8; 65536];
    let (n, _) = guard("reply", socket.recv_from(&mut buf)).await.unwrap();
    let d = decode_udp_datagram(&buf[..n]).unwrap();
    (d.target, d.payload.to_vec())
}

/// Sends `payload` until an echo of it comes back (tailnet datagrams can be lost while the
/// first handshake runs); returns the reply's source.
async fn round_trip(
    client: &UdpSocket,
    relay: SocketAddr,
    target: &TargetAddr,
    payload: &[u8],
) -> TargetAddr {
    let bytes = datagram(target, payload);
    let mut buf = vec![0u8; 65536];
    for _ in 0..10 {
        client.send_to(&bytes, relay).await.unwrap();
        let wait = tokio::time::timeout(Duration::from_secs(1), client.recv_from(&mut buf)).await;
        if let Ok(Ok((n, _))) = wait {
            let d = decode_udp_datagram(&buf[..n]).unwrap();
            if d.payload == payload {
                return d.target;
            }
        }
    }
    panic!("no echo of {} bytes to {target}", payload.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_get_no_answer_and_are_counted_while_normal_datagrams_work() {
    let net = two_nodes().await;
    let (proxy, counters) = socks_server(&net.a, DirectPolicy::Refuse, &net.cancel).await;
    let baseline = net.a.netstack().stats().udp_sockets;
    let (control, relay) = associate(proxy).await;
    assert_eq!(
        net.a.netstack().stats().udp_sockets,
        baseline + 1,
        "one netstack socket per association"
    );
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo = TargetAddr::Ip(echo_target(2, false));
    // Warm up the WireGuard session.
    assert_eq!(round_trip(&client, relay, &echo, b"warm-up").await, echo);

    let mut fragment = datagram(&echo, b"fragment");
    fragment[2] = 1;
    client.send_to(&fragment, relay).await.unwrap();
    client
        .send_to(&datagram(&echo, b"whole"), relay)
        .await
        .unwrap();
    let (source, payload) = recv_reply(&client).await;
    assert_eq!((source, payload.as_slice()), (echo.clone(), &b"whole"[..]));
    let stats = counters.snapshot();
    assert_eq!(stats.udp_dropped_fragments, 1, "{stats:?}");
    // The echo server answers everything it gets: nothing else may be on its way.
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf))
            .await
            .is_err(),
        "the fragment was answered"
    );

    // A name that is an IP literal resolves like one; an unknown name is dropped (no direct
    // egress, so the host's DNS is never asked).
    let by_name = TargetAddr::Domain("fd7a:115c:a1e0::2".into(), ECHO_PORT);
    assert_eq!(
        round_trip(&client, relay, &by_name, b"v6 by name").await,
        TargetAddr::Ip(echo_target(2, true))
    );
    client
        .send_to(
            &datagram(&TargetAddr::Domain("no-such-peer".into(), 1), b"x"),
            relay,
        )
        .await
        .unwrap();
    client
        .send_to(&datagram(&echo, b"after"), relay)
        .await
        .unwrap();
    assert_eq!(recv_reply(&client).await.1, b"after");
    assert_eq!(counters.snapshot().udp_dropped_egress, 1);

    drop(control);
    eventually("association and its netstack socket released", || {
        counters.snapshot().udp_associations_active == 0
            && net.a.netstack().stats().udp_sockets == baseline
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_outside_the_tailnet_follow_the_direct_policy() {
    let net = two_nodes().await;
    let host_echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let host_echo_addr = host_echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = host_echo.recv_from(&mut buf).await {
            let _ = host_echo.send_to(&buf[..n], from).await;
        }
    });
    let outside = TargetAddr::Ip(host_echo_addr);
    let tailnet = TargetAddr::Ip(echo_target(2, false));

    let (refusing, refused_counters) =
        socks_server(&net.a, DirectPolicy::Refuse, &net.cancel).await;
    let (_control, relay) = associate(refusing).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    round_trip(&client, relay, &tailnet, b"in").await;
    client
        .send_to(&datagram(&outside, b"out"), relay)
        .await
        .unwrap();
    client
        .send_to(&datagram(&tailnet, b"in again"), relay)
        .await
        .unwrap();
    assert_eq!(recv_reply(&client).await.1, b"in again");
    assert_eq!(refused_counters.snapshot().udp_dropped_egress, 1);

    let (allowing, _) = socks_server(&net.a, DirectPolicy::Allow, &net.cancel).await;
    let (_control, relay) = associate(allowing).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(&datagram(&outside, b"out"), relay)
        .await
        .unwrap();
    let (source, payload) = recv_reply(&client).await;
    assert_eq!((source, payload.as_slice()), (outside, &b"out"[..]));
    assert_eq!(round_trip(&client, relay, &tailnet, b"both").await, tailnet);
}

// ---------------------------------------------------------------------------
// UDP forwards

async fn udp_forward(
    node: &NodeHandle,
    config: UdpForwardConfig,
    cancel: &CancellationToken,
) -> (SocketAddr, Arc<UdpForwardCounters>) {
    let forward = UdpForward::bind(
        "127.0.0.1:0".parse().unwrap(),
        echo_target(2, false),
        node.clone(),
        config,
    )
    .await
    .unwrap();
    let local = forward.local_addr();
    let counters = forward.counters();
    tokio::spawn(forward.serve(cancel.child_token()));
    (local, counters)
}

/// Client `id` sends `count` datagrams through the forward one after the other (resending a lost
/// one), and checks that every datagram it receives is its own.
async fn forward_client(forward: SocketAddr, id: u8, count: u32) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 2048];
    for seq in 0..count {
        let mut payload = vec![id];
        payload.extend_from_slice(&seq.to_be_bytes());
        payload.extend(std::iter::repeat_n(
            id ^ (seq as u8),
            16 + (seq as usize * 37) % 1000,
        ));
        let digest = Sha256::digest(&payload);
        let mut echoed = false;
        for _ in 0..10 {
            socket.send_to(&payload, forward).await.unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            while let Ok(Ok((n, from))) =
                tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
            {
                assert_eq!(from, forward);
                assert_eq!(buf[0], id, "client {id} got client {}'s datagram", buf[0]);
                if Sha256::digest(&buf[..n]) == digest {
                    echoed = true;
                    break;
                }
                let got = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
                assert!(
                    got < seq,
                    "client {id}: echo of {got} while waiting for {seq}"
                );
            }
            if echoed {
                break;
            }
        }
        assert!(echoed, "client {id}: no echo for datagram {seq}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_forward_keeps_eight_concurrent_clients_apart() {
    let net = two_nodes().await;
    let baseline = net.a.netstack().stats().udp_sockets;
    let (local, counters) = udp_forward(&net.a, UdpForwardConfig::default(), &net.cancel).await;
    let clients: Vec<_> = (1..=8u8)
        .map(|id| tokio::spawn(forward_client(local, id, 200)))
        .collect();
    for client in clients {
        guard("forward client", client).await.unwrap();
    }
    // A reply is counted right after it was sent, so the client that got the last one may
    // finish before the count.
    eventually("1600 datagrams and replies counted", || {
        let stats = counters.snapshot();
        stats.datagrams_up >= 1600 && stats.datagrams_down >= 1600
    })
    .await;
    let stats = counters.snapshot();
    assert_eq!((stats.flows, stats.flows_created), (8, 8), "{stats:?}");
    assert!(
        stats.datagrams_up >= 1600 && stats.datagrams_down >= 1600,
        "{stats:?}"
    );
    assert_eq!(
        net.a.netstack().stats().udp_sockets,
        baseline + 8,
        "one netstack socket per flow"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_forward_flows_expire_when_idle_and_the_oldest_is_evicted_when_full() {
    let net = two_nodes().await;
    let baseline = net.a.netstack().stats().udp_sockets;
    let config = UdpForwardConfig {
        idle_timeout: Duration::from_millis(300),
        max_flows: 2,
    };
    let (local, counters) = udp_forward(&net.a, config, &net.cancel).await;
    for id in 1..=3u8 {
        forward_client(local, id, 3).await;
    }
    let stats = counters.snapshot();
    assert_eq!(
        (stats.flows, stats.flows_created, stats.flows_evicted),
        (2, 3, 1),
        "{stats:?}"
    );
    eventually("idle flows expired", || {
        counters.snapshot().flows == 0 && net.a.netstack().stats().udp_sockets == baseline
    })
    .await;
    assert_eq!(counters.snapshot().flows_expired, 2);
    // A client that comes back gets a new flow.
    forward_client(local, 9, 2).await;
    assert_eq!(counters.snapshot().flows_created, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_forward_through_a_whole_tailnode() {
    let net = two_nodes().await;
    let port = free_udp_port();
    let config = Config {
        forward: vec![
            format!("udp:127.0.0.1:{port}={}", echo_target(2, false))
                .parse()
                .unwrap(),
        ],
        ..Config::embedded()
    };
    let _node = start_tailnode_linked(3, config, &net.b, 2, &net.cancel).await;
    forward_client(SocketAddr::from(([127, 0, 0, 1], port)), 7, 20).await;
}

// ---------------------------------------------------------------------------
// Credentials with curl, and the safety check of `tailnode up`

async fn curl(socks: SocketAddr, user_pass: &str) -> Output {
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--socks5-hostname"])
        .arg(socks.to_string())
        .args(["-U", user_pass])
        .arg(format!("http://{}:{HTTP_PORT}/", addresses(2)[0]))
        .kill_on_drop(true)
        .output();
    guard("curl", output).await.expect("run curl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_socks5_with_right_and_wrong_credentials() {
    let net = two_nodes().await;
    let socks: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let config = Config {
        socks5: ListenAddr::On(socks),
        socks5_user: Some("alice".into()),
        socks5_pass: Some("s3cret".into()),
        ..Config::embedded()
    };
    let _node = start_tailnode_linked(3, config, &net.b, 2, &net.cancel).await;
    wait_for_tcp(socks, Duration::from_secs(5)).await;

    let ok = curl(socks, "alice:s3cret").await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout), HTTP_BODY);
    for wrong in ["alice:wrong", "bob:s3cret", "alice:"] {
        let out = curl(socks, wrong).await;
        assert!(!out.status.success(), "{wrong} accepted");
        assert!(out.stdout.is_empty(), "{wrong} got a body");
    }
}

fn up_args(conf: &std::path::Path, socks: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "up",
        "--wg-config",
        &conf.display().to_string(),
        "--socks5",
        socks,
        "--api",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_socks5_needs_credentials_or_the_insecure_flag() {
    let dir = TempDir::new("udp-public-socks");
    let conf = dir.write(
        "node.conf",
        &wg_quick(
            &PrivateKey::generate(),
            &["100.64.0.1/32"],
            free_udp_port(),
            &[],
        ),
    );
    let port = free_tcp_port();
    let public = format!("0.0.0.0:{port}");
    let local = SocketAddr::from(([127, 0, 0, 1], port));

    let mut refused = Proc::tailnode("refused", &dir, &up_args(&conf, &public, &[]));
    let status = refused.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(2), "{}", refused.log());
    let log = refused.log();
    assert!(
        log.contains("without credentials") && log.contains("--socks5-insecure-public"),
        "{log}"
    );

    let mut insecure = Proc::tailnode(
        "insecure",
        &dir,
        &up_args(&conf, &public, &["--socks5-insecure-public"]),
    );
    wait_for_tcp(local, Duration::from_secs(20)).await;
    assert!(insecure.is_running());
    assert_eq!(
        greeting(local, &[5, 1, 0]).await,
        [5, 0],
        "no authentication"
    );
    drop(insecure);

    let mut with_env = Proc::spawn(
        "credentials",
        &tailnode_tests::tailnode_bin(),
        &up_args(&conf, &public, &[]),
        &[
            ("TAILNODE_SOCKS5_USER", "alice"),
            ("TAILNODE_SOCKS5_PASS", "s3cret"),
        ],
        dir.path().join("credentials.log"),
    );
    wait_for_tcp(local, Duration::from_secs(20)).await;
    assert!(with_env.is_running());
    assert_eq!(
        greeting(local, &[5, 1, 0]).await,
        [5, 0xFF],
        "auth required"
    );
    assert_eq!(greeting(local, &[5, 1, 2]).await, [5, 2]);
    assert!(!with_env.log().contains("s3cret"), "password in the log");
}

async fn greeting(proxy: SocketAddr, bytes: &[u8]) -> [u8; 2] {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = [0u8; 2];
    guard("greeting", stream.read_exact(&mut answer))
        .await
        .unwrap();
    answer
}
