//! The path table: which way each peer session's packets travel right now.
//!
//! quinn talks to every peer at a stable *virtual* address (240.0.0.0/8, never routed). The
//! table maps it to the session's current best path: a direct address confirmed by a signed
//! probe round trip, else the tracker's relay link, else nothing yet (packets wait, briefly).
//! Incoming packets from a confirmed or probing direct address, or from the session's relay
//! link, are handed to quinn as if they came from the virtual address. So QUIC never sees an
//! address change: a NAT rebinding on either side, or a move between direct and relayed, is
//! invisible to it.
//!
//! State and decisions only; the socket ([`crate::socket`]) and the prober
//! ([`crate::prober`]) do the I/O. Every method takes `now`, so the logic is tested without
//! waiting.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use qpeer_certs::NodeId;
use qpeer_wire::canonical;
use qpeer_wire::probe::TX_LEN;

use crate::relay_link::RelayLink;

/// First octet of virtual addresses.
const VIRTUAL_OCTET: u8 = 240;
/// Port of virtual addresses (any non-zero value; quinn refuses port 0).
const VIRTUAL_PORT: u16 = 9;
/// Heartbeat ping interval on the current direct path.
pub const HEARTBEAT: Duration = Duration::from_millis(1500);
/// A direct path we have been sending on for this long without hearing anything back (QUIC
/// acknowledges within a round trip) has gone quiet.
pub const QUIET_WHILE_SENDING: Duration = Duration::from_millis(1500);
/// A direct path that has not been heard from (pong or packet) for this long is not used.
pub const HEARD_WITHIN: Duration = Duration::from_secs(5);
/// Probe rounds toward a peer's candidates while no direct path works: the first few come
/// fast (holes open within a round trip or two), then every [`ROUND_CAP`].
const ROUND_START: Duration = Duration::from_millis(100);
pub const ROUND_CAP: Duration = Duration::from_secs(3);
/// Most direct addresses kept per session (the tracker's candidates plus addresses pings
/// came from); the oldest unconfirmed ones go first.
const MAX_DIRECT: usize = 24;
/// Outstanding pings remembered per address.
const MAX_PINGS: usize = 4;
/// Packets kept per session while it has no path at all (its first handshake packets,
/// before the relay link or a direct path is ready).
const MAX_WAITING: usize = 64;
/// Valid pings from peers without a session yet, kept for a session that opens soon after
/// (a peer's first ping can overtake the introduction that opens our side): how many, and
/// for how long.
const MAX_EARLY_PINGS: usize = 64;
const EARLY_PING_TTL: Duration = Duration::from_secs(2);
/// Least time between two pings back to one address.
const PING_BACK_GAP: Duration = Duration::from_millis(200);
/// A confirmed direct path replaces the current one only when clearly faster.
const SWITCH_RTT_RATIO: f64 = 0.7;

/// The virtual address for session number `index` (24 bits).
fn virtual_addr(index: u32) -> SocketAddr {
    let [_, a, b, c] = index.to_be_bytes();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(VIRTUAL_OCTET, a, b, c)), VIRTUAL_PORT)
}

/// True for a virtual address (in either IPv4 or v4-mapped IPv6 form).
pub fn is_virtual(addr: SocketAddr) -> bool {
    matches!(addr.ip().to_canonical(), IpAddr::V4(v4) if v4.octets()[0] == VIRTUAL_OCTET)
        && addr.port() == VIRTUAL_PORT
}

/// How a session's packets travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPath {
    /// Straight to the peer's address.
    Direct(SocketAddr),
    /// Through the tracker's relay (still end-to-end encrypted between the nodes).
    Relayed,
    /// Neither is ready yet: packets wait for the first that is.
    Waiting,
}

impl std::fmt::Display for PeerPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerPath::Direct(addr) => write!(f, "direct {addr}"),
            PeerPath::Relayed => f.write_str("relayed via tracker"),
            PeerPath::Waiting => f.write_str("no path yet"),
        }
    }
}

/// Which paths a node may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathPolicy {
    pub direct: bool,
    pub relay: bool,
}

/// Where the socket sends a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Not a session's address (the tracker): the socket, unchanged.
    Pass,
    Direct(SocketAddr),
    Relay(RelayLink),
    /// The session has no path yet: keep the packet until it has one.
    Wait(NodeId),
    /// An address of no session (a session that ended): drop.
    Drop,
}

/// What to do with a packet that arrived from the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// From a session's direct address: hand it to quinn as from this virtual address.
    Session(SocketAddr),
    /// From the tracker: unchanged.
    Pass,
    /// From an address no session knows: QUIC must not see it (it would take it for a
    /// migration of the peer's connection and leave the path layer).
    Drop,
}

