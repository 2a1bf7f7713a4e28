//! Tracker wire types: what travels on a node's control stream (see docs/PROTOCOL.md).
//!
//! These types are pure data. Encoding lives in [`crate::codec`]; nothing here touches a socket.
//! Close codes are in [`crate::close_code`].

use std::net::SocketAddr;

use qpeer_certs::NodeId;
use serde::{Deserialize, Serialize};

use crate::record::SignedRecord;

/// ALPN of the node ↔ tracker protocol.
pub const ALPN: &[u8] = b"qpeer-tracker/1";

/// Protocol version carried in `Register` and `Registered`. A tracker closes a connection whose
/// version it does not speak with [`crate::close_code::UNSUPPORTED_VERSION`].
pub const PROTOCOL_VERSION: u16 = 4;

/// Hard upper bound of a frame body in bytes. A tracker may be configured lower, never higher.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Most other listen addresses a tracker tells a node in `Registered`.
pub const MAX_TRACKER_ADDRS: usize = 8;

/// Most candidate addresses a node may register.
pub const MAX_CANDIDATES: usize = 16;

/// How long after an introduction the two nodes may ask for a relay between them.
pub const RELAY_REQUEST_WINDOW_SECS: u64 = 60;

/// Longest node name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Most peers in one `Peers` page.
pub const MAX_PEERS_PAGE: u16 = 256;

/// Frames a node sends to the tracker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// First frame on the control stream, exactly once (or [`ClientFrame::Observe`] instead).
    Register {
        version: u16,
        /// Local interface addresses with the endpoint's port (for same-LAN peers).
        candidates: Vec<SocketAddr>,
        /// Optional human-readable name, at most [`MAX_NAME_LEN`] bytes.
        name: Option<String>,
        /// A random number the node's process chose at start, passed to peers in
        /// introductions: a peer whose incarnation changed has restarted.
        incarnation: u64,
        /// A visitor: a node whose home is another tracker, come to meet a node that lives
        /// here (found through its home record). A visitor is not listed and may not publish.
        visitor: bool,
    },
    /// A page of registered nodes, ordered by NodeId, starting after `after`. `limit` is
    /// clamped to 1..=[`MAX_PEERS_PAGE`].
    ListPeers { request_id: u64, after: Option<NodeId>, limit: u16 },
    /// Ask the tracker to introduce us to `target` (both sides then punch at once).
    Introduce { request_id: u64, target: NodeId },
    /// Ask the tracker to relay between us and `peer` (after an introduction). The link opens
    /// when both nodes have asked for each other: both then receive `RelayReady`.
    RelayRequest { request_id: u64, peer: NodeId },
    /// The node's local addresses changed (it moved to another network or interface):
    /// replaces the candidates it registered. At most [`MAX_CANDIDATES`].
    Candidates { candidates: Vec<SocketAddr> },
    /// Instead of `Register`, as the first and only frame of a connection that does not
    /// register: the tracker answers [`ServerFrame::Observation`] and closes the connection.
    /// A node sends it from its one socket to another address of the tracker, to compare the
    /// addresses its NAT maps it to (see [`Mapping`]).
    Observe { version: u16 },
    /// What the node learnt of its NAT: given to peers in introductions.
    Mapping { mapping: Mapping },
    /// Publish the node's own home record, which must name this tracker, in the DHT.
    /// Answered by [`ServerFrame::Published`] once the DHT stored it (or an error:
    /// [`ErrorKind::NoDht`], [`ErrorKind::BadRecord`]).
    Publish { request_id: u64, record: SignedRecord },
    /// Look up `node`'s home record in the DHT: answered by [`ServerFrame::Resolved`]. The
    /// asker verifies the record itself; the tracker only carries it.
    Resolve { request_id: u64, node: NodeId },
}

/// How a node's NAT maps its socket, as the node measured it: the address the tracker sees
/// from two tracker addresses, compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Mapping {
    /// Not measured (a tracker with one address, or the check failed).
    #[default]
    Unknown,
    /// No NAT: the tracker sees one of the node's own addresses.
    None,
    /// Both tracker addresses see the same public address: a peer can punch toward it.
    EndpointIndependent,
    /// Each destination gets a mapping of its own (a symmetric NAT): an address the tracker
    /// saw is useless to a peer, so two such nodes cannot punch toward each other.
    EndpointDependent,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub node_id: NodeId,
    pub name: Option<String>,
    /// Registration time, seconds since the Unix epoch (tracker clock).
    pub registered_at: u64,
}

/// Where a peer can be reached: what the tracker observed and what the peer reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddrs {
    pub observed: SocketAddr,
    pub candidates: Vec<SocketAddr>,
}

/// Typed errors carried in [`ServerFrame::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Too many introduction requests per second; retry later.
    RateLimited,
    /// The request was not valid (e.g. asking to be introduced to yourself).
    InvalidRequest,
    /// The target's queue is full; retry later.
    Busy,
    /// A relay was requested for a node we were not recently introduced to.
    NotIntroduced,
    /// This tracker is not in a DHT: it serves its own nodes only.
    NoDht,
    /// A record to publish was refused (see the message: its signature, its sequence
    /// number, or the tracker it names).
    BadRecord,
}

/// Frames the tracker sends to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// Reply to `Register`: the address the tracker sees the node at (its NAT mapping).
    /// `others` are the tracker's other listen addresses (at most [`MAX_TRACKER_ADDRS`]; the
    /// same identity answers on each), for [`ClientFrame::Observe`].
    Registered { version: u16, observed: SocketAddr, others: Vec<SocketAddr> },
    /// Reply to `ListPeers`. `next` is the cursor for the following page, if any.
    Peers { request_id: u64, peers: Vec<PeerInfo>, next: Option<NodeId> },
    /// An introduction. `request_id` is set on the reply to the node that asked, and `None` on
    /// the copy sent at the same moment to the node that was asked for.
    /// `mapping` is what the peer announced with [`ClientFrame::Mapping`].
    Introduction {
        request_id: Option<u64>,
        peer: NodeId,
        addrs: PeerAddrs,
        incarnation: u64,
        mapping: Mapping,
    },
    /// Reply to `Introduce` when the target is not registered.
    NotFound { request_id: u64, target: NodeId },
    /// A request failed; the connection stays open.
    Error { request_id: u64, kind: ErrorKind, message: String },
    /// Reply to `RelayRequest`: noted; `RelayReady` follows once the peer asks too.
    RelayAccepted { request_id: u64 },
    /// Both nodes asked: packets for `peer` go on our relay stream tagged with `link`, and
    /// packets tagged with `link` on the tracker's relay stream come from `peer`.
    RelayReady { peer: NodeId, link: u32 },
    /// The node's connection now arrives from another address (its NAT rebound, or it moved):
    /// the tracker gives this address to peers from now on.
    Observed { observed: SocketAddr },
    /// Reply to `Observe`: the address this connection arrives from. The tracker then closes
    /// the connection with [`crate::close_code::NORMAL`].
    Observation { observed: SocketAddr },
    /// Reply to `Publish`: the record with sequence number `seq` is stored on `stored_on` DHT
    /// nodes.
    Published { request_id: u64, seq: i64, stored_on: u32 },
    /// Reply to `Resolve`: the most recent record the DHT holds for the node, unchecked.
    Resolved { request_id: u64, record: Option<SignedRecord> },
}
