//! The prober: the one task that sends and answers path probes, and re-chooses paths.
//!
//! It answers valid pings addressed to us (from peers with a session), checks pongs against
//! the pings we sent, sends heartbeats and probe rounds when the path table says they are
//! due, and every [`TICK`] re-chooses every session's path: it reports each change and sends
//! what waited for a session's first path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use qpeer_certs::Identity;
use qpeer_wire::probe::{Probe, ProbeKind, TX_LEN};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::paths::{PathChange, PathTable, PingDue};
use crate::random_bytes;
use crate::socket::{PathSocket, ProbeDatagram};

/// How often paths are re-chosen and due probes sent.
pub const TICK: Duration = Duration::from_millis(100);

/// Called with every path change.
pub type OnChange = Box<dyn Fn(PathChange) + Send + Sync>;

pub struct Prober {
    pub identity: Arc<Identity>,
    pub incarnation: u64,
    pub table: Arc<Mutex<PathTable>>,
    pub socket: Arc<PathSocket>,
    /// A second handle on the endpoint's UDP socket (same port): probes must leave from the
    /// socket QUIC uses, so they open the same NAT mappings.
    pub udp: std::net::UdpSocket,
    pub on_change: OnChange,
}

impl Prober {
    pub async fn run(self: Arc<Self>, mut probes: mpsc::Receiver<ProbeDatagram>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                datagram = probes.recv() => match datagram {
                    Some((source, bytes)) => self.on_probe(source, &bytes),
                    None => return,
                },
                _ = tick.tick() => self.tick(),
            }
        }
    }

    /// Sends due probes and re-chooses paths.
    pub fn tick(&self) {
        let now = Instant::now();
        let due = self.table.lock().due_pings(now, random_bytes::<TX_LEN>);
        for ping in due {
            self.send_ping(ping);
        }
        self.reevaluate(now);
    }

    fn reevaluate(&self, now: Instant) {
        let changes = self.table.lock().reevaluate(now);
        for change in changes {
            self.socket.flush(&change.peer);
            (self.on_change)(change);
        }
    }

    fn send(&self, probe: &Probe, to: SocketAddr) {
        match probe.encode(&self.identity) {
            // A full send buffer skips this probe; the next round sends another.
            Ok(bytes) => {
                let _ = self.udp.send_to(&bytes, self.socket.for_socket(to));
            }
            Err(e) => tracing::warn!("cannot sign a probe: {e}"),
        }
    }

    fn send_ping(&self, ping: PingDue) {
        let probe = Probe {
            kind: ProbeKind::Ping,
            from: self.identity.node_id(),
            to: ping.peer,
            tx: ping.tx,
            observed: None,
            incarnation: self.incarnation,
        };
        self.send(&probe, ping.addr);
    }

    fn on_probe(&self, source: SocketAddr, bytes: &[u8]) {
        let me = self.identity.node_id();
        // Probes for someone else are dropped before their signature costs anything.
        if Probe::addressed_to(bytes) != Some(me) {
            return;
        }
        let probe = match Probe::decode(bytes) {
            Ok(probe) => probe,
            Err(e) => {
                tracing::debug!(%source, "dropping a probe: {e}");
                return;
            }
        };
        let now = Instant::now();
        match probe.kind {
            ProbeKind::Ping => {
                let answer = self.table.lock().on_ping(&probe.from, source, random_bytes(), now);
                let Some(ping_back) = answer else { return };
                let pong = Probe {
                    kind: ProbeKind::Pong,
                    from: me,
                    to: probe.from,
                    tx: probe.tx,
                    // Plain IPv4 for an IPv4 peer, not the v4-mapped form a dual-stack
                    // socket reports.
                    observed: Some(qpeer_wire::canonical(source)),
                    incarnation: self.incarnation,
                };
                self.send(&pong, source);
                if let Some(ping) = ping_back {
                    self.send_ping(ping);
                }
            }
            ProbeKind::Pong => {
                if self.table.lock().on_pong(&probe.from, source, probe.tx, now) {
                    self.reevaluate(now);
                }
            }
        }
    }
}
