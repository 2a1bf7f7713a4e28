//! The relay: links between pairs of nodes that both asked for one, and the packets carried
//! over them. The tracker cannot read the packets (they stay end-to-end encrypted between the
//! two nodes); it forwards them unchanged between the two ends of a link.
//!
//! [`Relay`] owns the links and each attached node's queue; nothing outside edits them. Each
//! registered node's session holds a [`RelayClient`], which reads that node's relay stream and
//! writes the frames queued for it, so every node's writer runs on its own session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use qpeer_certs::NodeId;
use qpeer_wire::io::{read_relay_stream, write_relay_stream};
use qpeer_wire::relay_frame::{RelayDecoder, RelayFrame};
use tokio::sync::{mpsc, oneshot};

use crate::events::ServerEvent;
use crate::limits::RelayBudget;
use crate::rendezvous::pair;

/// Frames queued for one node's relay stream; past this, packets are dropped (as UDP would).
const RELAY_QUEUE: usize = 1024;

/// The relay links and the queues of the nodes attached to it.
#[derive(Debug, Default)]
pub struct Relay {
    state: Mutex<Links>,
    relayed_bytes: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct Links {
    by_id: HashMap<u32, Link>,
    by_pair: HashMap<(NodeId, NodeId), u32>,
    /// Each attached node's way in, by NodeId.
    ports: HashMap<NodeId, Port>,
    next_id: u32,
}

/// A relay link between two nodes, `a < b`.
#[derive(Debug)]
struct Link {
    a: NodeId,
    b: NodeId,
    /// Bytes forwarded from a to b, and from b to a.
    bytes_ab: u64,
    bytes_ba: u64,
}

impl Link {
    /// The other end, if `from` is an end.
    fn other(&self, from: &NodeId) -> Option<NodeId> {
        if *from == self.a {
            Some(self.b)
        } else if *from == self.b {
            Some(self.a)
        } else {
            None
        }
    }
}

/// How frames reach one attached node.
#[derive(Debug)]
struct Port {
    connection_id: u64,
    queue: Queue,
}

/// A node's queue is made only when a link needs it: a channel allocates its first block up
/// front, which idle nodes should not pay for.
#[derive(Debug)]
enum Queue {
    /// No link yet: the node's session waits for its queue here.
    Waiting(oneshot::Sender<mpsc::Receiver<Bytes>>),
    Open(mpsc::Sender<Bytes>),
}

impl Relay {
    /// Attaches `node_id`'s registration over `connection_id` (replacing an older one): the
    /// returned client serves its relay streams. Links it is an end of stay.
    pub fn attach(self: &Arc<Self>, node_id: NodeId, connection_id: u64, budget: RelayBudget) -> RelayClient {
        let (handoff, queue) = oneshot::channel();
        self.state.lock().ports.insert(node_id, Port { connection_id, queue: Queue::Waiting(handoff) });
        RelayClient { relay: self.clone(), node_id, connection_id, queue, budget }
    }

    /// Detaches `node_id` if `connection_id` attached it last, and closes its links.
    pub fn detach(&self, node_id: &NodeId, connection_id: u64) -> Vec<ServerEvent> {
        let mut state = self.state.lock();
        if state.ports.get(node_id).is_none_or(|port| port.connection_id != connection_id) {
            return Vec::new();
        }
        state.ports.remove(node_id);
        let ids: Vec<u32> =
            state.by_id.iter().filter(|(_, link)| link.other(node_id).is_some()).map(|(id, _)| *id).collect();
        let mut closed = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(link) = state.by_id.remove(&id) {
                state.by_pair.remove(&(link.a, link.b));
                closed.push(ServerEvent::RelayClosed {
                    a: link.a,
                    b: link.b,
                    link: id,
                    bytes_ab: link.bytes_ab,
                    bytes_ba: link.bytes_ba,
                });
            }
        }
        closed
    }

    /// Opens (or finds) the link between `x` and `y` and makes sure both ends have a queue.
    /// Returns (link id, newly opened), or `None` when an end is not attached.
    pub fn open_link(&self, x: NodeId, y: NodeId) -> Option<(u32, bool)> {
        let mut state = self.state.lock();
        if !state.ports.contains_key(&x) || !state.ports.contains_key(&y) {
            return None;
        }
        for end in [x, y] {
            if let Some(port) = state.ports.get_mut(&end) {
                port.open_queue();
            }
        }
        let key = pair(x, y);
        if let Some(id) = state.by_pair.get(&key) {
            return Some((*id, false));
        }
        // Link ids stay below 2^24 (nodes map them into 240.0.0.0/8) and are never 0.
        loop {
            state.next_id = (state.next_id % 0x00ff_ffff) + 1;
            if !state.by_id.contains_key(&state.next_id) {
                break;
            }
        }
        let id = state.next_id;
        state.by_id.insert(id, Link { a: key.0, b: key.1, bytes_ab: 0, bytes_ba: 0 });
        state.by_pair.insert(key, id);
        Some((id, true))
    }

