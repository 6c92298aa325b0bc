//! WireGuard keys: Curve25519 private and public keys and preshared keys,
//! in the base64 text form used by `wg genkey`, `wg pubkey` and wg-quick files.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use x25519_dalek::{PublicKey as DalekPublic, StaticSecret};

/// Length in bytes of every WireGuard key.
pub const KEY_LEN: usize = 32;

/// A key that is not 32 bytes of standard base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text is not valid base64.
    #[error("key is not valid base64")]
    Base64,
    /// The decoded key does not have 32 bytes.
    #[error("key must be 32 bytes (44 base64 characters), got {0} bytes")]
    Length(usize),
}

fn decode_key(text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let bytes = BASE64.decode(text.trim()).map_err(|_| KeyError::Base64)?;
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// A node's static X25519 private key.
///
/// `Debug` never prints the key material.
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

impl PrivateKey {
    /// A new random key, clamped as `wg genkey` does so that the text form is
    /// byte-compatible with wireguard-tools.
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand::Rng::fill(&mut rand::rngs::OsRng, &mut bytes[..]);
        Self::from_bytes(clamp(bytes))
    }

    /// The key from its raw bytes (not clamped: X25519 clamps when it uses it).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(StaticSecret::from(bytes))
    }

    /// The raw bytes of the key.
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.0.to_bytes()
    }

    /// The public key that belongs to this private key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(DalekPublic::from(&self.0).to_bytes())
    }

    /// The key as boringtun and x25519-dalek take it.
    pub fn to_static_secret(&self) -> StaticSecret {
        self.0.clone()
    }

    /// The base64 text form (as printed by `wg genkey`).
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0.to_bytes())
    }
}

/// Clamps a scalar as RFC 7748 §5 and `wg genkey` do.
fn clamp(mut bytes: [u8; KEY_LEN]) -> [u8; KEY_LEN] {
    bytes[0] &= 248;
    bytes[31] &= 127;
    bytes[31] |= 64;
    bytes
}

impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode_key(s).map(Self::from_bytes)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public={})", self.public_key())
    }
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        subtle_eq(&self.0.to_bytes(), &other.0.to_bytes())
    }
}
impl Eq for PrivateKey {}

fn subtle_eq(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A node's static X25519 public key: the identity of a WireGuard peer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// The key from its raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw bytes of the key.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key as boringtun and x25519-dalek take it.
    pub fn to_dalek(&self) -> DalekPublic {
        DalekPublic::from(self.0)
    }

    /// The base64 text form (as printed by `wg pubkey`).
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// A short form for logs: the first 8 base64 characters.
    pub fn short(&self) -> String {
        let mut s = self.to_base64();
        s.truncate(8);
        s
    }

    /// Whether this is a usable X25519 public key: not one of the small-order
    /// points whose shared secret is all zeroes (RFC 7748 §6.1).
    pub fn is_valid_x25519(&self) -> bool {
        let probe = StaticSecret::from([0x5a; KEY_LEN]);
        let shared = probe.diffie_hellman(&self.to_dalek());
        shared.was_contributory()
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode_key(s).map(Self)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

/// An optional symmetric key mixed into the handshake (wg's `PresharedKey`).
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey([u8; KEY_LEN]);

impl PresharedKey {
    /// The key from its raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw bytes of the key.
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.0
    }

    /// The base64 text form (as printed by `wg genpsk`).
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }
}

impl FromStr for PresharedKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode_key(s).map(Self)
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_and_public_key() {
        let key = PrivateKey::generate();
        let text = key.to_base64();
        assert_eq!(text.len(), 44);
        let parsed: PrivateKey = text.parse().expect("parses");
        assert_eq!(parsed, key);
        assert_eq!(parsed.public_key(), key.public_key());
        let bytes = key.to_bytes();
        assert_eq!(bytes[0] & 7, 0, "clamped low bits");
        assert_eq!(bytes[31] & 0xc0, 0x40, "clamped high bits");
    }

    #[test]
    fn known_vector_matches_wg_pubkey() {
        // RFC 7748 §6.1 Alice's key pair.
        let private: [u8; 32] = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2,
            0x66, 0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5,
            0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let public: [u8; 32] = [
            0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e,
            0xf7, 0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e,
            0xaa, 0x9b, 0x4e, 0x6a,
        ];
        assert_eq!(
            PrivateKey::from_bytes(private).public_key().as_bytes(),
            &public
        );
    }

    #[test]
    fn bad_keys_are_rejected() {
        assert_eq!("not base64!".parse::<PublicKey>(), Err(KeyError::Base64));
        assert_eq!("AAAA".parse::<PublicKey>(), Err(KeyError::Length(3)));
        let zero = PublicKey::from_bytes([0; 32]);
        assert!(!zero.is_valid_x25519());
        assert!(PrivateKey::generate().public_key().is_valid_x25519());
    }
}
