//! Prometheus metrics: `GET /metrics` on the address given to `tailnode up --metrics`.
//!
//! Nothing is counted twice: every scrape builds a fresh `prometheus-client` registry from the
//! state the node already keeps — the packet task's [`DataPlaneCounters`](crate::node::DataPlaneCounters),
//! the engine's [`EngineStats`](tailnode_wg::EngineStats), the netstack's statistics, the status
//! document (peers by state and source), the controller's
//! [`ControlStatus`](tailnode_control::controller::ControlStatus), the proxies'
//! [`ConnectionCounters`](crate::node::ConnectionCounters) and the API's error count — and
//! encodes it in the OpenMetrics text format (`application/openmetrics-text; version=1.0.0`,
//! which Prometheus scrapes natively). Counters are monotonic because their sources are.
//!
//! Metric names follow the Prometheus conventions: `tailnode_` prefix, snake_case, base units in
//! the name (`_bytes`, `_seconds`), `_total` on counters (added by the encoder). Label sets are
//! complete from the first scrape (every drop reason, every dial-failure cause, every peer
//! state), so a series never appears out of nowhere. See the README for the list.
//!
//! The server answers `GET /metrics` (and `HEAD`), one request per connection; it is meant for a
//! loopback address, but listens wherever the user asks: metrics carry no keys, names or
//! addresses of peers.

use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tailnode_control::controller::ConnectionState;
use tailnode_wg::DropReason;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::accept::{AcceptLimits, accept_clients};
use crate::api::{RequestLine, read_request_line};
use crate::status::StatusSource;

/// Content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Causes of failed coordinator dials (`DialError::kind`), always exported.
pub const DIAL_FAILURE_CAUSES: [&str; 9] = [
    "timeout",
    "refused",
    "dns",
    "tls",
    "http",
    "websocket",
    "protocol",
    "rejected",
    "io",
];

/// Causes of lost coordinator sessions (`SessionError::kind`), always exported.
pub const SESSION_LOSS_CAUSES: [&str; 7] = [
    "closed",
    "io",
    "websocket",
    "protocol",
    "rejected",
    "ping_timeout",
    "send_timeout",
];

/// Peer states in `tailnode_peers` (as in the status document).
const PEER_STATES: [&str; 3] = ["active", "lost", "expired"];
/// Peer sources in `tailnode_peers`.
const PEER_SOURCES: [&str; 2] = ["static", "coordinated"];

/// Where the metrics come from: the node, its control plane and its API, through the same
/// [`StatusSource`] the API serves.
#[derive(Clone)]
pub struct MetricsSource {
    status: StatusSource,
}

