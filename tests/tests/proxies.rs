//! Real clients through a real node: curl via `socks5h://` and via `-x
//! http://` (plain and CONNECT) to a peer by name, with and without
//! credentials; bodies checked with SHA-256.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tailnode_tests::control::{CoordinatorProc, NodeOptions, NodeProc, peer};
use tailnode_tests::process::TempDir;
use tailnode_tests::transfer::pattern_hash;
use tailnode_tests::{free_tcp_port, http_origin};

const KEY: &str = "proxy-key";
const LEN: u64 = 3 << 20;

/// Runs curl; returns (exit code, HTTP code, sha256 of the body).
fn curl(args: &[&str]) -> (i32, String, [u8; 32]) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .output()
        .expect("curl is installed (scripts/test.sh installs it)");
    let stdout = out.stdout;
    let split = stdout.iter().rposition(|b| *b == b'\n').unwrap_or(0);
    let code = String::from_utf8_lossy(&stdout[split + 1..]).to_string();
    let body = &stdout[..split];
    (
        out.status.code().unwrap_or(-1),
        code,
        Sha256::digest(body).into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_socks5h_and_http_proxy_by_peer_name_with_and_without_credentials() {
    tailnode_tests::init_tracing();
    let dir = TempDir::new("proxies");
    let origin = http_origin::start("127.0.0.1:0".parse().unwrap()).await;
    let coord =
        CoordinatorProc::start(&dir, "coordinator", "127.0.0.1:0".parse().unwrap(), KEY).await;
    let http_open = free_tcp_port();
    let http_auth = free_tcp_port();
    let opts = |name, socks, extra| NodeOptions {
        name,
        coordinator: coord.url(),
        auth_key: KEY,
        socks,
        extra,
        netns: None,
        udp_port: None,
    };
    let _web = NodeProc::start(
        &dir,
        opts(
            "web",
            false,
            vec!["--expose".into(), format!("80={origin}")],
        ),
    )
    .await;
    let open = NodeProc::start(
        &dir,
        opts(
            "open",
            true,
            vec!["--http-proxy".into(), format!("127.0.0.1:{http_open}")],
        ),
    )
    .await;
    let locked = NodeProc::start(
        &dir,
        opts(
            "locked",
            true,
            vec![
                "--http-proxy".into(),
                format!("127.0.0.1:{http_auth}"),
                "--socks5-user".into(),
                "alice".into(),
                "--socks5-pass".into(),
                "wonderland".into(),
            ],
        ),
    )
    .await;
    for n in [&open, &locked] {
        n.wait_status(Duration::from_secs(15), "peer web", |s| {
            peer(s, "web").is_some_and(|p| p.state == "active")
        })
        .await;
    }
    let want = pattern_hash(http_origin::BODY_SEED, LEN);
    let url = format!("http://web/bytes/{LEN}");
    let socks_open = open.socks.unwrap();
    let socks_locked = locked.socks.unwrap();

    // No credentials needed.
    for args in [
        vec![
            "--proxy".to_string(),
            format!("socks5h://{socks_open}"),
            url.clone(),
        ],
        vec![
            "-x".to_string(),
            format!("http://127.0.0.1:{http_open}"),
            url.clone(),
        ],
        vec![
            "-p".to_string(),
            "-x".to_string(),
            format!("http://127.0.0.1:{http_open}"),
            url.clone(),
        ],
        vec![
            "-x".to_string(),
            format!("http://127.0.0.1:{http_open}"),
            format!("http://web.tailnet.internal/bytes/{LEN}"),
        ],
    ] {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (rc, code, hash) = curl(&refs);
        assert_eq!((rc, code.as_str()), (0, "200"), "curl {args:?}");
        assert_eq!(hash, want, "body through {args:?}");
    }

    // Credentials required: right ones pass, wrong or missing ones do not.
    for args in [
        vec![
            "--proxy".to_string(),
            format!("socks5h://alice:wonderland@{socks_locked}"),
            url.clone(),
        ],
        vec![
            "-x".to_string(),
            format!("http://alice:wonderland@127.0.0.1:{http_auth}"),
            url.clone(),
        ],
        vec![
            "-p".to_string(),
            "-x".to_string(),
            format!("http://alice:wonderland@127.0.0.1:{http_auth}"),
            url.clone(),
        ],
    ] {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (rc, code, hash) = curl(&refs);
        assert_eq!((rc, code.as_str()), (0, "200"), "curl {args:?}");
        assert_eq!(hash, want);
    }
    let (rc, _, _) = curl(&[
        "--proxy",
        &format!("socks5h://alice:wrong@{socks_locked}"),
        &url,
    ]);
    assert_ne!(rc, 0, "wrong SOCKS5 password refused");
    let (rc, _, _) = curl(&["--proxy", &format!("socks5h://{socks_locked}"), &url]);
    assert_ne!(rc, 0, "missing SOCKS5 credentials refused");
    let (_, code, _) = curl(&[
        "-x",
        &format!("http://alice:wrong@127.0.0.1:{http_auth}"),
        &url,
    ]);
    assert_eq!(code, "407", "wrong HTTP proxy password");
    let (_, code, _) = curl(&["-x", &format!("http://127.0.0.1:{http_auth}"), &url]);
    assert_eq!(code, "407", "missing HTTP proxy credentials");
    // An unknown peer name: a proper 502 from the HTTP proxy.
    let (_, code, _) = curl(&[
        "-x",
        &format!("http://127.0.0.1:{http_open}"),
        "http://nosuchpeer/bytes/1",
    ]);
    assert_eq!(code, "502");
}
