//! The node's configuration: plain data with the defaults of `tailnode up`, deserializable from
//! any serde format (TOML, JSON, ...), checked by [`Config::validate`] before a node starts.
//!
//! Every setting of `tailnode up` is a field named like its flag (`--dial-timeout` is
//! `dial_timeout`); durations are humantime strings (`"30s"`, `"15m"`), addresses and specs the
//! strings the flags take (`"127.0.0.1:1080"`, `"off"`, `"tcp:8080=100.64.0.2:80"`).
//!
//! ```
//! let config: tailnode::Config = toml::from_str(r#"
//!     coordinator = "wss://coord.example"
//!     auth_key = "s3cret"
//!     name = "db"
//!     socks5 = "127.0.0.1:1081"
//!     expose = ["5432"]
//!     lost_peer_timeout = "30m"
//! "#).unwrap();
//! assert_eq!(config.lost_peer_timeout, std::time::Duration::from_secs(1800));
//! config.validate().unwrap();
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tailnode_control::controller::{
    CoordinatorUrl, DEFAULT_DIAL_TIMEOUT, DEFAULT_LOST_PEER_TIMEOUT, DEFAULT_PING_INTERVAL,
    DEFAULT_RETRY_MAX_BACKOFF,
};
use tailnode_wg::config::{Endpoint, PeerSection};
use tailnode_wg::{PresharedKey, PrivateKey, PublicKey};

use crate::api::ApiAddr;
use crate::dial::DEFAULT_CONNECT_TIMEOUT;
use crate::expose::ExposeSpec;
use crate::forward::ForwardSpec;
use crate::socks5::Credentials;
use crate::udp_forward::DEFAULT_UDP_IDLE_TIMEOUT;

/// Default SOCKS5 listen address.
pub const DEFAULT_SOCKS5: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1080);

