//! Prometheus metrics end to end: nodes started with `--metrics`, scraped over HTTP, the
//! OpenMetrics text parsed, and the values checked against what the test did — a checked
//! transfer through SOCKS5, a coordinated peer, and dial failures provoked by a node pointed at
//! a closed port.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tailnode_tests::control::{CoordinatorProc, NodeOptions, NodeProc, peer_in_state};
use tailnode_tests::process::TempDir;
use tailnode_tests::transfer::{run_client, start_server};
use tailnode_tests::{free_tcp_port, wait_for_tcp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_socks::tcp::Socks5Stream;

const KEY: &str = "test-auth-key";
const MIB: u64 = 1 << 20;

/// One parsed exposition: `name{labels}` (labels as written) -> value, and the declared types.
#[derive(Debug, Default)]
struct Exposition {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    /// Parses the OpenMetrics/Prometheus text format: `# TYPE name kind`, `# HELP`, samples
    /// `name{l="v",...} value`, and the final `# EOF`. Panics on anything else, so a malformed
    /// exposition fails the test.
    fn parse(text: &str) -> Self {
        let mut out = Self::default();
        let mut eof = false;
        for line in text.lines() {
            assert!(!eof, "content after # EOF: {line:?}");
            if line == "# EOF" {
                eof = true;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                out.types.insert(name.to_string(), kind.to_string());
            } else if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            } else {
                let (series, value) = line.rsplit_once(' ').expect("sample: series value");
                let name_end = series.find('{').unwrap_or(series.len());
                let name = &series[..name_end];
                assert!(
                    !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                    "metric name {name:?} is not snake_case"
                );
                if name_end < series.len() {
                    let labels = &series[name_end..];
                    assert!(labels.ends_with('}'), "labels of {series:?}");
                    for pair in labels[1..labels.len() - 1].split(',') {
                        let (k, v) = pair.split_once('=').expect("label k=v");
                        assert!(!k.is_empty() && v.starts_with('"') && v.ends_with('"'));
                    }
                }
                let value: f64 = value
                    .parse()
                    .unwrap_or_else(|_| panic!("value of {series:?}: {value:?}"));
                assert!(
                    out.samples.insert(series.to_string(), value).is_none(),
                    "duplicate series {series}"
                );
            }
        }
        assert!(eof, "the exposition must end with # EOF");
        out
    }

    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series}; have {:#?}", self.samples.keys()))
    }
}

/// `GET /metrics` over a fresh connection; checks the status and content type.
async fn scrape(addr: SocketAddr) -> Exposition {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: tailnode\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
        .await
        .expect("scrape answered in time")
        .unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    Exposition::parse(body)
}

