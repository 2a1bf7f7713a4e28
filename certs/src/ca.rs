//! A development certificate authority, for trackers that present CA-issued certificates
//! (`qpeer-certs ca` / `qpeer-certs issue`). Not for production PKI: keys are stored unencrypted.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use crate::error::TlsError;
use crate::identity::write_private_file;
use crate::verify::key_type_name;
use crate::NodeId;

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TlsError + 'a {
    move |source| TlsError::Io { action, path: path.to_path_buf(), source }
}

fn write_new(path: &Path, contents: &[u8], private: bool) -> Result<(), TlsError> {
    if path.exists() {
        return Err(TlsError::Exists { path: path.to_path_buf() });
    }
    if private {
        write_private_file(path, contents).map_err(io("write", path))
    } else {
        std::fs::write(path, contents).map_err(io("write", path))
    }
}

fn create_out_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(io("create directory", dir))
}

/// Paths of a written certificate and its key.
#[derive(Debug, Clone)]
pub struct WrittenPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates a dev CA (ECDSA P-256, valid `days`) in `out`: `ca.pem` and `ca.key` (0600).
/// Refuses to overwrite existing files.
pub fn create_ca(out: &Path, days: i64) -> Result<WrittenPair, TlsError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "qpeer dev CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
    let cert = params.self_signed(&key)?;
    create_out_dir(out)?;
    let pair = WrittenPair { cert: out.join(CA_CERT_FILE), key: out.join(CA_KEY_FILE) };
    write_new(&pair.key, key.serialize_pem().as_bytes(), true)?;
    write_new(&pair.cert, cert.pem().as_bytes(), false)?;
    Ok(pair)
}

/// What a server certificate is issued for, and when it is valid.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl IssueRequest {
    /// Valid from an hour ago for `days` days.
    pub fn new(dns_names: Vec<String>, ips: Vec<IpAddr>, days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self { dns_names, ips, not_before: now - Duration::hours(1), not_after: now + Duration::days(days) }
    }
}

/// Issues a server certificate + key (PEM) signed by the CA in `ca_dir`. Returns (cert DER, key PEM).
pub fn issue(
    ca_dir: &Path,
    request: &IssueRequest,
) -> Result<(CertificateDer<'static>, String, String), TlsError> {
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(io("read", &ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| TlsError::BadFile { path: ca_key_path.clone(), reason: e.to_string() })?;
    let ca_cert_pem = std::fs::read_to_string(&ca_cert_path).map_err(io("read", &ca_cert_path))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key)
        .map_err(|e| TlsError::BadFile { path: ca_cert_path.clone(), reason: e.to_string() })?;

    let mut params = CertificateParams::new(request.dns_names.clone())?;
    params.subject_alt_names.extend(request.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let common_name = request
        .dns_names
        .first()
        .cloned()
        .or_else(|| request.ips.first().map(|ip| ip.to_string()))
        .unwrap_or_else(|| "qpeer-tracker".into());
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = request.not_before;
    params.not_after = request.not_after;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.der().clone(), cert.pem(), key.serialize_pem()))
}

/// Issues a certificate and writes `cert.pem` + `key.pem` (0600) into `out`, never overwriting.
pub fn issue_to_dir(ca_dir: &Path, request: &IssueRequest, out: &Path) -> Result<WrittenPair, TlsError> {
    let (_, cert_pem, key_pem) = issue(ca_dir, request)?;
    create_out_dir(out)?;
    let pair = WrittenPair { cert: out.join(CERT_FILE), key: out.join(KEY_FILE) };
    write_new(&pair.key, key_pem.as_bytes(), true)?;
    write_new(&pair.cert, cert_pem.as_bytes(), false)?;
    Ok(pair)
}

/// A readable summary of a certificate (`qpeer-certs show`).
#[derive(Debug, Clone)]
pub struct CertSummary {
    pub subject: String,
    pub issuer: String,
    pub key_type: String,
    pub not_before: String,
    pub not_after: String,
    /// The NodeId when the key is Ed25519.
    pub node_id: Option<NodeId>,
    /// SHA-256 of the DER certificate, hex.
    pub sha256: String,
}

pub fn summarize(der: &CertificateDer<'_>) -> Result<CertSummary, TlsError> {
    let bad = |reason: String| TlsError::BadFile { path: PathBuf::from("<certificate>"), reason };
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| bad(e.to_string()))?;
    let node_id = crate::verify::node_id_from_cert(der, &[]).ok();
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    Ok(CertSummary {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        key_type: key_type_name(&cert.public_key().algorithm.algorithm),
        not_before: cert.validity().not_before.to_string(),
        not_after: cert.validity().not_after.to_string(),
        node_id,
        sha256: hex::encode(digest.as_ref()),
    })
}
