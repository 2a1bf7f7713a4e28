//! What keeps one client from hurting the others: the configured [`Limits`], the per-address
//! connection count ([`ConnectionCounter`]) and the token buckets that pace introductions and
//! relay traffic.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use qpeer_wire::tracker::MAX_FRAME_LEN;

/// Limits that keep one client from hurting the others. Defaults suit a public tracker.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most nodes registered at once.
    pub max_nodes: usize,
    /// Largest frame body accepted, in bytes (capped at [`MAX_FRAME_LEN`]).
    pub max_frame_len: usize,
    /// Introductions a node may request per second (sustained).
    pub introductions_per_sec: u32,
    /// Introductions a node may request in a burst.
    pub introduction_burst: u32,
    /// Most simultaneous connections from one source IP, handshakes included.
    pub max_connections_per_ip: usize,
    /// Time allowed from handshake to `Register`.
    pub register_timeout: Duration,
    /// Time allowed to finish a frame once its first byte arrived.
    pub partial_frame_timeout: Duration,
    /// A connection with no packets for this long is dropped (nodes send keep-alives).
    pub idle_timeout: Duration,
    /// Relay bytes per second one node may send (bursts up to a quarter second's worth).
    pub relay_bytes_per_sec: u32,
    /// Relay packets per second one node may send.
    pub relay_packets_per_sec: u32,
    /// DHT requests (`Publish`, `Resolve`) one node may make per second (sustained): each
    /// walks the DHT.
    pub dht_requests_per_sec: u32,
    /// DHT requests one node may make in a burst.
    pub dht_request_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_nodes: 100_000,
            max_frame_len: MAX_FRAME_LEN,
            introductions_per_sec: 10,
            introduction_burst: 20,
            max_connections_per_ip: 64,
            register_timeout: Duration::from_secs(10),
            partial_frame_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(45),
            relay_bytes_per_sec: 64 << 20,
            relay_packets_per_sec: 100_000,
            dht_requests_per_sec: 2,
            dht_request_burst: 10,
        }
    }
}

impl Limits {
    /// The bucket pacing one node's introduction requests.
    pub fn introduction_bucket(&self, now: Instant) -> TokenBucket {
        TokenBucket::new(self.introductions_per_sec, self.introduction_burst, now)
    }

    /// The bucket pacing one node's DHT requests (publish and resolve together).
    pub fn dht_bucket(&self, now: Instant) -> TokenBucket {
        TokenBucket::new(self.dht_requests_per_sec, self.dht_request_burst, now)
    }

    /// The buckets pacing what one node sends through the relay: bursts of a quarter
    /// second's worth, and never less than one large packet train.
    pub fn relay_budget(&self, now: Instant) -> RelayBudget {
        RelayBudget {
            bytes: TokenBucket::new(
                self.relay_bytes_per_sec,
                (self.relay_bytes_per_sec / 4).max(64 * 1024),
                now,
            ),
            packets: TokenBucket::new(
                self.relay_packets_per_sec,
                (self.relay_packets_per_sec / 4).max(64),
                now,
            ),
        }
    }
}

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

/// What one node may still send through the relay.
#[derive(Debug, Clone)]
pub struct RelayBudget {
    bytes: TokenBucket,
    packets: TokenBucket,
}

impl RelayBudget {
    /// Takes one packet of `bytes` from the budget if it allows it.
    pub fn try_spend(&mut self, bytes: u64, now: Instant) -> bool {
        self.packets.try_take(now) && self.bytes.try_take_n(bytes, now)
    }
}

/// Open connections by source IP, capped per IP, counted from the first packet so that an
/// address over its limit costs no TLS work.
///
/// A handshake from an address not yet proven (a first Initial, whose source anyone can
/// forge) takes an *unproven* slot; one from a proven address (it answered a stateless Retry)
/// or a finished handshake takes a *proven* one. Each kind has `max_per_ip` slots. When the
/// unproven slots are full, or an unproven address has no proven slot left, the address is
/// asked to prove itself with a Retry: forged Initials can fill an address's unproven slots
/// but never lock its owner out, and a real address over its limit is refused after one
/// stateless round trip.
#[derive(Debug)]
pub struct ConnectionCounter {
    max_per_ip: usize,
    open: Mutex<HashMap<IpAddr, SlotCounts>>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SlotCounts {
    proven: usize,
    unproven: usize,
}

/// What to do with a new connection attempt.
#[derive(Debug)]
pub enum Admission {
    /// Go on with the handshake; the slot counts it until it is dropped.
    Admit(ConnectionSlot),
    /// Ask the client to prove its address first (a stateless Retry).
    Retry,
    /// The proven address holds its limit: refuse before TLS.
    Refuse,
}

impl ConnectionCounter {
    pub fn new(max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self { max_per_ip, open: Mutex::default() })
    }

