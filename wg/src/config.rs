//! The WireGuard / wg-quick configuration file format (`wg(8)`, `wg-quick(8)`).
//!
//! ```text
//! [Interface]
//! PrivateKey = <base64>
//! Address = 100.64.0.1/32, fd7a:115c:a1e0::1/128
//! ListenPort = 51820
//! MTU = 1420
//!
//! [Peer]
//! PublicKey = <base64>
//! PresharedKey = <base64>
//! AllowedIPs = 100.64.0.2/32, fd7a:115c:a1e0::2/128
//! Endpoint = peer.example.com:51820
//! PersistentKeepalive = 25
//! ```
//!
//! As in wg: section names and keys are case-insensitive, whitespace around
//! `=` is free, `#` starts a comment (whole line or trailing), `Address` and
//! `AllowedIPs` take comma-separated lists and may be repeated (entries
//! accumulate), and there may be any number of `[Peer]` sections.
//!
//! Choices where wg is silent or lenient:
//! - `Address` keeps host bits (`10.0.0.1/24` is the address `10.0.0.1` on a
//!   /24); `AllowedIPs` are truncated to their network (`10.0.0.1/24` ->
//!   `10.0.0.0/24`), as the kernel does. A bare IP means /32 or /128.
//! - Repeating a single-valued key (`PrivateKey`, `ListenPort`, `MTU`,
//!   `PublicKey`, ...) in one section is an error rather than "last wins".
//! - The wg-quick keys that need a kernel interface or root (`DNS`, `Table`,
//!   `PreUp`, `PostUp`, `PreDown`, `PostDown`, `SaveConfig`, `FwMark`) are
//!   accepted with a [`ConfigWarning`] and ignored; any other unknown key is
//!   an error.
//! - `MTU` must be in 576..=65535, and at least 1280 when an IPv6 address is
//!   configured (RFC 8200 §5).
//!
//! Errors carry the 1-based line number (0 for whole-file problems); the
//! caller prefixes the file name.

use std::collections::HashSet;
use std::fmt;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::engine::PeerConfig;
use crate::keys::{KeyError, PresharedKey, PrivateKey, PublicKey};

/// A parsed configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgQuickConfig {
    /// The `[Interface]` section.
    pub interface: InterfaceSection,
    /// The `[Peer]` sections, in file order.
    pub peers: Vec<PeerSection>,
    /// Ignored settings, for the caller to log.
    pub warnings: Vec<ConfigWarning>,
}

/// The `[Interface]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceSection {
    /// `PrivateKey`.
    pub private_key: PrivateKey,
    /// `Address`: this node's tailnet addresses with their prefix lengths.
    pub addresses: Vec<IpNet>,
    /// `ListenPort` (0 means "any").
    pub listen_port: Option<u16>,
    /// `MTU`.
    pub mtu: Option<u16>,
}

/// One `[Peer]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSection {
    /// `PublicKey`.
    pub public_key: PublicKey,
    /// `PresharedKey`.
    pub preshared_key: Option<PresharedKey>,
    /// `AllowedIPs`, truncated to their network addresses.
    pub allowed_ips: Vec<IpNet>,
    /// `Endpoint`.
    pub endpoint: Option<Endpoint>,
    /// `PersistentKeepalive` in seconds (`off` and `0` are `None`).
    pub persistent_keepalive: Option<u16>,
}

impl PeerSection {
    /// The engine configuration for this peer. A host-name endpoint is left
    /// out (`None`): resolve it and set `endpoint` yourself.
    pub fn to_peer_config(&self) -> PeerConfig {
        PeerConfig {
            public_key: self.public_key,
            preshared_key: self.preshared_key.clone(),
            allowed_ips: self.allowed_ips.clone(),
            endpoint: match &self.endpoint {
                Some(Endpoint::Addr(addr)) => Some(*addr),
                _ => None,
            },
            persistent_keepalive: self.persistent_keepalive,
        }
    }
}

