//! [`TrackerClient`]: a node's side of the tracker protocol, over the node's own quinn endpoint
//! (so the address the tracker observes is the one peers will reach).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use qpeer_certs::{peer_node_id, Identity, NodeId, ServerTrust};
use qpeer_wire::close_code;
use qpeer_wire::io::{write_frame, FrameReader, StreamError};
use qpeer_wire::record::SignedRecord;
use qpeer_wire::tracker::{
    ClientFrame, ErrorKind, Mapping, PeerAddrs, PeerInfo, ServerFrame, ALPN, MAX_FRAME_LEN, MAX_PEERS_PAGE,
    PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

/// How long a request waits for the tracker's answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a DHT request (publish, resolve) through the tracker may take: DHT queries walk
/// the network and wait for slow nodes.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(20);

/// Most entries [`TrackerClient::list_all`] collects.
pub const MAX_LISTED: usize = 100_000;

/// A tracker request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] qpeer_certs::TlsError),
    #[error("cannot connect to the tracker: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("tracker connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("tracker stream failed: {0}")]
    Stream(#[from] StreamError),
    #[error("the tracker's certificate is not a qpeer identity: {0}")]
    TrackerIdentity(#[from] qpeer_certs::PeerCertError),
    #[error("the tracker broke the protocol: expected {expected}, got {got:?}")]
    UnexpectedFrame { expected: &'static str, got: Box<ServerFrame> },
    #[error("the tracker speaks protocol version {tracker}; this node speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion { tracker: u16 },
    #[error("node {0} is not registered with the tracker")]
    NotFound(NodeId),
    #[error("the tracker refused the request ({kind:?}): {message}")]
    Refused { kind: ErrorKind, message: String },
    #[error("the tracker is {actual}, but {expected} was expected")]
    WrongTracker { expected: NodeId, actual: NodeId },
    #[error("the tracker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the tracker connection is closed")]
    Closed,
}

/// What a node tells the tracker when it registers.
#[derive(Debug, Clone, Default)]
pub struct RegisterInfo {
    pub candidates: Vec<SocketAddr>,
    pub name: Option<String>,
    /// The node process's incarnation (see [`ClientFrame::Register`]).
    pub incarnation: u64,
    /// Register as a visitor (this tracker is not our home; see [`ClientFrame::Register`]).
    pub visitor: bool,
}

/// What the tracker said of a record it published for us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub seq: i64,
    /// How many DHT nodes stored it.
    pub stored_on: u32,
}

/// An introduction: a peer we should punch toward right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Introduction {
    pub peer: NodeId,
    pub addrs: PeerAddrs,
    /// The peer process's incarnation: another value than before means it restarted.
    pub incarnation: u64,
    /// How the peer's NAT maps it, as the peer announced it.
    pub mapping: Mapping,
    /// True when we asked for it; false when the peer asked for us.
    pub requested: bool,
}

/// Keep-alive well inside NAT mapping timeouts (often 30 s for UDP). It is also how fast a
/// node notices a tracker that restarted (its next packet draws a stateless reset, which the
/// new process can send because its reset key derives from the tracker's identity); 4 s keeps
/// re-registration within about 5 s of a restart at ~0.25 packets/s per node.
pub const KEEP_ALIVE: Duration = Duration::from_secs(4);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// With several trackers a node has somewhere else to go, so it notices a dead home (one that
/// vanished without closing: a crash, a pulled cable) within [`FAILOVER_IDLE_TIMEOUT`],
/// at the price of a keep-alive every [`FAILOVER_KEEP_ALIVE`].
pub const FAILOVER_KEEP_ALIVE: Duration = Duration::from_secs(1);
pub const FAILOVER_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Transport settings of a node's tracker connection.
pub fn client_transport() -> quinn::TransportConfig {
    transport_with(KEEP_ALIVE, IDLE_TIMEOUT)
}

/// Transport settings of a node's tracker connection when it has other trackers to move to.
pub fn failover_transport() -> quinn::TransportConfig {
    transport_with(FAILOVER_KEEP_ALIVE, FAILOVER_IDLE_TIMEOUT)
}

fn transport_with(keep_alive: Duration, idle_timeout: Duration) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(keep_alive));
    if let Ok(idle) = idle_timeout.try_into() {
        transport.max_idle_timeout(Some(idle));
    }
    transport
}

