//! Verifier tests: direct calls for each refusal reason, and real quinn handshakes on loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use qpeer_certs::ca::{self, IssueRequest};
use qpeer_certs::config::{self, crypto_provider, PINNED_SERVER_NAME};
use qpeer_certs::verify::{
    node_id_from_cert, peer_cert_error, AnyNodeClientVerifier, ExpectedPeer, PinnedServerVerifier,
};
use qpeer_certs::{client_config, peer_node_id, server_config, Identity, PeerCertError, ServerTrust};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::CertificateError;

const ALPN: &[u8] = b"qpeer-test/1";

fn identity() -> Identity {
    Identity::generate().expect("generate identity")
}

fn p256_self_signed() -> (CertificateDer<'static>, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256 key");
    let cert = rcgen::CertificateParams::new(vec!["qpeer".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("self-sign");
    (cert.der().clone(), key)
}

fn server_name() -> ServerName<'static> {
    ServerName::try_from(PINNED_SERVER_NAME).expect("name")
}

fn server_check(
    expected: ExpectedPeer,
    cert: &CertificateDer<'_>,
    chain: &[CertificateDer<'_>],
) -> Result<(), PeerCertError> {
    PinnedServerVerifier::new(expected)
        .verify_server_cert(cert, chain, &server_name(), &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| peer_cert_error(&e).cloned().unwrap_or_else(|| panic!("untyped error {e}")))
}

#[test]
fn pinned_verifier_accepts_the_right_id() {
    let id = identity();
    let cert = id.self_signed_cert().expect("cert");
    assert_eq!(server_check(ExpectedPeer::Pinned(id.node_id()), &cert, &[]), Ok(()));
    assert_eq!(node_id_from_cert(&cert, &[]), Ok(id.node_id()));
}

#[test]
fn pinned_verifier_rejects_each_bad_certificate_distinctly() {
    let id = identity();
    let other = identity();
    let cert = id.self_signed_cert().expect("cert");

    let wrong = server_check(ExpectedPeer::Pinned(other.node_id()), &cert, &[]);
    assert_eq!(wrong, Err(PeerCertError::WrongNodeId { expected: other.node_id(), actual: id.node_id() }));

    let (p256, _) = p256_self_signed();
    assert_eq!(server_check(ExpectedPeer::Any, &p256, &[]), Err(PeerCertError::NotEd25519("ECDSA".into())));

    let garbage = CertificateDer::from(b"\x30\x03not a certificate".to_vec());
    assert!(matches!(server_check(ExpectedPeer::Any, &garbage, &[]), Err(PeerCertError::Malformed(_))));

    let extra = other.self_signed_cert().expect("cert");
    assert_eq!(
        server_check(ExpectedPeer::Pinned(id.node_id()), &cert, &[extra]),
        Err(PeerCertError::ChainNotAllowed(2))
    );
}

#[test]
fn client_verifier_accepts_any_ed25519_and_rejects_others() {
    let verifier = AnyNodeClientVerifier::new();
    assert!(verifier.client_auth_mandatory());
    let cert = identity().self_signed_cert().expect("cert");
    assert!(verifier.verify_client_cert(&cert, &[], UnixTime::now()).is_ok());
    let (p256, _) = p256_self_signed();
    let err = verifier.verify_client_cert(&p256, &[], UnixTime::now()).expect_err("p256 refused");
    assert_eq!(peer_cert_error(&err), Some(&PeerCertError::NotEd25519("ECDSA".into())));
}

#[test]
fn expired_ca_issued_certificate_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    ca::create_ca(&ca_dir, 30).expect("create ca");
    let roots = config::load_ca_roots(&ca_dir.join(ca::CA_CERT_FILE)).expect("roots");
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, Arc::new(crypto_provider()))
            .build()
            .expect("verifier");
    let name = ServerName::try_from("tracker.test").expect("name");

    let fresh = IssueRequest::new(vec!["tracker.test".into()], vec![], 30);
    let (cert, _, _) = ca::issue(&ca_dir, &fresh).expect("issue");
    verifier
        .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
        .expect("a valid CA-issued certificate is accepted");

    let now = time::OffsetDateTime::now_utc();
    let expired = IssueRequest {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
        ..fresh
    };
    let (cert, _, _) = ca::issue(&ca_dir, &expired).expect("issue");
    let err = verifier
        .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
        .expect_err("expired must be refused");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ),
        "{err:?}"
    );
}