/// A peer's `Endpoint`: an address, or a host name to resolve.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// An IP address and port.
    Addr(SocketAddr),
    /// A host name and port, resolved by the caller.
    Host {
        /// The host name.
        host: String,
        /// The UDP port.
        port: u16,
    },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Addr(addr) => write!(f, "{addr}"),
            Endpoint::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = ConfigErrorKind;

    fn from_str(s: &str) -> Result<Self, ConfigErrorKind> {
        parse_endpoint(s)
    }
}

/// A setting that was accepted but ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// 1-based line number.
    pub line: usize,
    /// The key as written in the file.
    pub key: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: {} needs a kernel interface and is ignored by tailnode",
            self.line, self.key
        )
    }
}

/// A configuration file that cannot be used, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// 1-based line number; 0 for problems with the whole file.
    pub line: usize,
    /// What is wrong.
    pub kind: ConfigErrorKind,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.kind)
        } else {
            write!(f, "line {}: {}", self.line, self.kind)
        }
    }
}

/// The kinds of configuration errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigErrorKind {
    /// A `[Section]` other than `[Interface]` or `[Peer]`.
    #[error("unknown section [{0}]")]
    UnknownSection(String),
    /// A `[` line without a closing `]`.
    #[error("malformed section header")]
    MalformedSection,
    /// A second `[Interface]` section.
    #[error("duplicate [Interface] section")]
    DuplicateInterface,
    /// A `key = value` line before any section header.
    #[error("{0} is outside of any section")]
    KeyOutsideSection(String),
    /// A key that this section does not have.
    #[error("unknown key {key} in [{section}]")]
    UnknownKey {
        /// The key as written.
        key: String,
        /// The section it appeared in.
        section: &'static str,
    },
    /// A single-valued key given twice in one section.
    #[error("duplicate {0}")]
    DuplicateKey(String),
    /// A non-empty, non-comment line without `=`.
    #[error("expected `key = value`")]
    MissingEquals,
    /// A key (`PrivateKey`, `PublicKey`, `PresharedKey`) that does not decode.
    #[error("invalid {field}: {source}")]
    InvalidKey {
        /// Which key.
        field: &'static str,
        /// Why.
        source: KeyError,
    },
    /// A public key that is a small-order point.
    #[error("invalid PublicKey: not a usable X25519 key")]
    WeakPublicKey,
    /// An `Address` or `AllowedIPs` entry that is not an IP or CIDR prefix.
    #[error("invalid {field} entry {value:?}: expected an IP address or CIDR prefix")]
    InvalidCidr {
        /// `Address` or `AllowedIPs`.
        field: &'static str,
        /// The entry as written.
        value: String,
    },
    /// `ListenPort` is not a number in 0..=65535.
    #[error("invalid ListenPort {0:?}: expected a number 0..=65535")]
    InvalidPort(String),
    /// `MTU` is not a number in 576..=65535.
    #[error("invalid MTU {0:?}: expected a number 576..=65535")]
    InvalidMtu(String),
    /// `MTU` below IPv6's minimum with an IPv6 address configured.
    #[error("MTU {0} is below 1280, the minimum for IPv6 (an IPv6 Address is configured)")]
    MtuTooSmallForIpv6(u16),
    /// `PersistentKeepalive` is not `off` or a number in 0..=65535.
    #[error("invalid PersistentKeepalive {0:?}: expected off or a number 0..=65535")]
    InvalidKeepalive(String),
    /// `Endpoint` is malformed.
    #[error("invalid Endpoint {value:?}: {reason}")]
    InvalidEndpoint {
        /// The value as written.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// No `[Interface]` section.
    #[error("missing [Interface] section")]
    MissingInterface,
    /// `[Interface]` without `PrivateKey`.
    #[error("[Interface] has no PrivateKey")]
    MissingPrivateKey,
    /// `[Peer]` without `PublicKey`.
    #[error("[Peer] has no PublicKey")]
    MissingPublicKey,
    /// Two `[Peer]` sections with the same `PublicKey`.
    #[error("duplicate peer: PublicKey {0} already appears in an earlier [Peer]")]
    DuplicatePeer(String),
}

/// Keys wg-quick knows that only make sense with a kernel interface.
const IGNORED_INTERFACE_KEYS: [&str; 8] = [
    "dns",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
    "fwmark",
];

