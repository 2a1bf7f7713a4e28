//! Where a node or tracker keeps its state: `--home DIR`, else `$QPEER_HOME`, else the
//! platform data directory (`~/.local/share/qpeer` on Linux).

use std::path::{Path, PathBuf};

use crate::error::IdentityError;

/// The environment variable that names the home directory.
pub const HOME_ENV: &str = "QPEER_HOME";

/// Resolves the home directory from an explicit flag, the environment, or the platform default.
pub fn resolve_home(explicit: Option<&Path>) -> Result<PathBuf, IdentityError> {
    if let Some(dir) = explicit {
        return Ok(dir.to_path_buf());
    }
    if let Some(dir) = std::env::var_os(HOME_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    directories::ProjectDirs::from("", "", "qpeer")
        .map(|dirs| dirs.data_dir().to_path_buf())
        .ok_or(IdentityError::NoHome)
}

/// Creates the home directory (mode 0700) if it does not exist yet.
pub fn ensure_home(home: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::DirBuilderExt;
    if home.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(home).map_err(|source| IdentityError::Io {
        action: "create home directory",
        path: home.to_path_buf(),
        source,
    })
}