type Labels = Vec<(&'static str, String)>;

impl MetricsSource {
    /// Metrics of the node behind `status`.
    pub fn new(status: StatusSource) -> Self {
        Self { status }
    }

    /// The exposition now, in the OpenMetrics text format (ends with `# EOF`).
    pub async fn encode(&self) -> String {
        let mut reg = Registry::default();
        let node = self.status.node();

        // WireGuard: the UDP socket, handshakes, the engine's drops.
        let c = node.counters();
        counter(
            &mut reg,
            "tailnode_wireguard_rx_bytes",
            "Bytes of WireGuard datagrams received (UDP payload)",
            c.rx_bytes.value(),
        );
        counter(
            &mut reg,
            "tailnode_wireguard_rx_packets",
            "WireGuard datagrams received",
            c.rx_datagrams.value(),
        );
        counter(
            &mut reg,
            "tailnode_wireguard_tx_bytes",
            "Bytes of WireGuard datagrams sent (UDP payload)",
            c.tx_bytes.value(),
        );
        counter(
            &mut reg,
            "tailnode_wireguard_tx_packets",
            "WireGuard datagrams sent",
            c.tx_datagrams.value(),
        );
        counter(
            &mut reg,
            "tailnode_wireguard_handshakes_completed",
            "WireGuard handshakes completed",
            c.handshakes_completed.value(),
        );
        counter(
            &mut reg,
            "tailnode_wireguard_handshakes_failed",
            "WireGuard handshake attempts given up without an answer",
            c.handshakes_failed.value(),
        );
        if let Ok(engine) = node.engine_stats().await {
            counter_family(
                &mut reg,
                "tailnode_wireguard_dropped",
                "Datagrams and packets the WireGuard engine dropped, by reason",
                DropReason::ALL
                    .iter()
                    .map(|r| (vec![("reason", r.as_str().to_string())], engine.dropped(*r))),
            );
            counter(
                &mut reg,
                "tailnode_wireguard_cookie_replies",
                "Cookie replies sent because of load",
                engine.cookie_replies,
            );
            counter(
                &mut reg,
                "tailnode_wireguard_packets_delivered",
                "Decrypted IP packets delivered to the netstack",
                engine.packets_delivered,
            );
        }

        // Peers by state and source, from the status document.
        let status = self.status.status().await;
        let mut peers = Vec::new();
        for state in PEER_STATES {
            for source in PEER_SOURCES {
                let n = status
                    .peers
                    .iter()
                    .filter(|p| p.state == state && p.source == source)
                    .count();
                peers.push((
                    vec![("state", state.to_string()), ("source", source.to_string())],
                    i64::try_from(n).unwrap_or(i64::MAX),
                ));
            }
        }
        gauge_family(
            &mut reg,
            "tailnode_peers",
            "Peers by lifecycle state and origin",
            peers,
        );

        // The control plane.
        if let Some(control) = self.status.control() {
            let cs = control.status.borrow().clone();
            let now = Instant::now();
            gauge(
                &mut reg,
                "tailnode_control_connected",
                "Whether a coordinator session is open (1) or not (0)",
                i64::from(matches!(cs.state, ConnectionState::Connected { .. })),
            );
            counter(
                &mut reg,
                "tailnode_control_dials",
                "Coordinator dials started",
                cs.dials,
            );
            counter(
                &mut reg,
                "tailnode_control_sessions_started",
                "Coordinator sessions opened (welcome received)",
                cs.sessions_started,
            );
            counter(
                &mut reg,
                "tailnode_control_sessions_healthy",
                "Coordinator sessions that delivered their peer snapshot",
                cs.sessions_healthy,
            );
            counter_family(
                &mut reg,
                "tailnode_control_dial_failures",
                "Failed coordinator dials, by cause",
                by_cause(&DIAL_FAILURE_CAUSES, &cs.dial_failures_by_kind),
            );
            counter_family(
                &mut reg,
                "tailnode_control_session_losses",
                "Coordinator sessions that ended, by cause",
                by_cause(&SESSION_LOSS_CAUSES, &cs.session_losses_by_kind),
            );
            if let Some(at) = cs.last_coordination {
                gauge_f64(
                    &mut reg,
                    "tailnode_control_last_coordination_age_seconds",
                    "Seconds since the last message from the coordinator",
                    now.saturating_duration_since(at).as_secs_f64(),
                );
            }
        }

        // The netstack.
        let ns = node.netstack().stats();
        gauge_family(
            &mut reg,
            "tailnode_netstack_sockets",
            "Netstack sockets alive, by protocol",
            [
                ("tcp", ns.tcp_sockets),
                ("udp", ns.udp_sockets),
                ("icmp", ns.icmp_sockets),
            ]
            .map(|(p, n)| {
                (
                    vec![("protocol", p.to_string())],
                    i64::try_from(n).unwrap_or(i64::MAX),
                )
            }),
        );
        counter(
            &mut reg,
            "tailnode_netstack_rx_packets",
            "IP packets handed to the netstack",
            ns.packets_in,
        );
        counter(
            &mut reg,
            "tailnode_netstack_tx_packets",
            "IP packets the netstack produced",
            ns.packets_out,
        );
        counter_family(
            &mut reg,
            "tailnode_netstack_dropped",
            "Inbound packets the netstack dropped, by reason",
            [
                ("syn_backlog", ns.syn_dropped),
                ("fragment", ns.fragments_dropped),
            ]
            .map(|(r, n)| (vec![("reason", r.to_string())], n)),
        );

        // Proxies.
        let proxies = node.proxy_counters();
        let kinds = [("socks5", &proxies.socks5), ("http", &proxies.http)];
        gauge_family(
            &mut reg,
            "tailnode_proxy_connections_active",
            "Proxy client connections open now",
            kinds.map(|(k, c)| {
                (
                    vec![("proxy", k.to_string())],
                    i64::try_from(c.active()).unwrap_or(i64::MAX),
                )
            }),
        );
        counter_family(
            &mut reg,
            "tailnode_proxy_connections",
            "Proxy client connections accepted",
            kinds.map(|(k, c)| (vec![("proxy", k.to_string())], c.total())),
        );

        // Errors by kind.
        counter_family(
            &mut reg,
            "tailnode_errors",
            "Errors by kind: UDP sends the OS refused, API requests answered with an error",
            [
                ("udp_send", c.udp_send_errors.value()),
                ("api", self.status.api_errors()),
            ]
            .map(|(k, n)| (vec![("kind", k.to_string())], n)),
        );

        gauge_family(
            &mut reg,
            "tailnode_build_info",
            "Version of the running tailnode",
            [(vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1)],
        );

        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &reg);
        out
    }
}

fn counter(reg: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    reg.register(name, help, c);
}

fn gauge(reg: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    reg.register(name, help, g);
}

fn gauge_f64(reg: &mut Registry, name: &str, help: &str, value: f64) {
    let g: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    g.set(value);
    reg.register(name, help, g);
}

fn counter_family(
    reg: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, u64)>,
) {
    let family = Family::<Labels, Counter>::default();
    for (labels, value) in values {
        family.get_or_create(&labels).inc_by(value);
    }
    reg.register(name, help, family);
}

fn gauge_family(
    reg: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, i64)>,
) {
    let family = Family::<Labels, Gauge>::default();
    for (labels, value) in values {
        family.get_or_create(&labels).set(value);
    }
    reg.register(name, help, family);
}

