//! Nodes inside the test process, through the library API: for tests that
//! change peers at run time or look at engine counters.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tailnode::api::ApiAddr;
use tailnode::node::{Node, NodeConfig, NodeHandle};
use tailnode::{Config, StaticPeer, Tailnode};
use tailnode_wg::{PeerConfig, PrivateKey};
use tokio_util::sync::CancellationToken;

use crate::transfer;

/// A node with addresses `100.64.0.<n>` and `fd7a:115c:a1e0::<n>`.
pub async fn start_node(n: u8, cancel: &CancellationToken) -> Node {
    start_node_with_key(n, PrivateKey::generate(), cancel).await
}

/// Like [`start_node`] with a given key.
pub async fn start_node_with_key(n: u8, key: PrivateKey, cancel: &CancellationToken) -> Node {
    let mut config = NodeConfig::new(key);
    config.addresses = addresses(n).to_vec();
    Node::start(config, cancel.child_token())
        .await
        .expect("start node")
}

/// The tailnet addresses of node `n`.
pub fn addresses(n: u8) -> [IpAddr; 2] {
    [
        IpAddr::V4(Ipv4Addr::new(100, 64, 0, n)),
        IpAddr::V6(format!("fd7a:115c:a1e0::{n}").parse().expect("v6")),
    ]
}

/// The loopback endpoint of a node's UDP socket.
pub fn loopback_endpoint(node: &NodeHandle) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), node.udp_addr().port())
}

/// Peer config for node `n` (owning its two addresses) at `endpoint`.
pub fn peer_config(node: &NodeHandle, n: u8, endpoint: Option<SocketAddr>) -> PeerConfig {
    PeerConfig {
        public_key: node.public_key(),
        preshared_key: None,
        allowed_ips: addresses(n)
            .iter()
            .map(|ip| ipnet::IpNet::from(*ip))
            .collect(),
        endpoint,
        persistent_keepalive: None,
    }
}

/// Makes `a` (number `na`) and `b` (number `nb`) peers of each other over loopback.
pub async fn link(a: &NodeHandle, na: u8, b: &NodeHandle, nb: u8) {
    a.upsert_peer(peer_config(b, nb, Some(loopback_endpoint(b))))
        .await
        .expect("upsert");
    b.upsert_peer(peer_config(a, na, Some(loopback_endpoint(a))))
        .await
        .expect("upsert");
}

/// A whole node ([`Tailnode`]) numbered `n`, started from `config` with a fresh key, the
/// addresses of `n` and no local API unless `config` names one, and linked over loopback to the
/// data-plane node `peer` (number `np`) in both directions.
pub async fn start_tailnode_linked(
    n: u8,
    mut config: Config,
    peer: &NodeHandle,
    np: u8,
    cancel: &CancellationToken,
) -> Tailnode {
    let key = PrivateKey::generate();
    config.private_key = Some(key);
    config.addresses = addresses(n).to_vec();
    let link = peer_config(peer, np, Some(loopback_endpoint(peer)));
    config.peers = vec![StaticPeer {
        public_key: link.public_key,
        preshared_key: None,
        allowed_ips: link.allowed_ips,
        endpoint: link.endpoint.map(tailnode_wg::Endpoint::Addr),
        persistent_keepalive: None,
    }];
    if config.api.is_none() {
        config.api = Some(ApiAddr::Off);
    }
    let node = Tailnode::start(config, cancel.child_token())
        .await
        .expect("start tailnode");
    let handle = node.handle();
    peer.upsert_peer(peer_config(&handle, n, Some(loopback_endpoint(&handle))))
        .await
        .expect("upsert");
    node
}

/// Serves the transfer protocol on `port` of the node's tailnet addresses.
pub fn serve_transfers(node: &NodeHandle, port: u16) -> tokio::task::JoinHandle<()> {
    let listener = node.netstack().listen(port).expect("listen");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = transfer::serve_one(stream).await;
            });
        }
    })
}
