//! Sending and receiving files and directories between nodes, verified by BLAKE3, resumable.
//!
//! - [`sanitize`]: checks on offered paths before anything touches the disk.
//! - [`scan`]: the sender walks what the user named; file hashing.
//! - [`send`]: [`send::send`] over a [`PeerConnection`](crate::PeerConnection).
//! - [`receive`]: [`receive::Receiver`], serving a listener's connections.
//! - [`part`]: writing a `.part` file, with direct I/O where the filesystem allows it.
//!
//! Rules (docs/PROTOCOL.md): a file is written to `<name>.part`, checked against the BLAKE3
//! hash the sender sends after the data (it hashes the bytes as it reads them, so each file is
//! read once), fsynced and then linked into place, never over an existing file (an existing
//! file with other content makes the receiver refuse that file; one with the same content
//! counts as received). A `.part` left by an interrupted transfer is continued by the next
//! send of the same file; if the whole file then does not match, the `.part` is discarded and
//! the file is sent again from the start.

pub mod event;
pub mod part;
pub mod receive;
pub mod sanitize;
pub mod scan;
pub mod send;

use std::path::PathBuf;

pub use event::TransferEvent;

use qpeer_certs::NodeId;

/// Bytes per read from a file or stream.
pub(crate) const CHUNK: usize = 256 * 1024;

/// A transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot send {}: {reason}", path.display())]
    BadSource { path: PathBuf, reason: String },
    #[error(transparent)]
    Node(#[from] crate::NodeError),
    #[error("the receiver refused the transfer: {0}")]
    Rejected(String),
    #[error("the receiver could not store the file: {0}")]
    ReceiverFailed(String),
    #[error("{} of {} files failed:\n{}", failures.len(), total, failures.iter().map(|(p, r)| format!("  {p}: {r}")).collect::<Vec<_>>().join("\n"))]
    FilesFailed { total: usize, failures: Vec<(String, String)> },
    #[error("peer {peer} broke the transfer protocol: {message}")]
    Protocol { peer: NodeId, message: String },
    #[error("the connection to {peer} was lost: {message}")]
    Lost { peer: NodeId, message: String },
    #[error("{0}")]
    Timeout(String),
}
