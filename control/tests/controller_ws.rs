//! The real `WebSocketTransport` against tiny websocket servers started on
//! 127.0.0.1 in the test (tokio-tungstenite `accept` speaking the protocol
//! by hand), plus the classification of refused, silent, HTTP-error, DNS and
//! TLS failures. Real sockets and the real clock, with short timeouts.
#![allow(clippy::unwrap_used, clippy::result_large_err, missing_docs)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tailnode_control::controller::{
    ControlStatus, Controller, ControllerConfig, CoordinatorUrl, DataPlane, DialError, Incoming,
    SelfInfo, Session, Transport, WebSocketTransport,
};
use tailnode_control::proto::{
    ClientMessage, ErrorCode, NODE_PATH, NodeKey, PeerInfo, PeerStatus, ServerMessage,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_util::sync::CancellationToken;

const TEST_TIMEOUT: Duration = Duration::from_secs(20);

fn key(b: u8) -> NodeKey {
    NodeKey([b; 32])
}

fn peer(b: u8) -> PeerInfo {
    PeerInfo {
        node_key: key(b),
        name: format!("peer{b}"),
        ipv4: Ipv4Addr::new(100, 64, 0, b),
        ipv6: format!("fd7a:115c:a1e0::{b}").parse().unwrap(),
        endpoints: vec![format!("192.0.2.{b}:41641").parse().unwrap()],
        status: PeerStatus::Online,
    }
}

/// What the hand-written coordinator observed.
#[derive(Debug, PartialEq)]
enum Seen {
    Path(String),
    Client(ClientMessage),
    /// The client answered our ping.
    Pong,
}

/// A one-protocol-at-a-time coordinator: for each connection, expects
/// `hello` with `auth_key`, answers welcome + snapshot(`peers`) + a ping,
/// then reports everything it receives. A wrong key gets `error{bad_auth_key}`.
async fn fake_coordinator(
    auth_key: &'static str,
    peers: Vec<PeerInfo>,
) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = listener.accept().await.unwrap();
            let tx = tx.clone();
            let peers = peers.clone();
            tokio::spawn(async move {
                let path_tx = tx.clone();
                let callback = move |req: &Request, resp: Response| {
                    let _ = path_tx.send(Seen::Path(req.uri().path().to_owned()));
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                    return;
                };
                let Some(Ok(Message::Text(hello))) = ws.next().await else {
                    return;
                };
                let hello = ClientMessage::from_json(hello.as_str()).unwrap();
                let ClientMessage::Hello {
                    auth_key: got_key, ..
                } = &hello
                else {
                    panic!("first message must be hello: {hello:?}");
                };
                if got_key != auth_key {
                    let err = ServerMessage::Error {
                        code: ErrorCode::BadAuthKey,
                        reason: "wrong auth key".into(),
                    };
                    let _ = ws.send(Message::text(err.to_json())).await;
                    let _ = ws.close(None).await;
                    return;
                }
                let _ = tx.send(Seen::Client(hello));
                let welcome = ServerMessage::Welcome {
                    version: 1,
                    name: "me".into(),
                    ipv4: Ipv4Addr::new(100, 64, 0, 1),
                    ipv6: "fd7a:115c:a1e0::1".parse().unwrap(),
                    domain: "tailnet.internal".into(),
                    observed_addr: remote,
                };
                ws.send(Message::text(welcome.to_json())).await.unwrap();
                let snap = ServerMessage::Snapshot { peers };
                ws.send(Message::text(snap.to_json())).await.unwrap();
                ws.send(Message::Ping(b"srv".to_vec().into()))
                    .await
                    .unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    let seen = match msg {
                        Message::Text(t) => {
                            Seen::Client(ClientMessage::from_json(t.as_str()).unwrap())
                        }
                        Message::Pong(p) if p.as_ref() == b"srv" => Seen::Pong,
                        _ => continue,
                    };
                    let _ = tx.send(seen);
                }
            });
        }
    });
    (addr, rx)
}

fn url(addr: SocketAddr) -> CoordinatorUrl {
    format!("ws://{addr}").parse().unwrap()
}

fn hello(auth_key: &str) -> ClientMessage {
    ClientMessage::Hello {
        version: 1,
        auth_key: auth_key.into(),
        node_key: key(200),
        name: "me".into(),
        udp_port: 41641,
        endpoints: vec![],
    }
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(TEST_TIMEOUT, rx.recv())
        .await
        .expect("coordinator saw something")
        .expect("coordinator alive")
}

