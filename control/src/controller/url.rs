//! The coordinator's address: `ws://`, `wss://`, `http://` (= ws) or
//! `https://` (= wss) URLs (RFC 6455 §3), completed with the default port
//! and [`NODE_PATH`].

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use crate::proto::NODE_PATH;

/// Where the coordinator listens, parsed from a URL such as
/// `wss://coord.example.com`, `http://127.0.0.1:8080` or `ws://[::1]:9/x`.
///
/// A missing path or `/` becomes [`NODE_PATH`]; a missing port becomes 80
/// (`ws`/`http`) or 443 (`wss`/`https`). `Display` prints the websocket URL
/// (`ws://` or `wss://`), which is what the transport dials.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CoordinatorUrl {
    tls: bool,
    host: Host,
    port: u16,
    path: String,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Host {
    Name(String),
    V6(Ipv6Addr),
}

/// Why a coordinator URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The text has no `scheme://` prefix.
    #[error("coordinator URL {0:?} has no scheme (expected ws://, wss://, http:// or https://)")]
    MissingScheme(String),
    /// The scheme is not one of ws, wss, http, https.
    #[error("unsupported scheme {0:?} in coordinator URL (expected ws, wss, http or https)")]
    UnsupportedScheme(String),
    /// Nothing between `://` and the port or path.
    #[error("coordinator URL has no host")]
    MissingHost,
    /// The host is neither a DNS name, an IPv4 address nor a bracketed IPv6 literal.
    #[error("invalid host {0:?} in coordinator URL (IPv6 literals go in brackets: [::1])")]
    InvalidHost(String),
    /// The port is not a number in 1..=65535.
    #[error("invalid port {0:?} in coordinator URL")]
    InvalidPort(String),
    /// The path contains whitespace or control characters.
    #[error("invalid path {0:?} in coordinator URL")]
    InvalidPath(String),
    /// The URL carries `user:password@`, which the protocol does not use.
    #[error("credentials in the coordinator URL are not supported (use the auth key)")]
    UserInfo,
    /// The URL has a `#fragment`, which has no meaning for a websocket.
    #[error("a fragment (#...) is not allowed in a coordinator URL")]
    Fragment,
}

impl CoordinatorUrl {
    /// Whether the connection uses TLS (`wss`).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The host as used for DNS and TLS server name: a DNS name or IP
    /// address, without brackets.
    pub fn host(&self) -> String {
        match &self.host {
            Host::Name(n) => n.clone(),
            Host::V6(ip) => ip.to_string(),
        }
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The request path (with query, if any); never empty.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn default_port(&self) -> u16 {
        if self.tls { 443 } else { 80 }
    }
}

impl fmt::Display for CoordinatorUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.tls { "wss://" } else { "ws://" })?;
        match &self.host {
            Host::Name(n) => f.write_str(n)?,
            Host::V6(ip) => write!(f, "[{ip}]")?,
        }
        if self.port != self.default_port() {
            write!(f, ":{}", self.port)?;
        }
        f.write_str(&self.path)
    }
}

impl fmt::Debug for CoordinatorUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CoordinatorUrl({self})")
    }
}

impl FromStr for CoordinatorUrl {
    type Err = UrlError;

    fn from_str(text: &str) -> Result<Self, UrlError> {
        let text = text.trim();
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| UrlError::MissingScheme(text.to_owned()))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => false,
            "wss" | "https" => true,
            _ => return Err(UrlError::UnsupportedScheme(scheme.to_owned())),
        };
        if rest.contains('#') {
            return Err(UrlError::Fragment);
        }
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err(UrlError::UserInfo);
        }
        let (host, port) = split_host_port(authority)?;
        let port = match port {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(UrlError::InvalidPort(p.to_owned())),
            },
        };
        let path = if path.is_empty() || path == "/" {
            NODE_PATH.to_owned()
        } else if path.starts_with('?') {
            format!("{NODE_PATH}{path}")
        } else {
            path.to_owned()
        };
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(UrlError::InvalidPath(path));
        }
        Ok(CoordinatorUrl {
            tls,
            host,
            port,
            path,
        })
    }
}

