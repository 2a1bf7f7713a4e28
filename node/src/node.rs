//! [`Node`]: one quinn endpoint on one UDP socket, used for the tracker and for every peer.
//!
//! The node's public handle. Peer sessions live in their actors ([`crate::session`]), their
//! paths in the path table ([`crate::paths`]) under the socket ([`crate::socket`]); this
//! module starts them, keeps the node registered with its tracker, and routes what the
//! tracker and the endpoint deliver to the right session.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qpeer_certs::{Identity, NodeId, ServerTrust};
use qpeer_tracker::client::RegisterInfo;
use qpeer_tracker::{ClientError, TrackerAddr, TrackerClient, TrackerEvent};
use qpeer_wire::tracker::PeerInfo;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::candidates::local_candidates;
use crate::error::{NodeError, TrackerMismatch};
use crate::known_trackers::KnownTrackers;
use crate::lock;
use crate::paths::{PathChange, PathPolicy, PathTable, PeerPath};
use qpeer_wire::close_code;
use qpeer_wire::io::describe_close;
use qpeer_wire::peer::{StreamKind, ALPN};

use crate::peer::{answer_pings, PeerConnection};
use crate::prober::Prober;
use crate::relay::{self, RelayHub};
use crate::session::{Command, PeerActor, SessionHandle};
use crate::socket::{PathSocket, PROBE_QUEUE};

/// Default time a connection to a peer may take (introduction and handshake).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Re-registration backoff: first delay and cap.
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Configures and starts a [`Node`].
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    home: Option<PathBuf>,
    identity: Option<Arc<Identity>>,
    bind: SocketAddr,
    tracker: Option<TrackerAddr>,
    tracker_ca: Option<PathBuf>,
    name: Option<String>,
    console: bool,
    connect_timeout: Duration,
    relay_only: bool,
    no_relay: bool,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        Self {
            home: None,
            identity: None,
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            tracker: None,
            tracker_ca: None,
            name: None,
            console: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            relay_only: false,
            no_relay: false,
        }
    }
}

impl NodeBuilder {
    /// Home directory (identity key, known_trackers). Default: `$QPEER_HOME`, else the
    /// platform data dir.
    pub fn home(mut self, home: impl Into<PathBuf>) -> Self {
        self.home = Some(home.into());
        self
    }

    /// Use this identity instead of the home's key file.
    pub fn identity(mut self, identity: Arc<Identity>) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The UDP address of the node's one socket. Default `0.0.0.0:0`.
    pub fn bind_addr(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    pub fn tracker(mut self, tracker: TrackerAddr) -> Self {
        self.tracker = Some(tracker);
        self
    }

    /// Verify a `HOST:PORT` tracker against this CA file instead of pinning its id.
    pub fn tracker_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.tracker_ca = Some(path.into());
        self
    }

    /// A name shown in the tracker's directory.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Print `[REGISTERED]` / `[PEER CONNECTED]` lines on stdout.
    pub fn console(mut self, on: bool) -> Self {
        self.console = on;
        self
    }

    /// How long a connection to a peer may take (introduction and handshake).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Never connect directly: register no LAN addresses, never probe, and reach every peer
    /// through the tracker's relay (for networks that block direct UDP between peers, and for
    /// testing the relay).
    pub fn relay_only(mut self, on: bool) -> Self {
        self.relay_only = on;
        self
    }

    /// Never use the tracker's relay: a peer is reached directly or not at all.
    pub fn no_relay(mut self, on: bool) -> Self {
        self.no_relay = on;
        self
    }

    /// Binds the socket, starts serving peers and starts registering with the tracker in the
    /// background (see [`Node::registered`]).
    pub async fn bind(self) -> Result<Node, NodeError> {
        Node::start(self).await
    }
}

/// The node's relation to the tracker.
#[derive(Clone)]
enum TrackerState {
    Connecting { last_error: Option<String> },
    Registered(Arc<TrackerClient>),
    Failed(Arc<NodeError>),
}

