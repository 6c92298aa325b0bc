//! Port forwards: a local listener whose connections are carried to a fixed
//! tailnet address (what onetun does), written
//! `tcp:LOCAL_ADDR:PORT=TAILNET_ADDR:PORT`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::accept::{AcceptLimits, accept_clients};
use crate::node::NodeHandle;
use crate::relay::relay;

/// Transport of a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// TCP streams.
    Tcp,
    /// UDP datagrams.
    Udp,
}

/// One `--forward` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpec {
    /// Transport.
    pub protocol: Protocol,
    /// Where to listen locally.
    pub local: SocketAddr,
    /// Where to connect in the tailnet.
    pub remote: SocketAddr,
}

/// A `--forward` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid forward {spec:?}: {reason} (expected tcp:LOCAL_ADDR:PORT=TAILNET_ADDR:PORT)")]
pub struct ForwardSpecError {
    spec: String,
    reason: &'static str,
}

impl FromStr for ForwardSpec {
    type Err = ForwardSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ForwardSpecError {
            spec: s.to_string(),
            reason,
        };
        let (protocol, rest) = match s.split_once(':') {
            Some(("tcp", rest)) => (Protocol::Tcp, rest),
            Some(("udp", rest)) => (Protocol::Udp, rest),
            _ => return Err(err("must start with tcp: or udp:")),
        };
        let (local, remote) = rest.split_once('=').ok_or_else(|| err("missing '='"))?;
        let local = parse_local(local).ok_or_else(|| err("bad local address"))?;
        let remote: SocketAddr = remote
            .parse()
            .map_err(|_| err("tailnet side must be IP:PORT or [IPv6]:PORT"))?;
        if remote.port() == 0 {
            return Err(err("tailnet port must not be 0"));
        }
        Ok(Self {
            protocol,
            local,
            remote,
        })
    }
}

/// `127.0.0.1:8080`, `[::1]:8080` or a bare `8080` (loopback).
fn parse_local(text: &str) -> Option<SocketAddr> {
    if let Ok(port) = text.parse::<u16>() {
        return Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    text.parse().ok()
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        write!(f, "{proto}:{}={}", self.local, self.remote)
    }
}

/// Clients one TCP forward serves at once; further clients are closed on accept.
pub const MAX_FORWARD_CONNECTIONS: usize = 1024;

/// Serves a TCP forward on `listener` until `cancel` fires: every accepted
/// connection gets its own tailnet connection to `remote` and a relay task.
/// Returns when every relay has ended.
pub async fn serve_tcp_forward(
    listener: TcpListener,
    remote: SocketAddr,
    node: NodeHandle,
    connect_timeout: Duration,
    cancel: CancellationToken,
) {
    let kind = match listener.local_addr() {
        Ok(local) => format!("forward {local}={remote}"),
        Err(_) => format!("forward to {remote}"),
    };
    let limits = AcceptLimits {
        kind: &kind,
        max_connections: MAX_FORWARD_CONNECTIONS,
        connections: None,
    };
    accept_clients(listener, &cancel, limits, |client, peer, token| {
        forward_one(client, peer, remote, node.clone(), connect_timeout, token)
    })
    .await;
}

/// Relays one accepted client to a new tailnet connection to `remote`.
async fn forward_one(
    mut client: TcpStream,
    peer: SocketAddr,
    remote: SocketAddr,
    node: NodeHandle,
    connect_timeout: Duration,
    cancel: CancellationToken,
) {
    let connect = node.netstack().connect(remote);
    let mut upstream = tokio::select! {
        () = cancel.cancelled() => return,
        connected = tokio::time::timeout(connect_timeout, connect) => match connected {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                info!(%peer, %remote, error = %e, "forward: tailnet connect failed");
                let _ = client.set_zero_linger();
                return;
            }
            Err(_) => {
                info!(%peer, %remote, "forward: tailnet connect timed out");
                let _ = client.set_zero_linger();
                return;
            }
        },
    };
    debug!(%peer, %remote, "forward: connected");
    tokio::select! {
        () = cancel.cancelled() => {}
        r = relay(&mut client, &mut upstream) => match r {
            Ok((up, down)) => debug!(%peer, %remote, up, down, "forward: closed"),
            Err(e) => {
                debug!(%peer, %remote, error = %e, "forward: relay ended with an error");
                upstream.abort();
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forward_specs() {
        let f: ForwardSpec = "tcp:127.0.0.1:8080=100.64.0.2:80".parse().expect("valid");
        assert_eq!(f.protocol, Protocol::Tcp);
        assert_eq!(f.local, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(f.remote, "100.64.0.2:80".parse().expect("addr"));
        let f: ForwardSpec = "udp:[::1]:53=[fd7a:115c:a1e0::2]:53"
            .parse()
            .expect("valid");
        assert_eq!(f.protocol, Protocol::Udp);
        assert_eq!(f.to_string(), "udp:[::1]:53=[fd7a:115c:a1e0::2]:53");
        let f: ForwardSpec = "tcp:9000=100.64.0.2:22".parse().expect("valid");
        assert_eq!(f.local, "127.0.0.1:9000".parse().expect("addr"));
    }

    #[test]
    fn rejects_bad_forward_specs() {
        for bad in [
            "",
            "sctp:1=100.64.0.2:1",
            "tcp:127.0.0.1:8080",
            "tcp:127.0.0.1:8080=100.64.0.2",
            "tcp:nowhere=100.64.0.2:80",
            "tcp:8080=100.64.0.2:0",
            "tcp:8080=peer:80",
        ] {
            assert!(
                bad.parse::<ForwardSpec>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}
