//! SOCKS5 proxy: RFC 1928 CONNECT and UDP ASSOCIATE with RFC 1929 username/password
//! authentication, dialing through a pluggable [`Dialer`] and [`UdpDialer`] (the node's tailnet
//! dialer, or the host's network).
//!
//! # Layout
//!
//! - [`proto`]: the wire formats, sans-IO. Stream decoders over byte slices return
//!   `Incomplete`, `Complete(msg, consumed)` or a [`ProtocolError`]; encoders append to a
//!   `Vec<u8>`. Includes the RFC 1928 §7 UDP datagram header for UDP ASSOCIATE.
//! - [`handshake`]: the server-side handshake (method selection, authentication, request) as a
//!   state machine that turns input bytes into [`Step`]s. No socket, no clock.
//! - [`association`]: one UDP association's filters (which client datagrams and which replies may
//!   pass), counters and idle deadline, sans-IO.
//! - `server`: the tokio driver. [`Socks5Server::serve`] accepts on a `TcpListener` and runs one
//!   task per client; the task reads into a bounded buffer under the handshake deadline, dials,
//!   replies and relays with `copy_bidirectional_with_sizes`.
//! - [`udp`]: the UDP capability traits ([`UdpDialer`], [`UdpEgress`]), the server's
//!   [`Socks5Counters`], and the driver of one UDP association.
//!
//! # Contract
//!
//! - A misbehaving client gets its error reply and a close, and affects nobody else. Error replies
//!   are followed by a FIN and a short bounded drain of the client's input, so that the reply is
//!   not lost to a TCP reset.
//! - Answers to bad input: greeting with VER != 5 or NMETHODS = 0, or without an acceptable method:
//!   `05 FF`. Bad RFC 1929 message or wrong credentials: `01 01`. Request with VER != 5: 0x01;
//!   unknown CMD: 0x07; BIND, and UDP ASSOCIATE on a server without [`Socks5Server::with_udp`]:
//!   0x07; unknown ATYP: 0x08; empty, over
//!   253 bytes, non-UTF-8 or control-character domain: 0x01. Dial failures map through
//!   [`DialError::reply_code`]; a dial exceeding the connect timeout is 0x06.
//! - Every failure reply carries BND = `0.0.0.0:0` (ATYP 1).
//! - Bytes a client pipelines after its request are forwarded to the target before the relay.
//! - The relay has backpressure (the client is read only as fast as the target accepts), propagates
//!   half-close both ways and ends when both directions are shut down or either side fails.
//! - Limits: a handshake deadline from accept to request; a connect timeout; at most
//!   `max_connections` clients at once, excess clients are accepted and closed immediately (an
//!   explicit, instant failure rather than a silent wait in the listen backlog).
//! - Shutdown: cancelling the token closes the listener, cancels every connection and
//!   [`Socks5Server::serve`] returns once all connection tasks are gone.
//! - Logs: one INFO line when a relay starts and one when a connection ends, with client and
//!   target; passwords are never logged.
//!
//!
//! # UDP ASSOCIATE (RFC 1928 §7)
//!
//! - The relay socket is bound on the IP the client reached the proxy on (port 0), and its address
//!   is the reply's BND.ADDR/BND.PORT. The egress ([`UdpDialer::open_udp`]) is opened before the
//!   reply, so that a failure is answered with its reply code.
//! - Client datagrams are accepted from the control connection's IP only, then from one port
//!   (see [`association`]); FRAG != 0 is dropped and counted; payloads above
//!   [`Socks5Config::udp_max_datagram`] are dropped and counted. Replies are accepted only from
//!   endpoints the client sent to and carry their source in the §7 header.
//! - The association ends when its control connection closes or fails, after
//!   [`Socks5Config::udp_idle_timeout`] without a datagram (the control connection is then
//!   closed), or on shutdown; its relay and egress sockets are released with it.
//! - At most [`Socks5Config::max_udp_associations`] at once; further requests get 0x01.
//! - Logs: INFO when an association opens and when it closes (with its counts), DEBUG per dropped
//!   datagram, TRACE per relayed datagram.

pub mod association;
mod config;
pub mod handshake;
pub mod proto;
mod server;
pub mod udp;

#[cfg(test)]
mod tests;

pub use config::Socks5Config;
pub use handshake::{Credentials, CredentialsError, Handshake, HandshakeError, Step};
pub use proto::{Command, ProtocolError, ReplyCode, TargetAddr};
pub use server::Socks5Server;
pub use udp::{Socks5Counters, Socks5Stats};

pub use crate::dial::{DialError, Dialer, NoUdp, UdpDialer, UdpEgress};