/// Everything a node needs to start. `Config::default()` is `tailnode up` without flags.
///
/// `Debug` never shows the private key, the auth key or the proxy password.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// wg-quick file with the interface (key, addresses, port, MTU) and static peers. Its
    /// `PrivateKey` wins over [`private_key`](Self::private_key) and
    /// [`key_file`](Self::key_file); its addresses and peers add to those below.
    pub wg_config: Option<PathBuf>,
    /// The node's private key; when unset (and no wg-quick file), the key in `key_file`.
    #[serde(with = "private_key_serde")]
    pub private_key: Option<PrivateKey>,
    /// Key file, created (mode 0600) when missing, so a restarted node keeps its identity.
    /// Default: `node.key` in the state directory (see [`crate::identity::default_key_file`]).
    pub key_file: Option<PathBuf>,
    /// Static tailnet addresses of this node (beside the wg-quick file's and the assigned ones).
    pub addresses: Vec<IpAddr>,
    /// Static peers (beside the wg-quick file's).
    pub peers: Vec<StaticPeer>,
    /// WireGuard UDP port (0 picks one); overrides the wg-quick file's `ListenPort`.
    pub listen_port: Option<u16>,
    /// IP MTU inside the tunnel; overrides the wg-quick file's `MTU` (default 1420).
    pub mtu: Option<u16>,

    /// Coordination server to join (`ws://`, `wss://`, `http://`, `https://`).
    #[serde(with = "string_serde::option")]
    pub coordinator: Option<CoordinatorUrl>,
    /// Name to ask the coordinator for (made DNS-safe and unique by it). Default: the host name.
    pub name: Option<String>,
    /// The tailnet's auth key (needed with a coordinator).
    pub auth_key: Option<String>,
    /// Extra CA certificate (PEM) to trust for a `wss://` coordinator.
    pub coordinator_ca: Option<PathBuf>,
    /// Bound on one coordinator dial (TCP, TLS, websocket upgrade, hello/welcome).
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// Cap of the jittered exponential backoff between coordinator dials.
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// Coordinator session pings; two missed intervals drop the session.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long a lost peer stays without a WireGuard handshake.
    #[serde(with = "humantime_serde")]
    pub lost_peer_timeout: Duration,
    /// UDP endpoints to advertise instead of the discovered interface addresses.
    #[serde(alias = "endpoint")]
    pub endpoints: Vec<SocketAddr>,

    /// SOCKS5 listen address, or off.
    #[serde(with = "string_serde")]
    pub socks5: ListenAddr,
    /// Connect destinations outside the tailnet from the host network instead of refusing them.
    pub socks5_direct: bool,
    /// Username proxy clients must present (RFC 1929, and Basic for the HTTP proxy).
    pub socks5_user: Option<String>,
    /// Password proxy clients must present.
    pub socks5_pass: Option<String>,
    /// Allow a proxy on a non-loopback address without credentials.
    pub socks5_insecure_public: bool,
    /// HTTP proxy listen address (CONNECT and absolute-URI requests), or off.
    #[serde(with = "string_serde")]
    pub http_proxy: ListenAddr,
    /// Port forwards, `tcp:LOCAL=TAILNET` or `udp:LOCAL=TAILNET`.
    #[serde(with = "string_serde::vec")]
    pub forward: Vec<ForwardSpec>,
    /// Local TCP services exposed to the tailnet, `PORT` or `PORT=HOST:PORT`.
    #[serde(with = "string_serde::vec")]
    pub expose: Vec<ExposeSpec>,
    /// UDP forward flows and SOCKS5 UDP associations idle this long are closed.
    #[serde(with = "humantime_serde")]
    pub udp_idle_timeout: Duration,
    /// Time to establish a tailnet or direct connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,

    /// Local status API; `None` is `unix:<state dir>/tailnode.sock`, and failing to bind that
    /// default only warns.
    #[serde(with = "string_serde::option")]
    pub api: Option<ApiAddr>,
    /// Serve Prometheus metrics on `http://ADDR/metrics`.
    pub metrics: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            wg_config: None,
            private_key: None,
            key_file: None,
            addresses: Vec::new(),
            peers: Vec::new(),
            listen_port: None,
            mtu: None,
            coordinator: None,
            name: None,
            auth_key: None,
            coordinator_ca: None,
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            retry_max_backoff: DEFAULT_RETRY_MAX_BACKOFF,
            ping_interval: DEFAULT_PING_INTERVAL,
            lost_peer_timeout: DEFAULT_LOST_PEER_TIMEOUT,
            endpoints: Vec::new(),
            socks5: ListenAddr::On(DEFAULT_SOCKS5),
            socks5_direct: false,
            socks5_user: None,
            socks5_pass: None,
            socks5_insecure_public: false,
            http_proxy: ListenAddr::Off,
            forward: Vec::new(),
            expose: Vec::new(),
            udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            api: None,
            metrics: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("Config")
            .field("wg_config", &self.wg_config)
            .field("private_key", &self.private_key)
            .field("key_file", &self.key_file)
            .field("addresses", &self.addresses)
            .field("peers", &self.peers)
            .field("listen_port", &self.listen_port)
            .field("mtu", &self.mtu)
            .field("coordinator", &self.coordinator)
            .field("name", &self.name)
            .field("auth_key", &secret(&self.auth_key))
            .field("coordinator_ca", &self.coordinator_ca)
            .field("dial_timeout", &self.dial_timeout)
            .field("retry_max_backoff", &self.retry_max_backoff)
            .field("ping_interval", &self.ping_interval)
            .field("lost_peer_timeout", &self.lost_peer_timeout)
            .field("endpoints", &self.endpoints)
            .field("socks5", &self.socks5)
            .field("socks5_direct", &self.socks5_direct)
            .field("socks5_user", &self.socks5_user)
            .field("socks5_pass", &secret(&self.socks5_pass))
            .field("socks5_insecure_public", &self.socks5_insecure_public)
            .field("http_proxy", &self.http_proxy)
            .field("forward", &self.forward)
            .field("expose", &self.expose)
            .field("udp_idle_timeout", &self.udp_idle_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("api", &self.api)
            .field("metrics", &self.metrics)
            .finish()
    }
}

