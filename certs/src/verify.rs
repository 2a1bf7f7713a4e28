//! rustls certificate verifiers for qpeer's identity model.
//!
//! A qpeer peer presents exactly one self-signed Ed25519 certificate; only its key matters,
//! and that key *is* the peer's [`NodeId`]. Names, validity dates and issuers are ignored:
//! the TLS 1.3 CertificateVerify signature, checked with the certificate's key, proves the
//! peer holds the private key of the id it claims.
//!
//! - [`PinnedServerVerifier`] (dialing side) accepts only the expected NodeId, or with
//!   [`ExpectedPeer::Any`] any Ed25519 key (trust on first use: the caller checks the id after
//!   the handshake).
//! - [`AnyNodeClientVerifier`] (accepting side) requires a client certificate (mutual TLS),
//!   accepts any Ed25519 one, and the key becomes the peer's NodeId.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use x509_parser::oid_registry::OID_SIG_ED25519;

use crate::error::PeerCertError;
use crate::{NodeId, NODE_ID_LEN};

/// Extracts the NodeId from a peer's end-entity certificate, refusing anything but a lone
/// Ed25519 certificate.
pub fn node_id_from_cert(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<NodeId, PeerCertError> {
    if !intermediates.is_empty() {
        return Err(PeerCertError::ChainNotAllowed(intermediates.len() + 1));
    }
    let (rest, cert) = x509_parser::parse_x509_certificate(end_entity.as_ref())
        .map_err(|e| PeerCertError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PeerCertError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    let spki = cert.public_key();
    if spki.algorithm.algorithm != OID_SIG_ED25519 {
        return Err(PeerCertError::NotEd25519(key_type_name(&spki.algorithm.algorithm)));
    }
    let raw: [u8; NODE_ID_LEN] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| PeerCertError::Malformed("Ed25519 key is not 32 bytes".into()))?;
    Ok(NodeId::from_bytes(raw))
}

/// A human name for a public-key algorithm OID.
pub fn key_type_name(oid: &x509_parser::der_parser::oid::Oid<'_>) -> String {
    use x509_parser::oid_registry as r;
    if *oid == r::OID_SIG_ED25519 {
        "Ed25519".into()
    } else if *oid == r::OID_KEY_TYPE_EC_PUBLIC_KEY {
        "ECDSA".into()
    } else if *oid == r::OID_PKCS1_RSAENCRYPTION {
        "RSA".into()
    } else {
        format!("OID {oid}")
    }
}

/// Reads the peer's NodeId from an established quinn connection (its certificate was
/// verified in the handshake).
pub fn peer_node_id(conn: &quinn::Connection) -> Result<NodeId, PeerCertError> {
    let identity = conn.peer_identity().ok_or(PeerCertError::Missing)?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| PeerCertError::Missing)?;
    let (end_entity, intermediates) = certs.split_first().ok_or(PeerCertError::Missing)?;
    node_id_from_cert(end_entity, intermediates)
}

fn to_rustls(err: PeerCertError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// Recovers our typed reason from a rustls error produced by these verifiers.
pub fn peer_cert_error(err: &rustls::Error) -> Option<&PeerCertError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<PeerCertError>()
        }
        _ => None,
    }
}

fn ed25519_only() -> WebPkiSupportedAlgorithms {
    crate::config::crypto_provider().signature_verification_algorithms
}

fn verify_ed25519_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(to_rustls(PeerCertError::WrongSignatureScheme(format!("{:?}", dss.scheme))));
    }
    rustls::crypto::verify_tls13_signature(message, cert, dss, &ed25519_only())
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered)
}

/// Which server identity a dialer accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// Only this NodeId.
    Pinned(NodeId),
    /// Any Ed25519 key; the caller must check the id after the handshake (trust on first use).
    Any,
}

/// Dialing-side verifier: the server must be the expected NodeId.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    expected: ExpectedPeer,
}

impl PinnedServerVerifier {
    pub fn new(expected: ExpectedPeer) -> Arc<Self> {
        Arc::new(Self { expected })
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = node_id_from_cert(end_entity, intermediates).map_err(to_rustls)?;
        match self.expected {
            ExpectedPeer::Pinned(expected) if expected != actual => {
                Err(to_rustls(PeerCertError::WrongNodeId { expected, actual }))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Accepting-side verifier: a client certificate is required; any Ed25519 key is accepted
/// and becomes the peer's NodeId.
#[derive(Debug, Default)]
pub struct AnyNodeClientVerifier;

impl AnyNodeClientVerifier {
    pub fn new() -> Arc<Self> {
        Arc::new(Self)
    }
}

impl ClientCertVerifier for AnyNodeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        node_id_from_cert(end_entity, intermediates).map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}
