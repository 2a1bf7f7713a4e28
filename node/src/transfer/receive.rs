//! The receiving side: consent, path checks, `.part` files, resume, verification, and the
//! atomic no-clobber move into place.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use qpeer_certs::NodeId;
use qpeer_tracker::proto::MAX_FRAME_LEN;
use qpeer_tracker::stream::{write_frame, FrameReader};

use super::sanitize::{check_offer, part_path};
use super::wire::{
    ControlFrame, EntryKind, FileHeader, FileReply, TransferId, MAX_ENTRIES, TRANSFER_VERSION,
};
use super::CHUNK;
use crate::peer::StreamKind;
use crate::PeerConnection;

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
    /// (relative path, size, hash) per File entry, by file index.
    files: Vec<(PathBuf, u64, [u8; 32])>,
    verified: Mutex<(u32, u64)>,
}

/// Serves transfers on a listener's peer connections.
pub struct Receiver {
    config: ReceiveConfig,
    sessions: Mutex<HashMap<TransferId, Arc<Session>>>,
    /// Final paths being written right now (one writer per path).
    busy: Mutex<HashSet<PathBuf>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const OFFER_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes written between background flushes of a file being received.
const FLUSH_EVERY: usize = 64 << 20;
/// Most memory an accepted sender's list of entries may take.
const MAX_OFFER_BYTES: usize = 32 << 20;

impl Receiver {
    pub fn new(config: ReceiveConfig) -> Arc<Self> {
        Arc::new(Self { config, sessions: Mutex::default(), busy: Mutex::default() })
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
        reader: &mut FrameReader,
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
                EntryKind::File { size, blake3 } => files.push((path, size, blake3)),
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
        reader: FrameReader,
    ) -> FileReply {
        let refuse = |reason: String| FileReply::Refused { reason };
        let session = lock(&self.sessions).get(&header.transfer_id).cloned();
        let Some(session) = session.filter(|s| s.peer == peer) else {
            return refuse("unknown transfer".into());
        };
        let Some((rel, size, blake3)) = session.files.get(header.index as usize).cloned() else {
            return refuse(format!("no file number {} in this transfer", header.index));
        };
        let final_path = session.out.join(&rel);
        if !lock(&self.busy).insert(final_path.clone()) {
            return refuse(format!("{} is being received by another transfer", rel.display()));
        }
        let _busy = BusyGuard { receiver: self, path: final_path.clone() };

        let prepared = {
            let out = session.out.clone();
            let rel = rel.clone();
            tokio::task::spawn_blocking(move || prepare(&out, &rel, size, &blake3)).await
        };
        let (offset, hasher) = match prepared {
            Ok(Ok(Prepared::Resume { offset, hasher })) => (offset, hasher),
            Ok(Ok(Prepared::Complete)) => {
                self.count(&session, size);
                self.say(format!(
                    "[RECEIVED] {} {size} bytes blake3={} (already here)",
                    rel.display(),
                    hex(&blake3)
                ));
                return FileReply::AlreadyComplete;
            }
            Ok(Err(reason)) => return refuse(reason),
            Err(e) => return refuse(format!("receiver failure: {e}")),
        };
        if write_frame(send, &FileReply::Start { offset }, MAX_FRAME_LEN).await.is_err() {
            return FileReply::Failed { reason: "the stream closed".into() };
        }
        let outcome = write_part(reader, &final_path, offset, size, *hasher).await;
        match outcome {
            WriteOutcome::Complete(hash) if hash == blake3 => {
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
                            hex(&blake3)
                        ));
                        FileReply::Verified { blake3 }
                    }
                    Ok(Err(reason)) => FileReply::Failed { reason },
                    Err(e) => FileReply::Failed { reason: format!("receiver failure: {e}") },
                }
            }
            WriteOutcome::Complete(_) => {
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
    /// The final file is already here with the right content.
    Complete,
}

fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Checks the destination and any `.part` (blocking).
fn prepare(out: &Path, rel: &Path, size: u64, blake3: &[u8; 32]) -> Result<Prepared, String> {
    if let Some(parent) = rel.parent() {
        make_dirs(out, parent)
            .map_err(|e| format!("cannot create the directory for {}: {e}", rel.display()))?;
    }
    let final_path = out.join(rel);
    match std::fs::symlink_metadata(&final_path) {
        Ok(meta) if meta.is_file() => {
            let same = meta.len() == size
                && super::scan::hash_file(&final_path).map(|h| &h == blake3).unwrap_or(false);
            return if same {
                Ok(Prepared::Complete)
            } else {
                Err(format!("{} already exists with other content; it is not overwritten", rel.display()))
            };
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
    /// All bytes are in the `.part` (fsynced); the whole file's hash.
    Complete([u8; 32]),
    /// Writing or receiving stopped early; what arrived is kept in the `.part`.
    Failed(String),
}

/// Appends the stream to `<final>.part` from `offset` on a blocking writer thread (bounded
/// queue), hashing as it goes.
async fn write_part(
    reader: FrameReader,
    final_path: &Path,
    offset: u64,
    size: u64,
    mut hasher: blake3::Hasher,
) -> WriteOutcome {
    let part = part_path(final_path);
    let mut recv = reader.into_inner();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let writer_part = part.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<blake3::Hasher, std::io::Error> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&writer_part)?;
        file.set_len(offset)?;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(offset))?;
        let mut result = Ok(());
        // Flush to disk in the background as data arrives, so the final fsync has little
        // left to do (it would otherwise write the whole file after the last byte arrived).
        let mut flushers = Vec::new();
        let mut unflushed = 0usize;
        while let Some(buf) = rx.blocking_recv() {
            if let Err(e) = file.write_all(&buf) {
                result = Err(e);
                break;
            }
            hasher.update(&buf);
            unflushed += buf.len();
            if unflushed >= FLUSH_EVERY
                && flushers.iter().all(|f: &std::thread::JoinHandle<()>| f.is_finished())
            {
                unflushed = 0;
                if let Ok(handle) = file.try_clone() {
                    flushers.push(std::thread::spawn(move || {
                        let _ = handle.sync_data();
                    }));
                }
            }
        }
        for flusher in flushers {
            let _ = flusher.join();
        }
        // Keep what was written, whatever happened.
        let synced = file.sync_all();
        result.and(synced).map(|()| hasher)
    });

    let expected = size - offset;
    let mut received = 0u64;
    let mut stream_error = None;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(n)) => {
                received += n as u64;
                if received > expected {
                    stream_error = Some(format!("the sender sent more than the file's {size} bytes"));
                    break;
                }
                if tx.send(buf[..n].to_vec()).await.is_err() {
                    break; // The writer failed; its error is reported below.
                }
            }
            Ok(None) => break,
            Err(e) => {
                stream_error =
                    Some(format!("the transfer was interrupted ({e}); what arrived is kept for resume"));
                break;
            }
        }
    }
    drop(tx);
    let hasher = match writer.await {
        Ok(Ok(hasher)) => hasher,
        Ok(Err(e)) => {
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
    if received != expected {
        return WriteOutcome::Failed(format!(
            "the stream ended after {} of {size} bytes; what arrived is kept for resume",
            offset + received
        ));
    }
    WriteOutcome::Complete(*hasher.finalize().as_bytes())
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
