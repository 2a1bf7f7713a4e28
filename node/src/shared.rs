//! [`Shared`]: what the node's tasks share, grouped by owner: the endpoint and its peer
//! transport, the tracker status, the session registry, the path layer (table, prober,
//! relay queues), the queue of new connections, the home lock, the event channel, and the
//! cancellation token and task tracker that every task of the node lives under.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use qpeer_certs::{Identity, NodeId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{NodeError, TrackerRequest};
use crate::events::{Events, NodeEvent};
use crate::home::HomeLock;
use crate::paths::{PathChange, PathTable, PeerPath};
use crate::peer::PeerConnection;
use crate::prober::Prober;
use crate::records::RecordCache;
use crate::registry::SessionRegistry;
use crate::relay_link::RelayHub;
use crate::tracker_link::TrackerStatus;
use crate::transport::PeerTransport;
use crate::visits::Visit;
use crate::visits::Visits;

/// New connections waiting for [`crate::Node::accept`].
pub(crate) const ACCEPT_QUEUE: usize = 64;

pub(crate) struct Shared {
    pub(crate) identity: Arc<Identity>,
    /// A random number for this process, so peers tell a restart from the same node.
    pub(crate) incarnation: u64,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) local_addr: SocketAddr,
    pub(crate) transport: PeerTransport,
    pub(crate) connect_timeout: Duration,
    pub(crate) tracker: TrackerStatus,
    pub(crate) sessions: SessionRegistry,
    pub(crate) table: Arc<Mutex<PathTable>>,
    pub(crate) prober: Arc<Prober>,
    pub(crate) relay: Arc<RelayHub>,
    /// Peers' home records, verified.
    pub(crate) records: RecordCache,
    /// Connections to other nodes' home trackers.
    pub(crate) visits: Visits,
    pub(crate) accepted: mpsc::Sender<PeerConnection>,
    pub(crate) accepted_rx: tokio::sync::Mutex<mpsc::Receiver<PeerConnection>>,
    pub(crate) home: HomeLock,
    pub(crate) events: Events,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

impl Shared {
    pub(crate) fn id(&self) -> NodeId {
        self.identity.node_id()
    }

    pub(crate) fn peer_client_config(
        &self,
        peer: NodeId,
    ) -> Result<quinn::ClientConfig, qpeer_certs::TlsError> {
        self.transport.client_config(&self.identity, peer)
    }

    /// The registered tracker connection, once there is one; fails on a fatal tracker error
    /// or shutdown.
    pub(crate) async fn tracker_client(&self) -> Result<Arc<qpeer_tracker::TrackerClient>, NodeError> {
        tokio::select! {
            _ = self.cancel.cancelled() => Err(NodeError::Shutdown),
            client = self.tracker.client() => client,
        }
    }

    /// The next new connection, whoever opened it; `None` once the node shuts down.
    pub(crate) async fn accept(&self) -> Option<PeerConnection> {
        let mut accepted = self.accepted_rx.lock().await;
        tokio::select! {
            _ = self.cancel.cancelled() => None,
            conn = accepted.recv() => conn,
        }
    }

    /// Asks the tracker, in the background, for a relay link to `peer`: it opens once the peer
    /// asks too, and carries the session while no direct path works.
    /// `via`: the visited tracker the peer lives on (`None`: our home).
    pub(crate) fn ask_for_relay(self: &Arc<Self>, peer: NodeId, via: Option<Arc<Visit>>) {
        if !self.table.lock().policy().relay {
            return;
        }
        let shared = self.clone();
        self.tasks.spawn(async move {
            let request = async {
                let requested = match via {
                    Some(visit) => visit.request_relay(peer).await,
                    None => shared.tracker_client().await?.request_relay(peer).await,
                };
                requested
                    .map_err(|source| NodeError::TrackerRequest { request: TrackerRequest::Relay, source })
            };
            tokio::select! {
                result = request => if let Err(e) = result {
                    tracing::debug!(peer = %peer.short(), "relay request failed: {e}");
                },
                _ = shared.cancel.cancelled() => {}
            }
        });
    }

    /// Reports a path change of a session that has a connection.
    pub(crate) fn on_path_change(&self, change: PathChange) {
        tracing::debug!(peer = %change.peer.short(), "path {} (was {})", change.path, change.was);
        if change.was == PeerPath::Waiting || self.sessions.live_connection(&change.peer).is_none() {
            return;
        }
        self.events.emit(NodeEvent::PathChanged { peer: change.peer, path: change.path, was: change.was });
    }
}
