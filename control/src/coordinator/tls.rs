//! Optional TLS in front of the coordinator (rustls with the `ring`
//! provider, set per config so no process-global provider is needed).

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::CoordinatorError;

/// A rustls server config from a PEM certificate chain and a PEM private
/// key, offering ALPN `http/1.1`.
///
/// # Errors
/// [`CoordinatorError::Tls`] naming the file or the problem.
pub fn server_config(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ServerConfig>, CoordinatorError> {
    let tls_err = |path: &Path, reason: String| CoordinatorError::Tls {
        path: path.to_owned(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| tls_err(cert_path, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(tls_err(cert_path, "no certificate in the file".into()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key_path).map_err(|e| tls_err(key_path, e.to_string()))?;
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(cert_path, e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| tls_err(key_path, format!("certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
