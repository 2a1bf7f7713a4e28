//! Typed errors of the node library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
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
    /// Connecting or registering with the tracker at `tracker` (its host and port) failed.
    #[error("tracker {tracker}: {source}")]
    Tracker { tracker: String, source: qpeer_tracker::ClientError },
    /// A request on the registered tracker connection failed.
    #[error("tracker {request}: {source}")]
    TrackerRequest { request: TrackerRequest, source: qpeer_tracker::ClientError },
    #[error("tracker connection lost ({})", qpeer_wire::io::describe_close(.0))]
    TrackerLost(quinn::ConnectionError),
    #[error(transparent)]
    TrackerIdMismatch(Box<TrackerMismatch>),
    #[error("cannot use {}: {source}", path.display())]
    HomeFile { path: PathBuf, source: std::io::Error },
    #[error(
        "not registered with the tracker after {timeout:?} (last attempt: {})",
        last_error.as_ref().map_or_else(|| "no answer yet".to_string(), ToString::to_string)
    )]
    RegistrationTimeout { timeout: Duration, last_error: Option<Arc<NodeError>> },
    /// Neither the home tracker nor (when it is in a DHT) a home record knows the node.
    #[error("node {0} is not registered with the tracker")]
    PeerNotFound(NodeId),
    /// The peer's home record, as the DHT gave it, does not hold up.
    #[error("the home record of {peer} was refused: {source}")]
    RecordRefused { peer: NodeId, source: qpeer_wire::record::RecordError },
    /// The peer's home record names a tracker that does not hold it (it moved, or the
    /// record is stale).
    #[error("the home record of {peer} names tracker {tracker}, which does not hold it")]
    StaleRecord { peer: NodeId, tracker: NodeId },
    /// Finding the peer's home (its record, the tracker it names) took too long.
    #[error("could not locate {peer} within {timeout:?} (its home record, or the tracker it names, did not answer)")]
    LocateTimeout { peer: NodeId, timeout: Duration },
    /// The tracker a peer's home record names cannot be visited.
    #[error("cannot visit tracker {tracker}: {source}")]
    Visit { tracker: NodeId, source: Box<NodeError> },
    #[error("cannot reach {peer} within {timeout:?}: {reason}")]
    Unreachable { peer: NodeId, timeout: Duration, reason: Unreachable },
    #[error("connection to {peer} failed: {source}")]
    Connection { peer: NodeId, source: quinn::ConnectionError },
    #[error("peer {peer}: {source}")]
    Stream { peer: NodeId, source: StreamFailure },
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
    /// The same failure, handed to each of several callers waiting for one connection: match
    /// on [`NodeError::root`].
    #[error(transparent)]
    Shared(Arc<NodeError>),
}

impl NodeError {
    /// The error itself, also when it reached several callers ([`NodeError::Shared`]).
    pub fn root(&self) -> &NodeError {
        match self {
            NodeError::Shared(shared) => shared.root(),
            other => other,
        }
    }
}

/// What a request on the tracker connection was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerRequest {
    List,
    Introduce,
    Relay,
    Resolve,
}

impl std::fmt::Display for TrackerRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrackerRequest::List => "list",
            TrackerRequest::Introduce => "introduce",
            TrackerRequest::Relay => "relay",
            TrackerRequest::Resolve => "resolve",
        })
    }
}

/// Why no connection to a peer came about in time.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unreachable {
    #[error("no direct path answered a probe, and the relay is off (--no-relay)")]
    NoDirectPathNoRelay,
    #[error("no path answered (neither a probe nor the relay)")]
    NoPath,
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// We wait for the peer to dial (the lower NodeId dials), and it never did.
    #[error("the peer's handshake never arrived ({0})")]
    PeerNeverDialed(Box<Unreachable>),
}

/// How a handshake with a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandshakeError {
    #[error("cannot start a handshake: {0}")]
    Start(#[from] quinn::ConnectError),
    #[error("cannot configure the handshake: {0}")]
    Config(Arc<qpeer_certs::TlsError>),
    #[error("handshake failed: {0}")]
    Failed(quinn::ConnectionError),
    #[error("the handshake did not finish within {0:?}")]
    TimedOut(Duration),
    #[error("{} answered in place of {}", answered.short(), expected.short())]
    WrongPeer { answered: NodeId, expected: NodeId },
    #[error("{0}")]
    PeerIdentity(#[from] qpeer_certs::PeerCertError),
    #[error("incoming handshake failed: {0}")]
    IncomingFailed(quinn::ConnectionError),
    #[error("incoming handshake timed out")]
    IncomingTimedOut,
}

/// A stream to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamFailure {
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Read(#[from] quinn::ReadExactError),
    #[error("ping echo does not match")]
    PingMismatch,
}

/// A fatal tracker error: the node stops working (see [`crate::Node::failed`]). Cloned to
/// every caller that asks.
#[derive(Debug, Clone)]
pub(crate) enum Fatal {
    TrackerIdMismatch(Box<TrackerMismatch>),
    Replaced { detail: String },
}

impl From<Fatal> for NodeError {
    fn from(fatal: Fatal) -> Self {
        match fatal {
            Fatal::TrackerIdMismatch(mismatch) => NodeError::TrackerIdMismatch(mismatch),
            Fatal::Replaced { detail } => NodeError::Replaced { detail },
        }
    }
}
