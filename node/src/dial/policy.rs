//! The routing policy of every proxy path, TCP and UDP alike: a destination address goes through
//! the tunnel when it is one of this node's addresses or a peer's allowed IPs cover it, from the
//! host network when direct egress is allowed, and nowhere otherwise.

use super::DialError;
use crate::node::Route;

/// What to do with destinations outside the tailnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectPolicy {
    /// Connect them from the host network.
    Allow,
    /// Refuse them (SOCKS5 reply "connection not allowed by ruleset").
    Refuse,
}

/// How a destination is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Through the node's netstack and the WireGuard tunnel.
    Tailnet,
    /// From the host network.
    Host,
}

/// Decides how to reach an address the node routes as `route`.
///
/// # Errors
/// [`DialError::HostUnreachable`] for a peer without endpoint (nothing could be sent), and
/// [`DialError::NotAllowed`] for a destination outside the tailnet without direct egress.
pub fn decide(route: Route, direct: DirectPolicy) -> Result<Via, DialError> {
    match route {
        Route::Peer {
            has_endpoint: false,
            ..
        } => Err(DialError::HostUnreachable),
        Route::Peer { .. } | Route::Local => Ok(Via::Tailnet),
        Route::None => match direct {
            DirectPolicy::Allow => Ok(Via::Host),
            DirectPolicy::Refuse => Err(DialError::NotAllowed),
        },
    }
}

#[cfg(test)]
mod tests {
    use tailnode_wg::PrivateKey;

    use super::*;

    #[test]
    fn tailnet_first_then_the_direct_policy() {
        let peer = PrivateKey::generate().public_key();
        for direct in [DirectPolicy::Allow, DirectPolicy::Refuse] {
            assert_eq!(decide(Route::Local, direct), Ok(Via::Tailnet));
            let reachable = Route::Peer {
                peer,
                has_endpoint: true,
            };
            assert_eq!(decide(reachable, direct), Ok(Via::Tailnet));
            let silent = Route::Peer {
                peer,
                has_endpoint: false,
            };
            assert_eq!(decide(silent, direct), Err(DialError::HostUnreachable));
        }
        assert_eq!(decide(Route::None, DirectPolicy::Allow), Ok(Via::Host));
        assert_eq!(
            decide(Route::None, DirectPolicy::Refuse),
            Err(DialError::NotAllowed)
        );
    }
}
