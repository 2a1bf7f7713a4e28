//! Typed errors of the node library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use qpeer_certs::NodeId;

/// The tracker presented another id than the one pinned or recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the tracker at {addr} is {actual}, but {expected} was expected ({origin}). \
     Someone may be impersonating it, or its key changed.{fix}"
)]
pub struct TrackerMismatch {
    pub addr: String,
    pub expected: NodeId,
    pub actual: NodeId,
    /// Where the expected id came from (`--tracker`, or known_trackers and its line).
    pub origin: String,
    /// How to accept a legitimately changed key, when there is a way.
    pub fix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Identity(#[from] qpeer_certs::IdentityError),
    #[error(transparent)]
    Tls(#[from] qpeer_certs::TlsError),
    #[error("cannot bind UDP socket {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("no tracker given: pass --tracker ID@HOST:PORT or set QPEER_TRACKER")]
    NoTracker,
    #[error(transparent)]
    TrackerAddr(#[from] qpeer_tracker::addr::TrackerAddrError),
    #[error("tracker {tracker}: {source}")]
    Tracker { tracker: String, source: qpeer_tracker::ClientError },
    #[error(transparent)]
    TrackerIdMismatch(Box<TrackerMismatch>),
    #[error("cannot use {}: {source}", path.display())]
    HomeFile { path: PathBuf, source: std::io::Error },
    #[error("not registered with the tracker after {timeout:?} (last attempt: {last_error})")]
    RegistrationTimeout { timeout: Duration, last_error: String },
    #[error("node {0} is not registered with the tracker")]
    PeerNotFound(NodeId),
    #[error("cannot reach {peer} within {timeout:?}: {reason}")]
    Unreachable { peer: NodeId, timeout: Duration, reason: String },
    #[error("connection to {peer} failed: {source}")]
    Connection { peer: NodeId, source: quinn::ConnectionError },
    #[error("peer {peer}: {message}")]
    Peer { peer: NodeId, message: String },
    #[error(
        "this NodeId was registered again by another process (the tracker says: {detail}); \
         this node stops instead of pushing it off in turn. Run one node per identity, and use \
         the running one (qpeer send/ping/peers talk to it)"
    )]
    Replaced { detail: String },
    #[error(
        "a node is already running on {} (it holds {}/node.lock); use it, stop it, or pick another --home",
        home.display(), home.display()
    )]
    HomeInUse { home: PathBuf },
    #[error("a node cannot connect to itself")]
    SelfConnect,
    #[error("conflicting settings: {0}")]
    Conflict(&'static str),
    #[error("the node is shut down")]
    Shutdown,
}
