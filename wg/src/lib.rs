//! The WireGuard engine of tailnode (placeholder: being written).
pub mod keys;
pub use keys::{KeyError, PrivateKey, PresharedKey, PublicKey};
