//! The local control socket's frames (docs/PROTOCOL.md, "Control socket"): a `qpeer` command
//! sends one [`Request`] to the node running on its home; the node answers with [`Reply`]s and
//! ends with [`Reply::Done`]. Framed with [`crate::codec`].

use std::path::PathBuf;

use qpeer_certs::NodeId;
use serde::{Deserialize, Serialize};

/// Version of the control protocol; a mismatch is refused with a message.
pub const CONTROL_VERSION: u16 = 1;

/// What a client asks the running node to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Ping { peer: NodeId, count: u32, interval_ms: u64 },
    Peers,
    Send { peer: NodeId, paths: Vec<PathBuf>, quiet: bool },
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u16,
    pub command: Command,
}

/// What the running node sends back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Line(String),
    Progress {
        label: String,
        done: u64,
        total: u64,
    },
    /// The command ended: exit code and, on failure, the message for stderr.
    Done {
        code: i32,
        error: Option<String>,
    },
}