/// Parses a wg-quick configuration file.
///
/// # Errors
///
/// The first problem found, with its line number (see [`ConfigErrorKind`]).
pub fn parse(text: &str) -> Result<WgQuickConfig, ConfigError> {
    let mut parser = Parser::default();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        parser.line_no = line;
        parser
            .line(raw)
            .map_err(|kind| ConfigError { line, kind })?;
    }
    parser.finish()
}

impl WgQuickConfig {
    /// The configuration in wg-quick format, parseable by [`parse`] into an
    /// equal value (warnings aside). Not a `Display` impl on purpose: the
    /// output contains the private key and must not end up in logs.
    pub fn to_wg_quick_string(&self) -> String {
        let mut s = String::new();
        let i = &self.interface;
        // Writing to a String cannot fail.
        let _ = writeln!(s, "[Interface]");
        let _ = writeln!(s, "PrivateKey = {}", i.private_key.to_base64());
        if !i.addresses.is_empty() {
            let _ = writeln!(s, "Address = {}", join(&i.addresses));
        }
        if let Some(port) = i.listen_port {
            let _ = writeln!(s, "ListenPort = {port}");
        }
        if let Some(mtu) = i.mtu {
            let _ = writeln!(s, "MTU = {mtu}");
        }
        for p in &self.peers {
            let _ = writeln!(s, "\n[Peer]");
            let _ = writeln!(s, "PublicKey = {}", p.public_key.to_base64());
            if let Some(psk) = &p.preshared_key {
                let _ = writeln!(s, "PresharedKey = {}", psk.to_base64());
            }
            if !p.allowed_ips.is_empty() {
                let _ = writeln!(s, "AllowedIPs = {}", join(&p.allowed_ips));
            }
            if let Some(endpoint) = &p.endpoint {
                let _ = writeln!(s, "Endpoint = {endpoint}");
            }
            if let Some(keepalive) = p.persistent_keepalive {
                let _ = writeln!(s, "PersistentKeepalive = {keepalive}");
            }
        }
        s
    }
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Section {
    #[default]
    None,
    Interface,
    Peer,
}

#[derive(Default)]
struct InterfaceBuilder {
    line: usize,
    private_key: Option<PrivateKey>,
    addresses: Vec<IpNet>,
    listen_port: Option<u16>,
    mtu: Option<(u16, usize)>,
    seen: HashSet<&'static str>,
}

#[derive(Default)]
struct PeerBuilder {
    line: usize,
    public_key: Option<(PublicKey, usize)>,
    preshared_key: Option<PresharedKey>,
    allowed_ips: Vec<IpNet>,
    endpoint: Option<Endpoint>,
    persistent_keepalive: Option<u16>,
    seen: HashSet<&'static str>,
}

#[derive(Default)]
struct Parser {
    /// The 1-based number of the line being parsed.
    line_no: usize,
    section: Section,
    interface: Option<InterfaceBuilder>,
    peers: Vec<PeerBuilder>,
    warnings: Vec<ConfigWarning>,
}

impl Parser {
    fn line(&mut self, raw: &str) -> Result<(), ConfigErrorKind> {
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            return Ok(());
        }
        if let Some(rest) = content.strip_prefix('[') {
            let name = rest
                .strip_suffix(']')
                .ok_or(ConfigErrorKind::MalformedSection)?
                .trim();
            return self.section_header(name);
        }
        let (key, value) = content
            .split_once('=')
            .ok_or(ConfigErrorKind::MissingEquals)?;
        let (key, value) = (key.trim(), value.trim());
        let lower = key.to_ascii_lowercase();
        let line = self.line_no;
        match self.section {
            Section::None => Err(ConfigErrorKind::KeyOutsideSection(key.to_owned())),
            Section::Interface => {
                if IGNORED_INTERFACE_KEYS.contains(&lower.as_str()) {
                    self.warnings.push(ConfigWarning {
                        line,
                        key: key.to_owned(),
                    });
                    return Ok(());
                }
                let Some(iface) = self.interface.as_mut() else {
                    return Err(ConfigErrorKind::KeyOutsideSection(key.to_owned()));
                };
                iface.set(&lower, key, value, line)
            }
            Section::Peer => {
                let Some(peer) = self.peers.last_mut() else {
                    return Err(ConfigErrorKind::KeyOutsideSection(key.to_owned()));
                };
                peer.set(&lower, key, value, line)
            }
        }
    }

