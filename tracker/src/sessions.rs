//! One node's connection, from the handshake to the close: [`NodeSession`] waits for
//! `Register`, enters the node, answers its requests (listing, introductions, relay
//! requests, new candidates), follows its migrations and serves its relay streams, then
//! takes it out again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qpeer_certs::{peer_node_id, NodeId};
use qpeer_wire::canonical;
use qpeer_wire::close_code;
use qpeer_wire::codec::CodecError;
use qpeer_wire::io::{write_frame, FrameReader, StreamError};
use qpeer_wire::record::{HomeRecord, RecordError, SignedRecord};
use qpeer_wire::tracker::{
    ClientFrame, ErrorKind, ServerFrame, MAX_CANDIDATES, MAX_FRAME_LEN, MAX_NAME_LEN, MAX_PEERS_PAGE,
    MAX_TRACKER_ADDRS, PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dht::{PublishError, TrackerDht};
use crate::directory::Listing;
use crate::events::{EventSink, ResolvedRecord, ServerEvent};
use crate::limits::{ConnectionSlot, Limits, TokenBucket};
use crate::registry::{Entered, NodeReach, Outbox, Registry};
use crate::relay::{Relay, RelayClient};

/// Time allowed for a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a session checks whether its connection migrated.
const MIGRATION_CHECK: Duration = Duration::from_secs(1);

/// Frames queued for one node's control stream.
const OUTBOX: usize = 16;

/// How long an `Observe` connection is left for the node to close after the answer (so the
/// answer is not lost to our close) before the tracker closes it.
const OBSERVE_LINGER: Duration = Duration::from_secs(2);

/// DHT requests one session may have in flight (a publish counts; only one publish at a
/// time); more are answered `Busy`.
const SESSION_DHT_QUERIES: usize = 4;

/// How long the tracker lets one DHT query run before it answers `Busy` (within the client's
/// own timeout, `client::PUBLISH_TIMEOUT`).
const DHT_QUERY_TIMEOUT: Duration = Duration::from_secs(15);

/// What every session shares.
#[derive(Debug)]
pub struct SessionContext {
    pub registry: Registry,
    pub relay: Arc<Relay>,
    pub limits: Limits,
    pub events: EventSink,
    /// Every address the tracker listens on (one endpoint each), told to nodes in
    /// `Registered` so that they can measure their NAT's mapping.
    pub listen_addrs: Vec<SocketAddr>,
    /// The tracker's own identity: the tracker a record published here must name.
    pub tracker_id: NodeId,
    /// The tracker's DHT node, when it runs one.
    pub dht: Option<TrackerDht>,
    next_connection_id: AtomicU64,
}

impl SessionContext {
    pub fn new(limits: Limits, events: EventSink, listen_addrs: Vec<SocketAddr>, tracker_id: NodeId) -> Self {
        Self {
            registry: Registry::default(),
            relay: Arc::default(),
            limits,
            events,
            listen_addrs,
            tracker_id,
            dht: None,
            next_connection_id: AtomicU64::new(1),
        }
    }

    /// The listen addresses a node that arrived at `local` is told about: the others, and
    /// only specific ones (a node cannot aim at an unspecified bind).
    fn other_addrs(&self, local: SocketAddr) -> Vec<SocketAddr> {
        self.listen_addrs
            .iter()
            .map(|addr| canonical(*addr))
            .filter(|addr| !addr.ip().is_unspecified() && *addr != canonical(local))
            .take(MAX_TRACKER_ADDRS)
            .collect()
    }
}

/// Why the tracker closes a node's connection: each has its close code, and its text is the
/// reason the node reads.
#[derive(Debug, thiserror::Error)]
enum Fault {
    #[error("no control stream opened in time")]
    NoControlStream,
    #[error("no Register frame in time")]
    NoRegister,
    #[error("the first frame must be Register or Observe")]
    NotRegister,
    #[error("Register sent twice")]
    RegisteredTwice,
    #[error("Observe must be the first frame")]
    LateObserve,
    #[error("protocol version {0} is not supported; this tracker speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion(u16),
    #[error("{0} candidates; at most {MAX_CANDIDATES}")]
    TooManyCandidates(usize),
    #[error("name must be at most {MAX_NAME_LEN} bytes without control characters")]
    BadName,
    #[error("tracker full ({0} nodes)")]
    Full(usize),
    #[error("this node is registered here as its home; it cannot visit here too")]
    VisitorAtHome,
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("tracker shutting down")]
    Shutdown,
}

