//! Ping: ICMP echo (RFC 792, RFC 4443) to a tailnet peer, sent from the node's netstack.
//!
//! The echo requests must leave from the node that holds the WireGuard sessions, so `tailnode
//! ping` is a client of the node's local API (see [`crate::api`] and [`crate::api::ping`]):
//!
//! ```text
//! GET /v1/ping?target=NAME_OR_IP&count=N&interval=MS&timeout=MS&size=BYTES
//! ```
//!
//! `target` is a peer name (`b` or `b.<tailnet domain>`, resolved by the controller's peer
//! directory; the IPv4 address is used when the node has one) or an IP literal. `count` 0 pings
//! until the client goes away. On success the answer is `200` with `Content-Type:
//! application/x-ndjson` and no length: one [`PingEvent`] JSON object per line, written as it
//! happens, and the connection closes after [`PingEvent::Done`]. A request that cannot start is
//! answered with a one-line `text/plain` reason: `400` for a bad parameter, `404` for an unknown
//! name, `422` for an address outside the tailnet (or of a family the node has no address of),
//! `503` when the node has stopped.
//!
//! # Layout
//!
//! - [`PingSession`]: the sans-IO core — when to send the next probe, which probes are
//!   answered (and their round-trip time) or lost — on injected time.
//! - [`PingParams`]: the request, to and from its query string.
//! - `serve`: the API side: resolves the target and drives a [`PingSession`] over an
//!   [`IcmpSocket`](tailnode_netstack::IcmpSocket), streaming events.
//! - [`PingEvent`]: one line of the event stream; the binary prints them like ping(8).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::node::{NodeHandle, Route};
use serde::{Deserialize, Serialize};
use tailnode_control::controller::PeerDirectory;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tracing::{debug, trace};

/// Probes sent by default.
pub const DEFAULT_COUNT: u32 = 4;
/// Default time between probes.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Default time a probe waits for its reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default echo payload size (as ping(8)).
pub const DEFAULT_SIZE: usize = 56;
/// Shortest interval between probes.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Longest wait for one reply (and longest interval).
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Largest echo payload: the default tunnel MTU (1420) minus the IPv6 and ICMPv6 headers.
pub const MAX_SIZE: usize = 1420 - 40 - 8;
/// Most probes one request may ask for (0 means unbounded).
pub const MAX_COUNT: u32 = 1_000_000;
/// Bytes of the ICMP echo header, added to the payload in "N bytes from" lines.
pub const ECHO_HEADER: usize = 8;

// ---------------------------------------------------------------------------------------------
// The sans-IO core
// ---------------------------------------------------------------------------------------------

/// What happened to one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The reply arrived after `rtt`.
    Replied {
        /// The probe's sequence number.
        seq: u16,
        /// Round-trip time.
        rtt: Duration,
    },
    /// No reply within the timeout.
    Lost {
        /// The probe's sequence number.
        seq: u16,
    },
}

/// The state of one ping run: `count` probes (0: unbounded) `interval` apart, each waiting
/// `timeout` for its reply. Sequence numbers start at 1 and wrap at 65535; a reply is matched
/// to the outstanding probe with its sequence number, so a late or duplicate reply counts once
/// at most, and never after its probe was declared lost.
#[derive(Debug)]
pub struct PingSession {
    count: u32,
    interval: Duration,
    timeout: Duration,
    sent: u32,
    next_send: Instant,
    /// Probes waiting for a reply: (sequence, sent at), oldest first.
    outstanding: VecDeque<(u16, Instant)>,
    events: VecDeque<ProbeOutcome>,
}

