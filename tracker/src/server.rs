//! The tracker server: [`Tracker::bind`] then [`Tracker::run`] until a shutdown future resolves.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use qpeer_certs::{peer_node_id, Identity, NodeId};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::directory::{canonical, pair, unix_now, Directory, Entry, RegisterOutcome, TokenBucket};
use bytes::Bytes;
use qpeer_wire::close_code;
use qpeer_wire::codec::CodecError;
use qpeer_wire::io::{describe_close, write_frame, FrameReader, StreamError};
use qpeer_wire::io::{read_relay_stream, write_relay_stream};
use qpeer_wire::relay_frame::RelayFrame;
use qpeer_wire::tracker::{
    ClientFrame, ErrorKind, PeerAddrs, ServerFrame, ALPN, MAX_CANDIDATES, MAX_FRAME_LEN, MAX_NAME_LEN,
    MAX_PEERS_PAGE, PROTOCOL_VERSION, RELAY_REQUEST_WINDOW_SECS,
};

/// Limits that keep one client from hurting the others. Defaults suit a public tracker.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most nodes registered at once.
    pub max_nodes: usize,
    /// Largest frame body accepted, in bytes (capped at [`MAX_FRAME_LEN`]).
    pub max_frame_len: usize,
    /// Introductions a node may request per second (sustained).
    pub introductions_per_sec: u32,
    /// Introductions a node may request in a burst.
    pub introduction_burst: u32,
    /// Most simultaneous connections from one source IP.
    pub max_connections_per_ip: usize,
    /// Time allowed from handshake to `Register`.
    pub register_timeout: Duration,
    /// Time allowed to finish a frame once its first byte arrived.
    pub partial_frame_timeout: Duration,
    /// A connection with no packets for this long is dropped (nodes send keep-alives).
    pub idle_timeout: Duration,
    /// Relay bytes per second one node may send (bursts up to a quarter second's worth).
    pub relay_bytes_per_sec: u32,
    /// Relay packets per second one node may send.
    pub relay_packets_per_sec: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_nodes: 100_000,
            max_frame_len: MAX_FRAME_LEN,
            introductions_per_sec: 10,
            introduction_burst: 20,
            max_connections_per_ip: 64,
            register_timeout: Duration::from_secs(10),
            partial_frame_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(45),
            relay_bytes_per_sec: 64 << 20,
            relay_packets_per_sec: 100_000,
        }
    }
}

/// Everything needed to start a tracker.
pub struct TrackerConfig {
    pub listen: SocketAddr,
    pub identity: Arc<Identity>,
    /// A CA-issued certificate chain and key to present instead of the self-signed identity one.
    pub certificate: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    pub limits: Limits,
    /// Print the `[STARTING]`/`[NEW CONNECTION]`/… console lines on stdout.
    pub console: bool,
}

impl TrackerConfig {
    pub fn new(listen: SocketAddr, identity: Arc<Identity>) -> Self {
        Self { listen, identity, certificate: None, limits: Limits::default(), console: false }
    }
}

/// Starting or running the tracker failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] qpeer_certs::TlsError),
    #[error("invalid transport setting: {0}")]
    Transport(String),
}

/// The console lines users and tests read.
#[derive(Debug, Clone, Copy)]
struct Console(bool);

