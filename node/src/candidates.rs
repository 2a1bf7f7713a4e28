//! Candidate addresses: where peers may reach this node's one UDP socket.

use std::net::{IpAddr, SocketAddr};

use qpeer_wire::canonical;
use qpeer_wire::tracker::{PeerAddrs, MAX_CANDIDATES};

/// The local addresses of `bound` to register with the tracker: the bound address itself when
/// it is specific, else every interface address it can be reached at with its port: IPv4 ones
/// for `0.0.0.0`, IPv4 and IPv6 ones for a dual-stack `[::]`.
pub fn local_candidates(bound: SocketAddr) -> Vec<SocketAddr> {
    let bound = canonical(bound);
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
    candidates_of(bound, interfaces.iter().map(|iface| iface.ip()))
}

/// The addresses among `ips` a peer may reach a socket bound to the unspecified `bound` at.
fn candidates_of(bound: SocketAddr, ips: impl Iterator<Item = IpAddr>) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = ips
        .map(|ip| ip.to_canonical())
        .filter(|ip| reachable_at(*ip) && (bound.is_ipv6() || ip.is_ipv4()))
        .map(|ip| SocketAddr::new(ip, bound.port()))
        .collect();
    out.sort();
    out.dedup();
    out.truncate(MAX_CANDIDATES);
    out
}

/// True for an interface address worth announcing: not loopback, and not link-local (a
/// link-local address means nothing without its interface's scope, which a peer's differs
/// from). Unique-local IPv6 addresses stay, as private IPv4 ones do, for peers on the LAN.
fn reachable_at(ip: IpAddr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() || is_multicast(ip) {
        return false;
    }
    match ip {
        IpAddr::V4(v4) => !v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// Every address to try for a peer: its LAN candidates and its observed (public) address, once
/// each, skipping addresses no packet can be sent to.
pub fn dial_targets(addrs: &PeerAddrs) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for addr in addrs.candidates.iter().chain(std::iter::once(&addrs.observed)) {
        let addr = &canonical(*addr);
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
        let mapped: SocketAddr = "[::ffff:10.0.0.2]:4000".parse().expect("addr");
        assert_eq!(local_candidates(mapped), vec!["10.0.0.2:4000".parse().expect("addr")]);
    }

    #[test]
    fn a_dual_stack_socket_announces_both_families_but_no_local_scopes() {
        let ips: Vec<IpAddr> =
            ["127.0.0.1", "10.1.1.2", "169.254.3.4", "::1", "fe80::1", "2001:db8:5::2", "::ffff:10.2.1.2"]
                .iter()
                .map(|ip| ip.parse().expect("ip"))
                .collect();
        let dual: SocketAddr = "[::]:4000".parse().expect("addr");
        let want: Vec<SocketAddr> = ["10.1.1.2:4000", "10.2.1.2:4000", "[2001:db8:5::2]:4000"]
            .iter()
            .map(|a| a.parse().expect("addr"))
            .collect();
        assert_eq!(candidates_of(dual, ips.iter().copied()), want);
        let v4: SocketAddr = "0.0.0.0:4000".parse().expect("addr");
        assert_eq!(candidates_of(v4, ips.into_iter()), want[..2].to_vec());
    }
}