/// The answer to [`TrackerClient::observe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The address the tracker saw the connection come from.
    pub observed: SocketAddr,
    /// QUIC's round-trip estimate of the connection (acknowledgement delays taken out, so
    /// less noisy than a wall-clock measurement of the handshake).
    pub rtt: Duration,
}

/// What the tracker tells a node without being asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackerEvent {
    /// A peer asked to meet us: punch toward it now.
    Introduction(Introduction),
    /// A relay link to `peer` is open.
    RelayReady { peer: NodeId, link: u32 },
    /// The tracker now sees us at another address (see [`ServerFrame::Observed`]).
    Observed { observed: SocketAddr, was: SocketAddr },
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<ServerFrame>>>>;

/// A registered connection to the tracker.
pub struct TrackerClient {
    connection: quinn::Connection,
    tracker_id: Option<NodeId>,
    observed: Arc<Mutex<SocketAddr>>,
    /// The tracker's other listen addresses, from `Registered`.
    other_addrs: Vec<SocketAddr>,
    send: tokio::sync::Mutex<quinn::SendStream>,
    pending: Pending,
    next_request: AtomicU64,
    tasks: TaskTracker,
    _cancel: DropGuard,
}

impl std::fmt::Debug for TrackerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackerClient")
            .field("tracker_id", &self.tracker_id)
            .field("observed", &self.observed)
            .finish_non_exhaustive()
    }
}

