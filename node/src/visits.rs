//! Visits: connections from the node's one socket to other nodes' home trackers.
//!
//! A peer that our home tracker does not know may live on another tracker: its home record
//! (resolved through our home's DHT node, see [`crate::records`]) names that tracker and its
//! id. The node then registers there as a visitor (not listed, never published), and the
//! session with that peer asks *that* tracker for introductions and for its relay, so
//! punching and relaying work as with a peer at home. A visit has a relay slot of its own
//! ([`crate::relay_link`]) and ends when no session has used it for [`IDLE`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use qpeer_certs::{NodeId, ServerTrust};
use qpeer_tracker::client::{Introduction, RegisterInfo};
use qpeer_tracker::{ClientError, TrackerClient, TrackerEvent};
use tokio::sync::mpsc;

use crate::candidates::local_candidates;
use crate::error::{NodeError, TrackerRequest};
use crate::records::{locate, Located};
use crate::relay_link::{self, RelayLink, HOME_SLOT};
use crate::session::Command;
use crate::shared::Shared;

/// A visit that no session holds is closed after this.
const IDLE: Duration = Duration::from_secs(60);
/// Finding a peer's home (resolving its record, visiting the tracker it names) may take at
/// most this long in all.
pub(crate) const LOCATE_WITHIN: Duration = Duration::from_secs(30);

/// A registered visitor connection to another node's home tracker.
pub(crate) struct Visit {
    pub(crate) tracker: NodeId,
    pub(crate) client: Arc<TrackerClient>,
    pub(crate) slot: u16,
    /// The peers we came here for (asked to be introduced to, or relayed with). A relay
    /// link the visited tracker opens for anyone else is dropped: it is trusted for the
    /// peers whose records named it, not as a home.
    peers: Mutex<HashSet<NodeId>>,
}

impl std::fmt::Debug for Visit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Visit").field("tracker", &self.tracker.short()).field("slot", &self.slot).finish()
    }
}

impl Visit {
    fn is_open(&self) -> bool {
        self.client.connection().close_reason().is_none()
    }

    fn serves(&self, peer: &NodeId) -> bool {
        self.peers.lock().contains(peer)
    }

    /// Asks the visited tracker to relay between us and `peer`, which we came here for.
    pub(crate) async fn request_relay(&self, peer: NodeId) -> Result<(), ClientError> {
        self.peers.lock().insert(peer);
        self.client.request_relay(peer).await
    }

    /// Asks the visited tracker to introduce us to `peer`, which we came here for.
    async fn introduce(&self, peer: NodeId) -> Result<Introduction, ClientError> {
        self.peers.lock().insert(peer);
        self.client.introduce(peer).await
    }
}

/// The node's open visits, by tracker id.
#[derive(Default)]
pub(crate) struct Visits {
    open: Mutex<HashMap<NodeId, Arc<Visit>>>,
    /// One visit to a tracker opens at a time, so two sessions never visit it twice (visits
    /// to other trackers do not wait).
    opening: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
    /// Relay slots are numbered on, never reused soon: a visit that just ended may still be
    /// clearing its slot's links.
    next_slot: AtomicU32,
}

impl Visits {
    /// Ends the visit to `tracker` (it is becoming our home: the home registration would
    /// replace the visitor one anyway).
    pub(crate) fn close(&self, tracker: &NodeId) {
        if let Some(visit) = self.open.lock().remove(tracker) {
            visit.client.connection().close(qpeer_wire::close_code::NORMAL.into(), b"now our home");
        }
    }

    fn new_slot(&self) -> u16 {
        let open = self.open.lock();
        loop {
            let n = self.next_slot.fetch_add(1, Ordering::Relaxed);
            // 1..=u16::MAX: slot 0 is the home's.
            let slot = u16::try_from(n % u32::from(u16::MAX)).unwrap_or(0) + 1;
            if open.values().all(|visit| visit.slot != slot) {
                return slot;
            }
        }
    }

    fn opening_lock(&self, tracker: NodeId) -> Arc<tokio::sync::Mutex<()>> {
        let mut opening = self.opening.lock();
        // Locks nobody holds or waits for are dropped as others are made.
        opening.retain(|_, lock| Arc::strong_count(lock) > 1);
        opening.entry(tracker).or_default().clone()
    }
}

