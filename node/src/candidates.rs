//! Candidate addresses: where peers may reach this node's one UDP socket.

use std::net::{IpAddr, SocketAddr};

use qpeer_wire::tracker::{PeerAddrs, MAX_CANDIDATES};

/// The local addresses of `bound` to register with the tracker: the bound address itself when
/// it is specific, else every non-loopback interface address of its family with its port.
pub fn local_candidates(bound: SocketAddr) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let interfaces = match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces,
        Err(e) => {
            tracing::warn!("cannot list network interfaces: {e}");
            return Vec::new();
        }
    };
    let mut out: Vec<SocketAddr> = interfaces
        .iter()
        .filter(|iface| !iface.is_loopback() && !iface.is_link_local())
        .map(|iface| iface.ip())
        .filter(|ip| ip.is_ipv4() == bound.is_ipv4())
        .map(|ip| SocketAddr::new(ip, bound.port()))
        .collect();
    out.sort();
    out.dedup();
    out.truncate(MAX_CANDIDATES);
    out
}

/// Every address to try for a peer: its LAN candidates and its observed (public) address, once
/// each, skipping addresses no packet can be sent to.
pub fn dial_targets(addrs: &PeerAddrs) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for addr in addrs.candidates.iter().chain(std::iter::once(&addrs.observed)) {
        let usable = addr.port() != 0 && !addr.ip().is_unspecified() && !is_multicast(addr.ip());
        if usable && !out.contains(addr) {
            out.push(*addr);
        }
    }
    out
}

fn is_multicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_multicast(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_deduplicated_and_sane() {
        let a: SocketAddr = "10.0.0.2:5000".parse().expect("addr");
        let public: SocketAddr = "203.0.113.7:40000".parse().expect("addr");
        let addrs = PeerAddrs {
            observed: public,
            candidates: vec![a, a, "0.0.0.0:1".parse().expect("addr"), "10.0.0.3:0".parse().expect("addr")],
        };
        assert_eq!(dial_targets(&addrs), vec![a, public]);
    }

    #[test]
    fn a_specific_bind_is_its_own_candidate() {
        let bound: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        assert_eq!(local_candidates(bound), vec![bound]);
    }
}
