//! TLS to upstream targets (rustls with the *ring* provider).
//!
//! The `ClientConfig` is built once per upstream when the config is compiled and shared by its
//! targets, workers and health checkers through an `Arc`; a connection only runs the handshake.
//! Certificates are always verified: there is no setting that turns verification off.

use std::sync::{Arc, OnceLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::Protocol;
use super::connect::ConnectError;

/// How a target's TLS connections are made: the upstream's shared config and the name sent
/// as SNI and checked against the certificate. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TargetTls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// Builds an upstream's client config. `client` is the certificate chain and key presented for
/// mutual TLS. ALPN offers only the upstream's protocol, so a server that cannot speak it fails
/// the handshake or is caught right after it.
pub fn client_config(
    roots: RootCertStore,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    protocol: Protocol,
) -> Result<ClientConfig, rustls::Error> {
    let mut config = verifying_config(roots, client)?;
    config.alpn_protocols = vec![match protocol {
        Protocol::Http1 => b"http/1.1".to_vec(),
        Protocol::Http2 => b"h2".to_vec(),
    }];
    Ok(config)
}

/// A client config that verifies the server against `roots` (the *ring* provider, rustls's
/// safe protocol versions), presenting `client` when given; no ALPN. Upstreams add theirs
/// ([`client_config`]); the rate-limit store's `rediss://` connections use it as it is.
pub fn verifying_config(
    roots: impl Into<Arc<RootCertStore>>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    })
}

/// The operating system's root certificates (rustls-native-certs), loaded once per process.
/// Certificates that do not parse are skipped; `None` when none could be loaded.
pub fn system_roots() -> Option<Arc<RootCertStore>> {
    static ROOTS: OnceLock<Option<Arc<RootCertStore>>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's root certificates");
            }
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(found.certs);
            (!roots.is_empty()).then(|| Arc::new(roots))
        })
        .clone()
}

/// Runs the TLS handshake on a connected stream. With `protocol` HTTP/2 the server must have
/// chosen `h2` by ALPN.
pub(crate) async fn handshake(
    stream: TcpStream,
    tls: &TargetTls,
    protocol: Protocol,
    addr: &str,
) -> Result<TlsStream<TcpStream>, ConnectError> {
    let connector = TlsConnector::from(Arc::clone(&tls.config));
    let stream = connector
        .connect(tls.server_name.clone(), stream)
        .await
        .map_err(|e| ConnectError::Tls(format!("{addr}: {e}")))?;
    if protocol == Protocol::Http2 {
        let (_, session) = stream.get_ref();
        if session.alpn_protocol() != Some(b"h2") {
            return Err(ConnectError::Tls(format!(
                "{addr}: the server did not agree to HTTP/2 (ALPN h2); set protocol = \"http1\" \
                 or enable HTTP/2 on the server"
            )));
        }
    }
    Ok(stream)
}
