//! The running peer actors, one per peer with a session (see [`crate::session`]).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use qpeer_certs::NodeId;
use tokio::sync::mpsc;

use crate::peer::PeerConnection;
use crate::session::{Command, PeerActor, SessionHandle};
use crate::shared::Shared;

/// Peer actors by NodeId; each leaves when its session ends ([`SessionRegistry::retire`]).
#[derive(Default)]
pub(crate) struct SessionRegistry {
    sessions: Mutex<HashMap<NodeId, SessionHandle>>,
}

impl SessionRegistry {
    /// The running actor of `peer`'s session, started if there is none.
    pub(crate) fn session(&self, shared: &Arc<Shared>, peer: NodeId) -> SessionHandle {
        self.sessions.lock().entry(peer).or_insert_with(|| PeerActor::spawn(shared.clone(), peer)).clone()
    }

    /// The running actor of `peer`'s session, if there is one.
    pub(crate) fn get(&self, peer: &NodeId) -> Option<SessionHandle> {
        self.sessions.lock().get(peer).cloned()
    }

    /// Removes the actor owning `inbox` and, under the same lock, its session from the path
    /// table (an idle session ending), so that a successor started meanwhile opens a session
    /// of its own. False when another actor already took its place.
    pub(crate) fn retire(&self, shared: &Shared, peer: &NodeId, inbox: &mpsc::Sender<Command>) -> bool {
        let mut sessions = self.sessions.lock();
        match sessions.get(peer) {
            Some(handle) if handle.inbox.same_channel(inbox) => {
                sessions.remove(peer);
                shared.table.lock().close(peer);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn live_connection(&self, peer: &NodeId) -> Option<PeerConnection> {
        self.sessions.lock().get(peer).and_then(SessionHandle::live_connection)
    }

    pub(crate) fn handles(&self) -> Vec<SessionHandle> {
        self.sessions.lock().values().cloned().collect()
    }

    /// Tells every session that our tracker connection or address changed.
    pub(crate) fn refresh_all(&self) {
        for handle in self.handles() {
            let _ = handle.inbox.try_send(Command::Refresh);
        }
    }

    pub(crate) fn clear(&self) {
        self.sessions.lock().clear();
    }
}
