//! Driver tests: `curl` as a real proxy client against local origin servers on 127.0.0.1, raw
//! byte clients for exact framing, and in-memory streams on paused time for the deadlines.
//!
//! The origin server here is written independently of [`super::parse`] (line-based, with its own
//! chunked decoder) so that the proxy is not checked against itself.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::server::{Outcome, serve_connection};
use super::*;
use crate::dial::{DialError, Dialer, TargetAddr};
use crate::socks5::Credentials;

/// Bounds how long a test waits for something that must happen promptly; a hang is a failure.
async fn guard<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("timed out")
}

// ---------------------------------------------------------------------------------------------
// Dialers

/// Connects targets through `routes` (domains must be listed; IPs default to themselves) and
/// records every dial.
#[derive(Default)]
struct LocalDialer {
    routes: HashMap<TargetAddr, SocketAddr>,
    dials: Mutex<Vec<TargetAddr>>,
}

impl LocalDialer {
    fn with(routes: impl IntoIterator<Item = (TargetAddr, SocketAddr)>) -> Self {
        Self {
            routes: routes.into_iter().collect(),
            dials: Mutex::default(),
        }
    }
}

impl Dialer for LocalDialer {
    type Stream = TcpStream;

    async fn connect(&self, target: &TargetAddr) -> Result<(TcpStream, SocketAddr), DialError> {
        self.dials.lock().unwrap().push(target.clone());
        let addr = match (self.routes.get(target), target) {
            (Some(addr), _) => *addr,
            (None, TargetAddr::Ip(addr)) => *addr,
            (None, TargetAddr::Domain(..)) => return Err(DialError::HostUnreachable),
        };
        let stream = TcpStream::connect(addr).await.map_err(|e| match e.kind() {
            io::ErrorKind::ConnectionRefused => DialError::ConnectionRefused,
            _ => DialError::from_io(&e),
        })?;
        let local = stream.local_addr().map_err(|e| DialError::from_io(&e))?;
        Ok((stream, local))
    }
}

/// Fails every dial with the same error.
struct FailDialer(DialError);

impl Dialer for FailDialer {
    type Stream = TcpStream;

    async fn connect(&self, _: &TargetAddr) -> Result<(TcpStream, SocketAddr), DialError> {
        Err(self.0.clone())
    }
}

/// Never finishes a dial.
struct PendingDialer;

impl Dialer for PendingDialer {
    type Stream = TcpStream;

    async fn connect(&self, _: &TargetAddr) -> Result<(TcpStream, SocketAddr), DialError> {
        std::future::pending().await
    }
}

/// Hands out prepared in-memory streams, one per dial.
struct DuplexDialer(Mutex<Vec<tokio::io::DuplexStream>>);

impl Dialer for DuplexDialer {
    type Stream = tokio::io::DuplexStream;

    async fn connect(
        &self,
        _: &TargetAddr,
    ) -> Result<(tokio::io::DuplexStream, SocketAddr), DialError> {
        let stream = self.0.lock().unwrap().pop();
        stream
            .map(|s| (s, "100.64.0.1:40000".parse().unwrap()))
            .ok_or(DialError::HostUnreachable)
    }
}

struct Running {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<io::Result<()>>,
}

async fn start<D: Dialer>(config: HttpProxyConfig, dialer: Arc<D>) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let server = HttpProxyServer::new(config, dialer);
    let task = tokio::spawn(server.serve(listener, cancel.clone()));
    Running { addr, cancel, task }
}

// ---------------------------------------------------------------------------------------------
// The origin server

/// Deterministic pseudo-random bytes (xorshift).
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The chunked body `/chunked` answers with, byte for byte: uneven chunks, an extension, a
/// trailer section.
fn chunked_wire_body() -> Vec<u8> {
    let data = payload(100_000, 3);
    let mut out = Vec::new();
    for (i, chunk) in data.chunks(7_001).enumerate() {
        if i == 1 {
            out.extend_from_slice(format!("{:X};name=\"v\"\r\n", chunk.len()).as_bytes());
        } else {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        }
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\nX-Checksum: ");
    out.extend_from_slice(sha256_hex(&data).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// What the origin saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    /// The request line.
    line: String,
    /// The head as received, without the request line.
    head: String,
    /// Header fields, names lowercased.
    headers: Vec<(String, String)>,
    /// The decoded body.
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct OriginLog {
    connections: AtomicUsize,
    requests: Mutex<Vec<Seen>>,
}

impl OriginLog {
    fn requests(&self) -> Vec<Seen> {
        self.requests.lock().unwrap().clone()
    }
}

/// An HTTP/1.1 origin server with keep-alive. With `close_each`, it closes every connection after
/// one response without saying so (as a server whose keep-alive timer just fired).
async fn origin(close_each: bool) -> (SocketAddr, Arc<OriginLog>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(OriginLog::default());
    let shared = Arc::clone(&log);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            shared.connections.fetch_add(1, Ordering::SeqCst);
            let log = Arc::clone(&shared);
            tokio::spawn(async move {
                let _ = origin_connection(stream, &log, close_each).await;
            });
        }
    });
    (addr, log)
}

async fn read_line<R: AsyncBufReadExt + Unpin>(r: &mut R) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line).await? == 0 {
        return Ok(None);
    }
    let line = String::from_utf8(line).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_owned()))
}

