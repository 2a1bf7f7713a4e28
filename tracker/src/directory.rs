//! The directory of registered nodes: their addresses, names and registration times. Pure
//! state (no connections, no channels, the time passed in), so it is tested without a network.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Bound;

use qpeer_certs::NodeId;
use qpeer_wire::canonical;
use qpeer_wire::tracker::{Mapping, PeerAddrs, PeerInfo};

/// What the directory knows of one registered node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Which connection registered it (a newer registration replaces an older one).
    pub connection_id: u64,
    pub addrs: PeerAddrs,
    /// The node process's incarnation, passed to peers in introductions.
    pub incarnation: u64,
    pub name: Option<String>,
    /// Seconds since the Unix epoch.
    pub registered_at: u64,
    /// What the node announced of its NAT (`ClientFrame::Mapping`), for introductions.
    pub mapping: Mapping,
    /// Registered as a visitor (its home is another tracker): introduced and relayed like
    /// any node, but not listed.
    pub visitor: bool,
}

impl Listing {
    /// A listing for a node seen at `observed`: its candidates are kept only where
    /// [`plausible_candidate`] allows, in canonical form.
    pub fn new(
        connection_id: u64,
        observed: SocketAddr,
        candidates: Vec<SocketAddr>,
        incarnation: u64,
        name: Option<String>,
        registered_at: u64,
    ) -> Self {
        let observed = canonical(observed);
        let candidates = plausible_candidates(candidates, observed);
        Self {
            connection_id,
            addrs: PeerAddrs { observed, candidates },
            incarnation,
            name,
            registered_at,
            mapping: Mapping::Unknown,
            visitor: false,
        }
    }
}

/// Result of [`Directory::register`].
#[derive(Debug, PartialEq, Eq)]
pub enum RegisterOutcome {
    Registered,
    /// The node was registered over another connection, which the caller must close.
    Replaced(Box<Listing>),
    /// The directory is full.
    Full,
    /// A visitor registration of a node registered here as its home: refused.
    HomeHere,
}

/// Registered nodes by NodeId, ordered so that listing pages through them.
#[derive(Debug, Default)]
pub struct Directory {
    nodes: BTreeMap<NodeId, Listing>,
}

impl Directory {
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn get(&self, node_id: &NodeId) -> Option<&Listing> {
        self.nodes.get(node_id)
    }

    /// Enters `node_id`, replacing an older registration of it; a new node is refused once
    /// `max_nodes` are registered.
    pub fn register(&mut self, node_id: NodeId, listing: Listing, max_nodes: usize) -> RegisterOutcome {
        if !self.nodes.contains_key(&node_id) && self.nodes.len() >= max_nodes {
            return RegisterOutcome::Full;
        }
        if listing.visitor && self.nodes.get(&node_id).is_some_and(|home| !home.visitor) {
            // The node lives here: a visit of its own (a stale record naming its home) must
            // not push its home registration off.
            return RegisterOutcome::HomeHere;
        }
        match self.nodes.insert(node_id, listing) {
            Some(old) => RegisterOutcome::Replaced(Box::new(old)),
            None => RegisterOutcome::Registered,
        }
    }

    /// Removes `node_id` if it is still registered by `connection_id`; true when it was.
    pub fn remove(&mut self, node_id: &NodeId, connection_id: u64) -> bool {
        if self.registered_by(node_id, connection_id).is_none() {
            return false;
        }
        self.nodes.remove(node_id);
        true
    }

    /// Notes the NAT mapping `node_id` announced over `connection_id`.
    pub fn set_mapping(&mut self, node_id: &NodeId, connection_id: u64, mapping: Mapping) {
        if let Some(listing) = self.registered_by(node_id, connection_id) {
            listing.mapping = mapping;
        }
    }

    /// Replaces the candidates of `node_id` (it moved to another network), if it is still
    /// registered by `connection_id`.
    pub fn update_candidates(&mut self, node_id: &NodeId, connection_id: u64, candidates: Vec<SocketAddr>) {
        if let Some(listing) = self.registered_by(node_id, connection_id) {
            listing.addrs.candidates = plausible_candidates(candidates, listing.addrs.observed);
        }
    }