impl Console {
    fn line(self, text: std::fmt::Arguments<'_>) {
        if self.0 {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
    }
}

struct Shared {
    directory: Mutex<Directory>,
    limits: Limits,
    console: Console,
    next_connection_id: AtomicU64,
    relayed_bytes: AtomicU64,
    relay_dropped: AtomicU64,
}

impl Shared {
    fn directory(&self) -> MutexGuard<'_, Directory> {
        // A panic while holding the lock cannot leave the directory half-updated in a way that
        // matters more than stopping the tracker, so take the data back.
        self.directory.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A bound tracker, ready to [`run`](Tracker::run).
pub struct Tracker {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    node_id: NodeId,
    ca_mode: bool,
}

/// The transport settings of the tracker: one control stream per node, small windows, so
/// that many idle nodes cost little memory.
fn transport_config(limits: &Limits) -> Result<quinn::TransportConfig, TrackerError> {
    let mut transport = quinn::TransportConfig::default();
    transport
        // One control stream, and one relay stream from the node.
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(1u32.into())
        // Windows allocate nothing until data arrives; they bound relay throughput per RTT.
        .stream_receive_window((1u32 << 20).into())
        .receive_window((2u32 << 20).into())
        .send_window(2 << 20)
        // Small control frames and a stream-based relay: no datagrams, no path MTU probing.
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0)
        .mtu_discovery_config(None)
        .max_idle_timeout(Some(
            limits
                .idle_timeout
                .try_into()
                .map_err(|e| TrackerError::Transport(format!("idle timeout: {e}")))?,
        ));
    Ok(transport)
}

/// Bytes of UDP receive buffer the tracker asks for. Registrations arrive in bursts from many
/// nodes at once; with the kernel's default (about 208 KiB) the buffer overflows and every
/// dropped handshake packet costs that node a retransmission timeout of 1 s, then 2 s.
pub const RECEIVE_BUFFER: usize = 8 << 20;

/// Asks for [`RECEIVE_BUFFER`] bytes of receive buffer; the kernel caps the request at
/// `net.core.rmem_max`, and what was granted is logged.
pub fn enlarge_receive_buffer(socket: &std::net::UdpSocket) {
    let socket = socket2::SockRef::from(socket);
    if let Err(e) = socket.set_recv_buffer_size(RECEIVE_BUFFER) {
        tracing::warn!("cannot enlarge the UDP receive buffer: {e}");
    }
    // Linux reports twice the usable size (it counts bookkeeping).
    let granted = socket.recv_buffer_size().unwrap_or(0);
    tracing::debug!(granted, wanted = RECEIVE_BUFFER, "UDP receive buffer");
}

/// Endpoint settings that survive a restart: the stateless-reset key and the key that
/// validates connection IDs both derive from the identity. A restarted process then
/// recognizes its predecessor's connection IDs and answers their packets with resets the
/// peers accept, so they notice at once that the old connection is gone.
pub fn endpoint_config(identity: &Identity) -> quinn::EndpointConfig {
    let secret = identity.derive_secret(b"qpeer stateless reset key");
    let mut config =
        quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret)));
    let cid_secret = identity.derive_secret(b"qpeer connection id key");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid_secret[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    // After a restart every node's next packet draws a reset; quinn's default of one per 20 ms
    // would make most of them wait for the idle timeout. A reset is smaller than the packet
    // that caused it, so a faster rate amplifies nothing.
    config.min_reset_interval(Duration::from_millis(1));
    config
}

