//! The node's relation to its trackers: [`TrackerLink`] chooses the home among them (lowest
//! RTT, ties to the first listed), keeps the node registered there (re-registering after any
//! loss, moving to the next tracker when the home is gone), publishes our home record through
//! it, routes what the tracker says unasked to the sessions, and publishes the state in a
//! [`TrackerStatus`] that callers wait on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use qpeer_certs::{NodeId, ServerTrust};
use qpeer_tracker::client::RegisterInfo;
use qpeer_tracker::{ClientError, TrackerAddr, TrackerClient, TrackerEvent};
use qpeer_wire::close_code;
use qpeer_wire::tracker::Mapping;
use tokio::sync::{mpsc, watch};

use crate::candidates::local_candidates;
use crate::error::{Fatal, NodeError, TrackerMismatch};
use crate::events::NodeEvent;
use crate::known_trackers::{KnownTracker, KnownTrackers};
use crate::netcheck::{self, TrackerTrust};
use crate::records::RecordState;
use crate::relay_link::{self, HOME_SLOT};
use crate::session::Command;
use crate::shared::Shared;

/// Re-registration backoff: first delay and cap.
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// A tracker connection that lasted this long was working: after losing it, try again at once.
const WORKED_FOR: Duration = Duration::from_secs(2);
/// How long the trackers get to answer when the node measures their RTT to choose a home.
const CHOOSE_WITHIN: Duration = Duration::from_millis(1000);
/// A later-listed tracker must be faster than an earlier one by more than this, or by more
/// than [`TIE_SHARE`] of the earlier one's RTT, to win: closer RTTs are a tie (one
/// handshake's estimate is noisy, on a busy machine most of all), and ties go to the first
/// listed.
const TIE_MARGIN: Duration = Duration::from_millis(10);
const TIE_SHARE: f64 = 0.25;

/// The tracker the node is registered with as its home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeTracker {
    /// `None` when a CA vouched for the tracker and it did not present a qpeer identity.
    pub id: Option<NodeId>,
    /// As given (`--tracker`).
    pub host_port: String,
    pub addr: SocketAddr,
}

#[derive(Clone)]
enum TrackerState {
    Connecting { last_error: Option<Arc<NodeError>> },
    Registered(Arc<TrackerClient>),
    Failed(Fatal),
}

/// Where the node stands with its tracker, for whoever waits on it.
pub(crate) struct TrackerStatus {
    state: watch::Sender<TrackerState>,
    /// Successful registrations so far (re-registrations included).
    registrations: AtomicU64,
    /// How the current registration was trusted, for more connections to the tracker.
    trust: Mutex<Option<TrackerTrust>>,
    /// Our NAT's mapping, as the last check measured it.
    mapping: Mutex<Mapping>,
    /// The tracker we are (or were last) registered with.
    home: Mutex<Option<HomeTracker>>,
    /// Where our home record stands.
    record: Mutex<RecordState>,
    /// The last sequence number our record was signed with.
    record_seq: AtomicI64,
}

impl TrackerStatus {
    pub(crate) fn new() -> Self {
        Self {
            state: watch::channel(TrackerState::Connecting { last_error: None }).0,
            registrations: AtomicU64::new(0),
            trust: Mutex::new(None),
            mapping: Mutex::new(Mapping::Unknown),
            home: Mutex::new(None),
            record: Mutex::new(RecordState::Unpublished),
            record_seq: AtomicI64::new(0),
        }
    }

    pub(crate) fn home(&self) -> Option<HomeTracker> {
        self.home.lock().clone()
    }

    pub(crate) fn record(&self) -> RecordState {
        self.record.lock().clone()
    }

    pub(crate) fn set_record(&self, state: RecordState) {
        *self.record.lock() = state;
    }

    /// A sequence number for our next record: the clock in milliseconds (so a restarted
    /// node's records are newer than its old ones), and always above the last one.
    pub(crate) fn next_record_seq(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let previous = self.record_seq.fetch_max(now, Ordering::Relaxed);
        if previous >= now {
            self.record_seq.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            now
        }
    }

