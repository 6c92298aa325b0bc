//! Controllable middle boxes: a UDP relay (between WireGuard peers) and a TCP
//! proxy (in front of the coordinator), each switchable between passing
//! traffic, blackholing it (accept and swallow everything) and, for TCP,
//! resetting connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// What a middle box does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Forward everything.
    Pass = 0,
    /// Accept and swallow everything, answer nothing.
    Blackhole = 1,
    /// (TCP) reset every connection, new and existing.
    Reset = 2,
}

impl Mode {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Mode::Blackhole,
            2 => Mode::Reset,
            _ => Mode::Pass,
        }
    }
}

/// A UDP relay: datagrams to `addr()` go to the target from a per-client
/// upstream socket; replies come back from `addr()`. Like a NAT, so both
/// WireGuard peers see the relay as the other's endpoint.
pub struct UdpRelay {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    forwarded: Arc<AtomicU64>,
    recorded: Arc<Mutex<Vec<Vec<u8>>>>,
    task: JoinHandle<()>,
}

const MAX_RECORDED: usize = 4096;

impl UdpRelay {
    /// Starts a relay on 127.0.0.1 towards `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listen = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind relay"));
        let addr = listen.local_addr().expect("relay addr");
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let forwarded = Arc::new(AtomicU64::new(0));
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let (mode, forwarded, recorded) = (mode.clone(), forwarded.clone(), recorded.clone());
            tokio::spawn(async move {
                let mut upstreams: HashMap<SocketAddr, (Arc<UdpSocket>, JoinHandle<()>)> =
                    HashMap::new();
                let mut buf = vec![0u8; 65_536];
                loop {
                    let Ok((n, client)) = listen.recv_from(&mut buf).await else {
                        continue;
                    };
                    if Mode::from_u8(mode.load(Ordering::Relaxed)) != Mode::Pass {
                        continue;
                    }
                    {
                        let mut rec = recorded.lock().expect("lock");
                        if rec.len() < MAX_RECORDED {
                            rec.push(buf[..n].to_vec());
                        }
                    }
                    let up = match upstreams.get(&client) {
                        Some((s, _)) => s.clone(),
                        None => {
                            let s = Arc::new(
                                UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream"),
                            );
                            s.connect(target).await.expect("connect upstream");
                            let back = {
                                let (s, listen, mode, forwarded) =
                                    (s.clone(), listen.clone(), mode.clone(), forwarded.clone());
                                tokio::spawn(async move {
                                    let mut buf = vec![0u8; 65_536];
                                    loop {
                                        let Ok(n) = s.recv(&mut buf).await else {
                                            continue;
                                        };
                                        if Mode::from_u8(mode.load(Ordering::Relaxed)) == Mode::Pass
                                        {
                                            let _ = listen.send_to(&buf[..n], client).await;
                                            forwarded.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                })
                            };
                            upstreams.insert(client, (s.clone(), back));
                            s
                        }
                    };
                    let _ = up.send(&buf[..n]).await;
                    forwarded.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Self {
            addr,
            mode,
            forwarded,
            recorded,
            task,
        }
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Relaxed);
    }

    /// Datagrams forwarded so far (both directions).
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Copies of (up to 4096) datagrams that went client → target.
    pub fn recorded(&self) -> Vec<Vec<u8>> {
        self.recorded.lock().expect("lock").clone()
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy on 127.0.0.1 in front of `target`.
pub struct TcpProxy {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    generation: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        Self::start_on(listener, target)
    }

    /// Starts on an existing listener (to reuse a known port).
    pub fn start_on(listener: TcpListener, target: SocketAddr) -> Self {
        let addr = listener.local_addr().expect("proxy addr");
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let generation = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let task = {
            let (mode, generation, accepted) = (mode.clone(), generation.clone(), accepted.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let (mode, generation) = (mode.clone(), generation.clone());
                    tokio::spawn(serve_proxied(client, target, mode, generation));
                }
            })
        };
        Self {
            addr,
            mode,
            generation,
            accepted,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far (each one is a dial attempt by a client).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Switches mode; existing connections follow (a blackhole swallows their
    /// traffic from now on, a reset kills them).
    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_proxied(
    client: TcpStream,
    target: SocketAddr,
    mode: Arc<AtomicU8>,
    generation: Arc<AtomicU64>,
) {
    match Mode::from_u8(mode.load(Ordering::Relaxed)) {
        Mode::Reset => {
            let _ = client.set_zero_linger();
            return;
        }
        Mode::Blackhole => {
            swallow(client, &mode).await;
            return;
        }
        Mode::Pass => {}
    }
    let Ok(upstream) = TcpStream::connect(target).await else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let start_gen = generation.load(Ordering::Relaxed);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = tokio::spawn(pump(cr, uw, mode.clone(), generation.clone(), start_gen));
    let down = tokio::spawn(pump(ur, cw, mode.clone(), generation.clone(), start_gen));
    let (up_abort, down_abort) = (up.abort_handle(), down.abort_handle());
    // Watch for a switch to Reset while both directions run: dropping the
    // halves with SO_LINGER 0 is not possible after into_split, so abort the
    // pumps; the OS closes both sockets.
    let watcher = async {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if generation.load(Ordering::Relaxed) != start_gen
                && Mode::from_u8(mode.load(Ordering::Relaxed)) == Mode::Reset
            {
                return;
            }
        }
    };
    tokio::select! {
        _ = async { let _ = up.await; let _ = down.await; } => {}
        () = watcher => {
            up_abort.abort();
            down_abort.abort();
        }
    }
}

/// Copies `from` to `to` in small steps, re-checking the mode so that a
/// switch affects connections already open: a blackhole swallows, a reset ends.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
    generation: Arc<AtomicU64>,
    start_gen: u64,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                // A blackhole swallows the close too: the other side must
                // find out by itself (pings, timeouts), as behind a dead link.
                if generation.load(Ordering::Relaxed) != start_gen
                    && Mode::from_u8(mode.load(Ordering::Relaxed)) == Mode::Blackhole
                {
                    std::future::pending::<()>().await;
                }
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if generation.load(Ordering::Relaxed) != start_gen {
            match Mode::from_u8(mode.load(Ordering::Relaxed)) {
                Mode::Pass => {}
                Mode::Blackhole => continue,
                Mode::Reset => return,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn swallow(mut client: TcpStream, mode: &AtomicU8) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(600), client.read(&mut buf)).await
        {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
        if Mode::from_u8(mode.load(Ordering::Relaxed)) == Mode::Reset {
            let _ = client.set_zero_linger();
            return;
        }
    }
}