/// Asks for an introduction to `peer` wherever it lives: at the tracker of `via` (the visit
/// the session used last), at home, or at the tracker its home record names. Returns the
/// introduction and the visit it came through (`None`: home).
pub(crate) async fn introduce(
    shared: &Arc<Shared>,
    peer: NodeId,
    via: Option<Arc<Visit>>,
    on_lookup: impl Fn(),
) -> Result<(Introduction, Option<Arc<Visit>>), NodeError> {
    if let Some(visit) = via.filter(|visit| visit.is_open()) {
        match visit.introduce(peer).await {
            Ok(intro) => return Ok((intro, Some(visit))),
            // The peer moved (or its tracker restarted): look again.
            Err(ClientError::NotFound(_)) => shared.records.forget(&peer),
            Err(e) if visit.is_open() => {
                return Err(NodeError::TrackerRequest { request: TrackerRequest::Introduce, source: e })
            }
            Err(_) => {}
        }
    }
    let home = shared.tracker_client().await?;
    match home.introduce(peer).await {
        Ok(intro) => return Ok((intro, None)),
        Err(ClientError::NotFound(_)) => {}
        Err(source) => return Err(NodeError::TrackerRequest { request: TrackerRequest::Introduce, source }),
    }
    on_lookup();
    tokio::time::timeout(LOCATE_WITHIN, locate_and_introduce(shared, peer, &home))
        .await
        .unwrap_or(Err(NodeError::LocateTimeout { peer, timeout: LOCATE_WITHIN }))
}

/// Resolves `peer`'s record through `home` and asks the tracker it names for the peer.
async fn locate_and_introduce(
    shared: &Arc<Shared>,
    peer: NodeId,
    home: &TrackerClient,
) -> Result<(Introduction, Option<Arc<Visit>>), NodeError> {
    // A cached record first; if its tracker fails us, the DHT's newest once more.
    let mut fresh = false;
    loop {
        let Some(located) = locate(shared, home, peer, fresh).await? else {
            return Err(NodeError::PeerNotFound(peer));
        };
        match introduce_at_home_of(shared, peer, &located, home).await {
            Ok(found) => return Ok(found),
            Err(e) if located.cached && !fresh => {
                tracing::debug!(peer = %peer.short(), "the cached record failed ({e}); resolving again");
                shared.records.forget(&peer);
                fresh = true;
            }
            Err(e) => {
                shared.records.forget(&peer);
                return Err(e);
            }
        }
    }
}

/// Visits the tracker `located` names and asks it for `peer`.
async fn introduce_at_home_of(
    shared: &Arc<Shared>,
    peer: NodeId,
    located: &Located,
    home: &TrackerClient,
) -> Result<(Introduction, Option<Arc<Visit>>), NodeError> {
    let tracker = located.record.tracker;
    let stale = NodeError::StaleRecord { peer, tracker };
    let home_id = shared.tracker.home().and_then(|home| home.id).or(home.tracker_id());
    if home_id == Some(tracker) {
        // The record names our own home, which just said it does not hold the peer.
        return Err(stale);
    }
    let visit = visit(shared, tracker, &located.record.addrs).await?;
    match visit.introduce(peer).await {
        Ok(intro) => Ok((intro, Some(visit))),
        Err(ClientError::NotFound(_)) => Err(stale),
        Err(source) => Err(NodeError::TrackerRequest { request: TrackerRequest::Introduce, source }),
    }
}

