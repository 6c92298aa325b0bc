//! The coordination protocol, version 1: JSON messages in websocket text
//! frames between a node and the coordinator. `control/PROTOCOL.md` is the
//! prose specification; this module is its single source of truth in code.
//!
//! A session is: node → `hello`; coordinator → `welcome`, then `snapshot`
//! (the full peer set), then `peer_update`s as the tailnet changes; the node
//! may send `update` (its endpoints changed) at any time and `goodbye` before
//! it closes. Any protocol error is answered with `error` and a close.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The protocol version this code speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Path of the websocket endpoint for nodes. A coordinator URL without a
/// path is completed with it.
pub const NODE_PATH: &str = "/tailnode/v1/node";

/// Health check path of the coordinator (`GET`, answers `200 ok`).
pub const HEALTH_PATH: &str = "/healthz";

/// Largest message a node may send (a `hello` is well under 1 KiB).
pub const MAX_CLIENT_MESSAGE: usize = 64 << 10;

/// Largest message the coordinator sends (a snapshot of ~100 000 peers).
pub const MAX_SERVER_MESSAGE: usize = 64 << 20;

/// Longest node name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// Most endpoints a node may report.
pub const MAX_ENDPOINTS: usize = 32;

/// A node's WireGuard public key, the node's identity in the protocol.
/// On the wire: standard base64 of the 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeKey(pub [u8; 32]);

impl NodeKey {
    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether the key is a usable X25519 public key: not a small-order point
    /// whose shared secret is all zeroes (RFC 7748 §6.1).
    pub fn is_valid_x25519(&self) -> bool {
        let probe = x25519_dalek::StaticSecret::from([0x5a; 32]);
        probe
            .diffie_hellman(&x25519_dalek::PublicKey::from(self.0))
            .was_contributory()
    }

    /// First 8 base64 characters, for logs.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }
}

/// A node key that is not 32 bytes of base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node key must be 32 bytes of standard base64")]
pub struct NodeKeyError;

impl FromStr for NodeKey {
    type Err = NodeKeyError;
    fn from_str(s: &str) -> Result<Self, NodeKeyError> {
        let bytes = BASE64.decode(s.trim()).map_err(|_| NodeKeyError)?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map(NodeKey)
            .map_err(|_| NodeKeyError)
    }
}

impl fmt::Display for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.0))
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", self.short())
    }
}

impl Serialize for NodeKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for NodeKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Messages from a node to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// First message of every session.
    Hello {
        /// Protocol version the node speaks ([`PROTOCOL_VERSION`]).
        version: u32,
        /// The tailnet's shared auth key.
        auth_key: String,
        /// The node's WireGuard public key.
        node_key: NodeKey,
        /// The name the node asks for (the coordinator makes it DNS-safe and unique).
        name: String,
        /// The node's WireGuard UDP port (combined with the address the
        /// coordinator sees the node connect from into an endpoint).
        udp_port: u16,
        /// Endpoints the node found on its own interfaces.
        endpoints: Vec<SocketAddr>,
    },
    /// The node's endpoints changed ("self-update").
    Update {
        /// The new endpoint list.
        endpoints: Vec<SocketAddr>,
    },
    /// The node is shutting down: peers drop it at once.
    Goodbye,
}

/// Messages from the coordinator to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerMessage {
    /// The node is admitted; its assigned identity in the tailnet.
    Welcome {
        /// Protocol version of the coordinator.
        version: u32,
        /// The node's unique, DNS-safe name.
        name: String,
        /// The node's stable IPv4 address (in 100.64.0.0/10).
        ipv4: Ipv4Addr,
        /// The node's stable IPv6 address (in the tailnet's ULA /48).
        ipv6: Ipv6Addr,
        /// DNS domain of the tailnet (names resolve as `name` and `name.domain`).
        domain: String,
        /// The address the coordinator saw the node's connection come from.
        observed_addr: SocketAddr,
    },
    /// The full peer set (every other node), sent after `welcome`.
    Snapshot {
        /// All peers.
        peers: Vec<PeerInfo>,
    },
    /// One peer changed.
    PeerUpdate {
        /// What happened.
        kind: UpdateKind,
        /// The peer as it is now.
        peer: PeerInfo,
    },
    /// The coordinator refuses something; it closes the session after this.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable explanation.
        reason: String,
    },
}

