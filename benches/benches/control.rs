//! Control-plane benchmarks: recovery after an outage, dead-session
//! detection, coordinator fan-out and coordinator memory per node.
//!
//! ```text
//! cargo bench -p tailnode-benches --bench control
//! ```
//!
//! The bench first builds the `tailnode` binary it drives (`cargo build
//! --release -p tailnode-cli --bin tailnode`, into the same target directory)
//! unless `TAILNODE_BIN=/path/to/tailnode` is set. Everything runs on
//! 127.0.0.1; every process started is killed on drop; every wait is bounded.
//! The run itself takes about 5 minutes on a 2-core machine (plus the
//! compile); the 10 000-node fan-out needs about 0.5 GiB of memory for the
//! coordinator (see scenario 4).
//!
//! # Scenarios
//!
//! 1. **Recovery** (`recovery`). A real coordinator (`tailnode coordinator
//!    --ping-interval 300ms`), node B (exposes a transfer server as port
//!    7000) and node A (SOCKS5), both with the short timers `--dial-timeout
//!    1s --retry-max-backoff 500ms --ping-interval 300ms --lost-peer-timeout
//!    4s`. A's control path crosses a [`TcpProxy`]; both WireGuard paths
//!    cross [`UdpRelay`]s that the nodes advertise with `--endpoint`. All
//!    three are blackholed, then lifted; the figure is the time from the lift
//!    to the first successful SOCKS5 transfer A → `b:7000` (64 KiB each way,
//!    SHA-256 checked), retried back to back (2 s per attempt, 10 ms apart,
//!    30 s at most). *expired*: the blackhole lasts until A shows B as
//!    `expired` and B shows A as `expired` (A lost its session, then the
//!    4 s lost-peer timeout passed without handshakes). *lost*: the blackhole
//!    lasts 2 s (A has lost its session; nothing expired yet).
//! 2. **Dead-session detection** (`detect`). Two nodes on one coordinator
//!    (`--ping-interval 120s`, so that it never drops the session first: the
//!    proxy would pass its FIN on), each behind its own TcpProxy: one with `--ping-interval 1s`, one with
//!    the default (5 s). The proxy is switched to blackhole and the node's
//!    status API is polled every 10 ms until `node.control.state` is no
//!    longer `connected`. The node pings every interval and drops a session
//!    two intervals after its last sign of life (the pong after the previous
//!    tick), so measured from the blackhole the figure lies between one and
//!    two intervals depending on where in the ping cycle the blackhole
//!    falls. The runs put it at stratified phases `(i + 0.5) / runs` of the
//!    interval after a tick (from the session age in the status), so the
//!    median is expected near 1.5 intervals and the max near 2. A run counts
//!    only if the node's last error is `ping_timeout`.
//! 3. **Fan-out** (`fanout`). A `tailnode coordinator` process (default
//!    settings) and N simulated nodes in this process that speak the real
//!    protocol over loopback websockets: a valid `hello` (distinct X25519
//!    keys), then they only read (and answer pings). They join in a paced
//!    storm (200 handshakes in flight; a handshake ends with the snapshot;
//!    bounded to 30 s + 15 ms per node). A node whose session the
//!    coordinator drops joins again, as a real node would (at most 5 times;
//!    counted and reported). When all N are connected at once and quiet (no
//!    frame for 500 ms), one more node joins, three times, and then that
//!    node sends `update` (a new endpoint) three times; each simulated node
//!    timestamps the `peer_update` carrying the marker (the joiner's key, or
//!    the new endpoint). Figure: last receipt minus the time the
//!    `hello`/`update` was sent, median of the three rounds (p50 over nodes
//!    also shown). The simulated nodes run on 2 tokio workers in this
//!    process, so their own scheduling is part of the figure. They use a
//!    minimal hand-written RFC 6455 client ([`RawWs`]): tokio-tungstenite
//!    keeps a read buffer as large as the largest frame received (the
//!    snapshot) for each connection, gigabytes for 10 000 clients. The node
//!    that joins and updates in the measured rounds uses tokio-tungstenite.
//! 4. **Memory per node** (with `fanout`). VmRSS of the coordinator process
//!    (`/proc/PID/status`) when idle and after the N nodes joined and the
//!    fleet is quiet: `(after - before) / N` in KiB; also VmRSS at each
//!    tenth of the storm. After a storm this includes what the allocator
//!    kept from transient snapshot buffers. A guard kills the coordinator
//!    (which gets `oom_score_adj` 1000) when its VmRSS passes
//!    `COORD_RSS_CAP_MIB` (default 20480) or the machine's MemAvailable falls
//!    under 3 GiB, and the figure is then reported as failed with the growth
//!    seen so far.
//!
//! # Output
//!
//! Per-run lines start with `#`. Each figure prints `SUMMARY name median=..
//! min=.. max=.. n=.. unit` and `RESULT name=<value> unit` (as in
//! `../shared/anchors`), and a table closes the run.
//!
//! # Knobs (environment)
//!
//! `CONTROL_BENCH=recovery,detect,fanout` (subset to run), `RUNS=5`,
//! `FANOUT_NODES=1000,10000`, `FANOUT_CONCURRENCY=200`, `COORD_RSS_CAP_MIB=20480`,
//! `TAILNODE_BIN`, `TAILNODE_KEEP_TEST_FILES=1` (keep logs and state files).
//!
//! File descriptors: each simulated node needs one socket here and one in
//! the coordinator, which inherits this process's limits; `RLIMIT_NOFILE` is
//! raised to the hard limit (and the hard limit itself, when running as root
//! and it is too low) to the largest N + 2048.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tailnode::api::{ApiAddr, fetch_status};
use tailnode::status::Status;
use tailnode_control::proto::{ClientMessage, NODE_PATH, NodeKey, PROTOCOL_VERSION};
use tailnode_tests::control::{NodeProc, peer_in_state};
use tailnode_tests::process::{Proc, TempDir};
use tailnode_tests::relay::{Mode, TcpProxy, UdpRelay};
use tailnode_tests::transfer::{run_client, start_server};
use tailnode_tests::{free_tcp_port, free_udp_port};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_socks::tcp::Socks5Stream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const AUTH_KEY: &str = "bench-auth-key";
/// Short node timers (as in the end-to-end tests), without `--ping-interval`.
const NODE_TIMERS: [&str; 6] = [
    "--dial-timeout",
    "1s",
    "--retry-max-backoff",
    "500ms",
    "--lost-peer-timeout",
    "4s",
];
const LOST_PEER_TIMEOUT: Duration = Duration::from_secs(4);
/// Blackhole length of the "lost, not expired" recovery runs.
const SHORT_BLACKHOLE: Duration = Duration::from_secs(2);
/// Bytes each way of a recovery transfer.
const PROBE_BYTES: u64 = 64 << 10;
const PROBE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
const PROBE_PAUSE: Duration = Duration::from_millis(10);
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
const STATUS_POLL: Duration = Duration::from_millis(10);
const FANOUT_ROUNDS: usize = 3;
const QUIET: Duration = Duration::from_millis(500);

