//! The directory of registered nodes and the per-node / per-address limits. Pure state; the
//! server holds it behind a mutex and never awaits while holding it.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::ops::Bound;
use std::time::{Duration, Instant};

use qpeer_certs::NodeId;
use tokio::sync::mpsc;

use qpeer_wire::tracker::{PeerAddrs, PeerInfo, ServerFrame};

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            refilled: now,
        }
    }

    /// Takes one token if available.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.try_take_n(1, now)
    }

    /// Takes `n` tokens if available.
    pub fn try_take_n(&mut self, n: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// One registered node.
#[derive(Debug)]
pub struct Entry {
    /// Which connection registered it (a newer registration replaces an older one).
    pub connection_id: u64,
    pub connection: quinn::Connection,
    pub addrs: PeerAddrs,
    /// The node process's incarnation, passed to peers in introductions.
    pub incarnation: u64,
    pub name: Option<String>,
    pub registered_at: u64,
    /// Frames for this node's control stream. Boxed: a channel allocates its first block of
    /// 32 slots up front, and 32 boxes cost far less per idle node than 32 frames.
    pub outbox: mpsc::Sender<Box<ServerFrame>>,
    pub introductions: TokenBucket,
    /// Relay: the queue of frames for this node's relay stream, once a link needs it.
    pub relay_out: Option<mpsc::Sender<bytes::Bytes>>,
    /// Relay limits on what this node sends.
    pub relay_bytes: TokenBucket,
    pub relay_packets: TokenBucket,
}

/// A relay link between two nodes that both asked for it.
#[derive(Debug, Clone)]
pub struct Link {
    pub a: NodeId,
    pub b: NodeId,
    /// Bytes forwarded from a to b, and from b to a.
    pub bytes_ab: u64,
    pub bytes_ba: u64,
}

impl Link {
    /// The other end, if `from` is an end.
    pub fn other(&self, from: &NodeId) -> Option<NodeId> {
        if *from == self.a {
            Some(self.b)
        } else if *from == self.b {
            Some(self.a)
        } else {
            None
        }
    }
}

/// An unordered pair of nodes.
pub fn pair(x: NodeId, y: NodeId) -> (NodeId, NodeId) {
    if x < y {
        (x, y)
    } else {
        (y, x)
    }
}

/// Result of [`Directory::register`].
#[derive(Debug)]
pub enum RegisterOutcome {
    Registered,
    /// The node was registered over another connection, which the caller must close.
    Replaced(Box<Entry>),
    /// The directory is full.
    Full,
}

/// Registered nodes by NodeId, and open connections by source IP.
#[derive(Debug, Default)]
pub struct Directory {
    nodes: BTreeMap<NodeId, Entry>,
    connections_per_ip: HashMap<IpAddr, usize>,
    /// When each pair was last introduced (relays need a recent introduction).
    pub introduced: HashMap<(NodeId, NodeId), Instant>,
    /// Relay requests: (from, to) → when.
    pub relay_requests: HashMap<(NodeId, NodeId), Instant>,
    /// Open relay links by id, and by pair.
    pub links: HashMap<u32, Link>,
    pub pair_links: HashMap<(NodeId, NodeId), u32>,
    next_link: u32,
}

impl Directory {
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn register(&mut self, node_id: NodeId, entry: Entry, max_nodes: usize) -> RegisterOutcome {
        if !self.nodes.contains_key(&node_id) && self.nodes.len() >= max_nodes {
            return RegisterOutcome::Full;
        }
        match self.nodes.insert(node_id, entry) {
            Some(old) => RegisterOutcome::Replaced(Box::new(old)),
            None => RegisterOutcome::Registered,
        }
    }

    /// Removes `node_id` (and its relay links, returned) if it is still registered by
    /// `connection_id`.
    pub fn remove(&mut self, node_id: &NodeId, connection_id: u64) -> Option<Vec<(u32, Link)>> {
        if self.nodes.get(node_id).is_none_or(|e| e.connection_id != connection_id) {
            return None;
        }
        self.nodes.remove(node_id);
        self.relay_requests.retain(|(from, to), _| from != node_id && to != node_id);
        self.introduced.retain(|(x, y), _| x != node_id && y != node_id);
        let ids: Vec<u32> =
            self.links.iter().filter(|(_, l)| l.other(node_id).is_some()).map(|(id, _)| *id).collect();
        let mut closed = Vec::new();
        for id in ids {
            if let Some(link) = self.links.remove(&id) {
                self.pair_links.remove(&pair(link.a, link.b));
                closed.push((id, link));
            }
        }
        Some(closed)
    }

    /// Opens (or returns the existing) link between `x` and `y`. Returns (id, newly opened).
    pub fn open_link(&mut self, x: NodeId, y: NodeId) -> (u32, bool) {
        let key = pair(x, y);
        if let Some(id) = self.pair_links.get(&key) {
            return (*id, false);
        }
        // Link ids stay below 2^24 (nodes map them into 240.0.0.0/8) and are never 0.
        loop {
            self.next_link = (self.next_link % 0x00ff_ffff) + 1;
            if !self.links.contains_key(&self.next_link) {
                break;
            }
        }
        let id = self.next_link;
        self.links.insert(id, Link { a: key.0, b: key.1, bytes_ab: 0, bytes_ba: 0 });
        self.pair_links.insert(key, id);
        (id, true)
    }

    /// Forgets introductions and relay requests older than `window`.
    pub fn expire(&mut self, now: Instant, window: Duration) {
        self.introduced.retain(|_, at| now.saturating_duration_since(*at) < window);
        self.relay_requests.retain(|_, at| now.saturating_duration_since(*at) < window);
    }

    pub fn get(&self, node_id: &NodeId) -> Option<&Entry> {
        self.nodes.get(node_id)
    }

    pub fn get_mut(&mut self, node_id: &NodeId) -> Option<&mut Entry> {
        self.nodes.get_mut(node_id)
    }

    /// A page of up to `limit` nodes after `after`, and the cursor of the next page.
    pub fn page(&self, after: Option<NodeId>, limit: usize) -> (Vec<PeerInfo>, Option<NodeId>) {
        let start = match after {
            Some(id) => Bound::Excluded(id),
            None => Bound::Unbounded,
        };
        let mut iter = self.nodes.range((start, Bound::Unbounded));
        let peers: Vec<PeerInfo> = iter
            .by_ref()
            .take(limit)
            .map(|(id, e)| PeerInfo { node_id: *id, name: e.name.clone(), registered_at: e.registered_at })
            .collect();
        let next = if iter.next().is_some() { peers.last().map(|p| p.node_id) } else { None };
        (peers, next)
    }

    /// Counts a new connection from `ip`; false (and nothing counted) past `max`.
    pub fn open_connection(&mut self, ip: IpAddr, max: usize) -> bool {
        let count = self.connections_per_ip.entry(ip).or_insert(0);
        if *count >= max {
            return false;
        }
        *count += 1;
        true
    }

    pub fn close_connection(&mut self, ip: IpAddr) {
        if let Some(count) = self.connections_per_ip.get_mut(&ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.connections_per_ip.remove(&ip);
            }
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

/// Strips the IPv4-mapped IPv6 form so addresses read as users expect.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2, 3, start);
        assert!((0..3).all(|_| bucket.try_take(start)));
        assert!(!bucket.try_take(start));
        assert!(bucket.try_take(start + Duration::from_millis(500)));
        assert!(!bucket.try_take(start + Duration::from_millis(500)));
    }

    #[test]
    fn per_ip_counter_caps_and_releases() {
        let mut dir = Directory::default();
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        assert!(dir.open_connection(ip, 2));
        assert!(dir.open_connection(ip, 2));
        assert!(!dir.open_connection(ip, 2));
        dir.close_connection(ip);
        assert!(dir.open_connection(ip, 2));
    }
}
