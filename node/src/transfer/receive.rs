//! The receiving side: consent, path checks, `.part` files, resume, verification, and the
//! atomic no-clobber move into place.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use qpeer_certs::NodeId;
use qpeer_wire::io::{write_frame, FrameReader};
use qpeer_wire::tracker::MAX_FRAME_LEN;

use super::part::{AlignedBuf, PartWriter};
use super::sanitize::{check_offer, part_path};
use super::CHUNK;
use crate::PeerConnection;
use qpeer_wire::peer::StreamKind;
use qpeer_wire::transfer::{
    ControlFrame, EntryKind, FileEnd, FileHeader, FileReply, TransferId, MAX_ENTRIES, TRANSFER_VERSION,
};

/// Who may send files to this listener.
#[derive(Debug, Clone)]
pub enum AcceptPolicy {
    /// Anyone (`--accept-any`).
    Any,
    /// Only these NodeIds (`--accept-from`, the home's `allowlist` file).
    Only(HashSet<NodeId>),
}

impl AcceptPolicy {
    pub fn allows(&self, peer: &NodeId) -> bool {
        match self {
            AcceptPolicy::Any => true,
            AcceptPolicy::Only(ids) => ids.contains(peer),
        }
    }
}

/// Reads an allowlist file: one NodeId per line, `#` comments. A missing file is empty.
pub fn read_allowlist(path: &Path) -> Result<HashSet<NodeId>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut ids = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let id = line.parse().map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
        ids.insert(id);
    }
    Ok(ids)
}

/// Where received files go and who may send them.
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    /// `None`: this node takes no files (offers are refused with a reason).
    pub out: Option<PathBuf>,
    pub policy: AcceptPolicy,
    /// Print `[OFFER]`, `[RECEIVED]`, `[REJECTED]` lines.
    pub console: bool,
}

/// One accepted offer.
struct Session {
    peer: NodeId,
    out: PathBuf,
    /// (relative path, size) per File entry, by file index.
    files: Vec<(PathBuf, u64)>,
    verified: Mutex<(u32, u64)>,
}