/// A ping to send: to whom, where, and its tx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingDue {
    pub peer: NodeId,
    pub addr: SocketAddr,
    pub tx: [u8; TX_LEN],
}

/// A session whose path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathChange {
    pub peer: NodeId,
    pub path: PeerPath,
    pub was: PeerPath,
}

#[derive(Debug)]
struct Direct {
    addr: SocketAddr,
    /// Pings sent to this address that no pong answered yet.
    pings: VecDeque<([u8; TX_LEN], Instant)>,
    /// Last pong from it.
    confirmed: Option<Instant>,
    rtt: Option<Duration>,
    /// Last pong or packet from it.
    heard: Option<Instant>,
    /// The first packet we sent on it since we last heard from it.
    unanswered_since: Option<Instant>,
    /// When a ping from it last made us ping it back.
    pinged_back: Option<Instant>,
    added: Instant,
}

impl Direct {
    fn new(addr: SocketAddr, now: Instant) -> Self {
        Self {
            addr,
            pings: VecDeque::new(),
            confirmed: None,
            rtt: None,
            heard: None,
            unanswered_since: None,
            pinged_back: None,
            added: now,
        }
    }

    /// Confirmed by a pong, heard from recently, and not silent while we send on it.
    fn usable(&self, now: Instant) -> bool {
        let (Some(_), Some(heard)) = (self.confirmed, self.heard) else { return false };
        if now.saturating_duration_since(heard) > HEARD_WITHIN {
            return false;
        }
        let unanswered = self.unanswered_since.filter(|since| heard < *since);
        unanswered.is_none_or(|since| now.saturating_duration_since(since) <= QUIET_WHILE_SENDING)
    }

    fn note_send(&mut self, now: Instant) {
        let answered = match (self.unanswered_since, self.heard) {
            (None, _) => true,
            (Some(since), Some(heard)) => heard >= since,
            (Some(_), None) => false,
        };
        if answered {
            self.unanswered_since = Some(now);
        }
    }
}

#[derive(Debug)]
struct Session {
    virtual_addr: SocketAddr,
    relay_link: Option<RelayLink>,
    direct: Vec<Direct>,
    path: PeerPath,
    changed: Instant,
    waiting: VecDeque<(Bytes, Option<usize>)>,
    /// Last packet from the peer, on any path.
    heard: Option<Instant>,
    /// When the next probe round toward unconfirmed candidates is due, and the gap after it.
    next_round: Instant,
    round_gap: Duration,
    next_heartbeat: Instant,
}

impl Session {
    fn direct_mut(&mut self, addr: SocketAddr) -> Option<&mut Direct> {
        self.direct.iter_mut().find(|d| d.addr == addr)
    }

    /// The best path now, given the policy: a usable IPv6 direct path before any IPv4 one
    /// (no NAT on it to rebind or expire, and no port shared with other hosts), then among
    /// those of the chosen family the current one unless another is clearly faster.
    fn choose(&self, policy: PathPolicy, now: Instant) -> PeerPath {
        if policy.direct {
            // Addresses in the table are canonical: an IPv6 one is a real IPv6 path.
            let ipv6 = self.direct.iter().any(|d| d.addr.is_ipv6() && d.usable(now));
            let eligible = |d: &&Direct| d.usable(now) && (!ipv6 || d.addr.is_ipv6());
            let current = match self.path {
                PeerPath::Direct(addr) => self.direct.iter().filter(eligible).find(|d| d.addr == addr),
                _ => None,
            };
            let fastest = self.direct.iter().filter(eligible).min_by_key(|d| d.rtt.unwrap_or(Duration::MAX));
            match (current, fastest) {
                (Some(current), Some(fastest)) => {
                    let (c, f) = (current.rtt.unwrap_or_default(), fastest.rtt.unwrap_or_default());
                    let better = f.as_secs_f64() < c.as_secs_f64() * SWITCH_RTT_RATIO;
                    return PeerPath::Direct(if better { fastest.addr } else { current.addr });
                }
                (None, Some(fastest)) => return PeerPath::Direct(fastest.addr),
                _ => {}
            }
        }
        if policy.relay && self.relay_link.is_some() {
            PeerPath::Relayed
        } else {
            PeerPath::Waiting
        }
    }
}

