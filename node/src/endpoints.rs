//! The node's UDP endpoints as others may reach them: its WireGuard port on
//! every usable address of the host's interfaces. Reported to the
//! coordinator, which adds the address it saw the node connect from.

use std::net::{IpAddr, SocketAddr};

/// The WireGuard port on each non-loopback, non-link-local interface
/// address (IPv4 first). An unreadable interface list gives no endpoints:
/// the coordinator's observed address still works.
pub fn local_endpoints(udp_port: u16, ipv6: bool) -> Vec<SocketAddr> {
    let Ok(interfaces) = if_addrs::get_if_addrs() else {
        return Vec::new();
    };
    let mut out: Vec<SocketAddr> = interfaces
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| usable(ip) && (ipv6 || ip.is_ipv4()))
        .map(|ip| SocketAddr::new(ip, udp_port))
        .collect();
    out.sort_by_key(|a| (a.is_ipv6(), *a));
    out.dedup();
    out
}

fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback()
                && !v6.is_unspecified()
                && !v6.is_unicast_link_local()
                && !v6.is_multicast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_carry_the_port_and_skip_loopback() {
        for ep in local_endpoints(41641, true) {
            assert_eq!(ep.port(), 41641);
            assert!(!ep.ip().is_loopback());
        }
        assert!(local_endpoints(1, false).iter().all(SocketAddr::is_ipv4));
    }
}