    /// Records that the connection of `node_id` now arrives from `observed` (its NAT rebound,
    /// or it moved), if it is still registered by `connection_id`; true when it is. Candidates
    /// that were plausible only for the old address are dropped.
    pub fn migrate(&mut self, node_id: &NodeId, connection_id: u64, observed: SocketAddr) -> bool {
        let Some(listing) = self.registered_by(node_id, connection_id) else { return false };
        let observed = canonical(observed);
        listing.addrs.observed = observed;
        let candidates = std::mem::take(&mut listing.addrs.candidates);
        listing.addrs.candidates = plausible_candidates(candidates, observed);
        true
    }

    /// A page of up to `limit` nodes after `after`, and the cursor of the next page.
    /// Visitors are not listed: this tracker is not their home.
    pub fn page(&self, after: Option<NodeId>, limit: usize) -> (Vec<PeerInfo>, Option<NodeId>) {
        let start = match after {
            Some(id) => Bound::Excluded(id),
            None => Bound::Unbounded,
        };
        let mut iter = self.nodes.range((start, Bound::Unbounded)).filter(|(_, l)| !l.visitor);
        let peers: Vec<PeerInfo> = iter
            .by_ref()
            .take(limit)
            .map(|(id, l)| PeerInfo { node_id: *id, name: l.name.clone(), registered_at: l.registered_at })
            .collect();
        let next = if iter.next().is_some() { peers.last().map(|p| p.node_id) } else { None };
        (peers, next)
    }

    fn registered_by(&mut self, node_id: &NodeId, connection_id: u64) -> Option<&mut Listing> {
        self.nodes.get_mut(node_id).filter(|l| l.connection_id == connection_id)
    }
}

/// The candidates worth passing to peers, canonical. Only addresses a peer could
/// legitimately reach the node at pass: anything else would let a node aim other nodes'
/// punch packets and handshakes at a third party.
pub fn plausible_candidates(candidates: Vec<SocketAddr>, observed: SocketAddr) -> Vec<SocketAddr> {
    candidates.into_iter().map(canonical).filter(|c| plausible_candidate(*c, observed)).collect()
}