/// Every session's paths, and the reverse maps the socket needs on each packet.
#[derive(Debug)]
pub struct PathTable {
    policy: PathPolicy,
    sessions: HashMap<NodeId, Session>,
    by_virtual: HashMap<SocketAddr, NodeId>,
    by_direct: HashMap<SocketAddr, NodeId>,
    by_link: HashMap<RelayLink, NodeId>,
    /// Addresses the node talks QUIC to without a session: its tracker.
    pass: HashSet<SocketAddr>,
    /// Where valid pings of peers without a session came from, and when.
    early_pings: VecDeque<(NodeId, SocketAddr, Instant)>,
    next_index: u32,
}

impl PathTable {
    pub fn new(policy: PathPolicy) -> Self {
        Self {
            policy,
            sessions: HashMap::new(),
            by_virtual: HashMap::new(),
            by_direct: HashMap::new(),
            by_link: HashMap::new(),
            pass: HashSet::new(),
            early_pings: VecDeque::new(),
            next_index: 1,
        }
    }

    pub fn policy(&self) -> PathPolicy {
        self.policy
    }

    /// The session's virtual address, opening the session if needed.
    pub fn open(&mut self, peer: NodeId, now: Instant) -> SocketAddr {
        if let Some(session) = self.sessions.get(&peer) {
            return session.virtual_addr;
        }
        // Indexes are reused only after 2^24 sessions; skip any still taken.
        let addr = loop {
            let index = self.next_index;
            self.next_index = if index >= 0x00ff_ffff { 1 } else { index + 1 };
            let addr = virtual_addr(index);
            if !self.by_virtual.contains_key(&addr) {
                break addr;
            }
        };
        self.by_virtual.insert(addr, peer);
        let early: Vec<SocketAddr> = self
            .early_pings
            .iter()
            .filter(|(from, _, at)| *from == peer && now.saturating_duration_since(*at) < EARLY_PING_TTL)
            .map(|(_, source, _)| *source)
            .collect();
        self.early_pings.retain(|(from, _, _)| *from != peer);
        self.sessions.insert(
            peer,
            Session {
                virtual_addr: addr,
                relay_link: None,
                direct: Vec::new(),
                path: PeerPath::Waiting,
                changed: now,
                waiting: VecDeque::new(),
                heard: None,
                next_round: now,
                round_gap: ROUND_START,
                next_heartbeat: now,
            },
        );
        // Pings that came before the session: their sources are where the peer reaches us
        // from (behind a symmetric NAT, the only such address), so probe them first.
        if self.policy.direct {
            for source in early {
                self.add_direct(&peer, source, now);
            }
        }
        addr
    }

    /// Ends a session and forgets its addresses.
    pub fn close(&mut self, peer: &NodeId) {
        let Some(session) = self.sessions.remove(peer) else { return };
        self.by_virtual.remove(&session.virtual_addr);
        for direct in &session.direct {
            if self.by_direct.get(&direct.addr) == Some(peer) {
                self.by_direct.remove(&direct.addr);
            }
        }
        if let Some(link) = session.relay_link {
            self.by_link.remove(&link);
        }
    }

    #[cfg(test)]
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The peer behind a virtual address.
    pub fn peer_at(&self, virtual_addr: SocketAddr) -> Option<NodeId> {
        self.by_virtual.get(&canonical(virtual_addr)).copied()
    }

    pub fn virtual_of(&self, peer: &NodeId) -> Option<SocketAddr> {
        self.sessions.get(peer).map(|s| s.virtual_addr)
    }

    /// The session's path, and since when.
    pub fn path_of(&self, peer: &NodeId) -> Option<(PeerPath, Instant)> {
        self.sessions.get(peer).map(|s| (s.path, s.changed))
    }

    /// Lets QUIC to and from `addr` (a tracker) through unchanged.
    pub fn allow_pass(&mut self, addr: SocketAddr) {
        self.pass.insert(canonical(addr));
    }

    /// Adds direct addresses to try for `peer` (from an introduction). New addresses start a
    /// fast probe round.
    pub fn add_candidates(&mut self, peer: &NodeId, addrs: &[SocketAddr], now: Instant) {
        if !self.policy.direct {
            return;
        }
        let mut added = false;
        for addr in addrs {
            added |= self.add_direct(peer, canonical(*addr), now);
        }
        if let Some(session) = self.sessions.get_mut(peer) {
            if added || session.path == PeerPath::Relayed || session.path == PeerPath::Waiting {
                session.next_round = now;
                session.round_gap = ROUND_START;
            }
        }
    }

