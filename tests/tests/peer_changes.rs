//! The peer set changes while the node runs (library API): a peer is added,
//! one is removed, one's endpoint changes — and a transfer to a third peer
//! carries on unharmed, byte for byte.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use tailnode::node::Route;
use tailnode_tests::inproc::{
    addresses, link, loopback_endpoint, peer_config, serve_transfers, start_node,
};
use tailnode_tests::relay::UdpRelay;
use tailnode_tests::transfer::run_client;
use tokio_util::sync::CancellationToken;

const PORT: u16 = 7000;
const MIB: u64 = 1 << 20;

async fn transfer(from: &tailnode::node::NodeHandle, to: u8, up: u64, down: u64, seed: u64) {
    let target = SocketAddr::new(addresses(to)[0], PORT);
    let stream = tokio::time::timeout(Duration::from_secs(10), from.netstack().connect(target))
        .await
        .expect("connect timed out")
        .expect("connect");
    tokio::time::timeout(Duration::from_secs(60), run_client(stream, up, down, seed))
        .await
        .expect("transfer timed out")
        .expect("transfer");
}

/// Waits (at most 5 s) until A has received nothing from `peer` for 300 ms.
async fn wait_until_quiet(a: &tailnode::node::NodeHandle, peer: &tailnode::node::NodeHandle) {
    let rx_packets = || async {
        a.peers()
            .await
            .unwrap()
            .into_iter()
            .find(|p| p.public_key == peer.public_key())
            .map_or(0, |p| p.rx_packets)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut last = rx_packets().await;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = rx_packets().await;
        if now == last {
            return;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_remove_and_re_endpoint_peers_while_a_transfer_runs() {
    tailnode_tests::init_tracing();
    let cancel = CancellationToken::new();
    let a = start_node(1, &cancel).await.handle();
    let b = start_node(2, &cancel).await.handle();
    let c = start_node(3, &cancel).await.handle();
    let d = start_node(4, &cancel).await.handle();
    for n in [&b, &c, &d] {
        serve_transfers(n, PORT);
    }
    link(&a, 1, &b, 2).await;
    link(&a, 1, &c, 3).await;
    transfer(&a, 2, 64 << 10, 64 << 10, 1).await;

    // A long transfer to C runs through every change below.
    let long = {
        let a = a.clone();
        tokio::spawn(async move { transfer(&a, 3, 48 * MIB, 48 * MIB, 2).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Add D.
    assert_eq!(a.route(addresses(4)[0]).await.unwrap(), Route::None);
    link(&a, 1, &d, 4).await;
    assert!(matches!(
        a.route(addresses(4)[0]).await.unwrap(),
        Route::Peer { .. }
    ));
    transfer(&a, 4, MIB, MIB, 3).await;

    // Remove B: no route any more, and B's address is refused by policy.
    assert!(a.remove_peer(b.public_key()).await.unwrap());
    assert_eq!(a.route(addresses(2)[0]).await.unwrap(), Route::None);
    assert!(
        a.peers()
            .await
            .unwrap()
            .iter()
            .all(|p| p.public_key != b.public_key())
    );

    // Change D's endpoint to a relay in front of D: traffic now crosses the
    // relay (which proves the new endpoint is used) and still arrives intact.
    // First let the last transfer's closing segments land: an authenticated
    // packet D sent directly and A receives after the change would roam A
    // back to D's direct address, as WireGuard roaming must.
    wait_until_quiet(&a, &d).await;
    let relay = UdpRelay::start(loopback_endpoint(&d)).await;
    a.upsert_peer(peer_config(&d, 4, Some(relay.addr())))
        .await
        .unwrap();
    transfer(&a, 4, MIB, MIB, 4).await;
    assert!(
        relay.forwarded() > 100,
        "only {} datagrams crossed the relay",
        relay.forwarded()
    );
    let d_on_a = a
        .peers()
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.public_key == d.public_key())
        .unwrap();
    assert_eq!(d_on_a.endpoint, Some(relay.addr()));

    // The transfer to C never noticed.
    long.await.expect("long transfer to C");
    let c_on_a = a
        .peers()
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.public_key == c.public_key())
        .unwrap();
    assert!(c_on_a.rx_bytes > 48 * MIB && c_on_a.tx_bytes > 48 * MIB);
    cancel.cancel();
}
