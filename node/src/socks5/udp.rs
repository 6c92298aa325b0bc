//! UDP ASSOCIATE (RFC 1928 §7): the capability the server needs ([`UdpDialer`], [`UdpEgress`]),
//! the server-wide counters, and the driver of one association.
//!
//! The driver owns three things per association: the client's TCP control connection, a relay
//! UDP socket bound to the IP the client reached the proxy on (the reply's BND.ADDR/BND.PORT),
//! and the [`UdpEgress`] the dialer opened (for the node: one tailnet socket, plus host sockets
//! when direct egress is allowed). One loop waits on all of them and on the idle deadline of the
//! sans-IO [`Association`]; the association ends when the control connection closes or fails,
//! when it has been idle for [`Socks5Config::udp_idle_timeout`], or on shutdown, and every socket
//! is released with it.
//!
//! Per datagram there is no allocation (for IP destinations) and one copy per direction: client
//! datagrams are received into a buffer and their payload is sent from it; replies are received
//! [`MAX_UDP_IP_HEADER`] bytes into a buffer and the §7 header is written in front of them.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tracing::{debug, info, trace};

use super::association::{Association, AssociationCounts, ClientDatagram, DropReason};
use super::config::Socks5Config;
use super::proto::{MAX_DOMAIN_LEN, MAX_UDP_IP_HEADER, write_udp_ip_header};
use crate::dial::UdpEgress;

/// Longest §7 header: RSV(2) FRAG ATYP, a length byte and the longest accepted name, PORT.
const MAX_UDP_HEADER: usize = 3 + 1 + 1 + MAX_DOMAIN_LEN + 2;

/// Live counters of a [`Socks5Server`](super::Socks5Server), shared with its connections.
#[derive(Debug, Default)]
pub struct Socks5Counters {
    udp_associations_active: AtomicU64,
    udp_associations: AtomicU64,
    udp_associations_refused: AtomicU64,
    udp_datagrams_up: AtomicU64,
    udp_datagrams_down: AtomicU64,
    udp_dropped_foreign: AtomicU64,
    udp_dropped_fragments: AtomicU64,
    udp_dropped_malformed: AtomicU64,
    udp_dropped_oversize: AtomicU64,
    udp_dropped_egress: AtomicU64,
    udp_dropped_unsolicited: AtomicU64,
}

/// A snapshot of [`Socks5Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Socks5Stats {
    /// UDP associations alive now.
    pub udp_associations_active: u64,
    /// UDP associations opened so far.
    pub udp_associations: u64,
    /// UDP ASSOCIATE requests refused (limit reached, relay or egress could not be opened).
    pub udp_associations_refused: u64,
    /// Client datagrams sent on to their destination.
    pub udp_datagrams_up: u64,
    /// Replies handed to clients.
    pub udp_datagrams_down: u64,
    /// Client datagrams from an address other than the association's client.
    pub udp_dropped_foreign: u64,
    /// Client datagrams with FRAG != 0 (fragmentation is not supported).
    pub udp_dropped_fragments: u64,
    /// Client datagrams with a malformed §7 header.
    pub udp_dropped_malformed: u64,
    /// Datagrams (either way) above [`Socks5Config::udp_max_datagram`].
    pub udp_dropped_oversize: u64,
    /// Client datagrams that could not be sent (unresolvable, refused by policy, send error).
    pub udp_dropped_egress: u64,
    /// Replies from endpoints the client never sent to.
    pub udp_dropped_unsolicited: u64,
}

impl Socks5Counters {
    /// The current values.
    pub fn snapshot(&self) -> Socks5Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Socks5Stats {
            udp_associations_active: get(&self.udp_associations_active),
            udp_associations: get(&self.udp_associations),
            udp_associations_refused: get(&self.udp_associations_refused),
            udp_datagrams_up: get(&self.udp_datagrams_up),
            udp_datagrams_down: get(&self.udp_datagrams_down),
            udp_dropped_foreign: get(&self.udp_dropped_foreign),
            udp_dropped_fragments: get(&self.udp_dropped_fragments),
            udp_dropped_malformed: get(&self.udp_dropped_malformed),
            udp_dropped_oversize: get(&self.udp_dropped_oversize),
            udp_dropped_egress: get(&self.udp_dropped_egress),
            udp_dropped_unsolicited: get(&self.udp_dropped_unsolicited),
        }
    }

    pub(super) fn refused(&self) {
        bump(&self.udp_associations_refused);
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Keeps the active-association gauge right on every exit path.
struct ActiveGuard<'a>(&'a Socks5Counters);