/// Splits `host[:port]` or `[v6][:port]`.
fn split_host_port(authority: &str) -> Result<(Host, Option<&str>), UrlError> {
    if authority.is_empty() {
        return Err(UrlError::MissingHost);
    }
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (literal, after) = bracketed
            .split_once(']')
            .ok_or_else(|| UrlError::InvalidHost(authority.to_owned()))?;
        let ip: Ipv6Addr = literal
            .parse()
            .map_err(|_| UrlError::InvalidHost(authority.to_owned()))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| UrlError::InvalidHost(authority.to_owned()))?,
            ),
        };
        return Ok((Host::V6(ip), port));
    }
    if authority.matches(':').count() > 1 {
        // `::1:80` or similar: an IPv6 literal without brackets.
        return Err(UrlError::InvalidHost(authority.to_owned()));
    }
    let (host, port) = match authority.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    if host.is_empty() {
        return Err(UrlError::MissingHost);
    }
    let labels = host.strip_suffix('.').unwrap_or(host);
    let valid = host.len() <= 253
        && labels.split('.').all(|label| !label.is_empty())
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if !valid {
        return Err(UrlError::InvalidHost(host.to_owned()));
    }
    Ok((Host::Name(host.to_ascii_lowercase()), port))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<CoordinatorUrl, UrlError> {
        s.parse()
    }

    #[test]
    fn schemes_ports_and_paths() {
        let u = parse("wss://Coord.Example.com").unwrap();
        assert!(u.is_tls());
        assert_eq!(u.host(), "coord.example.com");
        assert_eq!(u.port(), 443);
        assert_eq!(u.path(), NODE_PATH);
        assert_eq!(u.to_string(), format!("wss://coord.example.com{NODE_PATH}"));

        let u = parse("http://127.0.0.1:8080/").unwrap();
        assert!(!u.is_tls());
        assert_eq!(u.port(), 8080);
        assert_eq!(u.to_string(), format!("ws://127.0.0.1:8080{NODE_PATH}"));

        let u = parse("https://c.example:8443/custom/path?x=1").unwrap();
        assert!(u.is_tls());
        assert_eq!(u.path(), "/custom/path?x=1");
        assert_eq!(u.to_string(), "wss://c.example:8443/custom/path?x=1");

        let u = parse("ws://h").unwrap();
        assert_eq!(u.port(), 80);
        let u = parse("WS://h:443").unwrap();
        assert_eq!(u.to_string(), format!("ws://h:443{NODE_PATH}"));
    }

    #[test]
    fn ipv6_literals_need_brackets() {
        let u = parse("ws://[::1]:9000").unwrap();
        assert_eq!(u.host(), "::1");
        assert_eq!(u.port(), 9000);
        assert_eq!(u.to_string(), format!("ws://[::1]:9000{NODE_PATH}"));
        let u = parse("wss://[fd7a:115c:a1e0::1]/p").unwrap();
        assert_eq!(u.port(), 443);
        assert_eq!(u.path(), "/p");
        assert!(matches!(
            parse("ws://::1:80"),
            Err(UrlError::InvalidHost(_))
        ));
        assert!(matches!(parse("ws://[::1"), Err(UrlError::InvalidHost(_))));
        assert!(matches!(
            parse("ws://[zz]:1"),
            Err(UrlError::InvalidHost(_))
        ));
        assert!(matches!(
            parse("ws://[::1]x"),
            Err(UrlError::InvalidHost(_))
        ));
    }

    #[test]
    fn clear_errors() {
        assert!(matches!(
            parse("ftp://h"),
            Err(UrlError::UnsupportedScheme(s)) if s == "ftp"
        ));
        assert!(matches!(parse("h:80"), Err(UrlError::MissingScheme(_))));
        assert_eq!(parse("ws://"), Err(UrlError::MissingHost));
        assert_eq!(parse("ws://:80"), Err(UrlError::MissingHost));
        assert_eq!(parse("ws:///path"), Err(UrlError::MissingHost));
        assert!(matches!(parse("ws://h:0"), Err(UrlError::InvalidPort(_))));
        assert!(matches!(
            parse("ws://h:65536"),
            Err(UrlError::InvalidPort(_))
        ));
        assert!(matches!(parse("ws://h:x"), Err(UrlError::InvalidPort(_))));
        assert!(matches!(parse("ws://h:"), Err(UrlError::InvalidPort(_))));
        assert_eq!(parse("ws://u:p@h"), Err(UrlError::UserInfo));
        assert_eq!(parse("ws://h/#frag"), Err(UrlError::Fragment));
        assert!(matches!(parse("ws://a b"), Err(UrlError::InvalidHost(_))));
        assert!(matches!(parse("ws://a..b"), Err(UrlError::InvalidHost(_))));
        assert!(matches!(parse("ws://h/a b"), Err(UrlError::InvalidPath(_))));
        assert_eq!(parse("ws://h.example.:1").unwrap().host(), "h.example.");
        let msg = parse("gopher://h").unwrap_err().to_string();
        assert!(msg.contains("gopher") && msg.contains("wss"), "{msg}");
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in ".{0,80}") {
            let _ = parse(&s);
        }

        #[test]
        fn display_round_trips(
            tls in proptest::bool::ANY,
            host in "[a-z][a-z0-9-]{0,10}(\\.[a-z0-9]{1,5}){0,3}",
            port in 1u16..,
            path in "(/[a-zA-Z0-9_.-]{1,8}){0,3}",
        ) {
            let text = format!("{}://{host}:{port}{path}", if tls { "wss" } else { "ws" });
            let url = parse(&text).unwrap();
            proptest::prop_assert_eq!(url.port(), port);
            proptest::prop_assert_eq!(url.host(), host);
            let again = parse(&url.to_string()).unwrap();
            proptest::prop_assert_eq!(again, url);
        }
    }
}
