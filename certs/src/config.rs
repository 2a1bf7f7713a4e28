//! quinn client and server configurations built on qpeer identities.
//!
//! TLS 1.3 only, ring provider. All three TLS 1.3 suites stay enabled: QUIC Initial packets
//! need AES-128-GCM, and AES-GCM is what this hardware accelerates.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use crate::error::TlsError;
use crate::verify::{AnyNodeClientVerifier, ExpectedPeer, PinnedServerVerifier};
use crate::{Identity, NodeId};

/// The SNI name qpeer sends when it identifies servers by NodeId (the name is not checked).
pub const PINNED_SERVER_NAME: &str = "qpeer";

/// The ring provider restricted to TLS 1.3 suites.
pub fn crypto_provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.retain(|suite| suite.version() == &rustls::version::TLS13);
    provider
}

/// How a dialer authenticates the server it connects to.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// The server must hold this NodeId's key.
    Pinned(NodeId),
    /// Any Ed25519 server key; the caller checks the id after the handshake (trust on first use).
    FirstUse,
    /// A server certificate chaining to one of these roots, for the name dialed.
    Ca(Arc<RootCertStore>),
}

/// A client config that presents `identity` (mutual TLS) and trusts servers per `trust`.
pub fn client_config(
    identity: &Identity,
    trust: &ServerTrust,
    alpn: &[&[u8]],
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = Arc::new(crypto_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        ServerTrust::Pinned(id) => builder
            .dangerous()
            .with_custom_certificate_verifier(PinnedServerVerifier::new(ExpectedPeer::Pinned(*id))),
        ServerTrust::FirstUse => {
            builder.dangerous().with_custom_certificate_verifier(PinnedServerVerifier::new(ExpectedPeer::Any))
        }
        ServerTrust::Ca(roots) => {
            let verifier =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider)
                    .build()
                    .map_err(|e| TlsError::Quic(e.to_string()))?;
            builder.with_webpki_verifier(verifier)
        }
    };
    let mut tls =
        builder.with_client_auth_cert(vec![identity.self_signed_cert()?], identity.private_key_der())?;
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let quic =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// A server config presenting `identity`'s self-signed certificate, requiring client certificates.
pub fn server_config(identity: &Identity, alpn: &[&[u8]]) -> Result<quinn::ServerConfig, TlsError> {
    server_config_with_cert(vec![identity.self_signed_cert()?], identity.private_key_der(), alpn)
}

/// A server config presenting the given certificate chain (e.g. CA-issued), requiring client
/// certificates from qpeer nodes.
pub fn server_config_with_cert(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(crypto_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(AnyNodeClientVerifier::new())
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // qpeer clients do not resume sessions: issuing tickets would only cost CPU and memory.
    tls.send_tls13_tickets = 0;
    let quic =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// Endpoint settings that survive a restart: the stateless-reset key and the key that
/// validates connection IDs both derive from the identity. A restarted process then
/// recognizes its predecessor's connection IDs and answers their packets with resets the
/// peers accept, so they notice at once that the old connection is gone.
pub fn endpoint_config(identity: &Identity) -> quinn::EndpointConfig {
    let secret = identity.derive_secret(b"qpeer stateless reset key");
    let mut config =
        quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret)));
    let cid_secret = identity.derive_secret(b"qpeer connection id key");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid_secret[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    // After a restart every node's next packet draws a reset; quinn's default of one per 20 ms
    // would make most of them wait for the idle timeout. A reset is smaller than the packet
    // that caused it, so a faster rate amplifies nothing.
    config.min_reset_interval(Duration::from_millis(1));
    config
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::BadFile {
            path: path.to_path_buf(),
            reason: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadFile {
            path: path.to_path_buf(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::BadFile {
        path: path.to_path_buf(),
        reason: format!("not a PEM private key: {e}"),
    })
}

/// Builds a root store from a PEM file of CA certificates (`--tracker-ca`).
pub fn load_ca_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::BadFile {
            path: path.to_path_buf(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}