    /// Open links.
    pub fn links(&self) -> usize {
        self.state.lock().by_id.len()
    }

    /// Relay bytes forwarded so far.
    pub fn relayed_bytes(&self) -> u64 {
        self.relayed_bytes.load(Ordering::Relaxed)
    }

    /// Relay packets dropped so far (unknown link, not an end of it, over a limit, queue full).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Forwards every whole frame `from` sent (one lock per read, not per packet).
    fn forward_all(&self, from: NodeId, decoder: &mut RelayDecoder, budget: &mut RelayBudget) {
        let now = Instant::now();
        let mut state = self.state.lock();
        while let Some(frame) = decoder.next_frame() {
            match state.forward(from, frame, budget, now) {
                Some(bytes) => self.relayed_bytes.fetch_add(bytes, Ordering::Relaxed),
                None => self.dropped.fetch_add(1, Ordering::Relaxed),
            };
        }
    }

    /// A new wait for a queue, after the node's relay writer ended (its stream failed):
    /// the next [`open_link`](Self::open_link) involving it makes a fresh queue. `None` when
    /// another connection of the node attached since.
    fn rearm(
        &self,
        node_id: &NodeId,
        connection_id: u64,
    ) -> Option<oneshot::Receiver<mpsc::Receiver<Bytes>>> {
        let mut state = self.state.lock();
        let port = state.ports.get_mut(node_id).filter(|port| port.connection_id == connection_id)?;
        let (handoff, queue) = oneshot::channel();
        port.queue = Queue::Waiting(handoff);
        Some(queue)
    }
}

impl Links {
    /// Forwards one packet from `from`. Returns the bytes forwarded, or `None` when it was
    /// dropped: unknown link, `from` not an end of it, over `from`'s budget, or the other end
    /// has no room.
    fn forward(
        &mut self,
        from: NodeId,
        frame: RelayFrame,
        budget: &mut RelayBudget,
        now: Instant,
    ) -> Option<u64> {
        let link = self.by_id.get_mut(&frame.link())?;
        let to = link.other(&from)?;
        let bytes = frame.packet().len() as u64;
        if !budget.try_spend(bytes, now) {
            return None;
        }
        let Queue::Open(out) = &self.ports.get(&to)?.queue else { return None };
        // Both ends know the link by the same id: the frame goes on unchanged.
        out.try_send(frame.into_bytes()).ok()?;
        if from == link.a {
            link.bytes_ab += bytes;
        } else {
            link.bytes_ba += bytes;
        }
        Some(bytes)
    }
}

impl Port {
    /// Hands the waiting session its queue. A queue whose writer ended stays closed until
    /// that session re-arms.
    fn open_queue(&mut self) {
        if matches!(self.queue, Queue::Open(_)) {
            return;
        }
        let (sender, receiver) = mpsc::channel(RELAY_QUEUE);
        if let Queue::Waiting(handoff) = std::mem::replace(&mut self.queue, Queue::Open(sender)) {
            // A session that is gone leaves the queue closed, and packets for it are dropped.
            let _ = handoff.send(receiver);
        }
    }
}

/// One node's side of the relay, owned by that node's session.
#[derive(Debug)]
pub struct RelayClient {
    relay: Arc<Relay>,
    node_id: NodeId,
    connection_id: u64,
    /// Where the queue of frames for this node arrives once a link needs it.
    queue: oneshot::Receiver<mpsc::Receiver<Bytes>>,
    /// What this node may still send.
    budget: RelayBudget,
}