fn main() -> anyhow::Result<()> {
    let opts = Options::from_env()?;
    let max_nodes = opts.fanout_nodes.iter().copied().max().unwrap_or(0);
    let nofile = raise_nofile(max_nodes as u64 + 2048)?;
    let bin = tailnode_binary()?;
    println!(
        "# control bench: tailnode {} runs={} fanout_nodes={:?} concurrency={} nofile={nofile}",
        bin.display(),
        opts.runs,
        opts.fanout_nodes,
        opts.concurrency
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(run(&opts, &bin));
    rt.shutdown_timeout(Duration::from_secs(5));
    report.print_table();
    ensure!(
        report.failures.is_empty(),
        "{} scenario(s) failed",
        report.failures.len()
    );
    Ok(())
}

/// What to run (from the environment).
struct Options {
    scenarios: Vec<String>,
    runs: usize,
    fanout_nodes: Vec<usize>,
    concurrency: usize,
}

impl Options {
    fn from_env() -> anyhow::Result<Self> {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
        let scenarios: Vec<String> = var("CONTROL_BENCH", "recovery,detect,fanout")
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        for s in &scenarios {
            ensure!(
                ["recovery", "detect", "fanout"].contains(&s.as_str()),
                "CONTROL_BENCH: unknown scenario {s:?} (recovery, detect, fanout)"
            );
        }
        let runs: usize = var("RUNS", "5").parse().context("RUNS")?;
        ensure!((1..=50).contains(&runs), "RUNS must be 1..=50");
        let fanout_nodes = var("FANOUT_NODES", "1000,10000")
            .split(',')
            .map(|s| s.trim().parse::<usize>().context("FANOUT_NODES"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        ensure!(
            fanout_nodes.iter().all(|n| (1..=50_000).contains(n)),
            "FANOUT_NODES must be in 1..=50000"
        );
        let concurrency: usize = var("FANOUT_CONCURRENCY", "200")
            .parse()
            .context("FANOUT_CONCURRENCY")?;
        ensure!(concurrency >= 1, "FANOUT_CONCURRENCY must be positive");
        let fanout_nodes = if scenarios.iter().any(|s| s == "fanout") {
            fanout_nodes
        } else {
            Vec::new()
        };
        Ok(Self {
            scenarios,
            runs,
            fanout_nodes,
            concurrency,
        })
    }

    fn wants(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }
}

async fn run(opts: &Options, bin: &Path) -> Report {
    let mut report = Report::default();
    if opts.wants("recovery")
        && let Err(e) = recovery(bin, opts.runs, &mut report).await
    {
        report.fail("recovery", e);
    }
    if opts.wants("detect")
        && let Err(e) = detection(bin, opts.runs, &mut report).await
    {
        report.fail("detect", e);
    }
    for &n in &opts.fanout_nodes {
        if let Err(e) = fanout(bin, n, opts.concurrency, &mut report).await {
            report.fail(&format!("fanout N={n}"), e);
        }
    }
    report
}

// ---------------------------------------------------------------------------
// Results

/// One figure of the final table.
struct Row {
    figure: String,
    name: String,
    value: f64,
    unit: &'static str,
    detail: String,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    failures: Vec<String>,
}

impl Report {
    /// Records a figure from several samples: prints SUMMARY and RESULT with
    /// the median.
    fn samples(&mut self, figure: &str, name: &str, unit: &'static str, samples: &[f64]) {
        let s = Stats::of(samples);
        println!(
            "SUMMARY {name} median={:.1} min={:.1} max={:.1} n={} {unit}",
            s.median, s.min, s.max, s.n
        );
        println!("RESULT {name}={:.1} {unit}", s.median);
        self.rows.push(Row {
            figure: figure.to_string(),
            name: name.to_string(),
            value: s.median,
            unit,
            detail: format!("median of {}; min {:.1}, max {:.1}", s.n, s.min, s.max),
        });
    }

    /// Records a single figure.
    fn single(&mut self, figure: &str, name: &str, unit: &'static str, value: f64, detail: String) {
        println!("RESULT {name}={value:.1} {unit}");
        self.rows.push(Row {
            figure: figure.to_string(),
            name: name.to_string(),
            value,
            unit,
            detail,
        });
    }

    fn fail(&mut self, what: &str, e: anyhow::Error) {
        println!("# FAILED {what}: {e:#}");
        self.failures.push(format!("{what}: {e:#}"));
    }

    fn print_table(&self) {
        println!();
        println!("| figure | value | unit | RESULT name | notes |");
        println!("|---|---:|---|---|---|");
        for r in &self.rows {
            println!(
                "| {} | {:.1} | {} | {} | {} |",
                r.figure, r.value, r.unit, r.name, r.detail
            );
        }
        for f in &self.failures {
            println!("| FAILED | - | - | - | {} |", f.replace('\n', " "));
        }
    }
}

struct Stats {
    n: usize,
    median: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn of(samples: &[f64]) -> Self {
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Self {
            n,
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------
// Set-up: binary, file descriptors, processes

/// The `tailnode` binary: `$TAILNODE_BIN`, or built now (release) next to
/// this bench's own target directory.
fn tailnode_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("TAILNODE_BIN") {
        let path = PathBuf::from(path);
        ensure!(
            path.exists(),
            "TAILNODE_BIN={} does not exist",
            path.display()
        );
        return Ok(path);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    println!("# building tailnode (cargo build --release -p tailnode-cli --bin tailnode)");
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "tailnode-cli",
            "--bin",
            "tailnode",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "cargo build of tailnode failed: {status}");
    // This bench runs from target/release/deps/; the binary is in target/release/.
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("bench binary is not in target/<profile>/deps")?;
    let bin = dir.join("tailnode");
    ensure!(bin.exists(), "{} was not built", bin.display());
    Ok(bin)
}

/// Raises `RLIMIT_NOFILE` to at least `need` (children inherit it).
fn raise_nofile(need: u64) -> anyhow::Result<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum;
    let new = match hard {
        Some(h) if h < need => {
            // Only a privileged process may raise the hard limit.
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(need),
                    maximum: Some(need),
                },
            )
            .with_context(|| {
                format!("RLIMIT_NOFILE hard limit is {h}, {need} needed (run `ulimit -Hn {need}` as root first)")
            })?;
            need
        }
        Some(h) => {
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(h),
                    maximum: Some(h),
                },
            )?;
            h
        }
        None => {
            let cur = lim.current.unwrap_or(u64::MAX).max(need);
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(cur),
                    maximum: None,
                },
            )?;
            cur
        }
    };
    Ok(new)
}