impl Config {
    /// A configuration with every default and nothing to listen on: no SOCKS5, no API. Handy
    /// for embedding, where the program talks to the node through [`crate::Tailnode`] itself.
    pub fn embedded() -> Self {
        Self {
            socks5: ListenAddr::Off,
            api: Some(ApiAddr::Off),
            ..Self::default()
        }
    }

    /// Checks the settings that do not need the file system: positive durations, an auth key
    /// with a coordinator, proxy credentials in pairs, no public proxy without credentials.
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (setting, value) in [
            ("dial_timeout", self.dial_timeout),
            ("retry_max_backoff", self.retry_max_backoff),
            ("ping_interval", self.ping_interval),
            ("lost_peer_timeout", self.lost_peer_timeout),
            ("connect_timeout", self.connect_timeout),
            ("udp_idle_timeout", self.udp_idle_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(setting));
            }
        }
        if self.coordinator.is_some() && self.auth_key.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::MissingAuthKey);
        }
        if let Some(name) = &self.name
            && name.trim().is_empty()
        {
            return Err(ConfigError::EmptyName);
        }
        if let Some(mtu) = self.mtu
            && !(576..=65535).contains(&mtu)
        {
            return Err(ConfigError::Mtu(mtu));
        }
        let credentials = self.proxy_credentials()?;
        for (proxy, setting, listen) in [
            ("SOCKS5", "socks5", self.socks5),
            ("the HTTP proxy", "http_proxy", self.http_proxy),
        ] {
            if let ListenAddr::On(addr) = listen
                && !addr.ip().to_canonical().is_loopback()
                && credentials.is_none()
                && !self.socks5_insecure_public
            {
                return Err(ConfigError::PublicProxy {
                    proxy,
                    setting,
                    addr,
                });
            }
        }
        Ok(())
    }

    /// The credentials proxy clients must present, or `None` when neither half is set.
    ///
    /// # Errors
    /// [`ConfigError::Credentials`] when only one half is set, or one is empty or longer than
    /// 255 bytes (RFC 1929).
    pub fn proxy_credentials(&self) -> Result<Option<Credentials>, ConfigError> {
        match (&self.socks5_user, &self.socks5_pass) {
            (None, None) => Ok(None),
            (Some(user), Some(pass)) => Credentials::new(user.as_str(), pass.as_str())
                .map(Some)
                .map_err(|e| ConfigError::Credentials(e.to_string())),
            (Some(_), None) => Err(ConfigError::Credentials(
                "socks5_user needs socks5_pass".into(),
            )),
            (None, Some(_)) => Err(ConfigError::Credentials(
                "socks5_pass needs socks5_user".into(),
            )),
        }
    }
}

/// A setting that cannot work. Settings are named like the fields of [`Config`]
/// (`dial_timeout`); [`ConfigError::message`] can name them otherwise (as flags, say).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A duration setting is zero.
    #[error("{0} must be greater than 0")]
    ZeroDuration(&'static str),
    /// A coordinator without an auth key.
    #[error("coordinator needs an auth key (auth_key)")]
    MissingAuthKey,
    /// `name` is empty.
    #[error("name must not be empty")]
    EmptyName,
    /// `mtu` out of range.
    #[error("mtu {0} is out of range (576-65535)")]
    Mtu(u16),
    /// Proxy credentials that do not fit RFC 1929, or only half of them.
    #[error("socks5_user/socks5_pass: {0}")]
    Credentials(String),
    /// A proxy on a public address without credentials.
    #[error(
        "refusing to serve {proxy} on {addr} without credentials: anyone who can reach it could \
         use the tailnet through it (set socks5_user and socks5_pass, listen on a loopback \
         address, or set socks5_insecure_public)"
    )]
    PublicProxy {
        /// Which proxy.
        proxy: &'static str,
        /// Its setting.
        setting: &'static str,
        /// Where it would listen.
        addr: SocketAddr,
    },
}