impl TrackerClient {
    /// Connects from `endpoint` to the tracker at `addr`, registers, and returns the client with
    /// the stream of introductions the tracker sends us.
    ///
    /// With [`ServerTrust::Pinned`], the tracker's id is checked right after the handshake and
    /// before anything is sent, so a mismatch comes back as the typed
    /// [`ClientError::WrongTracker`].
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        identity: &Identity,
        addr: SocketAddr,
        server_name: &str,
        trust: &ServerTrust,
        info: RegisterInfo,
    ) -> Result<(Self, mpsc::Receiver<TrackerEvent>), ClientError> {
        let config = Self::config(identity, trust)?;
        Self::connect_with_config(endpoint, config, addr, server_name, trust, info).await
    }

    /// The TLS and transport settings for reaching a tracker trusted per `trust` as
    /// `identity`: built once, usable for many connections.
    pub fn config(identity: &Identity, trust: &ServerTrust) -> Result<quinn::ClientConfig, ClientError> {
        // A pinned tracker id is checked after the handshake, for a precise error.
        let tls_trust = match trust {
            ServerTrust::Pinned(_) => ServerTrust::FirstUse,
            other => other.clone(),
        };
        let mut config = qpeer_certs::client_config(identity, &tls_trust, &[ALPN])?;
        config.transport_config(Arc::new(client_transport()));
        Ok(config)
    }

    /// [`TrackerClient::connect`] with a config from [`TrackerClient::config`].
    pub async fn connect_with_config(
        endpoint: &quinn::Endpoint,
        config: quinn::ClientConfig,
        addr: SocketAddr,
        server_name: &str,
        trust: &ServerTrust,
        info: RegisterInfo,
    ) -> Result<(Self, mpsc::Receiver<TrackerEvent>), ClientError> {
        let (connection, tracker_id) = open(endpoint, config, addr, server_name, trust).await?;
        let (mut send, recv) = connection.open_bi().await?;
        let mut reader = FrameReader::new(recv, MAX_FRAME_LEN, REQUEST_TIMEOUT);
        write_frame(
            &mut send,
            &ClientFrame::Register {
                version: PROTOCOL_VERSION,
                candidates: info.candidates,
                name: info.name,
                incarnation: info.incarnation,
                visitor: info.visitor,
            },
            MAX_FRAME_LEN,
        )
        .await?;
        let first = tokio::time::timeout(REQUEST_TIMEOUT, reader.next::<ServerFrame>())
            .await
            .map_err(|_| ClientError::Timeout(REQUEST_TIMEOUT))?;
        let (observed, other_addrs) = match first {
            Ok(Some(ServerFrame::Registered { observed, version, others }))
                if version == PROTOCOL_VERSION =>
            {
                (observed, others)
            }
            Ok(Some(ServerFrame::Registered { version, .. })) => {
                connection.close(close_code::UNSUPPORTED_VERSION.into(), b"unsupported protocol version");
                return Err(ClientError::UnsupportedVersion { tracker: version });
            }
            Ok(Some(other)) => {
                return Err(ClientError::UnexpectedFrame { expected: "Registered", got: Box::new(other) })
            }
            Ok(None) | Err(StreamError::Read(_)) => {
                // The tracker closed us; report its reason.
                return Err(ClientError::Connection(connection.closed().await));
            }
            Err(e) => return Err(e.into()),
        };

        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let pending: Pending = Arc::default();
        let (event_tx, event_rx) = mpsc::channel(64);
        let observed = Arc::new(Mutex::new(observed));
        let routes = Routes { pending: pending.clone(), events: event_tx, observed: observed.clone() };
        tasks.spawn(read_frames(reader, routes, cancel.clone(), connection.clone()));
        tasks.close();
        Ok((
            Self {
                connection,
                tracker_id,
                observed,
                other_addrs,
                send: tokio::sync::Mutex::new(send),
                pending,
                next_request: AtomicU64::new(1),
                tasks,
                _cancel: cancel.drop_guard(),
            },
            event_rx,
        ))
    }

    /// Connects from `endpoint` to the tracker at `addr` without registering, asks which
    /// address it sees this connection come from, and closes. From the endpoint a node
    /// registered with, at another address of the same tracker, this measures its NAT's
    /// mapping; the registered connection is left as it is.
    pub async fn observe(
        endpoint: &quinn::Endpoint,
        config: quinn::ClientConfig,
        addr: SocketAddr,
        server_name: &str,
        trust: &ServerTrust,
    ) -> Result<Observed, ClientError> {
        let (connection, _) = open(endpoint, config, addr, server_name, trust).await?;
        let answer = async {
            let (mut send, recv) = connection.open_bi().await?;
            let mut reader = FrameReader::new(recv, MAX_FRAME_LEN, REQUEST_TIMEOUT);
            write_frame(&mut send, &ClientFrame::Observe { version: PROTOCOL_VERSION }, MAX_FRAME_LEN)
                .await?;
            match reader.next::<ServerFrame>().await {
                Ok(Some(ServerFrame::Observation { observed })) => {
                    Ok(Observed { observed, rtt: connection.rtt() })
                }
                Ok(Some(other)) => {
                    Err(ClientError::UnexpectedFrame { expected: "Observation", got: Box::new(other) })
                }
                Ok(None) | Err(StreamError::Read(_)) => {
                    Err(ClientError::Connection(connection.closed().await))
                }
                Err(e) => Err(e.into()),
            }
        };
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, answer)
            .await
            .unwrap_or(Err(ClientError::Timeout(REQUEST_TIMEOUT)));
        connection.close(close_code::NORMAL.into(), b"observed");
        answer
    }

    /// The address the tracker sees us at (our public NAT mapping).
    pub fn observed_addr(&self) -> SocketAddr {
        *self.observed.lock()
    }

    /// The tracker's other listen addresses (for [`TrackerClient::observe`]).
    pub fn other_addrs(&self) -> &[SocketAddr] {
        &self.other_addrs
    }

    /// Tells the tracker how our NAT maps us; peers learn it in introductions.
    pub async fn announce_mapping(&self, mapping: Mapping) -> Result<(), ClientError> {
        let mut send = self.send.lock().await;
        write_frame(&mut *send, &ClientFrame::Mapping { mapping }, MAX_FRAME_LEN).await?;
        Ok(())
    }

    /// The tracker's NodeId (`None` when it was verified by a CA instead).
    pub fn tracker_id(&self) -> Option<NodeId> {
        self.tracker_id
    }

    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }

    /// Resolves when the tracker connection is gone, with the reason.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.connection.closed().await
    }

    /// Closes the connection politely and waits for the reader task.
    pub async fn close(&self) {
        self.connection.close(close_code::NORMAL.into(), b"node leaving");
        self.tasks.wait().await;
    }

    async fn request(&self, build: impl FnOnce(u64) -> ClientFrame) -> Result<ServerFrame, ClientError> {
        self.request_within(REQUEST_TIMEOUT, build).await
    }

    async fn request_within(
        &self,
        timeout: Duration,
        build: impl FnOnce(u64) -> ClientFrame,
    ) -> Result<ServerFrame, ClientError> {
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(request_id, tx);
        let sent = {
            let mut send = self.send.lock().await;
            write_frame(&mut *send, &build(request_id), MAX_FRAME_LEN).await
        };
        if let Err(e) = sent {
            self.pending.lock().remove(&request_id);
            return Err(e.into());
        }
        let answer = tokio::time::timeout(timeout, rx).await;
        self.pending.lock().remove(&request_id);
        match answer {
            Err(_) => Err(ClientError::Timeout(timeout)),
            Ok(Err(_)) => Err(self
                .connection
                .close_reason()
                .map(ClientError::Connection)
                .unwrap_or(ClientError::Closed)),
            Ok(Ok(ServerFrame::Error { kind, message, .. })) => Err(ClientError::Refused { kind, message }),
            Ok(Ok(frame)) => Ok(frame),
        }
    }

    /// One page of the directory.
    pub async fn list_page(
        &self,
        after: Option<NodeId>,
        limit: u16,
    ) -> Result<(Vec<PeerInfo>, Option<NodeId>), ClientError> {
        match self.request(|request_id| ClientFrame::ListPeers { request_id, after, limit }).await? {
            ServerFrame::Peers { peers, next, .. } => Ok((peers, next)),
            other => Err(ClientError::UnexpectedFrame { expected: "Peers", got: Box::new(other) }),
        }
    }

    /// Every registered node (up to [`MAX_LISTED`]), page by page.
    pub async fn list_all(&self) -> Result<Vec<PeerInfo>, ClientError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let (peers, next) = self.list_page(after, MAX_PEERS_PAGE).await?;
            all.extend(peers);
            match next {
                Some(cursor) if all.len() < MAX_LISTED => after = Some(cursor),
                _ => return Ok(all),
            }
        }
    }

    /// Asks the tracker to relay between us and `peer` (after an introduction). A
    /// [`TrackerEvent::RelayReady`] arrives once `peer` has asked too.
    pub async fn request_relay(&self, peer: NodeId) -> Result<(), ClientError> {
        match self.request(|request_id| ClientFrame::RelayRequest { request_id, peer }).await? {
            ServerFrame::RelayAccepted { .. } => Ok(()),
            ServerFrame::NotFound { target, .. } => Err(ClientError::NotFound(target)),
            other => Err(ClientError::UnexpectedFrame { expected: "RelayAccepted", got: Box::new(other) }),
        }
    }

    /// Replaces the candidate addresses we registered (after a move to another network).
    pub async fn announce_candidates(&self, candidates: Vec<SocketAddr>) -> Result<(), ClientError> {
        let mut send = self.send.lock().await;
        write_frame(&mut *send, &ClientFrame::Candidates { candidates }, MAX_FRAME_LEN).await?;
        Ok(())
    }

    /// Asks the tracker to publish our home record (which must name it) in its DHT. Waits
    /// for the DHT's answer, up to [`PUBLISH_TIMEOUT`].
    pub async fn publish(&self, record: SignedRecord) -> Result<Published, ClientError> {
        let frame = self
            .request_within(PUBLISH_TIMEOUT, |request_id| ClientFrame::Publish { request_id, record })
            .await?;
        match frame {
            ServerFrame::Published { seq, stored_on, .. } => Ok(Published { seq, stored_on }),
            other => Err(ClientError::UnexpectedFrame { expected: "Published", got: Box::new(other) }),
        }
    }

    /// The most recent home record of `node` that the tracker's DHT holds, unverified: the
    /// caller checks it ([`SignedRecord::verify`]). Waits up to [`PUBLISH_TIMEOUT`].
    pub async fn resolve(&self, node: NodeId) -> Result<Option<SignedRecord>, ClientError> {
        match self
            .request_within(PUBLISH_TIMEOUT, |request_id| ClientFrame::Resolve { request_id, node })
            .await?
        {
            ServerFrame::Resolved { record, .. } => Ok(record),
            other => Err(ClientError::UnexpectedFrame { expected: "Resolved", got: Box::new(other) }),
        }
    }

    /// Asks the tracker to introduce us to `target`. The target receives our addresses at the
    /// same moment; we receive theirs.
    pub async fn introduce(&self, target: NodeId) -> Result<Introduction, ClientError> {
        match self.request(|request_id| ClientFrame::Introduce { request_id, target }).await? {
            ServerFrame::Introduction { peer, addrs, incarnation, mapping, .. } if peer == target => {
                Ok(Introduction { peer, addrs, incarnation, mapping, requested: true })
            }
            ServerFrame::NotFound { target, .. } => Err(ClientError::NotFound(target)),
            other => Err(ClientError::UnexpectedFrame { expected: "Introduction", got: Box::new(other) }),
        }
    }
}

