//! [`Node`] and [`NodeBuilder`]: the public handle of one quinn endpoint on one UDP socket,
//! used for the tracker and for every peer.
//!
//! Starting a node builds the socket with its path layer (`socket`), the endpoint,
//! and the tasks that run it: the tracker link (`tracker_link`), the handshake
//! acceptor (`streams`), the prober (`prober`) and the path-change
//! reporter. Peer sessions start on demand (`session`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use qpeer_certs::{Identity, NodeId};
use qpeer_tracker::TrackerAddr;
use qpeer_wire::close_code;
use qpeer_wire::tracker::PeerInfo;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{NodeError, TrackerRequest};
use crate::events::Events;
use crate::home::HomeLock;
use crate::known_trackers::KnownTrackers;
use crate::paths::{PathPolicy, PathTable};
use crate::peer::PeerConnection;
use crate::prober::Prober;
use crate::relay_link::RelayHub;
use crate::session::{Command, SessionHandle};
use crate::shared::{Shared, ACCEPT_QUEUE};
use crate::socket::{PathSocket, PROBE_QUEUE};
use crate::tracker_link::{TrackerLink, TrackerStatus};
use crate::transport::{endpoint_config, Congestion, PeerTransport};

/// Default time a connection to a peer may take (introduction and handshake).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Configures and starts a [`Node`].
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    home: Option<PathBuf>,
    identity: Option<Arc<Identity>>,
    /// `None`: dual-stack `[::]:0`, or `0.0.0.0:0` without IPv6 (see `bind_socket`).
    bind: Option<SocketAddr>,
    trackers: Vec<TrackerAddr>,
    tracker_ca: Option<PathBuf>,
    name: Option<String>,
    events: Option<Events>,
    connect_timeout: Duration,
    relay_only: bool,
    no_relay: bool,
    congestion: Congestion,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        Self {
            home: None,
            identity: None,
            bind: None,
            trackers: Vec::new(),
            tracker_ca: None,
            name: None,
            events: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            relay_only: false,
            no_relay: false,
            congestion: Congestion::default(),
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

    /// The UDP address of the node's one socket. Default: `[::]:0` dual-stack (IPv6 and
    /// IPv4 on one socket), or `0.0.0.0:0` on a system without IPv6. An address of one family
    /// (`0.0.0.0:0`, `[::]:0` where the system makes it IPv6-only) reaches only peers and
    /// trackers of that family.
    pub fn bind_addr(mut self, addr: SocketAddr) -> Self {
        self.bind = Some(addr);
        self
    }

    /// Adds a tracker. With several, the node chooses its home among them (the lowest RTT;
    /// ties go to the one added first), registers only there, and moves to the next when its
    /// home dies. Peers on the others are found through their home records.
    pub fn tracker(mut self, tracker: TrackerAddr) -> Self {
        self.trackers.push(tracker);
        self
    }

    /// Sets the trackers (see [`NodeBuilder::tracker`]), in order of preference on ties.
    pub fn trackers(mut self, trackers: impl IntoIterator<Item = TrackerAddr>) -> Self {
        self.trackers = trackers.into_iter().collect();
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

    /// Send the node's events here (subscribe first, and no event is missed). Default: a
    /// channel of the node's own ([`Node::events`]).
    pub fn events(mut self, events: Events) -> Self {
        self.events = Some(events);
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

    /// The congestion controller of peer connections. Default: [`Congestion::Rate`].
    pub fn congestion(mut self, congestion: Congestion) -> Self {
        self.congestion = congestion;
        self
    }

    /// Binds the socket, starts serving peers and starts registering with the tracker in the
    /// background (see [`Node::registered`]).
    pub async fn bind(self) -> Result<Node, NodeError> {
        Node::start(self).await
    }
}

/// The node's one UDP socket, and the address it was bound to: `bind` as given, else a
/// dual-stack `[::]:0` socket, else (no IPv6 on this system) `0.0.0.0:0`.
fn bind_socket(bind: Option<SocketAddr>) -> Result<(std::net::UdpSocket, SocketAddr), NodeError> {
    if let Some(addr) = bind {
        let socket = std::net::UdpSocket::bind(addr).map_err(|source| NodeError::Bind { addr, source })?;
        return Ok((socket, addr));
    }
    let dual = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    match dual_stack(dual) {
        Ok(socket) => Ok((socket, dual)),
        Err(e) => {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0));
            tracing::debug!("no dual-stack socket ({e}): binding {v4}");
            let socket =
                std::net::UdpSocket::bind(v4).map_err(|source| NodeError::Bind { addr: v4, source })?;
            Ok((socket, v4))
        }
    }
}