impl<'a> ActiveGuard<'a> {
    fn new(counters: &'a Socks5Counters) -> Self {
        bump(&counters.udp_associations);
        bump(&counters.udp_associations_active);
        Self(counters)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0
            .udp_associations_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why an association ended.
#[derive(Debug)]
pub enum UdpEnd {
    /// The client closed the TCP control connection.
    ControlClosed,
    /// Reading the control connection failed.
    ControlError(io::Error),
    /// No datagram passed for the idle timeout.
    Idle,
    /// The relay socket failed.
    RelayError(io::Error),
    /// The egress sockets failed.
    EgressError(io::Error),
}

/// Relays datagrams for an established association until it ends. The client has been answered
/// with `relay`'s address already.
pub(super) async fn run_association<S, E>(
    control: &mut S,
    relay: UdpSocket,
    mut egress: E,
    mut association: Association,
    config: &Socks5Config,
    counters: &Socks5Counters,
) -> (UdpEnd, AssociationCounts)
where
    S: AsyncRead + AsyncWrite + Unpin,
    E: UdpEgress,
{
    let _active = ActiveGuard::new(counters);
    let max = config.udp_max_datagram.max(1);
    // Room for the longest §7 header, and one spare byte that detects datagrams above the limit
    // (they arrive truncated to the buffer).
    let mut up = vec![0u8; MAX_UDP_HEADER + max + 1];
    let mut down = vec![0u8; MAX_UDP_IP_HEADER + max + 1];
    let mut control_buf = [0u8; 64];
    let mut header = [0u8; MAX_UDP_IP_HEADER];
    let end = loop {
        let deadline = Instant::from_std(association.poll_timeout());
        tokio::select! {
            read = control.read(&mut control_buf) => match read {
                // RFC 1928 gives the control connection no further messages: ignore its bytes.
                Ok(0) => break UdpEnd::ControlClosed,
                Ok(_) => {}
                Err(error) => break UdpEnd::ControlError(error),
            },
            received = relay.recv_from(&mut up) => {
                let (len, from) = match received {
                    Ok(received) => received,
                    // ICMP errors reported on the socket and the like; the socket still works.
                    Err(error) if is_transient(&error) => {
                        debug!(%error, "UDP relay receive error; continuing");
                        continue;
                    }
                    Err(error) => break UdpEnd::RelayError(error),
                };
                let now = Instant::now().into_std();
                match association.handle_client_datagram(from, &up[..len], now) {
                    ClientDatagram::Forward(datagram)
                        if len == up.len() || datagram.payload.len() > max =>
                    {
                        bump(&counters.udp_dropped_oversize);
                        debug!(%from, "UDP datagram from the client above the size limit: dropped");
                    }
                    ClientDatagram::Forward(datagram) => {
                        match egress.send_to(&datagram.target, datagram.payload).await {
                            Ok(to) => {
                                association.handle_sent(to, now);
                                bump(&counters.udp_datagrams_up);
                                trace!(target = %datagram.target, %to, len = datagram.payload.len(), "UDP datagram relayed");
                            }
                            Err(error) => {
                                association.handle_send_failed();
                                bump(&counters.udp_dropped_egress);
                                debug!(target = %datagram.target, %error, "UDP datagram dropped");
                            }
                        }
                    }
                    ClientDatagram::Drop(reason) => {
                        let counter = match &reason {
                            DropReason::ForeignSource => &counters.udp_dropped_foreign,
                            DropReason::Fragment(_) => &counters.udp_dropped_fragments,
                            DropReason::Malformed(_) => &counters.udp_dropped_malformed,
                        };
                        bump(counter);
                        debug!(%from, ?reason, "UDP datagram from the client dropped");
                    }
                }
            },
            received = egress.recv_from(&mut down[MAX_UDP_IP_HEADER..]) => {
                let (len, from) = match received {
                    Ok(received) => received,
                    Err(error) if is_transient(&error) => {
                        debug!(%error, "UDP egress receive error; continuing");
                        continue;
                    }
                    Err(error) => break UdpEnd::EgressError(error),
                };
                if len > max {
                    bump(&counters.udp_dropped_oversize);
                    debug!(%from, "UDP reply above the size limit: dropped");
                    continue;
                }
                let Some(client) = association.handle_reply(from, Instant::now().into_std()) else {
                    bump(&counters.udp_dropped_unsolicited);
                    trace!(%from, "UDP reply from an endpoint the client never sent to: dropped");
                    continue;
                };
                let header_len = write_udp_ip_header(from, &mut header);
                let start = MAX_UDP_IP_HEADER - header_len;
                down[start..MAX_UDP_IP_HEADER].copy_from_slice(&header[..header_len]);
                match relay.send_to(&down[start..MAX_UDP_IP_HEADER + len], client).await {
                    Ok(_) => {
                        bump(&counters.udp_datagrams_down);
                        trace!(%from, %client, len, "UDP reply relayed");
                    }
                    Err(error) => debug!(%client, %error, "UDP reply to the client failed"),
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                if association.is_expired(Instant::now().into_std()) {
                    break UdpEnd::Idle;
                }
            },
        }
    };
    (end, association.counts())
}

/// Receive errors that leave a UDP socket usable: ICMP reports of earlier sends, interrupted
/// calls, transient memory shortage.
fn is_transient(error: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionRefused
            | ConnectionReset
            | HostUnreachable
            | NetworkUnreachable
            | Interrupted
            | WouldBlock
            | OutOfMemory
    )
}

/// Logs the end of an association.
pub(super) fn log_end(relay: SocketAddr, end: &UdpEnd, counts: &AssociationCounts) {
    info!(
        %relay,
        ?end,
        up = counts.up,
        down = counts.down,
        dropped_foreign = counts.dropped_foreign,
        dropped_fragments = counts.dropped_fragments,
        dropped_malformed = counts.dropped_malformed,
        dropped_egress = counts.dropped_egress,
        dropped_unsolicited = counts.dropped_unsolicited,
        "SOCKS5 UDP association closed"
    );
}