impl PingSession {
    /// A run whose first probe is due at `now`.
    pub fn new(count: u32, interval: Duration, timeout: Duration, now: Instant) -> Self {
        Self {
            count,
            interval,
            timeout,
            sent: 0,
            next_send: now,
            outstanding: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The sequence number of a probe to send now, if one is due; the probe counts as sent.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<u16> {
        if (self.count != 0 && self.sent >= self.count) || now < self.next_send {
            return None;
        }
        self.sent = self.sent.wrapping_add(1);
        // ping(8) numbers from 1; after 65535 the sequence wraps.
        let seq = (self.sent % 0x1_0000) as u16;
        self.outstanding.push_back((seq, now));
        // Keep the cadence when the driver is a little late; after a long stall, send one probe
        // and restart the cadence rather than a burst of catch-up probes.
        self.next_send += self.interval;
        if self.next_send <= now {
            self.next_send = now + self.interval;
        }
        Some(seq)
    }

    /// A reply with sequence number `seq` arrived at `now`. Returns whether it answered an
    /// outstanding probe (unknown, late and duplicate replies are ignored).
    pub fn handle_reply(&mut self, seq: u16, now: Instant) -> bool {
        let Some(i) = self.outstanding.iter().position(|(s, _)| *s == seq) else {
            return false;
        };
        let Some((seq, at)) = self.outstanding.remove(i) else {
            return false;
        };
        self.events.push_back(ProbeOutcome::Replied {
            seq,
            rtt: now.saturating_duration_since(at),
        });
        true
    }

    /// Declares lost every probe whose timeout expired by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(seq, at)) = self.outstanding.front() {
            if now < at + self.timeout {
                break;
            }
            self.outstanding.pop_front();
            self.events.push_back(ProbeOutcome::Lost { seq });
        }
    }

    /// The next outcome, in the order they happened.
    pub fn poll_event(&mut self) -> Option<ProbeOutcome> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) or
    /// [`poll_transmit`](Self::poll_transmit) has something to do next, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        let send = (self.count == 0 || self.sent < self.count).then_some((self.next_send, "send"));
        let expiry = self
            .outstanding
            .front()
            .map(|(_, at)| (*at + self.timeout, "reply timeout"));
        match (send, expiry) {
            (Some(s), Some(e)) => Some(if e.0 < s.0 { e } else { s }),
            (s, e) => s.or(e),
        }
    }

    /// Probes sent so far.
    pub fn sent(&self) -> u32 {
        self.sent
    }

    /// Whether every probe was sent and answered or lost, and every outcome taken.
    pub fn is_finished(&self) -> bool {
        self.count != 0
            && self.sent >= self.count
            && self.outstanding.is_empty()
            && self.events.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// The request and the event stream
// ---------------------------------------------------------------------------------------------

/// A ping request: what `GET /v1/ping` carries in its query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingParams {
    /// Peer name or IP address.
    pub target: String,
    /// Probes to send; 0 until the client goes away.
    pub count: u32,
    /// Time between probes.
    pub interval: Duration,
    /// Time each probe waits for its reply.
    pub timeout: Duration,
    /// Echo payload bytes.
    pub size: usize,
}

