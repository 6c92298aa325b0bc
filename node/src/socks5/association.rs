//! The state of one UDP ASSOCIATE (RFC 1928 §7), sans-IO.
//!
//! An [`Association`] decides, for every datagram, whether it may pass: which client datagrams
//! are accepted (source address checks, §7 header, fragments), which replies are handed back to
//! the client (only from endpoints the client has sent to), and when the association has been
//! idle for too long. It owns no socket and reads no clock: the driver passes `now` in, performs
//! the sends, and sleeps until [`Association::poll_timeout`].
//!
//! # Which client datagrams are accepted
//!
//! RFC 1928 §7: "the UDP relay server MUST acquire from the SOCKS server the expected IP address
//! of the client that will send datagrams to the BND.PORT given in the reply to UDP ASSOCIATE. It
//! MUST drop any datagrams arriving from any source IP address other than the one recorded for the
//! particular association." Here:
//!
//! - the source IP must be the IP the client's TCP control connection comes from (IPv4-mapped
//!   IPv6 addresses are compared as IPv4);
//! - the request's DST.PORT, if non-zero and if DST.ADDR is unspecified, a domain name or that
//!   same IP, fixes the source port. A DST.ADDR naming another IP is the client's view from behind
//!   a NAT: both fields are ignored then;
//! - otherwise the first well-formed datagram fixes the source port, and later datagrams must come
//!   from the same IP and port.
//!
//! # Which replies are accepted
//!
//! Only replies whose source is an endpoint this association sent to (the most recent
//! [`MAX_DESTINATIONS`] of them), like an address-and-port-dependent NAT filter: other tailnet
//! hosts cannot inject datagrams into the client by guessing the association's port.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::proto::{ProtocolError, TargetAddr, UdpDatagram, decode_udp_datagram};

/// Endpoints remembered per association for the reply filter; the least recently used one is
/// forgotten when a new one would exceed it.
pub const MAX_DESTINATIONS: usize = 256;

/// What to do with a datagram the client sent to the relay.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub enum ClientDatagram<'a> {
    /// Send `payload` to `target`, then report the outcome with [`Association::handle_sent`] or
    /// [`Association::handle_send_failed`].
    Forward(UdpDatagram<'a>),
    /// Drop it.
    Drop(DropReason),
}

/// Why a client datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropReason {
    /// It came from an address other than the association's client.
    ForeignSource,
    /// FRAG != 0: fragmentation is not implemented (RFC 1928 §7 allows dropping them).
    Fragment(u8),
    /// The §7 header is malformed.
    Malformed(ProtocolError),
}

/// Per-association datagram counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AssociationCounts {
    /// Client datagrams sent on to their destination.
    pub up: u64,
    /// Replies handed to the client.
    pub down: u64,
    /// Client datagrams from a wrong source address.
    pub dropped_foreign: u64,
    /// Client datagrams with FRAG != 0.
    pub dropped_fragments: u64,
    /// Client datagrams with a malformed header.
    pub dropped_malformed: u64,
    /// Client datagrams whose destination could not be resolved, was refused by policy, or
    /// whose send failed.
    pub dropped_egress: u64,
    /// Replies from endpoints the client never sent to.
    pub dropped_unsolicited: u64,
}

/// One UDP association's filters, counters and idle deadline.
#[derive(Debug)]
pub struct Association {
    client_ip: IpAddr,
    client_port: Option<u16>,
    destinations: HashMap<SocketAddr, Instant>,
    idle_timeout: Duration,
    last_activity: Instant,
    counts: AssociationCounts,
}

impl Association {
    /// An association for the client whose control connection comes from `control_peer`, with
    /// the DST.ADDR/DST.PORT of its request in `requested`.
    pub fn new(
        control_peer: SocketAddr,
        requested: &TargetAddr,
        idle_timeout: Duration,
        now: Instant,
    ) -> Self {
        let client_ip = control_peer.ip().to_canonical();
        let port = requested.port();
        let client_port = match requested {
            _ if port == 0 => None,
            TargetAddr::Domain(..) => Some(port),
            TargetAddr::Ip(addr) if addr.ip().is_unspecified() => Some(port),
            TargetAddr::Ip(addr) if addr.ip().to_canonical() == client_ip => Some(port),
            // Another address: the client's own view from behind a NAT. Learn the port instead.
            TargetAddr::Ip(_) => None,
        };
        Self {
            client_ip,
            client_port,
            destinations: HashMap::new(),
            idle_timeout,
            last_activity: now,
            counts: AssociationCounts::default(),
        }
    }