async fn recv(session: &mut impl Session) -> Incoming {
    tokio::time::timeout(TEST_TIMEOUT, session.recv())
        .await
        .expect("message in time")
        .expect("session alive")
}

#[tokio::test]
async fn websocket_session_speaks_the_protocol() {
    let (addr, mut seen) = fake_coordinator("k", vec![peer(1)]).await;
    let transport = WebSocketTransport::new(None).unwrap();
    let mut session = transport.dial(&url(addr)).await.unwrap();
    assert_eq!(next_seen(&mut seen).await, Seen::Path(NODE_PATH.into()));

    session.send(&hello("k")).await.unwrap();
    assert_eq!(next_seen(&mut seen).await, Seen::Client(hello("k")));
    let Incoming::Message(ServerMessage::Welcome { observed_addr, .. }) = recv(&mut session).await
    else {
        panic!("welcome expected");
    };
    assert_eq!(observed_addr.ip(), addr.ip());
    assert_eq!(
        recv(&mut session).await,
        Incoming::Message(ServerMessage::Snapshot {
            peers: vec![peer(1)]
        })
    );
    // Our ping is answered; the coordinator's ping was answered inside recv.
    session.ping().await.unwrap();
    assert_eq!(recv(&mut session).await, Incoming::Pong);
    assert_eq!(next_seen(&mut seen).await, Seen::Pong);

    session.send(&ClientMessage::Goodbye).await.unwrap();
    assert_eq!(
        next_seen(&mut seen).await,
        Seen::Client(ClientMessage::Goodbye)
    );
    session.close().await;
}

#[derive(Default)]
struct Recorder {
    upserts: Mutex<Vec<(NodeKey, bool)>>,
    me: Mutex<Option<SelfInfo>>,
}

impl DataPlane for Recorder {
    async fn set_self(&self, me: SelfInfo) {
        *self.me.lock().unwrap() = Some(me);
    }
    async fn upsert_peer(&self, peer: &PeerInfo, fresh_session: bool) {
        self.upserts
            .lock()
            .unwrap()
            .push((peer.node_key, fresh_session));
    }
    async fn remove_peer(&self, _key: &NodeKey) {}
    async fn last_handshakes(&self) -> HashMap<NodeKey, Instant> {
        HashMap::new()
    }
    fn endpoints(&self) -> Vec<SocketAddr> {
        vec!["192.0.2.200:41641".parse().unwrap()]
    }
}

fn config(url: CoordinatorUrl, auth_key: &str) -> ControllerConfig {
    let mut c = ControllerConfig::new(url, auth_key.into(), key(200), "me".into(), 41641);
    c.dial_timeout = Duration::from_millis(300);
    c.retry_initial_backoff = Duration::from_millis(10);
    c.retry_max_backoff = Duration::from_millis(50);
    c
}

async fn wait_status(
    status: &mut watch::Receiver<ControlStatus>,
    mut cond: impl FnMut(&ControlStatus) -> bool,
) -> ControlStatus {
    tokio::time::timeout(TEST_TIMEOUT, status.wait_for(|s| cond(s)))
        .await
        .expect("status reached in time")
        .unwrap()
        .clone()
}

