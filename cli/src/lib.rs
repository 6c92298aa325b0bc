//! tailnode: a userspace tailnet node.
//!
//! It joins a WireGuard network without a TUN device and without privileges:
//! a smoltcp TCP/IP stack inside the process ([`tailnode_netstack`])
//! terminates the tailnet's traffic, a boringtun-based engine
//! ([`tailnode_wg`]) turns it into WireGuard datagrams on an ordinary UDP
//! socket, and local programs reach the tailnet through a SOCKS5 proxy and
//! port forwards; tailnet peers reach local services through exposed ports.
//!
//! # Layout
//!
//! - [`node`]: the engine, the netstack and the UDP socket wired together by
//!   one packet task, and the [`node::NodeHandle`] that changes peers at run time.
//! - [`socks5`]: the SOCKS5 server (RFC 1928/1929), generic over a [`socks5::Dialer`].
//! - [`dialer`]: the node's dialer: tailnet, direct from the host, or refused.
//! - [`forward`] and [`expose`]: local → tailnet and tailnet → local TCP.
//! - [`udp_forward`]: local → tailnet UDP forwards, one tailnet socket per local client.
//! - [`relay`] and [`stream`]: the byte relay and stream type every proxy path shares.
//! - [`coordinated`]: the node as the controller's data plane (coordinated
//!   peers, assigned addresses, endpoint candidates); [`identity`] keeps the
//!   node's key on disk and [`endpoints`] finds its UDP endpoints.
//! - [`api`]: the local status API and the `tailnode status` client.
//! - [`ping`]: `tailnode ping`, ICMP echo from the node's netstack through the API.
//! - [`metrics`]: Prometheus metrics (`tailnode up --metrics`), computed at scrape time.
//! - [`up`], [`coordinator_cmd`] and [`demo`]: the `tailnode up`,
//!   `tailnode coordinator` and `tailnode demo` commands.

mod accept;
pub mod api;
pub mod config_file;
pub mod coordinated;
pub mod coordinator_cmd;
pub mod demo;
pub mod dialer;
pub mod endpoints;
pub mod expose;
pub mod forward;
pub mod http_proxy;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod ping;
pub mod relay;
pub mod socks5;
pub mod stream;
pub mod udp_forward;
pub mod up;
