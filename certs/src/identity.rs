//! The long-term Ed25519 identity of a node or tracker, kept as a PKCS#8 PEM file in its home.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{KeyPair, PKCS_ED25519};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::{IdentityError, TlsError};
use crate::home::ensure_home;
use crate::{NodeId, NODE_ID_LEN};

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// File name of the identity key inside a home directory.
pub const KEY_FILE: &str = "identity.key";

/// A long-term Ed25519 key pair. Its public key is the [`NodeId`].
pub struct Identity {
    key_pair: KeyPair,
    node_id: NodeId,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh identity that lives only in memory (tests, throwaway tools).
    pub fn generate() -> Result<Self, IdentityError> {
        let key_pair =
            KeyPair::generate_for(&PKCS_ED25519).map_err(|e| IdentityError::Generate(e.to_string()))?;
        Self::from_key_pair(key_pair, Path::new("<generated>"))
    }

    /// Loads the identity kept in `home`, creating it (and the home, mode 0700) on first use.
    ///
    /// An existing key file is never replaced: a file readable by group or others, a corrupt
    /// file or a non-Ed25519 key is refused with an error that says how to fix it.
    pub fn load_or_create(home: &Path) -> Result<Self, IdentityError> {
        let path = home.join(KEY_FILE);
        match Self::load(&path) {
            Err(IdentityError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                ensure_home(home)?;
                Self::create(&path)
            }
            other => other,
        }
    }

    /// Loads an existing key file, checking its permissions first.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let io_err = |action, source| IdentityError::Io { action, path: path.to_path_buf(), source };
        let metadata = std::fs::metadata(path).map_err(|e| io_err("read", e))?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::InsecurePermissions { path: path.to_path_buf(), mode });
        }
        let pem = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => {
                IdentityError::Corrupt { path: path.to_path_buf(), reason: "not a text file".into() }
            }
            _ => io_err("read", e),
        })?;
        let key_pair = KeyPair::from_pem(&pem)
            .map_err(|e| IdentityError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
        Self::from_key_pair(key_pair, path)
    }

    fn create(path: &Path) -> Result<Self, IdentityError> {
        let identity = Self::generate()?;
        write_private_file(path, identity.key_pair.serialize_pem().as_bytes())
            .map_err(|source| IdentityError::Io { action: "write", path: path.to_path_buf(), source })?;
        // Another process may have created the key at the same moment: whoever linked
        // first won, and everyone uses the file on disk.
        Self::load(path)
    }

    fn from_key_pair(key_pair: KeyPair, path: &Path) -> Result<Self, IdentityError> {
        if key_pair.algorithm() != &PKCS_ED25519 {
            return Err(IdentityError::WrongKeyType {
                path: path.to_path_buf(),
                found: format!("{:?}", key_pair.algorithm()),
            });
        }
        let raw: [u8; NODE_ID_LEN] = key_pair.public_key_raw().try_into().map_err(|_| {
            IdentityError::Corrupt { path: path.to_path_buf(), reason: "public key is not 32 bytes".into() }
        })?;
        Ok(Self { key_pair, node_id: NodeId::from_bytes(raw) })
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The key in PKCS#8 DER, as rustls wants it.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pair.serialize_der()))
    }

    /// A fresh self-signed certificate for this identity (made on each start: only its key matters).
    pub fn self_signed_cert(&self) -> Result<CertificateDer<'static>, TlsError> {
        let mut params = rcgen::CertificateParams::new(vec!["qpeer".to_string()])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, self.node_id.to_string());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        Ok(params.self_signed(&self.key_pair)?.der().clone())
    }

    /// An Ed25519 signature of `message` by this identity (see [`NodeId::verify`]).
    pub fn sign(&self, message: &[u8]) -> Result<[u8; SIGNATURE_LEN], TlsError> {
        use rcgen::SigningKey;
        let signature = self.key_pair.sign(message)?;
        signature.try_into().map_err(|_| TlsError::Rcgen(rcgen::Error::RingUnspecified))
    }

    /// A 32-byte secret derived from the private key for `label` (e.g. the QUIC stateless-reset
    /// key, which must survive restarts so peers accept our resets).
    pub fn derive_secret(&self, label: &[u8]) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key_pair.serialize_der());
        let tag = ring::hmac::sign(&key, label);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

/// Writes `contents` to a new file readable only by its owner, without ever replacing an
/// existing file: the data goes to a temporary file first, which is then hard-linked into place.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp: PathBuf = {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".tmp-{}", std::process::id()));
        name.into()
    };
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_home_same_id_other_home_other_id() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let first = Identity::load_or_create(a.path()).expect("create");
        let again = Identity::load_or_create(a.path()).expect("load");
        let other = Identity::load_or_create(b.path()).expect("create other");
        assert_eq!(first.node_id(), again.node_id());
        assert_ne!(first.node_id(), other.node_id());
        let mode = std::fs::metadata(a.path().join(KEY_FILE)).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn group_readable_key_is_refused_and_untouched() {
        let home = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(home.path()).expect("create");
        let path = home.path().join(KEY_FILE);
        let before = std::fs::read(&path).expect("read");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Identity::load_or_create(home.path()).expect_err("0644 must be refused");
        assert!(matches!(err, IdentityError::InsecurePermissions { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        assert_eq!(std::fs::read(&path).expect("read"), before);
    }

    #[test]
    fn corrupt_key_is_refused_and_untouched() {
        let home = tempfile::tempdir().expect("tempdir");
        let path = home.path().join(KEY_FILE);
        write_private_file(&path, b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
            .expect("write");
        let err = Identity::load_or_create(home.path()).expect_err("corrupt must be refused");
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
        assert!(std::fs::read(&path).expect("read").starts_with(b"-----BEGIN PRIVATE KEY-----\ngarbage"));
    }

    #[test]
    fn non_ed25519_key_is_refused() {
        let home = tempfile::tempdir().expect("tempdir");
        let path = home.path().join(KEY_FILE);
        let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256");
        write_private_file(&path, p256.serialize_pem().as_bytes()).expect("write");
        let err = Identity::load_or_create(home.path()).expect_err("p256 must be refused");
        assert!(matches!(err, IdentityError::WrongKeyType { .. }), "{err}");
    }

    #[test]
    fn write_private_file_never_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        write_private_file(&path, b"first").expect("write");
        let err = write_private_file(&path, b"second").expect_err("must not overwrite");
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).expect("read"), b"first");
    }
}