impl ConfigError {
    /// The message with each setting named by `name` (e.g. `|s| format!("--{}", s.replace('_',
    /// "-"))` for command-line flags).
    pub fn message(&self, name: impl Fn(&str) -> String) -> String {
        match self {
            Self::ZeroDuration(setting) => format!("{} must be greater than 0", name(setting)),
            Self::MissingAuthKey => format!(
                "{} needs an auth key: {}",
                name("coordinator"),
                name("auth_key")
            ),
            Self::EmptyName => format!("{} must not be empty", name("name")),
            Self::Mtu(mtu) => format!("{} {mtu} is out of range (576-65535)", name("mtu")),
            Self::Credentials(problem) => format!(
                "{}/{}: {}",
                name("socks5_user"),
                name("socks5_pass"),
                problem
                    .replace("socks5_user", &name("socks5_user"))
                    .replace("socks5_pass", &name("socks5_pass"))
            ),
            Self::PublicProxy { proxy, addr, .. } => format!(
                "refusing to serve {proxy} on {addr} without credentials: anyone who can reach \
                 it could use the tailnet through it. Set {} and {}, listen on a loopback \
                 address, or pass {} if this is really wanted",
                name("socks5_user"),
                name("socks5_pass"),
                name("socks5_insecure_public")
            ),
        }
    }
}

/// A listen address that can be switched off (`"off"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenAddr {
    /// Listen here.
    On(SocketAddr),
    /// Do not listen.
    Off,
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" | "" => Ok(ListenAddr::Off),
            _ => s
                .parse()
                .map(ListenAddr::On)
                .map_err(|_| format!("{s:?} is not IP:PORT, [IPv6]:PORT or off")),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::On(addr) => write!(f, "{addr}"),
            ListenAddr::Off => f.write_str("off"),
        }
    }
}

/// A static WireGuard peer (a wg-quick `[Peer]` section as plain data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticPeer {
    /// The peer's public key (base64).
    #[serde(with = "string_serde")]
    pub public_key: PublicKey,
    /// Optional preshared key (base64).
    #[serde(default, with = "preshared_key_serde")]
    pub preshared_key: Option<PresharedKey>,
    /// Prefixes routed to the peer and accepted from it.
    #[serde(default, with = "string_serde::vec")]
    pub allowed_ips: Vec<IpNet>,
    /// `IP:PORT` or `host:port` (resolved, and retried, at start).
    #[serde(default, with = "string_serde::option")]
    pub endpoint: Option<Endpoint>,
    /// Keepalive interval in seconds.
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
}

impl From<PeerSection> for StaticPeer {
    fn from(p: PeerSection) -> Self {
        Self {
            public_key: p.public_key,
            preshared_key: p.preshared_key,
            allowed_ips: p.allowed_ips,
            endpoint: p.endpoint,
            persistent_keepalive: p.persistent_keepalive,
        }
    }
}

impl From<StaticPeer> for PeerSection {
    fn from(p: StaticPeer) -> Self {
        Self {
            public_key: p.public_key,
            preshared_key: p.preshared_key,
            allowed_ips: p.allowed_ips,
            endpoint: p.endpoint,
            persistent_keepalive: p.persistent_keepalive,
        }
    }
}

/// Serde through `Display` and `FromStr`.
mod string_serde {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<T: Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr<Err: Display>,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(d)?;
        text.parse().map_err(D::Error::custom)
    }

    pub mod option {
        use super::*;

        pub fn serialize<T: Display, S: Serializer>(
            value: &Option<T>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match value {
                Some(v) => s.collect_str(v),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
        where
            T: FromStr<Err: Display>,
            D: Deserializer<'de>,
        {
            Option::<String>::deserialize(d)?
                .map(|text| text.parse().map_err(D::Error::custom))
                .transpose()
        }
    }

    pub mod vec {
        use serde::ser::SerializeSeq as _;

        use super::*;

        pub fn serialize<T: Display, S: Serializer>(values: &[T], s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(values.len()))?;
            for v in values {
                seq.serialize_element(&v.to_string())?;
            }
            seq.end()
        }

        pub fn deserialize<'de, T, D>(d: D) -> Result<Vec<T>, D::Error>
        where
            T: FromStr<Err: Display>,
            D: Deserializer<'de>,
        {
            Vec::<String>::deserialize(d)?
                .into_iter()
                .map(|text| text.parse().map_err(D::Error::custom))
                .collect()
        }
    }
}