/// Bytes of UDP receive and send buffer the node asks for. At 1 Gbit/s the kernel's default
/// (about 208 KiB) holds under 2 ms of packets: a scheduling hiccup of the receiving task
/// overflows it, and each overflow is a loss the congestion controller answers by slowing
/// down.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// Asks for [`SOCKET_BUFFER`] bytes both ways. The kernel caps the request at
/// `net.core.rmem_max` / `wmem_max` (raise them for fast, long paths: docs/PERFORMANCE.md).
/// Best effort: a smaller buffer still works, only less well on such paths.
fn enlarge_buffers(socket: &std::net::UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    // Linux reports twice the usable size (it counts bookkeeping).
    tracing::debug!(
        receive = sock.recv_buffer_size().unwrap_or(0),
        send = sock.send_buffer_size().unwrap_or(0),
        wanted = SOCKET_BUFFER,
        "UDP buffers"
    );
}

/// An IPv6 UDP socket that takes IPv4 too (as v4-mapped addresses), set explicitly: the
/// system default (`net.ipv6.bindv6only`, and other systems' defaults) may be IPv6-only.
fn dual_stack(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_only_v6(false)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
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

impl Node {
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    async fn start(config: NodeBuilder) -> Result<Self, NodeError> {
        let home = qpeer_certs::resolve_home(config.home.as_deref())?;
        let home_lock = HomeLock::take(&home)?;
        let identity = match config.identity {
            Some(identity) => identity,
            None => Arc::new(Identity::load_or_create(&home)?),
        };
        if config.trackers.is_empty() {
            return Err(NodeError::NoTracker);
        }
        let roots = match &config.tracker_ca {
            Some(path) => Some(qpeer_certs::config::load_ca_roots(path)?),
            None => None,
        };
        if config.relay_only && config.no_relay {
            return Err(NodeError::Conflict("--relay-only and --no-relay leave no path to any peer"));
        }
        let policy = PathPolicy { direct: !config.relay_only, relay: !config.no_relay };
        let (socket, bind_addr) = bind_socket(config.bind)?;
        enlarge_buffers(&socket);
        let bind_err = |source| NodeError::Bind { addr: bind_addr, source };
        let probe_socket = socket.try_clone().map_err(bind_err)?;
        let transport = PeerTransport::new(&identity, config.relay_only, config.congestion)?;
        let relay = RelayHub::new();
        let table = Arc::new(Mutex::new(PathTable::new(policy)));
        let (probe_tx, probe_rx) = mpsc::channel(PROBE_QUEUE);
        let runtime = Arc::new(quinn::TokioRuntime);
        let udp = quinn::Runtime::wrap_udp_socket(&*runtime, socket).map_err(bind_err)?;
        let path_socket =
            Arc::new(PathSocket::new(udp, relay.clone(), table.clone(), probe_tx).map_err(bind_err)?);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config(&identity, bind_addr)?,
            Some((*transport.server).clone()),
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
        let (accepted, accepted_rx) = mpsc::channel(ACCEPT_QUEUE);
        let shared = Arc::new(Shared {
            identity,
            incarnation,
            endpoint,
            local_addr,
            transport,
            connect_timeout: config.connect_timeout,
            tracker: TrackerStatus::new(),
            sessions: Default::default(),
            table,
            prober: prober.clone(),
            relay,
            records: Default::default(),
            visits: Default::default(),
            accepted,
            accepted_rx: tokio::sync::Mutex::new(accepted_rx),
            home: home_lock,
            events: config.events.unwrap_or_default(),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let link = TrackerLink {
            shared: shared.clone(),
            trackers: config.trackers,
            roots,
            known: KnownTrackers::in_home(&home),
            name: config.name,
        };
        shared.tasks.spawn(link.run());
        shared.tasks.spawn(crate::streams::accept_handshakes(shared.clone()));
        shared.tasks.spawn(prober.run(probe_rx, shared.cancel.clone()));
        let reporter = shared.clone();
        shared.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = reporter.cancel.cancelled() => return,
                    change = changes.recv() => match change {
                        Some(change) => reporter.on_path_change(change),
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

    /// The node's events (subscribe to receive them from now on).
    pub fn events(&self) -> &Events {
        &self.shared.events
    }

    /// The address of the node's one UDP socket.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The address the tracker observes us at, once registered.
    pub fn observed_addr(&self) -> Option<SocketAddr> {
        self.shared.tracker.observed_addr()
    }

    /// The tracker the node is registered with as its home (or was last).
    pub fn home_tracker(&self) -> Option<crate::HomeTracker> {
        self.shared.tracker.home()
    }

    /// Where the node's home record stands (see [`crate::records`]).
    pub fn record_state(&self) -> crate::RecordState {
        self.shared.tracker.record()
    }

    /// The local address of the current tracker connection (the single-socket check).
    pub fn tracker_local_addr(&self) -> Option<SocketAddr> {
        self.shared.tracker.observed_addr().map(|_| self.local_addr())
    }

    /// Waits until registered with the tracker (returns the observed address), a fatal tracker
    /// error, or `timeout`.
    pub async fn registered(&self, timeout: Duration) -> Result<SocketAddr, NodeError> {
        self.shared.tracker.registered(timeout).await
    }

    /// Resolves when the node can no longer work: a fatal tracker error (wrong tracker
    /// identity, or this NodeId registered by another process), with that error.
    pub async fn failed(&self) -> NodeError {
        self.shared.tracker.failed().await
    }

    /// How many times the node has registered with the tracker (1 + re-registrations).
    pub fn registrations(&self) -> u64 {
        self.shared.tracker.registrations()
    }

    /// What kind of network the node is on, asked of the tracker at its addresses from the
    /// node's one socket (the node also does this by itself after registering and tells its
    /// peers the mapping it found: [`NodeEvent::NatChecked`](crate::NodeEvent::NatChecked)).
    pub async fn netcheck(&self) -> Result<crate::NetReport, NodeError> {
        crate::netcheck::run(&self.shared).await
    }

    /// Registered nodes, as the tracker lists them.
    pub async fn list_peers(&self) -> Result<Vec<PeerInfo>, NodeError> {
        let client = self.shared.tracker_client().await?;
        client
            .list_all()
            .await
            .map_err(|source| NodeError::TrackerRequest { request: TrackerRequest::List, source })
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
            let handle = shared.sessions.session(shared, peer);
            if handle.inbox.send(Command::Connect(reply)).await.is_err() {
                shared.sessions.retire(shared, &peer, &handle.inbox);
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
        self.shared.sessions.handles().iter().filter_map(SessionHandle::live_connection).collect()
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
        shared.sessions.clear();
        shared.endpoint.close(close_code::PEER_SHUTDOWN.into(), b"node shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(3), shared.endpoint.wait_idle()).await;
        shared.home.release();
    }

    /// The home directory this node runs on (and holds the lock of).
    pub fn home(&self) -> &std::path::Path {
        self.shared.home.path()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    #[test]
    fn the_default_socket_is_dual_stack() {
        let (socket, addr) = super::bind_socket(None).expect("a socket");
        let local = socket.local_addr().expect("bound");
        if addr.is_ipv4() {
            // A system without IPv6: the fallback.
            assert_eq!(local.ip(), Ipv4Addr::UNSPECIFIED);
            return;
        }
        assert!(local.is_ipv6() && local.ip().is_unspecified(), "{local}");
        // IPv4 works on it too, in v4-mapped form, whatever `net.ipv6.bindv6only` says.
        let v4 = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("an IPv4 socket");
        let to = v4.local_addr().expect("bound");
        let mapped = SocketAddr::new(Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(), to.port());
        socket.send_to(b"dual", mapped).expect("a send to IPv4");
        v4.set_read_timeout(Some(std::time::Duration::from_secs(2))).expect("a timeout");
        let mut buf = [0u8; 8];
        let (n, from) = v4.recv_from(&mut buf).expect("the datagram");
        assert_eq!(&buf[..n], b"dual");
        assert_eq!(from.port(), local.port());
    }
}
