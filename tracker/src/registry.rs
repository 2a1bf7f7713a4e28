//! The registered nodes as the sessions share them: the [`Directory`] listings, how to reach
//! each node's session (its connection and control-stream queue), and the [`Rendezvous`]
//! state, under one lock so that a node is in all of them or in none.
//!
//! The relay and the per-address connection counts have locks of their own; no code holds
//! the registry lock while taking either, or while awaiting.

use std::collections::HashMap;

use parking_lot::{Mutex, MutexGuard};
use qpeer_certs::NodeId;
use qpeer_wire::tracker::ServerFrame;
use tokio::sync::mpsc;

use crate::directory::{Directory, Listing, RegisterOutcome};
use crate::rendezvous::Rendezvous;

/// Frames for one node's control stream. Boxed: a channel allocates its first block of 32
/// slots up front, and 32 boxes cost far less per idle node than 32 frames.
pub type Outbox = mpsc::Sender<Box<ServerFrame>>;

/// How to reach a registered node's session.
#[derive(Debug)]
pub struct NodeReach {
    pub connection: quinn::Connection,
    pub outbox: Outbox,
}

/// Result of [`Nodes::register`].
#[derive(Debug)]
pub enum Entered {
    Registered,
    /// The node was registered over this older connection, which the caller must close.
    Replaced(quinn::Connection),
    Full,
    /// A visitor registration of a node whose home is this tracker: refused.
    HomeHere,
}

/// The registered nodes behind their lock.
#[derive(Debug, Default)]
pub struct Registry(Mutex<Nodes>);

impl Registry {
    pub fn lock(&self) -> MutexGuard<'_, Nodes> {
        self.0.lock()
    }

    /// Number of registered nodes.
    pub fn len(&self) -> usize {
        self.0.lock().directory.len()
    }
}

/// Everything the registry lock guards.
#[derive(Debug, Default)]
pub struct Nodes {
    directory: Directory,
    sessions: HashMap<NodeId, NodeReach>,
    rendezvous: Rendezvous,
    /// The newest home record sequence number this tracker published for each registered
    /// node (only registered nodes publish, so it is bounded by them).
    published: HashMap<NodeId, i64>,
}

impl Nodes {
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    pub fn directory_mut(&mut self) -> &mut Directory {
        &mut self.directory
    }

    pub fn rendezvous_mut(&mut self) -> &mut Rendezvous {
        &mut self.rendezvous
    }

    pub fn len(&self) -> usize {
        self.directory.len()
    }

    /// Lists `node_id` and keeps its session's handle.
    pub fn register(
        &mut self,
        node_id: NodeId,
        listing: Listing,
        session: NodeReach,
        max_nodes: usize,
    ) -> Entered {
        match self.directory.register(node_id, listing, max_nodes) {
            RegisterOutcome::Full => Entered::Full,
            RegisterOutcome::HomeHere => Entered::HomeHere,
            RegisterOutcome::Registered => {
                self.sessions.insert(node_id, session);
                Entered::Registered
            }
            RegisterOutcome::Replaced(_) => match self.sessions.insert(node_id, session) {
                Some(old) => Entered::Replaced(old.connection),
                None => Entered::Registered,
            },
        }
    }

    /// Removes `node_id` and what the rendezvous knew of it, if `connection_id` still
    /// registers it; true when it did.
    pub fn remove(&mut self, node_id: &NodeId, connection_id: u64) -> bool {
        if !self.directory.remove(node_id, connection_id) {
            return false;
        }
        self.sessions.remove(node_id);
        self.rendezvous.forget(node_id);
        self.published.remove(node_id);
        true
    }

    /// The newest record sequence number published here for `node_id`.
    pub fn published_seq(&self, node_id: &NodeId) -> Option<i64> {
        self.published.get(node_id).copied()
    }

    /// Notes that `node_id`'s record `seq` is published, if `connection_id` still registers
    /// it (a node gone since is forgotten, not remembered again).
    pub fn note_published(&mut self, node_id: NodeId, connection_id: u64, seq: i64) {
        if self.directory.get(&node_id).is_some_and(|l| l.connection_id == connection_id) {
            let newest = self.published.entry(node_id).or_insert(seq);
            *newest = (*newest).max(seq);
        }
    }

    /// Queues `frame` for `node_id`'s control stream without waiting; false when the node is
    /// not registered or its queue is full.
    pub fn send(&self, node_id: &NodeId, frame: ServerFrame) -> bool {
        self.sessions.get(node_id).is_some_and(|session| session.outbox.try_send(Box::new(frame)).is_ok())
    }
}
