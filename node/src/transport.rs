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
    pub(crate) fn new(identity: &Identity, relay_only: bool) -> Result<Self, NodeError> {
        let transport = Arc::new(if relay_only { relay_transport() } else { peer_transport() });
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