/// Scrapes until `pred` holds (every 100 ms, at most `within`).
async fn scrape_until(
    addr: SocketAddr,
    within: Duration,
    what: &str,
    pred: impl Fn(&Exposition) -> bool,
) -> Exposition {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let e = scrape(addr).await;
        if pred(&e) {
            return e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {within:?} for {what}; last scrape: {e:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metrics_flag(addr: SocketAddr) -> Vec<String> {
    vec!["--metrics".into(), addr.to_string()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_transfer_peers_and_the_control_plane() {
    tailnode_tests::init_tracing();
    let dir = TempDir::new("metrics");
    let (service, _server) = start_server("127.0.0.1:0".parse().unwrap()).await;
    let coord =
        CoordinatorProc::start(&dir, "coordinator", "127.0.0.1:0".parse().unwrap(), KEY).await;
    let metrics_a: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let opts = |name, socks, extra| NodeOptions {
        name,
        coordinator: coord.url(),
        auth_key: KEY,
        socks,
        extra,
        netns: None,
        udp_port: None,
    };
    let _b = NodeProc::start(
        &dir,
        opts(
            "b",
            false,
            vec!["--expose".into(), format!("7000={service}")],
        ),
    )
    .await;
    let a = NodeProc::start(&dir, opts("a", true, metrics_flag(metrics_a))).await;
    a.wait_status(Duration::from_secs(15), "peer b active", |s| {
        peer_in_state(s, "b", "active")
    })
    .await;
    wait_for_tcp(metrics_a, Duration::from_secs(10)).await;

    let before = scrape(metrics_a).await;
    for name in [
        "tailnode_wireguard_rx_bytes",
        "tailnode_wireguard_tx_bytes",
        "tailnode_wireguard_rx_packets",
        "tailnode_wireguard_handshakes_completed",
        "tailnode_wireguard_dropped",
        "tailnode_control_dial_failures",
        "tailnode_proxy_connections",
    ] {
        assert_eq!(
            before.types.get(name).map(String::as_str),
            Some("counter"),
            "{name}"
        );
    }
    assert_eq!(before.types["tailnode_peers"], "gauge");
    assert_eq!(before.get("tailnode_control_connected"), 1.0);
    assert!(before.get("tailnode_control_sessions_started_total") >= 1.0);
    assert!(before.get("tailnode_control_dials_total") >= 1.0);
    assert!(before.get("tailnode_control_last_coordination_age_seconds") < 10.0);
    assert_eq!(
        before.get(r#"tailnode_peers{state="active",source="coordinated"}"#),
        1.0
    );
    assert_eq!(
        before.get(r#"tailnode_peers{state="lost",source="coordinated"}"#),
        0.0
    );

    // A checked transfer through a's SOCKS5 proxy to b's exposed service, both ways.
    let size = 3 * MIB;
    let stream = Socks5Stream::connect(a.socks.unwrap(), "b:7000")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), run_client(stream, size, size, 7))
        .await
        .expect("transfer in time")
        .unwrap();

    let after = scrape_until(
        metrics_a,
        Duration::from_secs(10),
        "the SOCKS connection to close",
        |e| e.get(r#"tailnode_proxy_connections_active{proxy="socks5"}"#) == 0.0,
    )
    .await;
    for dir in ["rx", "tx"] {
        let grown = after.get(&format!("tailnode_wireguard_{dir}_bytes_total"))
            - before.get(&format!("tailnode_wireguard_{dir}_bytes_total"));
        assert!(
            grown >= size as f64,
            "{dir} bytes grew by {grown}, less than the {size} bytes moved"
        );
        let packets = after.get(&format!("tailnode_wireguard_{dir}_packets_total"))
            - before.get(&format!("tailnode_wireguard_{dir}_packets_total"));
        // At most one MTU of payload per datagram.
        assert!(
            packets >= (size / 1420) as f64,
            "{dir} packets grew by {packets}"
        );
    }
    assert!(after.get("tailnode_wireguard_handshakes_completed_total") >= 1.0);
    assert!(after.get(r#"tailnode_proxy_connections_total{proxy="socks5"}"#) >= 1.0);
    assert_eq!(
        after.get(r#"tailnode_proxy_connections_total{proxy="http"}"#),
        0.0
    );
    assert_eq!(
        after.get(r#"tailnode_wireguard_dropped_total{reason="authentication_failed"}"#),
        0.0
    );
    assert_eq!(after.get(r#"tailnode_errors_total{kind="udp_send"}"#), 0.0);
    // Counters never go down between scrapes.
    for (series, value) in &before.samples {
        if series.contains("_total") {
            assert!(after.get(series) >= *value, "{series} went down");
        }
    }

    // An API request the node refuses is counted as an API error.
    let api_errors = after.get(r#"tailnode_errors_total{kind="api"}"#);
    let mut cmd = tokio::process::Command::new(tailnode_tests::tailnode_bin());
    let out = cmd
        .args(["ping", "nosuchpeer", "--api", &a.api.to_string()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = scrape(metrics_a).await;
    assert_eq!(
        e.get(r#"tailnode_errors_total{kind="api"}"#),
        api_errors + 1.0
    );

    // A node pointed at a closed port: refused dials are counted by cause, never connected.
    let closed = free_tcp_port();
    let metrics_c: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let _c = NodeProc::start(
        &dir,
        NodeOptions {
            name: "c",
            coordinator: format!("ws://127.0.0.1:{closed}"),
            auth_key: KEY,
            socks: false,
            extra: metrics_flag(metrics_c),
            netns: None,
            udp_port: None,
        },
    )
    .await;
    wait_for_tcp(metrics_c, Duration::from_secs(10)).await;
    let c = scrape_until(
        metrics_c,
        Duration::from_secs(15),
        "two refused dials",
        |e| e.get(r#"tailnode_control_dial_failures_total{cause="refused"}"#) >= 2.0,
    )
    .await;
    assert_eq!(c.get("tailnode_control_connected"), 0.0);
    assert_eq!(c.get("tailnode_control_sessions_started_total"), 0.0);
    assert_eq!(
        c.get(r#"tailnode_control_dial_failures_total{cause="timeout"}"#),
        0.0
    );
    assert!(
        !c.samples
            .contains_key("tailnode_control_last_coordination_age_seconds"),
        "never coordinated"
    );
    assert_eq!(
        c.get(r#"tailnode_peers{state="active",source="coordinated"}"#),
        0.0
    );
}
