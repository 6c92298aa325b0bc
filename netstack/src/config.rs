//! Netstack configuration and its validation.

use std::net::IpAddr;
use std::time::Duration;

use crate::NetstackError;

/// Largest receive buffer smoltcp supports (RFC 7323 limits the window to 2^30 bytes).
const MAX_TCP_RX_BUFFER: usize = 1 << 30;
/// Smallest IP MTU a host must support for IPv6 (RFC 8200 §5); IPv4 needs 576 (RFC 791).
const MIN_MTU: usize = 1280;

/// Settings of a [`crate::Netstack`].
///
/// Memory bound: every live TCP socket owns `tcp_rx_buffer + tcp_tx_buffer` bytes, allocated when
/// the socket is created (on `connect`, or when a SYN arrives for a listener), so TCP buffers use
/// at most `max_tcp_sockets * (tcp_rx_buffer + tcp_tx_buffer)` bytes (2 GiB with the defaults if
/// every socket is in use; pages never written are not resident). UDP sockets own
/// `2 * udp_buffer_bytes` each, bounded by `max_udp_sockets`.
#[derive(Debug, Clone)]
pub struct NetstackConfig {
    /// The node's tailnet addresses (IPv4 and/or IPv6), each installed as a /32 or /128 so every
    /// peer is off-link and reached through the device. May be empty and set later with
    /// [`crate::Netstack::set_addresses`].
    pub addresses: Vec<IpAddr>,
    /// IP MTU of the tunnel (default 1420, WireGuard's usual value). TCP MSS is derived from it.
    pub mtu: usize,
    /// Receive buffer per TCP socket in bytes (default 1 MiB); it bounds the advertised window.
    /// Window scaling is always offered, so windows above 64 KiB work.
    pub tcp_rx_buffer: usize,
    /// Transmit buffer per TCP socket in bytes (default 1 MiB).
    pub tcp_tx_buffer: usize,
    /// Bound on live TCP sockets: connecting, established, closing, and sockets created for
    /// listeners (handshakes in progress and connections not yet accepted). Default 1024.
    pub max_tcp_sockets: usize,
    /// Connections per listener that completed or are completing the handshake but were not yet
    /// taken by `accept()`. SYNs beyond it are dropped (the client retries), as Linux does when
    /// its accept queue is full. Default 128.
    pub listen_backlog: usize,
    /// Delayed-ACK timeout. `None` acknowledges at the end of every poll that received data,
    /// which batches ACKs per burst without delaying request/response traffic. Default `None`.
    pub tcp_ack_delay: Option<Duration>,
    /// TCP keep-alive interval, or `None` (default) for no keep-alives.
    pub tcp_keep_alive: Option<Duration>,
    /// Abort a TCP connection when the peer stays silent this long while we wait for it (unacked
    /// data, a SYN, or keep-alives). `None` (default) keeps retrying forever; callers then apply
    /// their own timeouts. Use together with `tcp_keep_alive` (shorter) to detect dead peers.
    pub tcp_timeout: Option<Duration>,
    /// How long a TCP socket whose handle was dropped may take to finish its graceful close
    /// (FIN exchange) before it is reset and reclaimed. Default 60 s (Linux `tcp_fin_timeout`).
    pub orphan_timeout: Duration,
    /// Datagrams each UDP socket can queue per direction (default 64).
    pub udp_buffer_packets: usize,
    /// Payload bytes each UDP socket can queue per direction (default 256 KiB).
    pub udp_buffer_bytes: usize,
    /// Bound on live UDP sockets (default 1024).
    pub max_udp_sockets: usize,
    /// Verify IP/TCP/UDP/ICMP checksums of inbound packets. Default `false`: packets reaching
    /// the netstack were authenticated by WireGuard, so the check only costs CPU. Outbound
    /// checksums are always computed.
    pub verify_checksums: bool,
    /// Seed for TCP initial sequence numbers and ephemeral ports. Default: random.
    pub seed: u64,
}

impl Default for NetstackConfig {
    fn default() -> Self {
        Self {
            addresses: Vec::new(),
            mtu: 1420,
            tcp_rx_buffer: 1 << 20,
            tcp_tx_buffer: 1 << 20,
            max_tcp_sockets: 1024,
            listen_backlog: 128,
            tcp_ack_delay: None,
            tcp_keep_alive: None,
            tcp_timeout: None,
            orphan_timeout: Duration::from_secs(60),
            udp_buffer_packets: 64,
            udp_buffer_bytes: 256 * 1024,
            max_udp_sockets: 1024,
            verify_checksums: false,
            seed: rand::random(),
        }
    }
}

impl NetstackConfig {
    /// A default configuration with the given addresses.
    pub fn with_addresses(addresses: Vec<IpAddr>) -> Self {
        Self {
            addresses,
            ..Self::default()
        }
    }

    /// Checks the configuration for values smoltcp cannot work with.
    pub(crate) fn validate(&self) -> Result<(), NetstackError> {
        let invalid = |reason: &'static str| Err(NetstackError::InvalidConfig(reason));
        if self.mtu < MIN_MTU || self.mtu > usize::from(u16::MAX) {
            return invalid("mtu must be between 1280 and 65535");
        }
        if self.tcp_rx_buffer == 0 || self.tcp_rx_buffer > MAX_TCP_RX_BUFFER {
            return invalid("tcp_rx_buffer must be between 1 byte and 1 GiB");
        }
        if self.tcp_tx_buffer == 0 {
            return invalid("tcp_tx_buffer must not be zero");
        }
        if self.max_tcp_sockets == 0 || self.listen_backlog == 0 {
            return invalid("max_tcp_sockets and listen_backlog must not be zero");
        }
        if self.udp_buffer_packets == 0 || self.udp_buffer_bytes < self.mtu {
            return invalid("UDP buffers must hold at least one MTU-sized datagram");
        }
        if self.tcp_keep_alive == Some(Duration::ZERO) || self.tcp_timeout == Some(Duration::ZERO) {
            return invalid("tcp_keep_alive and tcp_timeout must not be zero");
        }
        Ok(())
    }
}