/// Serves transfers on a listener's peer connections.
pub struct Receiver {
    config: ReceiveConfig,
    sessions: Mutex<HashMap<TransferId, Arc<Session>>>,
    /// Final paths being written right now (one writer per path).
    busy: Mutex<HashSet<PathBuf>>,
    /// Signalled when a path stops being busy.
    released: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const OFFER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a file stream waits for another stream writing the same path to end.
const BUSY_WAIT: Duration = Duration::from_secs(10);
/// How long a sender may take to hash a file this node already holds (to tell whether it is
/// the same): generous, for very large files on slow disks.
const HASH_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Most memory an accepted sender's list of entries may take.
const MAX_OFFER_BYTES: usize = 32 << 20;

impl Receiver {
    pub fn new(config: ReceiveConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            sessions: Mutex::default(),
            busy: Mutex::default(),
            released: tokio::sync::Notify::new(),
        })
    }

    /// One line per transfer being received, for `qpeer status`.
    pub fn active(&self) -> Vec<String> {
        lock(&self.sessions)
            .values()
            .map(|s| {
                let (files, bytes) = *lock(&s.verified);
                let total: u64 = s.files.iter().map(|f| f.1).sum();
                format!(
                    "receiving from {}: {files}/{} files verified, {bytes}/{total} bytes, into {}",
                    s.peer,
                    s.files.len(),
                    s.out.display()
                )
            })
            .collect()
    }

    fn say(&self, line: String) {
        if self.config.console {
            crate::progress::out_line(&line);
        }
    }

    /// Serves every transfer stream the peer opens until the connection closes.
    pub async fn serve(self: Arc<Self>, conn: PeerConnection) {
        let mut tasks = tokio::task::JoinSet::new();
        while let Some((kind, send, recv)) = conn.accept_stream().await {
            let receiver = self.clone();
            let peer = conn.node_id();
            match kind {
                StreamKind::Transfer => {
                    tasks.spawn(async move { receiver.control(peer, send, recv).await });
                }
                StreamKind::FileData => {
                    tasks.spawn(async move { receiver.file(peer, send, recv).await });
                }
                _ => {}
            }
            while tasks.try_join_next().is_some() {}
        }
        // The connection is gone: writers finish what they received (kept as .part).
        while tasks.join_next().await.is_some() {}
    }

    /// The control stream: offer → decision → … → Finish → Summary.
    async fn control(self: Arc<Self>, peer: NodeId, mut send: quinn::SendStream, recv: quinn::RecvStream) {
        let mut reader = FrameReader::new(recv, MAX_FRAME_LEN, OFFER_TIMEOUT);
        let (transfer_id, decision) = match self.read_offer(peer, &mut reader).await {
            Ok(offer) => offer,
            Err(reason) => {
                self.say(format!("[REJECTED] transfer from {peer}: {reason}"));
                let _ = write_frame(&mut send, &ControlFrame::Reject { reason }, MAX_FRAME_LEN).await;
                let _ = send.finish();
                return;
            }
        };
        let session = match decision {
            Ok(session) => session,
            Err(reason) => {
                self.say(format!("[REJECTED] transfer from {peer}: {reason}"));
                let _ = write_frame(&mut send, &ControlFrame::Reject { reason }, MAX_FRAME_LEN).await;
                let _ = send.finish();
                return;
            }
        };
        lock(&self.sessions).insert(transfer_id, session.clone());
        if write_frame(&mut send, &ControlFrame::Accept, MAX_FRAME_LEN).await.is_err() {
            lock(&self.sessions).remove(&transfer_id);
            return;
        }
        // Wait for Finish (or the stream / connection ending), then report.
        let finished = matches!(reader.next::<ControlFrame>().await, Ok(Some(ControlFrame::Finish)));
        let (files, bytes) = *lock(&session.verified);
        if finished {
            let _ = write_frame(&mut send, &ControlFrame::Summary { files, bytes }, MAX_FRAME_LEN).await;
            let _ = send.finish();
        }
        lock(&self.sessions).remove(&transfer_id);
    }

    /// Reads and judges an offer. Outer error: unreadable offer; inner: a refusal with reason.
    async fn read_offer(
        &self,
        peer: NodeId,
        reader: &mut FrameReader<quinn::RecvStream>,
    ) -> Result<(TransferId, Result<Arc<Session>, String>), String> {
        let (transfer_id, count, total_bytes) = match reader.next::<ControlFrame>().await {
            Ok(Some(ControlFrame::Offer { version, transfer_id, entries, total_bytes })) => {
                if version != TRANSFER_VERSION {
                    return Err(format!(
                        "transfer version {version} is not supported (this node: {TRANSFER_VERSION})"
                    ));
                }
                if entries > MAX_ENTRIES {
                    return Err(format!("{entries} entries; at most {MAX_ENTRIES}"));
                }
                (transfer_id, entries as usize, total_bytes)
            }
            Ok(Some(other)) => return Err(format!("expected an offer, got {other:?}")),
            Ok(None) => return Err("the stream ended before the offer".into()),
            Err(e) => return Err(format!("unreadable offer: {e}")),
        };
        // Decide on consent before reading (and buffering) a possibly huge list of entries.
        let Some(out) = self.config.out.clone() else {
            return Ok((transfer_id, Err("this node is not receiving files (it runs without --out)".into())));
        };
        if !self.config.policy.allows(&peer) {
            return Ok((
                transfer_id,
                Err(format!(
                    "node {peer} is not allowed to send files here; the receiver must add it with \
                     --accept-from {peer} (or its allowlist file) or run with --accept-any"
                )),
            ));
        }
        let mut offer_bytes = 0usize;
        let mut entries = Vec::with_capacity(count.min(4096));
        loop {
            match reader.next::<ControlFrame>().await {
                Ok(Some(ControlFrame::Entries(batch))) => {
                    offer_bytes += batch.iter().map(|e| e.path.len() + 64).sum::<usize>();
                    if offer_bytes > MAX_OFFER_BYTES {
                        return Err(format!("the offer's entries exceed {MAX_OFFER_BYTES} bytes"));
                    }
                    entries.extend(batch);
                    if entries.len() > count {
                        return Err("more entries than announced".into());
                    }
                }
                Ok(Some(ControlFrame::OfferEnd)) => break,
                Ok(Some(other)) => return Err(format!("expected entries, got {other:?}")),
                Ok(None) => return Err("the stream ended inside the offer".into()),
                Err(e) => return Err(format!("unreadable offer: {e}")),
            }
        }
        if entries.len() != count {
            return Err(format!("{} entries announced, {} sent", count, entries.len()));
        }
        let files_bytes: u64 = entries
            .iter()
            .filter_map(|e| match e.kind {
                EntryKind::File { size, .. } => Some(size),
                _ => None,
            })
            .fold(0u64, |acc, size| acc.saturating_add(size));
        if files_bytes != total_bytes {
            return Err("the offer's total does not match its files".into());
        }

        let paths = match check_offer(&entries) {
            Ok(paths) => paths,
            Err(e) => return Ok((transfer_id, Err(format!("unsafe offer: {e}")))),
        };
        let mut files = Vec::new();
        for (entry, path) in entries.iter().zip(paths) {
            match entry.kind {
                EntryKind::File { size } => files.push((path, size)),
                EntryKind::Directory => {
                    if let Err(e) = make_dirs(&out, &path) {
                        return Ok((transfer_id, Err(format!("cannot create {}: {e}", path.display()))));
                    }
                }
                EntryKind::Symlink { .. } => {}
            }
        }
        self.say(format!(
            "[OFFER] from {peer}: {} files, {total_bytes} bytes into {}: accepted",
            files.len(),
            out.display()
        ));
        Ok((transfer_id, Ok(Arc::new(Session { peer, out, files, verified: Mutex::new((0, 0)) }))))
    }

    /// One file stream.
    async fn file(self: Arc<Self>, peer: NodeId, mut send: quinn::SendStream, recv: quinn::RecvStream) {
        let mut reader = FrameReader::new(recv, MAX_FRAME_LEN, OFFER_TIMEOUT);
        let header = match tokio::time::timeout(OFFER_TIMEOUT, reader.next::<FileHeader>()).await {
            Ok(Ok(Some(header))) => header,
            _ => return,
        };
        let reply = self.receive_file(peer, header, &mut send, reader).await;
        let _ = write_frame(&mut send, &reply, MAX_FRAME_LEN).await;
        let _ = send.finish();
    }

    async fn receive_file(
        &self,
        peer: NodeId,
        header: FileHeader,
        send: &mut quinn::SendStream,
        reader: FrameReader<quinn::RecvStream>,
    ) -> FileReply {
        let refuse = |reason: String| FileReply::Refused { reason };
        let session = lock(&self.sessions).get(&header.transfer_id).cloned();
        let Some(session) = session.filter(|s| s.peer == peer) else {
            return refuse("unknown transfer".into());
        };
        let Some((rel, size)) = session.files.get(header.index as usize).cloned() else {
            return refuse(format!("no file number {} in this transfer", header.index));
        };
        let final_path = session.out.join(&rel);
        // A sender that reconnects and resumes may find its previous stream still finishing
        // here (the final fsync of what arrived): give that a moment before refusing.
        let deadline = tokio::time::Instant::now() + BUSY_WAIT;
        loop {
            let released = self.released.notified();
            if lock(&self.busy).insert(final_path.clone()) {
                break;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return refuse(format!("{} is being received by another transfer", rel.display()));
            }
        }
        let _busy = BusyGuard { receiver: self, path: final_path.clone() };

        let prepared = {
            let out = session.out.clone();
            let rel = rel.clone();
            tokio::task::spawn_blocking(move || prepare(&out, &rel, size)).await
        };
        let (offset, hasher) = match prepared {
            Ok(Ok(Prepared::Resume { offset, hasher })) => (offset, hasher),
            Ok(Ok(Prepared::Exists)) => {
                return self.compare_existing(&session, &rel, size, send, reader).await
            }
            Ok(Err(reason)) => return refuse(reason),
            Err(e) => return refuse(format!("receiver failure: {e}")),
        };
        if write_frame(send, &FileReply::Start { offset }, MAX_FRAME_LEN).await.is_err() {
            return FileReply::Failed { reason: "the stream closed".into() };
        }
        match write_part(reader, &final_path, offset, size, *hasher).await {
            WriteOutcome::Complete { received, sent } if received == sent => {
                let finished = {
                    let final_path = final_path.clone();
                    tokio::task::spawn_blocking(move || finish(&final_path)).await
                };
                match finished {
                    Ok(Ok(())) => {
                        self.count(&session, size);
                        self.say(format!(
                            "[RECEIVED] {} {size} bytes blake3={}",
                            rel.display(),
                            hex(&received)
                        ));
                        FileReply::Verified { blake3: received }
                    }
                    Ok(Err(reason)) => FileReply::Failed { reason },
                    Err(e) => FileReply::Failed { reason: format!("receiver failure: {e}") },
                }
            }
            WriteOutcome::Complete { .. } => {
                self.say(format!(
                    "[CORRUPT] {}: the received file does not match its BLAKE3 hash; discarded, asking again",
                    rel.display()
                ));
                let _ = std::fs::remove_file(part_path(&final_path));
                FileReply::HashMismatch
            }
            WriteOutcome::Failed(reason) => {
                self.say(format!("[ERROR] {}: {reason}", rel.display()));
                FileReply::Failed { reason }
            }
        }
    }

    /// The destination holds a file of the offered size: ask for the sender's hash (no data)
    /// and compare it with the file's, hashed meanwhile.
    async fn compare_existing(
        &self,
        session: &Session,
        rel: &Path,
        size: u64,
        send: &mut quinn::SendStream,
        mut reader: FrameReader<quinn::RecvStream>,
    ) -> FileReply {
        if write_frame(send, &FileReply::Exists, MAX_FRAME_LEN).await.is_err() {
            return FileReply::Failed { reason: "the stream closed".into() };
        }
        let existing = session.out.join(rel);
        let ours = tokio::task::spawn_blocking(move || super::scan::hash_file(&existing));
        // The sender hashes its copy first: allow for a large file on a slow disk.
        let theirs = tokio::time::timeout(HASH_TIMEOUT, reader.next::<FileEnd>());
        let (ours, theirs) = tokio::join!(ours, theirs);
        let theirs = match theirs {
            Ok(Ok(Some(FileEnd { blake3 }))) => blake3,
            _ => return FileReply::Failed { reason: "no hash for a file that exists here".into() },
        };
        match ours {
            Ok(Ok(ours)) if ours == theirs => {
                self.count(session, size);
                self.say(format!(
                    "[RECEIVED] {} {size} bytes blake3={} (already here)",
                    rel.display(),
                    hex(&ours)
                ));
                FileReply::AlreadyComplete
            }
            Ok(Ok(_)) => FileReply::Refused {
                reason: format!("{} already exists with other content; it is not overwritten", rel.display()),
            },
            Ok(Err(e)) => FileReply::Refused { reason: format!("cannot check {}: {e}", rel.display()) },
            Err(e) => FileReply::Failed { reason: format!("receiver failure: {e}") },
        }
    }

    fn count(&self, session: &Session, size: u64) {
        let mut verified = lock(&session.verified);
        verified.0 += 1;
        verified.1 += size;
    }
}