/// A `tailnode coordinator` process on 127.0.0.1.
struct Coordinator {
    proc: Proc,
    addr: SocketAddr,
}

impl Coordinator {
    async fn start(
        bin: &Path,
        dir: &TempDir,
        name: &str,
        ping_interval: Option<&str>,
    ) -> anyhow::Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let mut args: Vec<String> = vec![
            "coordinator".into(),
            "--listen".into(),
            addr.to_string(),
            "--auth-key".into(),
            AUTH_KEY.into(),
            "--state".into(),
            dir.path()
                .join(format!("{name}-state.json"))
                .display()
                .to_string(),
        ];
        if let Some(p) = ping_interval {
            args.extend(["--ping-interval".into(), p.into()]);
        }
        let proc = Proc::spawn(
            name,
            bin,
            &args,
            &[],
            dir.path().join(format!("{name}.log")),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                bail!("coordinator did not listen on {addr}:\n{}", proc.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { proc, addr })
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

/// How to start a node.
struct NodeSpec<'a> {
    name: &'a str,
    coordinator: String,
    /// `--ping-interval`, or the default (5 s) when `None`.
    ping_interval: Option<&'a str>,
    udp_port: u16,
    /// Advertised WireGuard endpoint (a relay).
    endpoint: Option<SocketAddr>,
    socks: bool,
    /// `--expose PORT=ADDR`.
    expose: Option<(u16, SocketAddr)>,
}

/// Starts `tailnode up --coordinator ...` and waits for its status API.
async fn start_node(bin: &Path, dir: &TempDir, spec: NodeSpec<'_>) -> anyhow::Result<NodeProc> {
    let api = ApiAddr::Unix(dir.path().join(format!("{}.sock", spec.name)));
    let socks = spec
        .socks
        .then(|| SocketAddr::from(([127, 0, 0, 1], free_tcp_port())));
    let mut args: Vec<String> = vec![
        "up".into(),
        "--coordinator".into(),
        spec.coordinator,
        "--name".into(),
        spec.name.into(),
        "--auth-key".into(),
        AUTH_KEY.into(),
        "--key-file".into(),
        dir.path()
            .join(format!("{}.key", spec.name))
            .display()
            .to_string(),
        "--listen-port".into(),
        spec.udp_port.to_string(),
        "--api".into(),
        api.to_string(),
        "--socks5".into(),
        socks.map_or_else(|| "off".to_string(), |s| s.to_string()),
    ];
    args.extend(NODE_TIMERS.iter().map(|s| (*s).to_string()));
    if let Some(p) = spec.ping_interval {
        args.extend(["--ping-interval".into(), p.into()]);
    }
    if let Some(e) = spec.endpoint {
        args.extend(["--endpoint".into(), e.to_string()]);
    }
    if let Some((port, service)) = spec.expose {
        args.extend(["--expose".into(), format!("{port}={service}")]);
    }
    let log = dir.path().join(format!("{}.log", spec.name));
    let proc = Proc::spawn(spec.name, bin, &args, &[], log);
    let node = NodeProc {
        proc,
        name: spec.name.to_string(),
        api,
        socks,
        udp_port: spec.udp_port,
    };
    wait_until(&node, Duration::from_secs(20), "the status API", |_| true).await?;
    Ok(node)
}

/// Polls `node`'s status every [`STATUS_POLL`] until `pred` holds.
///
/// # Errors
/// After `timeout`, with the last status and the tail of the node's log.
async fn wait_until(
    node: &NodeProc,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Status) -> bool,
) -> anyhow::Result<Status> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Ok(s) = fetch_status(&node.api).await {
            if pred(&s) {
                return Ok(s);
            }
            last = Some(s);
        }
        if Instant::now() > deadline {
            bail!(
                "{}: waited {timeout:?} for {what}; last status: {}\n---- log tail ----\n{}",
                node.name,
                last.map(|s| summary(&s)).unwrap_or_else(|| "none".into()),
                log_tail(&node.proc, 40)
            );
        }
        tokio::time::sleep(STATUS_POLL).await;
    }
}

/// A one-line view of a status document.
fn summary(s: &Status) -> String {
    let mut out = format!(
        "control={} attempts={} dials={} failures={:?}",
        s.node.control.state,
        s.node.control.attempts,
        s.node.control.dials,
        s.node.control.dial_failures
    );
    for p in &s.peers {
        let _ = write!(
            out,
            "; peer {}={} hs={:?}",
            p.name.as_deref().unwrap_or("?"),
            p.state,
            p.last_handshake_seconds_ago
        );
    }
    out
}

