//! What a node tells its user: typed events, in order, on a broadcast channel. The library
//! never prints; the `qpeer` binary renders these as its console lines, and an application
//! embedding a node shows them however it likes (see `examples/embed.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use qpeer_certs::NodeId;
use tokio::sync::broadcast;

use crate::paths::PeerPath;
use crate::transfer::TransferEvent;

/// Events a subscriber may fall behind by before it misses some (it then gets
/// [`broadcast::error::RecvError::Lagged`] and the events that follow). Progress events are
/// throttled at the source, so only a subscriber that stops reading falls this far behind.
pub const EVENT_BUFFER: usize = 4096;

/// Something that happened in a node.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeEvent {
    /// A tracker reached by host and port was trusted on first use and its id saved.
    TrackerTrusted { tracker: NodeId, host_port: String, saved_in: PathBuf },
    /// Registered (again) with the tracker, which sees us at `observed`.
    Registered { id: NodeId, observed: SocketAddr },
    /// The tracker now sees us at another address (our NAT rebound, or we moved).
    Observed { observed: SocketAddr, was: SocketAddr },
    /// Another process registered our NodeId (`detail`: what the tracker said): this node
    /// stops working (see [`crate::Node::failed`]).
    Replaced { detail: String },
    /// A connection to `peer` is up (either side opened it).
    PeerConnected { peer: NodeId, path: PeerPath, rtt: Duration },
    /// The connection to `peer` ended.
    PeerDisconnected { peer: NodeId, reason: quinn::ConnectionError },
    /// The session with `peer` moved to another path.
    PathChanged { peer: NodeId, path: PeerPath, was: PeerPath },
    /// A file transfer, either direction.
    Transfer(TransferEvent),
    /// The network check after a registration finished (see [`crate::netcheck`]).
    NatChecked(crate::netcheck::NetReport),
    /// Registered with `tracker` as our home: with several trackers, the one chosen (lowest
    /// `rtt`, as measured just before; ties go to the first listed).
    HomeChosen { tracker: NodeId, host_port: String, rtt: Option<Duration> },
    /// Our home record's state changed (published, republished, failed).
    RecordChanged(crate::records::RecordState),
    /// `peer`, unknown to our home tracker, was found through its home record: it lives on
    /// `tracker` at `addr` (record `seq`); the DHT lookup took `took`.
    PeerResolved { peer: NodeId, tracker: NodeId, addr: SocketAddr, seq: i64, took: Duration },
}

/// The sending end of a node's events; clones share one channel. Give one to
/// [`crate::NodeBuilder::events`] to subscribe before the node starts, so no event is missed.
#[derive(Debug, Clone)]
pub struct Events {
    sender: broadcast::Sender<NodeEvent>,
}

impl Default for Events {
    fn default() -> Self {
        Self { sender: broadcast::channel(EVENT_BUFFER).0 }
    }
}

impl Events {
    pub fn new() -> Self {
        Self::default()
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.sender.subscribe()
    }

    /// Sends an event to whoever listens; no one listening is fine.
    pub fn emit(&self, event: NodeEvent) {
        let _ = self.sender.send(event);
    }

    /// Sends a transfer event.
    pub fn transfer(&self, event: TransferEvent) {
        self.emit(NodeEvent::Transfer(event));
    }
}
