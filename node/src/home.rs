//! The node's hold on its home directory: one running node per home (and so per identity).

use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::error::NodeError;

/// File in the home that a running node holds an exclusive lock on.
pub const LOCK_FILE: &str = "node.lock";

/// The exclusive lock on the home, held while the node runs. The kernel releases it if the
/// process dies, so a crash never leaves a stale lock.
pub(crate) struct HomeLock {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

impl HomeLock {
    /// Takes the home's lock, or says which home is in use.
    pub(crate) fn take(home: &Path) -> Result<Self, NodeError> {
        qpeer_certs::home::ensure_home(home)?;
        let path = home.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| NodeError::HomeFile { path: path.clone(), source })?;
        match file.try_lock() {
            Ok(()) => Ok(Self { path: home.to_path_buf(), file: Mutex::new(Some(file)) }),
            Err(std::fs::TryLockError::WouldBlock) => Err(NodeError::HomeInUse { home: home.to_path_buf() }),
            Err(std::fs::TryLockError::Error(source)) => Err(NodeError::HomeFile { path, source }),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Lets another node use the home.
    pub(crate) fn release(&self) {
        self.file.lock().take();
    }
}