fn log_tail(proc: &Proc, lines: usize) -> String {
    let log = proc.log();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn connected(s: &Status) -> bool {
    s.node.control.state == "connected"
}

// ---------------------------------------------------------------------------
// 1. Recovery

async fn recovery(bin: &Path, runs: usize, report: &mut Report) -> anyhow::Result<()> {
    println!("# recovery: coordinator, node a (SOCKS5) behind a TCP proxy, node b, UDP relays");
    let dir = TempDir::new("bench-recovery");
    let (service, _server) = start_server(SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let coord = Coordinator::start(bin, &dir, "coordinator", Some("300ms")).await?;
    let control_a = TcpProxy::start(coord.addr).await;
    let (port_a, port_b) = (free_udp_port(), free_udp_port());
    let relay_a = UdpRelay::start(SocketAddr::from(([127, 0, 0, 1], port_a))).await;
    let relay_b = UdpRelay::start(SocketAddr::from(([127, 0, 0, 1], port_b))).await;
    let b = start_node(
        bin,
        &dir,
        NodeSpec {
            name: "b",
            coordinator: coord.url(),
            ping_interval: Some("300ms"),
            udp_port: port_b,
            endpoint: Some(relay_b.addr()),
            socks: false,
            expose: Some((7000, service)),
        },
    )
    .await?;
    let a = start_node(
        bin,
        &dir,
        NodeSpec {
            name: "a",
            coordinator: format!("ws://{}", control_a.addr()),
            ping_interval: Some("300ms"),
            udp_port: port_a,
            endpoint: Some(relay_a.addr()),
            socks: true,
            expose: None,
        },
    )
    .await?;
    let pid_a = a.proc.pid();
    let set = |mode| {
        control_a.set_mode(mode);
        relay_a.set_mode(mode);
        relay_b.set_mode(mode);
    };
    let mut seed = 0u64;
    for expire in [true, false] {
        let label = if expire { "expired" } else { "lost" };
        let mut samples = Vec::new();
        for run in 1..=runs {
            settle(&a, &b, &mut seed).await?;
            set(Mode::Blackhole);
            let dark = Instant::now();
            if expire {
                wait_until(&a, Duration::from_secs(30), "b to expire on a", |s| {
                    peer_in_state(s, "b", "expired")
                })
                .await?;
                wait_until(&b, Duration::from_secs(30), "a to expire on b", |s| {
                    peer_in_state(s, "a", "expired")
                })
                .await?;
            } else {
                wait_until(&a, Duration::from_secs(10), "a to lose its session", |s| {
                    !connected(s)
                })
                .await?;
                tokio::time::sleep(SHORT_BLACKHOLE.saturating_sub(dark.elapsed())).await;
                let s = fetch_status(&a.api).await?;
                ensure!(
                    peer_in_state(&s, "b", "lost") && !connected(&s),
                    "a should have lost its session and see b as lost (not expired) after {:?}: {}",
                    dark.elapsed(),
                    summary(&s)
                );
                ensure!(dark.elapsed() < LOST_PEER_TIMEOUT);
            }
            let held = dark.elapsed();
            set(Mode::Pass);
            let lifted = Instant::now();
            seed += 1;
            let attempts = probe_until_ok(&a, seed, lifted + RECOVERY_BOUND).await?;
            let took = lifted.elapsed();
            println!(
                "# recovery {label} run {run}: {:.0} ms after the lift ({attempts} attempts; dark for {:.1} s)",
                ms(took),
                held.as_secs_f64()
            );
            samples.push(ms(took));
        }
        let figure = if expire {
            "recovery after peer expiry, lift → first transfer by name"
        } else {
            "recovery after a 2 s outage (session lost, nothing expired)"
        };
        report.samples(figure, &format!("control_recovery_{label}"), "ms", &samples);
        let s = Stats::of(&samples);
        report.single(
            &format!("{figure}, max"),
            &format!("control_recovery_{label}_max"),
            "ms",
            s.max,
            format!("max of {}", s.n),
        );
    }
    ensure!(a.proc.pid() == pid_a, "a was restarted");
    Ok(())
}

/// Both nodes connected, seeing each other active, and a transfer works.
async fn settle(a: &NodeProc, b: &NodeProc, seed: &mut u64) -> anyhow::Result<()> {
    wait_until(a, Duration::from_secs(30), "a connected, b active", |s| {
        connected(s) && peer_in_state(s, "b", "active")
    })
    .await?;
    wait_until(b, Duration::from_secs(30), "b connected, a active", |s| {
        connected(s) && peer_in_state(s, "a", "active")
    })
    .await?;
    *seed += 1;
    probe_until_ok(a, *seed, Instant::now() + Duration::from_secs(30)).await?;
    Ok(())
}

/// Transfers A → `b:7000` back to back until one succeeds; returns the
/// number of attempts.
async fn probe_until_ok(a: &NodeProc, seed: u64, deadline: Instant) -> anyhow::Result<u32> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match tokio::time::timeout(PROBE_ATTEMPT_TIMEOUT, probe(a, seed)).await {
            Ok(Ok(())) => return Ok(attempts),
            Ok(Err(e)) if Instant::now() >= deadline => {
                bail!(
                    "no transfer to b:7000 before the deadline ({attempts} attempts): {e:#}\n{}",
                    log_tail(&a.proc, 40)
                )
            }
            Err(_) if Instant::now() >= deadline => {
                bail!(
                    "no transfer to b:7000 before the deadline ({attempts} attempts, last timed out)\n{}",
                    log_tail(&a.proc, 40)
                )
            }
            _ => tokio::time::sleep(PROBE_PAUSE).await,
        }
    }
}

