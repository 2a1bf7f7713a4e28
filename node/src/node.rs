//! [`Node`]: one quinn endpoint on one UDP socket, used for the tracker and for every peer.
//!
//! Punching scheme (docs/ARCHITECTURE.md): the tracker introduces both nodes at the same
//! moment. One node is the *dialer*: the one behind NAT when the other has none (its observed
//! address is one of its own addresses), else the one with the lower NodeId. It starts QUIC
//! handshakes to every candidate address of the other at once. The other is the *acceptor*:
//! it sends 1-byte punch packets from the same socket toward every candidate of the dialer (opening
//! its own NAT's mapping and filter) and waits for the handshake. The first candidate connection
//! to complete wins; the dialer marks it with a `Select` stream and drops the others. Only the
//! dialer creates connections and only a selected connection counts, so exactly one survives
//! and both sides agree on it.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use qpeer_certs::{Identity, NodeId, ServerTrust};
use qpeer_tracker::client::{Introduction, RegisterInfo};
use qpeer_tracker::proto::{PeerAddrs, PeerInfo};
use qpeer_tracker::{ClientError, TrackerAddr, TrackerClient, TrackerEvent};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::candidates::{dial_targets, local_candidates};
use crate::error::{Attempt, NodeError, TrackerMismatch};
use crate::known_trackers::KnownTrackers;
use crate::peer::{answer_pings, close_code, describe_close, Path, PeerConnection, StreamKind, ALPN};
use crate::relay::{self, RelayHub, RelaySocket};

/// Default time allowed for punching a direct path.
pub const DEFAULT_PUNCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the direct candidates race alone before the relay joins: a direct path that
/// validates within this time is preferred.
pub const RELAY_AFTER: Duration = Duration::from_secs(1);
/// How long losing candidate handshakes are watched so they can be closed with a reason.
const LOSER_GRACE: Duration = Duration::from_secs(2);
/// Most incoming handshakes not yet selected by their dialer.
const MAX_PENDING_INCOMING: usize = 128;
/// Interval between punch packets.
const PUNCH_INTERVAL: Duration = Duration::from_millis(100);
/// Re-registration backoff: first delay and cap.
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(2);

pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

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
    punch_timeout: Duration,
    relay_only: bool,
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
            punch_timeout: DEFAULT_PUNCH_TIMEOUT,
            relay_only: false,
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

    pub fn punch_timeout(mut self, timeout: Duration) -> Self {
        self.punch_timeout = timeout;
        self
    }

    /// Never connect directly: register no LAN addresses, never punch, refuse direct
    /// handshakes, and reach every peer through the tracker's relay (for networks that block
    /// direct UDP between peers, and for testing the relay).
    pub fn relay_only(mut self, on: bool) -> Self {
        self.relay_only = on;
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
    Connecting {
        last_error: Option<String>,
    },
    /// The client and the addresses we registered (our half of every role decision).
    Registered(Arc<TrackerClient>, PeerAddrs),
    Failed(Arc<NodeError>),
}

struct Shared {
    identity: Arc<Identity>,
    endpoint: quinn::Endpoint,
    /// A second handle on the endpoint's socket (same port), for punch packets only.
    punch_socket: std::net::UdpSocket,
    /// How we accept a connection that arrives through the relay (see [`relay_transport`]).
    relay_server_config: Arc<quinn::ServerConfig>,
    local_addr: SocketAddr,
    tracker: watch::Sender<TrackerState>,
    peers: Mutex<HashMap<NodeId, PeerConnection>>,
    /// Serializes connection attempts per peer.
    dial_locks: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
    /// Tasks waiting for a peer to dial us: `connect` calls (which take the connection for
    /// their caller) and introduction handlers (which only stop punching).
    waiters: Mutex<HashMap<NodeId, Vec<Waiter>>>,
    accepted: mpsc::Sender<PeerConnection>,
    accepted_rx: tokio::sync::Mutex<mpsc::Receiver<PeerConnection>>,
    pending_incoming: Arc<tokio::sync::Semaphore>,
    relay: Arc<RelayHub>,
    /// Successful registrations with the tracker so far (re-registrations included).
    registrations: Arc<std::sync::atomic::AtomicU64>,
    /// The exclusive lock on the home, held while the node runs (released by the kernel if
    /// the process dies, so a crash never leaves a stale lock).
    home_lock: Mutex<Option<std::fs::File>>,
    home: PathBuf,
    cancel: CancellationToken,
    tasks: TaskTracker,
    console: bool,
    punch_timeout: Duration,
    relay_only: bool,
}

