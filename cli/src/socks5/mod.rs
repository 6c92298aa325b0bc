//! SOCKS5 proxy: RFC 1928 CONNECT with RFC 1929 username/password authentication, dialing through
//! a pluggable [`Dialer`] (the node's tailnet dialer, or the host's network).
//!
//! # Layout
//!
//! - [`proto`]: the wire formats, sans-IO. Stream decoders over byte slices return
//!   `Incomplete`, `Complete(msg, consumed)` or a [`ProtocolError`]; encoders append to a
//!   `Vec<u8>`. Includes the RFC 1928 §7 UDP datagram header for UDP ASSOCIATE.
//! - [`handshake`]: the server-side handshake (method selection, authentication, request) as a
//!   state machine that turns input bytes into [`Step`]s. No socket, no clock.
//! - `server`: the tokio driver. [`Socks5Server::serve`] accepts on a `TcpListener` and runs one
//!   task per client; the task reads into a bounded buffer under the handshake deadline, dials,
//!   replies and relays with `copy_bidirectional_with_sizes`.
//!
//! # Contract
//!
//! - A misbehaving client gets its error reply and a close, and affects nobody else. Error replies
//!   are followed by a FIN and a short bounded drain of the client's input, so that the reply is
//!   not lost to a TCP reset.
//! - Answers to bad input: greeting with VER != 5 or NMETHODS = 0, or without an acceptable method:
//!   `05 FF`. Bad RFC 1929 message or wrong credentials: `01 01`. Request with VER != 5: 0x01;
//!   unknown CMD: 0x07; BIND and (for now) UDP ASSOCIATE: 0x07; unknown ATYP: 0x08; empty, over
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
//! # Extending to UDP ASSOCIATE
//!
//! [`Command::UdpAssociate`] is already decoded; the driver answers it 0x07 in one match arm.
//! Supporting it means: a UDP dialing capability (a second trait or a method on [`Dialer`]), a
//! relay socket whose address goes in the reply, datagrams parsed with
//! [`proto::decode_udp_datagram`] (fragments dropped) and answered with
//! [`proto::encode_udp_header`], and the association torn down when the TCP connection closes.

pub mod handshake;
pub mod proto;
mod server;

#[cfg(test)]
mod tests;

pub use handshake::{Credentials, CredentialsError, Handshake, HandshakeError, Step};
pub use proto::{Command, ProtocolError, ReplyCode, TargetAddr};
pub use server::{DialError, Dialer, Socks5Config, Socks5Server};
