//! The relay path: when no direct path works, the nodes' own QUIC connection (same TLS, same
//! NodeId pinning) travels through the tracker as opaque packets.
//!
//! [`RelayHub`] holds the queues between the node's socket ([`crate::socket::PathSocket`],
//! which sends a session's packets here while its path is the relay) and [`pump`], which
//! moves them over the current tracker connection. Which session a link belongs to is the
//! path table's business ([`crate::paths`]).

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use parking_lot::Mutex;
use qpeer_wire::io::{read_relay_stream, write_relay_stream};
use qpeer_wire::relay_frame::RelayFrame;
use tokio::sync::mpsc;

/// Packets queued toward the tracker, and from it; past this, packets drop as UDP would.
const QUEUE: usize = 1024;

/// Queues between the socket wrapper and the tasks that talk to the tracker.
#[derive(Debug)]
pub struct RelayHub {
    inbound_tx: mpsc::Sender<RelayFrame>,
    inbound_rx: Mutex<mpsc::Receiver<RelayFrame>>,
    /// Encoded relay frames, ready for the relay stream.
    outbound_tx: mpsc::Sender<Bytes>,
    /// Taken by the relay pump of the current tracker connection.
    pub(crate) outbound_rx: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
}

impl RelayHub {
    pub fn new() -> Arc<Self> {
        let (inbound_tx, inbound_rx) = mpsc::channel(QUEUE);
        let (outbound_tx, outbound_rx) = mpsc::channel(QUEUE);
        Arc::new(Self {
            inbound_tx,
            inbound_rx: Mutex::new(inbound_rx),
            outbound_tx,
            outbound_rx: tokio::sync::Mutex::new(outbound_rx),
        })
    }

    /// A frame the tracker relayed to us (the socket drops it unless its link is a
    /// session's); false when the queue is full.
    pub fn deliver(&self, frame: RelayFrame) -> bool {
        self.inbound_tx.try_send(frame).is_ok()
    }

    /// Queues a packet for the relay stream; a full queue drops it, like a congested link,
    /// and QUIC recovers.
    pub fn send(&self, link: u32, packet: &[u8]) {
        if let Ok(frame) = RelayFrame::new(link, packet) {
            let _ = self.outbound_tx.try_send(frame.into_bytes());
        }
    }

    /// The next relayed frame, for the socket's receive path.
    pub(crate) fn poll_inbound(&self, cx: &mut Context<'_>) -> Poll<Option<RelayFrame>> {
        self.inbound_rx.lock().poll_recv(cx)
    }

    pub(crate) fn try_inbound(&self) -> Option<RelayFrame> {
        self.inbound_rx.lock().try_recv().ok()
    }
}

/// Moves packets between the hub and the tracker connection until it closes: our relayed
/// packets out on a uni stream we open, the tracker's relayed packets in from the uni stream
/// it opens.
pub async fn pump(hub: Arc<RelayHub>, tracker: quinn::Connection) {
    let outbound = async {
        let mut queue = hub.outbound_rx.lock().await;
        write_relay_stream(&tracker, &mut queue).await;
    };
    let inbound = read_relay_stream(&tracker, |decoder| {
        while let Some(frame) = decoder.next_frame() {
            if !hub.deliver(frame) {
                tracing::trace!("dropping a relayed packet: the queue to the socket is full");
            }
        }
    });
    // Ends with the tracker connection, releasing the outbound queue for the next one.
    tokio::select! {
        _ = async { tokio::join!(outbound, inbound) } => {}
        _ = tracker.closed() => {}
    }
}