    fn section_header(&mut self, name: &str) -> Result<(), ConfigErrorKind> {
        let line = self.line_no;
        if name.eq_ignore_ascii_case("interface") {
            if self.interface.is_some() {
                return Err(ConfigErrorKind::DuplicateInterface);
            }
            self.interface = Some(InterfaceBuilder {
                line,
                ..InterfaceBuilder::default()
            });
            self.section = Section::Interface;
            Ok(())
        } else if name.eq_ignore_ascii_case("peer") {
            self.peers.push(PeerBuilder {
                line,
                ..PeerBuilder::default()
            });
            self.section = Section::Peer;
            Ok(())
        } else {
            Err(ConfigErrorKind::UnknownSection(name.to_owned()))
        }
    }

    fn finish(self) -> Result<WgQuickConfig, ConfigError> {
        let iface = self.interface.ok_or(ConfigError {
            line: 0,
            kind: ConfigErrorKind::MissingInterface,
        })?;
        let private_key = iface.private_key.ok_or(ConfigError {
            line: iface.line,
            kind: ConfigErrorKind::MissingPrivateKey,
        })?;
        let has_ipv6 = iface.addresses.iter().any(|a| matches!(a, IpNet::V6(_)));
        if let Some((mtu, line)) = iface.mtu
            && has_ipv6
            && mtu < 1280
        {
            return Err(ConfigError {
                line,
                kind: ConfigErrorKind::MtuTooSmallForIpv6(mtu),
            });
        }
        let mut seen_keys = HashSet::new();
        let mut peers = Vec::with_capacity(self.peers.len());
        for p in self.peers {
            let (public_key, key_line) = p.public_key.ok_or(ConfigError {
                line: p.line,
                kind: ConfigErrorKind::MissingPublicKey,
            })?;
            if !seen_keys.insert(public_key) {
                return Err(ConfigError {
                    line: key_line,
                    kind: ConfigErrorKind::DuplicatePeer(public_key.to_base64()),
                });
            }
            peers.push(PeerSection {
                public_key,
                preshared_key: p.preshared_key,
                allowed_ips: p.allowed_ips,
                endpoint: p.endpoint,
                persistent_keepalive: p.persistent_keepalive,
            });
        }
        Ok(WgQuickConfig {
            interface: InterfaceSection {
                private_key,
                addresses: iface.addresses,
                listen_port: iface.listen_port,
                mtu: iface.mtu.map(|(mtu, _)| mtu),
            },
            peers,
            warnings: self.warnings,
        })
    }
}

impl InterfaceBuilder {
    fn set(
        &mut self,
        lower: &str,
        key: &str,
        value: &str,
        line: usize,
    ) -> Result<(), ConfigErrorKind> {
        match lower {
            "privatekey" => {
                once(&mut self.seen, "privatekey", key)?;
                let parsed =
                    value
                        .parse::<PrivateKey>()
                        .map_err(|source| ConfigErrorKind::InvalidKey {
                            field: "PrivateKey",
                            source,
                        })?;
                self.private_key = Some(parsed);
            }
            "address" => {
                for entry in list(value) {
                    self.addresses.push(parse_net(entry, "Address")?);
                }
            }
            "listenport" => {
                once(&mut self.seen, "listenport", key)?;
                let port = value
                    .parse::<u16>()
                    .map_err(|_| ConfigErrorKind::InvalidPort(value.to_owned()))?;
                self.listen_port = Some(port);
            }
            "mtu" => {
                once(&mut self.seen, "mtu", key)?;
                let mtu = value
                    .parse::<u16>()
                    .ok()
                    .filter(|m| *m >= 576)
                    .ok_or_else(|| ConfigErrorKind::InvalidMtu(value.to_owned()))?;
                self.mtu = Some((mtu, line));
            }
            _ => {
                return Err(ConfigErrorKind::UnknownKey {
                    key: key.to_owned(),
                    section: "Interface",
                });
            }
        }
        Ok(())
    }
}