impl Fault {
    fn close_code(&self) -> u32 {
        match self {
            Self::NoControlStream | Self::NoRegister => close_code::TIMEOUT,
            Self::UnsupportedVersion(_) => close_code::UNSUPPORTED_VERSION,
            Self::Full(_) => close_code::TRACKER_FULL,
            Self::VisitorAtHome => close_code::NORMAL,
            Self::Shutdown => close_code::SHUTDOWN,
            Self::Stream(StreamError::Codec(CodecError::TooLarge { .. })) => close_code::FRAME_TOO_LARGE,
            Self::Stream(StreamError::PartialTimeout(_)) => close_code::TIMEOUT,
            Self::NotRegister
            | Self::RegisteredTwice
            | Self::LateObserve
            | Self::TooManyCandidates(_)
            | Self::BadName
            | Self::Stream(_) => close_code::PROTOCOL_VIOLATION,
        }
    }
}

fn close(conn: &quinn::Connection, code: u32, reason: &str) {
    conn.close(code.into(), reason.as_bytes());
}

/// Completes the handshake of a connection the accept loop of the endpoint at `local`
/// admitted (`slot` counts it against its address until it ends) and serves it.
pub async fn serve_incoming(
    ctx: Arc<SessionContext>,
    local: SocketAddr,
    incoming: quinn::Incoming,
    mut slot: ConnectionSlot,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let remote = canonical(incoming.remote_address());
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%remote, "handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "handshake timed out");
            return;
        }
    };
    if !slot.prove() {
        // Its address filled its proven slots while this handshake ran.
        close(&conn, close_code::TOO_MANY_CONNECTIONS, "too many connections from your address");
        return;
    }
    let node_id = match peer_node_id(&conn) {
        Ok(id) => id,
        Err(e) => {
            close(&conn, close_code::PROTOCOL_VIOLATION, &e.to_string());
            return;
        }
    };
    let connection_id = ctx.next_connection_id.fetch_add(1, Ordering::Relaxed);
    NodeSession { ctx, conn, node_id, remote, local, connection_id }.run(cancel, tasks).await;
    drop(slot);
}

/// A `Register` frame's content, checked.
struct RegisterRequest {
    candidates: Vec<SocketAddr>,
    name: Option<String>,
    incarnation: u64,
    visitor: bool,
}

/// What a connection's first frame asks for.
enum FirstFrame {
    Register(RegisterRequest),
    /// Only the address it arrives from; it does not register.
    Observe,
}

/// What paces and owns one session's DHT requests.
struct DhtRequests {
    bucket: TokenBucket,
    /// [`SESSION_DHT_QUERIES`] slots.
    slots: Arc<Semaphore>,
    /// One publish at a time: mainline refuses a second put of the same item meanwhile.
    publishing: Arc<Semaphore>,
    /// A visitor may not publish.
    visitor: bool,
    /// Cancelled when the session ends: its DHT tasks stop then.
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// One node's connection.
struct NodeSession {
    ctx: Arc<SessionContext>,
    conn: quinn::Connection,
    node_id: NodeId,
    remote: SocketAddr,
    /// The tracker's address this connection arrived at.
    local: SocketAddr,
    connection_id: u64,
}

impl NodeSession {
    async fn run(self, cancel: CancellationToken, tasks: TaskTracker) {
        let limits = &self.ctx.limits;
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = tokio::time::timeout(limits.register_timeout, self.conn.accept_bi()) => accepted,
        };
        let (send, recv) = match accepted {
            Ok(Ok(streams)) => streams,
            Ok(Err(_)) => return,
            Err(_) => return self.close(&Fault::NoControlStream),
        };
        let mut reader = FrameReader::new(recv, limits.max_frame_len, limits.partial_frame_timeout);
        let (outbox, outbox_rx) = mpsc::channel(OUTBOX);
        tasks.spawn(write_outbox(self.conn.clone(), send, outbox_rx));

