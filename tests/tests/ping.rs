//! `tailnode ping` end to end: the command asks a running node (through its local API) to send
//! ICMP echo requests from its netstack — to a coordinated tailnode peer by name and by address,
//! to a peer that died, to names and addresses outside the tailnet, and to wireguard-go's kernel
//! in a network namespace (root; CI runs as root).

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use tailnode::api::{ApiAddr, fetch_status};
use tailnode_tests::control::{CoordinatorProc, NodeOptions, NodeProc, peer, peer_in_state};
use tailnode_tests::netns::{Slot, WireguardGo, require_root};
use tailnode_tests::process::{Proc, TempDir};
use tailnode_tests::{free_udp_port, tailnode_bin};
use tailnode_wg::PrivateKey;

const KEY: &str = "test-auth-key";

/// What one `tailnode ping` run printed and returned.
#[derive(Debug)]
struct PingRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl PingRun {
    /// The per-reply lines ("64 bytes from ADDR: icmp_seq=N time=T ms").
    fn replies(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.contains(" bytes from ") && l.contains("icmp_seq="))
            .collect()
    }

    fn timeouts(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with("no reply: icmp_seq="))
            .collect()
    }
}

/// Runs `tailnode ping ARGS --api API` (bounded to 60 s).
async fn ping(api: &ApiAddr, args: &[&str]) -> PingRun {
    let mut cmd = tokio::process::Command::new(tailnode_bin());
    cmd.arg("ping")
        .args(args)
        .arg("--api")
        .arg(api.to_string())
        .env_remove("TAILNODE_API")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("tailnode ping finished within 60 s")
        .expect("tailnode ping ran");
    PingRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every reply line names `from`, a sequence number in 1..=count, and a plausible time.
fn check_replies(run: &PingRun, from: &str, count: usize) {
    let replies = run.replies();
    assert_eq!(replies.len(), count, "{run:#?}");
    let mut seqs = Vec::new();
    for line in replies {
        assert!(line.contains(&format!(" bytes from {from}: ")), "{line}");
        let seq: usize = line
            .split("icmp_seq=")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no sequence number in {line:?}"));
        let time: f64 = line
            .split("time=")
            .nth(1)
            .and_then(|s| s.strip_suffix(" ms"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no time in {line:?}"));
        assert!((0.0..5000.0).contains(&time), "{line}");
        seqs.push(seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=count).collect::<Vec<_>>(), "{run:#?}");
    assert!(
        run.stdout.contains(&format!(
            "{count} packets transmitted, {count} received, 0% packet loss"
        )),
        "{run:#?}"
    );
    assert!(run.stdout.contains("rtt min/avg/max = "), "{run:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_a_coordinated_peer_by_name_and_address_then_after_it_died() {
    tailnode_tests::init_tracing();
    let dir = TempDir::new("ping-coordinated");
    let coord =
        CoordinatorProc::start(&dir, "coordinator", "127.0.0.1:0".parse().unwrap(), KEY).await;
    let opts = |name| NodeOptions {
        name,
        coordinator: coord.url(),
        auth_key: KEY,
        socks: false,
        extra: vec![],
        netns: None,
        udp_port: None,
    };
    let a = NodeProc::start(&dir, opts("a")).await;
    let mut b = NodeProc::start(&dir, opts("b")).await;
    let status = a
        .wait_status(Duration::from_secs(15), "peer b active", |s| {
            peer_in_state(s, "b", "active")
        })
        .await;
    let b_addrs: Vec<String> = peer(&status, "b")
        .unwrap()
        .allowed_ips
        .iter()
        .map(|net| net.split('/').next().unwrap().to_string())
        .collect();
    let b_v4 = b_addrs.iter().find(|a| a.contains('.')).unwrap().clone();
    let b_v6 = b_addrs.iter().find(|a| a.contains(':')).unwrap().clone();

    // By name: every probe answered, from b's IPv4 address.
    let run = ping(&a.api, &["b", "-c", "3", "-i", "0.2", "-W", "3"]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stdout
            .starts_with(&format!("PING b ({b_v4}): 56 data bytes")),
        "{run:#?}"
    );
    check_replies(&run, &b_v4, 3);
    assert!(run.timeouts().is_empty());

    // By IPv6 address, with another payload size.
    let run = ping(&a.api, &[&b_v6, "-c", "2", "-i", "100ms", "-s", "1000"]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    check_replies(&run, &b_v6, 2);
    assert!(run.replies()[0].starts_with("1008 bytes from "), "{run:#?}");

    // The node's own name is a fine target too.
    let run = ping(&a.api, &["a", "-c", "1"]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");

    // Usage errors are exit status 2 with a clear message, and nothing is sent.
    let run = ping(&a.api, &["nosuchpeer", "-c", "1"]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr.contains("unknown peer \"nosuchpeer\""),
        "{run:#?}"
    );
    let run = ping(&a.api, &["192.0.2.1", "-c", "1"]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(run.stderr.contains("outside the tailnet"), "{run:#?}");
    let run = ping(&a.api, &["b", "-i", "0.001"]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(run.stderr.contains("interval"), "{run:#?}");
    let run = ping(&a.api, &["b", "-c", "many"]).await;
    assert_eq!(run.code, Some(2), "clap refuses the flag: {run:#?}");
    // An API nobody listens on.
    let gone = ApiAddr::Unix(dir.path().join("nobody.sock"));
    let run = ping(&gone, &["b", "-c", "1"]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr.contains("cannot reach the node's API"),
        "{run:#?}"
    );

    // b dies without a goodbye: it stays a (lost) peer with its name, and nothing answers.
    b.proc
        .signal_and_wait("KILL", Duration::from_secs(5))
        .expect("b killed");
    a.wait_status(Duration::from_secs(5), "b to be lost", |s| {
        peer_in_state(s, "b", "lost")
    })
    .await;
    let run = ping(&a.api, &["b", "-c", "3", "-i", "0.2", "-W", "0.5"]).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(run.replies().is_empty(), "{run:#?}");
    assert_eq!(run.timeouts().len(), 3, "{run:#?}");
    assert!(
        run.stdout
            .contains("3 packets transmitted, 0 received, 100% packet loss"),
        "{run:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_wireguard_go_in_a_namespace() {
    require_root();
    tailnode_tests::init_tracing();
    let dir = TempDir::new("ping-wggo");
    let slot = Slot(31);
    let key = PrivateKey::generate();
    let udp = free_udp_port();
    let wg = WireguardGo::start(
        slot,
        &dir,
        key.public_key(),
        Some(SocketAddr::new(slot.host_underlay(), udp)),
    );
    let conf = wg.node_config(&key, udp, None);
    let conf_path = dir.write("node.conf", &conf);
    let api = ApiAddr::Unix(dir.path().join("node.sock"));
    let _node = Proc::tailnode(
        "node",
        &dir,
        &[
            "up".into(),
            "--wg-config".into(),
            conf_path.display().to_string(),
            "--socks5".into(),
            "off".into(),
            "--api".into(),
            api.to_string(),
        ],
    );
    tailnode_tests::retry(200, Duration::from_millis(100), || fetch_status(&api))
        .await
        .expect("the node's API answers");

    // The first probe starts the WireGuard handshake; wireguard-go's kernel answers them all.
    for addr in [slot.peer_v4(), slot.peer_v6()] {
        let run = ping(&api, &[&addr, "-c", "3", "-i", "0.2", "-W", "5"]).await;
        assert_eq!(run.code, Some(0), "{run:#?}\n{}", wg.dump());
        check_replies(&run, &addr, 3);
    }
    // Inside the tailnet's prefix but not routed to the peer (its allowed IPs are /32 and
    // /128): refused before anything is sent.
    let run = ping(&api, &[&format!("100.64.{}.9", slot.0), "-c", "1"]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(run.stderr.contains("outside the tailnet"), "{run:#?}");
}