/// The open visit to `tracker`, or a new one at the first of `addrs` that answers.
async fn visit(shared: &Arc<Shared>, tracker: NodeId, addrs: &[SocketAddr]) -> Result<Arc<Visit>, NodeError> {
    let visits = &shared.visits;
    let opening = visits.opening_lock(tracker);
    let _one_at_a_time = opening.lock().await;
    if let Some(visit) = visits.open.lock().get(&tracker).filter(|visit| visit.is_open()) {
        return Ok(visit.clone());
    }
    let mut last_error = None;
    for addr in usable(shared, addrs) {
        match register_visitor(shared, tracker, addr).await {
            Ok((client, events)) => {
                let visit = Arc::new(Visit {
                    tracker,
                    client: Arc::new(client),
                    slot: visits.new_slot(),
                    peers: Mutex::new(HashSet::new()),
                });
                visits.open.lock().insert(tracker, visit.clone());
                tracing::debug!(tracker = %tracker.short(), %addr, slot = visit.slot, "visiting");
                shared.tasks.spawn(serve(shared.clone(), visit.clone(), events));
                return Ok(visit);
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(NodeError::Visit {
        tracker,
        source: Box::new(
            last_error.unwrap_or(NodeError::Conflict("the record names no address this node can reach")),
        ),
    })
}

/// The record's addresses our socket can send to (an IPv4-only socket cannot reach IPv6).
fn usable(shared: &Shared, addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let v6 = shared.local_addr.is_ipv6();
    addrs.iter().copied().filter(|addr| v6 || addr.is_ipv4()).collect()
}

async fn register_visitor(
    shared: &Arc<Shared>,
    tracker: NodeId,
    addr: SocketAddr,
) -> Result<(TrackerClient, mpsc::Receiver<TrackerEvent>), NodeError> {
    let direct = shared.table.lock().policy().direct;
    let info = RegisterInfo {
        candidates: if direct { local_candidates(shared.local_addr) } else { Vec::new() },
        name: None,
        incarnation: shared.incarnation,
        visitor: true,
    };
    shared.table.lock().allow_pass(addr);
    let trust = ServerTrust::Pinned(tracker);
    let connect = TrackerClient::connect(
        &shared.endpoint,
        &shared.identity,
        addr,
        qpeer_certs::config::PINNED_SERVER_NAME,
        &trust,
        info,
    );
    match tokio::time::timeout(shared.connect_timeout, connect).await {
        Ok(Ok(registered)) => Ok(registered),
        Ok(Err(source)) => Err(NodeError::Tracker { tracker: addr.to_string(), source }),
        Err(_) => Err(NodeError::Tracker {
            tracker: addr.to_string(),
            source: ClientError::Timeout(shared.connect_timeout),
        }),
    }
}

/// Serves a visit until its connection closes, it idles out, or the node shuts down: what the
/// visited tracker says unasked goes to the sessions, relayed packets to and from its slot.
async fn serve(shared: Arc<Shared>, visit: Arc<Visit>, mut events: mpsc::Receiver<TrackerEvent>) {
    let pump = relay_link::pump(shared.relay.clone(), visit.slot, visit.client.connection().clone());
    let cancel = shared.cancel.clone();
    shared.tasks.spawn(async move {
        tokio::select! {
            _ = pump => {}
            _ = cancel.cancelled() => {}
        }
    });
    let mut unused_since: Option<tokio::time::Instant> = None;
    let mut check = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => break,
            _ = visit.client.closed() => break,
            event = events.recv() => match event {
                Some(event) => on_event(&shared, &visit, event),
                None => break,
            },
            _ = check.tick() => {
                // Held by the map and by this task only: no session uses the visit.
                if Arc::strong_count(&visit) <= 2 {
                    let since = *unused_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= IDLE {
                        break;
                    }
                } else {
                    unused_since = None;
                }
            }
        }
    }
    // The slot's links go first, while the slot is still this visit's.
    debug_assert_ne!(visit.slot, HOME_SLOT);
    shared.table.lock().clear_links(visit.slot);
    shared.prober.tick();
    {
        let mut open = shared.visits.open.lock();
        if open.get(&visit.tracker).is_some_and(|current| Arc::ptr_eq(current, &visit)) {
            open.remove(&visit.tracker);
        }
    }
    if visit.is_open() {
        visit.client.close().await;
    } else {
        // Lost: records naming that tracker are suspect until resolved again.
        shared.records.forget_tracker(&visit.tracker);
    }
}

fn on_event(shared: &Arc<Shared>, visit: &Arc<Visit>, event: TrackerEvent) {
    match event {
        TrackerEvent::RelayReady { peer, .. } if !visit.serves(&peer) => {
            tracing::debug!(peer = %peer.short(), "dropping a relay link from a visited tracker: not a peer we came for");
        }
        TrackerEvent::Introduction(intro) => {
            let handle = shared.sessions.session(shared, intro.peer);
            if handle.inbox.try_send(Command::Introduced(intro, Some(visit.clone()))).is_err() {
                tracing::debug!("dropping an introduction: the session is not keeping up");
            }
        }
        TrackerEvent::RelayReady { peer, link } => {
            shared.table.lock().set_link(&peer, RelayLink { slot: visit.slot, id: link });
            shared.prober.tick();
        }
        // Our address as this tracker sees it matters to the peers it introduces us to; the
        // next introduction carries it.
        TrackerEvent::Observed { .. } => {}
    }
}
