//! The coordinator over real sockets on 127.0.0.1 with real websocket
//! clients: HTTP front, joins and fan-out, goodbye vs lost, refusals that
//! leave everyone else alone, replacement, persistence, pings, overflow.
#![allow(clippy::unwrap_used, missing_docs)]

mod coordinator_support;

use std::net::SocketAddr;
use std::time::Duration;

use coordinator_support::*;
use futures_util::{SinkExt, StreamExt};
use tailnode_control::coordinator::{AuthKeySource, CoordinatorError};
use tailnode_control::proto::{
    ClientMessage, ErrorCode, MAX_CLIENT_MESSAGE, MAX_ENDPOINTS, NodeKey, PROTOCOL_VERSION,
    PeerStatus, ServerMessage, UpdateKind,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Sends raw bytes, half-closes nothing, and reads the answer to EOF.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("the coordinator answers and closes")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn expect_update(
    msg: ServerMessage,
    kind: UpdateKind,
    name: &str,
) -> tailnode_control::proto::PeerInfo {
    match msg {
        ServerMessage::PeerUpdate { kind: k, peer } if k == kind && peer.name == name => peer,
        other => panic!("expected {kind:?} for {name}, got {other:?}"),
    }
}

async fn expect_error(ws: &mut Client, code: ErrorCode) -> String {
    match recv(ws).await {
        ServerMessage::Error { code: c, reason } if c == code => {
            expect_closed(ws).await;
            reason
        }
        other => panic!("expected error {code:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn http_front_answers_health_refuses_the_rest_and_survives_garbage() {
    let dir = temp_dir("http");
    let mut cfg = config(&dir);
    cfg.handshake_timeout = Duration::from_millis(300);
    let c = Coordinator::start(cfg).await.unwrap();

    let health = raw_exchange(c.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
    assert!(health.ends_with("\r\n\r\nok"), "{health}");

    let missing = raw_exchange(c.addr, b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
    let post = raw_exchange(
        c.addr,
        b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    let no_upgrade =
        raw_exchange(c.addr, b"GET /tailnode/v1/node HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(no_upgrade.starts_with("HTTP/1.1 426 "), "{no_upgrade}");

    let garbage = raw_exchange(c.addr, b"\x16\x03\x01\x00\xa5garbage\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    let huge = raw_exchange(c.addr, &vec![b'A'; 20_000]).await;
    assert!(huge.starts_with("HTTP/1.1 431 "), "{huge}");

    // A connection that says nothing is closed after the handshake timeout.
    let mut idle = TcpStream::connect(c.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(PATIENCE, idle.read(&mut buf))
        .await
        .expect("idle connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // Still serving, websocket too.
    let again = raw_exchange(c.addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
    assert!(again.starts_with("HTTP/1.1 200 OK"), "{again}");
    let j = join(&c.url(), 1, "after-garbage").await;
    assert_eq!(j.name, "after-garbage");
    c.stop().await;
}

#[tokio::test]
async fn two_nodes_join_with_distinct_identities_and_see_each_other() {
    let dir = temp_dir("join");
    let c = Coordinator::start(config(&dir)).await.unwrap();
    let mut a = join(&c.url(), 1, "db").await;
    assert!(a.peers.is_empty());
    let b = join(&c.url(), 2, "db").await;
    assert_eq!((a.name.as_str(), b.name.as_str()), ("db", "db-2"));
    let range: ipnet::Ipv4Net = "100.64.0.0/10".parse().unwrap();
    let prefix: ipnet::Ipv6Net = "fd7a:115c:a1e0::/48".parse().unwrap();
    for j in [&a, &b] {
        assert!(range.contains(&j.ipv4), "{}", j.ipv4);
        assert!(prefix.contains(&j.ipv6), "{}", j.ipv6);
        assert_eq!(j.observed.ip(), std::net::Ipv4Addr::LOCALHOST);
    }
    assert_ne!(a.ipv4, b.ipv4);
    assert_ne!(a.ipv6, b.ipv6);

    // The second's snapshot has the first, observed endpoint first.
    assert_eq!(b.peers.len(), 1);
    let first = &b.peers[0];
    assert_eq!(first.node_key, key(1));
    assert_eq!(
        (first.name.as_str(), first.ipv4, first.ipv6),
        ("db", a.ipv4, a.ipv6)
    );
    assert_eq!(first.status, PeerStatus::Online);
    assert_eq!(
        first.endpoints,
        vec![
            SocketAddr::from(([127, 0, 0, 1], 40001)),
            SocketAddr::from(([192, 0, 2, 1], 41641))
        ]
    );

    // The first hears about the second.
    let peer = expect_update(recv(&mut a.ws).await, UpdateKind::Node, "db-2");
    assert_eq!(peer.node_key, key(2));
    assert_eq!((peer.ipv4, peer.ipv6), (b.ipv4, b.ipv6));
    assert_eq!(peer.endpoints[0], SocketAddr::from(([127, 0, 0, 1], 40002)));

    // An update from the second fans out, unspecified and port-0 dropped.
    let mut b_ws = b.ws;
    send(
        &mut b_ws,
        &ClientMessage::Update {
            endpoints: vec![
                "10.1.1.1:41641".parse().unwrap(),
                "0.0.0.0:41641".parse().unwrap(),
                "10.1.1.2:0".parse().unwrap(),
            ],
        },
    )
    .await;
    let peer = expect_update(recv(&mut a.ws).await, UpdateKind::Node, "db-2");
    assert_eq!(
        peer.endpoints,
        vec![
            SocketAddr::from(([127, 0, 0, 1], 40002)),
            "10.1.1.1:41641".parse().unwrap()
        ]
    );
    c.stop().await;
}

#[tokio::test]
async fn goodbye_disconnects_abrupt_close_loses_and_return_rejoins() {
    let dir = temp_dir("lifecycle");
    let c = Coordinator::start(config(&dir)).await.unwrap();
    let mut a = join(&c.url(), 1, "a").await;
    let mut b = join(&c.url(), 2, "b").await;
    let cc = join(&c.url(), 3, "c").await;
    expect_update(recv(&mut a.ws).await, UpdateKind::Node, "b");
    expect_update(recv(&mut a.ws).await, UpdateKind::Node, "c");
    expect_update(recv(&mut b.ws).await, UpdateKind::Node, "c");

    // b says goodbye: a gets disconnected, and b is closed.
    send(&mut b.ws, &ClientMessage::Goodbye).await;
    expect_update(recv(&mut a.ws).await, UpdateKind::Disconnected, "b");
    expect_closed(&mut b.ws).await;

    // c vanishes without a word (TCP closed, no websocket close): lost.
    drop(cc);
    let peer = expect_update(recv(&mut a.ws).await, UpdateKind::Lost, "c");
    assert_eq!(peer.status, PeerStatus::Lost);

    // A newcomer sees a (online) and c (lost), not b.
    let d = join(&c.url(), 4, "d").await;
    let seen: Vec<(&str, PeerStatus)> = d
        .peers
        .iter()
        .map(|p| (p.name.as_str(), p.status))
        .collect();
    assert_eq!(
        seen,
        vec![("a", PeerStatus::Online), ("c", PeerStatus::Lost)]
    );
    expect_update(recv(&mut a.ws).await, UpdateKind::Node, "d");

    // c comes back: node again, same identity.
    let c2 = join(&c.url(), 3, "c").await;
    let peer = expect_update(recv(&mut a.ws).await, UpdateKind::Node, "c");
    assert_eq!(peer.status, PeerStatus::Online);
    assert_eq!(peer.ipv4, c2.ipv4);
    assert_eq!(c2.name, "c");
    c.stop().await;
}

#[tokio::test]
async fn bad_sessions_are_refused_while_a_good_node_keeps_receiving() {
    let dir = temp_dir("bad");
    let c = Coordinator::start(config(&dir)).await.unwrap();
    let url = c.url();
    let mut good = join(&url, 1, "good").await;

    let hello_with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&hello(9, "bad").to_json()).unwrap();
        f(&mut v);
        Message::text(v.to_string())
    };

    // Bad auth key.
    let mut ws = connect(&url).await;
    ws.send(hello_with(&|v| v["auth_key"] = "wrong".into()))
        .await
        .unwrap();
    let reason = expect_error(&mut ws, ErrorCode::BadAuthKey).await;
    assert!(
        !reason.contains("wrong") && !reason.contains(AUTH),
        "{reason}"
    );

    // Unknown version: the reason names both.
    let mut ws = connect(&url).await;
    ws.send(hello_with(&|v| v["version"] = 99.into()))
        .await
        .unwrap();
    let reason = expect_error(&mut ws, ErrorCode::UnsupportedVersion).await;
    assert!(
        reason.contains("99") && reason.contains(&PROTOCOL_VERSION.to_string()),
        "{reason}"
    );

    // Version is checked before the auth key.
    let mut ws = connect(&url).await;
    ws.send(hello_with(&|v| {
        v["version"] = 2.into();
        v["auth_key"] = "wrong".into();
    }))
    .await
    .unwrap();
    expect_error(&mut ws, ErrorCode::UnsupportedVersion).await;

    // Malformed JSON.
    let mut ws = connect(&url).await;
    ws.send(Message::text("{\"type\":\"hello\", nope"))
        .await
        .unwrap();
    expect_error(&mut ws, ErrorCode::MalformedMessage).await;

    // Binary frame.
    let mut ws = connect(&url).await;
    ws.send(Message::binary(hello(9, "bad").to_json().into_bytes()))
        .await
        .unwrap();
    let reason = expect_error(&mut ws, ErrorCode::MalformedMessage).await;
    assert!(reason.contains("binary"), "{reason}");

    // Oversized frame.
    let mut ws = connect(&url).await;
    ws.send(Message::text("x".repeat(MAX_CLIENT_MESSAGE + 1000)))
        .await
        .unwrap();
    expect_error(&mut ws, ErrorCode::MessageTooLarge).await;

    // All-zero (small-order) node key.
    let mut ws = connect(&url).await;
    ws.send(hello_with(&|v| {
        v["node_key"] = NodeKey([0; 32]).to_string().into()
    }))
    .await
    .unwrap();
    expect_error(&mut ws, ErrorCode::InvalidNodeKey).await;

    // Anything before hello.
    let mut ws = connect(&url).await;
    send(&mut ws, &ClientMessage::Update { endpoints: vec![] }).await;
    let reason = expect_error(&mut ws, ErrorCode::ProtocolViolation).await;
    assert!(reason.contains("hello"), "{reason}");

    // A second hello from an admitted node: refused, and the node is lost.
    let mut twice = join(&url, 5, "twice").await;
    send(&mut twice.ws, &hello(5, "twice")).await;
    expect_error(&mut twice.ws, ErrorCode::ProtocolViolation).await;

    // Garbage from an admitted node: refused, and the node is lost.
    let mut messy = join(&url, 6, "messy").await;
    messy.ws.send(Message::text("[1,2,3]")).await.unwrap();
    expect_error(&mut messy.ws, ErrorCode::MalformedMessage).await;

    // None of the refused hellos reached the good node; the admitted ones
    // joined and were lost; and it still hears about newcomers.
    let _last = join(&url, 7, "last").await;
    expect_update(recv(&mut good.ws).await, UpdateKind::Node, "twice");
    expect_update(recv(&mut good.ws).await, UpdateKind::Lost, "twice");
    expect_update(recv(&mut good.ws).await, UpdateKind::Node, "messy");
    expect_update(recv(&mut good.ws).await, UpdateKind::Lost, "messy");
    expect_update(recv(&mut good.ws).await, UpdateKind::Node, "last");
    c.stop().await;
}

#[tokio::test]
async fn a_second_session_of_the_same_key_replaces_the_first_without_lost() {
    let dir = temp_dir("replace");
    let c = Coordinator::start(config(&dir)).await.unwrap();
    let mut a = join(&c.url(), 1, "a").await;
    let mut b1 = join(&c.url(), 2, "b").await;
    expect_update(recv(&mut a.ws).await, UpdateKind::Node, "b");

    let b2 = join(&c.url(), 2, "b").await;
    assert_eq!((b2.name.as_str(), b2.ipv4), ("b", b1.ipv4));
    assert_eq!(
        b2.peers.len(),
        1,
        "the replaced session is not a peer of itself"
    );
    expect_error(&mut b1.ws, ErrorCode::Replaced).await;

    // a hears `node` for the replacement, and no `lost` ever follows it.
    expect_update(recv(&mut a.ws).await, UpdateKind::Node, "b");
    let _c = join(&c.url(), 3, "c").await;
    expect_update(recv(&mut a.ws).await, UpdateKind::Node, "c");
    c.stop().await;
}

#[tokio::test]
async fn identities_survive_a_restart_and_corrupt_state_is_a_startup_error() {
    let dir = temp_dir("restart");
    let c = Coordinator::start(config(&dir)).await.unwrap();
    let a = join(&c.url(), 1, "alpha").await;
    let b = join(&c.url(), 2, "alpha").await;
    drop((a.ws, b.ws));
    c.stop().await;

    let c = Coordinator::start(config(&dir)).await.unwrap();
    // Reverse order: addresses and names still follow the keys.
    let b2 = join(&c.url(), 2, "alpha").await;
    let a2 = join(&c.url(), 1, "alpha").await;
    assert_eq!(
        (b2.name.as_str(), b2.ipv4, b2.ipv6),
        ("alpha-2", b.ipv4, b.ipv6)
    );
    assert_eq!(
        (a2.name.as_str(), a2.ipv4, a2.ipv6),
        ("alpha", a.ipv4, a.ipv6)
    );
    let n = join(&c.url(), 3, "alpha").await;
    assert_eq!(n.name, "alpha-3");
    assert!(n.ipv4 != a.ipv4 && n.ipv4 != b.ipv4);
    c.stop().await;

    let state = dir.join("coordinator.json");
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(
        text.contains("alpha-3"),
        "the newcomer was persisted: {text}"
    );

    std::fs::write(&state, b"{\"version\":1,\"nodes\":[{\"oops\"").unwrap();
    let err = Coordinator::start(config(&dir))
        .await
        .err()
        .expect("corrupt state refused");
    assert!(
        matches!(err, CoordinatorError::StateCorrupt { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&state.display().to_string()),
        "{err}"
    );
    // The corrupt file is left for the operator.
    assert!(
        std::fs::read(&state)
            .unwrap()
            .starts_with(b"{\"version\":1")
    );
}

#[tokio::test]
async fn a_node_that_stops_answering_pings_is_dropped_as_lost() {
    let dir = temp_dir("ping");
    let mut cfg = config(&dir);
    cfg.ping_interval = Duration::from_millis(100);
    let c = Coordinator::start(cfg).await.unwrap();
    let mut watcher = join(&c.url(), 1, "watcher").await;
    // The silent node completes its join, then is never polled again: it
    // answers no ping.
    let silent = join(&c.url(), 2, "silent").await;
    expect_update(recv(&mut watcher.ws).await, UpdateKind::Node, "silent");
    let started = std::time::Instant::now();
    let peer = expect_update(recv(&mut watcher.ws).await, UpdateKind::Lost, "silent");
    assert_eq!(peer.status, PeerStatus::Lost);
    assert!(started.elapsed() < PATIENCE);
    // The watcher, which does answer, is still served.
    let _n = join(&c.url(), 3, "next").await;
    expect_update(recv(&mut watcher.ws).await, UpdateKind::Node, "next");
    drop(silent);
    c.stop().await;
}

#[tokio::test]
async fn auth_key_file_is_reread_so_keys_rotate_without_restart() {
    let dir = temp_dir("rotate");
    let key_file = dir.join("auth.key");
    std::fs::write(&key_file, format!("{AUTH}\n")).unwrap();
    let mut cfg = config(&dir);
    cfg.auth_key = AuthKeySource::File(key_file.clone());
    let c = Coordinator::start(cfg).await.unwrap();
    let _a = join(&c.url(), 1, "a").await;

    std::fs::write(&key_file, "the-new-key\n").unwrap();
    let mut ws = connect(&c.url()).await;
    send(&mut ws, &hello(2, "b")).await;
    expect_error(&mut ws, ErrorCode::BadAuthKey).await;

    let mut ws = connect(&c.url()).await;
    let ClientMessage::Hello {
        version,
        node_key,
        name,
        udp_port,
        endpoints,
        ..
    } = hello(2, "b")
    else {
        unreachable!()
    };
    send(
        &mut ws,
        &ClientMessage::Hello {
            version,
            auth_key: "the-new-key".into(),
            node_key,
            name,
            udp_port,
            endpoints,
        },
    )
    .await;
    assert!(matches!(recv(&mut ws).await, ServerMessage::Welcome { .. }));
    c.stop().await;

    // A missing key file is a start-up error.
    let mut cfg = config(&dir);
    cfg.auth_key = AuthKeySource::File(dir.join("missing.key"));
    let err = Coordinator::start(cfg)
        .await
        .err()
        .expect("missing key file refused");
    assert!(matches!(err, CoordinatorError::AuthKeyFile { .. }), "{err}");
}

#[tokio::test]
async fn connection_limit_closes_extra_connections() {
    let dir = temp_dir("limit");
    let mut cfg = config(&dir);
    cfg.max_connections = 1;
    let c = Coordinator::start(cfg).await.unwrap();
    let _held = join(&c.url(), 1, "only").await;
    let mut extra = TcpStream::connect(c.addr).await.unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, extra.read_to_end(&mut out))
        .await
        .expect("extra connection is closed");
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    c.stop().await;
}

/// A node that never reads fills its queue and is dropped (lost); the
/// others, including the one causing the traffic, carry on.
#[tokio::test]
async fn a_node_that_never_reads_is_dropped_when_its_queue_fills() {
    let dir = temp_dir("overflow");
    let mut cfg = config(&dir);
    // Pings must not be what drops it.
    cfg.ping_interval = Duration::from_secs(120);
    cfg.session_queue = 256;
    let c = Coordinator::start(cfg).await.unwrap();
    let mut watcher = join(&c.url(), 1, "watcher").await;
    let stuck = join_on(connect_small_rcvbuf(c.addr, &c.url()).await, 2, "stuck").await;
    let mut talker = join(&c.url(), 3, "talker").await;
    expect_update(recv(&mut watcher.ws).await, UpdateKind::Node, "stuck");
    expect_update(recv(&mut watcher.ws).await, UpdateKind::Node, "talker");

    // Big updates (MAX_ENDPOINTS long IPv6 endpoints) until the stuck
    // node's socket buffers and queue are full. The watcher keeps up, one
    // burst at a time.
    let endpoints = |round: u32| -> Vec<SocketAddr> {
        (0..MAX_ENDPOINTS as u16 - 1)
            .map(|i| {
                SocketAddr::new(
                    std::net::Ipv6Addr::new(
                        0xfd00,
                        0x1234,
                        0x5678,
                        0x9abc,
                        0xdef0,
                        0x1234,
                        (round >> 16) as u16,
                        round as u16,
                    )
                    .into(),
                    60000 + i,
                )
            })
            .collect()
    };
    let mut round = 0u32;
    'outer: for _burst in 0..400 {
        for _ in 0..32 {
            round += 1;
            send(
                &mut talker.ws,
                &ClientMessage::Update {
                    endpoints: endpoints(round),
                },
            )
            .await;
        }
        // Read the watcher up to this burst's last update; stop at the lost.
        loop {
            match recv(&mut watcher.ws).await {
                ServerMessage::PeerUpdate {
                    kind: UpdateKind::Lost,
                    peer,
                } => {
                    assert_eq!(peer.name, "stuck");
                    break 'outer;
                }
                ServerMessage::PeerUpdate {
                    kind: UpdateKind::Node,
                    peer,
                } if peer.name == "talker" => {
                    if peer.endpoints.get(1) == endpoints(round).first() {
                        break;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(_burst < 399, "the stuck node was never dropped");
    }
    // The talker is still connected and heard nothing bad.
    let _late = join(&c.url(), 4, "late").await;
    expect_update(recv(&mut talker.ws).await, UpdateKind::Lost, "stuck");
    expect_update(recv(&mut talker.ws).await, UpdateKind::Node, "late");
    drop(stuck);
    c.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sessions_and_stops() {
    let dir = temp_dir("shutdown");
    let c = Coordinator::start(config(&dir)).await.unwrap();
    let mut a = join(&c.url(), 1, "a").await;
    let addr = c.addr;
    c.stop().await;
    expect_closed(&mut a.ws).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn ping_answers_keep_an_idle_node_online() {
    let dir = temp_dir("pong");
    let mut cfg = config(&dir);
    cfg.ping_interval = Duration::from_millis(50);
    let c = Coordinator::start(cfg).await.unwrap();
    let mut a = join(&c.url(), 1, "a").await;
    // Read (and so answer pings) for many intervals.
    let mut pings = 0;
    while pings < 10 {
        match tokio::time::timeout(PATIENCE, a.ws.next()).await.unwrap() {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // Still admitted: a newcomer sees it online.
    let b = join(&c.url(), 2, "b").await;
    assert_eq!(b.peers.len(), 1);
    assert_eq!(b.peers[0].status, PeerStatus::Online);
    c.stop().await;
}

#[tokio::test]
async fn a_websocket_that_never_says_hello_is_refused_in_time() {
    let dir = temp_dir("nohello");
    let mut cfg = config(&dir);
    cfg.handshake_timeout = Duration::from_millis(300);
    let c = Coordinator::start(cfg).await.unwrap();
    let mut ws = connect(&c.url()).await;
    let reason = expect_error(&mut ws, ErrorCode::ProtocolViolation).await;
    assert!(reason.contains("no hello"), "{reason}");
    // Others are unaffected.
    let j = join(&c.url(), 1, "prompt").await;
    assert_eq!(j.name, "prompt");
    c.stop().await;
}

/// Snapshots far larger than one write buffer arrive whole: they are sent
/// as websocket fragments, so no session keeps a snapshot-sized buffer.
#[tokio::test]
async fn large_snapshots_arrive_whole_through_fragments() {
    let dir = temp_dir("fragments");
    let c = Coordinator::start(config(&dir)).await.unwrap();
    let long = "n".repeat(60);
    let mut joined = Vec::new();
    for seed in 1..=200u8 {
        joined.push(join(&c.url(), seed, &format!("{long}{seed}")).await);
    }
    let last = joined.last().unwrap();
    assert_eq!(last.peers.len(), 199);
    let bytes: usize = last.peers.iter().map(|p| p.name.len() + 150).sum();
    assert!(
        bytes > 2 * (16 << 10),
        "the snapshot spans several fragments ({bytes} bytes)"
    );
    let mut names: Vec<&str> = last.peers.iter().map(|p| p.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 199, "every peer exactly once");
    c.stop().await;
}