    pub(crate) fn trust(&self) -> Option<TrackerTrust> {
        self.trust.lock().clone()
    }

    /// Our NAT's mapping (`Unknown` until measured).
    pub(crate) fn mapping(&self) -> Mapping {
        *self.mapping.lock()
    }

    /// The registered tracker connection, once there is one (or the fatal error).
    pub(crate) async fn client(&self) -> Result<Arc<TrackerClient>, NodeError> {
        let mut state = self.state.subscribe();
        loop {
            match &*state.borrow_and_update() {
                TrackerState::Registered(client) => return Ok(client.clone()),
                TrackerState::Failed(fatal) => return Err(fatal.clone().into()),
                TrackerState::Connecting { .. } => {}
            }
            if state.changed().await.is_err() {
                return Err(NodeError::Shutdown);
            }
        }
    }

    /// The address the tracker observes us at, while registered.
    pub(crate) fn observed_addr(&self) -> Option<SocketAddr> {
        match &*self.state.borrow() {
            TrackerState::Registered(client) => Some(client.observed_addr()),
            _ => None,
        }
    }

    /// Waits until registered (the observed address), a fatal error, or `timeout`.
    pub(crate) async fn registered(&self, timeout: Duration) -> Result<SocketAddr, NodeError> {
        match tokio::time::timeout(timeout, self.client()).await {
            Ok(client) => client.map(|client| client.observed_addr()),
            Err(_) => {
                let last_error = match &*self.state.borrow() {
                    TrackerState::Connecting { last_error } => last_error.clone(),
                    _ => None,
                };
                Err(NodeError::RegistrationTimeout { timeout, last_error })
            }
        }
    }

    /// Resolves with the fatal error once the node can no longer work.
    pub(crate) async fn failed(&self) -> NodeError {
        let mut state = self.state.subscribe();
        loop {
            if let TrackerState::Failed(fatal) = &*state.borrow_and_update() {
                return fatal.clone().into();
            }
            if state.changed().await.is_err() {
                return NodeError::Shutdown;
            }
        }
    }

    pub(crate) fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::Relaxed)
    }

    fn set(&self, state: TrackerState) {
        self.state.send_replace(state);
    }
}

/// Keeps the node registered with a home among its trackers: chooses one, re-registers with
/// capped exponential backoff after any loss (at once after losing a connection that
/// worked), moves on to the next tracker when one fails, and stops only on a fatal error
/// (our NodeId registered elsewhere, or the one tracker's identity wrong) or shutdown.
pub(crate) struct TrackerLink {
    pub(crate) shared: Arc<Shared>,
    /// In the order given; never empty.
    pub(crate) trackers: Vec<TrackerAddr>,
    pub(crate) roots: Option<Arc<rustls::RootCertStore>>,
    pub(crate) known: KnownTrackers,
    pub(crate) name: Option<String>,
}

/// How one tracker is trusted, and what the known_trackers file said of it.
struct Trust {
    trust: ServerTrust,
    server_name: String,
    known: Option<KnownTracker>,
}

/// What ended a registration.
enum Ended {
    /// Shutdown or a fatal error: the link stops.
    Stop,
    /// The connection was lost; `worked`: it had been up a while.
    Lost { worked: bool },
    /// Another process registered our NodeId at this tracker, and there are other trackers.
    Replaced(Fatal),
}