/// A bad ping request (HTTP 400, exit status 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// The query has no `target`.
    #[error("missing target")]
    MissingTarget,
    /// A parameter the API does not know.
    #[error("unknown parameter {0:?}")]
    Unknown(String),
    /// A value that does not parse or is out of range.
    #[error("bad {name}: {reason}")]
    Invalid {
        /// The parameter.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl PingParams {
    /// A request for `target` with the defaults.
    pub fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            count: DEFAULT_COUNT,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            size: DEFAULT_SIZE,
        }
    }

    /// Checks the ranges: interval 10 ms..=60 s, timeout 1 ms..=60 s, size up to
    /// [`MAX_SIZE`], count up to [`MAX_COUNT`], a non-empty target.
    ///
    /// # Errors
    /// [`ParamError`] naming the first bad value.
    pub fn validate(&self) -> Result<(), ParamError> {
        let invalid = |name, reason: String| Err(ParamError::Invalid { name, reason });
        if self.target.trim().is_empty() {
            return Err(ParamError::MissingTarget);
        }
        if self.count > MAX_COUNT {
            return invalid("count", format!("at most {MAX_COUNT}"));
        }
        if self.interval < MIN_INTERVAL || self.interval > MAX_WAIT {
            return invalid("interval", "must be between 10ms and 60s".into());
        }
        if self.timeout < Duration::from_millis(1) || self.timeout > MAX_WAIT {
            return invalid("timeout", "must be between 1ms and 60s".into());
        }
        if self.size > MAX_SIZE {
            return invalid("size", format!("at most {MAX_SIZE} bytes"));
        }
        Ok(())
    }

    /// The query string (without `?`), durations in milliseconds.
    pub fn to_query(&self) -> String {
        format!(
            "target={}&count={}&interval={}&timeout={}&size={}",
            percent_encode(&self.target),
            self.count,
            self.interval.as_millis(),
            self.timeout.as_millis(),
            self.size
        )
    }

    /// Parses and validates a query string (without `?`); missing parameters take their
    /// defaults.
    ///
    /// # Errors
    /// [`ParamError`] for a missing target, an unknown parameter or a bad value.
    pub fn from_query(query: &str) -> Result<Self, ParamError> {
        let mut params = Self::new(String::new());
        let mut target = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value).ok_or_else(|| ParamError::Invalid {
                name: "query",
                reason: "bad percent-encoding".into(),
            })?;
            let number = |name: &'static str| {
                value.parse::<u64>().map_err(|_| ParamError::Invalid {
                    name,
                    reason: format!("{value:?} is not a number"),
                })
            };
            match key {
                "target" => target = Some(value.clone()),
                "count" => {
                    params.count =
                        u32::try_from(number("count")?).map_err(|_| ParamError::Invalid {
                            name: "count",
                            reason: format!("at most {MAX_COUNT}"),
                        })?;
                }
                "interval" => params.interval = Duration::from_millis(number("interval")?),
                "timeout" => params.timeout = Duration::from_millis(number("timeout")?),
                "size" => {
                    params.size = usize::try_from(number("size")?).unwrap_or(usize::MAX);
                }
                other => return Err(ParamError::Unknown(other.to_string())),
            }
        }
        params.target = target.ok_or(ParamError::MissingTarget)?;
        params.validate()?;
        Ok(params)
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (and `+` as a space); `None` for a broken escape or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// One line of the `GET /v1/ping` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PingEvent {
    /// The run started.
    Start {
        /// The target as asked.
        target: String,
        /// The address pinged.
        address: IpAddr,
        /// Echo payload bytes.
        size: usize,
        /// Probes that will be sent (0: until the client goes away).
        count: u32,
    },
    /// A probe was answered.
    Reply {
        /// Sequence number.
        seq: u16,
        /// Who answered.
        from: IpAddr,
        /// ICMP bytes of the reply (payload and echo header).
        bytes: usize,
        /// Round-trip time in milliseconds.
        time_ms: f64,
    },
    /// A probe got no reply within the timeout.
    Timeout {
        /// Sequence number.
        seq: u16,
    },
    /// A probe could not be sent (it will be reported lost).
    Error {
        /// Why.
        message: String,
    },
    /// The run ended.
    Done {
        /// Probes sent.
        sent: u32,
        /// Probes answered.
        received: u32,
    },
}

// ---------------------------------------------------------------------------------------------
// The API side
// ---------------------------------------------------------------------------------------------