impl Tracker {
    /// Binds the UDP socket and prepares TLS. Prints `[STARTING]` and `[LISTENING]` when the
    /// console is on.
    pub fn bind(config: TrackerConfig) -> Result<Self, TrackerError> {
        let console = Console(config.console);
        console.line(format_args!("[STARTING] tracker server is starting..."));
        let ca_mode = config.certificate.is_some();
        let mut server_config = match config.certificate {
            Some((chain, key)) => qpeer_certs::config::server_config_with_cert(chain, key, &[ALPN])?,
            None => qpeer_certs::server_config(&config.identity, &[ALPN])?,
        };
        server_config.transport_config(Arc::new(transport_config(&config.limits)?));
        let socket = std::net::UdpSocket::bind(config.listen)
            .map_err(|source| TrackerError::Bind { addr: config.listen, source })?;
        enlarge_receive_buffer(&socket);
        let endpoint = quinn::Endpoint::new(
            endpoint_config(&config.identity),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| TrackerError::Bind { addr: config.listen, source })?;
        let tracker = Self {
            endpoint,
            node_id: config.identity.node_id(),
            ca_mode,
            shared: Arc::new(Shared {
                directory: Mutex::new(Directory::default()),
                limits: config.limits,
                console,
                next_connection_id: AtomicU64::new(1),
                relayed_bytes: AtomicU64::new(0),
                relay_dropped: AtomicU64::new(0),
            }),
        };
        let addr = tracker.local_addr();
        console.line(format_args!("[LISTENING] Server is listening on {addr}"));
        console.line(format_args!("[TRACKER] {}", tracker.tracker_string()));
        if addr.ip().is_unspecified() && !tracker.ca_mode {
            console.line(format_args!(
                "[HINT] listening on every address: nodes use {}@<this machine's public IP>:{}",
                tracker.node_id,
                addr.port()
            ));
        }
        Ok(tracker)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// What a node passes as `--tracker`: `ID@IP:PORT`, or `IP:PORT` in CA mode.
    pub fn tracker_string(&self) -> String {
        let addr = self.local_addr();
        if self.ca_mode {
            addr.to_string()
        } else {
            format!("{}@{addr}", self.node_id)
        }
    }

    /// Number of registered nodes.
    pub fn registered(&self) -> usize {
        self.shared.directory().len()
    }

    /// A handle that reports the number of registered nodes while the tracker runs.
    pub fn stats(&self) -> TrackerStats {
        TrackerStats(self.shared.clone())
    }

    /// Serves until `shutdown` resolves, then closes every connection with
    /// [`close_code::SHUTDOWN`] and waits (bounded) for the endpoint to go idle.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let shared = self.shared.clone();
                    let cancel = cancel.child_token();
                    let writers = tasks.clone();
                    tasks.spawn(async move {
                        handle_incoming(shared, incoming, cancel, writers).await;
                    });
                }
            }
        }
        tracing::info!("tracker shutting down");
        cancel.cancel();
        self.endpoint.close(close_code::SHUTDOWN.into(), b"tracker shutting down");
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            tasks.wait().await;
            self.endpoint.wait_idle().await;
        })
        .await;
    }
}

/// Binds a tracker for `config` and serves until `shutdown` resolves.
pub async fn run(config: TrackerConfig, shutdown: impl Future<Output = ()>) -> Result<(), TrackerError> {
    Tracker::bind(config)?.run(shutdown).await;
    Ok(())
}

/// Read-only view of a running tracker's directory size.
#[derive(Clone)]
pub struct TrackerStats(Arc<Shared>);

impl TrackerStats {
    pub fn registered(&self) -> usize {
        self.0.directory().len()
    }

    /// Relay bytes forwarded so far.
    pub fn relayed_bytes(&self) -> u64 {
        self.0.relayed_bytes.load(Ordering::Relaxed)
    }

    /// Relay packets dropped so far (unknown link, not a member, over a limit, queue full).
    pub fn relay_dropped(&self) -> u64 {
        self.0.relay_dropped.load(Ordering::Relaxed)
    }

    /// Open relay links.
    pub fn relay_links(&self) -> usize {
        self.0.directory().links.len()
    }
}

fn close(conn: &quinn::Connection, code: u32, reason: &str) {
    conn.close(code.into(), reason.as_bytes());
}

/// Counts the connection against its source IP for as long as it lives.
struct IpSlot {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.shared.directory().close_connection(self.ip);
    }
}

async fn handle_incoming(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let remote = canonical(incoming.remote_address());
    let slot = {
        let mut directory = shared.directory();
        directory
            .open_connection(remote.ip(), shared.limits.max_connections_per_ip)
            .then(|| IpSlot { shared: shared.clone(), ip: remote.ip() })
    };
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
    let Some(_slot) = slot else {
        tracing::warn!(%remote, "refusing connection: too many from this address");
        close(&conn, close_code::TOO_MANY_CONNECTIONS, "too many connections from your address");
        return;
    };
    let node_id = match peer_node_id(&conn) {
        Ok(id) => id,
        Err(e) => {
            close(&conn, close_code::PROTOCOL_VIOLATION, &e.to_string());
            return;
        }
    };
    let session = Session {
        shared: shared.clone(),
        conn: conn.clone(),
        node_id,
        remote,
        connection_id: shared.next_connection_id.fetch_add(1, Ordering::Relaxed),
        tasks: tasks.clone(),
    };
    session.run(cancel, tasks).await;
}