impl TrackerLink {
    pub(crate) async fn run(self) {
        let shared = self.shared.clone();
        let status = &shared.tracker;
        let mut backoff = BACKOFF_START;
        // Trackers where another process took our NodeId: going back would push it off in
        // turn, forever, so they are left out; when none is left, the node stops.
        let mut replaced_at = std::collections::HashSet::new();
        loop {
            let mut again_at_once = false;
            for (index, rtt) in self.preference().await {
                if replaced_at.contains(&index) {
                    continue;
                }
                match self.connect_once(index).await {
                    Ok((client, events, addr)) => {
                        backoff = BACKOFF_START;
                        match self.registered(index, client, events, addr, rtt).await {
                            Ended::Stop => return,
                            Ended::Lost { worked } => again_at_once = worked,
                            Ended::Replaced(fatal) => {
                                replaced_at.insert(index);
                                if replaced_at.len() == self.trackers.len() {
                                    self.stop_replaced(fatal);
                                    return;
                                }
                                tracing::warn!("{}; moving to another tracker", NodeError::from(fatal));
                                again_at_once = true;
                            }
                        }
                        break;
                    }
                    Err(NodeError::TrackerIdMismatch(mismatch)) if self.trackers.len() == 1 => {
                        tracing::error!("{mismatch}");
                        status.set(TrackerState::Failed(Fatal::TrackerIdMismatch(mismatch)));
                        return;
                    }
                    Err(e) => {
                        // With other trackers to try, a wrong identity at one of them is that
                        // tracker's failure, not the node's.
                        tracing::warn!("cannot register with the tracker: {e}");
                        status.set(TrackerState::Connecting { last_error: Some(Arc::new(e)) });
                    }
                }
            }
            if again_at_once {
                continue;
            }
            tracing::debug!("no tracker took our registration; retrying in {backoff:?}");
            tokio::select! {
                _ = shared.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_CAP);
        }
    }

    /// The trackers in the order to try them, with the RTT measured to each: one tracker
    /// needs no measuring; with several, each is asked (without registering) where it sees
    /// us, and the fastest comes first unless an earlier-listed one is within the tie margin
    /// ([`TIE_MARGIN`], [`TIE_SHARE`]); trackers that did not answer within [`CHOOSE_WITHIN`]
    /// come last.
    async fn preference(&self) -> Vec<(usize, Option<Duration>)> {
        if self.trackers.len() == 1 {
            return vec![(0, None)];
        }
        let measured = futures_util::future::join_all((0..self.trackers.len()).map(|index| async move {
            let answered = tokio::time::timeout(CHOOSE_WITHIN, self.observe(index)).await;
            match answered {
                Ok(Ok(rtt)) => Some(rtt),
                Ok(Err(e)) => {
                    tracing::debug!(tracker = %self.trackers[index].host_port(), "no answer: {e}");
                    None
                }
                Err(_) => None,
            }
        }))
        .await;
        order_by_rtt(&measured)
    }

    /// Stops for good: our NodeId is registered by another process wherever we could go.
    fn stop_replaced(&self, fatal: Fatal) {
        let error = NodeError::from(fatal.clone());
        tracing::error!("{error}");
        if let Fatal::Replaced { detail } = &fatal {
            self.shared.events.emit(NodeEvent::Replaced { detail: detail.clone() });
        }
        self.shared.tracker.set(TrackerState::Failed(fatal));
    }

    /// Asks tracker `index` where it sees us, without registering: the connection's RTT.
    async fn observe(&self, index: usize) -> Result<Duration, NodeError> {
        let shared = &self.shared;
        let tracker = &self.trackers[index];
        let addr = tracker.resolve().await?;
        let trust = self.trust_for(tracker)?;
        shared.table.lock().allow_pass(addr);
        let config = TrackerClient::config(&shared.identity, &trust.trust)
            .map_err(|source| NodeError::Tracker { tracker: tracker.host_port(), source })?;
        TrackerClient::observe(&shared.endpoint, config, addr, &trust.server_name, &trust.trust)
            .await
            .map(|answer| answer.rtt)
            .map_err(|source| NodeError::Tracker { tracker: tracker.host_port(), source })
    }

