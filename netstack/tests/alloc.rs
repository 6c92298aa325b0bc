//! The packet path does not allocate per packet once warm: a counting global allocator watches a
//! bulk transfer through the in-memory pair.
#![allow(clippy::unwrap_used, missing_docs)]
// A `GlobalAlloc` implementation is unsafe by definition; it only forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use tailnode_netstack::testing::{B_V4, Pair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[tokio::test(flavor = "current_thread")]
async fn bulk_transfer_does_not_allocate_per_packet() {
    // Small windows: the congestion window reaches its cap (and the buffer pool its size)
    // during the warm-up. With 1 MiB windows Cubic grows by about one segment per round trip
    // for hundreds of round trips, and the pool grows with it (one buffer per round), which
    // is warm-up, not per-packet allocation.
    let (a, b) = Pair::configs();
    let small = |c: tailnode_netstack::NetstackConfig| tailnode_netstack::NetstackConfig {
        tcp_rx_buffer: 64 * 1024,
        tcp_tx_buffer: 64 * 1024,
        ..c
    };
    let pair = Pair::with_frozen_clock(small(a), small(b)).unwrap();
    let listener = pair.b.listen(80).unwrap();
    let to = SocketAddr::new(B_V4.into(), 80);
    let (client, server) = tokio::join!(pair.a.connect(to), listener.accept());
    let mut client = client.unwrap();
    let (mut server, _) = server.unwrap();
    let chunk = vec![0xabu8; 64 * 1024];
    let mut buf = vec![0u8; 64 * 1024];

    let mut transfer = async |bytes: usize| {
        let writer = async {
            let mut sent = 0;
            while sent < bytes {
                client.write_all(&chunk).await.unwrap();
                sent += chunk.len();
            }
        };
        let reader = async {
            let mut got = 0;
            while got < bytes {
                got += server.read(&mut buf).await.unwrap();
            }
        };
        tokio::join!(writer, reader);
    };
    // Warm up: buffer pools, hash maps, tokio internals.
    transfer(8 << 20).await;

    let packets_before = pair.a.stats().packets_out + pair.b.stats().packets_out;
    let allocations_before = ALLOCATIONS.load(Ordering::Relaxed);
    transfer(32 << 20).await;
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations_before;
    let packets = pair.a.stats().packets_out + pair.b.stats().packets_out - packets_before;
    eprintln!("{allocations} allocations for {packets} packets");
    assert!(packets > 20_000, "the transfer moved packets ({packets})");
    assert!(
        allocations < 50,
        "{allocations} allocations for {packets} packets"
    );
}
