//! The tracker server: [`Tracker::bind`] then [`Tracker::run`] until a shutdown future
//! resolves. The accept loop refuses an address over its connection limit before any TLS
//! work, and hands every other connection to its own session task.
//!
//! A tracker may listen on several addresses (one quinn endpoint each, the same identity
//! on each): their sessions share one registry, relay and set of limits, so a node may
//! register at any of them, and observe from another how its NAT maps it.

use std::future::Future;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use qpeer_certs::{Identity, NodeId};
use qpeer_wire::canonical;
use qpeer_wire::close_code;
use qpeer_wire::tracker::ALPN;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dht::{DhtConfig, DhtError, TrackerDht};
use crate::events::{EventSink, ServerEvent, ServerEvents};
use crate::limits::{Admission, ConnectionCounter, Limits};
use crate::sessions::{serve_incoming, SessionContext};

/// Everything needed to start a tracker.
pub struct TrackerConfig {
    pub listen: SocketAddr,
    /// More addresses to listen on besides `listen`, with the same identity and state.
    pub extra_listen: Vec<SocketAddr>,
    pub identity: Arc<Identity>,
    /// A CA-issued certificate chain and key to present instead of the self-signed identity one.
    pub certificate: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    pub limits: Limits,
    /// Keep the console's events ([`ServerEvent`]: `[STARTING]`, `[NEW CONNECTION]`, …) from
    /// `bind` on, for [`Tracker::events`]. Off, none are kept. Nothing is printed either way.
    pub console: bool,
    /// Run a Mainline DHT node, to publish and resolve home records for the nodes. `None`:
    /// the tracker serves its own nodes only and answers those requests `NoDht`.
    pub dht: Option<DhtConfig>,
}

impl TrackerConfig {
    pub fn new(listen: SocketAddr, identity: Arc<Identity>) -> Self {
        Self {
            listen,
            extra_listen: Vec::new(),
            identity,
            certificate: None,
            limits: Limits::default(),
            console: false,
            dht: None,
        }
    }
}

/// Starting the tracker failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] qpeer_certs::TlsError),
    #[error(transparent)]
    Dht(#[from] DhtError),
    #[error("invalid idle timeout: {0}")]
    IdleTimeout(#[from] quinn::VarIntBoundsExceeded),
}

/// A bound tracker, ready to [`run`](Tracker::run).
pub struct Tracker {
    /// One per listen address, `listen` first.
    endpoints: Vec<quinn::Endpoint>,
    ctx: Arc<SessionContext>,
    connections: Arc<ConnectionCounter>,
    node_id: NodeId,
    ca_mode: bool,
    events: Option<ServerEvents>,
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
        .max_idle_timeout(Some(limits.idle_timeout.try_into()?));
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

impl Tracker {
    /// Binds the UDP socket and prepares TLS. Reports `Starting`, `Listening` and `Reachable`
    /// (see [`TrackerConfig::console`]).
    pub fn bind(config: TrackerConfig) -> Result<Self, TrackerError> {
        let (sink, events) = if config.console {
            let (sink, events) = EventSink::channel();
            (sink, Some(events))
        } else {
            (EventSink::default(), None)
        };
        sink.emit(ServerEvent::Starting);
        let ca_mode = config.certificate.is_some();
        let mut server_config = match config.certificate {
            Some((chain, key)) => qpeer_certs::config::server_config_with_cert(chain, key, &[ALPN])?,
            None => qpeer_certs::server_config(&config.identity, &[ALPN])?,
        };
        server_config.transport_config(Arc::new(transport_config(&config.limits)?));
        let mut endpoints = Vec::new();
        for addr in std::iter::once(config.listen).chain(config.extra_listen.iter().copied()) {
            endpoints.push(bind_endpoint(addr, &config.identity, &server_config)?);
        }
        let listen_addrs: Vec<SocketAddr> = endpoints.iter().filter_map(|e| e.local_addr().ok()).collect();
        let (dht, dht_started) = match &config.dht {
            Some(dht_config) => {
                let (dht, started) = TrackerDht::start(dht_config)?;
                (Some(dht), Some(started))
            }
            None => (None, None),
        };
        let node_id = config.identity.node_id();
        let mut ctx = SessionContext::new(config.limits, sink.clone(), listen_addrs.clone(), node_id);
        ctx.dht = dht;
        let tracker = Self {
            endpoints,
            node_id,
            ca_mode,
            connections: ConnectionCounter::new(ctx.limits.max_connections_per_ip),
            ctx: Arc::new(ctx),
            events,
        };
        for addr in listen_addrs {
            sink.emit(ServerEvent::Listening { addr });
            sink.emit(ServerEvent::Reachable { tracker: tracker.tracker_string_for(addr) });
            if addr.ip().is_unspecified() && !tracker.ca_mode {
                sink.emit(ServerEvent::ListeningEverywhere { node_id: tracker.node_id, port: addr.port() });
            }
        }
        if let Some(started) = dht_started {
            sink.emit(started);
        }
        Ok(tracker)
    }

    /// The tracker's events from `bind` on, in order, once: `None` when
    /// [`TrackerConfig::console`] was off, or when taken before. They queue until read, so
    /// whoever turns the console on reads them.
    pub fn events(&mut self) -> Option<ServerEvents> {
        self.events.take()
    }

    /// The first listen address (`TrackerConfig::listen`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addrs().first().copied().unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Every listen address, `TrackerConfig::listen` first.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.ctx.listen_addrs.clone()
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Where the tracker's DHT node listens (other trackers bootstrap from it), when it runs
    /// one ([`TrackerConfig::dht`]).
    pub fn dht_addr(&self) -> Option<SocketAddrV4> {
        self.ctx.dht.as_ref().map(|dht| dht.addr)
    }

    /// What a node passes as `--tracker`: `ID@IP:PORT`, or `IP:PORT` in CA mode.
    pub fn tracker_string(&self) -> String {
        self.tracker_string_for(self.local_addr())
    }

    /// [`Tracker::tracker_string`] for one listen address.
    fn tracker_string_for(&self, addr: SocketAddr) -> String {
        if self.ca_mode {
            addr.to_string()
        } else {
            format!("{}@{addr}", self.node_id)
        }
    }

    /// Number of registered nodes.
    pub fn registered(&self) -> usize {
        self.ctx.registry.len()
    }

    /// A handle that reports the number of registered nodes while the tracker runs.
    pub fn stats(&self) -> TrackerStats {
        TrackerStats(self.ctx.clone())
    }

    /// Serves until `shutdown` resolves, then closes every connection with
    /// [`close_code::SHUTDOWN`] and waits (bounded) for the endpoint to go idle.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        // Events nobody took before now never will be: stop keeping them.
        drop(self.events.take());
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        for endpoint in &self.endpoints {
            let acceptor = Acceptor {
                endpoint: endpoint.clone(),
                local: endpoint.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
                ctx: self.ctx.clone(),
                connections: self.connections.clone(),
            };
            tasks.spawn(acceptor.run(cancel.clone(), tasks.clone()));
        }
        shutdown.await;
        tracing::info!("tracker shutting down");
        cancel.cancel();
        for endpoint in &self.endpoints {
            endpoint.close(close_code::SHUTDOWN.into(), b"tracker shutting down");
        }
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            tasks.wait().await;
            for endpoint in &self.endpoints {
                endpoint.wait_idle().await;
            }
        })
        .await;
        // Its UDP socket closes with it (a stats handle may keep the rest alive).
        if let Some(dht) = &self.ctx.dht {
            dht.stop();
        }
    }
}

