//! What transfers tell the user (carried as [`crate::events::NodeEvent::Transfer`]), and the
//! byte counter that reports a transfer's progress without flooding the channel.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use qpeer_certs::NodeId;
use qpeer_wire::transfer::TransferId;

use super::scan::Skipped;
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

/// How far one file being sent or received has come (in [`TransferProgress::active`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProgress {
    /// The offered path (`/` separators).
    pub path: String,
    pub size: u64,
    /// Bytes of this file the receiver holds, at most `size` (`already` included).
    pub done: u64,
    /// Bytes of `done` that were there before this transfer (a resumed `.part`).
    pub already: u64,
}

/// How far one transfer has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferProgress {
    pub transfer: TransferId,
    pub peer: NodeId,
    pub direction: Direction,
    /// Bytes the receiver holds so far (resumed and already-present files included), at most
    /// `total`. A file sent again after a failed verification starts again from zero here,
    /// so `done / total` never passes 100 %.
    pub done: u64,
    /// Bytes of all files in the offer.
    pub total: u64,
    /// Since the transfer started here.
    pub elapsed: Duration,
    /// Bytes of `done` that were at the receiver before this transfer (resumed `.part`s and
    /// files already there): not transferred now.
    pub already: u64,
    /// Bytes carried over the connection in this transfer (retries included): what a rate is
    /// computed from ([`TransferProgress::rate`]).
    pub sent_now: u64,
    /// Files finished (verified, already there, refused or failed) and files in the offer.
    pub files_done: u32,
    pub files: u32,
    /// The files being sent or received right now (at most a few), in file-index order.
    pub active: Vec<FileProgress>,
}

impl TransferProgress {
    /// Bytes per second carried now (`sent_now / elapsed`; bytes already there excluded).
    pub fn rate(&self) -> f64 {
        rate(self.sent_now, self.elapsed)
    }

    /// Time left at the current rate; `None` before any byte was carried.
    pub fn eta(&self) -> Option<Duration> {
        eta(self.total.saturating_sub(self.done), self.rate())
    }
}

/// `bytes / elapsed` in bytes per second (0 for no time).
pub fn rate(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / secs
    } else {
        0.0
    }
}

fn eta(left: u64, rate: f64) -> Option<Duration> {
    if left == 0 {
        return Some(Duration::ZERO);
    }
    (rate > 0.0).then(|| Duration::from_secs_f64((left as f64 / rate).min(1e9)))
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
    ReceiveEnded {
        transfer: TransferId,
        peer: NodeId,
        files: u32,
        bytes: u64,
        finished: bool,
        /// Since the offer was accepted.
        elapsed: Duration,
        /// Bytes that came over the connection in this transfer (rate: `received_now /
        /// elapsed`, see [`rate`]).
        received_now: u64,
        /// Bytes that were here already (resumed `.part`s, files already here).
        already: u64,
        /// Entries refused ([`TransferEvent::Refused`]) or failed.
        refused: u32,
    },
    /// Sender: the receiver confirmed one file. `already_there`: it held the whole file, no
    /// data was sent; otherwise `resumed_from` bytes were in its `.part` and `sent_now`
    /// bytes were sent (more than `size - resumed_from` after a retry).
    FileSent {
        transfer: TransferId,
        peer: NodeId,
        path: String,
        size: u64,
        resumed_from: u64,
        sent_now: u64,
        already_there: bool,
    },
    /// An entry was refused, with the reason. `Receiving`: we refused `peer`'s file or link
    /// (the sender is told `reason`); `Sending`: `peer` refused ours.
    Refused { transfer: TransferId, peer: NodeId, direction: Direction, path: String, reason: String },
    /// Receiver: a symbolic link was created (`already_here`: the same link was there).
    Linked { transfer: TransferId, peer: NodeId, path: PathBuf, target: String, already_here: bool },
    /// Sender: a path inside a directory being sent is left out (a warning; the rest goes).
    Skipped { transfer: TransferId, peer: NodeId, path: PathBuf, reason: Skipped },
}

/// One file's share of a [`ProgressCounter`].
#[derive(Debug)]
struct FileCount {
    progress: FileProgress,
    active: bool,
    finished: bool,
}

#[derive(Debug)]
struct Counts {
    done: u64,
    already: u64,
    sent_now: u64,
    files_done: u32,
    files: BTreeMap<u32, FileCount>,
    last_report: Instant,
}

/// Counts one transfer's bytes per file (from any task) and reports them as
/// [`TransferEvent::Progress`], throttled to one event per [`PROGRESS_INTERVAL`].
#[derive(Debug)]
pub(crate) struct ProgressCounter {
    events: Events,
    transfer: TransferId,
    peer: NodeId,
    direction: Direction,
    total: u64,
    files: u32,
    started: Instant,
    counts: parking_lot::Mutex<Counts>,
}

impl ProgressCounter {
    pub(crate) fn new(
        events: Events,
        transfer: TransferId,
        peer: NodeId,
        direction: Direction,
        total: u64,
        files: u32,
    ) -> Self {
        let started = Instant::now();
        Self {
            events,
            transfer,
            peer,
            direction,
            total,
            files,
            started,
            counts: parking_lot::Mutex::new(Counts {
                done: 0,
                already: 0,
                sent_now: 0,
                files_done: 0,
                files: BTreeMap::new(),
                last_report: started,
            }),
        }
    }

