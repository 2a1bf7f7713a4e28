//! The sending side: offer, then stream every file (a few large ones at once, many small
//! ones inline), then wait for each file's verification.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use qpeer_wire::io::{write_frame, FrameReader, StreamError};
use qpeer_wire::peer::StreamKind;
use qpeer_wire::tracker::MAX_FRAME_LEN;
use qpeer_wire::transfer::{
    ControlFrame, EntryKind, FileEnd, FileHeader, FileReply, OfferEntry, TransferId, ENTRIES_PER_FRAME,
    INLINE_BATCH_BYTES, INLINE_BATCH_FILES, INLINE_MAX, TRANSFER_VERSION,
};
use tokio::sync::Semaphore;

use super::event::{Direction, ProgressCounter, TransferEvent};
use super::scan::{hash_file, hash_into, LocalFile, Plan};
use super::{LinkLoss, ProtocolViolation, SourceProblem, TransferError, UnexpectedFrame, CHUNK};
use crate::events::Events;
use crate::PeerConnection;

/// Large files (above [`INLINE_MAX`]) streamed at the same time: each fills the path alone,
/// so more only split it; each holds a few read buffers.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Files in flight at once, small ones included. A small file costs one round trip, so
/// this many of them per round trip is what a tree of small files moves: 1024 files of
/// 4 KiB per 50 ms is 84 MB/s.
pub const FILES_IN_FLIGHT: usize = 1024;
/// Bytes of small files read into memory and not yet acknowledged, at most (in KiB units
/// of the semaphore).
const INLINE_BUDGET_KIB: usize = 16 * 1024;
/// How long the receiver may take to answer the offer (it may be asking its user).
const DECISION_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a single reply (not data) may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// What a completed send did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReport {
    pub files: usize,
    /// Bytes of all files (whether sent now or already held by the receiver).
    pub total_bytes: u64,
    /// Bytes actually streamed in this run (retries included).
    pub sent_bytes: u64,
    pub elapsed: Duration,
    /// Files the receiver already held whole (confirmed by hash; no data sent), and their
    /// bytes.
    pub already_there: usize,
    pub already_there_bytes: u64,
    /// Files continued from the receiver's `.part`, and the bytes that were in those
    /// `.part`s (not sent now).
    pub resumed: usize,
    pub resumed_bytes: u64,
    /// Files sent a second time because the receiver's copy did not verify.
    pub retried: usize,
    /// Symlinks the receiver created (or already had).
    pub links: usize,
}

impl SendReport {
    /// Bytes per second sent in this run (`sent_bytes / elapsed`).
    pub fn rate(&self) -> f64 {
        super::event::rate(self.sent_bytes, self.elapsed)
    }
}

/// How one file went.
#[derive(Debug, Clone, Copy, Default)]
struct FileResult {
    sent: u64,
    resumed_from: u64,
    already_there: bool,
    retried: bool,
}

/// The receiver's words, safe to print.
fn remote_text(text: &str) -> String {
    qpeer_wire::printable(text, qpeer_wire::transfer::MAX_REASON_LEN)
}

fn lost(conn: &PeerConnection, cause: LinkLoss) -> TransferError {
    TransferError::Lost { peer: conn.node_id(), cause }
}

fn protocol(conn: &PeerConnection, violation: ProtocolViolation) -> TransferError {
    TransferError::Protocol { peer: conn.node_id(), violation }
}

fn unexpected(conn: &PeerConnection, expected: &'static str, got: UnexpectedFrame) -> TransferError {
    protocol(conn, ProtocolViolation::UnexpectedFrame { expected, got })
}

fn unexpected_control(conn: &PeerConnection, expected: &'static str, got: ControlFrame) -> TransferError {
    unexpected(conn, expected, UnexpectedFrame::Control(Box::new(got)))
}

fn unexpected_reply(conn: &PeerConnection, expected: &'static str, got: FileReply) -> TransferError {
    unexpected(conn, expected, UnexpectedFrame::File(got))
}