/// Serde of an optional private key as its base64 string.
mod private_key_serde {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};
    use tailnode_wg::PrivateKey;

    pub fn serialize<S: Serializer>(key: &Option<PrivateKey>, s: S) -> Result<S::Ok, S::Error> {
        match key {
            Some(key) => s.serialize_str(&key.to_base64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PrivateKey>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| text.trim().parse().map_err(D::Error::custom))
            .transpose()
    }
}

/// Serde of an optional preshared key as its base64 string.
mod preshared_key_serde {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};
    use tailnode_wg::PresharedKey;

    pub fn serialize<S: Serializer>(key: &Option<PresharedKey>, s: S) -> Result<S::Ok, S::Error> {
        match key {
            Some(key) => s.serialize_str(&key.to_base64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PresharedKey>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| text.trim().parse().map_err(D::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn socks_on(addr: &str) -> Config {
        Config {
            socks5: ListenAddr::On(addr.parse().unwrap()),
            ..Config::default()
        }
    }

    #[test]
    fn public_proxies_need_credentials_or_the_explicit_setting() {
        for loopback in [
            "127.0.0.1:1080",
            "127.3.4.5:1080",
            "[::1]:1080",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(socks_on(loopback).validate().is_ok(), "{loopback}");
        }
        for public in ["0.0.0.0:1080", "[::]:1080", "192.0.2.1:1080"] {
            let error = socks_on(public).validate().expect_err(public);
            assert!(matches!(error, ConfigError::PublicProxy { .. }));
            let flags = error.message(|s| format!("--{}", s.replace('_', "-")));
            assert!(flags.contains("--socks5-insecure-public"), "{flags}");
            let mut config = socks_on(public);
            config.socks5_insecure_public = true;
            assert!(config.validate().is_ok(), "{public} with the setting");
            let mut config = socks_on(public);
            config.socks5_user = Some("alice".into());
            config.socks5_pass = Some("s3cret".into());
            assert!(config.validate().is_ok(), "{public} with credentials");
        }
        let http = Config {
            http_proxy: ListenAddr::On("0.0.0.0:3128".parse().unwrap()),
            ..Config::default()
        };
        assert!(matches!(
            http.validate(),
            Err(ConfigError::PublicProxy {
                setting: "http_proxy",
                ..
            })
        ));
    }

    #[test]
    fn credentials_come_in_pairs_and_fit_rfc1929() {
        let mut config = Config::default();
        assert!(matches!(config.proxy_credentials(), Ok(None)));
        config.socks5_user = Some("alice".into());
        assert!(config.validate().is_err(), "user without password");
        config.socks5_pass = Some("s3cret".into());
        let credentials = config.proxy_credentials().unwrap().unwrap();
        assert!(credentials.verify(b"alice", b"s3cret"));
        config.socks5_user = None;
        assert!(config.validate().is_err(), "password without user");
        config.socks5_user = Some("u".repeat(256));
        assert!(config.validate().is_err(), "username too long");
        config.socks5_user = Some(String::new());
        assert!(config.validate().is_err(), "empty username");
    }

    #[test]
    fn durations_must_be_positive_and_a_coordinator_needs_a_key() {
        let config = Config {
            dial_timeout: Duration::ZERO,
            ..Config::default()
        };
        assert_eq!(
            config.validate(),
            Err(ConfigError::ZeroDuration("dial_timeout"))
        );
        assert_eq!(
            ConfigError::ZeroDuration("dial_timeout").message(|s| format!("--{s}")),
            "--dial_timeout must be greater than 0"
        );
        let mut config = Config {
            coordinator: Some("ws://127.0.0.1:1".parse().unwrap()),
            ..Config::default()
        };
        assert_eq!(config.validate(), Err(ConfigError::MissingAuthKey));
        config.auth_key = Some("k".into());
        assert!(config.validate().is_ok());
        config.name = Some("  ".into());
        assert_eq!(config.validate(), Err(ConfigError::EmptyName));
    }

    #[test]
    fn every_setting_deserializes_from_toml_and_round_trips() {
        let key = PrivateKey::generate();
        let peer = PrivateKey::generate().public_key();
        let text = format!(
            r#"
            wg_config = "/etc/tailnode/wg0.conf"
            private_key = "{}"
            key_file = "/var/lib/tailnode/node.key"
            addresses = ["100.64.0.1", "fd7a:115c:a1e0::1"]
            listen_port = 51820
            mtu = 1280
            coordinator = "wss://coord.example:8443"
            name = "db"
            auth_key = "s3cret"
            coordinator_ca = "/etc/ca.pem"
            dial_timeout = "5s"
            retry_max_backoff = "1m"
            ping_interval = "2s"
            lost_peer_timeout = "20m"
            endpoint = ["192.0.2.1:41641"]
            socks5 = "off"
            socks5_direct = true
            socks5_user = "alice"
            socks5_pass = "pw"
            socks5_insecure_public = true
            http_proxy = "127.0.0.1:3128"
            forward = ["tcp:8080=100.64.0.2:80", "udp:5353=100.64.0.2:53"]
            expose = ["22", "8000=127.0.0.1:9000"]
            udp_idle_timeout = "30s"
            connect_timeout = "2m"
            api = "127.0.0.1:4040"
            metrics = "127.0.0.1:9100"

            [[peers]]
            public_key = "{}"
            allowed_ips = ["100.64.0.2/32"]
            endpoint = "peer.example:51820"
            persistent_keepalive = 25
            "#,
            key.to_base64(),
            peer.to_base64()
        );
        let config: Config = toml::from_str(&text).unwrap();
        assert_eq!(config.private_key, Some(key));
        assert_eq!(config.dial_timeout, Duration::from_secs(5));
        assert_eq!(config.socks5, ListenAddr::Off);
        assert_eq!(config.forward.len(), 2);
        assert_eq!(config.expose[1].target_port, 9000);
        assert_eq!(
            config.api,
            Some(ApiAddr::Tcp("127.0.0.1:4040".parse().unwrap()))
        );
        assert_eq!(config.peers[0].public_key, peer);
        assert_eq!(
            config.peers[0].endpoint,
            Some(Endpoint::Host {
                host: "peer.example".into(),
                port: 51820
            })
        );
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("\"pw\""),
            "{shown}"
        );
        let json = serde_json::to_string(&config).unwrap();
        let back: Config = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
        assert!(toml::from_str::<Config>("socks5_proxy = true").is_err());
        assert!(toml::from_str::<Config>("dial_timeout = \"soon\"").is_err());
        assert!(toml::from_str::<Config>("socks5 = \"nowhere\"").is_err());
    }

    #[test]
    fn defaults_are_those_of_tailnode_up() {
        let config = Config::default();
        assert_eq!(config.socks5, ListenAddr::On(DEFAULT_SOCKS5));
        assert_eq!(config.http_proxy, ListenAddr::Off);
        assert_eq!(config.lost_peer_timeout, Duration::from_secs(15 * 60));
        assert_eq!(config.connect_timeout, Duration::from_secs(15));
        assert!(config.validate().is_ok());
        let embedded = Config::embedded();
        assert_eq!(embedded.socks5, ListenAddr::Off);
        assert_eq!(embedded.api, Some(ApiAddr::Off));
    }
}