/// One node's connection, from `Register` to close.
struct Session {
    shared: Arc<Shared>,
    conn: quinn::Connection,
    node_id: NodeId,
    remote: SocketAddr,
    connection_id: u64,
    tasks: TaskTracker,
}

/// A protocol failure that ends the session with a close code.
struct Fatal {
    code: u32,
    reason: String,
}

impl Fatal {
    fn new(code: u32, reason: impl Into<String>) -> Self {
        Self { code, reason: reason.into() }
    }
}

impl From<StreamError> for Fatal {
    fn from(err: StreamError) -> Self {
        let code = match &err {
            StreamError::Codec(CodecError::TooLarge { .. }) => close_code::FRAME_TOO_LARGE,
            StreamError::PartialTimeout(_) => close_code::TIMEOUT,
            _ => close_code::PROTOCOL_VIOLATION,
        };
        Fatal::new(code, err.to_string())
    }
}

impl Session {
    async fn run(self, cancel: CancellationToken, tasks: TaskTracker) {
        let limits = self.shared.limits.clone();
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = tokio::time::timeout(limits.register_timeout, self.conn.accept_bi()) => accepted,
        };
        let (send, recv) = match accepted {
            Ok(Ok(streams)) => streams,
            Ok(Err(_)) => return,
            Err(_) => {
                close(&self.conn, close_code::TIMEOUT, "no control stream opened in time");
                return;
            }
        };
        let mut reader = FrameReader::new(recv, limits.max_frame_len, limits.partial_frame_timeout);
        let (outbox, outbox_rx) = mpsc::channel::<Box<ServerFrame>>(16);
        // Our own frames obey the protocol's maximum; --max-frame-len limits what we accept.
        tasks.spawn(write_outbox(self.conn.clone(), send, outbox_rx, MAX_FRAME_LEN));