/// What the node's tasks share.
pub(crate) struct Shared {
    identity: Arc<Identity>,
    pub(crate) endpoint: quinn::Endpoint,
    /// How we accept a peer's handshake.
    pub(crate) server_config: Arc<quinn::ServerConfig>,
    /// Transport settings of our own handshakes to peers.
    client_transport: Arc<quinn::TransportConfig>,
    local_addr: SocketAddr,
    tracker: watch::Sender<TrackerState>,
    /// Running peer actors; each removes itself when its session ends.
    sessions: Mutex<HashMap<NodeId, SessionHandle>>,
    pub(crate) table: Arc<Mutex<PathTable>>,
    pub(crate) prober: Arc<Prober>,
    pub(crate) accepted: mpsc::Sender<PeerConnection>,
    accepted_rx: tokio::sync::Mutex<mpsc::Receiver<PeerConnection>>,
    relay: Arc<RelayHub>,
    /// A random number for this process, so peers tell a restart from the same node.
    incarnation: u64,
    /// Successful registrations with the tracker so far (re-registrations included).
    registrations: Arc<std::sync::atomic::AtomicU64>,
    /// The exclusive lock on the home, held while the node runs (released by the kernel if
    /// the process dies, so a crash never leaves a stale lock).
    home_lock: Mutex<Option<std::fs::File>>,
    home: PathBuf,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
    console: bool,
    pub(crate) connect_timeout: Duration,
}

