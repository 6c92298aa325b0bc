//! The controller: the client side of the control plane. It keeps this node
//! coordinated with the coordinator and applies the tailnet's peer set to the
//! node's data plane.
//!
//! # Layout
//!
//! - [`url`]: [`CoordinatorUrl`], the coordinator's address.
//! - [`backoff`]: [`Backoff`], the sans-IO retry schedule (exponential,
//!   jittered, capped).
//! - [`peers`]: [`PeerLifecycle`], the sans-IO peer table (connected / lost /
//!   expired / disconnected) and name directory, on injected time.
//! - [`transport`]: the [`Transport`] / [`Session`] traits and the real
//!   [`WebSocketTransport`] (TCP, rustls, tokio-tungstenite).
//! - [`driver`]: [`Controller`], the retry loop and the lifecycle timers,
//!   talking to the node through the [`DataPlane`] trait.
//!
//! # Contract
//!
//! - [`Controller::run`] returns only after its cancellation token is
//!   cancelled. No error value — dial timeout, refused connection, DNS, TLS,
//!   HTTP status, websocket or protocol error, the coordinator's `error`
//!   reply (even `bad_auth_key`) — ends the retry loop; each is logged once,
//!   recorded in [`ControlStatus`], and retried after a backoff.
//! - When our session breaks, peers stay in the data plane as lost; those
//!   without a WireGuard handshake for the lost-peer timeout (15 min by
//!   default) are removed, and rebuilt with a fresh session when the next
//!   snapshot lists them. Peers unchanged across a reconnect are not touched.
//! - On cancellation with an open session, `run` says `goodbye` (bounded by
//!   [`GOODBYE_TIMEOUT`]) so peers drop this node at once.

pub mod backoff;
pub mod driver;
pub mod peers;
pub mod transport;
pub mod url;

pub use backoff::Backoff;
pub use driver::{
    ConnectionState, ControlStatus, Controller, ControllerConfig, DEFAULT_DIAL_TIMEOUT,
    DEFAULT_PING_INTERVAL, DEFAULT_RETRY_INITIAL_BACKOFF, DEFAULT_RETRY_MAX_BACKOFF, DataPlane,
    GOODBYE_TIMEOUT, LastError, PeerDirectory, SelfInfo,
};
pub use peers::{
    DEFAULT_LOST_PEER_TIMEOUT, PeerAction, PeerCounts, PeerEntry, PeerLifecycle, PeerState,
    RemoveReason, SelfAddresses,
};
pub use transport::{
    Connector, DialError, Incoming, Session, SessionError, TcpConnector, TlsSetupError, Transport,
    WebSocketSession, WebSocketTransport,
};
pub use url::{CoordinatorUrl, UrlError};
