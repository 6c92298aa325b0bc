//! The control plane of tailnode: the coordination protocol, the coordinator server and the
//! controller that keeps a node coordinated.
//!
//! A coordinator gives every node of a tailnet a stable identity (name, IPv4, IPv6 from the
//! tailnet's ranges), the current peer set, and every change to it. Nodes reach it over a
//! websocket (optionally TLS) and prove membership with the tailnet's auth key.
//!
//! # Layout
//!
//! - [`proto`]: the wire messages (JSON in websocket text frames), their limits and
//!   validation; `control/PROTOCOL.md` is the prose contract.
//! - [`coordinator`]: the server. [`coordinator::Registry`] is its sans-IO core (identities,
//!   sessions, pre-serialized [`coordinator::Frame`]s, on injected time); the server module
//!   drives it with tokio over any [`coordinator::ConnectionListener`] (TCP, or a simulated
//!   network's listener in tests); `state` is the JSON state file; `tls` the optional rustls
//!   front.
//! - [`controller`]: the client. [`controller::Controller`] runs the retry loop and the peer
//!   lifecycle ([`controller::PeerLifecycle`], sans-IO) and applies the peer set to a node
//!   through the [`controller::DataPlane`] trait; [`controller::WebSocketTransport`] opens
//!   sessions over streams from a [`controller::Connector`] (TCP by default).
//!
//! # Contract
//!
//! - Only cancellation ends a loop here: [`controller::Controller::run`] retries every dial
//!   and session error (timeouts included) forever with capped, jittered backoff; the
//!   coordinator's accept loop and sessions end only with its cancellation token.
//! - A blackholed session is noticed within a few ping intervals; peers of a node that lost
//!   coordination stay in its data plane as `lost`, expire after the lost-peer timeout
//!   without a WireGuard handshake, and are rebuilt when the coordinator's next snapshot
//!   lists them.
//! - Time is tokio's clock everywhere, so a paused runtime drives both ends in tests.
//! - Errors are typed (`thiserror`); nothing here prints or exits.

pub mod controller;
pub mod coordinator;
pub mod proto;