/// One SOCKS5 transfer by name, checked both ways.
async fn probe(a: &NodeProc, seed: u64) -> anyhow::Result<()> {
    let socks = a.socks.context("a has no SOCKS5 port")?;
    let stream = Socks5Stream::connect(socks, "b:7000").await?;
    run_client(stream, PROBE_BYTES, PROBE_BYTES, seed).await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Dead-session detection

async fn detection(bin: &Path, runs: usize, report: &mut Report) -> anyhow::Result<()> {
    println!("# detect: two nodes behind TCP proxies, --ping-interval 1s and the default 5s");
    let dir = TempDir::new("bench-detect");
    // The coordinator must not notice first: when it drops the session, the
    // TcpProxy passes its FIN on to the node even in blackhole mode, and the
    // node would see a closed connection instead of silence.
    let coord = Coordinator::start(bin, &dir, "coordinator", Some("120s")).await?;
    let proxy_1 = TcpProxy::start(coord.addr).await;
    let proxy_5 = TcpProxy::start(coord.addr).await;
    let spec = |name, proxy: &TcpProxy, ping_interval| NodeSpec {
        name,
        coordinator: format!("ws://{}", proxy.addr()),
        ping_interval,
        udp_port: free_udp_port(),
        endpoint: None,
        socks: false,
        expose: None,
    };
    let n1 = start_node(bin, &dir, spec("d1", &proxy_1, Some("1s"))).await?;
    let n5 = start_node(bin, &dir, spec("d5", &proxy_5, None)).await?;
    // Both run at the same time, each with its own proxy and phases.
    let (r1, r5) = tokio::join!(
        detect_runs(&n1, &proxy_1, Duration::from_secs(1), runs),
        detect_runs(&n5, &proxy_5, Duration::from_secs(5), runs),
    );
    for (interval, samples) in [(1, r1?), (5, r5?)] {
        let figure = if interval == 1 {
            "dead session detected, --ping-interval 1s (blackhole → not connected)"
        } else {
            "dead session detected, default --ping-interval 5s"
        };
        report.samples(
            figure,
            &format!("control_detect_{interval}s"),
            "ms",
            &samples,
        );
    }
    Ok(())
}

async fn detect_runs(
    node: &NodeProc,
    proxy: &TcpProxy,
    interval: Duration,
    runs: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::new();
    for run in 0..runs {
        let s = wait_until(node, Duration::from_secs(30), "connected", connected).await?;
        let fetched = Instant::now();
        // Session age now; the node's ticks fall at whole intervals of it.
        let age = s.node.control.state_seconds.unwrap_or(0.0);
        let i = interval.as_secs_f64();
        let phase = (run as f64 + 0.5) / runs as f64 * i;
        let mut target = (age / i).floor() * i + phase;
        while target < age + 0.05 {
            target += i;
        }
        tokio::time::sleep_until((fetched + Duration::from_secs_f64(target - age)).into()).await;
        proxy.set_mode(Mode::Blackhole);
        let dark = Instant::now();
        let res = wait_until(
            node,
            interval * 4 + Duration::from_secs(5),
            "the session to drop",
            |s| !connected(s),
        )
        .await;
        let took = dark.elapsed();
        proxy.set_mode(Mode::Pass);
        let s = res?;
        let error = s.node.control.last_error.as_ref();
        ensure!(
            error.is_some_and(|e| e.kind == "ping_timeout"),
            "the session of {} ended, but not by its ping watchdog: {:?}",
            node.name,
            error.map(|e| (&e.kind, &e.message))
        );
        println!(
            "# detect {}s run {}: {:.0} ms (phase {:.2} of the interval; now {}{})",
            interval.as_secs(),
            run + 1,
            ms(took),
            phase / i,
            s.node.control.state,
            s.node
                .control
                .last_error
                .as_ref()
                .map(|e| format!(", last error {}: {}", e.kind, e.message))
                .unwrap_or_default()
        );
        samples.push(ms(took));
    }
    Ok(samples)
}

// ---------------------------------------------------------------------------
// 3 + 4. Fan-out and memory per node

/// A simulated node's receipt record.
#[derive(Default)]
struct Slot {
    alive: AtomicBool,
    /// Text frames received after the snapshot (all sessions of this node).
    frames: AtomicU64,
    /// Generation of the last marker seen, and when (ns since the epoch).
    marker_gen: AtomicU64,
    marker_ns: AtomicU64,
}

/// The simulated nodes, shared with their tasks.
struct Fleet {
    epoch: Instant,
    addr: SocketAddr,
    slots: Vec<Slot>,
    /// Nodes that joined once / gave up.
    joined: AtomicU64,
    failed: AtomicU64,
    /// Failed join attempts that were retried.
    join_retries: AtomicU64,
    /// Sessions that ended after joining (closed by the coordinator), and
    /// the joins that followed them.
    dropped: AtomicU64,
    rejoined: AtomicU64,
    /// Nodes joined when the coordinator first dropped a session.
    first_drop_at: AtomicU64,
    /// Bytes of all snapshots received (a live session's snapshot is the
    /// largest frame its coordinator connection ever wrote).
    snapshot_bytes: AtomicU64,
    /// The current marker (generation, bytes to look for).
    marker: RwLock<(u64, Arc<[u8]>)>,
    marker_gen: AtomicU64,
    /// Set when the bench is over: dropped sessions do not rejoin.
    stop: AtomicBool,
}

impl Fleet {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn set_marker(&self, marker: &str) -> u64 {
        let mut m = self.marker.write().unwrap_or_else(|e| e.into_inner());
        let generation = m.0 + 1;
        *m = (generation, Arc::from(marker.as_bytes()));
        self.marker_gen.store(generation, Ordering::Release);
        generation
    }

    fn alive(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.alive.load(Ordering::Acquire))
            .count()
    }

    fn frames(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.frames.load(Ordering::Relaxed))
            .sum()
    }
}

/// How often a simulated node joins again after its session was dropped.
const MAX_REJOINS: u32 = 5;

/// A valid X25519 public key for simulated node `i`.
fn sim_key(i: u64) -> NodeKey {
    // Byte 0 loses its low 3 bits to clamping: keep `i` out of it.
    let mut seed = [0x42u8; 32];
    seed[1..9].copy_from_slice(&i.to_le_bytes());
    let secret = x25519_dalek::StaticSecret::from(seed);
    NodeKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
}

fn hello(i: u64) -> ClientMessage {
    ClientMessage::Hello {
        version: PROTOCOL_VERSION,
        auth_key: AUTH_KEY.into(),
        node_key: sim_key(i),
        name: format!("sim{i}"),
        udp_port: 20_000 + (i % 40_000) as u16,
        endpoints: vec![],
    }
}