    /// Decides on a connection from `ip`; `proven`: its address is validated (a Retry token).
    pub fn admit(self: &Arc<Self>, ip: IpAddr, proven: bool) -> Admission {
        let mut open = self.open.lock();
        let counts = open.entry(ip).or_default();
        let admission = if counts.proven >= self.max_per_ip {
            if proven {
                Admission::Refuse
            } else {
                Admission::Retry
            }
        } else if proven {
            counts.proven += 1;
            Admission::Admit(ConnectionSlot { counter: self.clone(), ip, proven: true })
        } else if counts.unproven < self.max_per_ip {
            counts.unproven += 1;
            Admission::Admit(ConnectionSlot { counter: self.clone(), ip, proven: false })
        } else {
            Admission::Retry
        };
        if *counts == SlotCounts::default() {
            open.remove(&ip);
        }
        admission
    }
}

/// One counted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionSlot {
    counter: Arc<ConnectionCounter>,
    ip: IpAddr,
    proven: bool,
}

impl ConnectionSlot {
    /// The handshake finished, which proves the address: the connection moves to a proven
    /// slot. False (the slot stays as it was) when the address holds its limit of proven
    /// connections.
    pub fn prove(&mut self) -> bool {
        if self.proven {
            return true;
        }
        let mut open = self.counter.open.lock();
        let Some(counts) = open.get_mut(&self.ip) else { return false };
        if counts.proven >= self.counter.max_per_ip {
            return false;
        }
        counts.unproven = counts.unproven.saturating_sub(1);
        counts.proven += 1;
        self.proven = true;
        true
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.counter.open.lock();
        if let Some(counts) = open.get_mut(&self.ip) {
            if self.proven {
                counts.proven = counts.proven.saturating_sub(1);
            } else {
                counts.unproven = counts.unproven.saturating_sub(1);
            }
            if *counts == SlotCounts::default() {
                open.remove(&self.ip);
            }
        }
    }
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
    fn relay_budget_limits_packets_and_bytes() {
        let start = Instant::now();
        let limits = Limits { relay_packets_per_sec: 4, relay_bytes_per_sec: 1 << 20, ..Limits::default() };
        let mut budget = limits.relay_budget(start);
        // The packet burst floor is 64 packets; the byte burst is a quarter second's worth.
        assert!((0..64).all(|_| budget.try_spend(1, start)));
        assert!(!budget.try_spend(1, start), "past the packet burst");
        let mut budget = limits.relay_budget(start);
        assert!(budget.try_spend(256 * 1024, start));
        assert!(!budget.try_spend(1, start), "past the byte burst");
    }

    fn admitted(admission: Admission) -> ConnectionSlot {
        match admission {
            Admission::Admit(slot) => slot,
            other => panic!("expected admission, got {other:?}"),
        }
    }

    #[test]
    fn proven_connections_are_capped_per_address_and_released() {
        let counter = ConnectionCounter::new(2);
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let first = admitted(counter.admit(ip, true));
        let _second = admitted(counter.admit(ip, true));
        assert!(matches!(counter.admit(ip, true), Admission::Refuse));
        assert!(matches!(counter.admit(ip, false), Admission::Retry), "unproven: prove it first");
        assert_eq!(counter.open.lock().get(&ip), Some(&SlotCounts { proven: 2, unproven: 0 }));
        drop(first);
        admitted(counter.admit(ip, true));
        let other: IpAddr = "127.0.0.2".parse().expect("ip");
        admitted(counter.admit(other, true));
    }

    #[test]
    fn forged_initials_cannot_lock_an_address_out() {
        let counter = ConnectionCounter::new(2);
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let _forged = [admitted(counter.admit(ip, false)), admitted(counter.admit(ip, false))];
        assert!(matches!(counter.admit(ip, false), Admission::Retry), "unproven slots full: Retry");
        // The address's owner answers the Retry and gets in.
        admitted(counter.admit(ip, true));
    }

    #[test]
    fn a_finished_handshake_takes_a_proven_slot_if_one_is_left() {
        let counter = ConnectionCounter::new(1);
        let ip: IpAddr = "10.0.0.2".parse().expect("ip");
        let mut first = admitted(counter.admit(ip, false));
        let mut second = admitted(counter.admit(ip, true));
        assert!(second.prove(), "already proven");
        assert!(!first.prove(), "the one proven slot is taken");
        drop(second);
        assert!(first.prove());
        assert_eq!(counter.open.lock().get(&ip), Some(&SlotCounts { proven: 1, unproven: 0 }));
        drop(first);
        assert!(counter.open.lock().is_empty(), "nothing left counted");
    }

    #[test]
    fn a_zero_limit_refuses_everything_and_keeps_no_entry() {
        let counter = ConnectionCounter::new(0);
        let ip: IpAddr = "10.0.0.3".parse().expect("ip");
        assert!(matches!(counter.admit(ip, false), Admission::Retry));
        assert!(matches!(counter.admit(ip, true), Admission::Refuse));
        assert!(counter.open.lock().is_empty());
    }
}