impl RelayClient {
    /// Forwards what the node sends on its relay stream and writes what its links carry to
    /// it on a stream the tracker opens. Never returns: the session drops it when the
    /// connection ends.
    pub async fn serve(self, conn: &quinn::Connection) {
        let Self { relay, node_id, connection_id, queue, mut budget } = self;
        let inbound = async {
            read_relay_stream(conn, |decoder| relay.forward_all(node_id, decoder, &mut budget)).await;
            std::future::pending::<()>().await
        };
        let outbound = async {
            let mut waiting = queue;
            while let Ok(mut queue) = waiting.await {
                write_relay_stream(conn, &mut queue).await;
                if conn.close_reason().is_some() {
                    break;
                }
                match relay.rearm(&node_id, connection_id) {
                    Some(next) => waiting = next,
                    None => break,
                }
            }
            std::future::pending::<()>().await
        };
        tokio::join!(inbound, outbound);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;

    fn node(byte: u8) -> NodeId {
        NodeId::from_bytes([byte; 32])
    }

    fn attach(relay: &Arc<Relay>, node_id: NodeId, connection_id: u64) -> RelayClient {
        relay.attach(node_id, connection_id, Limits::default().relay_budget(Instant::now()))
    }

    fn frames(link: u32, packets: &[&[u8]]) -> RelayDecoder {
        let mut bytes = Vec::new();
        for packet in packets {
            qpeer_wire::relay_frame::encode_relay_frame(link, packet, &mut bytes).expect("frame");
        }
        let mut decoder = RelayDecoder::default();
        decoder.extend(&bytes);
        decoder
    }

    #[test]
    fn packets_cross_a_link_and_only_its_ends_use_it() {
        let relay = Arc::new(Relay::default());
        let (a, b, c) = (node(1), node(2), node(3));
        let mut a_client = attach(&relay, a, 1);
        let mut b_client = attach(&relay, b, 2);
        let mut c_client = attach(&relay, c, 3);
        let (link, opened) = relay.open_link(a, b).expect("both attached");
        assert!(opened);
        assert_eq!(relay.open_link(b, a), Some((link, false)), "one link per pair");
        let mut to_b = b_client.queue.try_recv().expect("b's queue was handed over");
        assert!(a_client.queue.try_recv().is_ok(), "a's queue was handed over");
        assert!(c_client.queue.try_recv().is_err(), "c has no link, so no queue");

        relay.forward_all(a, &mut frames(link, &[b"hello"]), &mut a_client.budget);
        let got = to_b.try_recv().expect("forwarded");
        assert_eq!(&got[got.len() - 5..], b"hello");
        assert_eq!(relay.relayed_bytes(), 5);

        relay.forward_all(c, &mut frames(link, &[b"forged"]), &mut c_client.budget);
        relay.forward_all(a, &mut frames(link + 1, &[b"guess"]), &mut a_client.budget);
        assert!(to_b.try_recv().is_err());
        assert_eq!((relay.relayed_bytes(), relay.dropped()), (5, 2));
    }

    #[test]
    fn no_link_to_a_node_that_is_not_attached() {
        let relay = Arc::new(Relay::default());
        let _a = attach(&relay, node(1), 1);
        assert_eq!(relay.open_link(node(1), node(2)), None);
        assert_eq!(relay.links(), 0);
    }

    #[test]
    fn only_the_latest_attachment_detaches_and_closing_reports_the_bytes() {
        let relay = Arc::new(Relay::default());
        let (a, b) = (node(1), node(2));
        let mut a_client = attach(&relay, a, 1);
        let _b = attach(&relay, b, 2);
        let (link, _) = relay.open_link(a, b).expect("link");
        relay.forward_all(a, &mut frames(link, &[b"abc"]), &mut a_client.budget);
        let _b_again = attach(&relay, b, 3);
        assert!(relay.detach(&b, 2).is_empty(), "the replaced connection leaves the link");
        assert_eq!(relay.links(), 1);
        let closed = relay.detach(&b, 3);
        assert!(
            matches!(closed.as_slice(), [ServerEvent::RelayClosed { link: l, bytes_ab: 3, bytes_ba: 0, .. }] if *l == link)
        );
        assert_eq!(relay.links(), 0);
    }

    #[test]
    fn a_node_over_its_budget_is_dropped() {
        let relay = Arc::new(Relay::default());
        let (a, b) = (node(1), node(2));
        let limits = Limits { relay_packets_per_sec: 1, ..Limits::default() };
        let mut a_client = relay.attach(a, 1, limits.relay_budget(Instant::now()));
        let _b = attach(&relay, b, 2);
        let (link, _) = relay.open_link(a, b).expect("link");
        let burst: Vec<&[u8]> = (0..65).map(|_| &b"x"[..]).collect();
        relay.forward_all(a, &mut frames(link, &burst), &mut a_client.budget);
        assert_eq!((relay.relayed_bytes(), relay.dropped()), (64, 1), "a burst of 64 packets, then none");
    }

    #[test]
    fn a_writer_that_ended_gets_a_fresh_queue_on_the_next_link_request() {
        let relay = Arc::new(Relay::default());
        let (a, b) = (node(1), node(2));
        let _a = attach(&relay, a, 1);
        let mut b_client = attach(&relay, b, 2);
        relay.open_link(a, b).expect("link");
        drop(b_client.queue.try_recv().expect("queue"));
        let mut rearmed = relay.rearm(&b, 2).expect("b is still attached by 2");
        assert!(relay.rearm(&b, 9).is_none());
        relay.open_link(a, b).expect("link");
        assert!(rearmed.try_recv().is_ok());
    }
}
