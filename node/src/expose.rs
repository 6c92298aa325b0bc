//! Exposure: TCP connections from the tailnet to this node's address on an
//! exposed port are carried to a local service. SYNs to any other port are
//! answered with a reset by the netstack.
//!
//! Written `--expose PORT` (to 127.0.0.1:PORT) or `--expose PORT=HOST:PORT`.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use tailnode_netstack::{TcpListener as TailnetListener, TcpStream as TailnetStream};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::accept::{AcceptLimits, accept_clients};
use crate::relay::relay;

/// One `--expose` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposeSpec {
    /// Port on the node's tailnet addresses.
    pub port: u16,
    /// Local host (name or address) to connect to.
    pub host: String,
    /// Local port to connect to.
    pub target_port: u16,
}

/// An `--expose` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid expose {spec:?}: {reason} (expected PORT or PORT=HOST:PORT)")]
pub struct ExposeSpecError {
    spec: String,
    reason: &'static str,
}

impl FromStr for ExposeSpec {
    type Err = ExposeSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ExposeSpecError {
            spec: s.to_string(),
            reason,
        };
        let parse_port = |p: &str| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(err("port must be 1-65535")),
            Ok(p) => Ok(p),
        };
        match s.split_once('=') {
            None => {
                let port = parse_port(s)?;
                Ok(Self {
                    port,
                    host: "127.0.0.1".to_string(),
                    target_port: port,
                })
            }
            Some((port, target)) => {
                let port = parse_port(port)?;
                let (host, target_port) = target
                    .rsplit_once(':')
                    .ok_or_else(|| err("target must be HOST:PORT"))?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                if host.is_empty() {
                    return Err(err("empty host"));
                }
                Ok(Self {
                    port,
                    host: host.to_string(),
                    target_port: parse_port(target_port)?,
                })
            }
        }
    }
}

impl fmt::Display for ExposeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}=[{}]:{}", self.port, self.host, self.target_port)
        } else {
            write!(f, "{}={}:{}", self.port, self.host, self.target_port)
        }
    }
}

/// Connections one exposed port serves at once; further ones are closed on accept.
pub const MAX_EXPOSED_CONNECTIONS: usize = 1024;

/// Serves an exposed port until `cancel` fires: each connection accepted on
/// the tailnet is relayed to the local target; when the target refuses, the
/// tailnet side gets a reset. Returns when every relay has ended.
pub async fn serve_exposure(
    listener: TailnetListener,
    spec: ExposeSpec,
    connect_timeout: Duration,
    cancel: CancellationToken,
) {
    let kind = format!("exposed port {spec}");
    let limits = AcceptLimits {
        kind: &kind,
        max_connections: MAX_EXPOSED_CONNECTIONS,
        connections: None,
    };
    accept_clients(listener, &cancel, limits, |inbound, peer, token| {
        expose_one(inbound, peer, spec.clone(), connect_timeout, token)
    })
    .await;
}

/// Relays one tailnet connection to a new connection to the local target.
async fn expose_one(
    mut inbound: TailnetStream,
    peer: SocketAddr,
    spec: ExposeSpec,
    connect_timeout: Duration,
    cancel: CancellationToken,
) {
    let target = (spec.host.as_str(), spec.target_port);
    let connect = tokio::time::timeout(connect_timeout, TcpStream::connect(target));
    let mut local = tokio::select! {
        () = cancel.cancelled() => return,
        connected = connect => match connected {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                info!(%peer, port = spec.port, target = %spec, error = %e, "expose: local connect failed");
                inbound.abort();
                return;
            }
            Err(_) => {
                info!(%peer, port = spec.port, target = %spec, "expose: local connect timed out");
                inbound.abort();
                return;
            }
        },
    };
    let _ = local.set_nodelay(true);
    debug!(%peer, port = spec.port, "expose: connected");
    tokio::select! {
        () = cancel.cancelled() => {}
        r = relay(&mut inbound, &mut local) => match r {
            Ok((down, up)) => debug!(%peer, port = spec.port, down, up, "expose: closed"),
            Err(e) => {
                debug!(%peer, port = spec.port, error = %e, "expose: relay ended with an error");
                inbound.abort();
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_expose_specs() {
        let e: ExposeSpec = "8080".parse().expect("valid");
        assert_eq!(
            (e.port, e.host.as_str(), e.target_port),
            (8080, "127.0.0.1", 8080)
        );
        let e: ExposeSpec = "80=localhost:8000".parse().expect("valid");
        assert_eq!(
            (e.port, e.host.as_str(), e.target_port),
            (80, "localhost", 8000)
        );
        let e: ExposeSpec = "22=[::1]:2222".parse().expect("valid");
        assert_eq!((e.port, e.host.as_str(), e.target_port), (22, "::1", 2222));
        assert_eq!(e.to_string(), "22=[::1]:2222");
    }

    #[test]
    fn rejects_bad_expose_specs() {
        for bad in [
            "",
            "0",
            "70000",
            "80=",
            "80=host",
            "80=:90",
            "x=host:1",
            "80=host:0",
        ] {
            assert!(
                bad.parse::<ExposeSpec>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}
