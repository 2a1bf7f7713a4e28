//! The sending side: offer, then stream every file (a few at once), then wait for each file's
//! verification.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use qpeer_wire::io::{write_frame, FrameReader, StreamError};
use qpeer_wire::peer::StreamKind;
use qpeer_wire::tracker::MAX_FRAME_LEN;
use qpeer_wire::transfer::{
    ControlFrame, FileEnd, FileHeader, FileReply, OfferEntry, TransferId, ENTRIES_PER_FRAME, TRANSFER_VERSION,
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
    /// Bytes actually streamed in this run.
    pub sent_bytes: u64,
    pub elapsed: Duration,
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

/// Splits entries into batches that each encode well under the frame limit: at most
/// [`ENTRIES_PER_FRAME`] entries and about 48 KiB of paths.
fn entry_batches(entries: &[OfferEntry]) -> Vec<&[OfferEntry]> {
    const BUDGET: usize = 48 * 1024;
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, entry) in entries.iter().enumerate() {
        let cost = entry.path.len() + 64;
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
/// every file's hash. Reports on `events`: [`TransferEvent::Progress`] from the start (bytes
/// the receiver holds; throttled), [`TransferEvent::Retry`], and at the end
/// [`TransferEvent::Sent`] or [`TransferEvent::SendFailed`].
pub async fn send(conn: &PeerConnection, plan: Plan, events: &Events) -> Result<SendReport, TransferError> {
    let progress = Arc::new(ProgressCounter::new(
        events.clone(),
        crate::random_bytes(),
        conn.node_id(),
        Direction::Sending,
        plan.total_bytes,
    ));
    progress.report();
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
            let result = send_file(&conn, transfer_id, index as u32, &file, &progress).await;
            (file.path, result)
        });
    }
    let mut failures = Vec::new();
    let mut sent_bytes = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(sent))) => sent_bytes += sent,
            Ok((path, Err(e))) => failures.push((path, e.to_string())),
            Err(e) => failures.push(("<task>".into(), e.to_string())),
        }
    }
    write_frame(&mut control, &ControlFrame::Finish, MAX_FRAME_LEN)
        .await
        .map_err(|e| lost(conn, LinkLoss::Frame(e)))?;
    let summary = next::<ControlFrame>(conn, &mut replies, REPLY_TIMEOUT).await;
    let _ = control.finish();
    if !failures.is_empty() {
        failures.sort();
        return Err(TransferError::FilesFailed { total: plan.files.len(), failures });
    }
    match summary? {
        ControlFrame::Summary { .. } => {}
        other => return Err(unexpected_control(conn, "Summary", other)),
    }
    Ok(SendReport {
        files: plan.files.len(),
        total_bytes: plan.total_bytes,
        sent_bytes,
        elapsed: progress.elapsed(),
    })
}

/// Sends one file (retrying once from zero after a hash mismatch). Returns the bytes streamed.
async fn send_file(
    conn: &PeerConnection,
    transfer_id: TransferId,
    index: u32,
    file: &LocalFile,
    progress: &ProgressCounter,
) -> Result<u64, TransferError> {
    let mut streamed = 0;
    let mut attempt = 0;
    loop {
        let (mut send, recv) = conn.open_stream(StreamKind::FileData).await?;
        let mut replies = FrameReader::new(recv, MAX_FRAME_LEN, REPLY_TIMEOUT);
        write_frame(&mut send, &FileHeader { transfer_id, index }, MAX_FRAME_LEN)
            .await
            .map_err(|e| lost(conn, LinkLoss::Frame(e)))?;
        let hash = match next::<FileReply>(conn, &mut replies, REPLY_TIMEOUT).await? {
            FileReply::Start { offset } if offset <= file.size => {
                if attempt == 0 {
                    progress.add(offset);
                }
                match stream_file(conn, &mut send, file, offset, progress).await {
                    Ok((sent, hash)) => {
                        streamed += sent;
                        hash
                    }
                    Err(e @ TransferError::Lost { .. }) => {
                        // A receiver that fails (disk full, permissions) stops our stream and
                        // says why on its reply half: prefer its reason to "stopped by peer".
                        return match next::<FileReply>(conn, &mut replies, Duration::from_secs(5)).await {
                            Ok(FileReply::Failed { reason }) => {
                                Err(TransferError::ReceiverFailed(remote_text(&reason)))
                            }
                            Ok(FileReply::Refused { reason }) => {
                                Err(TransferError::Rejected(remote_text(&reason)))
                            }
                            _ => Err(e),
                        };
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
            FileReply::Refused { reason } => return Err(TransferError::Rejected(remote_text(&reason))),
            other => return Err(unexpected_reply(conn, "Start or Exists", other)),
        };
        write_frame(&mut send, &FileEnd { blake3: hash }, MAX_FRAME_LEN)
            .await
            .map_err(|e| lost(conn, LinkLoss::Frame(e)))?;
        let _ = send.finish();
        match next::<FileReply>(conn, &mut replies, REPLY_TIMEOUT).await? {
            FileReply::Verified { blake3 } if blake3 == hash => return Ok(streamed),
            FileReply::Verified { .. } => return Err(protocol(conn, ProtocolViolation::DifferentHash)),
            FileReply::AlreadyComplete => {
                progress.add(file.size);
                return Ok(streamed);
            }
            FileReply::HashMismatch if attempt == 0 => {
                attempt += 1;
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
            FileReply::Refused { reason } => return Err(TransferError::Rejected(remote_text(&reason))),
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
        progress.add(len);
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
    use qpeer_wire::transfer::{EntryKind, MAX_PATH_LEN};

    #[test]
    fn batches_of_long_paths_fit_in_frames() {
        let entries: Vec<OfferEntry> = (0..200)
            .map(|i| OfferEntry {
                path: format!("{i}{}", "x".repeat(MAX_PATH_LEN - 8)),
                kind: EntryKind::File { size: u64::MAX },
            })
            .collect();
        let batches = entry_batches(&entries);
        assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), 200);
        for batch in batches {
            encode_frame(&ControlFrame::Entries(batch.to_vec()), MAX_FRAME_LEN).expect("fits");
        }
    }
}
