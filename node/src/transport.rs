//! QUIC settings of the node's one endpoint and of its peer connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use qpeer_certs::{Identity, NodeId, ServerTrust};
use qpeer_wire::peer::ALPN;

use crate::error::NodeError;

/// Size of the QUIC packets of a connection through the relay. The relay carries packets on
/// a stream, so their size is not bound by any link's MTU: large packets mean fewer to
/// encrypt, frame and forward per byte, which is what limits relayed throughput.
pub const RELAY_MTU: u16 = 16 * 1024;

/// The congestion controller of peer connections.
///
/// `Rate` (`congestion::RateController`) is the default: on the emulated long, lossy links
/// of `qpeer-bench wan` it keeps the link full where Cubic, which reads every loss as
/// congestion, falls to a fraction of it, and it starts faster than quinn's BBR, which
/// spends its first round trips in a PROBE_RTT (docs/PERFORMANCE.md, "Long and lossy links").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Congestion {
    /// qpeer's delivery-rate model (`congestion::RateController`).
    #[default]
    Rate,
    /// quinn's BBR.
    Bbr,
    Cubic,
}

impl Congestion {
    pub const NAMES: [&'static str; 3] = ["rate", "bbr", "cubic"];

    pub fn name(self) -> &'static str {
        match self {
            Congestion::Rate => "rate",
            Congestion::Bbr => "bbr",
            Congestion::Cubic => "cubic",
        }
    }

    fn factory(
        self,
        initial_window: Option<u64>,
    ) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        match self {
            Congestion::Rate => {
                let mut config = crate::congestion::RateControllerConfig::default();
                if let Some(window) = initial_window {
                    config.initial_window(window);
                }
                Arc::new(config)
            }
            Congestion::Bbr => {
                let mut config = quinn::congestion::BbrConfig::default();
                if let Some(window) = initial_window {
                    config.initial_window(window);
                }
                Arc::new(config)
            }
            Congestion::Cubic => {
                let mut config = quinn::congestion::CubicConfig::default();
                if let Some(window) = initial_window {
                    config.initial_window(window);
                }
                Arc::new(config)
            }
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown congestion controller name.
#[derive(Debug, thiserror::Error)]
#[error("unknown congestion controller {0:?} (known: rate, bbr, cubic)")]
pub struct UnknownCongestion(String);

impl std::str::FromStr for Congestion {
    type Err = UnknownCongestion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rate" => Ok(Congestion::Rate),
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            _ => Err(UnknownCongestion(s.to_string())),
        }
    }
}

/// Bytes in flight a peer connection is sized for: 1 Gbit/s × 100 ms.
pub const SIZED_FOR_BYTES_IN_FLIGHT: u64 = 12_500_000;
const _: () = assert!(STREAM_WINDOW as u64 > SIZED_FOR_BYTES_IN_FLIGHT);

/// Receive window of one stream (one file): above [`SIZED_FOR_BYTES_IN_FLIGHT`], so a single
/// file fills such a path, with room for the congestion window to overshoot.
pub const STREAM_WINDOW: u32 = 32 << 20;
/// Largest receive window of a whole connection, across its streams: the most unread data a
/// peer can make us buffer. A connection starts at `window::MIN_CONNECTION_WINDOW` and is
/// tuned up to this as its path needs (`window`).
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// The most data quinn holds for a connection (unsent or unacknowledged) before a write
/// waits.
pub const SEND_WINDOW: u64 = 32 << 20;
/// Streams a peer may have open toward us at once: a transfer's large files (4 at once),
/// its inline batches (1024 small files in flight are at most 64 batches: a batch holds up
/// to 256 files or 1 MiB) and control streams fit well within it.
pub const MAX_BIDI_STREAMS: u32 = 256;

/// Transport settings of peer connections: keep-alives hold NAT mappings open; a lower
/// initial RTT retransmits Initials dropped by a not-yet-opened NAT sooner; windows sized
/// for [`SIZED_FOR_BYTES_IN_FLIGHT`] (quinn's defaults, 1.25 MB per stream, carry a single
/// file at 12.5 MB/s at 100 ms whatever the link).
pub fn peer_transport(congestion: Congestion) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .initial_rtt(Duration::from_millis(100))
        .max_concurrent_uni_streams(4u32.into())
        .max_concurrent_bidi_streams(MAX_BIDI_STREAMS.into())
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(crate::window::MIN_CONNECTION_WINDOW.into())
        .send_window(SEND_WINDOW)
        .congestion_controller_factory(congestion.factory(None));
    if let Ok(idle) = Duration::from_secs(30).try_into() {
        transport.max_idle_timeout(Some(idle));
    }
    transport
}

/// Transport settings of a connection through the relay: those of [`peer_transport`], with
/// [`RELAY_MTU`]-sized packets from the start (no path MTU discovery: the relay has no MTU).
pub fn relay_transport(congestion: Congestion) -> quinn::TransportConfig {
    let mut transport = peer_transport(congestion);
    transport.initial_mtu(RELAY_MTU).min_mtu(RELAY_MTU).mtu_discovery_config(None);
    // quinn's default first congestion window (12 000 bytes) would not fit one such packet.
    transport.congestion_controller_factory(congestion.factory(Some(10 * u64::from(RELAY_MTU))));
    transport
}

/// The endpoint's settings: the identity's stateless-reset key, and datagrams as large as a
/// relayed packet (direct paths find their MTU, at most 1452 bytes, by discovery).
pub(crate) fn endpoint_config(
    identity: &Identity,
    bind: SocketAddr,
) -> Result<quinn::EndpointConfig, NodeError> {
    let mut config = qpeer_certs::endpoint_config(identity);
    config
        .max_udp_payload_size(RELAY_MTU)
        .map_err(|e| NodeError::Bind { addr: bind, source: std::io::Error::other(e.to_string()) })?;
    Ok(config)
}

/// How the node meets peers: the server side of their handshakes and the transport of its own.
pub(crate) struct PeerTransport {
    pub(crate) server: Arc<quinn::ServerConfig>,
    client: Arc<quinn::TransportConfig>,
}

impl PeerTransport {
    /// A relay-only node's connections never leave the relay, which has no MTU.
    pub(crate) fn new(
        identity: &Identity,
        relay_only: bool,
        congestion: Congestion,
    ) -> Result<Self, NodeError> {
        let transport =
            Arc::new(if relay_only { relay_transport(congestion) } else { peer_transport(congestion) });
        let mut server = qpeer_certs::server_config(identity, &[ALPN])?;
        server.transport_config(transport.clone());
        // quinn sees each peer at one virtual address for good: a connection that seems to
        // migrate would be packets of another session, never the peer moving.
        server.migration(false);
        Ok(Self { server: Arc::new(server), client: transport })
    }

    /// Settings of our handshake to `peer`, whose NodeId its certificate must carry.
    pub(crate) fn client_config(
        &self,
        identity: &Identity,
        peer: NodeId,
    ) -> Result<quinn::ClientConfig, qpeer_certs::TlsError> {
        let mut config = qpeer_certs::client_config(identity, &ServerTrust::Pinned(peer), &[ALPN])?;
        config.transport_config(self.client.clone());
        Ok(config)
    }
}