    /// Serves a registration at tracker `index` until it ends.
    async fn registered(
        &self,
        index: usize,
        client: TrackerClient,
        events: mpsc::Receiver<TrackerEvent>,
        addr: SocketAddr,
        rtt: Option<Duration>,
    ) -> Ended {
        let shared = &self.shared;
        let status = &shared.tracker;
        let started = std::time::Instant::now();
        let registrations = status.registrations.fetch_add(1, Ordering::Relaxed) + 1;
        let client = Arc::new(client);
        let host_port = self.trackers[index].host_port();
        let tracker_id = client.tracker_id().or_else(|| qpeer_certs::peer_node_id(client.connection()).ok());
        *status.home.lock() = Some(HomeTracker { id: tracker_id, host_port: host_port.clone(), addr });
        shared.events.emit(NodeEvent::Registered { id: shared.id(), observed: client.observed_addr() });
        if let (Some(tracker), true) = (tracker_id, self.trackers.len() > 1) {
            shared.events.emit(NodeEvent::HomeChosen { tracker, host_port: host_port.clone(), rtt });
        }
        if registrations > 1 {
            tracing::info!("re-registered with the tracker {host_port}");
        }
        status.set(TrackerState::Registered(client.clone()));
        shared.tasks.spawn(check_network(shared.clone(), client.clone()));
        status.set_record(RecordState::Unpublished);
        shared.tasks.spawn(crate::records::publish_while_registered(shared.clone(), client.clone(), addr));
        let Some(lost) = self.serve(&client, events).await else { return Ended::Stop };
        if let Some(fatal) = replaced(&lost) {
            // Another process registered our NodeId; registering there again would push it
            // off in turn, forever. Stop instead, unless other trackers are left.
            if self.trackers.len() > 1 {
                return Ended::Replaced(fatal);
            }
            self.stop_replaced(fatal);
            return Ended::Stop;
        }
        let error = NodeError::TrackerLost(lost);
        tracing::warn!("{error}; re-registering");
        status.set(TrackerState::Connecting { last_error: Some(Arc::new(error)) });
        // A connection that worked for a while was lost: try again at once, and back off
        // only if that fails (a connection dropped right after registering backs off, so
        // nothing spins).
        Ended::Lost { worked: started.elapsed() > WORKED_FOR }
    }

    /// Serves one registered connection until it closes (why it closed), or until shutdown
    /// (`None`).
    async fn serve(
        &self,
        client: &Arc<TrackerClient>,
        mut events: mpsc::Receiver<TrackerEvent>,
    ) -> Option<quinn::ConnectionError> {
        let shared = &self.shared;
        // Relay links and our address may have changed: every session tells its peer where
        // we are now.
        shared.sessions.refresh_all();
        let relay_pump = relay_link::pump(shared.relay.clone(), HOME_SLOT, client.connection().clone());
        let cancel = shared.cancel.clone();
        shared.tasks.spawn(async move {
            tokio::select! {
                _ = relay_pump => {}
                _ = cancel.cancelled() => {}
            }
        });
        let reason = loop {
            tokio::select! {
                _ = shared.cancel.cancelled() => {
                    client.close().await;
                    return None;
                }
                event = events.recv() => match event {
                    Some(event) => self.on_event(client, event),
                    None => break client.closed().await,
                },
                reason = client.closed() => break reason,
            }
        };
        shared.table.lock().clear_links(HOME_SLOT);
        shared.prober.tick();
        Some(reason)
    }

    /// What the tracker told us unasked.
    fn on_event(&self, client: &Arc<TrackerClient>, event: TrackerEvent) {
        let shared = &self.shared;
        match event {
            TrackerEvent::Introduction(intro) => {
                let handle = shared.sessions.session(shared, intro.peer);
                if handle.inbox.try_send(Command::Introduced(intro, None)).is_err() {
                    tracing::debug!("dropping an introduction: the session is not keeping up");
                }
            }
            TrackerEvent::RelayReady { peer, link } => {
                tracing::debug!(peer = %peer.short(), link, "relay link open");
                shared.table.lock().set_link(&peer, link);
                shared.prober.tick();
            }
            TrackerEvent::Observed { observed, was } => {
                shared.events.emit(NodeEvent::Observed { observed, was });
                // Maybe we moved to another network: announce our local addresses again.
                if shared.table.lock().policy().direct {
                    let (client, local, cancel) = (client.clone(), shared.local_addr, shared.cancel.clone());
                    shared.tasks.spawn(async move {
                        tokio::select! {
                            result = client.announce_candidates(local_candidates(local)) => if let Err(e) = result {
                                tracing::debug!("cannot announce candidates: {e}");
                            },
                            _ = cancel.cancelled() => {}
                        }
                    });
                }
                shared.sessions.refresh_all();
            }
        }
    }

