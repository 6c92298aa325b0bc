//! The `tailnode` command's small subcommands, run as a real process:
//! key generation compatible with wireguard-tools, config errors with the
//! file, the line and exit code 2.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Write as _;
use std::process::{Command, Stdio};

fn tailnode() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tailnode"))
}

fn pubkey_with(program: &mut Command, private: &str) -> String {
    let mut child = program
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{private}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "pubkey failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn have_wg() -> bool {
    Command::new("wg")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn keygen_and_pubkey_match_wireguard_tools() {
    assert!(
        have_wg(),
        "wireguard-tools (`wg`) is needed: run scripts/test.sh, which installs it"
    );
    for _ in 0..5 {
        let out = tailnode().arg("keygen").output().unwrap();
        assert!(out.status.success());
        let private = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert_eq!(private.len(), 44, "base64 of 32 bytes");
        let ours = pubkey_with(tailnode().arg("pubkey"), &private);
        let theirs = pubkey_with(Command::new("wg").arg("pubkey"), &private);
        assert_eq!(ours, theirs, "public key of {private}");
    }
    // And the other way round: a key made by `wg genkey`.
    let out = Command::new("wg").arg("genkey").output().unwrap();
    let private = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(
        pubkey_with(tailnode().arg("pubkey"), &private),
        pubkey_with(Command::new("wg").arg("pubkey"), &private)
    );
}

#[test]
fn pubkey_rejects_garbage() {
    let mut child = tailnode()
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"not a key\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid private key"));
}

#[test]
fn bad_config_names_file_and_line_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("tailnode-cmd-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.conf");
    std::fs::write(
        &path,
        "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nAddress = 100.64.0.1/32\n\n[Peer]\nPublicKey = not-base64!\n",
    )
    .unwrap();
    let out = tailnode()
        .args(["up", "--socks5", "off", "--wg-config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("bad.conf"), "names the file: {stderr}");
    assert!(stderr.contains("line 6"), "names the line: {stderr}");
    assert!(stderr.contains("PublicKey"), "names the problem: {stderr}");

    let missing = dir.join("missing.conf");
    let out = tailnode()
        .args(["up", "--socks5", "off", "--wg-config"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.conf"));

    let out = tailnode()
        .args(["up", "--connect-timeout", "soon", "--wg-config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "bad duration is a usage error");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_and_sigint_stop_the_node_with_exit_code_0() {
    let dir = std::env::temp_dir().join(format!("tailnode-cmd-sig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ok.conf");
    std::fs::write(
        &path,
        "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nAddress = 100.64.0.1/32\nListenPort = 0\n",
    )
    .unwrap();
    for signal in ["TERM", "INT"] {
        let socks = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = socks.local_addr().unwrap();
        drop(socks);
        let mut child = tailnode()
            .args(["up", "--socks5", &addr.to_string(), "--wg-config"])
            .arg(&path)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "SOCKS5 port never opened"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "did not exit after SIG{signal}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0), "exit code after SIG{signal}");
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "SOCKS5 listener closed after SIG{signal}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn json_logs_are_one_object_per_line_without_secrets() {
    use std::io::BufRead as _;
    let dir = std::env::temp_dir().join(format!("tailnode-cmd-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let private = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    let path = dir.join("ok.conf");
    std::fs::write(
        &path,
        format!("[Interface]\nPrivateKey = {private}\nAddress = 100.64.0.1/32\nListenPort = 0\n"),
    )
    .unwrap();
    let mut child = tailnode()
        .args([
            "--log-format",
            "json",
            "up",
            "--socks5",
            "off",
            "--api",
            "off",
            "--wg-config",
        ])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(stderr).lines().take(50) {
        let line = line.unwrap();
        let started = line.contains("node started");
        lines.push(line);
        if started {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().any(|l| l.contains("node started")),
        "{lines:?}"
    );
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
        assert!(!line.contains(private), "private key in the logs: {line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_serves_the_page_through_the_tunnel_by_peer_name() {
    use std::io::BufRead as _;
    let socks = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socks.local_addr().unwrap();
    drop(socks);
    let mut child = tailnode()
        .args(["demo", "--socks5", &addr.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // The demo prints the curl command once the page really comes through.
    let command = std::io::BufReader::new(stdout)
        .lines()
        .take(40)
        .map(|l| l.unwrap())
        .find(|l| l.trim_start().starts_with("curl --socks5-hostname"))
        .expect("the demo prints a curl command");
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(&args)
        .output()
        .unwrap();
    // SIGTERM, so that the demo removes its scratch directory.
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Hello from web"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        command.contains("http://web/"),
        "the command uses the peer's name: {command}"
    );
}
