//! Cryptokey routing: longest-prefix match over every peer's AllowedIPs.
//!
//! WireGuard (whitepaper §2, "Cryptokey Routing") associates each peer with a
//! set of IP prefixes. Outgoing packets go to the peer whose prefix is the
//! most specific match for the destination; incoming packets are accepted only
//! when their *source* routes back to the peer that sent them.
//!
//! The table keeps one hash map per prefix length and the list of lengths in
//! use, longest first. A lookup masks the address once per length in use and
//! stops at the first hit, so its cost is a handful of hash probes however
//! many peers there are (a tailnet typically uses just /32 and /128, plus
//! perhaps a /0 or a subnet route). Inserting an identical prefix replaces its
//! owner, as `wg set` does.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// A longest-prefix-match table from IP prefixes to values (peer slots).
#[derive(Debug, Clone)]
pub(crate) struct RoutingTable<V> {
    v4: PrefixTable<V>,
    v6: PrefixTable<V>,
}

impl<V: Copy + PartialEq> RoutingTable<V> {
    /// An empty table.
    pub(crate) fn new() -> Self {
        Self {
            v4: PrefixTable::new(32),
            v6: PrefixTable::new(128),
        }
    }

    /// Routes `net` (host bits ignored) to `value`; returns the previous owner
    /// of exactly this prefix, if any.
    pub(crate) fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        let (table, addr) = self.table_mut(net.addr());
        table.insert(addr, net.prefix_len(), value)
    }

    /// Removes `net` if it is currently routed to `value`; returns whether it was.
    pub(crate) fn remove_if(&mut self, net: IpNet, value: V) -> bool {
        let (table, addr) = self.table_mut(net.addr());
        table.remove_if(addr, net.prefix_len(), value)
    }

    /// The owner of exactly this prefix (not a longest-prefix match).
    pub(crate) fn owner(&self, net: IpNet) -> Option<V> {
        let (table, addr) = self.table(net.addr());
        table.exact(addr, net.prefix_len())
    }

    /// The value of the most specific prefix containing `addr`.
    #[inline]
    pub(crate) fn lookup(&self, addr: IpAddr) -> Option<V> {
        let (table, addr) = self.table(addr);
        table.lookup(addr)
    }

    fn table(&self, addr: IpAddr) -> (&PrefixTable<V>, u128) {
        match addr {
            IpAddr::V4(a) => (&self.v4, u128::from(u32::from(a))),
            IpAddr::V6(a) => (&self.v6, u128::from(a)),
        }
    }

    fn table_mut(&mut self, addr: IpAddr) -> (&mut PrefixTable<V>, u128) {
        match addr {
            IpAddr::V4(a) => (&mut self.v4, u128::from(u32::from(a))),
            IpAddr::V6(a) => (&mut self.v6, u128::from(a)),
        }
    }
}

/// The prefixes of one address family, as right-aligned `u128` addresses.
#[derive(Debug, Clone)]
struct PrefixTable<V> {
    /// Address width in bits (32 or 128).
    width: u8,
    /// `maps[len]`: masked address -> value, for prefixes of length `len`.
    maps: Vec<HashMap<u128, V>>,
    /// The lengths whose map is not empty, longest first.
    lengths: Vec<u8>,
}

impl<V: Copy + PartialEq> PrefixTable<V> {
    fn new(width: u8) -> Self {
        Self {
            width,
            maps: (0..=width).map(|_| HashMap::new()).collect(),
            lengths: Vec::new(),
        }
    }

    /// Mask keeping the top `len` bits of a `width`-bit address.
    #[inline]
    fn mask(&self, len: u8) -> u128 {
        let width_mask = if self.width == 128 {
            u128::MAX
        } else {
            (1u128 << self.width) - 1
        };
        if len == 0 {
            0
        } else {
            (u128::MAX << (self.width - len.min(self.width))) & width_mask
        }
    }