    /// Adds one direct address; true when it is new.
    fn add_direct(&mut self, peer: &NodeId, addr: SocketAddr, now: Instant) -> bool {
        let usable = addr.port() != 0 && !addr.ip().is_unspecified() && !addr.ip().is_multicast();
        if !usable || is_virtual(addr) || self.pass.contains(&addr) {
            return false;
        }
        // An address belongs to one session. A newer claim takes it only while the holder
        // has not heard from it recently (a peer restarted on the port another peer had); a
        // working path is never taken away by someone else's say-so.
        if let Some(other) = self.by_direct.get(&addr).copied() {
            if other == *peer {
                return false;
            }
            if let Some(session) = self.sessions.get_mut(&other) {
                // In use: confirmed by a pong (which only the holder's peer can sign) lately.
                // Mere packets from it prove nothing: they may be another node's.
                let in_use = session.direct.iter().any(|d| {
                    d.addr == addr
                        && d.confirmed.is_some_and(|c| now.saturating_duration_since(c) < HEARD_WITHIN)
                });
                if in_use {
                    return false;
                }
                session.direct.retain(|d| d.addr != addr);
            }
        }
        let Some(session) = self.sessions.get_mut(peer) else { return false };
        if session.direct.len() >= MAX_DIRECT {
            let current = match session.path {
                PeerPath::Direct(a) => Some(a),
                _ => None,
            };
            let evict = session
                .direct
                .iter()
                .enumerate()
                .filter(|(_, d)| Some(d.addr) != current)
                .min_by_key(|(_, d)| (d.confirmed.is_some(), d.added))
                .map(|(i, _)| i);
            if let Some(i) = evict {
                let gone = session.direct.remove(i);
                self.by_direct.remove(&gone.addr);
            }
        }
        session.direct.push(Direct::new(addr, now));
        self.by_direct.insert(addr, *peer);
        true
    }

    /// The peer is a new process: the direct addresses of the old one are forgotten (the new
    /// one's come with its introduction; if it took the old port, a probe confirms it anew).
    pub fn forget_direct(&mut self, peer: &NodeId) {
        let Some(session) = self.sessions.get_mut(peer) else { return };
        for direct in session.direct.drain(..) {
            if self.by_direct.get(&direct.addr) == Some(peer) {
                self.by_direct.remove(&direct.addr);
            }
        }
        session.heard = None;
    }

    /// The relay link a tracker opened to `peer` (a bare id: on the home tracker).
    pub fn set_link(&mut self, peer: &NodeId, link: impl Into<RelayLink>) {
        let link = link.into();
        let Some(session) = self.sessions.get_mut(peer) else { return };
        if let Some(old) = session.relay_link.replace(link) {
            self.by_link.remove(&old);
        }
        self.by_link.insert(link, *peer);
    }

    /// Every relay link of `slot` is gone (the tracker connection that carried them closed).
    pub fn clear_links(&mut self, slot: u16) {
        self.by_link.retain(|link, _| link.slot != slot);
        for session in self.sessions.values_mut() {
            if session.relay_link.is_some_and(|link| link.slot == slot) {
                session.relay_link = None;
            }
        }
    }

    /// Where a packet for `destination` goes; notes the send on a direct path.
    pub fn route(&mut self, destination: SocketAddr, now: Instant) -> Route {
        if !is_virtual(destination) {
            return Route::Pass;
        }
        let Some(peer) = self.by_virtual.get(&canonical(destination)).copied() else { return Route::Drop };
        let Some(session) = self.sessions.get_mut(&peer) else { return Route::Drop };
        match session.path {
            PeerPath::Direct(addr) => {
                if let Some(direct) = session.direct_mut(addr) {
                    direct.note_send(now);
                }
                Route::Direct(addr)
            }
            PeerPath::Relayed => match session.relay_link {
                Some(link) => Route::Relay(link),
                None => Route::Wait(peer),
            },
            PeerPath::Waiting => Route::Wait(peer),
        }
    }

    /// Keeps a packet for a session that has no path yet; false when full (dropped, as a
    /// congested link would, and QUIC resends it).
    pub fn hold(&mut self, peer: &NodeId, packet: Bytes, segment_size: Option<usize>) -> bool {
        let Some(session) = self.sessions.get_mut(peer) else { return false };
        if session.waiting.len() >= MAX_WAITING {
            return false;
        }
        session.waiting.push_back((packet, segment_size));
        true
    }

    /// Packets kept for `peer`, once it has a path.
    pub fn take_waiting(&mut self, peer: &NodeId) -> Vec<(Bytes, Option<usize>)> {
        match self.sessions.get_mut(peer) {
            Some(session) if session.path != PeerPath::Waiting => session.waiting.drain(..).collect(),
            _ => Vec::new(),
        }
    }

