//! The accept loop the local proxies share (SOCKS5, HTTP).
//!
//! Accept errors (e.g. out of file descriptors) are logged and retried after a short pause: only
//! cancellation ends the loop. Clients over the connection limit are closed at once, with one
//! warning per episode. Each client runs in its own task on a child token; on cancellation the
//! listener is closed first and the client tasks (cancelled with it) are awaited.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::node::ConnectionCounters;

/// How long to wait before accepting again after an accept error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What the loop needs to know of the server it runs for.
pub(crate) struct AcceptLimits<'a> {
    /// The server's name in log lines ("SOCKS5", "HTTP proxy").
    pub kind: &'static str,
    /// Clients served at once; further clients are closed on accept.
    pub max_connections: usize,
    /// Counts open and total connections for the metrics, when set.
    pub connections: Option<&'a Arc<ConnectionCounters>>,
}

/// Accepts clients on `listener` until `cancel` fires and runs `serve(stream, client, token)`
/// for each in its own task; returns when every client task has ended.
pub(crate) async fn accept_clients<F, Fut>(
    listener: TcpListener,
    local: SocketAddr,
    cancel: &CancellationToken,
    limits: AcceptLimits<'_>,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let kind = limits.kind;
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let tracker = TaskTracker::new();
    let mut at_limit = false;
    loop {
        let accepted = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, client) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%local, %error, "{kind} accept failed; retrying");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            if !at_limit {
                warn!(
                    max = limits.max_connections,
                    "{kind} connection limit reached; closing new clients until some finish"
                );
                at_limit = true;
            }
            debug!(%client, "{kind} client over the connection limit: closed");
            drop(stream);
            continue;
        };
        at_limit = false;
        // Relayed writes are application writes already; do not delay them further.
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%client, %error, "set_nodelay failed");
        }
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
    info!(%local, active = tracker.len(), "{kind} proxy closed; draining connections");
    tracker.wait().await;
    info!(%local, "{kind} proxy stopped");
}
