//! Error types of the certs crate.

use std::path::PathBuf;

use crate::NodeId;

/// Loading or creating a long-term identity failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no home directory: pass --home DIR or set QPEER_HOME")]
    NoHome,
    #[error("cannot {action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error(
        "key file {} has mode {mode:04o}: it must be readable only by its owner. \
         Fix it with: chmod 600 {}",
        path.display(), path.display()
    )]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error(
        "key file {} is corrupt ({reason}). It was left untouched. Restore it from a backup, \
         or move it away to create a new identity (that gives this node a new NodeId)",
        path.display()
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "key file {} holds a {found} key; qpeer identities are Ed25519. Move it away to create a new identity",
        path.display()
    )]
    WrongKeyType { path: PathBuf, found: String },
    #[error("key generation failed: {0}")]
    Generate(String),
}

/// Why a peer's certificate was refused. Each case is distinct so callers and tests can tell them apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerCertError {
    #[error("the peer presented no certificate")]
    Missing,
    #[error("the peer presented a chain of {0} certificates; qpeer peers present exactly one self-signed certificate")]
    ChainNotAllowed(usize),
    #[error("the peer's certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error("the peer's certificate key is {0}, not Ed25519")]
    NotEd25519(String),
    #[error("the peer is {actual}, but {expected} was expected")]
    WrongNodeId { expected: NodeId, actual: NodeId },
    #[error("signature scheme {0} is not accepted; qpeer peers sign with Ed25519")]
    WrongSignatureScheme(String),
}

/// Building a certificate, key file or TLS configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC crypto configuration failed: {0}")]
    Quic(String),
    #[error("cannot {action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    #[error("{} already exists; refusing to overwrite it", path.display())]
    Exists { path: PathBuf },
}
