//! The tokio driver: accept loop, per-connection task, dial, relay.
//!
//! One task per client. Each task owns its socket, a bounded handshake buffer and a
//! [`Handshake`]; it enforces the handshake deadline, dials through the [`Dialer`] with a connect
//! timeout, answers, and relays with [`copy_bidirectional_with_sizes`]. A UDP ASSOCIATE request
//! turns the task into the driver of that association (see [`super::udp`]). Whatever a client
//! does, it only ever ends its own task.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, copy_bidirectional_with_sizes,
};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::association::{Association, AssociationCounts};
use super::config::Socks5Config;
use super::handshake::{Credentials, Handshake, HandshakeError, Step};
use super::proto::{Command, Reply, ReplyCode, Request, TargetAddr};
use super::udp::{Socks5Counters, UdpEnd, log_end, run_association};
use crate::accept::{AcceptLimits, accept_clients, close_with_reply};
use crate::dial::{DialError, Dialer, NoUdp, UdpDialer};

/// A SOCKS5 proxy server (RFC 1928 CONNECT and, with a [`UdpDialer`], UDP ASSOCIATE; RFC 1929
/// authentication) dialing through `D`.
#[derive(Debug)]
pub struct Socks5Server<D: Dialer, U: UdpDialer = NoUdp> {
    config: Arc<Socks5Config>,
    dialer: Arc<D>,
    udp: Option<Arc<U>>,
    counters: Arc<Socks5Counters>,
}

/// What every connection task of a server shares.
pub(crate) struct Shared<D, U> {
    pub(crate) config: Arc<Socks5Config>,
    pub(crate) dialer: Arc<D>,
    pub(crate) udp: Option<Arc<U>>,
    /// One permit per UDP association.
    pub(crate) udp_slots: Arc<Semaphore>,
    pub(crate) counters: Arc<Socks5Counters>,
}

/// The two ends of a client's TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnAddrs {
    /// Our end: the address the client reached the proxy on.
    pub(crate) local: SocketAddr,
    /// The client's end.
    pub(crate) peer: SocketAddr,
}

/// Handshake input buffer. The longest handshake message is an RFC 1929 request (513 bytes), so a
/// valid client never fills it; bytes pipelined after the request are forwarded to the target.
const HANDSHAKE_BUF: usize = 1024;
/// Longest time spent, after sending a final error reply, reading and discarding what the client
/// still sends, so that closing does not reset the connection before the client reads the reply.
const MAX_LINGER: Duration = Duration::from_secs(2);
/// Most bytes discarded while lingering.
const MAX_LINGER_BYTES: usize = 64 * 1024;

impl<D: Dialer> Socks5Server<D> {
    /// A server with `config` that opens connections through `dialer` and answers UDP ASSOCIATE
    /// with 0x07 (command not supported) until [`with_udp`](Self::with_udp) is called.
    pub fn new(config: Socks5Config, dialer: Arc<D>) -> Self {
        Self {
            config: Arc::new(config),
            dialer,
            udp: None,
            counters: Arc::new(Socks5Counters::default()),
        }
    }
}

impl<D: Dialer, U: UdpDialer> Socks5Server<D, U> {
    /// The same server, serving UDP ASSOCIATE through `udp`.
    pub fn with_udp<V: UdpDialer>(self, udp: Arc<V>) -> Socks5Server<D, V> {
        Socks5Server {
            config: self.config,
            dialer: self.dialer,
            udp: Some(udp),
            counters: self.counters,
        }
    }

    /// The server's live counters (they outlive [`serve`](Self::serve)).
    pub fn counters(&self) -> Arc<Socks5Counters> {
        Arc::clone(&self.counters)
    }