    /// Where replies go: the client's UDP address, once it is known.
    pub fn client(&self) -> Option<SocketAddr> {
        self.client_port
            .map(|port| SocketAddr::new(self.client_ip, port))
    }

    /// Handles a datagram that arrived on the relay socket from `from`.
    pub fn handle_client_datagram<'a>(
        &mut self,
        from: SocketAddr,
        datagram: &'a [u8],
        now: Instant,
    ) -> ClientDatagram<'a> {
        let ip = from.ip().to_canonical();
        if ip != self.client_ip || self.client_port.is_some_and(|port| port != from.port()) {
            self.counts.dropped_foreign += 1;
            return ClientDatagram::Drop(DropReason::ForeignSource);
        }
        match decode_udp_datagram(datagram) {
            Ok(datagram) => {
                self.client_port = Some(from.port());
                self.last_activity = now;
                ClientDatagram::Forward(datagram)
            }
            Err(ProtocolError::Fragmented(frag)) => {
                self.counts.dropped_fragments += 1;
                ClientDatagram::Drop(DropReason::Fragment(frag))
            }
            Err(error) => {
                self.counts.dropped_malformed += 1;
                ClientDatagram::Drop(DropReason::Malformed(error))
            }
        }
    }

    /// Records that a forwarded datagram went out to `to`: replies from `to` are accepted from
    /// now on.
    pub fn handle_sent(&mut self, to: SocketAddr, now: Instant) {
        self.counts.up += 1;
        let to = canonical(to);
        if let Some(seen) = self.destinations.get_mut(&to) {
            *seen = now;
            return;
        }
        if self.destinations.len() >= MAX_DESTINATIONS
            && let Some(oldest) = self
                .destinations
                .iter()
                .min_by_key(|(_, seen)| **seen)
                .map(|(addr, _)| *addr)
        {
            self.destinations.remove(&oldest);
        }
        self.destinations.insert(to, now);
    }

    /// Records that a forwarded datagram could not be sent (unresolvable, refused, send error).
    pub fn handle_send_failed(&mut self) {
        self.counts.dropped_egress += 1;
    }

    /// Handles a reply from `from`: the client address to send it to (with a §7 header naming
    /// `from`), or `None` to drop it (unsolicited, or the client has not sent anything yet).
    pub fn handle_reply(&mut self, from: SocketAddr, now: Instant) -> Option<SocketAddr> {
        let client = self.client();
        match self.destinations.get_mut(&canonical(from)) {
            Some(seen) if client.is_some() => {
                *seen = now;
                self.last_activity = now;
                self.counts.down += 1;
                client
            }
            _ => {
                self.counts.dropped_unsolicited += 1;
                None
            }
        }
    }

    /// When the association expires unless a datagram passes before.
    pub fn poll_timeout(&self) -> Instant {
        self.last_activity + self.idle_timeout
    }

    /// Whether the association has been idle for its whole idle timeout at `now`.
    pub fn is_expired(&self, now: Instant) -> bool {
        now >= self.poll_timeout()
    }

    /// Datagram counts so far.
    pub fn counts(&self) -> AssociationCounts {
        self.counts
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::socks5::proto::encode_udp_header;
    use proptest::prelude::*;

    const IDLE: Duration = Duration::from_secs(60);

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn datagram(target: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_udp_header(&TargetAddr::Ip(addr(target)), &mut out);
        out.extend_from_slice(payload);
        out
    }

    fn unspecified() -> TargetAddr {
        TargetAddr::Ip(addr("0.0.0.0:0"))
    }

    #[test]
    fn first_datagram_fixes_the_client_port() {
        let now = Instant::now();
        let mut a = Association::new(addr("127.0.0.1:5000"), &unspecified(), IDLE, now);
        assert_eq!(a.client(), None);
        let d = datagram("100.64.0.2:53", b"q");
        let ClientDatagram::Forward(fwd) =
            a.handle_client_datagram(addr("127.0.0.1:6000"), &d, now)
        else {
            panic!("expected forward")
        };
        assert_eq!(fwd.target, TargetAddr::Ip(addr("100.64.0.2:53")));
        assert_eq!(fwd.payload, b"q");
        assert_eq!(a.client(), Some(addr("127.0.0.1:6000")));
        // Another port of the same host, and another host, are now foreign.
        for from in ["127.0.0.1:6001", "127.0.0.2:6000", "10.0.0.1:6000"] {
            assert_eq!(
                a.handle_client_datagram(addr(from), &d, now),
                ClientDatagram::Drop(DropReason::ForeignSource),
                "{from}"
            );
        }
        assert_eq!(a.counts().dropped_foreign, 3);
    }

    #[test]
    fn only_the_control_connection_ip_is_accepted_before_the_first_datagram() {
        let now = Instant::now();
        let mut a = Association::new(addr("192.0.2.7:5000"), &unspecified(), IDLE, now);
        let d = datagram("100.64.0.2:53", b"q");
        assert_eq!(
            a.handle_client_datagram(addr("192.0.2.8:6000"), &d, now),
            ClientDatagram::Drop(DropReason::ForeignSource)
        );
        assert_eq!(a.client(), None, "a foreign datagram must not fix the port");
        // IPv4-mapped IPv6 is the same client.
        assert!(matches!(
            a.handle_client_datagram(addr("[::ffff:192.0.2.7]:6000"), &d, now),
            ClientDatagram::Forward(_)
        ));
        assert_eq!(a.client(), Some(addr("192.0.2.7:6000")));
    }

    #[test]
    fn request_port_fixes_the_source_unless_the_request_names_another_ip() {
        let now = Instant::now();
        let d = datagram("100.64.0.2:53", b"q");
        for requested in [
            TargetAddr::Ip(addr("0.0.0.0:7000")),
            TargetAddr::Ip(addr("127.0.0.1:7000")),
            TargetAddr::Domain("0".into(), 7000), // PySocks sends ("0", port)
        ] {
            let mut a = Association::new(addr("127.0.0.1:5000"), &requested, IDLE, now);
            assert_eq!(a.client(), Some(addr("127.0.0.1:7000")), "{requested}");
            assert_eq!(
                a.handle_client_datagram(addr("127.0.0.1:7001"), &d, now),
                ClientDatagram::Drop(DropReason::ForeignSource)
            );
            assert!(matches!(
                a.handle_client_datagram(addr("127.0.0.1:7000"), &d, now),
                ClientDatagram::Forward(_)
            ));
        }
        // Behind a NAT: the request names the client's private address; learn the port instead.
        let mut a = Association::new(
            addr("203.0.113.5:5000"),
            &TargetAddr::Ip(addr("192.168.1.5:7000")),
            IDLE,
            now,
        );
        assert_eq!(a.client(), None);
        assert!(matches!(
            a.handle_client_datagram(addr("203.0.113.5:40000"), &d, now),
            ClientDatagram::Forward(_)
        ));
    }

    #[test]
    fn fragments_and_garbage_are_dropped_and_counted_without_fixing_the_port() {
        let now = Instant::now();
        let mut a = Association::new(addr("127.0.0.1:5000"), &unspecified(), IDLE, now);
        let mut frag = datagram("100.64.0.2:53", b"q");
        frag[2] = 1;
        assert_eq!(
            a.handle_client_datagram(addr("127.0.0.1:6000"), &frag, now),
            ClientDatagram::Drop(DropReason::Fragment(1))
        );
        assert_eq!(
            a.handle_client_datagram(addr("127.0.0.1:6000"), &[0, 0], now),
            ClientDatagram::Drop(DropReason::Malformed(ProtocolError::Truncated))
        );
        assert_eq!(a.client(), None);
        let counts = a.counts();
        assert_eq!((counts.dropped_fragments, counts.dropped_malformed), (1, 1));
        // A good datagram from another port of the same host still works afterwards.
        let d = datagram("100.64.0.2:53", b"q");
        assert!(matches!(
            a.handle_client_datagram(addr("127.0.0.1:6001"), &d, now),
            ClientDatagram::Forward(_)
        ));
    }

    #[test]
    fn replies_only_from_contacted_endpoints() {
        let now = Instant::now();
        let mut a = Association::new(addr("127.0.0.1:5000"), &unspecified(), IDLE, now);
        let peer = addr("100.64.0.2:53");
        // Nothing sent yet: no client to answer, and nobody was contacted.
        assert_eq!(a.handle_reply(peer, now), None);
        let d = datagram("100.64.0.2:53", b"q");
        let _ = a.handle_client_datagram(addr("127.0.0.1:6000"), &d, now);
        a.handle_sent(peer, now);
        assert_eq!(a.handle_reply(peer, now), Some(addr("127.0.0.1:6000")));
        assert_eq!(a.handle_reply(addr("100.64.0.2:54"), now), None);
        assert_eq!(a.handle_reply(addr("100.64.0.3:53"), now), None);
        let counts = a.counts();
        assert_eq!(
            (counts.up, counts.down, counts.dropped_unsolicited),
            (1, 1, 3)
        );
    }

    #[test]
    fn destination_memory_is_bounded_and_forgets_the_least_recently_used() {
        let start = Instant::now();
        let mut a = Association::new(addr("127.0.0.1:5000"), &unspecified(), IDLE, start);
        let d = datagram("100.64.0.2:53", b"q");
        let _ = a.handle_client_datagram(addr("127.0.0.1:6000"), &d, start);
        let dest = |i: usize| SocketAddr::new(addr("100.64.0.2:1").ip(), 1000 + i as u16);
        for i in 0..MAX_DESTINATIONS {
            a.handle_sent(dest(i), start + Duration::from_millis(i as u64));
        }
        // Touch the oldest so that the second oldest is the one forgotten.
        let later = start + Duration::from_secs(1);
        assert!(a.handle_reply(dest(0), later).is_some());
        a.handle_sent(dest(MAX_DESTINATIONS), later);
        assert_eq!(a.destinations.len(), MAX_DESTINATIONS);
        assert!(a.handle_reply(dest(0), later).is_some());
        assert!(a.handle_reply(dest(1), later).is_none());
        assert!(a.handle_reply(dest(MAX_DESTINATIONS), later).is_some());
    }

    #[test]
    fn idle_deadline_moves_with_traffic_in_either_direction() {
        let start = Instant::now();
        let mut a = Association::new(addr("127.0.0.1:5000"), &unspecified(), IDLE, start);
        assert_eq!(a.poll_timeout(), start + IDLE);
        let t1 = start + Duration::from_secs(30);
        let d = datagram("100.64.0.2:53", b"q");
        let _ = a.handle_client_datagram(addr("127.0.0.1:6000"), &d, t1);
        a.handle_sent(addr("100.64.0.2:53"), t1);
        assert_eq!(a.poll_timeout(), t1 + IDLE);
        let t2 = t1 + Duration::from_secs(50);
        assert!(a.handle_reply(addr("100.64.0.2:53"), t2).is_some());
        assert_eq!(a.poll_timeout(), t2 + IDLE);
        // Dropped datagrams do not keep it alive.
        let _ = a.handle_client_datagram(addr("10.0.0.1:1"), &d, t2 + Duration::from_secs(59));
        assert!(!a.is_expired(t2 + Duration::from_secs(59)));
        assert!(a.is_expired(t2 + IDLE));
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic_and_foreign_ones_never_pass(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            port in any::<u16>(),
            foreign in any::<bool>(),
        ) {
            let now = Instant::now();
            let mut a = Association::new(addr("127.0.0.1:5000"), &unspecified(), IDLE, now);
            let from = if foreign {
                SocketAddr::new(addr("127.0.0.2:0").ip(), port)
            } else {
                SocketAddr::new(addr("127.0.0.1:0").ip(), port)
            };
            let verdict = a.handle_client_datagram(from, &bytes, now);
            if foreign {
                prop_assert_eq!(verdict, ClientDatagram::Drop(DropReason::ForeignSource));
            }
        }
    }
}
