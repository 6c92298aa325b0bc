//! The settings of a [`Socks5Server`](super::Socks5Server), and how dial failures become
//! RFC 1928 reply codes.

use std::sync::Arc;
use std::time::Duration;

use super::handshake::Credentials;
use super::proto::ReplyCode;
use crate::dial::DialError;
use crate::node::ConnectionCounters;

impl DialError {
    /// The RFC 1928 §6 reply code for this failure.
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            Self::NotAllowed => ReplyCode::NotAllowed,
            Self::NetworkUnreachable => ReplyCode::NetworkUnreachable,
            Self::HostUnreachable => ReplyCode::HostUnreachable,
            Self::ConnectionRefused => ReplyCode::ConnectionRefused,
            Self::TimedOut => ReplyCode::TtlExpired,
            Self::AddressTypeNotSupported => ReplyCode::AddressTypeNotSupported,
            Self::NodeStopped | Self::NoSocket(_) | Self::InvalidDestination(_) | Self::Io(_) => {
                ReplyCode::GeneralFailure
            }
        }
    }
}

/// Settings of a [`Socks5Server`](super::Socks5Server).
#[derive(Debug, Clone)]
pub struct Socks5Config {
    /// Credentials clients must present (RFC 1929); `None` accepts clients without
    /// authentication.
    pub auth: Option<Credentials>,
    /// Time a client has, from accept, to complete the handshake up to its request. A client that
    /// sends nothing, or too little, is dropped when it expires.
    pub handshake_timeout: Duration,
    /// Time allowed for a dial before the client is answered 0x06 (TTL expired).
    pub connect_timeout: Duration,
    /// Maximum number of clients served at once (handshaking or relaying). Connections above it
    /// are accepted and closed at once, without a reply. 0 refuses everybody.
    pub max_connections: usize,
    /// Size of each of the two relay buffers of a connection.
    pub relay_buffer_size: usize,
    /// A UDP association with no datagram passing either way for this long is closed (with its
    /// control connection).
    pub udp_idle_timeout: Duration,
    /// Maximum number of UDP associations at once; further UDP ASSOCIATE requests are answered
    /// 0x01 (general failure). 0 refuses every association.
    pub max_udp_associations: usize,
    /// Largest UDP payload relayed either way; larger datagrams are dropped and counted. Each
    /// association holds two buffers of about this size.
    pub udp_max_datagram: usize,
    /// Counts served clients (open and total), for metrics.
    pub connections: Option<Arc<ConnectionCounters>>,
}

impl Default for Socks5Config {
    fn default() -> Self {
        Self {
            auth: None,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(30),
            max_connections: 1024,
            relay_buffer_size: 64 * 1024,
            udp_idle_timeout: Duration::from_secs(60),
            max_udp_associations: 256,
            udp_max_datagram: 65_535,
            connections: None,
        }
    }
}