    /// What a packet from `source` is; notes that a direct path was heard from.
    pub fn arrival(&mut self, source: SocketAddr, now: Instant) -> Arrival {
        let source = canonical(source);
        if let Some(peer) = self.by_direct.get(&source).copied() {
            if let Some(session) = self.sessions.get_mut(&peer) {
                session.heard = Some(now);
                if let Some(direct) = session.direct_mut(source) {
                    direct.heard = Some(now);
                }
                return Arrival::Session(session.virtual_addr);
            }
        }
        if self.pass.contains(&source) {
            Arrival::Pass
        } else {
            Arrival::Drop
        }
    }

    /// The virtual address of the session a relay link belongs to; notes that the peer was
    /// heard from.
    pub fn link_arrival(&mut self, link: impl Into<RelayLink>, now: Instant) -> Option<SocketAddr> {
        let peer = self.by_link.get(&link.into())?;
        let session = self.sessions.get_mut(peer)?;
        session.heard = Some(now);
        Some(session.virtual_addr)
    }

    /// True when anything came from `peer` (on any path) within `within`.
    pub fn heard_within(&self, peer: &NodeId, within: Duration, now: Instant) -> bool {
        self.sessions
            .get(peer)
            .and_then(|s| s.heard)
            .is_some_and(|heard| now.saturating_duration_since(heard) <= within)
    }

    /// A valid ping from `peer` arrived from `source`: the address becomes a candidate
    /// (unconfirmed: only our own ping's pong confirms it). Returns a ping to send back when
    /// the address is not confirmed yet, so both sides confirm it. `None` for a peer without
    /// a session, whose pings are not answered.
    pub fn on_ping(
        &mut self,
        peer: &NodeId,
        source: SocketAddr,
        tx: [u8; TX_LEN],
        now: Instant,
    ) -> Option<Option<PingDue>> {
        if !self.policy.direct {
            return None;
        }
        if !self.sessions.contains_key(peer) {
            if self.early_pings.len() >= MAX_EARLY_PINGS {
                self.early_pings.pop_front();
            }
            self.early_pings.push_back((*peer, canonical(source), now));
            return None;
        }
        let source = canonical(source);
        self.add_direct(peer, source, now);
        let session = self.sessions.get_mut(peer)?;
        let direct = session.direct_mut(source)?;
        // A ping proves the way in is open now, so our own ping goes at once (even if one of
        // ours to it was just lost in a NAT that was still closed); but not to an address
        // confirmed a moment ago, and a flood of (replayed) pings from one address draws one
        // pong each and at most one ping every PING_BACK_GAP.
        let fresh = direct.confirmed.is_some_and(|c| now.saturating_duration_since(c) < HEARTBEAT);
        let recent = direct.pinged_back.is_some_and(|at| now.saturating_duration_since(at) < PING_BACK_GAP);
        if fresh || recent {
            return Some(None);
        }
        direct.pinged_back = Some(now);
        Some(Some(Self::note_ping(direct, *peer, tx, now)))
    }

    fn note_ping(direct: &mut Direct, peer: NodeId, tx: [u8; TX_LEN], now: Instant) -> PingDue {
        if direct.pings.len() >= MAX_PINGS {
            direct.pings.pop_front();
        }
        direct.pings.push_back((tx, now));
        PingDue { peer, addr: direct.addr, tx }
    }

    /// A valid pong from `peer` arrived from `source`. It confirms the address only if it
    /// answers a ping we sent to that very address. True when it did.
    pub fn on_pong(&mut self, peer: &NodeId, source: SocketAddr, tx: [u8; TX_LEN], now: Instant) -> bool {
        let source = canonical(source);
        let Some(direct) = self.sessions.get_mut(peer).and_then(|s| s.direct_mut(source)) else {
            return false;
        };
        let Some(i) = direct.pings.iter().position(|(sent_tx, _)| *sent_tx == tx) else { return false };
        let (_, sent) = direct.pings.remove(i).unwrap_or((tx, now));
        let rtt = now.saturating_duration_since(sent);
        direct.rtt = Some(match direct.rtt {
            Some(old) => (old * 3 + rtt) / 4,
            None => rtt,
        });
        direct.confirmed = Some(now);
        direct.heard = Some(now);
        true
    }

