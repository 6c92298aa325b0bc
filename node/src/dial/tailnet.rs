//! [`TailnetDialer`]: the node's dialer. Peer names resolve through the coordinated directory
//! (`name` and `name.<tailnet domain>`), other names through the host's DNS only with direct
//! egress; addresses follow the [routing policy](super::policy).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tailnode_control::controller::PeerDirectory;
use tokio::net::TcpStream as HostStream;
use tracing::debug;

use super::policy::{DirectPolicy, Via, decide};
use super::{DialError, Dialer, TargetAddr};
use crate::node::NodeHandle;
use crate::stream::ProxyStream;

/// Opens proxy connections for a node.
#[derive(Clone)]
pub struct TailnetDialer {
    pub(super) node: NodeHandle,
    pub(super) direct: DirectPolicy,
    connect_timeout: Duration,
    names: Option<PeerDirectory>,
}

impl TailnetDialer {
    /// A dialer for `node`.
    pub fn new(node: NodeHandle, direct: DirectPolicy, connect_timeout: Duration) -> Self {
        Self {
            node,
            direct,
            connect_timeout,
            names: None,
        }
    }

    /// Resolves host names through the coordinated peer directory first
    /// (`name` and `name.<tailnet domain>`).
    pub fn with_names(mut self, names: PeerDirectory) -> Self {
        self.names = Some(names);
        self
    }

    /// Connects to `target`, resolving host names first; returns the stream and its local
    /// address.
    ///
    /// # Errors
    /// A [`DialError`] that says why, mapped by the proxies to their reply codes.
    pub async fn dial(&self, target: &TargetAddr) -> Result<(ProxyStream, SocketAddr), DialError> {
        match target {
            TargetAddr::Ip(addr) => self.dial_addr(*addr).await,
            TargetAddr::Domain(host, port) => {
                let addrs = self.resolve(host, *port).await?;
                let mut last = DialError::HostUnreachable;
                for addr in addrs {
                    match self.dial_addr(addr).await {
                        Ok(done) => return Ok(done),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    /// How `ip` is reached under the policy.
    ///
    /// # Errors
    /// As [`decide`]; [`DialError::NodeStopped`] when the node has stopped.
    pub async fn via(&self, ip: IpAddr) -> Result<Via, DialError> {
        decide(self.node.route(ip).await?, self.direct)
    }

    /// The addresses of a host name: a peer's (IPv4 first), or with direct egress the host's
    /// DNS answer.
    pub(super) async fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, DialError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Some(names) = &self.names {
            if let Some((v4, v6)) = names.resolve(host) {
                return Ok(vec![
                    SocketAddr::new(IpAddr::V4(v4), port),
                    SocketAddr::new(IpAddr::V6(v6), port),
                ]);
            }
            if names.with(|l| {
                l.self_addresses()
                    .is_some_and(|me| in_domain(host, &me.domain))
            }) {
                // A tailnet name we do not know: never ask the host's DNS.
                return Err(DialError::HostUnreachable);
            }
        }
        if self.direct == DirectPolicy::Refuse {
            // Without direct egress only tailnet names could be reached, and
            // the host's DNS must not learn what the tailnet is asked for.
            return Err(DialError::HostUnreachable);
        }
        let found =
            tokio::time::timeout(self.connect_timeout, tokio::net::lookup_host((host, port)))
                .await
                .map_err(|_| DialError::TimedOut)?
                .map_err(|e| {
                    debug!(%host, error = %e, "name resolution failed");
                    DialError::HostUnreachable
                })?;
        let addrs: Vec<SocketAddr> = found.collect();
        if addrs.is_empty() {
            Err(DialError::HostUnreachable)
        } else {
            Ok(addrs)
        }
    }

    async fn dial_addr(&self, addr: SocketAddr) -> Result<(ProxyStream, SocketAddr), DialError> {
        match self.via(addr.ip()).await? {
            Via::Tailnet => self.dial_tailnet(addr).await,
            Via::Host => self.dial_host(addr).await,
        }
    }

    async fn dial_tailnet(&self, addr: SocketAddr) -> Result<(ProxyStream, SocketAddr), DialError> {
        let stack = self.node.netstack();
        match tokio::time::timeout(self.connect_timeout, stack.connect(addr)).await {
            Err(_) => Err(DialError::TimedOut),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(stream)) => {
                let local = stream.local_addr();
                Ok((ProxyStream::Tailnet(stream), local))
            }
        }
    }

    async fn dial_host(&self, addr: SocketAddr) -> Result<(ProxyStream, SocketAddr), DialError> {
        match tokio::time::timeout(self.connect_timeout, HostStream::connect(addr)).await {
            Err(_) => Err(DialError::TimedOut),
            Ok(Err(e)) => Err(DialError::from_io(&e)),
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                let local = stream
                    .local_addr()
                    .unwrap_or_else(|_| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0));
                Ok((ProxyStream::Host(stream), local))
            }
        }
    }
}

/// Whether `host` is `domain` or a name under it (case-insensitive, trailing dot allowed).
fn in_domain(host: &str, domain: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_matches('.').to_ascii_lowercase();
    !domain.is_empty() && (host == domain || host.ends_with(&format!(".{domain}")))
}

impl Dialer for TailnetDialer {
    type Stream = ProxyStream;

    async fn connect(&self, target: &TargetAddr) -> Result<(ProxyStream, SocketAddr), DialError> {
        self.dial(target).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_the_tailnet_domain() {
        assert!(in_domain("web.tailnet.internal", "tailnet.internal"));
        assert!(in_domain("WEB.Tailnet.Internal.", "tailnet.internal"));
        assert!(in_domain("tailnet.internal", ".tailnet.internal."));
        assert!(!in_domain("web.example.com", "tailnet.internal"));
        assert!(!in_domain("evil-tailnet.internal", "tailnet.internal"));
        assert!(!in_domain("web", ""));
    }
}
