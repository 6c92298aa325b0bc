//! Shared helpers for the coordinator tests: a coordinator on 127.0.0.1 with
//! a private state directory, and a websocket node client.
#![allow(clippy::unwrap_used, dead_code, missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tailnode_control::coordinator::{
    AuthKeySource, CoordinatorConfig, CoordinatorError, CoordinatorServer,
};
use tailnode_control::proto::{
    ClientMessage, NODE_PATH, NodeKey, PROTOCOL_VERSION, PeerInfo, ServerMessage,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const AUTH: &str = "correct horse battery staple";

/// Generous upper bound for anything that should happen "now".
pub const PATIENCE: Duration = Duration::from_secs(10);

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A fresh directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tailnode-coord-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn config(state_dir: &std::path::Path) -> CoordinatorConfig {
    CoordinatorConfig::new(
        AuthKeySource::Fixed(AUTH.into()),
        state_dir.join("coordinator.json"),
    )
}

pub struct Coordinator {
    pub addr: SocketAddr,
    pub cancel: CancellationToken,
    handle: JoinHandle<Result<(), CoordinatorError>>,
}

impl Coordinator {
    pub async fn start(config: CoordinatorConfig) -> Result<Self, CoordinatorError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = CoordinatorServer::from_listener(config, listener).await?;
        let addr = server.local_addr();
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(server.run(cancel.clone()));
        Ok(Coordinator {
            addr,
            cancel,
            handle,
        })
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(PATIENCE, self.handle)
            .await
            .expect("coordinator stops promptly")
            .unwrap()
            .unwrap();
    }

    pub fn url(&self) -> String {
        format!("ws://{}{NODE_PATH}", self.addr)
    }
}

/// A valid X25519 public key derived from `seed`.
pub fn key(seed: u8) -> NodeKey {
    let secret = x25519_dalek::StaticSecret::from([seed; 32]);
    NodeKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
}

pub fn hello(seed: u8, name: &str) -> ClientMessage {
    ClientMessage::Hello {
        version: PROTOCOL_VERSION,
        auth_key: AUTH.into(),
        node_key: key(seed),
        name: name.into(),
        udp_port: 40000 + u16::from(seed),
        endpoints: vec![SocketAddr::from(([192, 0, 2, seed], 41641))],
    }
}

pub async fn connect(url: &str) -> Client {
    let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("websocket connect");
    ws
}

/// Like [`connect`], but with a tiny receive buffer, so a client that stops
/// reading stalls the coordinator's writes after a few kilobytes.
pub async fn connect_small_rcvbuf(addr: SocketAddr, url: &str) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (ws, _) = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("connect in time")
    .expect("websocket connect");
    ws
}

pub async fn send(ws: &mut Client, message: &ClientMessage) {
    ws.send(Message::text(message.to_json())).await.unwrap();
}

/// The next server message (pings are answered by reading).
pub async fn recv(ws: &mut Client) -> ServerMessage {
    loop {
        let item = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a message in time");
        match item {
            Some(Ok(Message::Text(text))) => return ServerMessage::from_json(&text).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a server message, got {other:?}"),
        }
    }
}

/// Reads until the server closes the connection; fails on any data message.
pub async fn expect_closed(ws: &mut Client) {
    loop {
        let item = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("the coordinator closes in time");
        match item {
            None | Some(Ok(Message::Close(_))) | Some(Err(_)) => return,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => panic!("expected a close, got {other:?}"),
        }
    }
}

pub struct Joined {
    pub ws: Client,
    pub name: String,
    pub ipv4: std::net::Ipv4Addr,
    pub ipv6: std::net::Ipv6Addr,
    pub observed: SocketAddr,
    pub peers: Vec<PeerInfo>,
}

/// Connects, says hello, and reads welcome and snapshot.
pub async fn join(url: &str, seed: u8, name: &str) -> Joined {
    join_on(connect(url).await, seed, name).await
}

/// Says hello on `ws` and reads welcome and snapshot.
pub async fn join_on(mut ws: Client, seed: u8, name: &str) -> Joined {
    send(&mut ws, &hello(seed, name)).await;
    let ServerMessage::Welcome {
        name,
        ipv4,
        ipv6,
        observed_addr,
        version,
        domain,
    } = recv(&mut ws).await
    else {
        panic!("expected welcome")
    };
    assert_eq!(version, PROTOCOL_VERSION);
    assert_eq!(domain, "tailnet.internal");
    let ServerMessage::Snapshot { peers } = recv(&mut ws).await else {
        panic!("expected snapshot")
    };
    Joined {
        ws,
        name,
        ipv4,
        ipv6,
        observed: observed_addr,
        peers,
    }
}
