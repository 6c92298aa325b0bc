//! The one accept loop every listener of the node runs: SOCKS5, HTTP proxy, TCP forwards,
//! exposed ports, the local API and the metrics endpoint.
//!
//! Accept errors (e.g. out of file descriptors) are logged once per episode and retried after a
//! pause that doubles up to [`MAX_ACCEPT_BACKOFF`]: only cancellation ends the loop. Clients
//! over the connection limit are closed at once, with one warning per episode. Each client runs
//! in its own tracked task on a child token; on cancellation the listener is closed first and
//! the client tasks (cancelled with it) are awaited.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::node::ConnectionCounters;

/// The first pause after an accept error.
const FIRST_ACCEPT_BACKOFF: Duration = Duration::from_millis(20);
/// The longest pause between accept attempts while they keep failing.
pub(crate) const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Something that accepts connections: a host TCP or unix listener, or a tailnet listener.
pub(crate) trait Listener: Send {
    /// An accepted connection.
    type Stream: Send + 'static;
    /// Who connected, for log lines.
    type Peer: fmt::Debug + Send + 'static;

    /// Waits for the next connection.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, Self::Peer)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    type Peer = std::net::SocketAddr;

    async fn accept(&mut self) -> io::Result<(Self::Stream, Self::Peer)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        // Relayed writes are application writes already; do not delay them further.
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%peer, %error, "set_nodelay failed");
        }
        Ok((stream, peer))
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    type Peer = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> io::Result<(Self::Stream, Self::Peer)> {
        tokio::net::UnixListener::accept(self).await
    }
}

impl Listener for tailnode_netstack::TcpListener {
    type Stream = tailnode_netstack::TcpStream;
    type Peer = std::net::SocketAddr;

    async fn accept(&mut self) -> io::Result<(Self::Stream, Self::Peer)> {
        tailnode_netstack::TcpListener::accept(self).await
    }
}

/// What the loop needs to know of the server it runs for.
pub(crate) struct AcceptLimits<'a> {
    /// The server's name in log lines ("SOCKS5", "HTTP proxy", "forward 127.0.0.1:80").
    pub kind: &'a str,
    /// Clients served at once; further clients are closed on accept.
    pub max_connections: usize,
    /// Counts open and total connections for the metrics, when set.
    pub connections: Option<&'a Arc<ConnectionCounters>>,
}

/// Accepts clients on `listener` until `cancel` fires and runs `serve(stream, client, token)`
/// for each in its own task; returns when every client task has ended.
pub(crate) async fn accept_clients<L, F, Fut>(
    mut listener: L,
    cancel: &CancellationToken,
    limits: AcceptLimits<'_>,
    mut serve: F,
) where
    L: Listener,
    F: FnMut(L::Stream, L::Peer, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let kind = limits.kind;
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let tracker = TaskTracker::new();
    let mut at_limit = false;
    let mut backoff: Option<Duration> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, client) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                let pause = match backoff {
                    None => {
                        warn!(%error, "{kind}: accept failed; retrying until it works again");
                        FIRST_ACCEPT_BACKOFF
                    }
                    Some(pause) => {
                        debug!(%error, "{kind}: accept failed again");
                        (pause * 2).min(MAX_ACCEPT_BACKOFF)
                    }
                };
                backoff = Some(pause);
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(pause) => continue,
                }
            }
        };
        if backoff.take().is_some() {
            info!("{kind}: accepting again");
        }
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            if !at_limit {
                warn!(
                    max = limits.max_connections,
                    "{kind}: connection limit reached; closing new clients until some finish"
                );
                at_limit = true;
            }
            debug!(?client, "{kind}: client over the connection limit: closed");
            drop(stream);
            continue;
        };
        at_limit = false;
        let open = limits.connections.map(ConnectionCounters::open);
        let client_task = serve(stream, client, cancel.child_token());
        tracker.spawn(async move {
            client_task.await;
            drop(permit);
            drop(open);
        });
    }
    drop(listener);
    tracker.close();
    debug!(
        active = tracker.len(),
        "{kind}: closed; draining connections"
    );
    tracker.wait().await;
    debug!("{kind}: stopped");
}

/// Sends a final reply and closes gracefully: FIN, then reads and discards what the client still
/// sends (at most `max_discard` bytes, for at most `linger`) so that unread input does not turn
/// the close into a reset that could destroy the reply before the client reads it.
pub(crate) async fn close_with_reply<S>(
    client: &mut S,
    reply: &[u8],
    linger: Duration,
    max_discard: usize,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let close = async {
        client.write_all(reply).await?;
        client.flush().await?;
        client.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut discarded = 0;
        while discarded < max_discard {
            match client.read(&mut sink).await? {
                0 => break,
                n => discarded += n,
            }
        }
        io::Result::Ok(())
    };
    // Errors and timeouts here only mean the client is gone or slow; we close either way.
    let _ = tokio::time::timeout(linger, close).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A listener that replays scripted results, then waits forever.
    struct Scripted(VecDeque<io::Result<u32>>);

    impl Listener for Scripted {
        type Stream = u32;
        type Peer = u32;

        async fn accept(&mut self) -> io::Result<(u32, u32)> {
            match self.0.pop_front() {
                Some(result) => result.map(|n| (n, n)),
                None => std::future::pending().await,
            }
        }
    }

    fn emfile() -> io::Result<u32> {
        Err(io::Error::other("too many open files"))
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_accepting_after_errors_and_drains_on_cancel() {
        let mut script: VecDeque<_> = (0..50).map(|_| emfile()).collect();
        script.extend([Ok(1), emfile(), Ok(2), Ok(3)]);
        let served = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let limits = AcceptLimits {
            kind: "test",
            max_connections: 10,
            connections: None,
        };
        let run = {
            let (served, finished, cancel) = (served.clone(), finished.clone(), cancel.clone());
            tokio::spawn(async move {
                accept_clients(Scripted(script), &cancel, limits, |_, _, token| {
                    served.fetch_add(1, Ordering::SeqCst);
                    let finished = finished.clone();
                    async move {
                        // A client that runs until the loop is cancelled, then takes a moment.
                        token.cancelled().await;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        finished.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .await;
            })
        };
        // 51 errors back off for at most ~50 s of paused time in total.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(
            served.load(Ordering::SeqCst),
            3,
            "every good accept is served"
        );
        assert!(!run.is_finished(), "errors never end the loop");
        cancel.cancel();
        run.await.unwrap();
        assert_eq!(
            finished.load(Ordering::SeqCst),
            3,
            "the loop returns only after its clients finished"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closes_clients_over_the_limit() {
        let script: VecDeque<_> = (0..5).map(Ok).collect();
        let served = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let limits = AcceptLimits {
            kind: "test",
            max_connections: 2,
            connections: None,
        };
        let run = {
            let (served, cancel) = (served.clone(), cancel.clone());
            tokio::spawn(async move {
                accept_clients(Scripted(script), &cancel, limits, |_, _, token| {
                    served.fetch_add(1, Ordering::SeqCst);
                    async move { token.cancelled().await }
                })
                .await;
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(served.load(Ordering::SeqCst), 2);
        cancel.cancel();
        run.await.unwrap();
    }
}