/// A quinn server on 127.0.0.1:0 with `server_id`; returns the endpoint and its address.
fn server(server_id: &Identity) -> (quinn::Endpoint, SocketAddr) {
    let config = server_config(server_id, &[ALPN]).expect("server config");
    let endpoint = quinn::Endpoint::server(config, (Ipv4Addr::LOCALHOST, 0).into()).expect("bind");
    let addr = endpoint.local_addr().expect("addr");
    (endpoint, addr)
}

fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into()).expect("bind client")
}

/// Dials with `config`; returns (client result, server-side result).
async fn handshake(
    config: quinn::ClientConfig,
    server: &quinn::Endpoint,
    addr: SocketAddr,
) -> (Result<quinn::Connection, quinn::ConnectionError>, Result<quinn::Connection, quinn::ConnectionError>) {
    let client = client_endpoint();
    let connecting = client.connect_with(config, addr, PINNED_SERVER_NAME).expect("connect");
    let incoming = server.accept().await.expect("incoming");
    let (client_side, server_side) = tokio::join!(connecting, incoming);
    (client_side, server_side)
}

#[tokio::test]
async fn mutual_tls_handshake_pins_both_ids() {
    let server_id = identity();
    let client_id = identity();
    let (endpoint, addr) = server(&server_id);
    let config =
        client_config(&client_id, &ServerTrust::Pinned(server_id.node_id()), &[ALPN]).expect("client config");
    let (client_side, server_side) = handshake(config, &endpoint, addr).await;
    let client_conn = client_side.expect("client connected");
    let server_conn = server_side.expect("server accepted");
    assert_eq!(peer_node_id(&server_conn), Ok(client_id.node_id()));
    assert_eq!(peer_node_id(&client_conn), Ok(server_id.node_id()));
}

#[tokio::test]
async fn handshake_with_wrong_pinned_id_fails() {
    let server_id = identity();
    let (endpoint, addr) = server(&server_id);
    let expected = identity().node_id();
    let config = client_config(&identity(), &ServerTrust::Pinned(expected), &[ALPN]).expect("client config");
    let (client_side, server_side) = handshake(config, &endpoint, addr).await;
    let err = client_side.expect_err("wrong id must fail").to_string();
    assert!(err.contains("WrongNodeId"), "{err}");
    assert!(server_side.is_err());
}

#[tokio::test]
async fn handshake_without_client_certificate_fails() {
    let server_id = identity();
    let (endpoint, addr) = server(&server_id);
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(crypto_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(PinnedServerVerifier::new(ExpectedPeer::Any))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic");
    let (_, server_side) = handshake(quinn::ClientConfig::new(Arc::new(quic)), &endpoint, addr).await;
    let err = server_side.expect_err("no client cert must be refused").to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

#[tokio::test]
async fn handshake_with_p256_client_certificate_fails() {
    let server_id = identity();
    let (endpoint, addr) = server(&server_id);
    let (cert, key) = p256_self_signed();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(crypto_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(PinnedServerVerifier::new(ExpectedPeer::Any))
        .with_client_auth_cert(vec![cert], key)
        .expect("client cert");
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic");
    let (_, server_side) = handshake(quinn::ClientConfig::new(Arc::new(quic)), &endpoint, addr).await;
    assert!(server_side.is_err(), "a P-256 client certificate must be refused");
}

#[tokio::test]
async fn ca_mode_server_is_verified_against_the_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    ca::create_ca(&ca_dir, 30).expect("create ca");
    let pair = ca::issue_to_dir(
        &ca_dir,
        &IssueRequest::new(vec![], vec![Ipv4Addr::LOCALHOST.into()], 30),
        &dir.path().join("tracker"),
    )
    .expect("issue");
    let server_cfg = config::server_config_with_cert(
        config::load_certs(&pair.cert).expect("certs"),
        config::load_private_key(&pair.key).expect("key"),
        &[ALPN],
    )
    .expect("server config");
    let endpoint = quinn::Endpoint::server(server_cfg, (Ipv4Addr::LOCALHOST, 0).into()).expect("bind");
    let addr = endpoint.local_addr().expect("addr");
    let roots = config::load_ca_roots(&ca_dir.join(ca::CA_CERT_FILE)).expect("roots");
    let client_cfg = client_config(&identity(), &ServerTrust::Ca(roots), &[ALPN]).expect("client config");
    let client = client_endpoint();
    let connecting = client.connect_with(client_cfg, addr, "127.0.0.1").expect("connect");
    let incoming = endpoint.accept().await.expect("incoming");
    let (client_side, server_side) = tokio::join!(connecting, incoming);
    client_side.expect("client trusts the CA-issued certificate");
    server_side.expect("server accepts the node");
}