    /// File `index` (`path`, `size` bytes) starts (again) being carried.
    pub(crate) fn start_file(&self, index: u32, path: &str, size: u64) {
        let mut counts = self.counts.lock();
        let file = counts.files.entry(index).or_insert_with(|| FileCount {
            progress: FileProgress { path: path.to_string(), size, done: 0, already: 0 },
            active: false,
            finished: false,
        });
        file.active = true;
    }

    /// `bytes` of file `index` were at the receiver already (a resumed `.part`, or the whole
    /// file).
    pub(crate) fn already(&self, index: u32, bytes: u64) {
        self.count(index, bytes, true);
    }

    /// `bytes` more of file `index` were carried now.
    pub(crate) fn add(&self, index: u32, bytes: u64) {
        self.count(index, bytes, false);
    }

    fn count(&self, index: u32, bytes: u64, already: bool) {
        let mut guard = self.counts.lock();
        let counts = &mut *guard;
        // The first bytes carried are reported at once: they tell when data began to flow.
        let first = !already && counts.sent_now == 0 && bytes > 0;
        if !already {
            counts.sent_now += bytes;
        }
        if let Some(file) = counts.files.get_mut(&index) {
            let room = file.progress.size - file.progress.done;
            let counted = bytes.min(room);
            file.progress.done += counted;
            counts.done += counted;
            if already {
                file.progress.already += counted;
                counts.already += counted;
            }
        }
        if first || counts.last_report.elapsed() >= PROGRESS_INTERVAL {
            counts.last_report = Instant::now();
            let progress = self.snapshot(counts);
            drop(guard);
            self.events.transfer(TransferEvent::Progress(progress));
        }
    }

    /// File `index` is sent again from zero (its copy did not verify): what it counted is
    /// taken back, so the total never passes 100 %.
    pub(crate) fn restart_file(&self, index: u32) {
        let mut counts = self.counts.lock();
        let counts = &mut *counts;
        if let Some(file) = counts.files.get_mut(&index) {
            counts.done -= file.progress.done;
            counts.already -= file.progress.already;
            file.progress.done = 0;
            file.progress.already = 0;
        }
    }

    /// File `index` is no longer being carried; `finished`: it has its result (verified,
    /// already there, refused or failed), rather than being about to be sent again.
    pub(crate) fn end_file(&self, index: u32, finished: bool) {
        let mut counts = self.counts.lock();
        let counts = &mut *counts;
        if let Some(file) = counts.files.get_mut(&index) {
            file.active = false;
            if finished && !std::mem::replace(&mut file.finished, true) {
                counts.files_done += 1;
            }
        }
    }

    /// Reports now, whenever the last report was (the first and the last of a transfer).
    pub(crate) fn report(&self) {
        let mut counts = self.counts.lock();
        counts.last_report = Instant::now();
        let progress = self.snapshot(&counts);
        drop(counts);
        self.events.transfer(TransferEvent::Progress(progress));
    }

    /// The counts now.
    pub(crate) fn progress(&self) -> TransferProgress {
        self.snapshot(&self.counts.lock())
    }

    fn snapshot(&self, counts: &Counts) -> TransferProgress {
        TransferProgress {
            transfer: self.transfer,
            peer: self.peer,
            direction: self.direction,
            done: counts.done.min(self.total),
            total: self.total,
            elapsed: self.started.elapsed(),
            already: counts.already.min(self.total),
            sent_now: counts.sent_now,
            files_done: counts.files_done,
            files: self.files,
            active: counts.files.values().filter(|f| f.active).map(|f| f.progress.clone()).collect(),
        }
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
    fn progress_is_throttled_per_file_and_a_retry_never_passes_the_total() {
        let events = Events::new();
        let mut rx = events.subscribe();
        let peer: NodeId = "ab".repeat(32).parse().expect("a node id");
        let counter = ProgressCounter::new(events, [1; 16], peer, Direction::Sending, 1000, 2);
        counter.report();
        counter.start_file(0, "a", 600);
        counter.already(0, 100);
        for _ in 0..50 {
            counter.add(0, 30);
        }
        let first = progress_of(rx.try_recv().expect("the first report"));
        assert_eq!((first.done, first.total, first.direction), (0, 1000, Direction::Sending));
        let flowing = progress_of(rx.try_recv().expect("the first bytes carried, reported at once"));
        assert_eq!((flowing.done, flowing.sent_now), (130, 30));
        assert!(rx.try_recv().is_err(), "the other 49 quick additions are not 49 events");
        let now = counter.progress();
        assert_eq!((now.done, now.already, now.sent_now), (600, 100, 1500), "a file counts at most its size");
        assert_eq!(now.active.len(), 1);
        // The copy did not verify: sent again from zero, counted again from zero.
        counter.restart_file(0);
        counter.add(0, 600);
        counter.end_file(0, true);
        counter.start_file(1, "b", 400);
        counter.already(1, 400);
        counter.end_file(1, true);
        std::thread::sleep(PROGRESS_INTERVAL);
        counter.add(1, 0);
        let throttled = progress_of(rx.try_recv().expect("a report after the interval"));
        assert_eq!((throttled.done, throttled.already, throttled.sent_now), (1000, 400, 2100));
        assert_eq!((throttled.files_done, throttled.files), (2, 2));
        assert!(throttled.active.is_empty());
        assert!(throttled.rate() > 0.0);
        assert_eq!(throttled.eta(), Some(Duration::ZERO));
        counter.report();
        let last = progress_of(rx.try_recv().expect("the final report"));
        assert_eq!(last.done, 1000);
    }
}