    /// How `tracker` is trusted: its pinned id, the CA, the id recorded on first use, or
    /// first use now.
    fn trust_for(&self, tracker: &TrackerAddr) -> Result<Trust, NodeError> {
        let known = if tracker.node_id.is_none() && self.roots.is_none() {
            self.known.lookup(&tracker.host_port())?
        } else {
            None
        };
        let pinned = qpeer_certs::config::PINNED_SERVER_NAME.to_string();
        let (trust, server_name) = match (&tracker.node_id, &self.roots, &known) {
            (Some(id), _, _) => (ServerTrust::Pinned(*id), pinned),
            (None, Some(roots), _) => (ServerTrust::Ca(roots.clone()), tracker.host.clone()),
            (None, None, Some(known)) => (ServerTrust::Pinned(known.node_id), pinned),
            (None, None, None) => (ServerTrust::FirstUse, pinned),
        };
        Ok(Trust { trust, server_name, known })
    }

    /// One registration attempt at tracker `index`: the client, what the tracker will tell us
    /// unasked, and the address it was reached at.
    async fn connect_once(
        &self,
        index: usize,
    ) -> Result<(TrackerClient, mpsc::Receiver<TrackerEvent>, SocketAddr), NodeError> {
        let shared = &self.shared;
        let tracker = &self.trackers[index];
        let host_port = tracker.host_port();
        let addr = tracker.resolve().await?;
        let Trust { trust, server_name, known } = self.trust_for(tracker)?;
        let direct = shared.table.lock().policy().direct;
        let candidates = if direct { local_candidates(shared.local_addr) } else { Vec::new() };
        let info = RegisterInfo {
            candidates,
            name: self.name.clone(),
            incarnation: shared.incarnation,
            visitor: false,
        };
        shared.table.lock().allow_pass(addr);
        *shared.tracker.trust.lock() =
            Some(TrackerTrust { trust: trust.clone(), server_name: server_name.clone() });
        if let Some(id) = tracker.node_id.or(known.as_ref().map(|k| k.node_id)) {
            // Our home now: a visitor registration there would be replaced by this one.
            shared.visits.close(&id);
        }
        let config = TrackerClient::config(&shared.identity, &trust)
            .map_err(|source| NodeError::Tracker { tracker: host_port.clone(), source })?;
        let mut config = config;
        if self.trackers.len() > 1 {
            // Other trackers to go to: notice a dead home within seconds.
            config.transport_config(Arc::new(qpeer_tracker::client::failover_transport()));
        }
        let result =
            TrackerClient::connect_with_config(&shared.endpoint, config, addr, &server_name, &trust, info)
                .await;
        let (client, events) = match result {
            Ok(ok) => ok,
            Err(ClientError::WrongTracker { expected, actual }) => {
                let (origin, fix) = match &known {
                    Some(k) => (
                        format!("recorded in {} line {}", self.known.path().display(), k.line),
                        format!(
                            " If the tracker's key really changed, remove line {} from {} and connect again.",
                            k.line,
                            self.known.path().display()
                        ),
                    ),
                    None => ("pinned by --tracker".to_string(), String::new()),
                };
                return Err(NodeError::TrackerIdMismatch(Box::new(TrackerMismatch {
                    addr: host_port,
                    expected,
                    actual,
                    origin,
                    fix,
                })));
            }
            Err(source) => return Err(NodeError::Tracker { tracker: host_port, source }),
        };
        if let (ServerTrust::FirstUse, Some(id)) = (&trust, client.tracker_id()) {
            self.known.remember(&host_port, id)?;
            shared.events.emit(NodeEvent::TrackerTrusted {
                tracker: id,
                host_port,
                saved_in: self.known.path().to_path_buf(),
            });
        }
        Ok((client, events, addr))
    }
}

