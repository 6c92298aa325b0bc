//! Test support (feature `testing`): a simulated network on which whole nodes and a
//! coordinator run in one process ([`sim`]).

pub mod sim;