        let registered = match self.register(&mut reader, &outbox, &cancel).await {
            Ok(registered) => registered,
            Err(fatal) => {
                close(&self.conn, fatal.code, &fatal.reason);
                return;
            }
        };
        if !registered {
            return;
        }
        let console = self.shared.console;
        let active = self.shared.directory().len();
        // One write for both lines: at thousands of registrations a second it shows.
        console.line(format_args!(
            "[NEW CONNECTION] {} connected. node {}\n[ACTIVE CONNECTIONS] {active}",
            self.remote,
            self.node_id.short()
        ));
        // The relay stream is served inside this task (no task per idle node for it).
        let relay = async {
            Session::relay_in(self.shared.clone(), self.conn.clone(), self.node_id).await;
            std::future::pending::<()>().await
        };
        let migrations = async {
            self.follow_migrations(&outbox).await;
            std::future::pending::<()>().await
        };
        let outcome = tokio::select! {
            _ = cancel.cancelled() => Err(Fatal::new(close_code::SHUTDOWN, "tracker shutting down")),
            outcome = self.serve(&mut reader, &outbox) => outcome,
            _ = relay => Ok(()),
            _ = migrations => Ok(()),
            _ = self.conn.closed() => Ok(()),
        };
        if let Err(fatal) = outcome {
            tracing::debug!(node = %self.node_id.short(), "closing: {}", fatal.reason);
            close(&self.conn, fatal.code, &fatal.reason);
        }
        let removed = self.shared.directory().remove(&self.node_id, self.connection_id);
        for (id, link) in removed.iter().flatten() {
            console.line(format_args!(
                "[RELAY] {} <-> {} closed (link {id}, {} + {} bytes relayed)",
                link.a.short(),
                link.b.short(),
                link.bytes_ab,
                link.bytes_ba
            ));
        }
        let removed = removed.is_some();
        let active = self.shared.directory().len();
        console.line(format_args!(
            "[DISCONNECTED] {} node {} ({})",
            self.remote,
            self.node_id.short(),
            self.conn.close_reason().map_or_else(|| "closed".into(), |reason| describe_close(&reason))
        ));
        if removed {
            console.line(format_args!("[ACTIVE CONNECTIONS] {active}"));
        }
    }

    /// Waits for `Register`, enters the node in the directory and answers `Registered`.
    /// Ok(false): the session ended without registering (already closed).
    async fn register(
        &self,
        reader: &mut FrameReader<quinn::RecvStream>,
        outbox: &mpsc::Sender<Box<ServerFrame>>,
        cancel: &CancellationToken,
    ) -> Result<bool, Fatal> {
        let limits = &self.shared.limits;
        let first = tokio::select! {
            _ = cancel.cancelled() => return Ok(false),
            first = tokio::time::timeout(limits.register_timeout, reader.next::<ClientFrame>()) => first,
        };
        let frame = match first {
            Err(_) => return Err(Fatal::new(close_code::TIMEOUT, "no Register frame in time")),
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => return Ok(false),
            Ok(Err(StreamError::Read(_))) => return Ok(false),
            Ok(Err(e)) => return Err(e.into()),
        };
        let ClientFrame::Register { version, candidates, name, incarnation } = frame else {
            return Err(Fatal::new(close_code::PROTOCOL_VIOLATION, "the first frame must be Register"));
        };
        if version != PROTOCOL_VERSION {
            return Err(Fatal::new(
                close_code::UNSUPPORTED_VERSION,
                format!(
                    "protocol version {version} is not supported; this tracker speaks {PROTOCOL_VERSION}"
                ),
            ));
        }
        if candidates.len() > MAX_CANDIDATES {
            return Err(Fatal::new(
                close_code::PROTOCOL_VIOLATION,
                format!("{} candidates; at most {MAX_CANDIDATES}", candidates.len()),
            ));
        }
        if name.as_ref().is_some_and(|n| n.len() > MAX_NAME_LEN || n.chars().any(char::is_control)) {
            return Err(Fatal::new(
                close_code::PROTOCOL_VIOLATION,
                format!("name must be at most {MAX_NAME_LEN} bytes without control characters"),
            ));
        }
        let observed = canonical(self.conn.remote_address());
        // Only addresses a peer could legitimately reach us at: our public address itself, or
        // local-network ones. Anything else would let a node aim other nodes' punch packets
        // and handshakes at a third party.
        let candidates = plausible_candidates(candidates, observed);
        let entry = Entry {
            connection_id: self.connection_id,
            connection: self.conn.clone(),
            addrs: PeerAddrs { observed, candidates },
            incarnation,
            name,
            registered_at: unix_now(),
            outbox: outbox.clone(),
            introductions: TokenBucket::new(
                limits.introductions_per_sec,
                limits.introduction_burst,
                Instant::now(),
            ),
            relay_out: None,
            relay_bytes: TokenBucket::new(
                limits.relay_bytes_per_sec,
                (limits.relay_bytes_per_sec / 4).max(64 * 1024),
                Instant::now(),
            ),
            relay_packets: TokenBucket::new(
                limits.relay_packets_per_sec,
                (limits.relay_packets_per_sec / 4).max(64),
                Instant::now(),
            ),
        };
        let outcome = self.shared.directory().register(self.node_id, entry, limits.max_nodes);
        match outcome {
            RegisterOutcome::Registered => {}
            RegisterOutcome::Replaced(old) => {
                tracing::info!(node = %self.node_id.short(), "registration replaced an older connection");
                close(
                    &old.connection,
                    close_code::REPLACED,
                    &format!("this NodeId registered again from {observed}"),
                );
            }
            RegisterOutcome::Full => {
                return Err(Fatal::new(
                    close_code::TRACKER_FULL,
                    format!("tracker full ({} nodes)", limits.max_nodes),
                ))
            }
        }
        let _ = outbox.send(Box::new(ServerFrame::Registered { version: PROTOCOL_VERSION, observed })).await;
        Ok(true)
    }

    /// Answers requests until the node finishes its stream or breaks the protocol.
    async fn serve(
        &self,
        reader: &mut FrameReader<quinn::RecvStream>,
        outbox: &mpsc::Sender<Box<ServerFrame>>,
    ) -> Result<(), Fatal> {
        loop {
            let frame = match reader.next::<ClientFrame>().await {
                Ok(Some(frame)) => frame,
                Ok(None) | Err(StreamError::Read(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let reply = match frame {
                ClientFrame::Register { .. } => {
                    return Err(Fatal::new(close_code::PROTOCOL_VIOLATION, "Register sent twice"))
                }
                ClientFrame::ListPeers { request_id, after, limit } => {
                    let limit = usize::from(limit.clamp(1, MAX_PEERS_PAGE));
                    let (peers, next) = self.shared.directory().page(after, limit);
                    ServerFrame::Peers { request_id, peers, next }
                }
                ClientFrame::Introduce { request_id, target } => self.introduce(request_id, target),
                ClientFrame::RelayRequest { request_id, peer } => self.relay_request(request_id, peer),
                ClientFrame::Candidates { candidates } => {
                    self.update_candidates(candidates)?;
                    continue;
                }
            };
            if outbox.send(Box::new(reply)).await.is_err() {
                return Ok(());
            }
        }
    }

    /// Replaces the node's candidates (it moved to another network).
    fn update_candidates(&self, candidates: Vec<SocketAddr>) -> Result<(), Fatal> {
        if candidates.len() > MAX_CANDIDATES {
            return Err(Fatal::new(
                close_code::PROTOCOL_VIOLATION,
                format!("{} candidates; at most {MAX_CANDIDATES}", candidates.len()),
            ));
        }
        let mut directory = self.shared.directory();
        if let Some(entry) = directory.get_mut(&self.node_id) {
            if entry.connection_id == self.connection_id {
                let observed = entry.addrs.observed;
                entry.addrs.candidates = plausible_candidates(candidates, observed);
            }
        }
        Ok(())
    }

    /// Follows the node's connection when it migrates (its NAT rebound, or it moved): the
    /// directory and the node learn the new address. quinn has no event for a migration, so
    /// the connection's remote address is checked every [`MIGRATION_CHECK`].
    async fn follow_migrations(&self, outbox: &mpsc::Sender<Box<ServerFrame>>) {
        let mut known = self.remote;
        loop {
            tokio::time::sleep(MIGRATION_CHECK).await;
            let now = canonical(self.conn.remote_address());
            if now == known {
                continue;
            }
            let updated = {
                let mut directory = self.shared.directory();
                match directory.get_mut(&self.node_id) {
                    Some(entry) if entry.connection_id == self.connection_id => {
                        entry.addrs.observed = now;
                        let candidates = std::mem::take(&mut entry.addrs.candidates);
                        entry.addrs.candidates = plausible_candidates(candidates, now);
                        true
                    }
                    _ => false,
                }
            };
            if !updated {
                return;
            }
            self.shared
                .console
                .line(format_args!("[MIGRATED] node {} now at {now} (was {known})", self.node_id.short()));
            if outbox.send(Box::new(ServerFrame::Observed { observed: now })).await.is_err() {
                return;
            }
            known = now;
        }
    }

    /// Sends both introductions under one lock, so both nodes learn of each other at once.
    /// Returns the reply for the requester.
    fn introduce(&self, request_id: u64, target: NodeId) -> ServerFrame {
        let error =
            |kind, message: &str| ServerFrame::Error { request_id, kind, message: message.to_string() };
        if target == self.node_id {
            return error(ErrorKind::InvalidRequest, "a node cannot be introduced to itself");
        }
        let mut directory = self.shared.directory();
        let Some(me) = directory.get_mut(&self.node_id) else {
            return error(ErrorKind::InvalidRequest, "not registered");
        };
        if !me.introductions.try_take(Instant::now()) {
            return error(ErrorKind::RateLimited, "too many introduction requests; slow down");
        }
        let (my_addrs, my_incarnation) = (me.addrs.clone(), me.incarnation);
        let Some(peer) = directory.get(&target) else {
            return ServerFrame::NotFound { request_id, target };
        };
        let to_target = ServerFrame::Introduction {
            request_id: None,
            peer: self.node_id,
            addrs: my_addrs,
            incarnation: my_incarnation,
        };
        if peer.outbox.try_send(Box::new(to_target)).is_err() {
            return error(ErrorKind::Busy, "the target's queue is full; retry shortly");
        }
        tracing::debug!(from = %self.node_id.short(), to = %target.short(), "introduction");
        let reply = ServerFrame::Introduction {
            request_id: Some(request_id),
            peer: target,
            addrs: peer.addrs.clone(),
            incarnation: peer.incarnation,
        };
        directory.introduced.insert(pair(self.node_id, target), Instant::now());
        reply
    }

    /// Notes that we want a relay to `peer`; when `peer` wants one too, opens the link and
    /// tells both.
    fn relay_request(&self, request_id: u64, peer: NodeId) -> ServerFrame {
        let error = |kind, message: String| ServerFrame::Error { request_id, kind, message };
        let now = Instant::now();
        let window = Duration::from_secs(RELAY_REQUEST_WINDOW_SECS);
        let mut directory = self.shared.directory();
        directory.expire(now, window);
        if !directory.introduced.contains_key(&pair(self.node_id, peer)) {
            return error(ErrorKind::NotIntroduced, format!("no recent introduction to {}", peer.short()));
        }
        if directory.get(&peer).is_none() {
            return ServerFrame::NotFound { request_id, target: peer };
        }
        directory.relay_requests.insert((self.node_id, peer), now);
        if directory.relay_requests.contains_key(&(peer, self.node_id)) {
            let (link, opened) = directory.open_link(self.node_id, peer);
            for (end, other) in [(self.node_id, peer), (peer, self.node_id)] {
                if let Some(entry) = directory.get_mut(&end) {
                    if entry.relay_out.as_ref().is_none_or(|out| out.is_closed()) {
                        let (tx, rx) = mpsc::channel(RELAY_QUEUE);
                        entry.relay_out = Some(tx);
                        self.tasks.spawn(write_relay(entry.connection.clone(), rx));
                    }
                    let _ = entry.outbox.try_send(Box::new(ServerFrame::RelayReady { peer: other, link }));
                }
            }
            if opened {
                self.shared.console.line(format_args!(
                    "[RELAY] {} <-> {} opened (link {link})",
                    self.node_id.short(),
                    peer.short()
                ));
            }
        }
        ServerFrame::RelayAccepted { request_id }
    }

    /// Reads this node's relay stream and forwards each packet to the other end of its link.
    async fn relay_in(shared: Arc<Shared>, conn: quinn::Connection, node_id: NodeId) {
        read_relay_stream(&conn, |decoder| {
            let now = Instant::now();
            let mut directory = shared.directory();
            while let Some(frame) = decoder.next_frame() {
                match forward(&mut directory, node_id, frame, now) {
                    Some(bytes) => {
                        shared.relayed_bytes.fetch_add(bytes, Ordering::Relaxed);
                    }
                    None => {
                        shared.relay_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
        .await;
    }
}

/// Time allowed for a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames queued per node's relay stream; past this, packets are dropped (as UDP would).
const RELAY_QUEUE: usize = 1024;

/// Forwards one relay packet from `from` on `link_id`. Returns the bytes forwarded, or `None`
/// when it was dropped: unknown link, `from` not an end of it, over `from`'s limits, or the
/// other end's queue is full.
fn forward(directory: &mut Directory, from: NodeId, frame: RelayFrame, now: Instant) -> Option<u64> {
    let link_id = frame.link();
    let to = directory.links.get(&link_id)?.other(&from)?;
    let bytes = frame.packet().len() as u64;
    let sender = directory.get_mut(&from)?;
    if !sender.relay_packets.try_take(now) || !sender.relay_bytes.try_take_n(bytes, now) {
        return None;
    }
    let out = directory.get(&to)?.relay_out.as_ref()?;
    // Both ends know the link by the same id: the frame goes on unchanged.
    out.try_send(frame.into_bytes()).ok()?;
    if let Some(link) = directory.links.get_mut(&link_id) {
        if from == link.a {
            link.bytes_ab += bytes;
        } else {
            link.bytes_ba += bytes;
        }
    }
    Some(bytes)
}

/// Writes relay frames to a node on a uni stream the tracker opens.
async fn write_relay(conn: quinn::Connection, mut queue: mpsc::Receiver<Bytes>) {
    write_relay_stream(&conn, &mut queue).await;
}

/// The candidates worth passing to peers, canonical.
fn plausible_candidates(candidates: Vec<SocketAddr>, observed: SocketAddr) -> Vec<SocketAddr> {
    candidates.into_iter().map(canonical).filter(|c| plausible_candidate(*c, observed)).collect()
}

/// How often a session checks whether its connection migrated.
const MIGRATION_CHECK: Duration = Duration::from_secs(1);

/// True for a candidate address worth passing to peers: the observed IP, or a private,
/// carrier-NAT, loopback, link-local or unique-local address, with a real port.
pub fn plausible_candidate(candidate: SocketAddr, observed: SocketAddr) -> bool {
    use std::net::IpAddr;
    if candidate.port() == 0 {
        return false;
    }
    match candidate.ip() {
        ip if ip == observed.ip() => true,
        IpAddr::V4(v4) => {
            let carrier_nat = v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64;
            v4.is_private() || v4.is_loopback() || v4.is_link_local() || carrier_nat
        }
        IpAddr::V6(v6) => {
            let unique_local = (v6.segments()[0] & 0xfe00) == 0xfc00;
            let link_local = (v6.segments()[0] & 0xffc0) == 0xfe80;
            v6.is_loopback() || unique_local || link_local
        }
    }
}

/// Writes queued frames to the node's control stream until the queue closes or writing fails.
async fn write_outbox(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut outbox: mpsc::Receiver<Box<ServerFrame>>,
    max_frame_len: usize,
) {
    while let Some(frame) = outbox.recv().await {
        if let Err(e) = write_frame(&mut send, &frame, max_frame_len).await {
            tracing::debug!("control stream write failed: {e}");
            close(&conn, close_code::PROTOCOL_VIOLATION, "control stream write failed");
            return;
        }
    }
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::plausible_candidate;

    #[test]
    fn only_local_or_own_public_candidates_pass() {
        let observed = "198.51.100.7:4000".parse().expect("addr");
        for ok in [
            "10.1.1.2:4000",
            "192.168.0.9:1",
            "172.16.3.3:9",
            "100.64.1.2:5",
            "127.0.0.1:7",
            "198.51.100.7:4001",
            "[fd00::1]:3",
            "[fe80::1]:3",
        ] {
            assert!(plausible_candidate(ok.parse().expect("addr"), observed), "{ok}");
        }
        for bad in ["203.0.113.9:4000", "8.8.8.8:53", "10.0.0.1:0", "[2001:db8::1]:3", "100.128.0.1:5"] {
            assert!(!plausible_candidate(bad.parse().expect("addr"), observed), "{bad}");
        }
    }
}
