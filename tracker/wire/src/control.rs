//! The local control socket's frames (docs/PROTOCOL.md, "Control socket"): a `qpeer` command
//! sends one [`Request`] to the node running on its home; the node answers with [`Reply`]s and
//! ends with [`Reply::Done`]. Framed with [`crate::codec`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Version of the control protocol; a mismatch is refused with a message.
pub const CONTROL_VERSION: u16 = 3;

/// What a client asks the running node to do. `peer` is as the user typed it (a NodeId, an id
/// prefix, an alias or a tracker name): the running node resolves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Ping { peer: String, count: u32, interval_ms: u64, json: bool },
    Peers { json: bool },
    Send { peer: String, paths: Vec<PathBuf>, quiet: bool, json: bool },
    Status { json: bool },
}

/// The node options a client was given (explicitly: on its command line or in its
/// environment). The running node runs the command with its own settings, so it refuses a
/// command whose options it cannot honour rather than ignore them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSettings {
    /// Trackers as given (`ID@HOST:PORT` or `HOST:PORT`); empty: none given.
    pub trackers: Vec<String>,
    pub tracker_ca: Option<PathBuf>,
    pub bind: Option<String>,
    pub name: Option<String>,
    pub relay_only: bool,
    pub no_relay: bool,
    /// Congestion controller of peer connections (`bbr`, `cubic`); `None`: not given.
    pub congestion: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u16,
    pub command: Command,
    /// The client's node options, checked against the running node's.
    pub settings: NodeSettings,
}

/// What the running node sends back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Line(String),
    Progress {
        label: String,
        done: u64,
        total: u64,
        /// Bytes carried in this transfer (what the rate counts; resumed bytes excluded).
        sent_now: u64,
        /// Milliseconds since the transfer started.
        elapsed_ms: u64,
        /// Files finished, and files in the transfer.
        files_done: u32,
        files: u32,
        /// The file being carried now: its path, bytes done and size.
        current: Option<(String, u64, u64)>,
    },
    /// The transfer called `label` ended: its progress is cleared.
    Finished {
        label: String,
    },
    /// The command ended: exit code and, on failure, the message for stderr.
    Done {
        code: i32,
        error: Option<String>,
    },
}