/// Every known cause (zero if absent), then any other cause the controller reported.
fn by_cause<'a>(
    known: &'a [&'static str],
    counts: &'a std::collections::BTreeMap<&'static str, u64>,
) -> impl Iterator<Item = (Labels, u64)> + 'a {
    let known_iter = known.iter().map(|k| {
        (
            vec![("cause", (*k).to_string())],
            counts.get(k).copied().unwrap_or(0),
        )
    });
    let others = counts
        .iter()
        .filter(|(k, _)| !known.contains(k))
        .map(|(k, v)| (vec![("cause", (*k).to_string())], *v));
    known_iter.chain(others)
}

/// Clients the metrics endpoint serves at once; further clients are closed on accept.
pub const MAX_METRICS_CONNECTIONS: usize = 16;

/// Serves `GET /metrics` on `listener` until `cancel` fires; returns when every request in
/// flight has ended.
pub async fn serve(listener: TcpListener, source: MetricsSource, cancel: CancellationToken) {
    let kind = match listener.local_addr() {
        Ok(addr) => {
            info!(%addr, "metrics listening on /metrics");
            format!("metrics on {addr}")
        }
        Err(_) => "metrics".to_string(),
    };
    let limits = AcceptLimits {
        kind: &kind,
        max_connections: MAX_METRICS_CONNECTIONS,
        connections: None,
    };
    accept_clients(listener, &cancel, limits, |stream, _, token| {
        let source = source.clone();
        async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = handle(stream, &source) => {}
            }
        }
    })
    .await;
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, source: &MetricsSource) {
    let request = read_request_line(&mut stream).await;
    let head_only = request.as_ref().is_some_and(|r| r.method == "HEAD");
    let (status, ctype, body) = match request {
        None => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
        Some(RequestLine { method, .. }) if method != "GET" && method != "HEAD" => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
        Some(RequestLine { path, .. }) if path == "/metrics" => {
            ("200 OK", CONTENT_TYPE, source.encode().await)
        }
        Some(_) => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    if !head_only {
        let _ = stream.write_all(body.as_bytes()).await;
    }
    let _ = stream.shutdown().await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::node::{Node, NodeConfig};
    use std::collections::HashMap;
    use tokio::io::AsyncReadExt;

    /// `name{labels}` -> value, for every sample line.
    fn samples(text: &str) -> HashMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect()
    }

    #[tokio::test]
    async fn exposition_has_every_family_with_complete_label_sets() {
        let cancel = CancellationToken::new();
        let mut config = NodeConfig::new(tailnode_wg::PrivateKey::generate());
        config.addresses = vec!["100.64.0.1".parse().unwrap()];
        let node = Node::start(config, cancel.clone()).await.unwrap();
        let source = MetricsSource::new(StatusSource::new(node.handle(), None, Vec::new()));
        let socks = node.handle().proxy_counters().socks5.clone();
        let open = socks.open();
        let _closed = socks.open();
        drop(_closed);

        let text = source.encode().await;
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE tailnode_wireguard_rx_bytes counter"));
        let s = samples(&text);
        for name in [
            "tailnode_wireguard_rx_bytes_total",
            "tailnode_wireguard_tx_packets_total",
            "tailnode_wireguard_handshakes_completed_total",
            "tailnode_wireguard_handshakes_failed_total",
            "tailnode_netstack_rx_packets_total",
        ] {
            assert_eq!(s.get(name), Some(&0.0), "{name} in\n{text}");
        }
        for r in DropReason::ALL {
            let key = format!(
                "tailnode_wireguard_dropped_total{{reason=\"{}\"}}",
                r.as_str()
            );
            assert_eq!(s.get(&key), Some(&0.0), "{key}");
        }
        for state in PEER_STATES {
            for source in PEER_SOURCES {
                let key = format!("tailnode_peers{{state=\"{state}\",source=\"{source}\"}}");
                assert_eq!(s.get(&key), Some(&0.0), "{key}");
            }
        }
        assert_eq!(
            s.get("tailnode_proxy_connections_active{proxy=\"socks5\"}"),
            Some(&1.0)
        );
        assert_eq!(
            s.get("tailnode_proxy_connections_total{proxy=\"socks5\"}"),
            Some(&2.0)
        );
        assert_eq!(s.get("tailnode_errors_total{kind=\"api\"}"), Some(&0.0));
        // No coordinator: no control metrics.
        assert!(!text.contains("tailnode_control_"));
        drop(open);
        let s = samples(&source.encode().await);
        assert_eq!(
            s.get("tailnode_proxy_connections_active{proxy=\"socks5\"}"),
            Some(&0.0)
        );
        node.shutdown().await;
    }

    #[tokio::test]
    async fn serves_metrics_over_http_and_refuses_other_paths() {
        let cancel = CancellationToken::new();
        let node = Node::start(
            NodeConfig::new(tailnode_wg::PrivateKey::generate()),
            cancel.clone(),
        )
        .await
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source = MetricsSource::new(StatusSource::new(node.handle(), None, Vec::new()));
        tokio::spawn(serve(listener, source, cancel.clone()));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")));
        let (_, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(body.contains("tailnode_build_info{version="));
        assert!(body.ends_with("# EOF\n"));
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        cancel.cancel();
        node.shutdown().await;
    }
}