/// A handshake in a dial race.
type Handshake = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (SocketAddr, Result<quinn::Connection, quinn::ConnectionError>)>
            + Send,
    >,
>;

struct Waiter {
    tx: oneshot::Sender<PeerConnection>,
    /// True for a `connect` call: the connection then goes to it instead of `accept`.
    takes_connection: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn say(&self, line: std::fmt::Arguments<'_>) {
        if self.console {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }

    fn id(&self) -> NodeId {
        self.identity.node_id()
    }

    fn live_peer(&self, peer: &NodeId) -> Option<PeerConnection> {
        lock(&self.peers).get(peer).filter(|p| p.is_open()).cloned()
    }

    fn dial_lock(&self, peer: NodeId) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.dial_locks).entry(peer).or_default().clone()
    }

    fn peer_client_config(
        &self,
        peer: NodeId,
        transport: quinn::TransportConfig,
    ) -> Result<quinn::ClientConfig, NodeError> {
        let mut config = qpeer_certs::client_config(&self.identity, &ServerTrust::Pinned(peer), &[ALPN])?;
        config.transport_config(Arc::new(transport));
        Ok(config)
    }

    async fn tracker_client(&self) -> Result<Arc<TrackerClient>, NodeError> {
        let mut state = self.tracker.subscribe();
        loop {
            match &*state.borrow_and_update() {
                TrackerState::Registered(client, _) => return Ok(client.clone()),
                TrackerState::Failed(e) => return Err(clone_fatal(e)),
                TrackerState::Connecting { .. } => {}
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(NodeError::Shutdown),
                changed = state.changed() => if changed.is_err() { return Err(NodeError::Shutdown) },
            }
        }
    }

    /// Makes `conn` the connection to its peer: replaces an older one, wakes waiting
    /// `connect` calls, or hands it to `accept` when `for_accept`.
    fn install(self: &Arc<Self>, conn: PeerConnection, for_accept: bool) {
        let peer = conn.node_id();
        let old = lock(&self.peers).insert(peer, conn.clone());
        if let Some(old) = old {
            if old.connection().stable_id() != conn.connection().stable_id() {
                old.close(close_code::REPLACED, "replaced by a newer connection");
            }
        }
        self.say(format_args!(
            "[PEER CONNECTED] {peer} {} rtt {:.1} ms",
            conn.path(),
            conn.rtt().as_secs_f64() * 1000.0
        ));
        let waiters = lock(&self.waiters).remove(&peer).unwrap_or_default();
        let mut delivered = false;
        for waiter in waiters {
            let sent = waiter.tx.send(conn.clone()).is_ok();
            delivered |= sent && waiter.takes_connection;
        }
        if for_accept && !delivered {
            let _ = self.accepted.try_send(conn.clone());
        }
        let shared = self.clone();
        self.tasks.spawn(async move { shared.drive(conn).await });
    }

    /// Serves the peer's streams until the connection closes.
    async fn drive(self: Arc<Self>, conn: PeerConnection) {
        let connection = conn.connection().clone();
        let streams = async {
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
                        self.tasks.spawn(answer_pings(send, recv));
                    }
                    Some(kind @ (StreamKind::Transfer | StreamKind::FileData)) => {
                        if !conn.offer_stream((kind, send, recv)) {
                            tracing::debug!(peer = %conn.node_id().short(), "no one accepts application streams");
                        }
                    }
                    _ => {
                        connection.close(close_code::PROTOCOL_VIOLATION.into(), b"unknown stream kind");
                    }
                }
            }
        };
        let reason = tokio::select! {
            _ = self.cancel.cancelled() => None,
            reason = streams => Some(reason),
        };
        let removed = {
            let mut peers = lock(&self.peers);
            let current = peers
                .get(&conn.node_id())
                .is_some_and(|p| p.connection().stable_id() == connection.stable_id());
            if current {
                peers.remove(&conn.node_id());
            }
            current
        };
        if let (Some(reason), true) = (reason, removed) {
            self.say(format_args!("[PEER DISCONNECTED] {} ({})", conn.node_id(), describe_close(&reason)));
        }
    }

    /// One handshake toward `addr`, as a future that names its address.
    fn start_dial(
        &self,
        config: &quinn::ClientConfig,
        addr: SocketAddr,
    ) -> Result<Handshake, quinn::ConnectError> {
        let connecting =
            self.endpoint.connect_with(config.clone(), addr, qpeer_certs::config::PINNED_SERVER_NAME)?;
        Ok(Box::pin(async move { (addr, connecting.await) }))
    }

    /// Dialer role: handshakes to every candidate at once; if none has completed after
    /// [`RELAY_AFTER`], one through the relay joins the race. The first to complete wins.
    async fn dial(self: &Arc<Self>, peer: NodeId, addrs: &PeerAddrs) -> Result<PeerConnection, NodeError> {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let targets = if self.relay_only { Vec::new() } else { dial_targets(addrs) };
        let config = self.peer_client_config(peer, peer_transport())?;
        let relay_config = self.peer_client_config(peer, relay_transport())?;
        let mut attempts: Vec<Attempt> = Vec::new();
        let mut racing = FuturesUnordered::new();
        for addr in targets.iter().copied() {
            match self.start_dial(&config, addr) {
                Ok(handshake) => racing.push(handshake),
                Err(e) => attempts.push(Attempt { addr, outcome: format!("cannot start: {e}") }),
            }
        }
        let deadline = tokio::time::sleep(self.punch_timeout);
        tokio::pin!(deadline);
        let relay_after = if self.relay_only { Duration::ZERO } else { RELAY_AFTER };
        let relay = async {
            tokio::time::sleep(relay_after).await;
            self.relay.wait_link(&peer).await
        };
        tokio::pin!(relay);
        let mut relay_pending = true;
        let winner = loop {
            if racing.is_empty() && !relay_pending {
                break None;
            }
            tokio::select! {
                _ = &mut deadline => break None,
                _ = self.cancel.cancelled() => return Err(NodeError::Shutdown),
                link = &mut relay, if relay_pending => {
                    relay_pending = false;
                    let addr = relay::placeholder(link);
                    tracing::debug!(peer = %peer.short(), link, "no direct path yet; dialing through the relay");
                    match self.start_dial(&relay_config, addr) {
                        Ok(handshake) => racing.push(handshake),
                        Err(e) => attempts.push(Attempt { addr, outcome: format!("relay: cannot start: {e}") }),
                    }
                }
                next = racing.next(), if !racing.is_empty() => match next {
                    None => {}
                    Some((addr, Ok(connection))) => break Some((addr, connection)),
                    Some((addr, Err(e))) => attempts.push(Attempt { addr, outcome: e.to_string() }),
                },
            }
        };
        // Losers that still complete are closed with a code that says why; the rest time out.
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            let close_losers = async {
                while let Some((_, result)) = racing.next().await {
                    if let Ok(loser) = result {
                        loser.close(close_code::NOT_SELECTED.into(), b"another candidate path won");
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::timeout(LOSER_GRACE, close_losers) => {}
                _ = cancel.cancelled() => {}
            }
        });
        let Some((addr, connection)) = winner else {
            if relay_pending {
                attempts.push(Attempt {
                    addr: relay::placeholder(0),
                    outcome: "relay via tracker: no relay link opened (the peer did not ask for one)".into(),
                });
            }
            for addr in targets {
                if !attempts.iter().any(|a| a.addr == addr) {
                    attempts.push(Attempt {
                        addr,
                        outcome: format!("no answer within {:?}", self.punch_timeout),
                    });
                }
            }
            return Err(NodeError::NoDirectPath { peer, timeout: self.punch_timeout, attempts });
        };
        tracing::debug!(peer = %peer.short(), %addr, "dial won");
        let select = async {
            let mut send = connection.open_uni().await?;
            send.write_all(&[StreamKind::Select as u8]).await?;
            send.finish()?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        };
        select
            .await
            .map_err(|e| NodeError::Peer { peer, message: format!("cannot select the connection: {e}") })?;
        Ok(PeerConnection::new(peer, connection))
    }

    /// Acceptor role: punch packets toward the dialer's candidates until cancelled or timeout.
    async fn punch(self: Arc<Self>, peer: NodeId, addrs: PeerAddrs, stop: CancellationToken) {
        if self.relay_only {
            return;
        }
        let targets = dial_targets(&addrs);
        tracing::debug!(peer = %peer.short(), ?targets, "punching");
        let deadline = tokio::time::Instant::now() + self.punch_timeout;
        let mut tick = tokio::time::interval(PUNCH_INTERVAL);
        while tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            for target in &targets {
                // A 1-byte datagram opens our NAT's mapping and filter toward the target;
                // QUIC endpoints drop it as malformed. A full send buffer just skips a round.
                let _ = self.punch_socket.send_to(&[0u8], target);
            }
        }
    }

    /// Whether we dial `peer` (else we punch and wait for it). Both sides compute the same
    /// answer from the same facts: a node whose observed address is one of its own interface
    /// addresses has no NAT and anyone can reach it, so the other side dials; otherwise the
    /// lower NodeId dials.
    fn we_dial(&self, peer: NodeId, peer_addrs: &PeerAddrs) -> bool {
        // Use exactly what the tracker passed to the peer, so both sides decide on the same facts.
        let ours = match &*self.tracker.borrow() {
            TrackerState::Registered(_, ours) => ours.clone(),
            _ => return self.id() < peer,
        };
        dialer_is_first((self.id(), &ours), (peer, peer_addrs))
    }

    /// Handles an introduction the tracker sent because the peer asked for us.
    async fn on_introduction(self: Arc<Self>, intro: Introduction) {
        let peer = intro.peer;
        self.ask_for_relay(peer);
        if !self.we_dial(peer, &intro.addrs) {
            // We are the acceptor: punch toward the dialer until it reaches us.
            let stop = CancellationToken::new();
            let waiter = self.wait_for(peer, false);
            let puncher = self.tasks.spawn(self.clone().punch(peer, intro.addrs, stop.clone()));
            tokio::select! {
                _ = tokio::time::timeout(self.punch_timeout, waiter) => {}
                _ = self.cancel.cancelled() => {}
            }
            stop.cancel();
            let _ = puncher.await;
            return;
        }
        // We are the dialer. A connection selected within the punch window, to the socket the
        // peer registered from, already answers this introduction (both sides asked at once).
        // A connection to another socket belongs to an earlier process of that peer: dial.
        let lock = self.dial_lock(peer);
        let _guard = lock.lock().await;
        if let Some(existing) = self.live_peer(&peer) {
            let same_socket = match existing.path() {
                Path::Direct(addr) => dial_targets(&intro.addrs).contains(&addr),
                Path::Relayed => true,
            };
            if same_socket && existing.established().elapsed() < self.punch_timeout {
                return;
            }
        }
        match self.dial(peer, &intro.addrs).await {
            Ok(conn) => self.install(conn, true),
            Err(e) => tracing::warn!("could not reach {} after its introduction: {e}", peer.short()),
        }
    }

    /// Asks the tracker, in the background, for a relay link to `peer`: it opens once the peer
    /// asks too, so a relayed path is ready if punching fails.
    fn ask_for_relay(self: &Arc<Self>, peer: NodeId) {
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

    fn wait_for(&self, peer: NodeId, takes_connection: bool) -> oneshot::Receiver<PeerConnection> {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).entry(peer).or_default().push(Waiter { tx, takes_connection });
        rx
    }

    /// Handshake of an incoming connection; installs it once the dialer selects it.
    async fn accept_incoming(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = canonical(incoming.remote_address());
        let connecting = if relay::link_of(incoming.remote_address()).is_some() {
            incoming.accept_with(self.relay_server_config.clone())
        } else {
            incoming.accept()
        };
        let connecting = async { connecting?.await };
        let connection = match tokio::time::timeout(Duration::from_secs(10), connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => {
                tracing::debug!(%remote, "incoming handshake failed: {e}");
                return;
            }
            Err(_) => return,
        };
        let peer = match qpeer_certs::peer_node_id(&connection) {
            Ok(peer) => peer,
            Err(e) => {
                connection.close(close_code::PROTOCOL_VIOLATION.into(), e.to_string().as_bytes());
                return;
            }
        };
        let selected = async {
            let mut recv = connection.accept_uni().await.ok()?;
            let mut kind = [0u8; 1];
            recv.read_exact(&mut kind).await.ok()?;
            (StreamKind::from_byte(kind[0]) == Some(StreamKind::Select)).then_some(())
        };
        match tokio::time::timeout(self.punch_timeout + Duration::from_secs(5), selected).await {
            Ok(Some(())) => {
                self.install(PeerConnection::new(peer, connection), true);
            }
            Ok(None) => tracing::debug!(peer = %peer.short(), %remote, "candidate connection not selected"),
            Err(_) => connection.close(close_code::SELECT_TIMEOUT.into(), b"not selected in time"),
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

/// True when a node without NAT (observed address among its own candidates).
fn reachable(addrs: &PeerAddrs) -> bool {
    addrs.candidates.contains(&addrs.observed)
}

/// The dialer rule, seen from the first node: a node behind NAT dials a node without NAT;
/// otherwise the lower NodeId dials.
pub(crate) fn dialer_is_first(first: (NodeId, &PeerAddrs), second: (NodeId, &PeerAddrs)) -> bool {
    match (reachable(first.1), reachable(second.1)) {
        (false, true) => true,
        (true, false) => false,
        _ => first.0 < second.0,
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
        let socket = std::net::UdpSocket::bind(config.bind)
            .map_err(|source| NodeError::Bind { addr: config.bind, source })?;
        let punch_socket =
            socket.try_clone().map_err(|source| NodeError::Bind { addr: config.bind, source })?;
        let mut server_config = qpeer_certs::server_config(&identity, &[ALPN])?;
        let mut relay_server_config = server_config.clone();
        server_config.transport_config(Arc::new(peer_transport()));
        relay_server_config.transport_config(Arc::new(relay_transport()));
        let relay_hub = RelayHub::new();
        let bind_err = |source| NodeError::Bind { addr: config.bind, source };
        let runtime = Arc::new(quinn::TokioRuntime);
        let udp = quinn::Runtime::wrap_udp_socket(&*runtime, socket).map_err(bind_err)?;
        let relay_socket = Arc::new(RelaySocket::new(udp, relay_hub.clone()).map_err(bind_err)?);
        let mut endpoint_config = qpeer_tracker::server::endpoint_config(&identity);
        // Relayed connections use packets larger than any link MTU; direct ones still find
        // their path's MTU (at most 1452 bytes) by discovery.
        endpoint_config.max_udp_payload_size(RELAY_MTU).map_err(|e| NodeError::Bind {
            addr: config.bind,
            source: std::io::Error::other(e.to_string()),
        })?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server_config),
            relay_socket,
            runtime,
        )
        .map_err(bind_err)?;
        let local_addr =
            endpoint.local_addr().map_err(|source| NodeError::Bind { addr: config.bind, source })?;
        let (accepted_tx, accepted_rx) = mpsc::channel(64);
        let (tracker_state, _) = watch::channel(TrackerState::Connecting { last_error: None });
        let shared = Arc::new(Shared {
            identity,
            endpoint,
            punch_socket,
            relay_server_config: Arc::new(relay_server_config),
            local_addr,
            tracker: tracker_state,
            peers: Mutex::default(),
            dial_locks: Mutex::default(),
            waiters: Mutex::default(),
            accepted: accepted_tx,
            accepted_rx: tokio::sync::Mutex::new(accepted_rx),
            pending_incoming: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_INCOMING)),
            relay: relay_hub,
            registrations: Arc::default(),
            home_lock: Mutex::new(Some(home_lock)),
            home: home.clone(),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            console: config.console,
            punch_timeout: config.punch_timeout,
            relay_only: config.relay_only,
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
            TrackerState::Registered(client, _) => Some(client.observed_addr()),
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
                    TrackerState::Registered(client, _) => return Ok(client.observed_addr()),
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

    /// A direct, verified connection to `peer`: the existing one, or a new one punched through
    /// both NATs after a tracker introduction.
    pub async fn connect(&self, peer: NodeId) -> Result<PeerConnection, NodeError> {
        let shared = &self.shared;
        if peer == shared.id() {
            return Err(NodeError::SelfConnect);
        }
        if let Some(existing) = shared.live_peer(&peer) {
            return Ok(existing);
        }
        let lock = shared.dial_lock(peer);
        let _guard = lock.lock().await;
        if let Some(existing) = shared.live_peer(&peer) {
            return Ok(existing);
        }
        let client = shared.tracker_client().await?;
        // Our role depends on the peer's addresses, which the introduction brings; wait for a
        // dialer from before the request so an early handshake is not missed.
        let waiter = shared.wait_for(peer, true);
        let intro = client.introduce(peer).await.map_err(|source| match source {
            ClientError::NotFound(id) => NodeError::PeerNotFound(id),
            source => NodeError::Tracker { tracker: "introduce".into(), source },
        })?;
        shared.ask_for_relay(peer);
        if shared.we_dial(peer, &intro.addrs) {
            drop(waiter);
            let conn = shared.dial(peer, &intro.addrs).await?;
            shared.install(conn.clone(), false);
            return Ok(conn);
        }
        // We are the acceptor: punch toward the dialer and wait for its handshake.
        let stop = CancellationToken::new();
        let targets = dial_targets(&intro.addrs);
        let puncher = shared.tasks.spawn(shared.clone().punch(peer, intro.addrs, stop.clone()));
        let result = tokio::time::timeout(shared.punch_timeout, waiter).await;
        stop.cancel();
        let _ = puncher.await;
        match result {
            Ok(Ok(conn)) => Ok(conn),
            _ => Err(NodeError::NoDirectPath {
                peer,
                timeout: shared.punch_timeout,
                attempts: targets
                    .into_iter()
                    .map(|addr| Attempt {
                        addr,
                        outcome: "punched; the peer's handshake never arrived".into(),
                    })
                    .collect(),
            }),
        }
    }

    /// The next connection a peer established with us (not ones we asked for).
    pub async fn accept(&self) -> Option<PeerConnection> {
        self.shared.accept().await
    }

    /// A handle for accepting from another task.
    pub fn accept_handle(&self) -> AcceptHandle {
        AcceptHandle { shared: self.shared.clone() }
    }

    /// Current peer connections.
    pub fn peers(&self) -> Vec<PeerConnection> {
        lock(&self.shared.peers).values().filter(|p| p.is_open()).cloned().collect()
    }

    /// Closes everything with a reason and waits (bounded) for the endpoint to go idle.
    pub async fn shutdown(&self) {
        let shared = &self.shared;
        shared.cancel.cancel();
        shared.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), shared.tasks.wait()).await;
        for peer in lock(&shared.peers).drain().map(|(_, p)| p) {
            peer.close(close_code::SHUTDOWN, "node shutting down");
        }
        shared.endpoint.close(close_code::SHUTDOWN.into(), b"node shutting down");
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

async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            incoming = shared.endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { return };
        if shared.relay_only && relay::link_of(incoming.remote_address()).is_none() {
            incoming.refuse();
            continue;
        }
        // Unselected handshakes cost memory until their select timeout: cap them.
        let Ok(permit) = shared.pending_incoming.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "refusing a handshake: too many pending");
            incoming.refuse();
            continue;
        };
        let handler = shared.clone().accept_incoming(incoming);
        shared.tasks.spawn(async move {
            handler.await;
            drop(permit);
        });
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
                Ok((client, mut events, candidates)) => {
                    let session_started = std::time::Instant::now();
                    backoff = BACKOFF_START;
                    registrations += 1;
                    counter.store(registrations, std::sync::atomic::Ordering::Relaxed);
                    let client = Arc::new(client);
                    let observed = client.observed_addr();
                    // What the tracker hands to peers: the observed address and the candidates
                    // it keeps (it drops implausible ones the same way).
                    let registered_addrs = PeerAddrs {
                        observed,
                        candidates: candidates
                            .into_iter()
                            .filter(|c| qpeer_tracker::server::plausible_candidate(*c, observed))
                            .collect(),
                    };
                    shared.say(format_args!("[REGISTERED] observed {observed} as {}", shared.id()));
                    if registrations > 1 {
                        tracing::info!("re-registered with the tracker {}", self.tracker.host_port());
                    }
                    shared.tracker.send_replace(TrackerState::Registered(client.clone(), registered_addrs));
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
                                Some(TrackerEvent::Introduction(intro)) => {
                                    shared.tasks.spawn(shared.clone().on_introduction(intro));
                                }
                                Some(TrackerEvent::RelayReady { peer, link }) => {
                                    tracing::debug!(peer = %peer.short(), link, "relay link open");
                                    shared.relay.add_link(peer, link);
                                }
                                None => break client.closed().await,
                            },
                            reason = client.closed() => break reason,
                        }
                    };
                    shared.relay.clear_links();
                    if let quinn::ConnectionError::ApplicationClosed(close) = &reason {
                        if close.error_code == qpeer_tracker::proto::close_code::REPLACED.into() {
                            // Another process registered our NodeId; registering again would
                            // push it off in turn, forever. Stop instead.
                            let fatal = NodeError::Replaced {
                                detail: qpeer_tracker::proto::printable(
                                    &String::from_utf8_lossy(&close.reason),
                                    200,
                                ),
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

    /// One registration attempt: the client, its introductions, and the candidates we sent.
    async fn connect_once(
        &self,
    ) -> Result<(TrackerClient, mpsc::Receiver<TrackerEvent>, Vec<SocketAddr>), NodeError> {
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
        let candidates = if shared.relay_only { Vec::new() } else { local_candidates(shared.local_addr) };
        let info = RegisterInfo { candidates: candidates.clone(), name: self.name.clone() };
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
        Ok((client, events, candidates))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(observed: &str, candidates: &[&str]) -> PeerAddrs {
        PeerAddrs {
            observed: observed.parse().expect("addr"),
            candidates: candidates.iter().map(|c| c.parse().expect("addr")).collect(),
        }
    }

    #[test]
    fn both_sides_agree_on_the_dialer() {
        let low = NodeId::from_bytes([1; 32]);
        let high = NodeId::from_bytes([2; 32]);
        let public = addrs("198.51.100.10:4000", &["198.51.100.10:4000"]);
        let natted = addrs("198.51.100.20:5000", &["10.1.1.2:5000"]);
        let natted2 = addrs("198.51.100.21:6000", &["10.2.1.2:6000"]);
        for (a, b) in [(&public, &natted), (&natted, &public), (&natted, &natted2), (&public, &public)] {
            for (x, y) in [(low, high), (high, low)] {
                let first = dialer_is_first((x, a), (y, b));
                let second = dialer_is_first((y, b), (x, a));
                assert_ne!(first, second, "exactly one side dials");
            }
        }
        // The natted node dials the public one, whatever the ids.
        assert!(dialer_is_first((high, &natted), (low, &public)));
        assert!(dialer_is_first((low, &natted), (high, &public)));
        // Otherwise the lower id dials.
        assert!(dialer_is_first((low, &natted), (high, &natted2)));
        assert!(!dialer_is_first((high, &public), (low, &public)));
    }
}