/// One simulated node: joins (paced by `sem`), reads and timestamps
/// markers, and joins again (bounded) when the coordinator drops it.
async fn sim_node(fleet: Arc<Fleet>, sem: Arc<Semaphore>, i: usize) {
    let slot = &fleet.slots[i];
    let mut joins = 0u32;
    let mut failures = 0u32;
    loop {
        let conn = {
            let Ok(_permit) = sem.acquire().await else {
                return;
            };
            tokio::time::timeout(Duration::from_secs(60), RawWs::join(fleet.addr, i as u64)).await
        };
        let mut conn = match conn {
            Ok(Ok((conn, snapshot_len))) => {
                fleet
                    .snapshot_bytes
                    .fetch_add(snapshot_len, Ordering::Relaxed);
                conn
            }
            other => {
                failures += 1;
                let e = match other {
                    Ok(Err(e)) => e,
                    _ => anyhow::anyhow!("join timed out after 60 s"),
                };
                if failures >= 3 {
                    if !fleet.stop.load(Ordering::Acquire) {
                        eprintln!("# sim node {i}: join failed: {e:#}");
                    }
                    if joins == 0 {
                        fleet.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                fleet.join_retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        failures = 0;
        joins += 1;
        slot.alive.store(true, Ordering::Release);
        if joins == 1 {
            fleet.joined.fetch_add(1, Ordering::Release);
        } else {
            fleet.rejoined.fetch_add(1, Ordering::Relaxed);
        }
        let _ = conn.read_updates(&fleet, slot).await;
        slot.alive.store(false, Ordering::Release);
        fleet.dropped.fetch_add(1, Ordering::Relaxed);
        let _ = fleet.first_drop_at.compare_exchange(
            u64::MAX,
            fleet.joined.load(Ordering::Relaxed),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        if fleet.stop.load(Ordering::Acquire) || joins > MAX_REJOINS {
            return;
        }
    }
}

/// A minimal RFC 6455 client for the simulated nodes.
///
/// tokio-tungstenite keeps a read buffer as large as the largest frame it
/// ever received (the snapshot: ~220 bytes per peer) for the life of the
/// connection, which for 10 000 clients would be gigabytes in this process
/// and perturb the coordinator's figures. This client streams large frames
/// through a fixed 16 KiB buffer, keeps only small ones (to look for the
/// marker), masks what it sends and answers pings. The one node that joins
/// and updates during the measured rounds uses tokio-tungstenite.
struct RawWs {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    payload: Vec<u8>,
    mask: u32,
}

/// Frames up to this size are kept whole (markers are looked for in them).
const SMALL_FRAME: u64 = 64 << 10;

impl RawWs {
    /// Connects, upgrades, says `hello` and reads `welcome` and `snapshot`.
    /// Returns the client and the size of the snapshot.
    async fn join(addr: SocketAddr, i: u64) -> anyhow::Result<(Self, u64)> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, mut wr) = stream.into_split();
        let request = format!(
            "GET {NODE_PATH} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        wr.write_all(request.as_bytes()).await?;
        let mut ws = RawWs {
            rd: BufReader::with_capacity(16 << 10, rd),
            wr,
            payload: Vec::new(),
            mask: (i as u32).wrapping_mul(0x9e37_79b9) | 1,
        };
        let mut line = String::new();
        ws.rd.read_line(&mut line).await?;
        ensure!(
            line.starts_with("HTTP/1.1 101"),
            "upgrade refused: {}",
            line.trim()
        );
        loop {
            line.clear();
            ensure!(
                ws.rd.read_line(&mut line).await? > 0,
                "closed in the upgrade"
            );
            if line == "\r\n" {
                break;
            }
        }
        ws.send_frame(0x1, hello(i).to_json().as_bytes()).await?;
        let mut welcome = false;
        loop {
            let (opcode, len, head) = ws.next_frame().await?;
            match opcode {
                0x1 if head.starts_with(br#"{"type":"welcome""#) => welcome = true,
                0x1 if welcome && head.starts_with(br#"{"type":"snapshot""#) => {
                    return Ok((ws, len));
                }
                0x1 => bail!(
                    "unexpected message during the join: {}",
                    String::from_utf8_lossy(&head)
                ),
                0x8 => bail!("closed during the join: {}", String::from_utf8_lossy(&head)),
                _ => {}
            }
        }
    }

    /// Reads until the session ends, counting text frames and timestamping
    /// the current marker.
    async fn read_updates(&mut self, fleet: &Fleet, slot: &Slot) -> anyhow::Result<()> {
        let mut generation = 0u64;
        let mut marker: Arc<[u8]> = Arc::from(&b""[..]);
        loop {
            let (opcode, _, _) = self.next_frame().await?;
            match opcode {
                0x1 => {
                    let now = fleet.now_ns();
                    slot.frames.fetch_add(1, Ordering::Relaxed);
                    if fleet.marker_gen.load(Ordering::Acquire) != generation {
                        let m = fleet.marker.read().unwrap_or_else(|e| e.into_inner());
                        (generation, marker) = (m.0, m.1.clone());
                    }
                    if !marker.is_empty()
                        && slot.marker_gen.load(Ordering::Relaxed) != generation
                        && self.payload.windows(marker.len()).any(|w| w == &marker[..])
                    {
                        slot.marker_ns.store(now, Ordering::Relaxed);
                        slot.marker_gen.store(generation, Ordering::Release);
                    }
                }
                0x8 => return Ok(()),
                _ => {}
            }
        }
    }

    /// Reads one frame and answers it if it is a ping. Returns the opcode,
    /// the payload length and the payload's first 64 bytes; a payload of at
    /// most [`SMALL_FRAME`] bytes is also left whole in `self.payload`.
    async fn next_frame(&mut self) -> anyhow::Result<(u8, u64, Vec<u8>)> {
        let mut h = [0u8; 2];
        self.rd.read_exact(&mut h).await?;
        let opcode = h[0] & 0x0f;
        ensure!(h[1] & 0x80 == 0, "masked frame from the server");
        let len = match h[1] & 0x7f {
            126 => u64::from(self.rd.read_u16().await?),
            127 => self.rd.read_u64().await?,
            n => u64::from(n),
        };
        if len <= SMALL_FRAME {
            self.payload.resize(len as usize, 0);
            self.rd.read_exact(&mut self.payload).await?;
            if self.payload.capacity() > 2 * SMALL_FRAME as usize {
                self.payload.shrink_to(4096);
            }
        } else {
            // Stream it through: keep the head only.
            self.payload.clear();
            let mut left = len;
            while left > 0 {
                let buf = self.rd.fill_buf().await?;
                ensure!(!buf.is_empty(), "closed inside a frame");
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                if self.payload.len() < 64 {
                    let want = (64 - self.payload.len()).min(n);
                    self.payload.extend_from_slice(&buf[..want]);
                }
                self.rd.consume(n);
                left -= n as u64;
            }
        }
        let head = self.payload[..self.payload.len().min(64)].to_vec();
        if opcode == 0x9 {
            let ping = std::mem::take(&mut self.payload);
            self.send_frame(0xa, &ping[..ping.len().min(125)]).await?;
            self.payload = ping;
        }
        Ok((opcode, len, head))
    }

    /// Sends one masked frame (FIN set).
    async fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        self.mask = self.mask.rotate_left(7).wrapping_add(0x6d2b_79f5);
        let key = self.mask.to_be_bytes();
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(j, b)| b ^ key[j % 4]));
        self.wr.write_all(&frame).await?;
        Ok(())
    }
}

type Ws = WebSocketStream<TcpStream>;

/// TCP connect and websocket upgrade with tokio-tungstenite, bounded.
async fn ws_connect(url: &str, addr: SocketAddr) -> anyhow::Result<Ws> {
    let fut = async {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
        anyhow::Ok(ws)
    };
    tokio::time::timeout(Duration::from_secs(15), fut)
        .await
        .context("websocket connect timed out")?
}

/// A `VmRSS:`-style field (KiB) of `/proc/<pid>/status`.
fn vm_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    kib_field(&status, field).with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Counts the WARN and INFO lines of a tracing log by message text
/// (fields and timestamps stripped).
fn log_messages(log: &str) -> String {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for line in log.lines() {
        let mut plain = String::with_capacity(line.len());
        let mut in_escape = false;
        for c in line.chars() {
            match c {
                '\u{1b}' => in_escape = true,
                'm' if in_escape => in_escape = false,
                _ if in_escape => {}
                _ => plain.push(c),
            }
        }
        let mut words = plain.split_whitespace().skip(1);
        let Some(level) = words.next() else { continue };
        if level != "WARN" && level != "INFO" {
            continue;
        }
        let _target = words.next();
        let message: Vec<&str> = words.take_while(|w| !w.contains('=')).collect();
        *counts
            .entry(format!("{level} {}", message.join(" ")))
            .or_default() += 1;
    }
    counts
        .iter()
        .map(|(m, c)| format!("{c}× \"{m}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// User + system CPU seconds of process `pid` ("self" for this one).
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command (which may contain spaces): utime and stime
    // are the 12th and 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// Waits until no frame arrived for [`QUIET`] (at most `bound`).
async fn wait_quiet(fleet: &Fleet, bound: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut last = fleet.frames();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = fleet.frames();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= QUIET {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < bound,
            "the fleet never went quiet within {bound:?} ({last} frames so far)"
        );
    }
}

/// One fan-out round: how long until every live simulated node has the
/// marker of `generation`, counted from `sent_ns`.
struct Round {
    max_ms: f64,
    p50_ms: f64,
    received: usize,
}

async fn measure_round(fleet: &Fleet, generation: u64, sent_ns: u64) -> anyhow::Result<Round> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut waiting = 0;
        let mut lat = Vec::with_capacity(fleet.slots.len());
        for slot in &fleet.slots {
            if slot.marker_gen.load(Ordering::Acquire) == generation {
                let ns = slot.marker_ns.load(Ordering::Relaxed);
                lat.push(ns.saturating_sub(sent_ns) as f64 / 1e6);
            } else if slot.alive.load(Ordering::Acquire) {
                waiting += 1;
            }
        }
        if waiting == 0 {
            let s = Stats::of(&lat);
            return Ok(Round {
                max_ms: s.max,
                p50_ms: s.median,
                received: lat.len(),
            });
        }
        ensure!(
            Instant::now() < deadline,
            "{waiting} live nodes still without the update after 60 s ({} have it)",
            lat.len()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Watches the coordinator's memory during a fan-out run: records VmRSS at
/// each tenth of the fleet, and kills the coordinator (which also has
/// `oom_score_adj` 1000) before the machine runs short of memory.
struct MemGuard {
    tripped: Arc<std::sync::Mutex<Option<String>>>,
    samples: Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The guard kills the coordinator when the machine's MemAvailable drops
/// below this, or the coordinator's RSS passes `COORD_RSS_CAP_MIB`.
const MIN_AVAILABLE_KIB: u64 = 3 << 20;

impl MemGuard {
    fn start(pid: u32, fleet: Arc<Fleet>, n: usize) -> Self {
        let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "1000");
        let cap_kib = std::env::var("COORD_RSS_CAP_MIB")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(20 << 10)
            << 10;
        let tripped = Arc::new(std::sync::Mutex::new(None));
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = {
            let (tripped, samples) = (tripped.clone(), samples.clone());
            tokio::spawn(async move {
                let mut next_mark = 1;
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let Ok(rss) = vm_kib(pid, "VmRSS:") else {
                        return;
                    };
                    let joined = fleet.joined.load(Ordering::Relaxed);
                    if next_mark <= 10 && joined as usize >= n * next_mark / 10 {
                        samples
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((joined, rss));
                        next_mark += 1;
                    }
                    let available = std::fs::read_to_string("/proc/meminfo")
                        .ok()
                        .and_then(|m| kib_field(&m, "MemAvailable:"))
                        .unwrap_or(u64::MAX);
                    if rss > cap_kib || available < MIN_AVAILABLE_KIB {
                        fleet.stop.store(true, Ordering::Release);
                        if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                            let _ =
                                rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                        }
                        *tripped.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
                            "coordinator killed by the bench's memory guard: VmRSS {} MiB with {joined} nodes joined ({} alive), MemAvailable {} MiB (cap {} MiB, floor {} MiB)",
                            rss >> 10,
                            fleet.alive(),
                            available >> 10,
                            cap_kib >> 10,
                            MIN_AVAILABLE_KIB >> 10
                        ));
                        return;
                    }
                }
            })
        };
        Self {
            tripped,
            samples,
            task,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        match &*self.tripped.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => bail!("{why}; growth: {}", self.growth()),
            None => Ok(()),
        }
    }

    /// "nodes: MiB" pairs recorded so far.
    fn growth(&self) -> String {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, rss)| format!("{n}:{}", rss >> 10))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Drop for MemGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fanout(
    bin: &Path,
    n: usize,
    concurrency: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    println!(
        "# fanout N={n}: coordinator process, {n} simulated nodes, {concurrency} handshakes in flight"
    );
    let dir = TempDir::new(&format!("bench-fanout-{n}"));
    let mut coord = Coordinator::start(bin, &dir, "coordinator", None).await?;
    let pid = coord.proc.pid();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = vm_kib(pid, "VmRSS:")?;
    let url = format!("{}{NODE_PATH}", coord.url());
    let fleet = Arc::new(Fleet {
        epoch: Instant::now(),
        addr: coord.addr,
        slots: (0..n).map(|_| Slot::default()).collect(),
        joined: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        join_retries: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        rejoined: AtomicU64::new(0),
        snapshot_bytes: AtomicU64::new(0),
        first_drop_at: AtomicU64::new(u64::MAX),
        marker: RwLock::new((0, Arc::from(&b""[..]))),
        marker_gen: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let guard = MemGuard::start(pid, fleet.clone(), n);
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let storm = Instant::now();
    // Bounded: 30 s plus 15 ms per node.
    let storm_bound = Duration::from_secs(30) + Duration::from_millis(15) * n as u32;
    for i in 0..n {
        tasks.spawn(sim_node(fleet.clone(), sem.clone(), i));
    }
    let (coord_cpu0, self_cpu0) = (cpu_seconds(&pid.to_string()), cpu_seconds("self"));
    let result = async {
        let status = |fleet: &Fleet| {
            let first_drop = fleet.first_drop_at.load(Ordering::Relaxed);
            format!(
                "joined {}, failed {}, alive {}, dropped {}{}, rejoined {}, join retries {}; CPU over {:.1} s: coordinator {:.1} s, simulated nodes {:.1} s; coordinator VmRSS {} MiB",
                fleet.joined.load(Ordering::Relaxed),
                fleet.failed.load(Ordering::Relaxed),
                fleet.alive(),
                fleet.dropped.load(Ordering::Relaxed),
                if first_drop == u64::MAX {
                    String::new()
                } else {
                    format!(" (first when {first_drop} had joined)")
                },
                fleet.rejoined.load(Ordering::Relaxed),
                fleet.join_retries.load(Ordering::Relaxed),
                storm.elapsed().as_secs_f64(),
                cpu_seconds(&pid.to_string()) - coord_cpu0,
                cpu_seconds("self") - self_cpu0,
                vm_kib(pid, "VmRSS:").unwrap_or(0) >> 10,
            )
        };
        // Every node joined once...
        loop {
            guard.check()?;
            let done = fleet.joined.load(Ordering::Acquire) + fleet.failed.load(Ordering::Relaxed);
            if done >= n as u64 {
                break;
            }
            ensure!(
                storm.elapsed() < storm_bound,
                "join storm not done after {storm_bound:?}: {}",
                status(&fleet)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let storm_time = storm.elapsed();
        ensure!(
            fleet.failed.load(Ordering::Relaxed) == 0,
            "some simulated nodes could not join: {}",
            status(&fleet)
        );
        // ... and all are connected at once, and the fan-out has drained.
        loop {
            guard.check()?;
            if fleet.alive() == n {
                wait_quiet(&fleet, Duration::from_secs(120)).await?;
                if fleet.alive() == n {
                    break;
                }
            }
            ensure!(
                storm.elapsed() < storm_bound,
                "the fleet was not all connected after {storm_bound:?}: {}",
                status(&fleet)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let settled = storm.elapsed();
        println!(
            "# fanout N={n}: storm {:.1} s ({:.0} joins/s), all connected and quiet after {:.1} s; {}; {} frames",
            storm_time.as_secs_f64(),
            n as f64 / storm_time.as_secs_f64(),
            settled.as_secs_f64(),
            status(&fleet),
            fleet.frames(),
        );
        let rss_after = vm_kib(pid, "VmRSS:")?;
        let hwm = vm_kib(pid, "VmHWM:")?;
        let per_node = (rss_after.saturating_sub(rss_before)) as f64 / n as f64;
        println!(
            "# fanout N={n}: coordinator VmRSS {rss_before} KiB idle, {rss_after} KiB with {n} nodes (peak {hwm} KiB); nodes:MiB {}; snapshots received (all joins): {} MiB",
            guard.growth(),
            fleet.snapshot_bytes.load(Ordering::Relaxed) >> 20
        );

        // Rounds: a new node joins; then that node changes its endpoints.
        let mut joins = Vec::new();
        let mut updates = Vec::new();
        let mut extra: Vec<(SplitSink<Ws, Message>, tokio::task::JoinHandle<()>)> = Vec::new();
        for r in 0..FANOUT_ROUNDS {
            let idx = (n + r) as u64;
            let mut ws = ws_connect(&url, coord.addr).await?;
            let generation = fleet.set_marker(&sim_key(idx).to_string());
            let sent = fleet.now_ns();
            ws.send(Message::text(hello(idx).to_json())).await?;
            // The joiner reads its own welcome and snapshot meanwhile.
            let (sink, mut stream) = ws.split();
            let reader =
                tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
            extra.push((sink, reader));
            let round = measure_round(&fleet, generation, sent).await?;
            println!(
                "# fanout N={n} join round {}: all {} nodes had it after {:.1} ms (p50 {:.1} ms)",
                r + 1,
                round.received,
                round.max_ms,
                round.p50_ms
            );
            joins.push(round);
            wait_quiet(&fleet, Duration::from_secs(30)).await?;
        }
        for r in 0..FANOUT_ROUNDS {
            let endpoint = format!("198.51.100.7:{}", 41_000 + r);
            let generation = fleet.set_marker(&format!("\"{endpoint}\""));
            let (sink, _) = extra.first_mut().context("no extra node")?;
            let update = ClientMessage::Update {
                endpoints: vec![endpoint.parse()?],
            };
            let sent = fleet.now_ns();
            sink.send(Message::text(update.to_json())).await?;
            let round = measure_round(&fleet, generation, sent).await?;
            println!(
                "# fanout N={n} update round {}: all {} nodes had it after {:.1} ms (p50 {:.1} ms)",
                r + 1,
                round.received,
                round.max_ms,
                round.p50_ms
            );
            updates.push(round);
            wait_quiet(&fleet, Duration::from_secs(30)).await?;
        }
        guard.check()?;
        ensure!(
            fleet.alive() == n,
            "sessions dropped during the measured rounds: {}",
            status(&fleet)
        );
        for (kind, rounds) in [("join", &joins), ("update", &updates)] {
            let max: Vec<f64> = rounds.iter().map(|r| r.max_ms).collect();
            let p50: Vec<f64> = rounds.iter().map(|r| r.p50_ms).collect();
            let s = Stats::of(&max);
            report.samples(
                &format!("fan-out of one {kind} to {n} nodes, last receipt"),
                &format!("control_fanout_{kind}_{n}"),
                "ms",
                &max,
            );
            let p = Stats::of(&p50);
            if let Some(row) = report.rows.last_mut() {
                row.detail = format!(
                    "median of {} rounds (max {:.1}); p50 over nodes {:.1} ms",
                    s.n, s.max, p.median
                );
            }
        }
        report.single(
            &format!("coordinator memory per connected node, N={n}"),
            &format!("control_mem_per_node_{n}"),
            "KiB",
            per_node,
            format!(
                "VmRSS {} → {} MiB, peak {} MiB",
                rss_before >> 10,
                rss_after >> 10,
                hwm >> 10
            ),
        );
        report.single(
            &format!("join storm of {n} nodes ({concurrency} in flight)"),
            &format!("control_join_storm_{n}"),
            "s",
            storm_time.as_secs_f64(),
            format!(
                "{:.0} joins/s; {} sessions dropped by the coordinator and rejoined; all connected after {:.1} s",
                n as f64 / storm_time.as_secs_f64(),
                fleet.rejoined.load(Ordering::Relaxed),
                settled.as_secs_f64()
            ),
        );
        anyhow::Ok(())
    }
    .await;
    // Kill the coordinator first: closing 10 000 clients first would make it
    // announce 10 000 losses to everybody.
    fleet.stop.store(true, Ordering::Release);
    coord.proc.signal_and_wait("KILL", Duration::from_secs(5));
    drop(guard);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    println!(
        "# fanout N={n}: coordinator log, WARN and INFO lines by message: {}",
        log_messages(&coord.proc.log())
    );
    result
}