/// Binds one listen address: its UDP socket and quinn endpoint.
fn bind_endpoint(
    addr: SocketAddr,
    identity: &Identity,
    server_config: &quinn::ServerConfig,
) -> Result<quinn::Endpoint, TrackerError> {
    let socket = std::net::UdpSocket::bind(addr).map_err(|source| TrackerError::Bind { addr, source })?;
    enlarge_receive_buffer(&socket);
    quinn::Endpoint::new(
        qpeer_certs::endpoint_config(identity),
        Some(server_config.clone()),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TrackerError::Bind { addr, source })
}

/// The accept loop of one endpoint; every endpoint's sessions share `ctx` and the
/// per-address counts.
struct Acceptor {
    endpoint: quinn::Endpoint,
    local: SocketAddr,
    ctx: Arc<SessionContext>,
    connections: Arc<ConnectionCounter>,
}

impl Acceptor {
    async fn run(self, cancel: CancellationToken, tasks: TaskTracker) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { return };
                    self.admit(incoming, &cancel, &tasks);
                }
            }
        }
    }

    /// Starts a session for `incoming`, asks it to prove its address first, or refuses it
    /// before the handshake when its proven address already has its limit of connections:
    /// an address over its limit costs no TLS work (see [`ConnectionCounter`]).
    fn admit(&self, incoming: quinn::Incoming, cancel: &CancellationToken, tasks: &TaskTracker) {
        let remote = canonical(incoming.remote_address());
        match self.connections.admit(remote.ip(), incoming.remote_address_validated()) {
            Admission::Admit(slot) => {
                tasks.spawn(serve_incoming(
                    self.ctx.clone(),
                    self.local,
                    incoming,
                    slot,
                    cancel.child_token(),
                    tasks.clone(),
                ));
            }
            Admission::Retry if incoming.may_retry() => {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
            }
            Admission::Retry | Admission::Refuse => {
                tracing::warn!(%remote, "refusing connection: too many from this address");
                incoming.refuse();
            }
        }
    }
}

/// Binds a tracker for `config` and serves until `shutdown` resolves.
pub async fn run(config: TrackerConfig, shutdown: impl Future<Output = ()>) -> Result<(), TrackerError> {
    Tracker::bind(config)?.run(shutdown).await;
    Ok(())
}

/// Read-only view of a running tracker's counters.
#[derive(Clone)]
pub struct TrackerStats(Arc<SessionContext>);

impl TrackerStats {
    pub fn registered(&self) -> usize {
        self.0.registry.len()
    }

    /// Relay bytes forwarded so far.
    pub fn relayed_bytes(&self) -> u64 {
        self.0.relay.relayed_bytes()
    }

    /// Relay packets dropped so far (unknown link, not a member, over a limit, queue full).
    pub fn relay_dropped(&self) -> u64 {
        self.0.relay.dropped()
    }

    /// Open relay links.
    pub fn relay_links(&self) -> usize {
        self.0.relay.links()
    }
}