async fn origin_connection(stream: TcpStream, log: &OriginLog, close_each: bool) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let Some(line) = read_line(&mut r).await? else {
            return Ok(());
        };
        let mut head = String::new();
        let mut headers = Vec::new();
        loop {
            let Some(field) = read_line(&mut r).await? else {
                return Ok(());
            };
            if field.is_empty() {
                break;
            }
            head.push_str(&field);
            head.push_str("\r\n");
            let (name, value) = field.split_once(':').unwrap_or((&field, ""));
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut seen = Seen {
            line: line.clone(),
            head,
            headers,
            body: Vec::new(),
        };
        if seen.header("expect") == Some("100-continue") {
            w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        if seen.header("transfer-encoding") == Some("chunked") {
            // A malformed body (sent by tests that check the proxy refuses it) just ends the
            // connection.
            loop {
                let Some(size_line) = read_line(&mut r).await? else {
                    return Ok(());
                };
                let digits = size_line.split(';').next().unwrap_or_default().trim();
                let Ok(size) = usize::from_str_radix(digits, 16) else {
                    return Ok(());
                };
                if size == 0 {
                    while !read_line(&mut r).await?.unwrap_or_default().is_empty() {}
                    break;
                }
                let mut chunk = vec![0; size];
                r.read_exact(&mut chunk).await?;
                seen.body.extend_from_slice(&chunk);
                if read_line(&mut r).await?.as_deref() != Some("") {
                    return Ok(());
                }
            }
        } else if let Some(len) = seen.header("content-length") {
            let mut body = vec![0; len.parse().unwrap_or(0)];
            r.read_exact(&mut body).await?;
            seen.body = body;
        }
        log.requests.lock().unwrap().push(seen.clone());
        let mut parts = line.split(' ');
        let (method, path) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let head_only = method == "HEAD";
        let fixed = |body: Vec<u8>| {
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\n\r\n",
                body.len()
            )
            .into_bytes();
            if !head_only {
                out.extend_from_slice(&body);
            }
            out
        };
        let mut close = close_each || seen.header("connection") == Some("close");
        let answer = match path.split('?').next().unwrap_or_default() {
            "/data" => fixed(payload(1 << 20, 1)),
            "/data2" => fixed(payload(300_000, 2)),
            "/hash" => fixed(sha256_hex(&seen.body).into_bytes()),
            "/headers" => fixed(format!("{}\r\n{}", seen.line, seen.head).into_bytes()),
            "/chunked" => {
                let mut out =
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
                        .to_vec();
                out.extend_from_slice(&chunked_wire_body());
                out
            }
            "/close" => {
                close = true;
                let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n".to_vec();
                out.extend_from_slice(&payload(200_000, 4));
                out
            }
            "/nothing" => b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n".to_vec(),
            "/ws" => {
                w.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\nhello from upstream;")
                    .await?;
                // Echo everything, starting with bytes already buffered.
                let mut buf = vec![0; 4096];
                loop {
                    let n = r.read(&mut buf).await?;
                    if n == 0 {
                        w.shutdown().await?;
                        return Ok(());
                    }
                    w.write_all(&buf[..n]).await?;
                }
            }
            _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
        };
        w.write_all(&answer).await?;
        if close {
            w.shutdown().await?;
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// curl

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tailnode-http-proxy-{}-{name}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Curl {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs curl through `proxy` with `args`; proxy variables from the environment are ignored.
async fn curl(proxy: SocketAddr, args: &[&str]) -> Curl {
    let proxy = format!("http://{proxy}");
    let output = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "20", "-x", &proxy])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .kill_on_drop(true)
        .output();
    let output = guard(output)
        .await
        .expect("curl must be installed to run these tests");
    Curl {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn file_hash(path: &str) -> String {
    sha256_hex(&std::fs::read(path).unwrap())
}

fn origin_dialer(origin: SocketAddr) -> Arc<LocalDialer> {
    Arc::new(LocalDialer::with([
        (TargetAddr::Domain("origin.test".into(), 80), origin),
        (TargetAddr::Domain("origin.test".into(), 8080), origin),
    ]))
}

#[tokio::test]
async fn curl_get_two_urls_share_one_client_and_one_upstream_connection() {
    let (origin, log) = origin(false).await;
    let dialer = origin_dialer(origin);
    let proxy = start(HttpProxyConfig::default(), Arc::clone(&dialer)).await;
    let scratch = Scratch::new("get");
    let (a, b) = (scratch.path("a"), scratch.path("b"));
    let out = curl(
        proxy.addr,
        &[
            "-w",
            "%{http_code} %{num_connects}\n",
            "-o",
            &a,
            "http://origin.test/data",
            "-o",
            &b,
            "http://origin.test/data2",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // The second transfer reused curl's connection to the proxy...
    assert_eq!(out.stdout, "200 1\n200 0\n");
    assert_eq!(file_hash(&a), sha256_hex(&payload(1 << 20, 1)));
    assert_eq!(file_hash(&b), sha256_hex(&payload(300_000, 2)));
    // ...and the proxy reused its connection to the origin.
    assert_eq!(log.connections.load(Ordering::SeqCst), 1);
    assert_eq!(dialer.dials.lock().unwrap().len(), 1);
    let seen = log.requests();
    assert_eq!(seen[0].line, "GET /data HTTP/1.1");
    assert_eq!(seen[1].line, "GET /data2 HTTP/1.1");
    assert_eq!(seen[0].header("host"), Some("origin.test"));
    assert_eq!(seen[1].header("host"), Some("origin.test"));
    for request in &seen {
        assert_eq!(request.header("via"), Some("1.1 tailnode"));
        assert_eq!(request.header("proxy-connection"), None);
    }
}

#[tokio::test]
async fn curl_post_with_expect_100_continue_delivers_the_body_exactly() {
    let (origin, log) = origin(false).await;
    let proxy = start(HttpProxyConfig::default(), origin_dialer(origin)).await;
    let scratch = Scratch::new("post");
    let upload = scratch.path("upload");
    // Over 1 MiB, so that curl asks `Expect: 100-continue` and waits for the interim answer.
    let data = payload((1 << 20) + 12_345, 9);
    std::fs::write(&upload, &data).unwrap();
    let out = curl(
        proxy.addr,
        &[
            "-v",
            "--data-binary",
            &format!("@{upload}"),
            "http://origin.test:8080/hash",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, sha256_hex(&data));
    assert!(
        out.stderr.contains("< HTTP/1.1 100 Continue"),
        "the interim answer reached curl: {}",
        out.stderr
    );
    let seen = log.requests();
    assert_eq!(seen[0].line, "POST /hash HTTP/1.1");
    assert_eq!(seen[0].header("content-length"), Some("1060921"));
    assert_eq!(seen[0].header("expect"), Some("100-continue"));
}

#[tokio::test]
async fn curl_chunked_upload_is_forwarded_chunked() {
    let (origin, log) = origin(false).await;
    let proxy = start(HttpProxyConfig::default(), origin_dialer(origin)).await;
    let scratch = Scratch::new("chunked");
    let upload = scratch.path("upload");
    let data = payload(1 << 20, 11);
    std::fs::write(&upload, &data).unwrap();
    let out = curl(
        proxy.addr,
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "-X",
            "PUT",
            "--data-binary",
            &format!("@{upload}"),
            "http://origin.test/hash",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, sha256_hex(&data));
    let seen = log.requests();
    assert_eq!(seen[0].line, "PUT /hash HTTP/1.1");
    assert_eq!(seen[0].header("transfer-encoding"), Some("chunked"));
    assert_eq!(seen[0].header("content-length"), None);
}

#[tokio::test]
async fn curl_head_requests_have_no_body_and_keep_the_connection() {
    let (origin, log) = origin(false).await;
    let proxy = start(HttpProxyConfig::default(), origin_dialer(origin)).await;
    // Had the proxy waited for the 1 MiB the Content-Length announces, the second request would
    // never be answered.
    let out = curl(
        proxy.addr,
        &[
            "--head",
            "-w",
            "%{http_code} %{num_connects} %{size_download}\n",
            "-o",
            "/dev/null",
            "http://origin.test/data",
            "-o",
            "/dev/null",
            "http://origin.test/data",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "200 1 0\n200 0 0\n");
    assert_eq!(log.connections.load(Ordering::SeqCst), 1);
    assert!(
        log.requests()
            .iter()
            .all(|r| r.line == "HEAD /data HTTP/1.1")
    );
}

#[tokio::test]
async fn curl_proxytunnel_uses_connect() {
    let (origin, log) = origin(false).await;
    let dialer = origin_dialer(origin);
    let proxy = start(HttpProxyConfig::default(), Arc::clone(&dialer)).await;
    let scratch = Scratch::new("connect");
    let file = scratch.path("data");
    let out = curl(
        proxy.addr,
        &["-p", "-v", "-o", &file, "http://origin.test:8080/data"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("CONNECT origin.test:8080 HTTP/1.1"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("< HTTP/1.1 200 Connection established"),
        "{}",
        out.stderr
    );
    assert_eq!(file_hash(&file), sha256_hex(&payload(1 << 20, 1)));
    // Through the tunnel curl speaks to the origin directly: origin form, no Via.
    let seen = log.requests();
    assert_eq!(seen[0].line, "GET /data HTTP/1.1");
    assert_eq!(seen[0].header("via"), None);
    assert_eq!(
        *dialer.dials.lock().unwrap(),
        [TargetAddr::Domain("origin.test".into(), 8080)]
    );
}

#[tokio::test]
async fn curl_with_credentials_right_and_wrong() {
    let (origin, log) = origin(false).await;
    let config = HttpProxyConfig {
        auth: Some(Credentials::new("u", "p@ss:w").unwrap()),
        ..HttpProxyConfig::default()
    };
    let proxy = start(config, origin_dialer(origin)).await;
    let scratch = Scratch::new("auth");
    let file = scratch.path("data");

    let ok = curl(
        proxy.addr,
        &[
            "--proxy-user",
            "u:p@ss:w",
            "-o",
            &file,
            "-w",
            "%{http_code}",
            "http://origin.test/data",
        ],
    )
    .await;
    assert_eq!(
        (ok.code, ok.stdout.as_str()),
        (Some(0), "200"),
        "{}",
        ok.stderr
    );
    assert_eq!(file_hash(&file), sha256_hex(&payload(1 << 20, 1)));

    for user in [
        &["--proxy-user", "u:wrong"][..],
        &["--proxy-user", "x:p@ss:w"],
        &[],
    ] {
        let denied = curl(
            proxy.addr,
            &[
                user,
                &[
                    "-D",
                    "-",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://origin.test/data",
                ][..],
            ]
            .concat(),
        )
        .await;
        assert_eq!(denied.code, Some(0), "{}", denied.stderr);
        assert!(
            denied
                .stdout
                .starts_with("HTTP/1.1 407 Proxy Authentication Required\r\n"),
            "{}",
            denied.stdout
        );
        assert!(
            denied
                .stdout
                .contains("Proxy-Authenticate: Basic realm=\"tailnode\"\r\n"),
            "{}",
            denied.stdout
        );
        assert!(denied.stdout.ends_with("407"), "{}", denied.stdout);
    }

    // CONNECT is guarded the same way.
    let tunnel_ok = curl(
        proxy.addr,
        &[
            "-p",
            "--proxy-user",
            "u:p@ss:w",
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect} %{http_code}",
            "http://origin.test/data2",
        ],
    )
    .await;
    assert_eq!(
        (tunnel_ok.code, tunnel_ok.stdout.as_str()),
        (Some(0), "200 200"),
        "{}",
        tunnel_ok.stderr
    );
    let tunnel_denied = curl(
        proxy.addr,
        &[
            "-p",
            "--proxy-user",
            "u:nope",
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            "http://origin.test/data",
        ],
    )
    .await;
    assert_eq!(tunnel_denied.stdout, "407", "{}", tunnel_denied.stderr);
    assert_ne!(tunnel_denied.code, Some(0));

    // The origin saw two requests (the plain GET and the tunnelled one), never the credentials.
    let seen = log.requests();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|r| r.header("proxy-authorization").is_none())
    );
}

#[tokio::test]
async fn curl_gets_502_for_refused_and_forbidden_targets_and_504_for_timeouts() {
    // A port nobody listens on: bind, learn the port, close.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = start(HttpProxyConfig::default(), origin_dialer(closed)).await;
    let out = curl(
        proxy.addr,
        &["-w", "\n%{http_code}", "http://origin.test/x"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "502 Bad Gateway: cannot connect to origin.test:80: connection refused\n\n502"
    );
    let tunnel = curl(
        proxy.addr,
        &["-p", "-w", "%{http_connect}", "http://origin.test/x"],
    )
    .await;
    assert_eq!(tunnel.stdout, "502");
    assert_ne!(tunnel.code, Some(0));

    let forbidden = start(
        HttpProxyConfig::default(),
        Arc::new(FailDialer(DialError::NotAllowed)),
    )
    .await;
    let out = curl(
        forbidden.addr,
        &["-w", "\n%{http_code}", "http://100.64.0.9/"],
    )
    .await;
    assert_eq!(
        out.stdout,
        "502 Bad Gateway: cannot connect to 100.64.0.9:80: connection not allowed by policy\n\n502"
    );

    let unreachable = start(
        HttpProxyConfig::default(),
        Arc::new(FailDialer(DialError::HostUnreachable)),
    )
    .await;
    let out = curl(
        unreachable.addr,
        &["-w", "\n%{http_code}", "http://[fd7a::5]:81/"],
    )
    .await;
    assert_eq!(
        out.stdout,
        "502 Bad Gateway: cannot connect to [fd7a::5]:81: host unreachable\n\n502"
    );

    let slow = start(
        HttpProxyConfig::default(),
        Arc::new(FailDialer(DialError::TimedOut)),
    )
    .await;
    let out = curl(slow.addr, &["-w", "\n%{http_code}", "http://peer.test/"]).await;
    assert_eq!(
        out.stdout,
        "504 Gateway Timeout: cannot connect to peer.test:80: connection timed out\n\n504"
    );
    let tunnel = curl(
        slow.addr,
        &["-p", "-w", "%{http_connect}", "http://peer.test/"],
    )
    .await;
    assert_eq!(tunnel.stdout, "504");

    // The connect timeout of the proxy itself, with a dialer that never answers.
    let config = HttpProxyConfig {
        connect_timeout: Duration::from_millis(200),
        ..HttpProxyConfig::default()
    };
    let hanging = start(config, Arc::new(PendingDialer)).await;
    let out = curl(
        hanging.addr,
        &["-o", "/dev/null", "-w", "%{http_code}", "http://peer.test/"],
    )
    .await;
    assert_eq!(out.stdout, "504");
}

// ---------------------------------------------------------------------------------------------
// Raw clients

/// Reads one response from `stream`: its head, and its body as it travels on the wire (chunked
/// bodies stay encoded; a body without length is read to the close).
async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> (String, Vec<u8>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "EOF inside a head: {head:?}"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    let no_body = head.starts_with("HTTP/1.1 1") || head.starts_with("HTTP/1.1 204");
    if no_body {
        return (head, body);
    }
    if lower.contains("transfer-encoding: chunked") {
        // Raw chunked bytes until the empty line after the last chunk.
        loop {
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                stream.read_exact(&mut byte).await.unwrap();
                line.push(byte[0]);
            }
            body.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line).to_string();
            let size =
                usize::from_str_radix(text.trim_end().split(';').next().unwrap(), 16).unwrap();
            if size == 0 {
                loop {
                    let mut trailer = Vec::new();
                    while !trailer.ends_with(b"\r\n") {
                        stream.read_exact(&mut byte).await.unwrap();
                        trailer.push(byte[0]);
                    }
                    body.extend_from_slice(&trailer);
                    if trailer == b"\r\n" {
                        return (head, body);
                    }
                }
            }
            let mut chunk = vec![0; size + 2];
            stream.read_exact(&mut chunk).await.unwrap();
            body.extend_from_slice(&chunk);
        }
    } else if let Some(pos) = lower.find("content-length: ") {
        let len: usize = lower[pos + 16..]
            .split("\r\n")
            .next()
            .unwrap()
            .parse()
            .unwrap();
        body.resize(len, 0);
        stream.read_exact(&mut body).await.unwrap();
    } else {
        stream.read_to_end(&mut body).await.unwrap();
    }
    (head, body)
}

/// Writes `bytes` to the proxy, half-closes if asked, and returns everything it answers until it
/// closes.
async fn raw_exchange(proxy: SocketAddr, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    if half_close {
        stream.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    match guard(stream.read_to_end(&mut answer)).await {
        Ok(_) => {}
        // The proxy may reset a flood it stopped reading; what it sent before still counts.
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
    }
    answer
}

#[tokio::test]
async fn chunked_response_is_forwarded_byte_for_byte_and_the_connection_kept() {
    let (origin, log) = origin(false).await;
    let proxy = start(HttpProxyConfig::default(), origin_dialer(origin)).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET http://origin.test/chunked HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = guard(read_response(&mut client)).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");
    assert!(
        !head.contains("Trailer:"),
        "Trailer is dropped as hop-by-hop: {head}"
    );
    assert!(!head.to_ascii_lowercase().contains("connection:"), "{head}");
    assert_eq!(body, chunked_wire_body());

    // Same connection, same upstream connection.
    client
        .write_all(b"GET http://origin.test/data2 HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = guard(read_response(&mut client)).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(!head.contains("Keep-Alive"), "{head}");
    assert_eq!(body, payload(300_000, 2));
    assert_eq!(log.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn close_delimited_response_ends_with_the_connection() {
    let (origin, _log) = origin(false).await;
    let proxy = start(HttpProxyConfig::default(), origin_dialer(origin)).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET http://origin.test/close HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = guard(read_response(&mut client)).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Connection: close\r\n"), "{head}");
    assert_eq!(body, payload(200_000, 4), "read to EOF");
}

#[tokio::test]
async fn forwarded_head_is_rewritten_and_pipelined_requests_answered_in_order() {
    let (origin, _log) = origin(false).await;
    let proxy = start(HttpProxyConfig::default(), origin_dialer(origin)).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    // Three requests in one write: rewrite check, a bodiless 204, a POST with a body.
    client
        .write_all(
            b"GET http://origin.test/headers?q=1 HTTP/1.1\r\nHost: other.example\r\n\
              Proxy-Authorization: Basic dTpw\r\nProxy-Connection: keep-alive\r\n\
              Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: 300\r\nTE: trailers\r\n\
              Upgrade: h2c\r\nX-End: 1\r\n\r\n\
              GET http://origin.test/nothing HTTP/1.1\r\n\r\n\
              POST http://origin.test/hash HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await
        .unwrap();
    let (head, body) = guard(read_response(&mut client)).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "GET /headers?q=1 HTTP/1.1\r\nHost: other.example\r\nX-End: 1\r\nVia: 1.1 tailnode\r\n"
    );
    let (head, body) = guard(read_response(&mut client)).await;
    assert!(head.starts_with("HTTP/1.1 204 No Content\r\n"), "{head}");
    assert!(body.is_empty());
    let (_, body) = guard(read_response(&mut client)).await;
    assert_eq!(body, sha256_hex(b"hello").as_bytes());
    // The Host added for a request without one.
    client
        .write_all(b"GET http://origin.test:8080/headers HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = guard(read_response(&mut client)).await;
    assert!(head.contains("Connection: close\r\n"), "{head}");
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "GET /headers HTTP/1.1\r\nHost: origin.test:8080\r\nVia: 1.1 tailnode\r\n"
    );
    let mut rest = Vec::new();
    guard(client.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty(), "closed after Connection: close");
}

#[tokio::test]
async fn kept_upstream_closed_by_the_origin_is_replaced() {
    let (origin, log) = origin(true).await;
    let proxy = start(HttpProxyConfig::default(), origin_dialer(origin)).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..3 {
        client
            .write_all(b"GET http://origin.test/data2 HTTP/1.1\r\nHost: origin.test\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = guard(read_response(&mut client)).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(body, payload(300_000, 2));
    }
    assert_eq!(log.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn upgrade_turns_the_connection_into_a_tunnel() {
    let (origin, _log) = origin(false).await;
    let proxy = start(HttpProxyConfig::default(), origin_dialer(origin)).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(
            b"GET http://origin.test/ws HTTP/1.1\r\nHost: origin.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly;",
        )
        .await
        .unwrap();
    let (head, _) = guard(read_response(&mut client)).await;
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    assert!(
        head.contains("Upgrade: echo\r\n") && head.contains("Connection: upgrade\r\n"),
        "{head}"
    );
    client.write_all(b"late").await.unwrap();
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    guard(client.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(rest, b"hello from upstream;early;late");
}

fn status_of(answer: &[u8]) -> &str {
    std::str::from_utf8(answer.get(..12).unwrap_or(answer)).unwrap_or("<binary>")
}

#[tokio::test]
async fn malformed_requests_get_their_status_and_a_close_while_a_good_client_keeps_working() {
    let (origin, _log) = origin(false).await;
    let proxy = start(HttpProxyConfig::default(), origin_dialer(origin)).await;
    let mut good = TcpStream::connect(proxy.addr).await.unwrap();
    good.write_all(b"GET http://origin.test/data2 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = guard(read_response(&mut good)).await;
    assert_eq!(body, payload(300_000, 2));

    let mut huge = b"GET http://origin.test/ HTTP/1.1\r\n".to_vec();
    while huge.len() < 70_000 {
        huge.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    huge.extend_from_slice(b"\r\n");
    let mut many = b"GET http://origin.test/ HTTP/1.1\r\n".to_vec();
    for i in 0..101 {
        many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("binary garbage", vec![0x16, 0x03, 0x01, 0x02, 0x00, 0xFF, 0x00], "HTTP/1.1 400"),
        ("socks greeting", vec![5, 1, 0], "HTTP/1.1 400"),
        ("head too large", huge, "HTTP/1.1 400"),
        ("too many headers", many, "HTTP/1.1 400"),
        ("bad request line", b"GET http://origin.test/\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        ("lowercase version", b"GET http://origin.test/ http/1.1\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        ("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), "HTTP/1.1 505"),
        ("connect without port", b"CONNECT origin.test HTTP/1.1\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        ("https absolute uri", b"GET https://origin.test/ HTTP/1.1\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        ("origin form", b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        ("ftp uri", b"GET ftp://origin.test/ HTTP/1.1\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        ("obs-fold", b"GET http://origin.test/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        ("space before colon", b"GET http://origin.test/ HTTP/1.1\r\nHost : x\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        ("two hosts", b"GET http://origin.test/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        ("te and cl", b"POST http://origin.test/hash HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        ("bad content-length", b"POST http://origin.test/hash HTTP/1.1\r\nContent-Length: 1x\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        ("gzip transfer coding", b"POST http://origin.test/hash HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(), "HTTP/1.1 501"),
        ("bad chunk", b"POST http://origin.test/hash HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(), "HTTP/1.1 400"),
    ];
    let mut clients = JoinSet::new();
    for (name, bytes, expected) in cases {
        let proxy = proxy.addr;
        clients.spawn(async move {
            let answer = raw_exchange(proxy, &bytes, false).await;
            assert_eq!(
                status_of(&answer),
                expected,
                "{name}: {:?}",
                String::from_utf8_lossy(&answer)
            );
            let text = String::from_utf8_lossy(&answer);
            assert!(text.contains("\r\nConnection: close\r\n"), "{name}: {text}");
            assert!(
                text.contains("\r\nContent-Type: text/plain"),
                "{name}: {text}"
            );
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    // The https answer tells the client what to do.
    let answer = raw_exchange(
        proxy.addr,
        b"GET https://origin.test/ HTTP/1.1\r\n\r\n",
        false,
    )
    .await;
    assert!(String::from_utf8_lossy(&answer).ends_with("CONNECT\n"));

    good.write_all(b"GET http://origin.test/data HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = guard(read_response(&mut good)).await;
    assert_eq!(body, payload(1 << 20, 1));
}

#[tokio::test]
async fn connect_tunnel_forwards_pipelined_bytes_and_half_close() {
    // Reads to EOF, answers the hash of what it read: it only answers if the half-close arrived.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hasher = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut data = Vec::new();
        stream.read_to_end(&mut data).await.unwrap();
        stream
            .write_all(sha256_hex(&data).as_bytes())
            .await
            .unwrap();
        stream.shutdown().await.unwrap();
    });
    let proxy = start(HttpProxyConfig::default(), Arc::new(LocalDialer::default())).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let data = payload(500_000, 5);
    let mut first = format!("CONNECT {hasher} HTTP/1.1\r\nHost: {hasher}\r\n\r\n").into_bytes();
    first.extend_from_slice(&data[..1000]);
    client.write_all(&first).await.unwrap();
    let mut established = vec![0; b"HTTP/1.1 200 Connection established\r\n\r\n".len()];
    guard(client.read_exact(&mut established)).await.unwrap();
    assert_eq!(established, b"HTTP/1.1 200 Connection established\r\n\r\n");
    client.write_all(&data[1000..]).await.unwrap();
    client.shutdown().await.unwrap();
    let mut answer = Vec::new();
    guard(client.read_to_end(&mut answer)).await.unwrap();
    assert_eq!(answer, sha256_hex(&data).as_bytes());
}

#[tokio::test]
async fn cancel_stops_accepting_ends_tunnels_and_serve_returns() {
    let (origin, _log) = origin(false).await;
    let proxy = start(HttpProxyConfig::default(), origin_dialer(origin)).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"CONNECT origin.test:80 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut established = vec![0; b"HTTP/1.1 200 Connection established\r\n\r\n".len()];
    guard(client.read_exact(&mut established)).await.unwrap();

    proxy.cancel.cancel();
    guard(proxy.task).await.unwrap().unwrap();
    let mut rest = Vec::new();
    match guard(client.read_to_end(&mut rest)).await {
        Ok(_) => assert!(rest.is_empty()),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
    }
    assert_eq!(
        TcpStream::connect(proxy.addr).await.unwrap_err().kind(),
        io::ErrorKind::ConnectionRefused
    );
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once() {
    let config = HttpProxyConfig {
        max_connections: 1,
        header_timeout: Duration::from_secs(600),
        ..HttpProxyConfig::default()
    };
    let proxy = start(config, Arc::new(LocalDialer::default())).await;
    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    first.write_all(b"GET http://").await.unwrap();
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    let mut answer = Vec::new();
    match guard(second.read_to_end(&mut answer)).await {
        Ok(_) => assert!(answer.is_empty()),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
    }
    // The first client is still served: its (malformed) request gets its answer.
    first.write_all(b"/ HTTP/1.1\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    guard(first.read_to_end(&mut answer)).await.unwrap();
    assert_eq!(status_of(&answer), "HTTP/1.1 400");
}

// ---------------------------------------------------------------------------------------------
// Deadlines, on paused time with in-memory streams: deterministic and instant.

/// Bounds a paused-time test in virtual time: a proxy that hangs fails the test at once instead of
/// parking it forever.
async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(1000), fut)
        .await
        .expect("hung (in virtual time)")
}

fn timeouts() -> HttpProxyConfig {
    HttpProxyConfig {
        header_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(30),
        response_timeout: Duration::from_secs(40),
        idle_timeout: Duration::from_secs(50),
        ..HttpProxyConfig::default()
    }
}

async fn read_all<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8(answer).unwrap()
}

#[tokio::test(start_paused = true)]
async fn silent_client_is_closed_at_the_head_deadline_without_an_answer() {
    let (mut client, server_side) = tokio::io::duplex(4096);
    let start = tokio::time::Instant::now();
    let outcome = bounded(serve_connection(server_side, &timeouts(), &PendingDialer)).await;
    assert!(matches!(outcome, Outcome::HeaderTimeout), "{outcome:?}");
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(read_all(&mut client).await, "");
}

#[tokio::test(start_paused = true)]
async fn slow_head_is_answered_408_at_the_deadline() {
    let (mut client, server_side) = tokio::io::duplex(4096);
    let trickle = tokio::spawn(async move {
        for byte in b"GET http://peer/ HTTP/1.1\r\nHost: peer\r\n\r\n" {
            if client.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        client
    });
    let start = tokio::time::Instant::now();
    let outcome = bounded(serve_connection(server_side, &timeouts(), &PendingDialer)).await;
    assert!(matches!(outcome, Outcome::HeaderTimeout), "{outcome:?}");
    // The head deadline, then 2 s of lingering for a client that keeps sending.
    assert_eq!(start.elapsed(), Duration::from_secs(5 + 2));
    let mut client = trickle.await.unwrap();
    assert!(
        read_all(&mut client)
            .await
            .starts_with("HTTP/1.1 408 Request Timeout\r\n")
    );
}

#[tokio::test(start_paused = true)]
async fn dial_exceeding_the_connect_timeout_is_answered_504() {
    let (mut client, server_side) = tokio::io::duplex(4096);
    client
        .write_all(b"GET http://slow.peer/ HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let start = tokio::time::Instant::now();
    let outcome = bounded(serve_connection(server_side, &timeouts(), &PendingDialer)).await;
    assert!(
        matches!(outcome, Outcome::Refused { status: 504 }),
        "{outcome:?}"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert_eq!(
        read_all(&mut client).await,
        "HTTP/1.1 504 Gateway Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: 74\r\nConnection: close\r\n\r\n\
         504 Gateway Timeout: cannot connect to slow.peer:80: connection timed out\n"
    );
}

#[tokio::test(start_paused = true)]
async fn silent_upstream_is_answered_504_after_the_response_timeout() {
    let (mut client, server_side) = tokio::io::duplex(1 << 16);
    let (upstream, mut origin) = tokio::io::duplex(1 << 16);
    let dialer = DuplexDialer(Mutex::new(vec![upstream]));
    // A 100 Continue does not count as the response.
    client
        .write_all(
            b"POST http://peer/ HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\nbody",
        )
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let config = timeouts();
    let serve = serve_connection(server_side, &config, &dialer);
    let drive = async {
        let mut received = vec![0; 1024];
        let mut n = 0;
        while !received[..n].ends_with(b"body") {
            n += origin.read(&mut received[n..]).await.unwrap();
        }
        origin
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
    };
    let start = tokio::time::Instant::now();
    let outcome = bounded(async {
        tokio::select! {
            outcome = serve => outcome,
            () = drive => unreachable!(),
        }
    })
    .await;
    assert!(
        matches!(outcome, Outcome::Refused { status: 504 }),
        "{outcome:?}"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(40));
    let answer = read_all(&mut client).await;
    assert!(
        answer.starts_with(
            "HTTP/1.1 100 Continue\r\nVia: 1.1 tailnode\r\n\r\nHTTP/1.1 504 Gateway Timeout\r\n"
        ),
        "{answer}"
    );
}

#[tokio::test(start_paused = true)]
async fn slow_response_body_is_not_cut_by_the_response_timeout() {
    let (mut client, server_side) = tokio::io::duplex(1 << 16);
    let (upstream, mut origin) = tokio::io::duplex(1 << 16);
    let dialer = DuplexDialer(Mutex::new(vec![upstream]));
    client
        .write_all(b"GET http://peer/ HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let config = timeouts();
    let serve = serve_connection(server_side, &config, &dialer);
    let drive = async {
        let mut request = [0u8; 256];
        let _ = origin.read(&mut request).await.unwrap();
        origin
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\na")
            .await
            .unwrap();
        // Well past the response timeout, but the head is in.
        tokio::time::sleep(Duration::from_secs(100)).await;
        origin.write_all(b"bc").await.unwrap();
        origin
    };
    let (outcome, _origin) = bounded(async { tokio::join!(serve, drive) }).await;
    assert!(
        matches!(outcome, Outcome::Finished { requests: 1 }),
        "{outcome:?}"
    );
    let answer = read_all(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nabc"), "{answer}");
}

#[tokio::test(start_paused = true)]
async fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let (mut client, server_side) = tokio::io::duplex(1 << 16);
    let (upstream, mut origin) = tokio::io::duplex(1 << 16);
    let dialer = DuplexDialer(Mutex::new(vec![upstream]));
    client
        .write_all(b"GET http://peer/ HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let config = timeouts();
    let serve = serve_connection(server_side, &config, &dialer);
    let drive = async {
        let mut request = [0u8; 256];
        let _ = origin.read(&mut request).await.unwrap();
        origin
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .unwrap();
        origin
    };
    let start = tokio::time::Instant::now();
    let (outcome, _origin) = bounded(async { tokio::join!(serve, drive) }).await;
    assert!(
        matches!(outcome, Outcome::Idle { requests: 1 }),
        "{outcome:?}"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(50));
    let answer = read_all(&mut client).await;
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
}

/// Reads a head (up to and including the empty line) byte by byte.
async fn read_head_text<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "EOF inside a head"
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test(start_paused = true)]
async fn bodiless_request_is_retried_once_when_a_kept_upstream_closes_silently() {
    let (client, server_side) = tokio::io::duplex(1 << 16);
    let (first, mut origin1) = tokio::io::duplex(1 << 16);
    let (second, mut origin2) = tokio::io::duplex(1 << 16);
    let dialer = DuplexDialer(Mutex::new(vec![second, first]));
    let config = timeouts();
    let serve = serve_connection(server_side, &config, &dialer);
    let drive = async move {
        let mut client = client;
        client
            .write_all(b"GET http://peer/a HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert!(
            read_head_text(&mut origin1)
                .await
                .starts_with("GET /a HTTP/1.1\r\n")
        );
        origin1
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
            .await
            .unwrap();
        assert_eq!(read_response(&mut client).await.1, b"a");
        client
            .write_all(b"GET http://peer/b HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        // The kept connection takes the request, then closes without a byte: the keep-alive race.
        assert!(
            read_head_text(&mut origin1)
                .await
                .starts_with("GET /b HTTP/1.1\r\n")
        );
        drop(origin1);
        assert!(
            read_head_text(&mut origin2)
                .await
                .starts_with("GET /b HTTP/1.1\r\n")
        );
        origin2
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
            .await
            .unwrap();
        let (head, body) = read_response(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(body, b"b");
        client.shutdown().await.unwrap();
        origin2
    };
    let (outcome, _origin2) = bounded(async { tokio::join!(serve, drive) }).await;
    assert!(
        matches!(outcome, Outcome::ClientClosed { requests: 2 }),
        "{outcome:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn kept_upstream_failing_a_request_with_a_body_is_a_502_not_a_retry() {
    let (client, server_side) = tokio::io::duplex(1 << 16);
    let (first, mut origin1) = tokio::io::duplex(1 << 16);
    let (second, _origin2) = tokio::io::duplex(1 << 16);
    let dialer = DuplexDialer(Mutex::new(vec![second, first]));
    let config = timeouts();
    let serve = serve_connection(server_side, &config, &dialer);
    let drive = async move {
        let mut client = client;
        client
            .write_all(b"GET http://peer/a HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        read_head_text(&mut origin1).await;
        origin1
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        read_response(&mut client).await;
        client
            .write_all(b"POST http://peer/b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
            .await
            .unwrap();
        read_head_text(&mut origin1).await;
        drop(origin1);
        read_all(&mut client).await
    };
    let (outcome, answer) = bounded(async { tokio::join!(serve, drive) }).await;
    assert!(
        matches!(outcome, Outcome::Refused { status: 502 }),
        "{outcome:?}"
    );
    assert!(
        answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
        "{answer}"
    );
    assert_eq!(dialer.0.lock().unwrap().len(), 1, "no second dial");
}

#[tokio::test(start_paused = true)]
async fn early_answer_to_an_unfinished_upload_announces_and_does_the_close() {
    let (client, server_side) = tokio::io::duplex(1 << 16);
    let (upstream, mut origin) = tokio::io::duplex(1 << 16);
    let dialer = DuplexDialer(Mutex::new(vec![upstream]));
    let config = timeouts();
    let serve = serve_connection(server_side, &config, &dialer);
    let drive = async move {
        let mut client = client;
        let mut request =
            b"POST http://peer/up HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n".to_vec();
        request.extend_from_slice(&payload(1000, 6));
        client.write_all(&request).await.unwrap();
        read_head_text(&mut origin).await;
        // Refused without reading the body, and (wrongly, but legally) without a close.
        origin
            .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")
            .await
            .unwrap();
        let (head, body) = read_response(&mut client).await;
        assert!(
            head.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
        assert_eq!(body, b"big!");
        assert_eq!(
            read_all(&mut client).await,
            "",
            "then the connection closes"
        );
        origin
    };
    let (outcome, _origin) = bounded(async { tokio::join!(serve, drive) }).await;
    assert!(
        matches!(outcome, Outcome::Finished { requests: 1 }),
        "{outcome:?}"
    );
}