/// Why a ping cannot start, with its HTTP status.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    /// Bad parameters (400).
    #[error("{0}")]
    Params(#[from] ParamError),
    /// A name no peer has (404).
    #[error("unknown peer {0:?}: not an IP address nor the name of a peer in the tailnet")]
    UnknownName(String),
    /// Not routed into the tailnet, or no source address of its family (422).
    #[error("{0}")]
    Unroutable(String),
    /// The node has stopped (503).
    #[error("the node has stopped")]
    Stopped,
    /// The echo socket could not be opened (503).
    #[error("cannot open an ICMP socket: {0}")]
    Socket(#[from] tailnode_netstack::IcmpBindError),
}

impl StartError {
    pub(crate) fn status(&self) -> (u16, &'static str) {
        match self {
            Self::Params(_) => (400, "Bad Request"),
            Self::UnknownName(_) => (404, "Not Found"),
            Self::Unroutable(_) => (422, "Unprocessable Content"),
            Self::Stopped | Self::Socket(_) => (503, "Service Unavailable"),
        }
    }
}

/// Answers `GET /v1/ping?query` on an API connection; returns the HTTP status sent.
pub(crate) async fn serve<S: AsyncWrite + Unpin>(
    stream: &mut S,
    query: &str,
    node: &NodeHandle,
    names: Option<&PeerDirectory>,
) -> u16 {
    let started = match start(query, node, names).await {
        Ok(started) => started,
        Err(e) => {
            let (code, reason) = e.status();
            debug!(code, error = %e, "ping refused");
            let body = format!("{e}\n");
            let response = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
            return code;
        }
    };
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_ok() {
        if let Err(e) = run(stream, started).await {
            debug!(error = %e, "ping client went away");
        }
        let _ = stream.shutdown().await;
    }
    200
}

/// A resolved, validated ping about to run.
struct Started {
    params: PingParams,
    address: IpAddr,
    socket: tailnode_netstack::IcmpSocket,
}

async fn start(
    query: &str,
    node: &NodeHandle,
    names: Option<&PeerDirectory>,
) -> Result<Started, StartError> {
    let params = PingParams::from_query(query)?;
    let own = node.netstack().addresses();
    let address = match params.target.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical(),
        Err(_) => {
            let (v4, v6) = names
                .and_then(|d| d.resolve(&params.target))
                .ok_or_else(|| StartError::UnknownName(params.target.clone()))?;
            if own.iter().any(IpAddr::is_ipv4) || !own.iter().any(IpAddr::is_ipv6) {
                IpAddr::V4(v4)
            } else {
                IpAddr::V6(v6)
            }
        }
    };
    if !own.iter().any(|a| a.is_ipv4() == address.is_ipv4()) {
        return Err(StartError::Unroutable(format!(
            "this node has no {} address to ping {address} from",
            if address.is_ipv4() { "IPv4" } else { "IPv6" }
        )));
    }
    match node.route(address).await.map_err(|_| StartError::Stopped)? {
        Route::None => {
            return Err(StartError::Unroutable(format!(
                "{address} is outside the tailnet: no peer's allowed IPs cover it"
            )));
        }
        Route::Local | Route::Peer { .. } => {}
    }
    let socket = node.netstack().bind_icmp(None)?;
    Ok(Started {
        params,
        address,
        socket,
    })
}

/// Runs the probes and writes one JSON line per event; ends early if the client goes away.
async fn run<S: AsyncWrite + Unpin>(out: &mut S, started: Started) -> std::io::Result<()> {
    let Started {
        params,
        address,
        socket,
    } = started;
    // A payload the reply must echo back byte for byte: the identifier, then a counter.
    let payload: Vec<u8> = (0..params.size)
        .map(|i| (i as u8).wrapping_add(socket.ident() as u8))
        .collect();
    let mut reply_buf = vec![0u8; params.size.max(1)];
    let mut session = PingSession::new(
        params.count,
        params.interval,
        params.timeout,
        Instant::now(),
    );
    let mut received = 0u32;
    write_event(
        out,
        &PingEvent::Start {
            target: params.target.clone(),
            address,
            size: params.size,
            count: params.count,
        },
    )
    .await?;
    loop {
        let now = Instant::now();
        session.handle_timeout(now);
        while let Some(seq) = session.poll_transmit(now) {
            trace!(seq, %address, "ping: echo request");
            if let Err(e) = socket.send_echo(address, seq, &payload).await {
                write_event(
                    out,
                    &PingEvent::Error {
                        message: format!("icmp_seq={seq}: cannot send: {e}"),
                    },
                )
                .await?;
            }
        }
        while let Some(outcome) = session.poll_event() {
            let event = match outcome {
                ProbeOutcome::Replied { seq, rtt } => {
                    received += 1;
                    PingEvent::Reply {
                        seq,
                        from: address,
                        bytes: params.size + ECHO_HEADER,
                        time_ms: (rtt.as_secs_f64() * 1e6).round() / 1e3,
                    }
                }
                ProbeOutcome::Lost { seq } => PingEvent::Timeout { seq },
            };
            write_event(out, &event).await?;
        }
        if session.is_finished() {
            break;
        }
        let deadline = session
            .poll_timeout()
            .map_or(now + params.interval, |(at, _)| at);
        tokio::select! {
            reply = socket.recv_reply(&mut reply_buf) => match reply {
                Ok(r) if r.from == address
                    && r.len == payload.len()
                    && reply_buf[..r.len.min(reply_buf.len())] == payload[..] =>
                {
                    if !session.handle_reply(r.seq, Instant::now()) {
                        trace!(seq = r.seq, "ping: late or duplicate reply");
                    }
                }
                Ok(r) => trace!(from = %r.from, seq = r.seq, "ping: foreign or corrupt reply ignored"),
                Err(e) => debug!(error = %e, "ping: receive failed"),
            },
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {}
        }
    }
    write_event(
        out,
        &PingEvent::Done {
            sent: session.sent(),
            received,
        },
    )
    .await
}

