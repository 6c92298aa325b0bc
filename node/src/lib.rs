//! tailnode: a userspace tailnet node, as a library.
//!
//! A node joins a WireGuard network without a TUN device and without privileges: a smoltcp
//! TCP/IP stack inside the process ([`tailnode_netstack`]) terminates the tailnet's traffic, a
//! boringtun-based engine ([`tailnode_wg`]) turns it into WireGuard datagrams on an ordinary UDP
//! socket, and a controller ([`tailnode_control`]) keeps the peer set in sync with a
//! coordinator. Local programs reach the tailnet through a SOCKS5 or HTTP proxy and port
//! forwards; tailnet peers reach local services through exposed ports. The `tailnode` binary is
//! a thin front end over this crate; a program embeds a node the same way, with no command line.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tailnode::{Config, Tailnode};
//! use tokio_util::sync::CancellationToken;
//!
//! let mut config = Config::embedded(); // no SOCKS5 listener, no local API
//! config.coordinator = Some("wss://coord.example".parse()?);
//! config.auth_key = Some(std::env::var("TAILNODE_AUTH_KEY")?);
//! config.name = Some("billing-worker".into());
//! let node = Tailnode::start(config, CancellationToken::new()).await?;
//! let (stream, _) = node.dialer().dial(&"db:5432".parse()?).await?; // a peer, by name
//! # drop(stream);
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Two nodes in one process, WireGuard over loopback UDP, bytes fetched from one to the other:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use tailnode::{Config, StaticPeer, Tailnode};
//! use tailnode_wg::PrivateKey;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tokio_util::sync::CancellationToken;
//!
//! let cancel = CancellationToken::new();
//! let (key_a, key_b) = (PrivateKey::generate(), PrivateKey::generate());
//!
//! // b: 100.64.0.2, knows a by key; a's endpoint is learnt from a's first packet.
//! let mut b = Config::embedded();
//! b.private_key = Some(key_b.clone());
//! b.addresses = vec!["100.64.0.2".parse()?];
//! b.peers = vec![StaticPeer {
//!     public_key: key_a.public_key(),
//!     preshared_key: None,
//!     allowed_ips: vec!["100.64.0.1/32".parse()?],
//!     endpoint: None,
//!     persistent_keepalive: None,
//! }];
//! let b = Tailnode::start(b, cancel.clone()).await?;
//! let port_b = b.handle().udp_addr().port();
//!
//! // a: 100.64.0.1, sends to b on loopback.
//! let mut a = Config::embedded();
//! a.private_key = Some(key_a);
//! a.addresses = vec!["100.64.0.1".parse()?];
//! a.peers = vec![StaticPeer {
//!     public_key: key_b.public_key(),
//!     preshared_key: None,
//!     allowed_ips: vec!["100.64.0.2/32".parse()?],
//!     endpoint: Some(format!("127.0.0.1:{port_b}").parse()?),
//!     persistent_keepalive: None,
//! }];
//! let a = Tailnode::start(a, cancel.clone()).await?;
//!
//! // b serves a greeting on its tailnet port 80; a fetches it through the tunnel.
//! let listener = b.listen(80)?;
//! let server = tokio::spawn(async move {
//!     let (mut conn, _peer) = listener.accept().await?;
//!     conn.write_all(b"hello from b").await?;
//!     conn.shutdown().await
//! });
//! let (mut stream, _local) = a.dialer().dial(&"100.64.0.2:80".parse()?).await?;
//! let mut greeting = Vec::new();
//! stream.read_to_end(&mut greeting).await?;
//! assert_eq!(greeting, b"hello from b");
//! server.await??;
//!
//! a.shutdown().await;
//! b.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`config`]: [`Config`], every setting of `tailnode up` as plain data (serde, defaults),
//!   and its validation.
//! - [`running`]: [`Tailnode::start`] wires everything below together; the [`Tailnode`] handle
//!   gives status, the dialer, peer changes and shutdown.
//! - [`node`]: the data plane — the WireGuard engine, the netstack and the datagram socket
//!   driven by one packet task — and the [`node::NodeHandle`] that changes peers while it runs.
//!   The socket is a [`DatagramIo`]: the host's UDP socket, or a simulated one
//!   ([`Tailnode::start_with`]).
//! - [`dial`]: one vocabulary for reaching destinations ([`dial::TargetAddr`],
//!   [`dial::Dialer`], [`dial::DialError`]) and one routing policy for TCP and UDP; the node's
//!   [`dial::TailnetDialer`].
//! - `accept` (private): the one accept loop of every listener (proxies, forwards, exposure, API,
//!   metrics): connection limit, backoff on errors, tracked tasks, drain on cancellation.
//! - [`socks5`] and [`http_proxy`]: the local proxies, generic over a [`dial::Dialer`].
//! - [`forward`], [`udp_forward`] and [`expose`]: local → tailnet TCP and UDP forwards,
//!   tailnet → local exposure.
//! - [`relay`] and [`stream`]: the byte relay and the stream type every proxy path shares.
//! - [`coordinated`]: the node as the controller's data plane (coordinated peers, assigned
//!   addresses, endpoint candidates); [`identity`] keeps the key on disk; [`endpoints`] finds
//!   the node's UDP endpoints.
//! - [`status`]: the [`status::Status`] document; [`api`]: the local API that serves it
//!   (server and client);
//!   [`ping`]: ICMP echo from the node's netstack, served through the API; [`metrics`]: the
//!   Prometheus endpoint.
//! - `testing` (feature `testing`): the simulated network (`testing::sim`) on which whole
//!   nodes and a coordinator run in one process on tokio's paused clock.
//!
//! # Contract
//!
//! - Only cancellation stops a node: no error of the control plane, a listener or a client
//!   ends the node or a retry loop (see [`tailnode_control`]).
//! - Every input from outside (datagrams, proxy requests, control messages, files) is checked;
//!   a bad one is answered or dropped and counted, and affects nobody else.
//! - Nothing here prints to the terminal or parses a command line: errors are typed
//!   ([`StartError`], [`ConfigError`], [`dial::DialError`], ...), logs go through `tracing`.

mod accept;
pub mod api;
pub mod config;
pub mod coordinated;
pub mod dial;
pub mod endpoints;
pub mod expose;
pub mod forward;
pub mod http_proxy;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod ping;
pub mod relay;
pub mod running;
pub mod socks5;
pub mod status;
pub mod stream;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod udp_forward;

pub use config::{Config, ConfigError, ListenAddr, StaticPeer};
pub use coordinated::PeerChange;
pub use node::DatagramIo;
pub use running::{StartError, Tailnode};