impl PeerBuilder {
    fn set(
        &mut self,
        lower: &str,
        key: &str,
        value: &str,
        line: usize,
    ) -> Result<(), ConfigErrorKind> {
        match lower {
            "publickey" => {
                once(&mut self.seen, "publickey", key)?;
                let parsed =
                    value
                        .parse::<PublicKey>()
                        .map_err(|source| ConfigErrorKind::InvalidKey {
                            field: "PublicKey",
                            source,
                        })?;
                if !parsed.is_valid_x25519() {
                    return Err(ConfigErrorKind::WeakPublicKey);
                }
                self.public_key = Some((parsed, line));
            }
            "presharedkey" => {
                once(&mut self.seen, "presharedkey", key)?;
                let parsed = value.parse::<PresharedKey>().map_err(|source| {
                    ConfigErrorKind::InvalidKey {
                        field: "PresharedKey",
                        source,
                    }
                })?;
                self.preshared_key = Some(parsed);
            }
            "allowedips" => {
                for entry in list(value) {
                    self.allowed_ips
                        .push(parse_net(entry, "AllowedIPs")?.trunc());
                }
            }
            "endpoint" => {
                once(&mut self.seen, "endpoint", key)?;
                self.endpoint = Some(parse_endpoint(value)?);
            }
            "persistentkeepalive" => {
                once(&mut self.seen, "persistentkeepalive", key)?;
                self.persistent_keepalive = if value.eq_ignore_ascii_case("off") {
                    None
                } else {
                    let secs = value
                        .parse::<u16>()
                        .map_err(|_| ConfigErrorKind::InvalidKeepalive(value.to_owned()))?;
                    (secs > 0).then_some(secs)
                };
            }
            _ => {
                return Err(ConfigErrorKind::UnknownKey {
                    key: key.to_owned(),
                    section: "Peer",
                });
            }
        }
        Ok(())
    }
}

/// Records a single-valued key; errors if it was already set in this section.
fn once(
    seen: &mut HashSet<&'static str>,
    id: &'static str,
    key: &str,
) -> Result<(), ConfigErrorKind> {
    if seen.insert(id) {
        Ok(())
    } else {
        Err(ConfigErrorKind::DuplicateKey(key.to_owned()))
    }
}

/// The entries of a comma-separated list; an empty value is an empty list,
/// but an empty entry (`a,,b`) is returned so that it fails to parse.
fn list(value: &str) -> impl Iterator<Item = &str> {
    let empty = value.is_empty();
    value.split(',').map(str::trim).filter(move |_| !empty)
}

fn parse_net(entry: &str, field: &'static str) -> Result<IpNet, ConfigErrorKind> {
    let invalid = || ConfigErrorKind::InvalidCidr {
        field,
        value: entry.to_owned(),
    };
    if entry.contains('/') {
        entry.parse::<IpNet>().map_err(|_| invalid())
    } else {
        entry
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| invalid())
    }
}

fn parse_endpoint(value: &str) -> Result<Endpoint, ConfigErrorKind> {
    let invalid = |reason| ConfigErrorKind::InvalidEndpoint {
        value: value.to_owned(),
        reason,
    };
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid("missing `]` after IPv6 address"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| invalid("missing :port"))?;
        (host, port)
    } else {
        let (host, port) = value
            .rsplit_once(':')
            .ok_or_else(|| invalid("missing :port"))?;
        if host.contains(':') {
            return Err(invalid("IPv6 addresses must be written as [address]:port"));
        }
        (host, port)
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid("port must be a number 1..=65535"))?;
    if value.starts_with('[') {
        let ip = host
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| invalid("not an IPv6 address inside [ ]"))?;
        return Ok(Endpoint::Addr(SocketAddr::new(ip.into(), port)));
    }
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return Ok(Endpoint::Addr(SocketAddr::new(ip.into(), port)));
    }
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid_host {
        return Err(invalid("not a valid host name or IP address"));
    }
    Ok(Endpoint::Host {
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
