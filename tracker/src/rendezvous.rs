//! Introductions and relay requests: which pairs of nodes were recently introduced, and
//! which node asked for a relay to which. A relay opens only between two nodes that were
//! introduced and that both asked for it within [`RELAY_REQUEST_WINDOW_SECS`]. Pure state,
//! the time passed in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use qpeer_certs::NodeId;
use qpeer_wire::tracker::RELAY_REQUEST_WINDOW_SECS;

/// How long an introduction and a relay request count.
const WINDOW: Duration = Duration::from_secs(RELAY_REQUEST_WINDOW_SECS);

/// An unordered pair of nodes.
pub fn pair(x: NodeId, y: NodeId) -> (NodeId, NodeId) {
    if x < y {
        (x, y)
    } else {
        (y, x)
    }
}

/// What a relay request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayAsk {
    /// The two were not introduced within the window: refused.
    NotIntroduced,
    /// Noted; the other node has not asked (yet).
    Waiting,
    /// The other node asked too: open the link.
    Mutual,
}

/// Recent introductions and relay requests.
#[derive(Debug, Default)]
pub struct Rendezvous {
    /// When each pair was last introduced.
    introduced: HashMap<(NodeId, NodeId), Instant>,
    /// Relay requests: (from, to) → when.
    relay_asks: HashMap<(NodeId, NodeId), Instant>,
}

impl Rendezvous {
    /// Records that `x` and `y` were introduced at `now`.
    pub fn introduce(&mut self, x: NodeId, y: NodeId, now: Instant) {
        self.introduced.insert(pair(x, y), now);
    }

    /// Whether `x` and `y` were introduced within the window (forgetting what is older).
    pub fn recently_introduced(&mut self, x: NodeId, y: NodeId, now: Instant) -> bool {
        self.expire(now);
        self.introduced.contains_key(&pair(x, y))
    }

    /// Records that `from` asks for a relay to `to`.
    pub fn ask_relay(&mut self, from: NodeId, to: NodeId, now: Instant) -> RelayAsk {
        if !self.recently_introduced(from, to, now) {
            return RelayAsk::NotIntroduced;
        }
        self.relay_asks.insert((from, to), now);
        if self.relay_asks.contains_key(&(to, from)) {
            RelayAsk::Mutual
        } else {
            RelayAsk::Waiting
        }
    }

    /// Forgets everything about `node` (it left).
    pub fn forget(&mut self, node: &NodeId) {
        self.relay_asks.retain(|(from, to), _| from != node && to != node);
        self.introduced.retain(|(x, y), _| x != node && y != node);
    }

    fn expire(&mut self, now: Instant) {
        self.introduced.retain(|_, at| now.saturating_duration_since(*at) < WINDOW);
        self.relay_asks.retain(|_, at| now.saturating_duration_since(*at) < WINDOW);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(byte: u8) -> NodeId {
        NodeId::from_bytes([byte; 32])
    }

    #[test]
    fn a_relay_needs_an_introduction_and_both_asks() {
        let (a, b, c) = (node(1), node(2), node(3));
        let now = Instant::now();
        let mut rendezvous = Rendezvous::default();
        assert_eq!(rendezvous.ask_relay(a, b, now), RelayAsk::NotIntroduced);
        rendezvous.introduce(b, a, now);
        assert_eq!(rendezvous.ask_relay(a, b, now), RelayAsk::Waiting);
        assert_eq!(rendezvous.ask_relay(c, b, now), RelayAsk::NotIntroduced, "c was not introduced");
        assert_eq!(rendezvous.ask_relay(b, a, now), RelayAsk::Mutual);
    }

    /// Two nodes introduced at `now`.
    fn introduced(now: Instant) -> (NodeId, NodeId, Rendezvous) {
        let mut rendezvous = Rendezvous::default();
        rendezvous.introduce(node(1), node(2), now);
        (node(1), node(2), rendezvous)
    }

    #[test]
    fn introductions_and_asks_expire() {
        let start = Instant::now();
        let (a, b, mut rendezvous) = introduced(start);
        assert_eq!(rendezvous.ask_relay(a, b, start), RelayAsk::Waiting);
        let later = start + WINDOW;
        assert!(!rendezvous.recently_introduced(a, b, later));
        rendezvous.introduce(a, b, later);
        assert_eq!(rendezvous.ask_relay(b, a, later), RelayAsk::Waiting, "a's old ask expired");
    }

    #[test]
    fn a_node_that_left_is_forgotten() {
        let now = Instant::now();
        let (a, b, mut rendezvous) = introduced(now);
        rendezvous.ask_relay(a, b, now);
        rendezvous.forget(&b);
        assert!(!rendezvous.recently_introduced(a, b, now));
        rendezvous.introduce(a, b, now);
        assert_eq!(rendezvous.ask_relay(b, a, now), RelayAsk::Waiting, "a's ask went with b");
    }
}