async fn write_event<S: AsyncWrite + Unpin>(out: &mut S, event: &PingEvent) -> std::io::Result<()> {
    let mut line = serde_json::to_string(event).map_err(std::io::Error::other)?;
    line.push('\n');
    out.write_all(line.as_bytes()).await?;
    out.flush().await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn probes_go_out_on_the_interval_and_are_matched_to_replies() {
        let t0 = Instant::now();
        let mut s = PingSession::new(3, 1000 * MS, 500 * MS, t0);
        assert_eq!(s.poll_transmit(t0), Some(1));
        assert_eq!(s.poll_transmit(t0), None, "one probe per interval");
        assert_eq!(s.poll_timeout(), Some((t0 + 500 * MS, "reply timeout")));
        assert!(s.handle_reply(1, t0 + 20 * MS));
        assert!(!s.handle_reply(1, t0 + 21 * MS), "a duplicate counts once");
        assert!(
            !s.handle_reply(9, t0 + 21 * MS),
            "an unknown sequence is ignored"
        );
        assert_eq!(
            s.poll_event(),
            Some(ProbeOutcome::Replied {
                seq: 1,
                rtt: 20 * MS
            })
        );
        assert_eq!(s.poll_event(), None);
        assert_eq!(s.poll_timeout(), Some((t0 + 1000 * MS, "send")));
        assert_eq!(s.poll_transmit(t0 + 999 * MS), None);
        assert_eq!(s.poll_transmit(t0 + 1000 * MS), Some(2));
        // Probe 2 is lost: nothing before its timeout, then exactly one Lost.
        s.handle_timeout(t0 + 1499 * MS);
        assert_eq!(s.poll_event(), None);
        s.handle_timeout(t0 + 1500 * MS);
        assert_eq!(s.poll_event(), Some(ProbeOutcome::Lost { seq: 2 }));
        assert!(!s.handle_reply(2, t0 + 1600 * MS), "too late: already lost");
        assert_eq!(s.poll_transmit(t0 + 2000 * MS), Some(3));
        assert!(!s.is_finished());
        assert!(s.handle_reply(3, t0 + 2001 * MS));
        assert!(!s.is_finished(), "the outcome is still to be taken");
        assert!(matches!(
            s.poll_event(),
            Some(ProbeOutcome::Replied { seq: 3, .. })
        ));
        assert!(s.is_finished());
        assert_eq!(s.sent(), 3);
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.poll_transmit(t0 + 9000 * MS), None);
    }

    #[test]
    fn a_late_driver_sends_at_once_and_keeps_the_cadence() {
        let t0 = Instant::now();
        let mut s = PingSession::new(0, 100 * MS, 5000 * MS, t0);
        assert_eq!(s.poll_transmit(t0), Some(1));
        // The driver wakes 250 ms late: one probe now (not a burst), the next 100 ms later.
        assert_eq!(s.poll_transmit(t0 + 350 * MS), Some(2));
        assert_eq!(s.poll_transmit(t0 + 350 * MS), None);
        assert_eq!(s.poll_timeout(), Some((t0 + 450 * MS, "send")));
        // A driver a few milliseconds late keeps the original cadence.
        let mut s2 = PingSession::new(2, 100 * MS, 5000 * MS, t0);
        assert_eq!(s2.poll_transmit(t0), Some(1));
        assert_eq!(s2.poll_transmit(t0 + 105 * MS), Some(2));
        assert_eq!(s2.poll_timeout(), Some((t0 + 5000 * MS, "reply timeout")));
        let mut s3 = PingSession::new(3, 100 * MS, 5000 * MS, t0);
        s3.poll_transmit(t0);
        s3.poll_transmit(t0 + 105 * MS);
        assert_eq!(s3.poll_timeout(), Some((t0 + 200 * MS, "send")));
        // Unbounded: never finished.
        for _ in 0..10 {
            assert!(!s.is_finished());
        }
    }

    #[test]
    fn sequence_numbers_wrap_after_65535() {
        let t0 = Instant::now();
        let mut s = PingSession::new(0, MS, MS, t0);
        let mut last = 0;
        for i in 0..65_537u32 {
            let now = t0 + i * MS;
            s.handle_timeout(now);
            while s.poll_event().is_some() {}
            last = s.poll_transmit(now).unwrap();
        }
        assert_eq!(last, 1, "65537th probe wraps to sequence 1");
    }

    #[test]
    fn query_round_trips_and_defaults_apply() {
        let p = PingParams {
            target: "fd7a:115c:a1e0::2".into(),
            count: 7,
            interval: 250 * MS,
            timeout: 900 * MS,
            size: 100,
        };
        assert_eq!(PingParams::from_query(&p.to_query()).unwrap(), p);
        assert_eq!(
            PingParams::from_query("target=b").unwrap(),
            PingParams::new("b")
        );
        assert_eq!(
            PingParams::from_query("count=1"),
            Err(ParamError::MissingTarget)
        );
        assert!(matches!(
            PingParams::from_query("target=b&flood=1"),
            Err(ParamError::Unknown(k)) if k == "flood"
        ));
        for bad in [
            "target=b&count=x",
            "target=b&interval=1",
            "target=b&timeout=0",
            "target=b&timeout=60001",
            "target=b&size=1373",
            "target=b&count=99999999999",
            "target=%zz",
            "target=",
        ] {
            assert!(PingParams::from_query(bad).is_err(), "{bad}");
        }
        assert_eq!(
            PingParams::from_query("target=my%20peer").unwrap().target,
            "my peer"
        );
    }

    #[test]
    fn events_round_trip_through_json() {
        let events = [
            PingEvent::Timeout { seq: 4 },
            PingEvent::Done {
                sent: 4,
                received: 3,
            },
            PingEvent::Error {
                message: "x".into(),
            },
        ];
        for e in events {
            let line = serde_json::to_string(&e).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<PingEvent>(&line).unwrap(), e);
        }
        assert_eq!(
            serde_json::to_string(&PingEvent::Timeout { seq: 4 }).unwrap(),
            r#"{"event":"timeout","seq":4}"#
        );
    }

    proptest! {
        #[test]
        fn any_query_parses_or_fails_cleanly(query in "[a-z=&%0-9A-F+.:]{0,80}") {
            let _ = PingParams::from_query(&query);
        }

        #[test]
        fn any_valid_request_round_trips(
            target in "\\PC{1,40}",
            count in 0u32..=MAX_COUNT,
            interval in 10u64..=60_000,
            timeout in 1u64..=60_000,
            size in 0usize..=MAX_SIZE,
        ) {
            prop_assume!(!target.trim().is_empty());
            let p = PingParams {
                target,
                count,
                interval: Duration::from_millis(interval),
                timeout: Duration::from_millis(timeout),
                size,
            };
            prop_assert_eq!(PingParams::from_query(&p.to_query()).unwrap(), p);
        }

        #[test]
        fn every_probe_has_exactly_one_outcome(
            count in 1u32..40,
            replies in proptest::collection::vec((0u16..50, 0u64..3000), 0..80),
        ) {
            let t0 = Instant::now();
            let mut s = PingSession::new(count, 100 * MS, 1000 * MS, t0);
            let mut outcomes = std::collections::HashMap::new();
            let mut replies = replies;
            replies.sort_by_key(|r| r.1);
            let mut r = replies.into_iter().peekable();
            let mut t = 0u64;
            while !s.is_finished() {
                let now = t0 + Duration::from_millis(t);
                while let Some(&(seq, at)) = r.peek() {
                    if at > t { break; }
                    s.handle_reply(seq, now);
                    r.next();
                }
                s.handle_timeout(now);
                while s.poll_transmit(now).is_some() {}
                while let Some(o) = s.poll_event() {
                    let seq = match o { ProbeOutcome::Replied { seq, .. } | ProbeOutcome::Lost { seq } => seq };
                    prop_assert!(outcomes.insert(seq, o).is_none(), "two outcomes for {}", seq);
                }
                t += 10;
                prop_assert!(t < 100_000);
            }
            prop_assert_eq!(outcomes.len() as u32, count);
        }
    }
}