    fn insert(&mut self, addr: u128, len: u8, value: V) -> Option<V> {
        let len = len.min(self.width);
        let key = addr & self.mask(len);
        let map = &mut self.maps[usize::from(len)];
        let previous = map.insert(key, value);
        if !self.lengths.contains(&len) {
            self.lengths.push(len);
            self.lengths.sort_unstable_by(|a, b| b.cmp(a));
        }
        previous
    }

    fn remove_if(&mut self, addr: u128, len: u8, value: V) -> bool {
        let len = len.min(self.width);
        let key = addr & self.mask(len);
        let map = &mut self.maps[usize::from(len)];
        if map.get(&key) != Some(&value) {
            return false;
        }
        map.remove(&key);
        if map.is_empty() {
            self.lengths.retain(|l| *l != len);
        }
        true
    }

    fn exact(&self, addr: u128, len: u8) -> Option<V> {
        let len = len.min(self.width);
        self.maps[usize::from(len)]
            .get(&(addr & self.mask(len)))
            .copied()
    }

    #[inline]
    fn lookup(&self, addr: u128) -> Option<V> {
        self.lengths.iter().find_map(|&len| {
            self.maps[usize::from(len)]
                .get(&(addr & self.mask(len)))
                .copied()
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn most_specific_prefix_wins() {
        let mut t = RoutingTable::new();
        t.insert(net("0.0.0.0/0"), 0);
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("10.1.2.3/32"), 3);
        t.insert(net("::/0"), 10);
        t.insert(net("fd00::/8"), 11);
        t.insert(net("fd00::1/128"), 12);
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(3));
        assert_eq!(t.lookup(ip("10.1.2.4")), Some(2));
        assert_eq!(t.lookup(ip("10.2.0.1")), Some(1));
        assert_eq!(t.lookup(ip("192.168.0.1")), Some(0));
        assert_eq!(t.lookup(ip("fd00::1")), Some(12));
        assert_eq!(t.lookup(ip("fd00::2")), Some(11));
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(10));
    }

    #[test]
    fn families_are_separate_and_host_bits_are_ignored() {
        let mut t = RoutingTable::new();
        t.insert(net("10.1.2.3/24"), 1);
        assert_eq!(t.lookup(ip("10.1.2.200")), Some(1));
        assert_eq!(t.lookup(ip("::ffff:10.1.2.200")), None);
        assert_eq!(t.owner(net("10.1.2.0/24")), Some(1));
    }

    #[test]
    fn identical_prefix_moves_and_remove_only_removes_own() {
        let mut t = RoutingTable::new();
        assert_eq!(t.insert(net("10.0.0.0/24"), 1), None);
        assert_eq!(t.insert(net("10.0.0.0/24"), 2), Some(1));
        assert_eq!(t.lookup(ip("10.0.0.9")), Some(2));
        assert!(!t.remove_if(net("10.0.0.0/24"), 1), "1 no longer owns it");
        assert_eq!(t.lookup(ip("10.0.0.9")), Some(2));
        assert!(t.remove_if(net("10.0.0.0/24"), 2));
        assert_eq!(t.lookup(ip("10.0.0.9")), None);
        assert!(t.v4.lengths.is_empty());
    }

    proptest! {
        /// The table agrees with a linear scan that picks the longest containing prefix.
        #[test]
        fn matches_linear_scan(
            prefixes in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..40),
            probes in proptest::collection::vec(any::<u32>(), 1..40),
        ) {
            let mut t = RoutingTable::new();
            let mut reference: Vec<(ipnet::Ipv4Net, usize)> = Vec::new();
            for (i, (addr, len)) in prefixes.iter().enumerate() {
                let n = ipnet::Ipv4Net::new((*addr).into(), *len).unwrap().trunc();
                t.insert(IpNet::V4(n), i);
                reference.retain(|(m, _)| *m != n);
                reference.push((n, i));
            }
            for probe in probes {
                let a = std::net::Ipv4Addr::from(probe);
                let expected = reference
                    .iter()
                    .filter(|(n, _)| n.contains(&a))
                    .max_by_key(|(n, _)| n.prefix_len())
                    .map(|(_, v)| *v);
                prop_assert_eq!(t.lookup(IpAddr::V4(a)), expected);
            }
        }
    }
}