#[tokio::test]
async fn controller_over_websocket_recoordinates_and_says_goodbye() {
    let (addr, mut seen) = fake_coordinator("k", vec![peer(1), peer(2)]).await;
    let dp = Arc::new(Recorder::default());
    let controller = Controller::new(
        config(url(addr), "k"),
        WebSocketTransport::new(None).unwrap(),
        Arc::clone(&dp),
    );
    let mut status = controller.status();
    let directory = controller.directory();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(controller.run(cancel.clone()));
    wait_status(&mut status, |s| s.sessions_healthy == 1).await;
    let ok = tokio::time::timeout(TEST_TIMEOUT, async {
        while dp.upserts.lock().unwrap().len() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(ok.is_ok());
    assert_eq!(
        *dp.upserts.lock().unwrap(),
        vec![(key(1), false), (key(2), false)]
    );
    assert_eq!(dp.me.lock().unwrap().as_ref().unwrap().name, "me");
    assert_eq!(
        directory.resolve("peer2.tailnet.internal"),
        Some((peer(2).ipv4, peer(2).ipv6))
    );
    assert_eq!(next_seen(&mut seen).await, Seen::Path(NODE_PATH.into()));
    let Seen::Client(ClientMessage::Hello { endpoints, .. }) = next_seen(&mut seen).await else {
        panic!("hello expected");
    };
    assert_eq!(endpoints, dp.endpoints());

    cancel.cancel();
    tokio::time::timeout(TEST_TIMEOUT, task)
        .await
        .unwrap()
        .unwrap();
    // Skip the pong to the coordinator's ping, if it came first.
    let mut last = next_seen(&mut seen).await;
    if last == Seen::Pong {
        last = next_seen(&mut seen).await;
    }
    assert_eq!(last, Seen::Client(ClientMessage::Goodbye));
}

#[tokio::test]
async fn bad_auth_key_is_retried_not_fatal() {
    let (addr, _seen) = fake_coordinator("right", vec![]).await;
    let controller = Controller::new(
        config(url(addr), "wrong"),
        WebSocketTransport::new(None).unwrap(),
        Arc::new(Recorder::default()),
    );
    let mut status = controller.status();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(controller.run(cancel.clone()));
    let st = wait_status(&mut status, |s| {
        s.dial_failures_by_kind.get("rejected").copied() >= Some(3)
    })
    .await;
    assert!(
        st.last_error
            .as_ref()
            .unwrap()
            .message
            .contains("wrong auth key"),
        "{st:?}"
    );
    assert!(!task.is_finished());
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn closed_port_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = WebSocketTransport::new(None)
        .unwrap()
        .dial(&url(addr))
        .await
        .unwrap_err();
    assert!(matches!(err, DialError::Refused(_)), "{err:?}");
    assert_eq!(err.kind(), "refused");
}

#[tokio::test]
async fn silent_listener_times_out_and_is_redialled() {
    // Accepts TCP connections and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
    let keep = Arc::clone(&held);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            keep.lock().unwrap().push(tcp);
        }
    });
    let controller = Controller::new(
        config(url(addr), "k"),
        WebSocketTransport::new(None).unwrap(),
        Arc::new(Recorder::default()),
    );
    let mut status = controller.status();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(controller.run(cancel.clone()));
    let st = wait_status(&mut status, |s| {
        s.dial_failures_by_kind.get("timeout").copied() >= Some(2)
    })
    .await;
    assert_eq!(st.dial_failures_by_kind.len(), 1, "{st:?}");
    assert!(held.lock().unwrap().len() >= 2, "it dialled again");
    assert!(!task.is_finished());
    cancel.cancel();
    tokio::time::timeout(TEST_TIMEOUT, task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn http_errors_are_classified_with_their_status() {
    for status in [401u16, 503] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tcp.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let resp = format!("HTTP/1.1 {status} Nope\r\nContent-Length: 0\r\n\r\n");
            tcp.write_all(resp.as_bytes()).await.unwrap();
        });
        let err = WebSocketTransport::new(None)
            .unwrap()
            .dial(&url(addr))
            .await
            .unwrap_err();
        assert_eq!(err, DialError::Http { status });
    }
}

#[tokio::test]
async fn unresolvable_host_is_a_dns_error() {
    let url: CoordinatorUrl = "ws://no-such-coordinator.invalid:9".parse().unwrap();
    let err = tokio::time::timeout(
        TEST_TIMEOUT,
        WebSocketTransport::new(None).unwrap().dial(&url),
    )
    .await
    .expect("resolver answered")
    .unwrap_err();
    assert_eq!(err.kind(), "dns", "{err:?}");
}

#[tokio::test]
async fn tls_with_an_extra_ca_and_without() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_der = certified.cert.der().clone();
    let key_der =
        rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert_der], key_der)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(_) = msg {
                        let err = ServerMessage::Error {
                            code: ErrorCode::Internal,
                            reason: "tls works".into(),
                        };
                        let _ = ws.send(Message::text(err.to_json())).await;
                    }
                }
            });
        }
    });
    let url: CoordinatorUrl = format!("wss://localhost:{port}").parse().unwrap();

    // Without the CA: a TLS error.
    let err = WebSocketTransport::new(None)
        .unwrap()
        .dial(&url)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "tls", "{err:?}");

    // With it: a working session.
    let dir = std::env::temp_dir().join(format!("tailnode-ctl-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, certified.cert.pem()).unwrap();
    let transport = WebSocketTransport::new(Some(&ca)).unwrap();
    let mut session = transport.dial(&url).await.unwrap();
    session.send(&hello("k")).await.unwrap();
    assert_eq!(
        recv(&mut session).await,
        Incoming::Message(ServerMessage::Error {
            code: ErrorCode::Internal,
            reason: "tls works".into()
        })
    );
    let _ = std::fs::remove_dir_all(&dir);
}
