//! Sending and receiving files and directories between nodes, verified by BLAKE3, resumable.
//!
//! - [`sanitize`]: checks on offered paths before anything touches the disk.
//! - [`scan`]: the sender walks what the user named; file hashing.
//! - [`send`]: [`send::send`] over a [`PeerConnection`](crate::PeerConnection).
//! - [`receive`]: [`receive::Receiver`], serving a listener's connections.
//! - [`part`]: writing a `.part` file, with direct I/O where the filesystem allows it.
//! - [`event`]: [`TransferEvent`]s, what both sides report on the node's
//!   [`Events`](crate::Events) (offers, files, progress, results); the library prints nothing.
//!
//! Rules (docs/PROTOCOL.md): a file is written to `<name>.part`, checked against the BLAKE3
//! hash the sender sends after the data (it hashes the bytes as it reads them, so each file is
//! read once), fsynced and then linked into place, never over an existing file (an existing
//! file with other content makes the receiver refuse that file; one with the same content
//! counts as received). A `.part` left by an interrupted transfer is continued by the next
//! send of the same file; if the whole file then does not match, the `.part` is discarded and
//! the file is sent again from the start.
//!
//! Metadata (docs/SECURITY.md): a received file gets the sender's permission bits masked to
//! `0o755` (never setuid, setgid, sticky, nor writable by group or others) with the owner's
//! read bit kept, and the sender's mtime, both set on the verified `.part` before it is linked
//! into place. A directory this transfer created gets its mode (masked the same, owner `rwx`
//! kept) and mtime when the
//! sender finishes. Symlinks inside a sent directory travel as links, never followed: the
//! sender leaves out those whose target is absolute or leaves the directory, the receiver
//! creates only those whose target stays inside the receive folder (see
//! [`sanitize::check_link_target`]), refusing the others one by one. Nothing is ever written
//! through a symlink: parents are checked to be real directories, files are opened with
//! `O_NOFOLLOW`, a `.part` with other hard links is never continued, and the final name is
//! made with `link(2)`, which does not follow or replace anything.

pub mod event;
pub mod part;
pub mod receive;
pub mod sanitize;
pub mod scan;
pub mod send;

use std::path::PathBuf;
use std::time::Duration;

pub use event::{rate, Direction, FileProgress, TransferEvent, TransferProgress};

use qpeer_certs::NodeId;
use qpeer_wire::io::StreamError;
use qpeer_wire::transfer::{ControlFrame, FileReply, MAX_ENTRIES};

/// Bytes per read from a file or stream.
/// Failed files named one by one in [`TransferError::FilesFailed`]'s message.
pub const FAILURES_LISTED: usize = 10;

fn list_failures(failures: &[(String, String)]) -> String {
    let mut lines: Vec<String> =
        failures.iter().take(FAILURES_LISTED).map(|(path, reason)| format!("  {path}: {reason}")).collect();
    if failures.len() > FAILURES_LISTED {
        lines.push(format!("  … and {} more", failures.len() - FAILURES_LISTED));
    }
    lines.join("\n")
}

pub(crate) const CHUNK: usize = 256 * 1024;

/// A transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot send {}: {problem}", path.display())]
    BadSource { path: PathBuf, problem: SourceProblem },
    #[error(transparent)]
    Node(#[from] crate::NodeError),
    /// The receiver refused the offer, in its words.
    #[error("the receiver refused the transfer: {0}")]
    Rejected(String),
    /// The receiver refused one file or symlink, in its words (the rest went on).
    #[error("refused by the receiver: {0}")]
    Refused(String),
    /// The receiver could not write a file, in its words.
    #[error("the receiver could not store the file: {0}")]
    ReceiverFailed(String),
    /// Some files were not verified: (offered path, why) for each.
    /// The Display lists the first [`FAILURES_LISTED`] (a tree can fail by the thousand).
    #[error("{} of {} files failed:\n{}", failures.len(), total, list_failures(failures))]
    FilesFailed { total: usize, failures: Vec<(String, String)> },
    #[error("peer {peer} broke the transfer protocol: {violation}")]
    Protocol { peer: NodeId, violation: ProtocolViolation },
    #[error("the connection to {peer} was lost: {cause}")]
    Lost { peer: NodeId, cause: LinkLoss },
    #[error("no answer from {peer} within {after:?}")]
    Timeout { peer: NodeId, after: Duration },
}

/// Why a local file or directory cannot be (or was not) sent.
#[derive(Debug, thiserror::Error)]
pub enum SourceProblem {
    #[error("the name is not UTF-8")]
    NameNotUtf8,
    #[error("another argument is also named {0:?}; they would collide")]
    NameCollision(String),
    #[error("not a regular file or directory")]
    NotFileOrDirectory,
    #[error("{0} entries; at most {MAX_ENTRIES} per send")]
    TooManyEntries(usize),
    #[error("it is shorter than when it was offered; send it again")]
    Shrank,
    #[error("it changed while it was sent; send it again")]
    Changed,
    #[error("the reader thread failed: {0}")]
    ReaderFailed(tokio::task::JoinError),
    /// The thread reading a batch of small files failed (its error, as text: one per file).
    #[error("the reader thread failed: {0}")]
    BatchReaderFailed(String),
    #[error("the receiver's copy did not verify twice (is the file changing while it is sent?)")]
    VerifiedWrongTwice,
}

/// How the receiver broke the transfer protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolViolation {
    #[error("expected {expected}, got {got:?}")]
    UnexpectedFrame { expected: &'static str, got: UnexpectedFrame },
    #[error("resume offset {offset} is past the end ({size})")]
    ResumePastEnd { offset: u64, size: u64 },
    #[error("confirmed a different hash")]
    DifferentHash,
    #[error(transparent)]
    Frame(StreamError),
}

/// A frame that came where another was due.
pub enum UnexpectedFrame {
    Control(Box<ControlFrame>),
    File(FileReply),
}

impl std::fmt::Debug for UnexpectedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Control(frame) => frame.fmt(f),
            Self::File(reply) => reply.fmt(f),
        }
    }
}

/// Why the connection (or the stream on it) to the receiver stopped carrying the transfer.
#[derive(Debug, thiserror::Error)]
pub enum LinkLoss {
    #[error("the receiver closed the stream")]
    StreamClosed,
    #[error("{0}")]
    Read(std::io::Error),
    #[error(transparent)]
    Frame(StreamError),
    #[error(transparent)]
    Write(quinn::WriteError),
    #[error(transparent)]
    Permits(tokio::sync::AcquireError),
}