/// The order to try trackers in, from the RTT each answered in (`None`: no answer): the
/// fastest first unless an earlier-listed one is within the tie margin of it, then the other
/// answering trackers as listed, then those that did not answer, as listed.
fn order_by_rtt(measured: &[Option<Duration>]) -> Vec<(usize, Option<Duration>)> {
    let mut best: Option<(usize, Duration)> = None;
    for (index, rtt) in measured.iter().enumerate() {
        let Some(rtt) = *rtt else { continue };
        match best {
            Some((_, best_rtt)) if rtt + TIE_MARGIN.max(best_rtt.mul_f64(TIE_SHARE)) >= best_rtt => {}
            _ => best = Some((index, rtt)),
        }
    }
    let mut order: Vec<(usize, Option<Duration>)> =
        best.map(|(index, rtt)| (index, Some(rtt))).into_iter().collect();
    let rest = |answered: bool| {
        measured
            .iter()
            .enumerate()
            .filter(move |(index, rtt)| rtt.is_some() == answered && best.map(|(b, _)| b) != Some(*index))
            .map(|(index, rtt)| (index, *rtt))
    };
    order.extend(rest(true));
    order.extend(rest(false));
    order
}

/// Measures the network after a registration (see [`crate::netcheck`]), tells the tracker
/// our mapping when it is known (peers learn it in introductions), and reports it.
async fn check_network(shared: Arc<Shared>, client: Arc<TrackerClient>) {
    let report = tokio::select! {
        _ = shared.cancel.cancelled() => return,
        report = netcheck::run(&shared) => report,
    };
    let report = match report {
        Ok(report) => report,
        Err(e) => return tracing::debug!("network check failed: {e}"),
    };
    *shared.tracker.mapping.lock() = report.mapping;
    if report.mapping != Mapping::Unknown {
        if let Err(e) = client.announce_mapping(report.mapping).await {
            tracing::debug!("cannot announce our mapping: {e}");
        }
    }
    shared.events.emit(NodeEvent::NatChecked(report));
}

/// The fatal error when the tracker closed us because our NodeId registered elsewhere.
fn replaced(reason: &quinn::ConnectionError) -> Option<Fatal> {
    match reason {
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == close_code::REPLACED.into() =>
        {
            Some(Fatal::Replaced {
                detail: qpeer_wire::printable(&String::from_utf8_lossy(&close.reason), 200),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::order_by_rtt;

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    #[test]
    fn the_fastest_tracker_comes_first_and_ties_go_to_the_first_listed() {
        // 40 ms beats 80 ms; the silent one comes last.
        assert_eq!(order_by_rtt(&[ms(80), None, ms(40)]), vec![(2, ms(40)), (0, ms(80)), (1, None)]);
        // Within the margin: a tie, and the first listed wins.
        assert_eq!(order_by_rtt(&[ms(12), ms(3)]), vec![(0, ms(12)), (1, ms(3))]);
        // Within a quarter of a long RTT too; beyond it, the faster wins.
        assert_eq!(order_by_rtt(&[ms(100), ms(80)]), vec![(0, ms(100)), (1, ms(80))]);
        assert_eq!(order_by_rtt(&[ms(100), ms(70)]), vec![(1, ms(70)), (0, ms(100))]);
        assert_eq!(order_by_rtt(&[None, ms(3), ms(1)]), vec![(1, ms(3)), (2, ms(1)), (0, None)]);
        // Nobody answered: as listed.
        assert_eq!(order_by_rtt(&[None, None]), vec![(0, None), (1, None)]);
    }
}
