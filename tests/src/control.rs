//! A coordinator and coordinated nodes as processes, observed through the
//! nodes' local status API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tailnode::api::{ApiAddr, fetch_status};
use tailnode::status::{PeerStatus, Status};

use crate::process::{Proc, TempDir};
use crate::{free_tcp_port, free_udp_port, wait_for_tcp};

/// Shortened timers for tests: failures are noticed in well under a second
/// and a lost peer expires after [`LOST_PEER_TIMEOUT`].
pub const NODE_TIMERS: [&str; 8] = [
    "--dial-timeout",
    "1s",
    "--retry-max-backoff",
    "500ms",
    "--ping-interval",
    "300ms",
    "--lost-peer-timeout",
    "4s",
];

/// The lost-peer timeout in [`NODE_TIMERS`].
pub const LOST_PEER_TIMEOUT: Duration = Duration::from_secs(4);

/// A coordinator process.
pub struct CoordinatorProc {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub state: PathBuf,
}

impl CoordinatorProc {
    /// Starts `tailnode coordinator` on `addr` (port 0: a free one) with a
    /// state file in `dir`, and waits for /healthz.
    pub async fn start(dir: &TempDir, name: &str, addr: SocketAddr, auth_key: &str) -> Self {
        let state = dir.path().join(format!("{name}-state.json"));
        Self::start_with_state(dir, name, addr, auth_key, state).await
    }

    /// A coordinator that takes over an earlier one's address and state
    /// file, as a restart would.
    pub async fn restart(&self, dir: &TempDir, name: &str, auth_key: &str) -> Self {
        Self::start_with_state(dir, name, self.addr, auth_key, self.state.clone()).await
    }

    /// Like [`CoordinatorProc::start`] with a given state file.
    pub async fn start_with_state(
        dir: &TempDir,
        name: &str,
        addr: SocketAddr,
        auth_key: &str,
        state: PathBuf,
    ) -> Self {
        let addr = if addr.port() == 0 {
            SocketAddr::new(addr.ip(), free_tcp_port())
        } else {
            addr
        };
        let proc = Proc::tailnode(
            name,
            dir,
            &[
                "coordinator".into(),
                "--listen".into(),
                addr.to_string(),
                "--auth-key".into(),
                auth_key.into(),
                "--state".into(),
                state.display().to_string(),
                "--ping-interval".into(),
                "300ms".into(),
            ],
        );
        let probe = if addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        };
        wait_for_tcp(probe, Duration::from_secs(20)).await;
        Self { proc, addr, state }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

/// A coordinated node process.
pub struct NodeProc {
    pub proc: Proc,
    pub name: String,
    pub api: ApiAddr,
    pub socks: Option<SocketAddr>,
    pub udp_port: u16,
}

/// How to start a node.
pub struct NodeOptions<'a> {
    pub name: &'a str,
    pub coordinator: String,
    pub auth_key: &'a str,
    pub socks: bool,
    pub extra: Vec<String>,
    /// Run inside this network namespace (`ip netns exec`).
    pub netns: Option<&'a str>,
    /// WireGuard UDP port (default: a free one).
    pub udp_port: Option<u16>,
}

impl NodeProc {
    /// Starts `tailnode up --coordinator ...` with [`NODE_TIMERS`], a key
    /// file and an API socket in `dir`.
    pub async fn start(dir: &TempDir, opts: NodeOptions<'_>) -> Self {
        let udp_port = opts.udp_port.unwrap_or_else(free_udp_port);
        let api = ApiAddr::Unix(dir.path().join(format!("{}.sock", opts.name)));
        let socks = opts
            .socks
            .then(|| SocketAddr::from(([127, 0, 0, 1], free_tcp_port())));
        let mut args: Vec<String> = vec![
            "up".into(),
            "--coordinator".into(),
            opts.coordinator.clone(),
            "--name".into(),
            opts.name.into(),
            "--auth-key".into(),
            opts.auth_key.into(),
            "--key-file".into(),
            dir.path()
                .join(format!("{}.key", opts.name))
                .display()
                .to_string(),
            "--listen-port".into(),
            udp_port.to_string(),
            "--api".into(),
            api.to_string(),
            "--socks5".into(),
            socks.map_or_else(|| "off".to_string(), |s| s.to_string()),
        ];
        args.extend(NODE_TIMERS.iter().map(|s| (*s).to_string()));
        args.extend(opts.extra);
        let log = dir.path().join(format!("{}.log", opts.name));
        let proc = match opts.netns {
            None => Proc::spawn(opts.name, &crate::tailnode_bin(), &args, &[], log),
            Some(ns) => {
                let mut full = vec![
                    "netns".to_string(),
                    "exec".to_string(),
                    ns.to_string(),
                    crate::tailnode_bin().display().to_string(),
                ];
                full.extend(args);
                Proc::spawn(
                    opts.name,
                    std::path::Path::new("ip"),
                    &full,
                    &[("RUST_LOG", "info")],
                    log,
                )
            }
        };
        let node = Self {
            proc,
            name: opts.name.to_string(),
            api,
            socks,
            udp_port,
        };
        // The API comes up once the node runs.
        node.wait_status(Duration::from_secs(20), "the API to answer", |_| true)
            .await;
        node
    }

    /// The node's status document.
    pub async fn status(&self) -> anyhow::Result<Status> {
        Ok(fetch_status(&self.api).await?)
    }

    /// Polls the status until `pred` holds (every 100 ms, at most `timeout`);
    /// panics with the last status and the node's log otherwise.
    pub async fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Status) -> bool,
    ) -> Status {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Ok(s) = self.status().await {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{}: waited {timeout:?} for {what}; last status: {}\n---- log ----\n{}",
                    self.name,
                    last.map(|s| serde_json::to_string_pretty(&s).unwrap_or_default())
                        .unwrap_or_else(|| "none".into()),
                    self.proc.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The peer named `name` in a status document.
pub fn peer<'a>(status: &'a Status, name: &str) -> Option<&'a PeerStatus> {
    status
        .peers
        .iter()
        .find(|p| p.name.as_deref() == Some(name))
}

/// Whether the node has a peer `name` in state `state`.
pub fn peer_in_state(status: &Status, name: &str, state: &str) -> bool {
    peer(status, name).is_some_and(|p| p.state == state)
}
