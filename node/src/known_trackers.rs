//! `known_trackers`: tracker ids learned on first use, like ssh's known_hosts.
//!
//! One line per tracker: `HOST:PORT NODEID`. Lines starting with `#` are comments.

use std::io::Write;
use std::path::{Path, PathBuf};

use qpeer_certs::NodeId;

use crate::error::NodeError;

pub const FILE_NAME: &str = "known_trackers";

/// What the file says about one tracker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownTracker {
    pub node_id: NodeId,
    /// 1-based line number, for error messages.
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct KnownTrackers {
    path: PathBuf,
}

impl KnownTrackers {
    pub fn in_home(home: &Path) -> Self {
        Self { path: home.join(FILE_NAME) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id recorded for `host_port`, if any. Unparseable lines are skipped with a warning.
    pub fn lookup(&self, host_port: &str) -> Result<Option<KnownTracker>, NodeError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(NodeError::HomeFile { path: self.path.clone(), source }),
        };
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(addr), Some(id)) = (fields.next(), fields.next()) else {
                tracing::warn!("{}:{}: malformed line skipped", self.path.display(), index + 1);
                continue;
            };
            if addr != host_port {
                continue;
            }
            match id.parse() {
                Ok(node_id) => return Ok(Some(KnownTracker { node_id, line: index + 1 })),
                Err(e) => tracing::warn!("{}:{}: bad tracker id: {e}", self.path.display(), index + 1),
            }
        }
        Ok(None)
    }

    /// Appends `host_port NODEID` (creating the file, mode 0600).
    pub fn remember(&self, host_port: &str, node_id: NodeId) -> Result<(), NodeError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io_err = |source| NodeError::HomeFile { path: self.path.clone(), source };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(io_err)?;
        writeln!(file, "{host_port} {node_id}").map_err(io_err)?;
        file.sync_all().map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_and_finds_by_address() {
        let home = tempfile::tempdir().expect("tempdir");
        let known = KnownTrackers::in_home(home.path());
        let a = NodeId::from_bytes([1; 32]);
        let b = NodeId::from_bytes([2; 32]);
        assert_eq!(known.lookup("h:1").expect("lookup"), None);
        known.remember("h:1", a).expect("remember");
        known.remember("h:2", b).expect("remember");
        assert_eq!(known.lookup("h:1").expect("lookup").map(|k| k.node_id), Some(a));
        assert_eq!(known.lookup("h:2").expect("lookup"), Some(KnownTracker { node_id: b, line: 2 }));
    }
}