    /// Accepts and serves clients until `cancel` fires.
    ///
    /// Each client runs in its own task on a child token of `cancel`. On cancellation the listener
    /// is closed first, then the connection tasks (cancelled with it) are awaited, so when this
    /// returns no task of this server is left. Accept errors are logged and retried after a short
    /// pause: only cancellation ends the loop.
    ///
    /// # Errors
    ///
    /// Only if the listener's local address cannot be read at startup.
    pub async fn serve(self, listener: TcpListener, cancel: CancellationToken) -> io::Result<()> {
        let local = listener.local_addr()?;
        info!(
            %local,
            auth = self.config.auth.is_some(),
            udp = self.udp.is_some(),
            "SOCKS5 proxy listening"
        );
        let shared = Arc::new(Shared {
            config: Arc::clone(&self.config),
            dialer: Arc::clone(&self.dialer),
            udp: self.udp.clone(),
            udp_slots: Arc::new(Semaphore::new(
                self.config.max_udp_associations.min(Semaphore::MAX_PERMITS),
            )),
            counters: Arc::clone(&self.counters),
        });
        let kind = format!("SOCKS5 proxy on {local}");
        let limits = AcceptLimits {
            kind: &kind,
            max_connections: self.config.max_connections,
            connections: self.config.connections.as_ref(),
        };
        accept_clients(listener, &cancel, limits, |stream, client, token| {
            let addrs = ConnAddrs {
                local: stream.local_addr().unwrap_or(local),
                peer: client,
            };
            let shared = Arc::clone(&shared);
            async move {
                let outcome = tokio::select! {
                    biased;
                    () = token.cancelled() => Outcome::Cancelled,
                    outcome = serve_connection(stream, addrs, &shared) => outcome,
                };
                outcome.log();
            }
            .instrument(info_span!("socks5", %client))
        })
        .await;
        Ok(())
    }
}

/// How a connection ended; logged once per connection.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The relay ran until both directions were shut down.
    Relayed {
        /// Where the client went.
        target: TargetAddr,
        /// Bytes from the client to the target (including bytes pipelined with the request).
        up: u64,
        /// Bytes from the target to the client.
        down: u64,
    },
    /// The relay ended with an I/O error on either side.
    RelayFailed {
        /// Where the client went.
        target: TargetAddr,
        /// The error.
        error: io::Error,
    },
    /// The dial failed (or timed out) and the client got the matching reply.
    DialFailed {
        /// Where the client wanted to go.
        target: TargetAddr,
        /// Why.
        error: DialError,
    },
    /// A UDP association ran and ended.
    UdpClosed {
        /// The relay address the client was given.
        relay: SocketAddr,
        /// Why it ended.
        end: UdpEnd,
        /// Its datagram counts.
        counts: AssociationCounts,
    },
    /// A UDP ASSOCIATE request was refused (limit, relay socket, egress) with a failure reply.
    UdpRefused {
        /// Why.
        reason: String,
    },
    /// A valid but unsupported command (BIND, and UDP ASSOCIATE without a [`UdpDialer`]);
    /// answered 0x07.
    Unsupported {
        /// The command.
        command: Command,
        /// Its address.
        target: TargetAddr,
    },
    /// The handshake failed; the client got the error reply.
    Rejected(HandshakeError),
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// The client closed the connection during the handshake.
    ClientClosed,
    /// Reading from or writing to the client failed before the relay.
    ClientError(io::Error),
    /// The server is shutting down.
    Cancelled,
}

impl Outcome {
    fn log(&self) {
        match self {
            Self::Relayed { target, up, down } => {
                info!(%target, up, down, "SOCKS5 connection closed");
            }
            Self::RelayFailed { target, error } => {
                info!(%target, %error, "SOCKS5 relay failed");
            }
            Self::DialFailed { target, error } => {
                info!(%target, %error, "SOCKS5 connect failed");
            }
            Self::UdpClosed { relay, end, counts } => log_end(*relay, end, counts),
            Self::UdpRefused { reason } => info!(%reason, "SOCKS5 UDP ASSOCIATE refused"),
            Self::Unsupported { command, target } => {
                info!(%target, ?command, "SOCKS5 command not supported");
            }
            Self::Rejected(error) => info!(%error, "SOCKS5 handshake rejected"),
            Self::HandshakeTimeout => info!("SOCKS5 handshake timed out"),
            Self::ClientClosed => info!("SOCKS5 client closed during handshake"),
            Self::ClientError(error) => info!(%error, "SOCKS5 client I/O error"),
            Self::Cancelled => info!("SOCKS5 connection cancelled by shutdown"),
        }
    }
}

