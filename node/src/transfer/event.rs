//! What transfers tell the user (carried as [`crate::events::NodeEvent::Transfer`]).

use std::path::PathBuf;

use qpeer_certs::NodeId;

/// Something that happened in a transfer, on either side.
#[derive(Debug, Clone, PartialEq)]
pub enum TransferEvent {
    /// We accepted `peer`'s offer of `files` files, `bytes` bytes, into `into`.
    OfferAccepted { peer: NodeId, files: usize, bytes: u64, into: PathBuf },
    /// We refused `peer`'s offer (or could not read it).
    Rejected { peer: NodeId, reason: String },
    /// A file arrived whole and verified (`already_here`: it was, and matched).
    Received { path: PathBuf, size: u64, blake3: [u8; 32], already_here: bool },
    /// A received file did not match its hash: discarded, asked for again.
    Corrupt { path: PathBuf },
    /// A file could not be received.
    FileFailed { path: PathBuf, reason: String },
    /// The receiver's copy of a file we sent did not verify: sending it again.
    Retry { path: String },
}
