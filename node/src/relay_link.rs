//! The relay path: when no direct path works, the nodes' own QUIC connection (same TLS, same
//! NodeId pinning) travels through the tracker as opaque packets.
//!
//! [`RelayHub`] holds the queues between the node's socket ([`crate::socket::PathSocket`],
//! which sends a session's packets here while its path is the relay) and [`pump`], which
//! moves them over a tracker connection: the home tracker's, or a visited tracker's (the home
//! of a peer found through its home record, see [`crate::visits`]). Each tracker connection
//! has a slot of its own, since link ids are per tracker. Which session a link belongs to is
//! the path table's business ([`crate::paths`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use parking_lot::Mutex;
use qpeer_wire::io::{read_relay_stream, write_relay_stream};
use qpeer_wire::relay_frame::RelayFrame;
use tokio::sync::mpsc;

/// Packets queued toward a tracker, and from the trackers; past this, packets drop as UDP
/// would.
const QUEUE: usize = 1024;

/// The slot of the home tracker's connection (whichever tracker is home now).
pub const HOME_SLOT: u16 = 0;

/// A relay link: the id a tracker gave it, on the tracker connection of `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayLink {
    pub slot: u16,
    pub id: u32,
}

impl From<u32> for RelayLink {
    /// A link on the home tracker.
    fn from(id: u32) -> Self {
        Self { slot: HOME_SLOT, id }
    }
}

/// Queues between the socket wrapper and the tasks that talk to the trackers.
#[derive(Debug)]
pub struct RelayHub {
    inbound_tx: mpsc::Sender<(u16, RelayFrame)>,
    inbound_rx: Mutex<mpsc::Receiver<(u16, RelayFrame)>>,
    /// Encoded relay frames, ready for the relay stream of each slot's tracker connection.
    outbound: Mutex<HashMap<u16, mpsc::Sender<Bytes>>>,
}

impl RelayHub {
    pub fn new() -> Arc<Self> {
        let (inbound_tx, inbound_rx) = mpsc::channel(QUEUE);
        Arc::new(Self {
            inbound_tx,
            inbound_rx: Mutex::new(inbound_rx),
            outbound: Mutex::new(HashMap::new()),
        })
    }

    /// A frame a tracker relayed to us (the socket drops it unless its link is a session's);
    /// false when the queue is full.
    pub fn deliver(&self, slot: u16, frame: RelayFrame) -> bool {
        self.inbound_tx.try_send((slot, frame)).is_ok()
    }

    /// Queues a packet for its link's relay stream; a full queue (or a slot whose tracker
    /// connection is gone) drops it, like a congested link, and QUIC recovers.
    pub fn send(&self, link: RelayLink, packet: &[u8]) {
        let Ok(frame) = RelayFrame::new(link.id, packet) else { return };
        if let Some(queue) = self.outbound.lock().get(&link.slot) {
            let _ = queue.try_send(frame.into_bytes());
        }
    }

    /// The next relayed frame and the link it came on, for the socket's receive path.
    pub(crate) fn poll_inbound(&self, cx: &mut Context<'_>) -> Poll<Option<(RelayLink, RelayFrame)>> {
        self.inbound_rx.lock().poll_recv(cx).map(|next| next.map(tag))
    }

    pub(crate) fn try_inbound(&self) -> Option<(RelayLink, RelayFrame)> {
        self.inbound_rx.lock().try_recv().ok().map(tag)
    }
}

fn tag((slot, frame): (u16, RelayFrame)) -> (RelayLink, RelayFrame) {
    (RelayLink { slot, id: frame.link() }, frame)
}

/// Moves packets between the hub and the tracker connection of `slot` until it closes: our
/// relayed packets out on a uni stream we open, the tracker's relayed packets in from the
/// uni stream it opens.
pub async fn pump(hub: Arc<RelayHub>, slot: u16, tracker: quinn::Connection) {
    let (queue_tx, mut queue) = mpsc::channel(QUEUE);
    hub.outbound.lock().insert(slot, queue_tx.clone());
    let outbound = write_relay_stream(&tracker, &mut queue);
    let inbound = read_relay_stream(&tracker, |decoder| {
        while let Some(frame) = decoder.next_frame() {
            if !hub.deliver(slot, frame) {
                tracing::trace!("dropping a relayed packet: the queue to the socket is full");
            }
        }
    });
    tokio::select! {
        _ = async { tokio::join!(outbound, inbound) } => {}
        _ = tracker.closed() => {}
    }
    // Ends with the tracker connection; the slot may already carry the next connection's queue.
    let mut outbound = hub.outbound.lock();
    if outbound.get(&slot).is_some_and(|current| current.same_channel(&queue_tx)) {
        outbound.remove(&slot);
    }
}