/// True for a candidate address worth passing to peers: the observed IP, or a private,
/// carrier-NAT, loopback, link-local or unique-local address, with a real port.
pub fn plausible_candidate(candidate: SocketAddr, observed: SocketAddr) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("addr")
    }

    fn node(byte: u8) -> NodeId {
        NodeId::from_bytes([byte; 32])
    }

    fn listing(connection_id: u64, observed: &str, candidates: &[&str]) -> Listing {
        Listing::new(
            connection_id,
            addr(observed),
            candidates.iter().map(|c| addr(c)).collect(),
            7,
            None,
            100,
        )
    }

    #[test]
    fn only_local_or_own_public_candidates_pass() {
        let observed = addr("198.51.100.7:4000");
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
            assert!(plausible_candidate(addr(ok), observed), "{ok}");
        }
        for bad in ["203.0.113.9:4000", "8.8.8.8:53", "10.0.0.1:0", "[2001:db8::1]:3", "100.128.0.1:5"] {
            assert!(!plausible_candidate(addr(bad), observed), "{bad}");
        }
    }

    #[test]
    fn listings_are_canonical_and_filtered() {
        let l = listing(1, "[::ffff:198.51.100.7]:4000", &["[::ffff:10.0.0.2]:5", "8.8.8.8:53"]);
        assert_eq!(l.addrs.observed, addr("198.51.100.7:4000"));
        assert_eq!(l.addrs.candidates, vec![addr("10.0.0.2:5")]);
    }

    #[test]
    fn a_newer_registration_replaces_and_only_it_removes() {
        let mut dir = Directory::default();
        assert_eq!(dir.register(node(1), listing(1, "198.51.100.7:1", &[]), 10), RegisterOutcome::Registered);
        let outcome = dir.register(node(1), listing(2, "198.51.100.8:1", &[]), 10);
        assert!(matches!(outcome, RegisterOutcome::Replaced(old) if old.connection_id == 1));
        assert!(!dir.remove(&node(1), 1), "the replaced connection leaves its successor registered");
        assert_eq!(dir.len(), 1);
        assert!(dir.remove(&node(1), 2));
        assert!(dir.is_empty());
    }

    #[test]
    fn a_full_directory_refuses_newcomers_but_not_re_registrations() {
        let mut dir = Directory::default();
        dir.register(node(1), listing(1, "198.51.100.7:1", &[]), 1);
        assert_eq!(dir.register(node(2), listing(2, "198.51.100.7:2", &[]), 1), RegisterOutcome::Full);
        assert!(matches!(
            dir.register(node(1), listing(3, "198.51.100.7:3", &[]), 1),
            RegisterOutcome::Replaced(_)
        ));
    }

    #[test]
    fn migration_moves_the_observed_address_and_drops_stale_candidates() {
        let mut dir = Directory::default();
        dir.register(node(1), listing(1, "198.51.100.7:1", &["198.51.100.7:2", "10.0.0.1:2"]), 10);
        assert!(!dir.migrate(&node(1), 9, addr("203.0.113.1:1")), "another connection cannot move it");
        assert!(dir.migrate(&node(1), 1, addr("203.0.113.1:1")));
        let moved = dir.get(&node(1)).expect("listed");
        assert_eq!(moved.addrs.observed, addr("203.0.113.1:1"));
        assert_eq!(moved.addrs.candidates, vec![addr("10.0.0.1:2")]);
        dir.update_candidates(&node(1), 1, vec![addr("203.0.113.1:9"), addr("8.8.8.8:1")]);
        assert_eq!(dir.get(&node(1)).expect("listed").addrs.candidates, vec![addr("203.0.113.1:9")]);
    }

    #[test]
    fn pages_are_ordered_and_end_with_no_cursor() {
        let mut dir = Directory::default();
        for byte in 1..=5 {
            dir.register(node(byte), listing(u64::from(byte), "198.51.100.7:1", &[]), 10);
        }
        let (first, next) = dir.page(None, 2);
        assert_eq!(first.iter().map(|p| p.node_id).collect::<Vec<_>>(), vec![node(1), node(2)]);
        assert_eq!(next, Some(node(2)));
        let (last, next) = dir.page(Some(node(4)), 2);
        assert_eq!(last.iter().map(|p| p.node_id).collect::<Vec<_>>(), vec![node(5)]);
        assert_eq!(next, None);
    }

    #[test]
    fn visitors_are_never_listed() {
        let mut dir = Directory::default();
        for byte in 1..=4 {
            let mut l = listing(u64::from(byte), "198.51.100.7:1", &[]);
            l.visitor = byte % 2 == 0;
            dir.register(node(byte), l, 10);
        }
        let (first, next) = dir.page(None, 1);
        assert_eq!(first.iter().map(|p| p.node_id).collect::<Vec<_>>(), vec![node(1)]);
        assert_eq!(next, Some(node(1)));
        let (last, next) = dir.page(next, 1);
        assert_eq!(last.iter().map(|p| p.node_id).collect::<Vec<_>>(), vec![node(3)]);
        assert_eq!(next, None, "the visitor after it is no next page");
        assert!(dir.get(&node(2)).is_some(), "a visitor is still reachable");
    }

    #[test]
    fn a_visit_never_replaces_a_home_registration_but_a_home_replaces_a_visit() {
        let mut dir = Directory::default();
        let visitor = |id: u64| {
            let mut l = listing(id, "198.51.100.7:1", &[]);
            l.visitor = true;
            l
        };
        assert_eq!(dir.register(node(1), listing(1, "198.51.100.7:1", &[]), 10), RegisterOutcome::Registered);
        assert_eq!(dir.register(node(1), visitor(2), 10), RegisterOutcome::HomeHere);
        assert_eq!(dir.get(&node(1)).map(|l| l.connection_id), Some(1), "the home registration stays");
        assert_eq!(dir.register(node(2), visitor(3), 10), RegisterOutcome::Registered);
        assert!(matches!(
            dir.register(node(2), listing(4, "198.51.100.7:1", &[]), 10),
            RegisterOutcome::Replaced(_)
        ));
    }
}
