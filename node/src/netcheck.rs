//! What kind of network the node is on: [`NetReport`]. Measured from the node's one socket
//! (the socket peers must reach), so the answer is about the mapping peers will see.
//!
//! **Mapping.** The tracker tells a node its other listen addresses in `Registered`. From
//! the same endpoint, the node opens a second connection to another of them that only asks
//! `Observe` (it does not register, so the registration stays). The same public address
//! from both means the NAT maps the socket once for every destination (endpoint-independent:
//! a peer can punch toward the address the tracker saw); two addresses mean one mapping per
//! destination (endpoint-dependent, "symmetric"), where the address the tracker saw is
//! useless to a peer. The tracker seeing one of the node's own addresses means no NAT.
//!
//! The node runs the check after each registration ([`crate::tracker_link`]), announces the
//! mapping to the tracker (peers learn it in introductions), and reports it as
//! [`crate::NodeEvent::NatChecked`].

use std::net::SocketAddr;
use std::sync::Arc;

use qpeer_certs::ServerTrust;
use qpeer_tracker::{ClientError, TrackerClient};
use qpeer_wire::canonical;
use qpeer_wire::tracker::{ErrorKind, Mapping};

use crate::candidates::local_candidates;
use crate::error::NodeError;
use crate::shared::Shared;

/// How to open more connections to the tracker the node is registered with: the trust and
/// server name its registration used.
#[derive(Debug, Clone)]
pub(crate) struct TrackerTrust {
    pub(crate) trust: ServerTrust,
    pub(crate) server_name: String,
}

/// What the node learnt of its network.
#[derive(Debug, Clone, PartialEq)]
pub struct NetReport {
    /// The tracker answered over UDP at all.
    pub udp: bool,
    pub mapping: Mapping,
    /// The address the tracker sees us at, per family.
    pub public_v4: Option<SocketAddr>,
    pub public_v6: Option<SocketAddr>,
    /// Round-trip time of the tracker connection, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// The tracker's relay answered a request.
    pub relay: bool,
}

impl NetReport {
    /// The report when the tracker never answered over UDP.
    pub fn no_udp() -> Self {
        Self {
            udp: false,
            mapping: Mapping::Unknown,
            public_v4: None,
            public_v6: None,
            rtt_ms: None,
            relay: false,
        }
    }

    /// One line: what to expect of connections to peers.
    pub fn verdict(&self) -> &'static str {
        match (self.udp, self.mapping, self.relay) {
            (false, _, _) => "no UDP: qpeer cannot work on this network",
            (true, Mapping::None | Mapping::EndpointIndependent, _) => "direct connections to most peers",
            (true, Mapping::EndpointDependent, true) => {
                "direct connections to peers behind easy NATs; relayed to peers behind NATs like yours"
            }
            (true, Mapping::EndpointDependent, false) => {
                "direct connections to peers behind easy NATs only; no relay for peers behind NATs like yours"
            }
            (true, Mapping::Unknown, _) => "UDP works; NAT type unknown (the tracker has one address)",
        }
    }
}

/// Measures the network over the node's current tracker registration (waiting for one).
/// `Node::netcheck` forwards here.
pub(crate) async fn run(shared: &Arc<Shared>) -> Result<NetReport, NodeError> {
    let client = shared.tracker.client().await?;
    // Set before every registration attempt, so a registered node always has it.
    let trust = shared.tracker.trust().ok_or(NodeError::Shutdown)?;
    Ok(measure(shared, &client, &trust).await)
}

/// Measures the network from `client`, the node's registered tracker connection.
async fn measure(shared: &Arc<Shared>, client: &TrackerClient, trust: &TrackerTrust) -> NetReport {
    let first = canonical(client.observed_addr());
    let mut report = NetReport {
        udp: true,
        mapping: Mapping::Unknown,
        public_v4: None,
        public_v6: None,
        rtt_ms: Some(client.connection().rtt().as_secs_f64() * 1000.0),
        relay: relay_answers(shared, client).await,
    };
    note_public(&mut report, first);
    let mut own = local_candidates(shared.local_addr);
    own.push(shared.local_addr);
    if own.iter().any(|addr| canonical(*addr) == first) {
        report.mapping = Mapping::None;
        return report;
    }
    // Another tracker address of the family we registered over: only the same family
    // compares mappings (an IPv6 path has no NAT to measure).
    let registered_at = canonical(client.connection().remote_address());
    let Some(other) =
        client.other_addrs().iter().copied().find(|addr| addr.is_ipv4() == registered_at.is_ipv4())
    else {
        return report;
    };
    match observe(shared, other, trust).await {
        Ok(second) => {
            let second = canonical(second);
            report.mapping =
                if second == first { Mapping::EndpointIndependent } else { Mapping::EndpointDependent };
        }
        Err(e) => tracing::debug!(%other, "cannot observe from the tracker's other address: {e}"),
    }
    report
}

/// The name of a mapping in `qpeer netcheck` (and its `--json`).
pub fn mapping_name(mapping: Mapping) -> &'static str {
    match mapping {
        Mapping::Unknown => "unknown",
        Mapping::None => "none",
        Mapping::EndpointIndependent => "endpoint-independent",
        Mapping::EndpointDependent => "endpoint-dependent",
    }
}

fn note_public(report: &mut NetReport, addr: SocketAddr) {
    if addr.is_ipv4() {
        report.public_v4 = Some(addr);
    } else {
        report.public_v6 = Some(addr);
    }
}

/// Asks the tracker at `addr` (another of its addresses) where it sees us from.
async fn observe(
    shared: &Arc<Shared>,
    addr: SocketAddr,
    trust: &TrackerTrust,
) -> Result<SocketAddr, ClientError> {
    // The path layer passes only packets of known tracker addresses.
    shared.table.lock().allow_pass(addr);
    let config = TrackerClient::config(&shared.identity, &trust.trust)?;
    TrackerClient::observe(&shared.endpoint, config, addr, &trust.server_name, &trust.trust)
        .await
        .map(|answer| answer.observed)
}

/// Whether the tracker's relay answers. A relay request for ourselves is never granted (we
/// were never introduced to ourselves), but it travels the relay's request path, and its
/// typed refusal is an answer; a relay-only or no-relay node reports its policy's view.
async fn relay_answers(shared: &Arc<Shared>, client: &TrackerClient) -> bool {
    if !shared.table.lock().policy().relay {
        return false;
    }
    match client.request_relay(shared.id()).await {
        Ok(()) => true,
        Err(ClientError::Refused { kind: ErrorKind::NotIntroduced, .. }) => true,
        Err(e) => {
            tracing::debug!("the tracker's relay did not answer: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_mapping() {
        let mut report = NetReport::no_udp();
        assert!(report.verdict().starts_with("no UDP"));
        report.udp = true;
        report.relay = true;
        report.mapping = Mapping::EndpointIndependent;
        assert_eq!(report.verdict(), "direct connections to most peers");
        report.mapping = Mapping::None;
        assert_eq!(report.verdict(), "direct connections to most peers");
        report.mapping = Mapping::EndpointDependent;
        assert!(report.verdict().contains("relayed to peers behind NATs like yours"));
    }
}