        let request = match self.read_first(&mut reader, &cancel).await {
            Ok(Some(FirstFrame::Register(request))) => request,
            Ok(Some(FirstFrame::Observe)) => return self.observe(outbox).await,
            Ok(None) => return,
            Err(fault) => return self.close(&fault),
        };
        let visitor = request.visitor;
        let (relay, observed) = match self.enter(request, &outbox) {
            Ok(entered) => entered,
            Err(fault) => return self.close(&fault),
        };
        let others = self.ctx.other_addrs(self.local);
        let registered = ServerFrame::Registered { version: PROTOCOL_VERSION, observed, others };
        let _ = outbox.send(Box::new(registered)).await;
        let active = self.ctx.registry.len();
        self.ctx.events.emit(ServerEvent::Connected {
            remote: self.remote,
            node: self.node_id,
            active,
            visitor,
        });
        // The session's DHT requests run as tasks of their own, cancelled when it ends.
        let dht_cancel = cancel.child_token();
        let _dht_guard = dht_cancel.clone().drop_guard();
        let mut dht = DhtRequests {
            bucket: self.ctx.limits.dht_bucket(Instant::now()),
            slots: Arc::new(Semaphore::new(SESSION_DHT_QUERIES)),
            publishing: Arc::new(Semaphore::new(1)),
            visitor,
            cancel: dht_cancel,
            tasks: tasks.clone(),
        };

        let migrations = async {
            self.follow_migrations(&outbox).await;
            std::future::pending::<()>().await
        };
        // The relay streams are served inside this task (no task per idle node for them).
        let outcome = tokio::select! {
            _ = cancel.cancelled() => Err(Fault::Shutdown),
            outcome = self.serve(&mut reader, &outbox, &mut dht) => outcome,
            _ = relay.serve(&self.conn) => Ok(()),
            _ = migrations => Ok(()),
            _ = self.conn.closed() => Ok(()),
        };
        if let Err(fault) = outcome {
            tracing::debug!(node = %self.node_id.short(), "closing: {fault}");
            self.close(&fault);
        }
        self.leave();
    }

    fn close(&self, fault: &Fault) {
        close(&self.conn, fault.close_code(), &fault.to_string());
    }

    /// Answers an `Observe` connection with the address it arrives from, then closes it. It
    /// never touches the registry: the node's registered connection stays as it is.
    async fn observe(&self, outbox: Outbox) {
        let observed = canonical(self.conn.remote_address());
        let _ = outbox.send(Box::new(ServerFrame::Observation { observed })).await;
        // Dropping the queue makes the writer finish the stream after the answer; the node
        // closes once it has read it, and a node that does not is closed after a while.
        drop(outbox);
        let _ = tokio::time::timeout(OBSERVE_LINGER, self.conn.closed()).await;
        close(&self.conn, close_code::NORMAL, "observed");
    }