    /// Pings due now (heartbeats on the current direct path, probe rounds toward every
    /// candidate while no direct path works), with fresh tx values from `tx`.
    pub fn due_pings(&mut self, now: Instant, mut tx: impl FnMut() -> [u8; TX_LEN]) -> Vec<PingDue> {
        let mut due = Vec::new();
        if !self.policy.direct {
            return due;
        }
        for (peer, session) in &mut self.sessions {
            match session.path {
                PeerPath::Direct(addr) => {
                    if now >= session.next_heartbeat {
                        session.next_heartbeat = now + HEARTBEAT;
                        if let Some(direct) = session.direct_mut(addr) {
                            due.push(Self::note_ping(direct, *peer, tx(), now));
                        }
                    }
                }
                PeerPath::Relayed | PeerPath::Waiting => {
                    if now >= session.next_round && !session.direct.is_empty() {
                        session.next_round = now + session.round_gap;
                        session.round_gap = (session.round_gap * 2).min(ROUND_CAP);
                        for direct in &mut session.direct {
                            due.push(Self::note_ping(direct, *peer, tx(), now));
                        }
                    }
                }
            }
        }
        due
    }

    /// Re-chooses every session's path; returns the changes.
    pub fn reevaluate(&mut self, now: Instant) -> Vec<PathChange> {
        let policy = self.policy;
        let mut changes = Vec::new();
        for (peer, session) in &mut self.sessions {
            let path = session.choose(policy, now);
            if path != session.path {
                changes.push(PathChange { peer: *peer, path, was: session.path });
                if matches!(session.path, PeerPath::Direct(_)) && !matches!(path, PeerPath::Direct(_)) {
                    // Lost the direct path: probe fast again.
                    session.next_round = now;
                    session.round_gap = ROUND_START;
                }
                if matches!(path, PeerPath::Direct(_)) {
                    session.next_heartbeat = now + HEARTBEAT;
                }
                session.path = path;
                session.changed = now;
            }
        }
        changes
    }

