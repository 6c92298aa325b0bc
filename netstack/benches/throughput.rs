//! Netstack throughput and latency through the in-memory pair (`testing::Pair`): two stacks,
//! one driver task, no WireGuard. This is the ceiling the tunnel can reach.
//!
//! `cargo bench -p tailnode-netstack --bench throughput`
//!
//! Tuning knobs (environment, applied to both stacks): `NETSTACK_ACK_DELAY_US` (delayed-ACK
//! timeout, unset = the default), `NETSTACK_RX_BUF` / `NETSTACK_TX_BUF` (bytes),
//! `NETSTACK_VERIFY_CHECKSUMS=1`, `NETSTACK_IDLE_CONNS` (idle connections open during the bulk
//! benchmark, to see the per-socket cost of smoltcp's polling).
#![allow(missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tailnode_netstack::NetstackConfig;
use tailnode_netstack::testing::{B_V4, Pair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BULK: usize = 64 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn tuned(config: NetstackConfig) -> NetstackConfig {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let mut config = config;
    if let Some(us) = var("NETSTACK_ACK_DELAY_US") {
        config.tcp_ack_delay = (us > 0).then(|| Duration::from_micros(us));
    }
    if let Some(n) = var("NETSTACK_RX_BUF") {
        config.tcp_rx_buffer = n as usize;
    }
    if let Some(n) = var("NETSTACK_TX_BUF") {
        config.tcp_tx_buffer = n as usize;
    }
    if var("NETSTACK_VERIFY_CHECKSUMS") == Some(1) {
        config.verify_checksums = true;
    }
    config
}

fn start_pair() -> Pair {
    let (a, b) = Pair::configs();
    Pair::with_configs(tuned(a), tuned(b)).unwrap()
}

/// Sends `BULK` bytes over one connection; returns the time from first write to last read.
async fn bulk_once(pair: &Pair, port: u16) -> Duration {
    let listener = pair.b.listen(port).unwrap();
    let to = SocketAddr::new(B_V4.into(), port);
    let (client, server) = tokio::join!(pair.a.connect(to), listener.accept());
    let mut client = client.unwrap();
    let (mut server, _) = server.unwrap();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0;
        loop {
            let n = server.read(&mut buf).await.unwrap();
            if n == 0 {
                break total;
            }
            total += n;
        }
    });
    let chunk = vec![0x5au8; 256 * 1024];
    let started = Instant::now();
    let mut sent = 0;
    while sent < BULK {
        client.write_all(&chunk).await.unwrap();
        sent += chunk.len();
    }
    client.shutdown().await.unwrap();
    assert_eq!(reader.await.unwrap(), BULK);
    started.elapsed()
}

/// Opens `n` idle connections from `a` to `b`, kept alive by the returned handles.
async fn idle_connections(pair: &Pair, n: usize) -> Vec<tailnode_netstack::TcpStream> {
    let listener = pair.b.listen(9).unwrap();
    let to = SocketAddr::new(B_V4.into(), 9);
    let mut streams = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let (client, server) = tokio::join!(pair.a.connect(to), listener.accept());
        streams.push(client.unwrap());
        streams.push(server.unwrap().0);
    }
    streams
}

fn bench_bulk(c: &mut Criterion) {
    let rt = runtime();
    let pair = rt.block_on(async { start_pair() });
    let idle: usize = std::env::var("NETSTACK_IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let _idle = rt.block_on(idle_connections(&pair, idle));
    let mut group = c.benchmark_group("netstack");
    group.throughput(Throughput::Bytes(BULK as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    let mut port = 10_000u16;
    group.bench_function("tcp_bulk_64MiB", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    port += 1;
                    total += bulk_once(&pair, port).await;
                }
                total
            })
        })
    });
    group.finish();
    drop(pair);
}

fn bench_rr(c: &mut Criterion) {
    let rt = runtime();
    let pair = rt.block_on(async { start_pair() });
    let (mut client, server) = rt.block_on(async {
        let listener = pair.b.listen(7).unwrap();
        let to = SocketAddr::new(B_V4.into(), 7);
        let (client, server) = tokio::join!(pair.a.connect(to), listener.accept());
        (client.unwrap(), server.unwrap().0)
    });
    rt.spawn(async move {
        let mut server = server;
        let mut buf = [0u8; 64];
        while server.read_exact(&mut buf).await.is_ok() {
            if server.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let mut group = c.benchmark_group("netstack");
    group.bench_function("tcp_rr_64B", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let msg = [1u8; 64];
                let mut buf = [0u8; 64];
                let started = Instant::now();
                for _ in 0..iters {
                    client.write_all(&msg).await.unwrap();
                    client.read_exact(&mut buf).await.unwrap();
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench_bulk, bench_rr);
criterion_main!(benches);