    /// Waits for `Register` (checked) or `Observe`. `None`: the connection ended first.
    async fn read_first(
        &self,
        reader: &mut FrameReader<quinn::RecvStream>,
        cancel: &CancellationToken,
    ) -> Result<Option<FirstFrame>, Fault> {
        let first = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            first = tokio::time::timeout(self.ctx.limits.register_timeout, reader.next::<ClientFrame>()) => first,
        };
        let frame = match first.map_err(|_| Fault::NoRegister)? {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(StreamError::Read(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let (version, candidates, name, incarnation, visitor) = match frame {
            ClientFrame::Register { version, candidates, name, incarnation, visitor } => {
                (version, candidates, name, incarnation, visitor)
            }
            ClientFrame::Observe { version } if version == PROTOCOL_VERSION => {
                return Ok(Some(FirstFrame::Observe))
            }
            ClientFrame::Observe { version } => return Err(Fault::UnsupportedVersion(version)),
            _ => return Err(Fault::NotRegister),
        };
        if version != PROTOCOL_VERSION {
            return Err(Fault::UnsupportedVersion(version));
        }
        check_candidates(&candidates)?;
        if name.as_ref().is_some_and(|n| n.len() > MAX_NAME_LEN || n.chars().any(char::is_control)) {
            return Err(Fault::BadName);
        }
        Ok(Some(FirstFrame::Register(RegisterRequest { candidates, name, incarnation, visitor })))
    }

    /// Enters the node in the registry (closing an older connection of it) and attaches it
    /// to the relay. Returns its relay client and the address it is seen at.
    fn enter(&self, request: RegisterRequest, outbox: &Outbox) -> Result<(RelayClient, SocketAddr), Fault> {
        let limits = &self.ctx.limits;
        let mut listing = Listing::new(
            self.connection_id,
            self.conn.remote_address(),
            request.candidates,
            request.incarnation,
            request.name,
            unix_now(),
        );
        listing.visitor = request.visitor;
        let observed = listing.addrs.observed;
        let session = NodeReach { connection: self.conn.clone(), outbox: outbox.clone() };
        let entered = self.ctx.registry.lock().register(self.node_id, listing, session, limits.max_nodes);
        match entered {
            Entered::Registered => {}
            Entered::Replaced(old) => {
                tracing::info!(node = %self.node_id.short(), "registration replaced an older connection");
                close(&old, close_code::REPLACED, &format!("this NodeId registered again from {observed}"));
            }
            Entered::Full => return Err(Fault::Full(limits.max_nodes)),
            Entered::HomeHere => return Err(Fault::VisitorAtHome),
        }
        let budget = limits.relay_budget(Instant::now());
        Ok((self.ctx.relay.attach(self.node_id, self.connection_id, budget), observed))
    }

    /// Takes the node out of the registry and the relay, and reports it gone.
    fn leave(&self) {
        let active = {
            let mut nodes = self.ctx.registry.lock();
            nodes.remove(&self.node_id, self.connection_id).then(|| nodes.len())
        };
        for closed in self.ctx.relay.detach(&self.node_id, self.connection_id) {
            self.ctx.events.emit(closed);
        }
        self.ctx.events.emit(ServerEvent::Disconnected {
            remote: self.remote,
            node: self.node_id,
            close: self.conn.close_reason(),
            active,
        });
    }

    /// Answers requests until the node finishes its stream or breaks the protocol.
    async fn serve(
        &self,
        reader: &mut FrameReader<quinn::RecvStream>,
        outbox: &Outbox,
        dht: &mut DhtRequests,
    ) -> Result<(), Fault> {
        let mut introductions = self.ctx.limits.introduction_bucket(Instant::now());
        loop {
            let frame = match reader.next::<ClientFrame>().await {
                Ok(Some(frame)) => frame,
                Ok(None) | Err(StreamError::Read(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let reply = match frame {
                ClientFrame::Register { .. } => return Err(Fault::RegisteredTwice),
                ClientFrame::Observe { .. } => return Err(Fault::LateObserve),
                ClientFrame::Mapping { mapping } => {
                    self.ctx.registry.lock().directory_mut().set_mapping(
                        &self.node_id,
                        self.connection_id,
                        mapping,
                    );
                    continue;
                }
                ClientFrame::ListPeers { request_id, after, limit } => {
                    let limit = usize::from(limit.clamp(1, MAX_PEERS_PAGE));
                    let (peers, next) = self.ctx.registry.lock().directory().page(after, limit);
                    ServerFrame::Peers { request_id, peers, next }
                }
                ClientFrame::Introduce { request_id, target } => {
                    self.introduce(request_id, target, &mut introductions)
                }
                ClientFrame::RelayRequest { request_id, peer } => self.relay_request(request_id, peer),
                ClientFrame::Publish { request_id, record } => {
                    match self.publish(request_id, record, dht, outbox) {
                        Some(refused) => refused,
                        None => continue,
                    }
                }
                ClientFrame::Resolve { request_id, node } => {
                    match self.resolve(request_id, node, dht, outbox) {
                        Some(refused) => refused,
                        None => continue,
                    }
                }
                ClientFrame::Candidates { candidates } => {
                    check_candidates(&candidates)?;
                    self.ctx.registry.lock().directory_mut().update_candidates(
                        &self.node_id,
                        self.connection_id,
                        candidates,
                    );
                    continue;
                }
            };
            if outbox.send(Box::new(reply)).await.is_err() {
                return Ok(());
            }
        }
    }

    /// Checks a record to publish and starts its DHT put, which answers `Published` (or an
    /// error) when it returns. `Some`: the request is refused at once with this reply.
    fn publish(
        &self,
        request_id: u64,
        record: SignedRecord,
        dht: &mut DhtRequests,
        outbox: &Outbox,
    ) -> Option<ServerFrame> {
        let error = |kind, message: String| Some(ServerFrame::Error { request_id, kind, message });
        let refuse = |kind, reason: String| {
            self.ctx.events.emit(ServerEvent::PublishRefused { node: self.node_id, reason: reason.clone() });
            error(kind, reason)
        };
        if dht.visitor {
            return refuse(
                ErrorKind::InvalidRequest,
                "a visitor cannot publish: this tracker is not its home".to_string(),
            );
        }
        if self.ctx.dht.is_none() {
            return error(ErrorKind::NoDht, "this tracker is not in a DHT".to_string());
        }
        if !dht.bucket.try_take(Instant::now()) {
            return error(ErrorKind::RateLimited, "too many DHT requests; slow down".to_string());
        }
        if let Err(e) = self.check_record(&record) {
            return refuse(ErrorKind::BadRecord, e.to_string());
        }
        let Ok(publishing) = dht.publishing.clone().try_acquire_owned() else {
            return error(
                ErrorKind::Busy,
                "a publish of this node is still in flight; retry shortly".to_string(),
            );
        };
        let Some(slots) = self.query_slots(dht) else {
            return error(ErrorKind::Busy, "too many DHT requests in flight; retry shortly".to_string());
        };
        let (ctx, outbox, cancel) = (self.ctx.clone(), outbox.clone(), dht.cancel.clone());
        let (node, connection_id) = (self.node_id, self.connection_id);
        dht.tasks.spawn(async move {
            let _held = (publishing, slots);
            let Some(tracker_dht) = ctx.dht.as_ref() else { return };
            let put = tokio::select! {
                _ = cancel.cancelled() => return,
                put = tokio::time::timeout(DHT_QUERY_TIMEOUT, tracker_dht.publish(&record)) => put,
            };
            let seq = record.seq;
            let reply = match put {
                Ok(Ok(stored_on)) => {
                    ctx.registry.lock().note_published(node, connection_id, seq);
                    ctx.events.emit(ServerEvent::Published { node, seq, stored_on });
                    ServerFrame::Published { request_id, seq, stored_on }
                }
                Ok(Err(e)) => {
                    let kind = match e {
                        PublishError::NotMostRecent | PublishError::SignatureLength => ErrorKind::BadRecord,
                        PublishError::Conflict | PublishError::Failed(_) | PublishError::Stopped => {
                            ErrorKind::Busy
                        }
                    };
                    ctx.events.emit(ServerEvent::PublishRefused { node, reason: e.to_string() });
                    ServerFrame::Error { request_id, kind, message: e.to_string() }
                }
                Err(_) => {
                    let message = format!("the DHT did not store the record within {DHT_QUERY_TIMEOUT:?}");
                    ctx.events.emit(ServerEvent::PublishRefused { node, reason: message.clone() });
                    ServerFrame::Error { request_id, kind: ErrorKind::Busy, message }
                }
            };
            let _ = outbox.send(Box::new(reply)).await;
        });
        None
    }

    /// A record may be published here when this connection's node signed it, it is good
    /// now, it names this tracker, and it is newer than the last one published here.
    fn check_record(&self, record: &SignedRecord) -> Result<(), RecordError> {
        let home = record.verify(&self.node_id, unix_now())?;
        if home.tracker != self.ctx.tracker_id {
            return Err(RecordError::OtherTracker { named: home.tracker, this: self.ctx.tracker_id });
        }
        record.check_newer(self.ctx.registry.lock().published_seq(&self.node_id))
    }

    /// A slot of this session's and one of the tracker's DHT queries.
    fn query_slots(&self, dht: &DhtRequests) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let session = dht.slots.clone().try_acquire_owned().ok()?;
        let tracker = self.ctx.dht.as_ref()?.query_slot()?;
        Some((session, tracker))
    }

    /// Starts looking up `node`'s record in the DHT; answers `Resolved` when the lookup
    /// ends. `Some`: the request is refused at once with this reply.
    fn resolve(
        &self,
        request_id: u64,
        node: NodeId,
        dht: &mut DhtRequests,
        outbox: &Outbox,
    ) -> Option<ServerFrame> {
        let error =
            |kind, message: &str| Some(ServerFrame::Error { request_id, kind, message: message.to_string() });
        if self.ctx.dht.is_none() {
            return error(ErrorKind::NoDht, "this tracker is not in a DHT");
        }
        if !dht.bucket.try_take(Instant::now()) {
            return error(ErrorKind::RateLimited, "too many DHT requests; slow down");
        }
        let Some(slots) = self.query_slots(dht) else {
            return error(ErrorKind::Busy, "too many DHT requests in flight; retry shortly");
        };
        let (ctx, outbox, cancel) = (self.ctx.clone(), outbox.clone(), dht.cancel.clone());
        dht.tasks.spawn(async move {
            let _held = slots;
            let Some(tracker_dht) = ctx.dht.as_ref() else { return };
            let found = tokio::select! {
                _ = cancel.cancelled() => return,
                found = tokio::time::timeout(DHT_QUERY_TIMEOUT, tracker_dht.resolve(&node)) => found,
            };
            let reply = match found {
                Ok(record) => {
                    let found = record.as_ref().map(|r| ResolvedRecord {
                        seq: r.seq,
                        tracker: HomeRecord::decode(&r.value).ok().map(|home| home.tracker),
                    });
                    ctx.events.emit(ServerEvent::Resolved { node, found });
                    ServerFrame::Resolved { request_id, record }
                }
                Err(_) => ServerFrame::Error {
                    request_id,
                    kind: ErrorKind::Busy,
                    message: format!("the DHT lookup did not end within {DHT_QUERY_TIMEOUT:?}"),
                },
            };
            let _ = outbox.send(Box::new(reply)).await;
        });
        None
    }

    /// Sends both introductions under one lock, so both nodes learn of each other at once.
    /// Returns the reply for the requester.
    fn introduce(&self, request_id: u64, target: NodeId, introductions: &mut TokenBucket) -> ServerFrame {
        let error =
            |kind, message: &str| ServerFrame::Error { request_id, kind, message: message.to_string() };
        if target == self.node_id {
            return error(ErrorKind::InvalidRequest, "a node cannot be introduced to itself");
        }
        let now = Instant::now();
        let mut nodes = self.ctx.registry.lock();
        let Some(me) = nodes.directory().get(&self.node_id) else {
            return error(ErrorKind::InvalidRequest, "not registered");
        };
        if !introductions.try_take(now) {
            return error(ErrorKind::RateLimited, "too many introduction requests; slow down");
        }
        let to_target = ServerFrame::Introduction {
            request_id: None,
            peer: self.node_id,
            addrs: me.addrs.clone(),
            incarnation: me.incarnation,
            mapping: me.mapping,
        };
        let Some(peer) = nodes.directory().get(&target) else {
            return ServerFrame::NotFound { request_id, target };
        };
        let reply = ServerFrame::Introduction {
            request_id: Some(request_id),
            peer: target,
            addrs: peer.addrs.clone(),
            incarnation: peer.incarnation,
            mapping: peer.mapping,
        };
        if !nodes.send(&target, to_target) {
            return error(ErrorKind::Busy, "the target's queue is full; retry shortly");
        }
        tracing::debug!(from = %self.node_id.short(), to = %target.short(), "introduction");
        nodes.rendezvous_mut().introduce(self.node_id, target, now);
        reply
    }

    /// Notes that this node wants a relay to `peer`; when `peer` wants one too, opens the
    /// link and tells both.
    fn relay_request(&self, request_id: u64, peer: NodeId) -> ServerFrame {
        use crate::rendezvous::RelayAsk;
        let now = Instant::now();
        let ask = {
            let mut nodes = self.ctx.registry.lock();
            if !nodes.rendezvous_mut().recently_introduced(self.node_id, peer, now) {
                RelayAsk::NotIntroduced
            } else if nodes.directory().get(&peer).is_none() {
                return ServerFrame::NotFound { request_id, target: peer };
            } else {
                nodes.rendezvous_mut().ask_relay(self.node_id, peer, now)
            }
        };
        match ask {
            RelayAsk::NotIntroduced => ServerFrame::Error {
                request_id,
                kind: ErrorKind::NotIntroduced,
                message: format!("no recent introduction to {}", peer.short()),
            },
            RelayAsk::Waiting => ServerFrame::RelayAccepted { request_id },
            RelayAsk::Mutual => {
                self.open_relay(peer);
                ServerFrame::RelayAccepted { request_id }
            }
        }
    }

    /// Opens the link to `peer` (both ends' queues first, so that neither end's first packet
    /// is dropped) and tells both ends.
    fn open_relay(&self, peer: NodeId) {
        let Some((link, opened)) = self.ctx.relay.open_link(self.node_id, peer) else { return };
        {
            let nodes = self.ctx.registry.lock();
            for (end, other) in [(self.node_id, peer), (peer, self.node_id)] {
                nodes.send(&end, ServerFrame::RelayReady { peer: other, link });
            }
        }
        if opened {
            self.ctx.events.emit(ServerEvent::RelayOpened { requester: self.node_id, peer, link });
        }
    }

    /// Follows the node's connection when it migrates (its NAT rebound, or it moved): the
    /// directory and the node learn the new address. quinn has no event for a migration, so
    /// the connection's remote address is checked every [`MIGRATION_CHECK`].
    async fn follow_migrations(&self, outbox: &Outbox) {
        let mut known = self.remote;
        loop {
            tokio::time::sleep(MIGRATION_CHECK).await;
            let now = canonical(self.conn.remote_address());
            if now == known {
                continue;
            }
            if !self.ctx.registry.lock().directory_mut().migrate(&self.node_id, self.connection_id, now) {
                return;
            }
            self.ctx.events.emit(ServerEvent::Migrated { node: self.node_id, now, was: known });
            if outbox.send(Box::new(ServerFrame::Observed { observed: now })).await.is_err() {
                return;
            }
            known = now;
        }
    }
}

fn check_candidates(candidates: &[SocketAddr]) -> Result<(), Fault> {
    if candidates.len() > MAX_CANDIDATES {
        return Err(Fault::TooManyCandidates(candidates.len()));
    }
    Ok(())
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

/// Writes queued frames to the node's control stream until the queue closes or writing fails.
async fn write_outbox(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut outbox: mpsc::Receiver<Box<ServerFrame>>,
) {
    while let Some(frame) = outbox.recv().await {
        // Our own frames obey the protocol's maximum; --max-frame-len limits what we accept.
        if let Err(e) = write_frame(&mut send, &frame, MAX_FRAME_LEN).await {
            tracing::debug!("control stream write failed: {e}");
            close(&conn, close_code::PROTOCOL_VIOLATION, "control stream write failed");
            return;
        }
    }
    let _ = send.finish();
}
