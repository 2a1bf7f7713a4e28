//! The sending side: offer, then stream every file (a few at once), then wait for each file's
//! verification.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use qpeer_wire::io::{write_frame, FrameReader, StreamError};
use qpeer_wire::peer::StreamKind;
use qpeer_wire::tracker::MAX_FRAME_LEN;
use qpeer_wire::transfer::{
    ControlFrame, EntryKind, FileEnd, FileHeader, FileReply, OfferEntry, TransferId, ENTRIES_PER_FRAME,
    TRANSFER_VERSION,
};
use tokio::sync::Semaphore;

use super::event::{Direction, ProgressCounter, TransferEvent};
use super::scan::{hash_file, hash_into, LocalFile, Plan};
use super::{LinkLoss, ProtocolViolation, SourceProblem, TransferError, UnexpectedFrame, CHUNK};
use crate::events::Events;
use crate::PeerConnection;

/// Files streamed at the same time.
pub const DEFAULT_CONCURRENCY: usize = 4;
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

    let permits = Arc::new(Semaphore::new(DEFAULT_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (index, file) in plan.files.iter().cloned().enumerate() {
        let permit = permits.clone().acquire_owned().await.map_err(|e| lost(conn, LinkLoss::Permits(e)))?;
        let conn = conn.clone();
        let progress = progress.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let index = index as u32;
            progress.start_file(index, &file.path, file.size);
            let result = send_file(&conn, transfer_id, index, &file, &progress).await;
            progress.end_file(index, true);
            match &result {
                Ok(done) => progress.events().transfer(TransferEvent::FileSent {
                    transfer: transfer_id,
                    peer: conn.node_id(),
                    path: file.path.clone(),
                    size: file.size,
                    resumed_from: done.resumed_from,
                    sent_now: done.sent,
                    already_there: done.already_there,
                }),
                Err(TransferError::Refused(reason)) => progress.events().transfer(TransferEvent::Refused {
                    transfer: transfer_id,
                    peer: conn.node_id(),
                    direction: Direction::Sending,
                    path: file.path.clone(),
                    reason: reason.clone(),
                }),
                Err(_) => {}
            }
            (file.path, result)
        });
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
        match joined {
            Ok((path, Ok(done))) => {
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
            Ok((path, Err(e))) => failures.push((path, e.to_string())),
            Err(e) => failures.push(("<task>".into(), e.to_string())),
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
        write_frame(&mut send, &FileHeader { transfer_id, index }, MAX_FRAME_LEN)
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
