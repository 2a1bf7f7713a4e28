//! What transfers tell the user (carried as [`crate::events::NodeEvent::Transfer`]), and the
//! byte counter that reports a transfer's progress without flooding the channel.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use qpeer_certs::NodeId;
use qpeer_wire::transfer::TransferId;

use super::send::SendReport;
use crate::events::Events;

/// Least time between two [`TransferEvent::Progress`] of one transfer (the last one of a
/// transfer is always reported).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Which way a transfer's bytes go, seen from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Sending,
    Receiving,
}

/// How far one transfer has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferProgress {
    pub transfer: TransferId,
    pub peer: NodeId,
    pub direction: Direction,
    /// Bytes the receiver holds so far (resumed and already-present files included), at most
    /// `total`.
    pub done: u64,
    /// Bytes of all files in the offer.
    pub total: u64,
    /// Since the transfer started here.
    pub elapsed: Duration,
}

/// Something that happened in a transfer, on either side. Reasons are the words the peer is
/// told (or told us): they travel as text on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum TransferEvent {
    /// We accepted `peer`'s offer of `files` files, `bytes` bytes, into `into`.
    OfferAccepted { transfer: TransferId, peer: NodeId, files: usize, bytes: u64, into: PathBuf },
    /// We refused `peer`'s offer (or could not read it).
    Rejected { peer: NodeId, reason: String },
    /// A file arrived whole and verified (`already_here`: it was, and matched).
    Received {
        transfer: TransferId,
        peer: NodeId,
        path: PathBuf,
        size: u64,
        blake3: [u8; 32],
        already_here: bool,
    },
    /// A received file did not match its hash: discarded, asked for again.
    Corrupt { transfer: TransferId, peer: NodeId, path: PathBuf },
    /// A file could not be received; what arrived is kept for a resume.
    FileFailed { transfer: TransferId, peer: NodeId, path: PathBuf, reason: String },
    /// The receiver's copy of a file we sent did not verify: sending it again.
    Retry { transfer: TransferId, peer: NodeId, path: String },
    /// Bytes so far, at most every [`PROGRESS_INTERVAL`] per transfer, and once at its end.
    Progress(TransferProgress),
    /// The receiver verified every file we sent.
    Sent { transfer: TransferId, peer: NodeId, report: SendReport },
    /// Our send ended without every file verified.
    SendFailed { transfer: TransferId, peer: NodeId, reason: String },
    /// The sender is done with an accepted offer (`finished`: it said so, rather than the
    /// stream or connection ending): `files` files, `bytes` bytes verified here.
    ReceiveEnded { transfer: TransferId, peer: NodeId, files: u32, bytes: u64, finished: bool },
}

/// Counts one transfer's bytes (from any task) and reports them as
/// [`TransferEvent::Progress`], throttled to one event per [`PROGRESS_INTERVAL`].
#[derive(Debug)]
pub(crate) struct ProgressCounter {
    events: Events,
    transfer: TransferId,
    peer: NodeId,
    direction: Direction,
    total: u64,
    done: AtomicU64,
    started: Instant,
    last_report: parking_lot::Mutex<Instant>,
}

impl ProgressCounter {
    pub(crate) fn new(
        events: Events,
        transfer: TransferId,
        peer: NodeId,
        direction: Direction,
        total: u64,
    ) -> Self {
        let started = Instant::now();
        Self {
            events,
            transfer,
            peer,
            direction,
            total,
            done: AtomicU64::new(0),
            started,
            last_report: parking_lot::Mutex::new(started),
        }
    }

    /// Counts `bytes` more; reports if the last report is old enough.
    pub(crate) fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        let mut last = self.last_report.lock();
        if last.elapsed() >= PROGRESS_INTERVAL {
            *last = Instant::now();
            drop(last);
            self.emit();
        }
    }

    /// Reports now, whenever the last report was (the first and the last of a transfer).
    pub(crate) fn report(&self) {
        *self.last_report.lock() = Instant::now();
        self.emit();
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn transfer(&self) -> TransferId {
        self.transfer
    }

    pub(crate) fn peer(&self) -> NodeId {
        self.peer
    }

    pub(crate) fn events(&self) -> &Events {
        &self.events
    }

    fn emit(&self) {
        self.events.transfer(TransferEvent::Progress(TransferProgress {
            transfer: self.transfer,
            peer: self.peer,
            direction: self.direction,
            // A file sent again after a failed verification counts twice.
            done: self.done.load(Ordering::Relaxed).min(self.total),
            total: self.total,
            elapsed: self.started.elapsed(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeEvent;

    fn progress_of(event: NodeEvent) -> TransferProgress {
        match event {
            NodeEvent::Transfer(TransferEvent::Progress(progress)) => progress,
            other => panic!("expected progress, got {other:?}"),
        }
    }

    #[test]
    fn progress_is_throttled_capped_and_reported_at_the_end() {
        let events = Events::new();
        let mut rx = events.subscribe();
        let peer: NodeId = "ab".repeat(32).parse().expect("a node id");
        let counter = ProgressCounter::new(events, [1; 16], peer, Direction::Sending, 1000);
        counter.report();
        for _ in 0..50 {
            counter.add(30);
        }
        std::thread::sleep(PROGRESS_INTERVAL);
        counter.add(0);
        counter.report();
        let first = progress_of(rx.try_recv().expect("the first report"));
        assert_eq!((first.done, first.total, first.direction), (0, 1000, Direction::Sending));
        let throttled = progress_of(rx.try_recv().expect("a report after the interval"));
        assert_eq!(throttled.done, 1000, "1500 bytes counted, shown as at most the total");
        let last = progress_of(rx.try_recv().expect("the final report"));
        assert_eq!(last.done, 1000);
        assert!(rx.try_recv().is_err(), "50 quick additions are not 50 events");
    }
}