/// Serves one client until its relay ends or it is turned away. Cancellation is the caller's
/// (drop the future).
pub(crate) async fn serve_connection<S, D, U>(
    mut client: S,
    addrs: ConnAddrs,
    shared: &Shared<D, U>,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: Dialer,
    U: UdpDialer,
{
    let config = &*shared.config;
    let dialer = &*shared.dialer;
    let linger = config.handshake_timeout.min(MAX_LINGER);
    let deadline = Instant::now() + config.handshake_timeout;
    let mut input = InputBuf::new();
    let handshake = run_handshake(&mut client, &mut input, config.auth.as_ref());
    let request = match timeout_at(deadline, handshake).await {
        Err(_elapsed) => return Outcome::HandshakeTimeout,
        Ok(Ok(request)) => request,
        Ok(Err(HandshakeEnd::Rejected { reply, error })) => {
            close_with_reply(&mut client, &reply, linger, MAX_LINGER_BYTES).await;
            return Outcome::Rejected(error);
        }
        Ok(Err(HandshakeEnd::ClientClosed)) => return Outcome::ClientClosed,
        Ok(Err(HandshakeEnd::Io(error))) => return Outcome::ClientError(error),
    };
    let Request { command, target } = request;
    match command {
        Command::Connect => {
            let early = input.filled();
            connect(client, early, target, config, dialer, linger).await
        }
        Command::UdpAssociate if let Some(udp) = shared.udp.as_deref() => {
            udp_associate(client, addrs, target, udp, shared, linger).await
        }
        Command::Bind | Command::UdpAssociate => {
            let mut reply = Vec::with_capacity(10);
            Reply::failure(ReplyCode::CommandNotSupported).encode(&mut reply);
            close_with_reply(&mut client, &reply, linger, MAX_LINGER_BYTES).await;
            Outcome::Unsupported { command, target }
        }
    }
}

/// CONNECT: dial, answer, relay.
async fn connect<S, D>(
    mut client: S,
    early: &[u8],
    target: TargetAddr,
    config: &Socks5Config,
    dialer: &D,
    linger: Duration,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: Dialer,
{
    let dialed = match timeout(config.connect_timeout, dialer.connect(&target)).await {
        Ok(dialed) => dialed,
        Err(_elapsed) => Err(DialError::TimedOut),
    };
    let (mut upstream, bound) = match dialed {
        Ok(dialed) => dialed,
        Err(error) => {
            let mut reply = Vec::with_capacity(10);
            Reply::failure(error.reply_code()).encode(&mut reply);
            close_with_reply(&mut client, &reply, linger, MAX_LINGER_BYTES).await;
            return Outcome::DialFailed { target, error };
        }
    };
    let mut reply = Vec::with_capacity(22);
    Reply {
        code: ReplyCode::Succeeded,
        bound,
    }
    .encode(&mut reply);
    if let Err(error) = write_flush(&mut client, &reply).await {
        return Outcome::ClientError(error);
    }
    info!(%target, %bound, "SOCKS5 connected");
    if !early.is_empty()
        && let Err(error) = write_flush(&mut upstream, early).await
    {
        return Outcome::RelayFailed { target, error };
    }
    let size = config.relay_buffer_size.max(1);
    match copy_bidirectional_with_sizes(&mut client, &mut upstream, size, size).await {
        Ok((up, down)) => Outcome::Relayed {
            target,
            up: up + early.len() as u64,
            down,
        },
        Err(error) => Outcome::RelayFailed { target, error },
    }
}

/// UDP ASSOCIATE: take an association slot, bind the relay socket on the address the client
/// reached us on, open the egress, answer with the relay's address, relay until the end.
async fn udp_associate<S, D, U>(
    mut client: S,
    addrs: ConnAddrs,
    requested: TargetAddr,
    udp: &U,
    shared: &Shared<D, U>,
    linger: Duration,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
    U: UdpDialer,
{
    let config = &*shared.config;
    let refuse = |code: ReplyCode| {
        let mut reply = Vec::with_capacity(10);
        Reply::failure(code).encode(&mut reply);
        shared.counters.refused();
        reply
    };
    let Ok(_slot) = Arc::clone(&shared.udp_slots).try_acquire_owned() else {
        warn!(
            max = config.max_udp_associations,
            "SOCKS5 UDP association limit reached"
        );
        let reply = refuse(ReplyCode::GeneralFailure);
        close_with_reply(&mut client, &reply, linger, MAX_LINGER_BYTES).await;
        return Outcome::UdpRefused {
            reason: "association limit reached".into(),
        };
    };
    let relay_ip = addrs.local.ip().to_canonical();
    let relay = match UdpSocket::bind(SocketAddr::new(relay_ip, 0)).await {
        Ok(relay) => relay,
        Err(error) => {
            let reply = refuse(ReplyCode::GeneralFailure);
            close_with_reply(&mut client, &reply, linger, MAX_LINGER_BYTES).await;
            return Outcome::UdpRefused {
                reason: format!("cannot bind a relay socket on {relay_ip}: {error}"),
            };
        }
    };
    let bound = match relay.local_addr() {
        Ok(bound) => bound,
        Err(error) => return Outcome::ClientError(error),
    };
    let egress = match udp.open_udp().await {
        Ok(egress) => egress,
        Err(error) => {
            let reply = refuse(error.reply_code());
            close_with_reply(&mut client, &reply, linger, MAX_LINGER_BYTES).await;
            return Outcome::UdpRefused {
                reason: format!("cannot open the egress: {error}"),
            };
        }
    };
    let association = Association::new(
        addrs.peer,
        &requested,
        config.udp_idle_timeout,
        Instant::now().into_std(),
    );
    let mut reply = Vec::with_capacity(22);
    Reply {
        code: ReplyCode::Succeeded,
        bound,
    }
    .encode(&mut reply);
    if let Err(error) = write_flush(&mut client, &reply).await {
        return Outcome::ClientError(error);
    }
    info!(relay = %bound, %requested, "SOCKS5 UDP association open");
    let (end, counts) = run_association(
        &mut client,
        relay,
        egress,
        association,
        config,
        &shared.counters,
    )
    .await;
    // Closing the control connection tells the client the association is gone (idle timeout).
    let _ = timeout(linger, client.shutdown()).await;
    Outcome::UdpClosed {
        relay: bound,
        end,
        counts,
    }
}

/// How a handshake ended without a request.
enum HandshakeEnd {
    /// Send `reply`, then close.
    Rejected {
        reply: Vec<u8>,
        error: HandshakeError,
    },
    /// EOF before the request was complete.
    ClientClosed,
    /// Reading or writing failed.
    Io(io::Error),
}

/// Feeds the client's bytes to a [`Handshake`] until it yields a request. Bytes after the request
/// are left in `input`.
async fn run_handshake<S>(
    client: &mut S,
    input: &mut InputBuf,
    credentials: Option<&Credentials>,
) -> Result<Request, HandshakeEnd>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut handshake = Handshake::new(credentials);
    loop {
        match handshake.handle_input(input.filled()) {
            Step::NeedMore => match input.fill_from(client).await {
                Ok(0) => return Err(HandshakeEnd::ClientClosed),
                Ok(_) => {}
                Err(error) => return Err(HandshakeEnd::Io(error)),
            },
            Step::Send { consumed, reply } => {
                input.consume(consumed);
                write_flush(client, &reply)
                    .await
                    .map_err(HandshakeEnd::Io)?;
            }
            Step::Request { consumed, request } => {
                input.consume(consumed);
                return Ok(request);
            }
            Step::Close { reply, error } => return Err(HandshakeEnd::Rejected { reply, error }),
        }
    }
}

async fn write_flush<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// The bounded buffer of bytes received during the handshake.
struct InputBuf {
    bytes: [u8; HANDSHAKE_BUF],
    len: usize,
}

impl InputBuf {
    fn new() -> Self {
        Self {
            bytes: [0; HANDSHAKE_BUF],
            len: 0,
        }
    }

    /// The received bytes not consumed yet.
    fn filled(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Drops the first `n` bytes.
    fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.bytes.copy_within(n..self.len, 0);
        self.len -= n;
    }

    /// Reads once from `stream` into the free space; returns 0 at EOF.
    ///
    /// A full buffer is an error: no valid handshake message is that long.
    async fn fill_from<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> io::Result<usize> {
        let free = &mut self.bytes[self.len..];
        if free.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "handshake message exceeds the input buffer",
            ));
        }
        let n = stream.read(free).await?;
        self.len += n;
        Ok(n)
    }
}
