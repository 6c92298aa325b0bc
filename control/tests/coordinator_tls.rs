//! The coordinator behind TLS: a `wss://` client that trusts an rcgen-made
//! certificate joins; one that does not trust it fails; the server keeps
//! serving. Bad TLS files are start-up errors.
#![allow(clippy::unwrap_used, missing_docs)]

mod coordinator_support;

use std::sync::Arc;

use coordinator_support::*;
use tailnode_control::coordinator::{CoordinatorError, TlsFiles};
use tailnode_control::proto::{NODE_PATH, ServerMessage};
use tokio_tungstenite::Connector;

fn client_config(trusted: Option<&rcgen::Certificate>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(cert) = trusted {
        roots.add(cert.der().clone()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

#[tokio::test]
async fn wss_client_with_the_ca_joins() {
    let dir = temp_dir("tls");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();

    let mut cfg = config(&dir);
    cfg.tls = Some(TlsFiles {
        cert: cert_path.clone(),
        key: key_path.clone(),
    });
    let c = Coordinator::start(cfg).await.unwrap();
    let url = format!("wss://localhost:{}{NODE_PATH}", c.addr.port());

    // Untrusted: the handshake fails on the client side.
    let untrusted = tokio_tungstenite::connect_async_tls_with_config(
        url.as_str(),
        None,
        false,
        Some(Connector::Rustls(client_config(None))),
    )
    .await;
    assert!(untrusted.is_err());

    // Trusted: a full join.
    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        url.as_str(),
        None,
        false,
        Some(Connector::Rustls(client_config(Some(&certified.cert)))),
    )
    .await
    .unwrap();
    send(&mut ws, &hello(1, "secure")).await;
    match recv(&mut ws).await {
        ServerMessage::Welcome { name, .. } => assert_eq!(name, "secure"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        recv(&mut ws).await,
        ServerMessage::Snapshot { .. }
    ));

    // Plain websocket on the TLS port gets nowhere, and nothing breaks.
    let plain = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::connect_async(format!("ws://{}{NODE_PATH}", c.addr)),
    )
    .await
    .expect("plain attempt ends");
    assert!(plain.is_err());
    let (mut ws2, _) = tokio_tungstenite::connect_async_tls_with_config(
        url.as_str(),
        None,
        false,
        Some(Connector::Rustls(client_config(Some(&certified.cert)))),
    )
    .await
    .unwrap();
    send(&mut ws2, &hello(2, "second")).await;
    assert!(matches!(
        recv(&mut ws2).await,
        ServerMessage::Welcome { .. }
    ));
    // The first node hears about the second.
    match recv(&mut ws).await {
        ServerMessage::PeerUpdate { peer, .. } => assert_eq!(peer.name, "second"),
        other => panic!("{other:?}"),
    }
    c.stop().await;

    // A key that does not fit the certificate, and a missing file.
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(&key_path, other.serialize_pem()).unwrap();
    let mut cfg = config(&dir);
    cfg.tls = Some(TlsFiles {
        cert: cert_path.clone(),
        key: key_path.clone(),
    });
    let err = Coordinator::start(cfg)
        .await
        .err()
        .expect("mismatched key refused");
    assert!(matches!(err, CoordinatorError::Tls { .. }), "{err}");
    let mut cfg = config(&dir);
    cfg.tls = Some(TlsFiles {
        cert: dir.join("nope.pem"),
        key: key_path,
    });
    let err = Coordinator::start(cfg)
        .await
        .err()
        .expect("missing cert refused");
    assert!(err.to_string().contains("nope.pem"), "{err}");
}
