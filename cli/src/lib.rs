//! tailnode library