async fn next<T: serde::de::DeserializeOwned>(
    conn: &PeerConnection,
    reader: &mut FrameReader<quinn::RecvStream>,
    timeout: Duration,
) -> Result<T, TransferError> {
    match tokio::time::timeout(timeout, reader.next::<T>()).await {
        Err(_) => Err(TransferError::Timeout { peer: conn.node_id(), after: timeout }),
        Ok(Ok(Some(frame))) => Ok(frame),
        Ok(Ok(None)) => Err(lost(conn, LinkLoss::StreamClosed)),
        Ok(Err(StreamError::Read(e))) => Err(lost(conn, LinkLoss::Read(e))),
        Ok(Err(e)) => Err(protocol(conn, ProtocolViolation::Frame(e))),
    }
}

/// About how many bytes `entry` takes in a frame (and in the receiver's memory).
pub(crate) fn entry_cost(entry: &OfferEntry) -> usize {
    let target = match &entry.kind {
        EntryKind::Symlink { target } => target.len(),
        _ => 0,
    };
    entry.path.len() + target + 64
}

/// Splits entries into batches that each encode well under the frame limit: at most
/// [`ENTRIES_PER_FRAME`] entries and about 48 KiB of paths.
fn entry_batches(entries: &[OfferEntry]) -> Vec<&[OfferEntry]> {
    const BUDGET: usize = 48 * 1024;
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, entry) in entries.iter().enumerate() {
        let cost = entry_cost(entry);
        if i > start && (bytes + cost > BUDGET || i - start == ENTRIES_PER_FRAME) {
            batches.push(&entries[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += cost;
    }
    if start < entries.len() {
        batches.push(&entries[start..]);
    }
    batches
}

/// Offers `plan` to the peer and sends every file. Succeeds only when the receiver confirmed
/// every file's hash (and created every symlink). Reports on `events`:
/// [`TransferEvent::Skipped`] for what the scan left out, [`TransferEvent::Progress`] from
/// the start (bytes the receiver holds; throttled), [`TransferEvent::Retry`],
/// [`TransferEvent::FileSent`] per file, [`TransferEvent::Refused`] per refused entry, and
/// at the end [`TransferEvent::Sent`] or [`TransferEvent::SendFailed`].
pub async fn send(conn: &PeerConnection, plan: Plan, events: &Events) -> Result<SendReport, TransferError> {
    let progress = Arc::new(ProgressCounter::new(
        events.clone(),
        crate::random_bytes(),
        conn.node_id(),
        Direction::Sending,
        plan.total_bytes,
        plan.files.len() as u32,
    ));
    progress.report();
    for (path, reason) in &plan.skipped {
        events.transfer(TransferEvent::Skipped {
            transfer: progress.transfer(),
            peer: conn.node_id(),
            path: path.clone(),
            reason: reason.clone(),
        });
    }
    let result = send_plan(conn, plan, &progress).await;
    progress.report();
    let (transfer, peer) = (progress.transfer(), progress.peer());
    events.transfer(match &result {
        Ok(report) => TransferEvent::Sent { transfer, peer, report: report.clone() },
        Err(e) => TransferEvent::SendFailed { transfer, peer, reason: e.to_string() },
    });
    result
}

async fn send_plan(
    conn: &PeerConnection,
    plan: Plan,
    progress: &Arc<ProgressCounter>,
) -> Result<SendReport, TransferError> {
    let transfer_id = progress.transfer();
    let (mut control, recv) = conn.open_stream(StreamKind::Transfer).await?;
    let mut replies = FrameReader::new(recv, MAX_FRAME_LEN, REPLY_TIMEOUT);
    let offer = ControlFrame::Offer {
        version: TRANSFER_VERSION,
        transfer_id,
        entries: plan.entries.len() as u32,
        total_bytes: plan.total_bytes,
    };
    let written = async {
        write_frame(&mut control, &offer, MAX_FRAME_LEN).await?;
        for batch in entry_batches(&plan.entries) {
            write_frame(&mut control, &ControlFrame::Entries(batch.to_vec()), MAX_FRAME_LEN).await?;
        }
        write_frame(&mut control, &ControlFrame::OfferEnd, MAX_FRAME_LEN).await
    };
    if let Err(e) = written.await {
        // A receiver that refuses right after the Offer stops reading: report its reason.
        return match next::<ControlFrame>(conn, &mut replies, Duration::from_secs(5)).await {
            Ok(ControlFrame::Reject { reason }) => Err(TransferError::Rejected(remote_text(&reason))),
            _ => Err(lost(conn, LinkLoss::Frame(e))),
        };
    }
    match next::<ControlFrame>(conn, &mut replies, DECISION_TIMEOUT).await? {
        ControlFrame::Accept => {}
        ControlFrame::Reject { reason } => return Err(TransferError::Rejected(remote_text(&reason))),
        other => return Err(unexpected_control(conn, "Accept or Reject", other)),
    }
    // Files the receiver holds something of: sent one by one (resume, or compared by hash).
    let mut present = std::collections::HashSet::new();
    loop {
        match next::<ControlFrame>(conn, &mut replies, REPLY_TIMEOUT).await? {
            ControlFrame::Present { files, more } => {
                present.extend(files);
                if !more {
                    break;
                }
            }
            other => return Err(unexpected_control(conn, "Present", other)),
        }
    }

    let large = Arc::new(Semaphore::new(DEFAULT_CONCURRENCY));
    let in_flight = Arc::new(Semaphore::new(FILES_IN_FLIGHT));
    let inline_budget = Arc::new(Semaphore::new(INLINE_BUDGET_KIB));
    let small_reads = Arc::new(Semaphore::new(super::receive::DISK_WORKERS));
    let mut tasks = tokio::task::JoinSet::new();
    for unit in work_units(&plan.files, &present) {
        let permit_error = |e| lost(conn, LinkLoss::Permits(e));
        let files = u32::try_from(unit.len()).unwrap_or(u32::MAX);
        let slots = in_flight.clone().acquire_many_owned(files).await.map_err(permit_error)?;
        let (conn, progress, small_reads) = (conn.clone(), progress.clone(), small_reads.clone());
        match unit {
            WorkUnit::Large(index, file) => {
                let permit = large.clone().acquire_owned().await.map_err(permit_error)?;
                tasks.spawn(async move {
                    let _permits = (slots, permit);
                    progress.start_file(index, &file.path, file.size);
                    let result = send_file(&conn, transfer_id, index, &file, &progress).await;
                    file_done(&conn, &progress, transfer_id, index, &file, &result);
                    vec![(file.path, result)]
                });
            }
            WorkUnit::Inline(batch) => {
                let bytes: u64 = batch.iter().map(|(_, f)| f.size).sum();
                let kib = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
                let permit = inline_budget.clone().acquire_many_owned(kib).await.map_err(permit_error)?;
                tasks.spawn(async move {
                    let _permits = (slots, permit);
                    for (index, file) in &batch {
                        progress.start_file(*index, &file.path, file.size);
                    }
                    let results = send_inline(&conn, transfer_id, &batch, &progress, &small_reads).await;
                    batch
                        .into_iter()
                        .zip(results)
                        .map(|((index, file), result)| {
                            file_done(&conn, &progress, transfer_id, index, &file, &result);
                            (file.path, result)
                        })
                        .collect()
                });
            }
        }
    }
    let mut failures = Vec::new();
    let mut report = SendReport {
        files: plan.files.len(),
        total_bytes: plan.total_bytes,
        sent_bytes: 0,
        elapsed: Duration::ZERO,
        already_there: 0,
        already_there_bytes: 0,
        resumed: 0,
        resumed_bytes: 0,
        retried: 0,
        links: plan.links,
    };
    let sizes: std::collections::HashMap<&str, u64> =
        plan.files.iter().map(|f| (f.path.as_str(), f.size)).collect();
    while let Some(joined) = tasks.join_next().await {
        let results = match joined {
            Ok(results) => results,
            Err(e) => {
                failures.push(("<task>".into(), e.to_string()));
                continue;
            }
        };
        for (path, result) in results {
            match result {
                Ok(done) => {
                    report.sent_bytes += done.sent;
                    if done.already_there {
                        report.already_there += 1;
                        report.already_there_bytes += sizes.get(path.as_str()).copied().unwrap_or(0);
                    } else if done.resumed_from > 0 {
                        report.resumed += 1;
                        report.resumed_bytes += done.resumed_from;
                    }
                    report.retried += usize::from(done.retried);
                }
                Err(e) => failures.push((path, e.to_string())),
            }
        }
    }
    write_frame(&mut control, &ControlFrame::Finish, MAX_FRAME_LEN)
        .await
        .map_err(|e| lost(conn, LinkLoss::Frame(e)))?;
    // Entries the receiver refused (symlinks) come before its Summary.
    let summary = loop {
        match next::<ControlFrame>(conn, &mut replies, REPLY_TIMEOUT).await {
            Ok(ControlFrame::EntryRefused { path, reason }) => {
                let (path, reason) = (remote_text(&path), remote_text(&reason));
                progress.events().transfer(TransferEvent::Refused {
                    transfer: transfer_id,
                    peer: conn.node_id(),
                    direction: Direction::Sending,
                    path: path.clone(),
                    reason: reason.clone(),
                });
                report.links = report.links.saturating_sub(1);
                failures.push((path, TransferError::Refused(reason).to_string()));
            }
            other => break other,
        }
    };
    let _ = control.finish();
    if !failures.is_empty() {
        failures.sort();
        return Err(TransferError::FilesFailed { total: plan.files.len() + plan.links, failures });
    }
    match summary? {
        ControlFrame::Summary { .. } => {}
        other => return Err(unexpected_control(conn, "Summary", other)),
    }
    report.elapsed = progress.elapsed();
    Ok(report)
}

/// After our write failed because the receiver stopped the stream: its reason, if it sends
/// one soon (it stops the stream and then answers why), else `error`.
async fn receiver_reason(
    conn: &PeerConnection,
    replies: &mut FrameReader<quinn::RecvStream>,
    error: TransferError,
) -> TransferError {
    match next::<FileReply>(conn, replies, Duration::from_secs(5)).await {
        Ok(FileReply::Failed { reason }) => TransferError::ReceiverFailed(remote_text(&reason)),
        Ok(FileReply::Refused { reason }) => TransferError::Refused(remote_text(&reason)),
        _ => error,
    }
}

/// Sends one file (retrying once from zero after a hash mismatch).
async fn send_file(
    conn: &PeerConnection,
    transfer_id: TransferId,
    index: u32,
    file: &LocalFile,
    progress: &ProgressCounter,
) -> Result<FileResult, TransferError> {
    let mut result = FileResult::default();
    let mut attempt = 0;
    loop {
        let (mut send, recv) = conn.open_stream(StreamKind::FileData).await?;
        let mut replies = FrameReader::new(recv, MAX_FRAME_LEN, REPLY_TIMEOUT);
        write_frame(&mut send, &FileHeader { transfer_id, index, inline: 0 }, MAX_FRAME_LEN)
            .await
            .map_err(|e| lost(conn, LinkLoss::Frame(e)))?;
        let hash = match next::<FileReply>(conn, &mut replies, REPLY_TIMEOUT).await? {
            FileReply::Start { offset } if offset <= file.size => {
                progress.already(index, offset);
                if attempt == 0 {
                    result.resumed_from = offset;
                }
                match stream_file(conn, &mut send, file, index, offset, progress).await {
                    Ok((sent, hash)) => {
                        result.sent += sent;
                        hash
                    }
                    Err(e @ TransferError::Lost { .. }) => {
                        // A receiver that fails (disk full, permissions) stops our stream and
                        // says why on its reply half: prefer its reason to "stopped by peer".
                        return Err(receiver_reason(conn, &mut replies, e).await);
                    }
                    // A local failure (the file changed or could not be read): the receiver
                    // sees the stream reset and keeps what arrived.
                    Err(e) => {
                        let _ = send.reset(0u32.into());
                        return Err(e);
                    }
                }
            }
            FileReply::Start { offset } => {
                return Err(protocol(conn, ProtocolViolation::ResumePastEnd { offset, size: file.size }))
            }
            // The receiver has a file of this size: it only needs our hash to tell whether it
            // is this one.
            FileReply::Exists => {
                let source = file.source.clone();
                tokio::task::spawn_blocking(move || hash_file(&source))
                    .await
                    .map_err(|e| reader_failed(file, e))??
            }
            FileReply::Refused { reason } => return Err(TransferError::Refused(remote_text(&reason))),
            other => return Err(unexpected_reply(conn, "Start or Exists", other)),
        };
        if let Err(e) = write_frame(&mut send, &FileEnd { blake3: hash }, MAX_FRAME_LEN).await {
            // The data may all be buffered before the receiver stopped the stream.
            return Err(receiver_reason(conn, &mut replies, lost(conn, LinkLoss::Frame(e))).await);
        }
        let _ = send.finish();
        match next::<FileReply>(conn, &mut replies, REPLY_TIMEOUT).await? {
            FileReply::Verified { blake3 } if blake3 == hash => return Ok(result),
            FileReply::Verified { .. } => return Err(protocol(conn, ProtocolViolation::DifferentHash)),
            FileReply::AlreadyComplete => {
                progress.already(index, file.size);
                result.already_there = true;
                return Ok(result);
            }
            FileReply::HashMismatch if attempt == 0 => {
                attempt += 1;
                result.retried = true;
                // Counted again from zero: progress never passes 100 %.
                progress.restart_file(index);
                progress.events().transfer(TransferEvent::Retry {
                    transfer: transfer_id,
                    peer: conn.node_id(),
                    path: file.path.clone(),
                });
            }
            FileReply::HashMismatch => {
                return Err(TransferError::BadSource {
                    path: file.source.clone(),
                    problem: SourceProblem::VerifiedWrongTwice,
                })
            }
            FileReply::Failed { reason } => return Err(TransferError::ReceiverFailed(remote_text(&reason))),
            FileReply::Refused { reason } => return Err(TransferError::Refused(remote_text(&reason))),
            other => return Err(unexpected_reply(conn, "a file result", other)),
        }
    }
}

/// What one task sends: a large file alone, or a batch of consecutive small files inline.
enum WorkUnit {
    Large(u32, LocalFile),
    Inline(Vec<(u32, LocalFile)>),
}

impl WorkUnit {
    fn len(&self) -> usize {
        match self {
            WorkUnit::Large(..) => 1,
            WorkUnit::Inline(batch) => batch.len(),
        }
    }
}

/// The plan's files in order, consecutive small ones grouped into batches within the
/// protocol's limits; a file the receiver holds something of (`present`) goes alone.
fn work_units(files: &[LocalFile], present: &std::collections::HashSet<u32>) -> Vec<WorkUnit> {
    let mut units = Vec::new();
    let mut batch: Vec<(u32, LocalFile)> = Vec::new();
    let mut batch_bytes = 0u64;
    for (index, file) in files.iter().enumerate() {
        let index = index as u32;
        let alone = file.size > INLINE_MAX || present.contains(&index);
        let full = batch.len() as u32 >= INLINE_BATCH_FILES || batch_bytes + file.size > INLINE_BATCH_BYTES;
        if !batch.is_empty() && (alone || full) {
            units.push(WorkUnit::Inline(std::mem::take(&mut batch)));
            batch_bytes = 0;
        }
        if alone {
            units.push(WorkUnit::Large(index, file.clone()));
        } else {
            batch_bytes += file.size;
            batch.push((index, file.clone()));
        }
    }
    if !batch.is_empty() {
        units.push(WorkUnit::Inline(batch));
    }
    units
}

/// Reports how file `index` went (its events) and counts it done.
fn file_done(
    conn: &PeerConnection,
    progress: &ProgressCounter,
    transfer: TransferId,
    index: u32,
    file: &LocalFile,
    result: &Result<FileResult, TransferError>,
) {
    progress.end_file(index, true);
    let peer = conn.node_id();
    match result {
        Ok(done) => progress.events().transfer(TransferEvent::FileSent {
            transfer,
            peer,
            path: file.path.clone(),
            size: file.size,
            resumed_from: done.resumed_from,
            sent_now: done.sent,
            already_there: done.already_there,
        }),
        Err(TransferError::Refused(reason)) => progress.events().transfer(TransferEvent::Refused {
            transfer,
            peer,
            direction: Direction::Sending,
            path: file.path.clone(),
            reason: reason.clone(),
        }),
        Err(_) => {}
    }
}

/// Reads a small file whole and hashes it (blocking), checking that it is still the file
/// that was offered.
fn read_small(file: &LocalFile) -> Result<(bytes::Bytes, [u8; 32]), TransferError> {
    let io = |source| TransferError::Io { path: file.source.clone(), source };
    let mut f = std::fs::File::open(&file.source).map_err(io)?;
    let mut data = Vec::with_capacity(file.size as usize);
    (&mut f).take(file.size + 1).read_to_end(&mut data).map_err(io)?;
    let now = f.metadata().map_err(io)?;
    if data.len() as u64 != file.size || now.len() != file.size || now.modified().ok() != file.modified {
        let problem =
            if (data.len() as u64) < file.size { SourceProblem::Shrank } else { SourceProblem::Changed };
        return Err(changed(file, problem));
    }
    let hash = *blake3::hash(&data).as_bytes();
    Ok((bytes::Bytes::from(data), hash))
}

/// Sends a batch of small files inline: each run of consecutive files that could be read
/// goes on one stream, its files' data and hashes at once, then one answer per file. A file
/// whose copy did not verify is sent once more (in a batch of the retried).
async fn send_inline(
    conn: &PeerConnection,
    transfer_id: TransferId,
    batch: &[(u32, LocalFile)],
    progress: &ProgressCounter,
    small_reads: &Semaphore,
) -> Vec<Result<FileResult, TransferError>> {
    let mut results: Vec<Result<FileResult, TransferError>> =
        batch.iter().map(|_| Ok(FileResult::default())).collect();
    let mut pending: Vec<usize> = (0..batch.len()).collect();
    for attempt in 0..2 {
        if pending.is_empty() {
            break;
        }
        let read = {
            let files: Vec<LocalFile> = pending.iter().map(|&i| batch[i].1.clone()).collect();
            let _reading = small_reads.acquire().await;
            tokio::task::spawn_blocking(move || files.iter().map(read_small).collect::<Vec<_>>()).await
        };
        let read = match read {
            Ok(read) => read,
            Err(e) => {
                let message = e.to_string();
                for &i in &pending {
                    results[i] = Err(TransferError::BadSource {
                        path: batch[i].1.source.clone(),
                        problem: SourceProblem::BatchReaderFailed(message.clone()),
                    });
                }
                return results;
            }
        };
        // Runs of consecutive indices whose files were read.
        let mut runs: Vec<Vec<(usize, bytes::Bytes, [u8; 32])>> = Vec::new();
        let mut previous: Option<u32> = None;
        for (&i, outcome) in pending.iter().zip(read) {
            match outcome {
                Ok((data, hash)) => {
                    let index = batch[i].0;
                    match runs.last_mut() {
                        Some(run) if previous.is_some_and(|p| p + 1 == index) => run.push((i, data, hash)),
                        _ => runs.push(vec![(i, data, hash)]),
                    }
                    previous = Some(index);
                }
                Err(e) => {
                    results[i] = Err(e);
                    previous = None;
                }
            }
        }
        let mut again = Vec::new();
        for run in runs {
            let outcomes = send_run(conn, transfer_id, batch, &run, progress).await;
            for ((i, _, _), outcome) in run.iter().zip(outcomes) {
                match outcome {
                    RunOutcome::Done(done) => {
                        let retried = matches!(&results[*i], Ok(r) if r.retried);
                        results[*i] = Ok(FileResult { retried, ..done });
                    }
                    RunOutcome::Mismatch if attempt == 0 => {
                        // Counted again from zero: progress never passes 100 %.
                        let index = batch[*i].0;
                        progress.restart_file(index);
                        progress.events().transfer(TransferEvent::Retry {
                            transfer: transfer_id,
                            peer: conn.node_id(),
                            path: batch[*i].1.path.clone(),
                        });
                        results[*i] = Ok(FileResult { retried: true, ..FileResult::default() });
                        again.push(*i);
                    }
                    RunOutcome::Mismatch => {
                        results[*i] = Err(TransferError::BadSource {
                            path: batch[*i].1.source.clone(),
                            problem: SourceProblem::VerifiedWrongTwice,
                        })
                    }
                    RunOutcome::Failed(e) => results[*i] = Err(e),
                }
            }
        }
        pending = again;
    }
    results
}

enum RunOutcome {
    Done(FileResult),
    Mismatch,
    Failed(TransferError),
}

/// One stream: the header naming `run`'s files, each file's bytes and hash, then the
/// receiver's answers, in order.
async fn send_run(
    conn: &PeerConnection,
    transfer_id: TransferId,
    batch: &[(u32, LocalFile)],
    run: &[(usize, bytes::Bytes, [u8; 32])],
    progress: &ProgressCounter,
) -> Vec<RunOutcome> {
    let all_failed = |error: TransferError| -> Vec<RunOutcome> {
        let text = error.to_string();
        let mut outcomes = vec![RunOutcome::Failed(error)];
        outcomes
            .extend((1..run.len()).map(|_| RunOutcome::Failed(TransferError::ReceiverFailed(text.clone()))));
        outcomes
    };
    let (mut send, recv) = match conn.open_stream(StreamKind::FileData).await {
        Ok(streams) => streams,
        Err(e) => return all_failed(e.into()),
    };
    let mut replies = FrameReader::new(recv, MAX_FRAME_LEN, REPLY_TIMEOUT);
    let first = batch[run[0].0].0;
    let header = FileHeader { transfer_id, index: first, inline: run.len() as u32 };
    let written = async {
        write_frame(&mut send, &header, MAX_FRAME_LEN).await.map_err(|e| lost(conn, LinkLoss::Frame(e)))?;
        for (i, data, hash) in run {
            let len = data.len() as u64;
            send.write_chunk(data.clone()).await.map_err(|e| lost(conn, LinkLoss::Write(e)))?;
            progress.add(batch[*i].0, len);
            write_frame(&mut send, &FileEnd { blake3: *hash }, MAX_FRAME_LEN)
                .await
                .map_err(|e| lost(conn, LinkLoss::Frame(e)))?;
        }
        let _ = send.finish();
        Ok::<(), TransferError>(())
    };
    if let Err(e) = written.await {
        return all_failed(receiver_reason(conn, &mut replies, e).await);
    }
    let mut outcomes = Vec::with_capacity(run.len());
    for (i, data, hash) in run {
        let reply = match next::<FileReply>(conn, &mut replies, REPLY_TIMEOUT).await {
            Ok(reply) => reply,
            Err(e) => {
                let text = e.to_string();
                outcomes.push(RunOutcome::Failed(e));
                while outcomes.len() < run.len() {
                    outcomes.push(RunOutcome::Failed(TransferError::ReceiverFailed(text.clone())));
                }
                return outcomes;
            }
        };
        let sent = data.len() as u64;
        outcomes.push(match reply {
            FileReply::Verified { blake3 } if blake3 == *hash => {
                RunOutcome::Done(FileResult { sent, ..FileResult::default() })
            }
            FileReply::Verified { .. } => {
                RunOutcome::Failed(protocol(conn, ProtocolViolation::DifferentHash))
            }
            FileReply::AlreadyComplete => {
                progress.already(batch[*i].0, batch[*i].1.size);
                RunOutcome::Done(FileResult { sent, already_there: true, ..FileResult::default() })
            }
            FileReply::HashMismatch => RunOutcome::Mismatch,
            FileReply::Failed { reason } => {
                RunOutcome::Failed(TransferError::ReceiverFailed(remote_text(&reason)))
            }
            FileReply::Refused { reason } => RunOutcome::Failed(TransferError::Refused(remote_text(&reason))),
            other => RunOutcome::Failed(unexpected_reply(conn, "a file result", other)),
        });
    }
    outcomes
}

fn reader_failed(file: &LocalFile, e: tokio::task::JoinError) -> TransferError {
    TransferError::BadSource { path: file.source.clone(), problem: SourceProblem::ReaderFailed(e) }
}

/// Streams `file` from `offset` to its end and returns the bytes sent and the BLAKE3 hash of
/// the whole file. A blocking thread reads the file once: the bytes before `offset` (which
/// the receiver holds) are only hashed, the rest are hashed and handed to quinn uncopied.
async fn stream_file(
    conn: &PeerConnection,
    send: &mut quinn::SendStream,
    file: &LocalFile,
    index: u32,
    offset: u64,
    progress: &ProgressCounter,
) -> Result<(u64, [u8; 32]), TransferError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<PooledChunk>(4);
    let local = file.clone();
    let remaining = file.size - offset;
    let reader = tokio::task::spawn_blocking(move || -> Result<[u8; 32], TransferError> {
        let io = |source| TransferError::Io { path: local.source.clone(), source };
        let mut f = std::fs::File::open(&local.source).map_err(io)?;
        let mut hasher = blake3::Hasher::new();
        if hash_into(&mut f, offset, &mut hasher).map_err(io)? != offset {
            return Err(changed(&local, SourceProblem::Shrank));
        }
        let (pool, spent) = std::sync::mpsc::channel::<Vec<u8>>();
        let mut left = remaining;
        while left > 0 {
            let want = CHUNK.min(left as usize);
            let mut buf = spent.try_recv().unwrap_or_else(|_| Vec::with_capacity(CHUNK));
            buf.clear();
            (&mut f).take(want as u64).read_to_end(&mut buf).map_err(io)?;
            if buf.is_empty() {
                return Err(changed(&local, SourceProblem::Shrank));
            }
            hasher.update(&buf);
            left -= buf.len() as u64;
            if tx.blocking_send(PooledChunk { buf, pool: pool.clone() }).is_err() {
                break; // The stream failed; the sender reports that.
            }
        }
        let now = f.metadata().map_err(io)?;
        if now.len() != local.size || now.modified().ok() != local.modified {
            return Err(changed(&local, SourceProblem::Changed));
        }
        Ok(*hasher.finalize().as_bytes())
    });
    let mut sent = 0u64;
    while let Some(chunk) = rx.recv().await {
        let len = chunk.buf.len() as u64;
        send.write_chunk(bytes::Bytes::from_owner(chunk))
            .await
            .map_err(|e| lost(conn, LinkLoss::Write(e)))?;
        sent += len;
        progress.add(index, len);
    }
    let hash = reader.await.map_err(|e| reader_failed(file, e))??;
    Ok((sent, hash))
}

/// A chunk of file data lent to quinn, which holds it until the peer acknowledged it; then it
/// goes back to the reader's pool. Memory the process already touched is reused: fresh pages
/// for every chunk made the file reads the slowest part of a send (docs/PERFORMANCE.md).
struct PooledChunk {
    buf: Vec<u8>,
    pool: std::sync::mpsc::Sender<Vec<u8>>,
}

impl AsRef<[u8]> for PooledChunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledChunk {
    fn drop(&mut self) {
        // The reader may be gone (the send ended): then the buffer is simply freed.
        let _ = self.pool.send(std::mem::take(&mut self.buf));
    }
}

fn changed(file: &LocalFile, problem: SourceProblem) -> TransferError {
    TransferError::BadSource { path: file.source.clone(), problem }
}

#[cfg(test)]
mod tests {
    use qpeer_wire::codec::encode_frame;
    use qpeer_wire::tracker::MAX_FRAME_LEN;

    use super::*;
    use qpeer_wire::transfer::MAX_PATH_LEN;

    #[test]
    fn batches_of_long_paths_fit_in_frames() {
        let entries: Vec<OfferEntry> = (0..200)
            .map(|i| OfferEntry {
                path: format!("{i}{}", "x".repeat(MAX_PATH_LEN - 8)),
                kind: EntryKind::File { size: u64::MAX },
                meta: Default::default(),
            })
            .collect();
        let batches = entry_batches(&entries);
        assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), 200);
        for batch in batches {
            encode_frame(&ControlFrame::Entries(batch.to_vec()), MAX_FRAME_LEN).expect("fits");
        }
        let links: Vec<OfferEntry> = (0..200)
            .map(|i| OfferEntry {
                path: format!("{i}{}", "x".repeat(MAX_PATH_LEN - 8)),
                kind: EntryKind::Symlink { target: "y".repeat(MAX_PATH_LEN) },
                meta: Default::default(),
            })
            .collect();
        for batch in entry_batches(&links) {
            encode_frame(&ControlFrame::Entries(batch.to_vec()), MAX_FRAME_LEN).expect("fits");
        }
    }
}
