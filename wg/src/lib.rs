//! The WireGuard side of tailnode: a sans-IO engine over boringtun, UDP
//! socket helpers, and the wg-quick configuration format.
//!
//! # Layout
//!
//! - [`engine`]: [`Engine`], a deterministic state machine holding every peer
//!   (one boringtun `Tunn` each), receiver-index demultiplexing, cryptokey
//!   routing (longest-prefix match, source check on every decrypted packet),
//!   a shared handshake rate limiter, persistent keepalives and per-peer
//!   statistics. It owns no socket and spawns nothing; the node's driver task
//!   feeds it datagrams, IP packets and timeouts and sends what it returns.
//! - [`udp`]: binding tuned, dual-stack UDP sockets for tokio and normalising
//!   IPv4-mapped endpoint addresses.
//! - [`config`]: parsing (and printing) wg-quick files.
//! - [`keys`]: private, public and preshared keys in wg's base64 form.
//! - `testing` (feature `testing`): in-memory networks of engines and
//!   hand-built IP packets, for this crate's tests and the integrator's.
//!
//! # Contract
//!
//! The engine never panics on network input: malformed, truncated, replayed,
//! misaddressed or spoofed datagrams are counted per [`DropReason`] and
//! dropped. Callers provide output buffers (see [`engine`] for the minimum
//! sizes; [`MAX_DATAGRAM`] always fits). Time comes in as `now`, except that
//! boringtun's own session timers read the monotonic clock, which is why
//! [`Engine::handle_timeout`] must be driven on the cadence that
//! [`Engine::poll_timeout`] asks for.

pub mod config;
pub mod engine;
pub mod keys;
mod routing;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod udp;

pub use config::{ConfigError, Endpoint, WgQuickConfig};
pub use engine::{
    DatagramOutcome, DropReason, Engine, EngineConfig, EngineStats, Event, MAX_DATAGRAM,
    PacketOutcome, PeerChange, PeerConfig, PeerError, PeerStats,
};
pub use keys::{KeyError, PresharedKey, PrivateKey, PublicKey};
pub use udp::bind_udp;
