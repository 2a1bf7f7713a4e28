//! The node's relation to its tracker: [`TrackerLink`] keeps the node registered (and
//! re-registers after any loss), routes what the tracker says unasked to the sessions, and
//! publishes the state in a [`TrackerStatus`] that callers wait on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use qpeer_certs::ServerTrust;
use qpeer_tracker::client::RegisterInfo;
use qpeer_tracker::{ClientError, TrackerAddr, TrackerClient, TrackerEvent};
use qpeer_wire::close_code;
use qpeer_wire::tracker::Mapping;
use tokio::sync::{mpsc, watch};

use crate::candidates::local_candidates;
use crate::error::{Fatal, NodeError, TrackerMismatch};
use crate::events::NodeEvent;
use crate::known_trackers::KnownTrackers;
use crate::netcheck::{self, TrackerTrust};
use crate::relay_link;
use crate::session::Command;
use crate::shared::Shared;

/// Re-registration backoff: first delay and cap.
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// A tracker connection that lasted this long was working: after losing it, try again at once.
const WORKED_FOR: Duration = Duration::from_secs(2);

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
}

impl TrackerStatus {
    pub(crate) fn new() -> Self {
        Self {
            state: watch::channel(TrackerState::Connecting { last_error: None }).0,
            registrations: AtomicU64::new(0),
            trust: Mutex::new(None),
            mapping: Mutex::new(Mapping::Unknown),
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

/// Keeps the node registered: connects, re-registers with capped exponential backoff after
/// any loss, and stops only on a fatal error (wrong tracker identity, or our NodeId
/// registered elsewhere) or shutdown.
pub(crate) struct TrackerLink {
    pub(crate) shared: Arc<Shared>,
    pub(crate) tracker: TrackerAddr,
    pub(crate) roots: Option<Arc<rustls::RootCertStore>>,
    pub(crate) known: KnownTrackers,
    pub(crate) name: Option<String>,
}

impl TrackerLink {
    pub(crate) async fn run(self) {
        let shared = self.shared.clone();
        let status = &shared.tracker;
        let mut backoff = BACKOFF_START;
        loop {
            match self.connect_once().await {
                Ok((client, events)) => {
                    let started = std::time::Instant::now();
                    backoff = BACKOFF_START;
                    let registrations = status.registrations.fetch_add(1, Ordering::Relaxed) + 1;
                    let client = Arc::new(client);
                    shared
                        .events
                        .emit(NodeEvent::Registered { id: shared.id(), observed: client.observed_addr() });
                    if registrations > 1 {
                        tracing::info!("re-registered with the tracker {}", self.tracker.host_port());
                    }
                    status.set(TrackerState::Registered(client.clone()));
                    shared.tasks.spawn(check_network(shared.clone(), client.clone()));
                    let Some(lost) = self.serve(&client, events).await else { return };
                    if let Some(fatal) = replaced(&lost) {
                        // Another process registered our NodeId; registering again would
                        // push it off in turn, forever. Stop instead.
                        let error = NodeError::from(fatal.clone());
                        tracing::error!("{error}");
                        if let Fatal::Replaced { detail } = &fatal {
                            shared.events.emit(NodeEvent::Replaced { detail: detail.clone() });
                        }
                        status.set(TrackerState::Failed(fatal));
                        return;
                    }
                    let error = NodeError::TrackerLost(lost);
                    tracing::warn!("{error}; re-registering");
                    status.set(TrackerState::Connecting { last_error: Some(Arc::new(error)) });
                    // A connection that worked for a while was lost: try again at once, and
                    // back off only if that fails (a connection dropped right after
                    // registering backs off, so nothing spins).
                    if started.elapsed() > WORKED_FOR {
                        continue;
                    }
                }
                Err(NodeError::TrackerIdMismatch(mismatch)) => {
                    tracing::error!("{mismatch}");
                    status.set(TrackerState::Failed(Fatal::TrackerIdMismatch(mismatch)));
                    return;
                }
                Err(e) => {
                    tracing::warn!("cannot register with the tracker: {e}; retrying in {backoff:?}");
                    status.set(TrackerState::Connecting { last_error: Some(Arc::new(e)) });
                }
            }
            tokio::select! {
                _ = shared.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_CAP);
        }
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
        let relay_pump = relay_link::pump(shared.relay.clone(), client.connection().clone());
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
        shared.table.lock().clear_links();
        shared.prober.tick();
        Some(reason)
    }

    /// What the tracker told us unasked.
    fn on_event(&self, client: &Arc<TrackerClient>, event: TrackerEvent) {
        let shared = &self.shared;
        match event {
            TrackerEvent::Introduction(intro) => {
                let handle = shared.sessions.session(shared, intro.peer);
                if handle.inbox.try_send(Command::Introduced(intro)).is_err() {
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

    /// One registration attempt: the client and what the tracker will tell us unasked.
    async fn connect_once(&self) -> Result<(TrackerClient, mpsc::Receiver<TrackerEvent>), NodeError> {
        let shared = &self.shared;
        let host_port = self.tracker.host_port();
        let addr = self.tracker.resolve().await?;
        let known = if self.tracker.node_id.is_none() && self.roots.is_none() {
            self.known.lookup(&host_port)?
        } else {
            None
        };
        let (trust, server_name) = match (&self.tracker.node_id, &self.roots, &known) {
            (Some(id), _, _) => (ServerTrust::Pinned(*id), qpeer_certs::config::PINNED_SERVER_NAME),
            (None, Some(roots), _) => (ServerTrust::Ca(roots.clone()), self.tracker.host.as_str()),
            (None, None, Some(known)) => {
                (ServerTrust::Pinned(known.node_id), qpeer_certs::config::PINNED_SERVER_NAME)
            }
            (None, None, None) => (ServerTrust::FirstUse, qpeer_certs::config::PINNED_SERVER_NAME),
        };
        let direct = shared.table.lock().policy().direct;
        let candidates = if direct { local_candidates(shared.local_addr) } else { Vec::new() };
        let info = RegisterInfo { candidates, name: self.name.clone(), incarnation: shared.incarnation };
        shared.table.lock().allow_pass(addr);
        *shared.tracker.trust.lock() =
            Some(TrackerTrust { trust: trust.clone(), server_name: server_name.to_string() });
        let result =
            TrackerClient::connect(&shared.endpoint, &shared.identity, addr, server_name, &trust, info).await;
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
        Ok((client, events))
    }
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