    /// The smoothed probe RTT of the session's current direct path.
    #[cfg(test)]
    pub fn direct_rtt(&self, peer: &NodeId) -> Option<Duration> {
        let session = self.sessions.get(peer)?;
        match session.path {
            PeerPath::Direct(addr) => session.direct.iter().find(|d| d.addr == addr)?.rtt,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: PathPolicy = PathPolicy { direct: true, relay: true };

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("addr")
    }

    fn counter() -> impl FnMut() -> [u8; TX_LEN] {
        let mut n = 0u8;
        move || {
            n += 1;
            [n; TX_LEN]
        }
    }

    /// A session with `public` confirmed as its direct path at `now`; its virtual address.
    fn direct_session(table: &mut PathTable, peer: NodeId, public: SocketAddr, now: Instant) -> SocketAddr {
        let virt = table.open(peer, now);
        table.add_candidates(&peer, &[public], now);
        let ping = table.due_pings(now, counter())[0];
        assert!(table.on_pong(&peer, public, ping.tx, now));
        table.reevaluate(now);
        virt
    }

    #[test]
    fn a_session_waits_then_relays_then_goes_direct_on_a_pong() {
        let now = Instant::now();
        let mut table = PathTable::new(BOTH);
        let peer = id(1);
        let virt = table.open(peer, now);
        assert!(is_virtual(virt));
        assert_eq!(table.route(virt, now), Route::Wait(peer));
        assert!(table.hold(&peer, Bytes::from_static(b"initial"), None));

        table.set_link(&peer, 7);
        assert_eq!(
            table.reevaluate(now),
            vec![PathChange { peer, path: PeerPath::Relayed, was: PeerPath::Waiting }]
        );
        assert_eq!(table.route(virt, now), Route::Relay(7.into()));
        assert_eq!(table.take_waiting(&peer).len(), 1);
        assert_eq!(table.link_arrival(7, now), Some(virt));
        assert!(table.heard_within(&peer, Duration::ZERO, now));

        let public = addr("198.51.100.20:5000");
        table.add_candidates(&peer, &[public], now);
        let pings = table.due_pings(now, counter());
        assert_eq!(pings.len(), 1);
        assert_eq!(pings[0].addr, public);
        // A pong for another tx, or from another address, confirms nothing.
        assert!(!table.on_pong(&peer, public, [99; TX_LEN], now));
        assert!(!table.on_pong(&peer, addr("203.0.113.66:5000"), pings[0].tx, now));
        assert!(table.reevaluate(now).is_empty());
        let later = now + Duration::from_millis(30);
        assert!(table.on_pong(&peer, public, pings[0].tx, later));
        let changes = table.reevaluate(later);
        assert_eq!(
            changes,
            vec![PathChange { peer, path: PeerPath::Direct(public), was: PeerPath::Relayed }]
        );
        assert_eq!(table.route(virt, later), Route::Direct(public));
        assert_eq!(table.arrival(public, later), Arrival::Session(virt));
        assert_eq!(table.direct_rtt(&peer), Some(Duration::from_millis(30)));
    }

    #[test]
    fn a_quiet_direct_path_falls_back_to_the_relay_and_probing_resumes() {
        let start = Instant::now();
        let mut table = PathTable::new(BOTH);
        let peer = id(2);
        let public = addr("198.51.100.21:5000");
        let virt = direct_session(&mut table, peer, public, start);
        table.set_link(&peer, 3);
        // We keep sending; nothing comes back.
        let mut now = start;
        for _ in 0..20 {
            now += Duration::from_millis(100);
            assert_eq!(table.route(virt, now), Route::Direct(public));
        }
        let changes = table.reevaluate(now);
        assert_eq!(
            changes,
            vec![PathChange { peer, path: PeerPath::Relayed, was: PeerPath::Direct(public) }]
        );
        // Probe rounds start again at once.
        assert_eq!(table.due_pings(now, counter()).len(), 1);
    }

    #[test]
    fn a_send_just_before_a_late_heartbeat_pong_is_not_silence() {
        let start = Instant::now();
        let mut table = PathTable::new(BOTH);
        let peer = id(7);
        let public = addr("198.51.100.25:5000");
        let virt = direct_session(&mut table, peer, public, start);
        // Last heard 1.6 s ago (a heartbeat pong still on its way); one packet goes out now.
        let now = start + Duration::from_millis(1600);
        table.route(virt, now);
        assert!(table.reevaluate(now + Duration::from_millis(100)).is_empty());
        // Its answer arrives: still direct; silence only counts from an unanswered send.
        table.arrival(public, now + Duration::from_millis(150));
        assert!(table.reevaluate(now + Duration::from_millis(1400)).is_empty());
    }

    #[test]
    fn heartbeats_keep_an_idle_direct_path_and_silence_loses_it() {
        let start = Instant::now();
        let mut table = PathTable::new(BOTH);
        let peer = id(3);
        table.open(peer, start);
        let public = addr("198.51.100.22:5000");
        table.add_candidates(&peer, &[public], start);
        let mut tx = counter();
        let ping = table.due_pings(start, &mut tx)[0];
        table.on_pong(&peer, public, ping.tx, start);
        table.reevaluate(start);
        let mut now = start;
        for _ in 0..10 {
            now += HEARTBEAT;
            let beats = table.due_pings(now, &mut tx);
            assert_eq!(beats.len(), 1, "a heartbeat on the direct path");
            table.on_pong(&peer, public, beats[0].tx, now);
            assert!(table.reevaluate(now).is_empty());
        }
        now += HEARD_WITHIN + Duration::from_millis(1);
        assert_eq!(table.reevaluate(now)[0].path, PeerPath::Waiting, "no relay link: nothing left");
    }

    #[test]
    fn pings_from_unknown_peers_are_ignored_and_pings_answer_back() {
        let now = Instant::now();
        let mut table = PathTable::new(BOTH);
        let from = addr("203.0.113.5:7000");
        assert_eq!(table.on_ping(&id(4), from, [1; TX_LEN], now), None);
        assert_eq!(table.arrival(from, now), Arrival::Drop);
        table.open(id(4), now);
        // The early ping's source is a candidate of the new session, probed at once.
        let early = table.due_pings(now, counter());
        assert_eq!(early.iter().map(|p| p.addr).collect::<Vec<_>>(), vec![from]);
        let later = now + PING_BACK_GAP;
        let back = table.on_ping(&id(4), from, [1; TX_LEN], now).expect("a session");
        assert_eq!(back.map(|p| p.addr), Some(from), "we ping the new address ourselves");
        // A flood of pings from it: pongs only, until PING_BACK_GAP has passed.
        assert_eq!(table.on_ping(&id(4), from, [2; TX_LEN], now), Some(None));
        assert!(matches!(table.on_ping(&id(4), from, [3; TX_LEN], later), Some(Some(_))));
        // Learned from a ping only: packets from it reach the session, but it is not a path.
        assert!(matches!(table.arrival(from, now), Arrival::Session(_)));
        assert!(table.reevaluate(now).is_empty());
    }

    #[test]
    fn the_faster_of_two_direct_paths_wins_and_policies_hold() {
        let now = Instant::now();
        let mut table = PathTable::new(BOTH);
        let peer = id(5);
        table.open(peer, now);
        let (lan, public) = (addr("10.1.1.2:5000"), addr("198.51.100.23:5000"));
        let ms = |n| now + Duration::from_millis(n);
        table.add_candidates(&peer, &[public], now);
        let ping = table.due_pings(now, counter())[0];
        table.on_pong(&peer, public, ping.tx, ms(20));
        assert_eq!(table.reevaluate(ms(20))[0].path, PeerPath::Direct(public));
        // A LAN address learned later answers in 2 ms: clearly faster, so it takes over.
        table.add_direct(&peer, lan, ms(30));
        let ping = table
            .sessions
            .get_mut(&peer)
            .and_then(|s| s.direct_mut(lan))
            .map(|d| PathTable::note_ping(d, peer, [42; TX_LEN], ms(30)))
            .expect("lan");
        table.on_pong(&peer, lan, ping.tx, ms(32));
        let changes = table.reevaluate(ms(32));
        assert_eq!(changes[0].path, PeerPath::Direct(lan));
        assert_eq!(changes[0].was, PeerPath::Direct(public));

        let mut relay_only = PathTable::new(PathPolicy { direct: false, relay: true });
        relay_only.open(peer, now);
        relay_only.add_candidates(&peer, &[public], now);
        assert!(relay_only.due_pings(now, counter()).is_empty());
        let mut direct_only = PathTable::new(PathPolicy { direct: true, relay: false });
        direct_only.open(peer, now);
        direct_only.set_link(&peer, 1);
        assert!(direct_only.reevaluate(now).is_empty(), "--no-relay never uses the link");
    }

    /// Confirms `addr` for `peer` with a ping sent at `sent` and its pong at `answered`.
    fn confirm(table: &mut PathTable, peer: NodeId, addr: SocketAddr, sent: Instant, answered: Instant) {
        table.add_direct(&peer, addr, sent);
        let ping = table
            .sessions
            .get_mut(&peer)
            .and_then(|s| s.direct_mut(addr))
            .map(|d| PathTable::note_ping(d, peer, [77; TX_LEN], sent))
            .expect("a direct address");
        assert!(table.on_pong(&peer, addr, ping.tx, answered));
    }

    #[test]
    fn a_usable_ipv6_path_is_preferred_over_a_faster_ipv4_one() {
        let now = Instant::now();
        let ms = |n| now + Duration::from_millis(n);
        let mut table = PathTable::new(BOTH);
        let peer = id(8);
        let (v4, v6) = (addr("198.51.100.26:5000"), addr("[2001:db8:3::2]:5000"));
        let virt = direct_session(&mut table, peer, v4, now);
        assert_eq!(table.route(virt, now), Route::Direct(v4));
        // IPv6 answers, slower than IPv4 (5 ms against 0): it takes over all the same.
        confirm(&mut table, peer, v6, ms(10), ms(15));
        let changes = table.reevaluate(ms(15));
        assert_eq!(changes, vec![PathChange { peer, path: PeerPath::Direct(v6), was: PeerPath::Direct(v4) }]);
        // A much faster IPv4 path does not take it back while IPv6 works.
        confirm(&mut table, peer, v4, ms(20), ms(20));
        assert!(table.reevaluate(ms(20)).is_empty());
        assert_eq!(table.route(virt, ms(20)), Route::Direct(v6));
        // Among IPv6 paths the RTT rule holds: a clearly faster one wins.
        let lan6 = addr("[2001:db8:3::9]:5000");
        confirm(&mut table, peer, lan6, ms(30), ms(31));
        assert_eq!(table.reevaluate(ms(31))[0].path, PeerPath::Direct(lan6));
    }

    #[test]
    fn v4_mapped_addresses_are_ipv4_paths() {
        // A dual-stack socket reports IPv4 peers as v4-mapped: the table keeps them plain IPv4,
        // so they are never taken for IPv6 paths.
        let now = Instant::now();
        let mut table = PathTable::new(BOTH);
        let peer = id(9);
        let mapped = addr("[::ffff:198.51.100.27]:5000");
        let virt = direct_session(&mut table, peer, mapped, now);
        assert_eq!(table.route(virt, now), Route::Direct(addr("198.51.100.27:5000")));
        assert_eq!(table.arrival(mapped, now), Arrival::Session(virt));
    }

    #[test]
    fn closing_a_session_forgets_its_addresses() {
        let now = Instant::now();
        let mut table = PathTable::new(BOTH);
        let peer = id(6);
        let virt = table.open(peer, now);
        let public = addr("198.51.100.24:5000");
        table.add_candidates(&peer, &[public], now);
        table.set_link(&peer, 9);
        table.close(&peer);
        assert_eq!(table.sessions(), 0);
        assert_eq!(table.route(virt, now), Route::Drop);
        assert_eq!(table.arrival(public, now), Arrival::Drop);
        assert_eq!(table.link_arrival(9, now), None);
        let tracker = addr("198.51.100.1:4433");
        table.allow_pass(tracker);
        assert_eq!(table.arrival(tracker, now), Arrival::Pass);
        assert_eq!(table.route(tracker, now), Route::Pass);
    }
}