struct BusyGuard<'a> {
    receiver: &'a Receiver,
    path: PathBuf,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        lock(&self.receiver.busy).remove(&self.path);
        self.receiver.released.notify_waiters();
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates `out/rel` and its parents, refusing to pass through anything that is not a real
/// directory (a symlink planted inside `out` cannot redirect writes).
fn make_dirs(out: &Path, rel: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    let mut current = out.to_path_buf();
    for part in rel.components() {
        current.push(part);
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", current.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(&current)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

enum Prepared {
    /// Write from `offset`; `hasher` has already hashed the bytes before it.
    Resume { offset: u64, hasher: Box<blake3::Hasher> },
    /// A regular file of the offered size is already at the destination.
    Exists,
}

fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Checks the destination and any `.part` (blocking).
fn prepare(out: &Path, rel: &Path, size: u64) -> Result<Prepared, String> {
    if let Some(parent) = rel.parent() {
        make_dirs(out, parent)
            .map_err(|e| format!("cannot create the directory for {}: {e}", rel.display()))?;
    }
    let final_path = out.join(rel);
    match std::fs::symlink_metadata(&final_path) {
        Ok(meta) if meta.is_file() && meta.len() == size => return Ok(Prepared::Exists),
        Ok(meta) if meta.is_file() => {
            return Err(format!("{} already exists with other content; it is not overwritten", rel.display()))
        }
        Ok(_) => return Err(format!("{} already exists and is not a regular file", rel.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot check {}: {e}", rel.display())),
    }
    let part = part_path(&final_path);
    let mut hasher = blake3::Hasher::new();
    let offset = match std::fs::symlink_metadata(&part) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(format!("cannot check {}: {e}", part.display())),
        Ok(meta) if !meta.is_file() => {
            return Err(format!("{} exists and is not a regular file", part.display()));
        }
        Ok(meta) if meta.len() > size => {
            // Longer than the file it should become: it belongs to something else. Start over.
            std::fs::remove_file(&part).map_err(|e| format!("cannot reset {}: {e}", part.display()))?;
            0
        }
        Ok(meta) => {
            let mut file =
                open_nofollow(&part).map_err(|e| format!("cannot read {}: {e}", part.display()))?;
            let mut buf = vec![0u8; CHUNK];
            let mut left = meta.len();
            while left > 0 {
                let n = file
                    .read(&mut buf[..CHUNK.min(left as usize)])
                    .map_err(|e| format!("cannot read {}: {e}", part.display()))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
            meta.len() - left
        }
    };
    Ok(Prepared::Resume { offset, hasher: Box::new(hasher) })
}

enum WriteOutcome {
    /// All bytes are in the `.part` (fsynced): the hash of what is there, and the hash the
    /// sender sent after the data.
    Complete { received: [u8; 32], sent: [u8; 32] },
    /// Writing or receiving stopped early; what arrived is kept in the `.part`.
    Failed(String),
}

/// Appends the file's `size - offset` bytes to `<final>.part` on a blocking writer thread
/// (a bounded queue of reused buffers), hashing as it goes, then reads the sender's hash.
async fn write_part(
    reader: FrameReader<quinn::RecvStream>,
    final_path: &Path,
    offset: u64,
    size: u64,
    mut hasher: blake3::Hasher,
) -> WriteOutcome {
    let part = part_path(final_path);
    let mut recv = reader.into_inner();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<AlignedBuf>(2);
    let (spent_tx, spent_rx) = std::sync::mpsc::channel::<AlignedBuf>();
    let writer_part = part.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<blake3::Hasher, std::io::Error> {
        let mut writer = PartWriter::open(&writer_part, offset)?;
        tracing::debug!(part = %writer_part.display(), direct = writer.is_direct(), "writing");
        let mut result = Ok(());
        while let Some(mut buf) = rx.blocking_recv() {
            hasher.update(buf.data());
            if let Err(e) = writer.write(&mut buf) {
                result = Err(e);
                break;
            }
            let _ = spent_tx.send(buf);
        }
        // Keep what was written, whatever happened.
        let synced = writer.sync();
        result.and(synced).map(|()| hasher)
    });

    let expected = size - offset;
    let mut received = 0u64;
    let mut stream_error = None;
    while received < expected && stream_error.is_none() {
        let mut buf = spent_rx.try_recv().unwrap_or_default();
        buf.clear();
        // Whole buffers: hashing is fastest on large inputs and direct I/O wants whole blocks.
        let want = (expected - received).min(buf.spare().len() as u64) as usize;
        while buf.len() < want {
            let room = want - buf.len();
            match recv.read(&mut buf.spare()[..room]).await {
                Ok(Some(n)) => buf.filled(n),
                Ok(None) => {
                    stream_error = Some(format!(
                        "the stream ended after {} of {size} bytes; what arrived is kept for resume",
                        offset + received + buf.len() as u64
                    ));
                    break;
                }
                Err(e) => {
                    stream_error =
                        Some(format!("the transfer was interrupted ({e}); what arrived is kept for resume"));
                    break;
                }
            }
        }
        received += buf.len() as u64;
        if !buf.is_empty() && tx.send(buf).await.is_err() {
            break; // The writer failed; its error is reported below.
        }
    }
    drop(tx);
    let hasher = match writer.await {
        Ok(Ok(hasher)) => hasher,
        Ok(Err(e)) => {
            // Stop the sender's writes: it then asks for our reason.
            let _ = recv.stop(0u32.into());
            let reason = if e.raw_os_error() == Some(libc::ENOSPC) {
                format!(
                    "the receiver's disk is full writing {}; the partial file is kept for resume",
                    part.display()
                )
            } else {
                format!("cannot write {}: {e}; the partial file is kept for resume", part.display())
            };
            return WriteOutcome::Failed(reason);
        }
        Err(e) => return WriteOutcome::Failed(format!("receiver failure: {e}")),
    };
    if let Some(reason) = stream_error {
        return WriteOutcome::Failed(reason);
    }
    // The sender's hash follows the data.
    let mut trailer = FrameReader::new(recv, MAX_FRAME_LEN, OFFER_TIMEOUT);
    let sent = match tokio::time::timeout(OFFER_TIMEOUT, trailer.next::<FileEnd>()).await {
        Ok(Ok(Some(FileEnd { blake3 }))) => blake3,
        Err(_) => return WriteOutcome::Failed("the sender's hash did not follow the data in time".into()),
        Ok(_) => {
            return WriteOutcome::Failed(
                "the stream did not end with the file's hash after its data; what arrived is kept for resume"
                    .into(),
            )
        }
    };
    WriteOutcome::Complete { received: *hasher.finalize().as_bytes(), sent }
}

/// Moves a verified `.part` into place without ever replacing an existing file, then makes
/// the move durable.
fn finish(final_path: &Path) -> Result<(), String> {
    let part = part_path(final_path);
    std::fs::hard_link(&part, final_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!(
                "{} appeared while receiving; it is not overwritten (the data stays in {})",
                final_path.display(),
                part.display()
            )
        } else {
            format!("cannot move {} into place: {e}", part.display())
        }
    })?;
    std::fs::remove_file(&part).map_err(|e| format!("cannot remove {}: {e}", part.display()))?;
    if let Some(dir) = final_path.parent() {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}