impl Shared {
    pub(crate) fn say(&self, line: std::fmt::Arguments<'_>) {
        if self.console {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }

    pub(crate) fn id(&self) -> NodeId {
        self.identity.node_id()
    }

    /// The running actor of `peer`'s session, started if there is none.
    pub(crate) fn session(self: &Arc<Self>, peer: NodeId) -> SessionHandle {
        lock(&self.sessions).entry(peer).or_insert_with(|| PeerActor::spawn(self.clone(), peer)).clone()
    }

    /// Removes the actor owning `inbox` from the registry and its session from the path
    /// table (an idle session ending), both under the registry's lock, so that a successor
    /// started meanwhile opens a session of its own. False when another actor already took
    /// its place.
    pub(crate) fn retire(&self, peer: &NodeId, inbox: &mpsc::Sender<Command>) -> bool {
        let mut sessions = lock(&self.sessions);
        match sessions.get(peer) {
            Some(handle) if handle.inbox.same_channel(inbox) => {
                sessions.remove(peer);
                lock(&self.table).close(peer);
                true
            }
            _ => false,
        }
    }

    fn live_peer(&self, peer: &NodeId) -> Option<PeerConnection> {
        lock(&self.sessions).get(peer).and_then(SessionHandle::live_connection)
    }

    fn handles(&self) -> Vec<SessionHandle> {
        lock(&self.sessions).values().cloned().collect()
    }

    pub(crate) fn peer_client_config(&self, peer: NodeId) -> Result<quinn::ClientConfig, NodeError> {
        let mut config = qpeer_certs::client_config(&self.identity, &ServerTrust::Pinned(peer), &[ALPN])?;
        config.transport_config(self.client_transport.clone());
        Ok(config)
    }

    pub(crate) async fn tracker_client(&self) -> Result<Arc<TrackerClient>, NodeError> {
        let mut state = self.tracker.subscribe();
        loop {
            match &*state.borrow_and_update() {
                TrackerState::Registered(client) => return Ok(client.clone()),
                TrackerState::Failed(e) => return Err(clone_fatal(e)),
                TrackerState::Connecting { .. } => {}
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(NodeError::Shutdown),
                changed = state.changed() => if changed.is_err() { return Err(NodeError::Shutdown) },
            }
        }
    }

    /// Serves the peer's streams until the connection closes; the reason it closed.
    pub(crate) async fn serve_streams(self: Arc<Self>, conn: PeerConnection) -> quinn::ConnectionError {
        let connection = conn.connection().clone();
        loop {
            let (send, mut recv) = match connection.accept_bi().await {
                Ok(streams) => streams,
                Err(e) => return e,
            };
            let mut kind = [0u8; 1];
            if recv.read_exact(&mut kind).await.is_err() {
                continue;
            }
            match StreamKind::from_byte(kind[0]) {
                Some(StreamKind::Ping) => {
                    // A peer may hold a ping stream open: it must not hold up shutdown.
                    let cancel = self.cancel.clone();
                    self.tasks.spawn(async move {
                        tokio::select! {
                            _ = answer_pings(send, recv) => {}
                            _ = cancel.cancelled() => {}
                        }
                    });
                }
                Some(kind @ (StreamKind::Transfer | StreamKind::FileData)) => {
                    if !conn.offer_stream((kind, send, recv)) {
                        tracing::debug!(peer = %conn.node_id().short(), "no one accepts application streams");
                    }
                }
                _ => {
                    connection.close(close_code::PEER_PROTOCOL_VIOLATION.into(), b"unknown stream kind");
                }
            }
        }
    }

    /// Asks the tracker, in the background, for a relay link to `peer`: it opens once the peer
    /// asks too, and carries the session while no direct path works.
    pub(crate) fn ask_for_relay(self: &Arc<Self>, peer: NodeId) {
        if !lock(&self.table).policy().relay {
            return;
        }
        let shared = self.clone();
        self.tasks.spawn(async move {
            let request = async {
                let client = shared.tracker_client().await?;
                client
                    .request_relay(peer)
                    .await
                    .map_err(|source| NodeError::Tracker { tracker: "relay".into(), source })
            };
            tokio::select! {
                result = request => if let Err(e) = result {
                    tracing::debug!(peer = %peer.short(), "relay request failed: {e}");
                },
                _ = shared.cancel.cancelled() => {}
            }
        });
    }

    /// Prints a path change of a session that has a connection.
    fn on_path_change(&self, change: PathChange) {
        tracing::debug!(peer = %change.peer.short(), "path {} (was {})", change.path, change.was);
        if change.was == PeerPath::Waiting || self.live_peer(&change.peer).is_none() {
            return;
        }
        self.say(format_args!("[PATH] {} {} (was {})", change.peer, change.path, change.was));
    }

    /// Tells every session that our tracker connection or address changed.
    fn refresh_sessions(&self) {
        for handle in self.handles() {
            let _ = handle.inbox.try_send(Command::Refresh);
        }
    }
}

/// File in the home that a running node holds an exclusive lock on.
pub const LOCK_FILE: &str = "node.lock";

/// Takes the home's lock, or says which home is in use.
fn lock_home(home: &std::path::Path) -> Result<std::fs::File, NodeError> {
    qpeer_certs::home::ensure_home(home)?;
    let path = home.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| NodeError::HomeFile { path: path.clone(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(NodeError::HomeInUse { home: home.to_path_buf() }),
        Err(std::fs::TryLockError::Error(source)) => Err(NodeError::HomeFile { path, source }),
    }
}

/// Transport settings of peer connections: keep-alives hold NAT mappings open; a lower
/// initial RTT retransmits Initials dropped by a not-yet-opened NAT sooner.
pub fn peer_transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .initial_rtt(Duration::from_millis(100))
        .max_concurrent_uni_streams(4u32.into())
        .max_concurrent_bidi_streams(256u32.into());
    if let Ok(idle) = Duration::from_secs(30).try_into() {
        transport.max_idle_timeout(Some(idle));
    }
    transport
}

/// Size of the QUIC packets of a connection through the relay. The relay carries packets on
/// a stream, so their size is not bound by any link's MTU: large packets mean fewer to
/// encrypt, frame and forward per byte, which is what limits relayed throughput.
pub const RELAY_MTU: u16 = 16 * 1024;

/// Transport settings of a connection through the relay: those of [`peer_transport`], with
/// [`RELAY_MTU`]-sized packets from the start (no path MTU discovery: the relay has no MTU).
pub fn relay_transport() -> quinn::TransportConfig {
    let mut transport = peer_transport();
    transport.initial_mtu(RELAY_MTU).min_mtu(RELAY_MTU).mtu_discovery_config(None);
    // quinn's default first congestion window (12 000 bytes) would not fit one such packet.
    let mut congestion = quinn::congestion::CubicConfig::default();
    congestion.initial_window(10 * u64::from(RELAY_MTU));
    transport.congestion_controller_factory(Arc::new(congestion));
    transport
}

/// A running qpeer node.
pub struct Node {
    shared: Arc<Shared>,
}

/// A handle that accepts connections for a [`Node`] from another task.
#[derive(Clone)]
pub struct AcceptHandle {
    shared: Arc<Shared>,
}

impl AcceptHandle {
    /// Same as [`Node::accept`].
    pub async fn accept(&self) -> Option<PeerConnection> {
        self.shared.accept().await
    }
}

impl Shared {
    async fn accept(&self) -> Option<PeerConnection> {
        let mut accepted = self.accepted_rx.lock().await;
        tokio::select! {
            _ = self.cancel.cancelled() => None,
            conn = accepted.recv() => conn,
        }
    }
}

impl Node {
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    async fn start(config: NodeBuilder) -> Result<Self, NodeError> {
        let home = qpeer_certs::resolve_home(config.home.as_deref())?;
        let home_lock = lock_home(&home)?;
        let identity = match config.identity {
            Some(identity) => identity,
            None => Arc::new(Identity::load_or_create(&home)?),
        };
        let tracker = config.tracker.ok_or(NodeError::NoTracker)?;
        let roots = match &config.tracker_ca {
            Some(path) => Some(qpeer_certs::config::load_ca_roots(path)?),
            None => None,
        };
        if config.relay_only && config.no_relay {
            return Err(NodeError::Conflict("--relay-only and --no-relay leave no path to any peer"));
        }
        let policy = PathPolicy { direct: !config.relay_only, relay: !config.no_relay };
        let bind_err = |source| NodeError::Bind { addr: config.bind, source };
        let socket = std::net::UdpSocket::bind(config.bind).map_err(bind_err)?;
        let probe_socket = socket.try_clone().map_err(bind_err)?;
        // A relay-only node's connections never leave the relay, which has no MTU.
        let transport = Arc::new(if config.relay_only { relay_transport() } else { peer_transport() });
        let mut server_config = qpeer_certs::server_config(&identity, &[ALPN])?;
        server_config.transport_config(transport.clone());
        // quinn sees each peer at one virtual address for good: a connection that seems to
        // migrate would be packets of another session, never the peer moving.
        server_config.migration(false);
        let server_config = Arc::new(server_config);
        let relay_hub = RelayHub::new();
        let table = Arc::new(Mutex::new(PathTable::new(policy)));
        let (probe_tx, probe_rx) = mpsc::channel(PROBE_QUEUE);
        let runtime = Arc::new(quinn::TokioRuntime);
        let udp = quinn::Runtime::wrap_udp_socket(&*runtime, socket).map_err(bind_err)?;
        let path_socket =
            Arc::new(PathSocket::new(udp, relay_hub.clone(), table.clone(), probe_tx).map_err(bind_err)?);
        let mut endpoint_config = qpeer_tracker::server::endpoint_config(&identity);
        // Relayed connections may use packets larger than any link MTU; direct ones find
        // their path's MTU (at most 1452 bytes) by discovery.
        endpoint_config.max_udp_payload_size(RELAY_MTU).map_err(|e| NodeError::Bind {
            addr: config.bind,
            source: std::io::Error::other(e.to_string()),
        })?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some((*server_config).clone()),
            path_socket.clone(),
            runtime,
        )
        .map_err(bind_err)?;
        let local_addr = endpoint.local_addr().map_err(bind_err)?;
        let incarnation = u64::from_le_bytes(crate::random_bytes());
        let (changes_tx, mut changes) = mpsc::unbounded_channel();
        let prober = Arc::new(Prober {
            identity: identity.clone(),
            incarnation,
            table: table.clone(),
            socket: path_socket,
            udp: probe_socket,
            on_change: Box::new(move |change| {
                let _ = changes_tx.send(change);
            }),
        });
        let (accepted_tx, accepted_rx) = mpsc::channel(64);
        let (tracker_state, _) = watch::channel(TrackerState::Connecting { last_error: None });
        let shared = Arc::new(Shared {
            identity,
            endpoint,
            server_config,
            client_transport: transport,
            local_addr,
            tracker: tracker_state,
            sessions: Mutex::default(),
            table,
            prober: prober.clone(),
            accepted: accepted_tx,
            accepted_rx: tokio::sync::Mutex::new(accepted_rx),
            relay: relay_hub,
            incarnation,
            registrations: Arc::default(),
            home_lock: Mutex::new(Some(home_lock)),
            home: home.clone(),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            console: config.console,
            connect_timeout: config.connect_timeout,
        });
        let link = TrackerLink {
            shared: shared.clone(),
            tracker,
            roots,
            known: KnownTrackers::in_home(&home),
            name: config.name,
        };
        shared.tasks.spawn(link.run());
        shared.tasks.spawn(accept_loop(shared.clone()));
        shared.tasks.spawn(prober.run(probe_rx, shared.cancel.clone()));
        let printer = shared.clone();
        shared.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = printer.cancel.cancelled() => return,
                    change = changes.recv() => match change {
                        Some(change) => printer.on_path_change(change),
                        None => return,
                    },
                }
            }
        });
        Ok(Self { shared })
    }

    pub fn id(&self) -> NodeId {
        self.shared.id()
    }

    /// The address of the node's one UDP socket.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The address the tracker observes us at, once registered.
    pub fn observed_addr(&self) -> Option<SocketAddr> {
        match &*self.shared.tracker.borrow() {
            TrackerState::Registered(client) => Some(client.observed_addr()),
            _ => None,
        }
    }

    /// The local address of the current tracker connection (the single-socket check).
    pub fn tracker_local_addr(&self) -> Option<SocketAddr> {
        match &*self.shared.tracker.borrow() {
            TrackerState::Registered(..) => Some(self.local_addr()),
            _ => None,
        }
    }

    /// Waits until registered with the tracker (returns the observed address), a fatal tracker
    /// error, or `timeout`.
    pub async fn registered(&self, timeout: Duration) -> Result<SocketAddr, NodeError> {
        let mut state = self.shared.tracker.subscribe();
        let wait = async {
            loop {
                let last_error = match &*state.borrow_and_update() {
                    TrackerState::Registered(client) => return Ok(client.observed_addr()),
                    TrackerState::Failed(e) => return Err(clone_fatal(e)),
                    TrackerState::Connecting { last_error } => last_error.clone(),
                };
                if state.changed().await.is_err() {
                    return Err(NodeError::Shutdown);
                }
                let _ = last_error;
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => {
                let detail = match &*self.shared.tracker.borrow() {
                    TrackerState::Connecting { last_error: Some(e) } => Some(e.clone()),
                    _ => None,
                };
                Err(NodeError::RegistrationTimeout {
                    timeout,
                    last_error: detail.unwrap_or_else(|| "no answer yet".into()),
                })
            }
        }
    }

    /// Resolves when the node can no longer work: a fatal tracker error (wrong tracker
    /// identity, or this NodeId registered by another process), with that error.
    pub async fn failed(&self) -> NodeError {
        let mut state = self.shared.tracker.subscribe();
        loop {
            if let TrackerState::Failed(e) = &*state.borrow_and_update() {
                return clone_fatal(e);
            }
            if state.changed().await.is_err() {
                return NodeError::Shutdown;
            }
        }
    }

    /// How many times the node has registered with the tracker (1 + re-registrations).
    pub fn registrations(&self) -> u64 {
        self.shared.registrations.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Registered nodes, as the tracker lists them.
    pub async fn list_peers(&self) -> Result<Vec<PeerInfo>, NodeError> {
        let client = self.shared.tracker_client().await?;
        client.list_all().await.map_err(|source| NodeError::Tracker { tracker: "list".into(), source })
    }

    /// A verified connection to `peer`: the session's live one, or a new one. It starts on
    /// whichever path is ready first (a direct path confirmed by probes, or the tracker's
    /// relay) and moves to the best path as the network allows ([`PeerConnection::path`]).
    pub async fn connect(&self, peer: NodeId) -> Result<PeerConnection, NodeError> {
        let shared = &self.shared;
        if peer == shared.id() {
            return Err(NodeError::SelfConnect);
        }
        // The session decides whether its live connection, if any, is still good.
        // A session that is just ending may drop the request: ask its successor once.
        for _ in 0..2 {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let handle = shared.session(peer);
            if handle.inbox.send(Command::Connect(reply)).await.is_err() {
                shared.retire(&peer, &handle.inbox);
                continue;
            }
            tokio::select! {
                _ = shared.cancel.cancelled() => return Err(NodeError::Shutdown),
                answer = answer => match answer {
                    Ok(result) => return result,
                    Err(_) => continue,
                },
            }
        }
        Err(NodeError::Shutdown)
    }

    /// The next new connection with a peer (whoever opened it).
    pub async fn accept(&self) -> Option<PeerConnection> {
        self.shared.accept().await
    }

    /// A handle for accepting from another task.
    pub fn accept_handle(&self) -> AcceptHandle {
        AcceptHandle { shared: self.shared.clone() }
    }

    /// Current peer connections.
    pub fn peers(&self) -> Vec<PeerConnection> {
        self.shared.handles().iter().filter_map(SessionHandle::live_connection).collect()
    }

    /// Closes everything with a reason and waits (bounded) for the endpoint to go idle.
    pub async fn shutdown(&self) {
        let shared = &self.shared;
        // Peers first, while their paths (the relay among them) still carry the close.
        let peers = self.peers();
        for peer in &peers {
            peer.close(close_code::PEER_SHUTDOWN, "node shutting down");
        }
        if !peers.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shared.cancel.cancel();
        shared.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), shared.tasks.wait()).await;
        lock(&shared.sessions).clear();
        shared.endpoint.close(close_code::PEER_SHUTDOWN.into(), b"node shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(3), shared.endpoint.wait_idle()).await;
        lock(&shared.home_lock).take();
    }

    /// The home directory this node runs on (and holds the lock of).
    pub fn home(&self) -> &std::path::Path {
        &self.shared.home
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

fn clone_fatal(error: &Arc<NodeError>) -> NodeError {
    match &**error {
        NodeError::TrackerIdMismatch(mismatch) => NodeError::TrackerIdMismatch(mismatch.clone()),
        NodeError::Replaced { detail } => NodeError::Replaced { detail: detail.clone() },
        other => NodeError::Tracker {
            tracker: "registration".into(),
            source: ClientError::Protocol(other.to_string()),
        },
    }
}

/// Hands each handshake to the session of its virtual address; refuses any other.
async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            incoming = shared.endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { return };
        let peer = lock(&shared.table).peer_at(incoming.remote_address());
        let handle = peer.and_then(|peer| lock(&shared.sessions).get(&peer).cloned());
        let Some(handle) = handle else {
            tracing::debug!(remote = %incoming.remote_address(), "refusing a handshake from outside any session");
            incoming.refuse();
            continue;
        };
        // Only a peer with a session gets this far (the path layer hides strangers from
        // quinn); a session that is not keeping up refuses.
        if let Err(mpsc::error::TrySendError::Full(Command::Incoming(incoming))) =
            handle.inbox.try_send(Command::Incoming(Box::new(incoming)))
        {
            incoming.refuse();
        }
    }
}