/// Connects to the tracker at `addr` and checks a pinned id right after the handshake,
/// before anything is sent (for the typed [`ClientError::WrongTracker`]). Returns the
/// connection and the tracker's id (`None` when a CA verified it).
async fn open(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    trust: &ServerTrust,
) -> Result<(quinn::Connection, Option<NodeId>), ClientError> {
    let connection = endpoint.connect_with(config, addr, server_name)?.await?;
    let tracker_id = match trust {
        ServerTrust::Ca(_) => None,
        _ => Some(peer_node_id(&connection)?),
    };
    if let (ServerTrust::Pinned(expected), Some(actual)) = (trust, tracker_id) {
        if *expected != actual {
            connection.close(close_code::NORMAL.into(), b"unexpected tracker identity");
            return Err(ClientError::WrongTracker { expected: *expected, actual });
        }
    }
    Ok((connection, tracker_id))
}

/// Where the tracker's frames go.
struct Routes {
    pending: Pending,
    events: mpsc::Sender<TrackerEvent>,
    observed: Arc<Mutex<SocketAddr>>,
}

/// Routes the tracker's frames: answers to their waiting requests, introductions to the node.
async fn read_frames(
    mut reader: FrameReader<quinn::RecvStream>,
    routes: Routes,
    cancel: CancellationToken,
    connection: quinn::Connection,
) {
    let Routes { pending, events, observed } = routes;
    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => return,
            frame = reader.next::<ServerFrame>() => frame,
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("tracker control stream ended: {e}");
                if !matches!(e, StreamError::Read(_)) {
                    connection.close(close_code::PROTOCOL_VIOLATION.into(), b"undecodable frame");
                }
                return;
            }
        };
        let request_id = match &frame {
            ServerFrame::Introduction { request_id: None, peer, addrs, incarnation, mapping } => {
                let intro = Introduction {
                    peer: *peer,
                    addrs: addrs.clone(),
                    incarnation: *incarnation,
                    mapping: *mapping,
                    requested: false,
                };
                if events.try_send(TrackerEvent::Introduction(intro)).is_err() {
                    tracing::warn!("dropping an introduction: the node is not keeping up");
                }
                continue;
            }
            ServerFrame::Introduction { request_id: Some(id), .. } => *id,
            ServerFrame::RelayReady { peer, link } => {
                if events.try_send(TrackerEvent::RelayReady { peer: *peer, link: *link }).is_err() {
                    tracing::warn!("dropping a relay notice: the node is not keeping up");
                }
                continue;
            }
            ServerFrame::Peers { request_id, .. }
            | ServerFrame::NotFound { request_id, .. }
            | ServerFrame::Error { request_id, .. }
            | ServerFrame::RelayAccepted { request_id }
            | ServerFrame::Published { request_id, .. }
            | ServerFrame::Resolved { request_id, .. } => *request_id,
            ServerFrame::Observed { observed: now } => {
                let was = std::mem::replace(&mut *observed.lock(), *now);
                if events.try_send(TrackerEvent::Observed { observed: *now, was }).is_err() {
                    tracing::warn!("dropping an address change notice: the node is not keeping up");
                }
                continue;
            }
            ServerFrame::Registered { .. } => {
                connection.close(close_code::PROTOCOL_VIOLATION.into(), b"Registered sent twice");
                return;
            }
            ServerFrame::Observation { .. } => {
                connection.close(close_code::PROTOCOL_VIOLATION.into(), b"Observation without Observe");
                return;
            }
        };
        if let Some(waiter) = pending.lock().remove(&request_id) {
            let _ = waiter.send(frame);
        }
    }
}