/// What a `peer_update` says about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateKind {
    /// The peer joined or changed (keys, addresses, endpoints).
    Node,
    /// The peer said goodbye: drop it now.
    Disconnected,
    /// The peer's session broke without a goodbye: keep it while its
    /// handshakes stay fresh, drop it after the lost-peer timeout.
    Lost,
}

/// Whether the coordinator currently has a session with a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerStatus {
    /// Connected to the coordinator.
    Online,
    /// Its session broke without a goodbye.
    Lost,
}

/// What a node knows of another node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerInfo {
    /// The peer's WireGuard public key.
    pub node_key: NodeKey,
    /// The peer's name.
    pub name: String,
    /// The peer's IPv4 tailnet address.
    pub ipv4: Ipv4Addr,
    /// The peer's IPv6 tailnet address.
    pub ipv6: Ipv6Addr,
    /// UDP endpoints to try, best first.
    pub endpoints: Vec<SocketAddr>,
    /// Online or lost.
    pub status: PeerStatus,
}

/// Why the coordinator refused or ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The auth key is wrong.
    BadAuthKey,
    /// The node speaks a protocol version the coordinator does not.
    UnsupportedVersion,
    /// The message is not valid JSON of a known message type.
    MalformedMessage,
    /// The message exceeds the size limit.
    MessageTooLarge,
    /// The node key is not a valid X25519 public key.
    InvalidNodeKey,
    /// A message arrived out of order (e.g. anything before `hello`, a second `hello`).
    ProtocolViolation,
    /// A newer session of the same node replaced this one.
    Replaced,
    /// The coordinator cannot serve the node (address space exhausted, state file not writable, ...).
    Internal,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorCode::BadAuthKey => "bad auth key",
            ErrorCode::UnsupportedVersion => "unsupported protocol version",
            ErrorCode::MalformedMessage => "malformed message",
            ErrorCode::MessageTooLarge => "message too large",
            ErrorCode::InvalidNodeKey => "invalid node key",
            ErrorCode::ProtocolViolation => "protocol violation",
            ErrorCode::Replaced => "session replaced",
            ErrorCode::Internal => "coordinator error",
        };
        f.write_str(s)
    }
}

/// A message that could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Longer than the limit for its direction.
    #[error("message of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Not JSON of a known message.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