/// Keeps the node registered: connects, re-registers with capped exponential backoff after
/// any loss, and stops only on a fatal error (wrong tracker identity) or shutdown.
struct TrackerLink {
    shared: Arc<Shared>,
    tracker: TrackerAddr,
    roots: Option<Arc<rustls::RootCertStore>>,
    known: KnownTrackers,
    name: Option<String>,
}

impl TrackerLink {
    async fn run(self) {
        let shared = self.shared.clone();
        let mut backoff = BACKOFF_START;
        let mut registrations = 0u64;
        let counter = shared.registrations.clone();
        loop {
            match self.connect_once().await {
                Ok((client, mut events)) => {
                    let session_started = std::time::Instant::now();
                    backoff = BACKOFF_START;
                    registrations += 1;
                    counter.store(registrations, std::sync::atomic::Ordering::Relaxed);
                    let client = Arc::new(client);
                    let observed = client.observed_addr();
                    shared.say(format_args!("[REGISTERED] observed {observed} as {}", shared.id()));
                    if registrations > 1 {
                        tracing::info!("re-registered with the tracker {}", self.tracker.host_port());
                    }
                    shared.tracker.send_replace(TrackerState::Registered(client.clone()));
                    // Relay links and our address may have changed: every session tells its
                    // peer where we are now.
                    shared.refresh_sessions();
                    let relay_pump = relay::pump(shared.relay.clone(), client.connection().clone());
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
                                return;
                            }
                            event = events.recv() => match event {
                                Some(event) => self.on_event(&client, event),
                                None => break client.closed().await,
                            },
                            reason = client.closed() => break reason,
                        }
                    };
                    lock(&shared.table).clear_links();
                    shared.prober.tick();
                    if let quinn::ConnectionError::ApplicationClosed(close) = &reason {
                        if close.error_code == close_code::REPLACED.into() {
                            // Another process registered our NodeId; registering again would
                            // push it off in turn, forever. Stop instead.
                            let fatal = NodeError::Replaced {
                                detail: qpeer_wire::printable(&String::from_utf8_lossy(&close.reason), 200),
                            };
                            tracing::error!("{fatal}");
                            shared.say(format_args!("[REPLACED] {fatal}"));
                            shared.tracker.send_replace(TrackerState::Failed(Arc::new(fatal)));
                            return;
                        }
                    }
                    let reason = describe_close(&reason);
                    tracing::warn!("tracker connection lost ({reason}); re-registering");
                    shared.tracker.send_replace(TrackerState::Connecting {
                        last_error: Some(format!("tracker connection lost ({reason})")),
                    });
                    // A connection that worked for a while was lost: try again at once, and
                    // back off only if that fails (a connection dropped right after
                    // registering backs off, so nothing spins).
                    if session_started.elapsed() > Duration::from_secs(2) {
                        continue;
                    }
                }
                Err(fatal @ NodeError::TrackerIdMismatch(_)) => {
                    tracing::error!("{fatal}");
                    shared.tracker.send_replace(TrackerState::Failed(Arc::new(fatal)));
                    return;
                }
                Err(e) => {
                    tracing::warn!("cannot register with the tracker: {e}; retrying in {backoff:?}");
                    shared.tracker.send_replace(TrackerState::Connecting { last_error: Some(e.to_string()) });
                }
            }
            tokio::select! {
                _ = shared.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_CAP);
        }
    }

    /// What the tracker told us unasked.
    fn on_event(&self, client: &Arc<TrackerClient>, event: TrackerEvent) {
        let shared = &self.shared;
        match event {
            TrackerEvent::Introduction(intro) => {
                let handle = shared.session(intro.peer);
                if handle.inbox.try_send(Command::Introduced(intro)).is_err() {
                    tracing::debug!("dropping an introduction: the session is not keeping up");
                }
            }
            TrackerEvent::RelayReady { peer, link } => {
                tracing::debug!(peer = %peer.short(), link, "relay link open");
                lock(&shared.table).set_link(&peer, link);
                shared.prober.tick();
            }
            TrackerEvent::Observed { observed, was } => {
                shared.say(format_args!("[OBSERVED] {observed} (was {was})"));
                // Maybe we moved to another network: announce our local addresses again.
                if lock(&shared.table).policy().direct {
                    let (client, local) = (client.clone(), shared.local_addr);
                    shared.tasks.spawn(async move {
                        if let Err(e) = client.announce_candidates(local_candidates(local)).await {
                            tracing::debug!("cannot announce candidates: {e}");
                        }
                    });
                }
                shared.refresh_sessions();
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
        let direct = lock(&shared.table).policy().direct;
        let candidates = if direct { local_candidates(shared.local_addr) } else { Vec::new() };
        let info = RegisterInfo { candidates, name: self.name.clone(), incarnation: shared.incarnation };
        lock(&shared.table).allow_pass(addr);
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
            shared.say(format_args!(
                "[TRACKER] trusting {id} at {host_port} on first use (saved in {})",
                self.known.path().display()
            ));
        }
        Ok((client, events))
    }
}