impl ClientMessage {
    /// Encodes as JSON text.
    pub fn to_json(&self) -> String {
        // Serializing these plain types cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Decodes JSON text, enforcing [`MAX_CLIENT_MESSAGE`].
    ///
    /// # Errors
    /// [`DecodeError`] for oversized or malformed input.
    pub fn from_json(text: &str) -> Result<Self, DecodeError> {
        if text.len() > MAX_CLIENT_MESSAGE {
            return Err(DecodeError::TooLarge {
                len: text.len(),
                limit: MAX_CLIENT_MESSAGE,
            });
        }
        Ok(serde_json::from_str(text)?)
    }
}

impl ServerMessage {
    /// Encodes as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Decodes JSON text, enforcing [`MAX_SERVER_MESSAGE`].
    ///
    /// # Errors
    /// [`DecodeError`] for oversized or malformed input.
    pub fn from_json(text: &str) -> Result<Self, DecodeError> {
        if text.len() > MAX_SERVER_MESSAGE {
            return Err(DecodeError::TooLarge {
                len: text.len(),
                limit: MAX_SERVER_MESSAGE,
            });
        }
        Ok(serde_json::from_str(text)?)
    }
}

/// Makes a wanted name DNS-safe: lowercase ASCII letters, digits and
/// hyphens, no leading or trailing hyphen, at most [`MAX_NAME_LEN`]
/// characters; other characters become hyphens. Empty results become `node`.
pub fn sanitize_name(wanted: &str) -> String {
    let mut out = String::with_capacity(wanted.len().min(MAX_NAME_LEN));
    for c in wanted.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
        if out.len() == MAX_NAME_LEN {
            break;
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        out.push_str("node");
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(b: u8) -> NodeKey {
        NodeKey([b; 32])
    }

    #[test]
    fn messages_round_trip_and_look_as_documented() {
        let hello = ClientMessage::Hello {
            version: 1,
            auth_key: "secret".into(),
            node_key: key(9),
            name: "laptop".into(),
            udp_port: 41641,
            endpoints: vec!["192.0.2.1:41641".parse().unwrap()],
        };
        let json = hello.to_json();
        assert!(
            json.starts_with(r#"{"type":"hello","version":1,"#),
            "{json}"
        );
        assert_eq!(ClientMessage::from_json(&json).unwrap(), hello);

        let update = ServerMessage::PeerUpdate {
            kind: UpdateKind::Lost,
            peer: PeerInfo {
                node_key: key(1),
                name: "db".into(),
                ipv4: Ipv4Addr::new(100, 64, 0, 2),
                ipv6: "fd7a:115c:a1e0::2".parse().unwrap(),
                endpoints: vec![],
                status: PeerStatus::Lost,
            },
        };
        let json = update.to_json();
        assert!(json.contains(r#""kind":"lost""#), "{json}");
        assert_eq!(ServerMessage::from_json(&json).unwrap(), update);
        assert_eq!(
            ClientMessage::from_json(r#"{"type":"goodbye"}"#).unwrap(),
            ClientMessage::Goodbye
        );
    }

    #[test]
    fn bad_messages_are_rejected() {
        for bad in [
            "",
            "{}",
            "[]",
            r#"{"type":"hello"}"#,
            r#"{"type":"nope"}"#,
            r#"{"type":"update","endpoints":["not an addr"]}"#,
        ] {
            assert!(ClientMessage::from_json(bad).is_err(), "{bad:?}");
        }
        let huge = format!(
            r#"{{"type":"update","endpoints":[],"x":"{}"}}"#,
            "a".repeat(MAX_CLIENT_MESSAGE)
        );
        assert!(matches!(
            ClientMessage::from_json(&huge),
            Err(DecodeError::TooLarge { .. })
        ));
        // A key of the wrong length.
        let short = r#"{"type":"hello","version":1,"auth_key":"k","node_key":"AAAA","name":"n","udp_port":1,"endpoints":[]}"#;
        assert!(ClientMessage::from_json(short).is_err());
    }

    #[test]
    fn node_key_validity() {
        assert!(!NodeKey([0; 32]).is_valid_x25519());
        let secret = x25519_dalek::StaticSecret::from([7u8; 32]);
        let public = x25519_dalek::PublicKey::from(&secret);
        assert!(NodeKey(public.to_bytes()).is_valid_x25519());
    }

    #[test]
    fn names_are_made_dns_safe() {
        assert_eq!(sanitize_name("My Laptop!"), "my-laptop");
        assert_eq!(sanitize_name("--db--1--"), "db-1");
        assert_eq!(sanitize_name("ÿÿ"), "node");
        assert_eq!(sanitize_name(&"x".repeat(100)).len(), MAX_NAME_LEN);
    }

    proptest::proptest! {
        #[test]
        fn decoding_never_panics(s in ".{0,300}") {
            let _ = ClientMessage::from_json(&s);
            let _ = ServerMessage::from_json(&s);
        }

        #[test]
        fn sanitized_names_are_dns_labels(s in ".{0,100}") {
            let n = sanitize_name(&s);
            proptest::prop_assert!(!n.is_empty() && n.len() <= MAX_NAME_LEN);
            proptest::prop_assert!(n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
            proptest::prop_assert!(!n.starts_with('-') && !n.ends_with('-'));
        }
    }
}
