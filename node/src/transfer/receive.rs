//! The receiving side: consent, path checks, `.part` files, resume, verification, and the
//! atomic no-clobber move into place.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use qpeer_certs::{NodeId, NodeIdParseError};
use qpeer_wire::io::{write_frame, FrameReader, StreamError};
use qpeer_wire::peer::StreamKind;
use qpeer_wire::tracker::MAX_FRAME_LEN;
use qpeer_wire::transfer::{
    ControlFrame, EntryKind, EntryMeta, FileEnd, FileHeader, FileReply, TransferId, INLINE_BATCH_BYTES,
    INLINE_BATCH_FILES, INLINE_MAX, MAX_ENTRIES, MAX_REASON_LEN, PRESENT_PER_FRAME, TRANSFER_VERSION,
};

use super::event::{Direction, ProgressCounter, TransferEvent};
use super::part::{write_whole, AlignedBuf, PartWriter};
use super::sanitize::{check_link_target, check_offer, part_path, LinkError, PathError};
use super::{TransferError, CHUNK};
use crate::events::Events;
use crate::PeerConnection;

/// Who may send files to this listener.
#[derive(Debug, Clone)]
pub enum AcceptPolicy {
    /// Anyone (`--accept-any`).
    Any,
    /// Only these NodeIds (`--accept-from`, the home's `allowlist` file read once).
    Only(HashSet<NodeId>),
    /// The NodeIds of an allowlist file, read again whenever it changes, and some more
    /// (`qpeer listen`: the home's `allowlist` and `--accept-from`).
    Watched(Arc<WatchedAllowlist>),
}

impl AcceptPolicy {
    pub fn allows(&self, peer: &NodeId) -> bool {
        match self {
            AcceptPolicy::Any => true,
            AcceptPolicy::Only(ids) => ids.contains(peer),
            AcceptPolicy::Watched(list) => list.allows(peer),
        }
    }

    /// This policy, allowing `ids` too.
    pub fn allow_also(self, ids: impl IntoIterator<Item = NodeId>) -> Self {
        match self {
            AcceptPolicy::Any => AcceptPolicy::Any,
            AcceptPolicy::Only(mut only) => {
                only.extend(ids);
                AcceptPolicy::Only(only)
            }
            AcceptPolicy::Watched(list) => {
                list.extra.lock().extend(ids);
                AcceptPolicy::Watched(list)
            }
        }
    }
}

/// When an allowlist file was last seen changed: its modification time and length (`None`:
/// no file).
type FileStamp = Option<(std::time::SystemTime, u64)>;

fn stamp(path: &Path) -> FileStamp {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// An allowlist file that is read again when it changes (checked at each offer), so that
/// editing it takes effect without restarting the listener.
#[derive(Debug)]
pub struct WatchedAllowlist {
    path: PathBuf,
    /// Allowed whatever the file says (`--accept-from`).
    extra: parking_lot::Mutex<HashSet<NodeId>>,
    /// The file's ids as last read, and the stamp they were read at.
    read: parking_lot::Mutex<(FileStamp, HashSet<NodeId>)>,
}

impl WatchedAllowlist {
    /// Reads `path` now: a file that does not parse is an error at start (a missing one is
    /// empty). Later, a change that does not parse keeps the last good list, with a warning.
    pub fn new(path: impl Into<PathBuf>) -> Result<Self, AllowlistError> {
        let path = path.into();
        let stamp = stamp(&path);
        let ids = read_allowlist(&path)?;
        Ok(Self { path, extra: Default::default(), read: parking_lot::Mutex::new((stamp, ids)) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ids allowed now (the file's, read again if it changed, and the extra ones).
    pub fn current(&self) -> HashSet<NodeId> {
        let now = stamp(&self.path);
        let mut read = self.read.lock();
        if now != read.0 {
            match read_allowlist(&self.path) {
                Ok(ids) => {
                    tracing::info!("{} changed: {} ids allowed", self.path.display(), ids.len());
                    *read = (now, ids);
                }
                Err(e) => {
                    // Keep the last good list; say so once per change.
                    tracing::warn!("{e}; keeping the previous allowlist");
                    read.0 = now;
                }
            }
        }
        let mut ids = read.1.clone();
        ids.extend(self.extra.lock().iter().copied());
        ids
    }

    pub fn allows(&self, peer: &NodeId) -> bool {
        self.current().contains(peer)
    }
}

/// An allowlist file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AllowlistError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}: {source}", path.display())]
    BadId { path: PathBuf, line: usize, source: NodeIdParseError },
}

/// Reads an allowlist file: one NodeId per line, `#` comments. A missing file is empty.
pub fn read_allowlist(path: &Path) -> Result<HashSet<NodeId>, AllowlistError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(source) => return Err(AllowlistError::Read { path: path.to_path_buf(), source }),
    };
    let mut ids = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let id = line.parse().map_err(|source| AllowlistError::BadId {
            path: path.to_path_buf(),
            line: n + 1,
            source,
        })?;
        ids.insert(id);
    }
    Ok(ids)
}

/// Why an offer was refused. The sender is told its Display (in [`ControlFrame::Reject`]).
#[derive(Debug, thiserror::Error)]
pub enum OfferRefusal {
    #[error("transfer version {0} is not supported (this node: {TRANSFER_VERSION})")]
    Version(u16),
    #[error("{0} entries; at most {MAX_ENTRIES}")]
    TooManyEntries(u32),
    #[error("expected {expected}, got {got:?}")]
    UnexpectedFrame { expected: &'static str, got: Box<ControlFrame> },
    #[error("the stream ended before the offer")]
    EndedBeforeOffer,
    #[error("the stream ended inside the offer")]
    EndedInsideOffer,
    #[error("unreadable offer: {0}")]
    Unreadable(StreamError),
    #[error("the offer's entries exceed {MAX_OFFER_BYTES} bytes")]
    TooLarge,
    #[error("more entries than announced")]
    MoreEntriesThanAnnounced,
    #[error("{announced} entries announced, {sent} sent")]
    CountMismatch { announced: usize, sent: usize },
    #[error("the offer's total does not match its files")]
    TotalMismatch,
    #[error("this node is not receiving files (it runs without --out)")]
    NotReceiving,
    #[error(
        "node {0} is not allowed to send files here; the receiver must add it with \
         --accept-from {0} (or its allowlist file) or run with --accept-any"
    )]
    NotAllowed(NodeId),
    #[error("unsafe offer: {0}")]
    Unsafe(PathError),
    #[error("cannot create {}: {source}", path.display())]
    CreateDirectory { path: PathBuf, source: std::io::Error },
    #[error("the receiver's folder is not usable: {0}")]
    Out(ReceiveConfigError),
}

/// Why a symlink entry was not created. The sender is told its Display (in
/// [`ControlFrame::EntryRefused`]).
#[derive(Debug, thiserror::Error)]
pub enum LinkRefusal {
    #[error("symbolic link {} not created: {why}", link.display())]
    Target { link: PathBuf, why: LinkError },
    #[error("{} already exists and is not this link; it is not overwritten", .0.display())]
    Exists(PathBuf),
    #[error("cannot create the directory for {}: {source}", path.display())]
    CreateDirectory { path: PathBuf, source: std::io::Error },
    #[error("cannot create symbolic link {}: {source}", path.display())]
    Create { path: PathBuf, source: std::io::Error },
}

/// `--out` (the receive folder) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveConfigError {
    #[error("{} exists and is not a directory; --out must name a directory (it is created if missing)", .0.display())]
    NotADirectory(PathBuf),
    #[error("cannot create the receive folder {}: {source}", path.display())]
    Create { path: PathBuf, source: std::io::Error },
    #[error("cannot use the receive folder {}: {source}", path.display())]
    Inspect { path: PathBuf, source: std::io::Error },
}

/// Why a file was not taken or not stored. The sender is told its Display (in
/// [`FileReply::Refused`] or [`FileReply::Failed`]).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("unknown transfer")]
    UnknownTransfer,
    #[error("no file number {0} in this transfer")]
    NoSuchFile(u32),
    #[error("{} is being received by another transfer", .0.display())]
    Busy(PathBuf),
    #[error("receiver failure: {0}")]
    Task(tokio::task::JoinError),
    #[error("cannot create the directory for {}: {source}", path.display())]
    CreateDirectory { path: PathBuf, source: std::io::Error },
    #[error("{} already exists with other content; it is not overwritten", .0.display())]
    OtherContent(PathBuf),
    #[error("{} already exists and is not a regular file", .0.display())]
    NotRegular(PathBuf),
    #[error("cannot check {}: {source}", path.display())]
    Check { path: PathBuf, source: std::io::Error },
    #[error("cannot check {}: {source}", path.display())]
    Hash { path: PathBuf, source: Box<TransferError> },
    #[error("{} exists and is not a regular file", .0.display())]
    PartNotRegular(PathBuf),
    #[error("cannot reset {}: {source}", part.display())]
    ResetPart { part: PathBuf, source: std::io::Error },
    #[error("cannot read {}: {source}", part.display())]
    ReadPart { part: PathBuf, source: std::io::Error },
    #[error("the stream closed")]
    StreamClosed,
    #[error("no hash for a file that exists here")]
    NoHashForExisting,
    #[error("the stream ended after {received} of {size} bytes; what arrived is kept for resume")]
    StreamEnded { received: u64, size: u64 },
    #[error("the transfer was interrupted ({0}); what arrived is kept for resume")]
    Interrupted(quinn::ReadError),
    #[error("the receiver's disk is full writing {}; the partial file is kept for resume", .0.display())]
    DiskFull(PathBuf),
    #[error("cannot write {}: {source}; the partial file is kept for resume", part.display())]
    Write { part: PathBuf, source: std::io::Error },
    #[error("the sender's hash did not follow the data in time")]
    HashTimeout,
    #[error("the stream did not end with the file's hash after its data; what arrived is kept for resume")]
    NoHash,
    #[error(
        "{} appeared while receiving; it is not overwritten (the data stays in {})",
        path.display(),
        part.display()
    )]
    Appeared { path: PathBuf, part: PathBuf },
    #[error("cannot move {} into place: {source}", part.display())]
    MoveIntoPlace { part: PathBuf, source: std::io::Error },
    #[error("cannot remove {}: {source}", part.display())]
    RemovePart { part: PathBuf, source: std::io::Error },
    #[error("a batch of {count} files sent inline is not one this offer allows")]
    BadBatch { count: u32 },
    #[error("the stream ended before the file's {size} bytes")]
    InlineShort { size: u64 },
}

impl FileError {
    /// This file is not taken (the sender should not try it again as it is).
    fn refused(self) -> FileReply {
        FileReply::Refused { reason: self.to_string() }
    }

    /// Storing this file failed; what arrived is kept for a resume.
    fn failed(self) -> FileReply {
        FileReply::Failed { reason: self.to_string() }
    }
}

/// Where received files go, who may send them, and where to report.
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    /// `None`: this node takes no files (offers are refused with a reason).
    pub out: Option<PathBuf>,
    pub policy: AcceptPolicy,
    /// Where offers, received files and progress are reported ([`TransferEvent`]s).
    pub events: Events,
}

impl ReceiveConfig {
    /// Checks `out` without changing anything: it is a directory (a symlink to one is
    /// fine: the user chose it), or it does not exist and no existing part of its path is a
    /// file.
    pub fn validate(&self) -> Result<(), ReceiveConfigError> {
        let Some(out) = &self.out else { return Ok(()) };
        for path in out.ancestors().filter(|p| !p.as_os_str().is_empty()) {
            match std::fs::metadata(path) {
                Ok(meta) if meta.is_dir() => return Ok(()),
                Ok(_) => return Err(ReceiveConfigError::NotADirectory(path.to_path_buf())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {}
                Err(source) => return Err(ReceiveConfigError::Inspect { path: path.to_path_buf(), source }),
            }
        }
        Ok(())
    }

    /// [`ReceiveConfig::validate`], then creates `out` if it is missing.
    pub fn prepare(&self) -> Result<(), ReceiveConfigError> {
        self.validate()?;
        if let Some(out) = &self.out {
            std::fs::create_dir_all(out)
                .map_err(|source| ReceiveConfigError::Create { path: out.clone(), source })?;
        }
        Ok(())
    }
}

/// A transfer being received, as `qpeer status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveReceive {
    pub transfer: TransferId,
    pub peer: NodeId,
    pub into: PathBuf,
    pub files: usize,
    pub bytes: u64,
    pub verified_files: u32,
    pub verified_bytes: u64,
    /// Bytes so far, counting what is in `.part` files (`progress.done`), files being
    /// received, rate and ETA: what the last [`TransferEvent::Progress`] would say now.
    pub progress: super::TransferProgress,
}

/// One File entry of an accepted offer.
#[derive(Debug, Clone)]
struct OfferedFile {
    rel: PathBuf,
    /// As offered (`/` separators).
    path: String,
    size: u64,
    meta: EntryMeta,
}

/// One Symlink entry of an accepted offer.
#[derive(Debug, Clone)]
struct OfferedLink {
    rel: PathBuf,
    path: String,
    target: String,
}

/// One accepted offer.
struct AcceptedOffer {
    peer: NodeId,
    out: PathBuf,
    /// The File entries, by file index.
    files: Vec<OfferedFile>,
    links: Vec<OfferedLink>,
    /// Directories this offer created, in offer order, and what the sender says about them.
    created_dirs: Vec<(PathBuf, EntryMeta)>,
    /// Files and bytes verified so far.
    verified: Mutex<(u32, u64)>,
    /// Entries refused or failed.
    refused: Mutex<u32>,
    progress: ProgressCounter,
    /// Files were stored without a sync of their own (inline ones): the file system is
    /// synced before the Summary.
    unsynced: std::sync::atomic::AtomicBool,
    /// Which files have their final answer.
    settled: Mutex<SettledFiles>,
    /// True once every file has its final answer: the Summary need not wait for Finish.
    all_settled: tokio::sync::watch::Sender<bool>,
}

impl AcceptedOffer {
    /// File `index` was answered `reply`: its progress ends, a refusal or failure is
    /// counted, and the file is settled unless the hash mismatched (after which the sender
    /// sends it again on a new stream, or gives up and says Finish).
    fn answered(&self, index: u32, reply: &FileReply) {
        let mismatch = matches!(reply, FileReply::HashMismatch);
        self.progress.end_file(index, !mismatch);
        if !matches!(reply, FileReply::Verified { .. } | FileReply::AlreadyComplete) && !mismatch {
            *self.refused.lock() += 1;
        }
        if !mismatch && self.settled.lock().settle(index) {
            self.all_settled.send_replace(true);
        }
    }
}

/// The files of an offer that have their final answer, each counted once whatever index a
/// sender repeats (or makes up).
struct SettledFiles {
    done: Vec<bool>,
    count: usize,
}

impl SettledFiles {
    fn new(files: usize) -> Self {
        Self { done: vec![false; files], count: 0 }
    }

    /// Marks `index`; true when every file is settled.
    fn settle(&mut self, index: u32) -> bool {
        if let Some(done) = self.done.get_mut(index as usize).filter(|done| !**done) {
            *done = true;
            self.count += 1;
        }
        self.count == self.done.len()
    }
}

/// Serves transfers on a listener's peer connections.
pub struct Receiver {
    config: ReceiveConfig,
    offers: Mutex<HashMap<TransferId, Arc<AcceptedOffer>>>,
    /// Final paths being written right now (one writer per path).
    busy: Mutex<HashSet<PathBuf>>,
    /// Signalled when a path stops being busy.
    released: tokio::sync::Notify,
    /// Small files' disk work at once (checks, writes, moves into place). Hundreds of threads
    /// creating files in one directory only fight over its lock in the kernel.
    disk: tokio::sync::Semaphore,
    /// Inline batches being read at once: each holds up to `INLINE_BATCH_BYTES` in memory.
    batches: tokio::sync::Semaphore,
}

/// Permits of [`Receiver`]'s `batches` semaphore: 16 MiB of small files in memory at most.
const BATCHES_AT_ONCE: usize = 16;

/// Permits of [`Receiver`]'s `disk` semaphore (and of the sender's small-file reads).
pub(crate) const DISK_WORKERS: usize = 4;

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
            offers: Mutex::default(),
            busy: Mutex::default(),
            released: tokio::sync::Notify::new(),
            disk: tokio::sync::Semaphore::new(DISK_WORKERS),
            batches: tokio::sync::Semaphore::new(BATCHES_AT_ONCE),
        })
    }

    /// The transfers being received right now.
    pub fn active(&self) -> Vec<ActiveReceive> {
        self.offers
            .lock()
            .iter()
            .map(|(transfer, offer)| {
                let (verified_files, verified_bytes) = *offer.verified.lock();
                ActiveReceive {
                    transfer: *transfer,
                    peer: offer.peer,
                    into: offer.out.clone(),
                    files: offer.files.len(),
                    // Sizes come from the sender: summed without overflow.
                    bytes: offer.files.iter().fold(0u64, |sum, f| sum.saturating_add(f.size)),
                    verified_files,
                    verified_bytes,
                    progress: offer.progress.progress(),
                }
            })
            .collect()
    }

    fn report(&self, event: TransferEvent) {
        self.config.events.transfer(event);
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
        let (transfer_id, offer) = match self.read_offer(peer, &mut reader).await {
            Ok(accepted) => accepted,
            Err(refusal) => {
                let reason = refusal.to_string();
                self.report(TransferEvent::Rejected { peer, reason: reason.clone() });
                let _ = write_frame(&mut send, &ControlFrame::Reject { reason }, MAX_FRAME_LEN).await;
                let _ = send.finish();
                return;
            }
        };
        self.offers.lock().insert(transfer_id, offer.clone());
        if write_frame(&mut send, &ControlFrame::Accept, MAX_FRAME_LEN).await.is_err() {
            self.offers.lock().remove(&transfer_id);
            self.report_end(transfer_id, &offer, false);
            return;
        }
        // What is here already: those files come one by one (resume, or a hash to compare).
        let present = {
            let (out, rels) =
                (offer.out.clone(), offer.files.iter().map(|f| f.rel.clone()).collect::<Vec<_>>());
            tokio::task::spawn_blocking(move || present_files(&out, &rels)).await.unwrap_or_default()
        };
        let mut chunks = present.chunks(PRESENT_PER_FRAME).peekable();
        let mut announced = true;
        if chunks.peek().is_none() {
            announced = write_frame(
                &mut send,
                &ControlFrame::Present { files: Vec::new(), more: false },
                MAX_FRAME_LEN,
            )
            .await
            .is_ok();
        }
        while let Some(chunk) = chunks.next() {
            let frame = ControlFrame::Present { files: chunk.to_vec(), more: chunks.peek().is_some() };
            if write_frame(&mut send, &frame, MAX_FRAME_LEN).await.is_err() {
                announced = false;
                break;
            }
        }
        if !announced {
            self.offers.lock().remove(&transfer_id);
            self.report_end(transfer_id, &offer, false);
            return;
        }
        // Symlinks now (no file can be written through them); refusals before the Summary.
        for link in &offer.links {
            let made = {
                let (out, link) = (offer.out.clone(), link.clone());
                tokio::task::spawn_blocking(move || make_link(&out, &link.rel, &link.target)).await
            };
            match made {
                Ok(Ok(already_here)) => self.report(TransferEvent::Linked {
                    transfer: transfer_id,
                    peer,
                    path: link.rel.clone(),
                    target: link.target.clone(),
                    already_here,
                }),
                Ok(Err(refusal)) => {
                    let reason = qpeer_wire::printable(&refusal.to_string(), MAX_REASON_LEN);
                    *offer.refused.lock() += 1;
                    self.report(TransferEvent::Refused {
                        transfer: transfer_id,
                        peer,
                        direction: Direction::Receiving,
                        path: link.path.clone(),
                        reason: reason.clone(),
                    });
                    let frame = ControlFrame::EntryRefused { path: link.path.clone(), reason };
                    if write_frame(&mut send, &frame, MAX_FRAME_LEN).await.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        // Wait for Finish (or the stream / connection ending), or until every file has its
        // final answer: then nothing more can come, and the Summary goes out a round trip
        // sooner than after Finish. Finish is still read afterwards (an unread stream would
        // be stopped, and the sender's Finish would fail).
        let mut all_settled = offer.all_settled.subscribe();
        let finish = reader.next::<ControlFrame>();
        tokio::pin!(finish);
        let (finished, settled_first) = tokio::select! {
            frame = &mut finish => (matches!(frame, Ok(Some(ControlFrame::Finish))), false),
            Ok(_) = all_settled.wait_for(|all| *all) => (true, true),
        };
        if finished {
            // Directory times last: creating what is inside changed them.
            let (out, dirs) = (offer.out.clone(), offer.created_dirs.clone());
            let unsynced = offer.unsynced.load(std::sync::atomic::Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(move || {
                for (rel, meta) in dirs.iter().rev() {
                    set_dir_meta(&out.join(rel), meta);
                }
                // One sync for all the small files (and their directory entries): a Summary
                // promises files on disk.
                if unsynced {
                    if let Err(error) =
                        std::fs::File::open(&out).and_then(|dir| Ok(rustix::fs::syncfs(&dir)?))
                    {
                        tracing::warn!(out = %out.display(), %error, "cannot sync the received files");
                    }
                }
            })
            .await;
        }
        let (files, bytes) = *offer.verified.lock();
        if finished {
            let _ = write_frame(&mut send, &ControlFrame::Summary { files, bytes }, MAX_FRAME_LEN).await;
            let _ = send.finish();
        }
        self.offers.lock().remove(&transfer_id);
        self.report_end(transfer_id, &offer, finished);
        if settled_first {
            let _ = finish.await;
        }
    }

    fn report_end(&self, transfer: TransferId, offer: &AcceptedOffer, finished: bool) {
        offer.progress.report();
        let progress = offer.progress.progress();
        let (files, bytes) = *offer.verified.lock();
        self.report(TransferEvent::ReceiveEnded {
            transfer,
            peer: offer.peer,
            files,
            bytes,
            finished,
            elapsed: progress.elapsed,
            received_now: progress.sent_now,
            already: progress.already,
            refused: *offer.refused.lock(),
        });
    }

    /// We refuse an entry: say so here too, not only to the sender.
    fn refuse(&self, transfer: TransferId, peer: NodeId, path: String, error: FileError) -> FileReply {
        let reply = error.refused();
        if let FileReply::Refused { reason } = &reply {
            self.report(TransferEvent::Refused {
                transfer,
                peer,
                direction: Direction::Receiving,
                path,
                reason: reason.clone(),
            });
        }
        reply
    }

    /// Reads and judges an offer.
    async fn read_offer(
        &self,
        peer: NodeId,
        reader: &mut FrameReader<quinn::RecvStream>,
    ) -> Result<(TransferId, Arc<AcceptedOffer>), OfferRefusal> {
        let (transfer_id, count, total_bytes) = match reader.next::<ControlFrame>().await {
            Ok(Some(ControlFrame::Offer { version, transfer_id, entries, total_bytes })) => {
                if version != TRANSFER_VERSION {
                    return Err(OfferRefusal::Version(version));
                }
                if entries > MAX_ENTRIES {
                    return Err(OfferRefusal::TooManyEntries(entries));
                }
                (transfer_id, entries as usize, total_bytes)
            }
            Ok(Some(other)) => {
                return Err(OfferRefusal::UnexpectedFrame { expected: "an offer", got: Box::new(other) })
            }
            Ok(None) => return Err(OfferRefusal::EndedBeforeOffer),
            Err(e) => return Err(OfferRefusal::Unreadable(e)),
        };
        // Decide on consent before reading (and buffering) a possibly huge list of entries.
        let Some(out) = self.config.out.clone() else {
            return Err(OfferRefusal::NotReceiving);
        };
        self.config.validate().map_err(OfferRefusal::Out)?;
        if !self.config.policy.allows(&peer) {
            return Err(OfferRefusal::NotAllowed(peer));
        }
        let mut offer_bytes = 0usize;
        let mut entries = Vec::with_capacity(count.min(4096));
        loop {
            match reader.next::<ControlFrame>().await {
                Ok(Some(ControlFrame::Entries(batch))) => {
                    offer_bytes += batch.iter().map(super::send::entry_cost).sum::<usize>();
                    if offer_bytes > MAX_OFFER_BYTES {
                        return Err(OfferRefusal::TooLarge);
                    }
                    entries.extend(batch);
                    if entries.len() > count {
                        return Err(OfferRefusal::MoreEntriesThanAnnounced);
                    }
                }
                Ok(Some(ControlFrame::OfferEnd)) => break,
                Ok(Some(other)) => {
                    return Err(OfferRefusal::UnexpectedFrame { expected: "entries", got: Box::new(other) })
                }
                Ok(None) => return Err(OfferRefusal::EndedInsideOffer),
                Err(e) => return Err(OfferRefusal::Unreadable(e)),
            }
        }
        if entries.len() != count {
            return Err(OfferRefusal::CountMismatch { announced: count, sent: entries.len() });
        }
        let files_bytes: u64 = entries
            .iter()
            .filter_map(|e| match e.kind {
                EntryKind::File { size, .. } => Some(size),
                _ => None,
            })
            .fold(0u64, |acc, size| acc.saturating_add(size));
        if files_bytes != total_bytes {
            return Err(OfferRefusal::TotalMismatch);
        }

        let paths = check_offer(&entries).map_err(OfferRefusal::Unsafe)?;
        let mut files = Vec::new();
        let mut links = Vec::new();
        let mut created_dirs = Vec::new();
        for (entry, rel) in entries.into_iter().zip(paths) {
            match entry.kind {
                EntryKind::File { size } => {
                    files.push(OfferedFile { rel, path: entry.path, size, meta: entry.meta })
                }
                EntryKind::Directory => match make_dirs(&out, &rel) {
                    Ok(true) => created_dirs.push((rel, entry.meta)),
                    Ok(false) => {}
                    Err(source) => return Err(OfferRefusal::CreateDirectory { path: rel, source }),
                },
                EntryKind::Symlink { target } => links.push(OfferedLink { rel, path: entry.path, target }),
            }
        }
        self.report(TransferEvent::OfferAccepted {
            transfer: transfer_id,
            peer,
            files: files.len(),
            bytes: total_bytes,
            into: out.clone(),
        });
        let files_len = files.len();
        let progress = ProgressCounter::new(
            self.config.events.clone(),
            transfer_id,
            peer,
            Direction::Receiving,
            total_bytes,
            files.len() as u32,
        );
        progress.report();
        Ok((
            transfer_id,
            Arc::new(AcceptedOffer {
                peer,
                out,
                files,
                links,
                created_dirs,
                verified: Mutex::new((0, 0)),
                refused: Mutex::new(0),
                progress,
                unsynced: std::sync::atomic::AtomicBool::new(false),
                settled: Mutex::new(SettledFiles::new(files_len)),
                all_settled: tokio::sync::watch::channel(files_len == 0).0,
            }),
        ))
    }

    /// One file stream.
    async fn file(self: Arc<Self>, peer: NodeId, mut send: quinn::SendStream, recv: quinn::RecvStream) {
        let mut reader = FrameReader::new(recv, MAX_FRAME_LEN, OFFER_TIMEOUT);
        let header = match tokio::time::timeout(OFFER_TIMEOUT, reader.next::<FileHeader>()).await {
            Ok(Ok(Some(header))) => header,
            _ => return,
        };
        if header.inline > 0 {
            for reply in self.receive_batch(peer, header, reader).await {
                if write_frame(&mut send, &reply, MAX_FRAME_LEN).await.is_err() {
                    break;
                }
            }
        } else {
            let reply = self.receive_file(peer, header, &mut send, reader).await;
            let _ = write_frame(&mut send, &reply, MAX_FRAME_LEN).await;
        }
        let _ = send.finish();
    }

    async fn receive_file(
        &self,
        peer: NodeId,
        header: FileHeader,
        send: &mut quinn::SendStream,
        reader: FrameReader<quinn::RecvStream>,
    ) -> FileReply {
        let transfer = header.transfer_id;
        let offer = self.offers.lock().get(&transfer).cloned();
        let Some(offer) = offer.filter(|o| o.peer == peer) else {
            return self.refuse(
                transfer,
                peer,
                format!("file #{}", header.index),
                FileError::UnknownTransfer,
            );
        };
        let index = header.index;
        let Some(entry) = offer.files.get(index as usize).cloned() else {
            return self.refuse(transfer, peer, format!("file #{index}"), FileError::NoSuchFile(index));
        };
        offer.progress.start_file(index, &entry.path, entry.size);
        let reply = self.receive_entry(peer, transfer, &offer, index, &entry, send, reader).await;
        offer.answered(index, &reply);
        reply
    }

    #[allow(clippy::too_many_arguments)]
    async fn receive_entry(
        &self,
        peer: NodeId,
        transfer: TransferId,
        offer: &Arc<AcceptedOffer>,
        index: u32,
        entry: &OfferedFile,
        send: &mut quinn::SendStream,
        reader: FrameReader<quinn::RecvStream>,
    ) -> FileReply {
        let (rel, size) = (entry.rel.clone(), entry.size);
        let final_path = offer.out.join(&rel);
        let Some(_busy) = self.claim(&final_path).await else {
            return self.refuse(transfer, peer, entry.path.clone(), FileError::Busy(rel));
        };

        let prepared = {
            let out = offer.out.clone();
            let rel = rel.clone();
            tokio::task::spawn_blocking(move || prepare(&out, &rel, size)).await
        };
        let (offset, hasher) = match prepared {
            Ok(Ok(Prepared::Resume { offset, hasher })) => (offset, hasher),
            Ok(Ok(Prepared::Exists)) => {
                return self.compare_existing(transfer, offer, index, entry, send, reader).await
            }
            Ok(Err(e)) => return self.refuse(transfer, peer, entry.path.clone(), e),
            Err(e) => return self.refuse(transfer, peer, entry.path.clone(), FileError::Task(e)),
        };
        if write_frame(send, &FileReply::Start { offset }, MAX_FRAME_LEN).await.is_err() {
            return FileError::StreamClosed.failed();
        }
        offer.progress.already(index, offset);
        match write_part(reader, &final_path, index, offset, size, *hasher, &offer.progress).await {
            Ok(WriteOutcome { received, sent }) if received == sent => {
                let finished = {
                    let final_path = final_path.clone();
                    let meta = entry.meta;
                    tokio::task::spawn_blocking(move || finish(&final_path, &meta, true)).await
                };
                match finished {
                    Ok(Ok(())) => {
                        self.count(offer, size);
                        self.report(TransferEvent::Received {
                            transfer,
                            peer,
                            path: rel,
                            size,
                            blake3: received,
                            already_here: false,
                        });
                        FileReply::Verified { blake3: received }
                    }
                    Ok(Err(e)) => e.failed(),
                    Err(e) => FileError::Task(e).failed(),
                }
            }
            Ok(WriteOutcome { .. }) => {
                self.report(TransferEvent::Corrupt { transfer, peer, path: rel });
                let _ = std::fs::remove_file(part_path(&final_path));
                // The sender sends it again from zero: count it again from zero.
                offer.progress.restart_file(index);
                FileReply::HashMismatch
            }
            Err(e) => {
                self.report(TransferEvent::FileFailed { transfer, peer, path: rel, reason: e.to_string() });
                e.failed()
            }
        }
    }

    /// Makes `final_path` ours to write until the guard drops. A sender that reconnects and
    /// resumes may find its previous stream still finishing here (the final fsync of what
    /// arrived): that gets a moment before `None`.
    async fn claim(&self, final_path: &Path) -> Option<BusyGuard<'_>> {
        let deadline = tokio::time::Instant::now() + BUSY_WAIT;
        loop {
            let released = self.released.notified();
            if self.busy.lock().insert(final_path.to_path_buf()) {
                return Some(BusyGuard { receiver: self, path: final_path.to_path_buf() });
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return None;
            }
        }
    }

    /// A batch of small files sent inline: each file's bytes and hash follow the header at
    /// once. Each is checked like any file; those that verify are stored together on one
    /// blocking thread, written whole through the page cache without a sync of their own (the
    /// transfer's files are made durable together before the Summary) and moved into place;
    /// a leftover `.part` is simply replaced. One answer per file, in order.
    async fn receive_batch(
        &self,
        peer: NodeId,
        header: FileHeader,
        reader: FrameReader<quinn::RecvStream>,
    ) -> Vec<FileReply> {
        let transfer = header.transfer_id;
        let count = header.inline;
        let label = |index: u32| format!("file #{index}");
        let offer = self.offers.lock().get(&transfer).cloned();
        let Some(offer) = offer.filter(|o| o.peer == peer) else {
            return vec![self.refuse(transfer, peer, label(header.index), FileError::UnknownTransfer)];
        };
        let last = header.index.checked_add(count - 1);
        let entries = match last {
            Some(last) if count <= INLINE_BATCH_FILES && (last as usize) < offer.files.len() => {
                offer.files[header.index as usize..=last as usize].to_vec()
            }
            _ => {
                return vec![self.refuse(transfer, peer, label(header.index), FileError::BadBatch { count })]
            }
        };
        let bytes = entries.iter().fold(0u64, |sum, e| sum.saturating_add(e.size));
        if entries.iter().any(|e| e.size > INLINE_MAX) || bytes > INLINE_BATCH_BYTES {
            return vec![self.refuse(transfer, peer, label(header.index), FileError::BadBatch { count })];
        }
        // Bounds what batches hold in memory at once, whatever the sender opens.
        let Ok(_batch) = self.batches.acquire().await else { return Vec::new() };

        // Read every file and its hash; the data came right behind the header.
        let (mut recv, mut ahead) = reader.into_parts();
        // Per file: its verified bytes and hash, or its answer already.
        let mut received: Vec<Result<VerifiedSmall, FileReply>> = Vec::with_capacity(entries.len());
        for (k, entry) in entries.iter().enumerate() {
            let index = header.index + k as u32;
            offer.progress.start_file(index, &entry.path, entry.size);
            let size = entry.size as usize;
            let first = ahead.len().min(size);
            let mut data: Vec<u8> = ahead.drain(..first).collect();
            data.resize(size, 0);
            let read = match recv.read_exact(&mut data[first..]).await {
                Ok(()) => Ok(()),
                Err(quinn::ReadExactError::FinishedEarly(_)) => {
                    Err(FileError::InlineShort { size: entry.size })
                }
                Err(quinn::ReadExactError::ReadError(e)) => Err(FileError::Interrupted(e)),
            };
            let mut trailer = FrameReader::with_ahead(recv, MAX_FRAME_LEN, OFFER_TIMEOUT, &ahead);
            let hash = match read {
                Ok(()) => match tokio::time::timeout(OFFER_TIMEOUT, trailer.next::<FileEnd>()).await {
                    Ok(Ok(Some(FileEnd { blake3 }))) => Ok(blake3),
                    Err(_) => Err(FileError::HashTimeout),
                    Ok(_) => Err(FileError::NoHash),
                },
                Err(e) => Err(e),
            };
            (recv, ahead) = trailer.into_parts();
            let sent = match hash {
                Ok(hash) => hash,
                Err(e) => {
                    // The stream is broken: this file and the rest of the batch failed.
                    received.push(Err(e.failed()));
                    break;
                }
            };
            offer.progress.add(index, entry.size);
            let ours = *blake3::hash(&data).as_bytes();
            if ours != sent {
                self.report(TransferEvent::Corrupt { transfer, peer, path: entry.rel.clone() });
                // The sender sends it again from zero: count it again from zero.
                offer.progress.restart_file(index);
                received.push(Err(FileReply::HashMismatch));
            } else {
                received.push(Ok((data, ours)));
            }
        }

        // Claim the verified files' paths, then store them on one blocking thread.
        let mut guards = Vec::new();
        let mut work = Vec::new();
        for (k, outcome) in received.iter_mut().enumerate() {
            if let Ok((data, hash)) = outcome {
                let entry = &entries[k];
                let final_path = offer.out.join(&entry.rel);
                match self.claim(&final_path).await {
                    Some(guard) => {
                        guards.push(guard);
                        work.push((
                            k,
                            entry.rel.clone(),
                            entry.size,
                            entry.meta,
                            std::mem::take(data),
                            *hash,
                        ));
                    }
                    None => {
                        *outcome = Err(self.refuse(
                            transfer,
                            peer,
                            entry.path.clone(),
                            FileError::Busy(entry.rel.clone()),
                        ))
                    }
                }
            }
        }
        let stored = {
            let out = offer.out.clone();
            let _disk = self.disk.acquire().await;
            tokio::task::spawn_blocking(move || {
                work.into_iter()
                    .map(|(k, rel, size, meta, data, hash)| {
                        (k, hash, store_small(&out, &rel, size, &meta, &data, &hash))
                    })
                    .collect::<Vec<_>>()
            })
            .await
        };
        drop(guards);
        let mut replies: Vec<Option<FileReply>> = received.into_iter().map(Result::err).collect();
        match stored {
            Ok(stored) => {
                for (k, hash, result) in stored {
                    let entry = &entries[k];
                    replies[k] = Some(match result {
                        Ok(already_here) => {
                            if !already_here {
                                offer.unsynced.store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                            self.count(&offer, entry.size);
                            self.report(TransferEvent::Received {
                                transfer,
                                peer,
                                path: entry.rel.clone(),
                                size: entry.size,
                                blake3: hash,
                                already_here,
                            });
                            if already_here {
                                FileReply::AlreadyComplete
                            } else {
                                FileReply::Verified { blake3: hash }
                            }
                        }
                        Err(
                            e @ (FileError::OtherContent(_)
                            | FileError::Hash { .. }
                            | FileError::NotRegular(_)),
                        ) => self.refuse(transfer, peer, entry.path.clone(), e),
                        Err(e) => {
                            self.report(TransferEvent::FileFailed {
                                transfer,
                                peer,
                                path: entry.rel.clone(),
                                reason: e.to_string(),
                            });
                            e.failed()
                        }
                    });
                }
            }
            Err(e) => {
                let reason = FileError::Task(e).to_string();
                for reply in replies.iter_mut().filter(|r| r.is_none()) {
                    *reply = Some(FileReply::Failed { reason: reason.clone() });
                }
            }
        }
        let replies: Vec<FileReply> = replies.into_iter().flatten().collect();
        for (k, reply) in replies.iter().enumerate() {
            let index = header.index + k as u32;
            offer.answered(index, reply);
        }
        replies
    }

    /// The destination holds a file of the offered size: ask for the sender's hash (no data)
    /// and compare it with the file's, hashed meanwhile.
    async fn compare_existing(
        &self,
        transfer: TransferId,
        offer: &AcceptedOffer,
        index: u32,
        entry: &OfferedFile,
        send: &mut quinn::SendStream,
        mut reader: FrameReader<quinn::RecvStream>,
    ) -> FileReply {
        let (rel, size) = (entry.rel.as_path(), entry.size);
        if write_frame(send, &FileReply::Exists, MAX_FRAME_LEN).await.is_err() {
            return FileError::StreamClosed.failed();
        }
        let existing = offer.out.join(rel);
        let ours = tokio::task::spawn_blocking(move || super::scan::hash_file_nofollow(&existing));
        // The sender hashes its copy first: allow for a large file on a slow disk.
        let theirs = tokio::time::timeout(HASH_TIMEOUT, reader.next::<FileEnd>());
        let (ours, theirs) = tokio::join!(ours, theirs);
        let theirs = match theirs {
            Ok(Ok(Some(FileEnd { blake3 }))) => blake3,
            _ => return FileError::NoHashForExisting.failed(),
        };
        match ours {
            Ok(Ok(ours)) if ours == theirs => {
                self.count(offer, size);
                offer.progress.already(index, size);
                self.report(TransferEvent::Received {
                    transfer,
                    peer: offer.peer,
                    path: rel.to_path_buf(),
                    size,
                    blake3: ours,
                    already_here: true,
                });
                FileReply::AlreadyComplete
            }
            Ok(Ok(_)) => self.refuse(
                transfer,
                offer.peer,
                entry.path.clone(),
                FileError::OtherContent(rel.to_path_buf()),
            ),
            Ok(Err(e)) => self.refuse(
                transfer,
                offer.peer,
                entry.path.clone(),
                FileError::Hash { path: rel.to_path_buf(), source: Box::new(e) },
            ),
            Err(e) => FileError::Task(e).failed(),
        }
    }

    fn count(&self, offer: &AcceptedOffer, size: u64) {
        let mut verified = offer.verified.lock();
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
        self.receiver.busy.lock().remove(&self.path);
        self.receiver.released.notify_waiters();
    }
}

/// Creates `out/rel` and its parents, refusing to pass through anything that is not a real
/// directory (a symlink planted inside `out` cannot redirect writes). Returns whether it
/// created `out/rel` itself.
fn make_dirs(out: &Path, rel: &Path) -> std::io::Result<bool> {
    std::fs::create_dir_all(out)?;
    let mut current = out.to_path_buf();
    let mut created = false;
    for part in rel.components() {
        current.push(part);
        created = false;
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", current.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&current)?;
                created = true;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

/// Creates the symlink `out/rel` → `target` if `target` stays inside `out` (blocking).
/// Returns whether the same link was there already.
fn make_link(out: &Path, rel: &Path, target: &str) -> Result<bool, LinkRefusal> {
    check_link_target(rel, target, 0).map_err(|why| LinkRefusal::Target { link: rel.to_path_buf(), why })?;
    if let Some(parent) = rel.parent() {
        make_dirs(out, parent)
            .map_err(|source| LinkRefusal::CreateDirectory { path: rel.to_path_buf(), source })?;
    }
    let path = out.join(rel);
    match std::os::unix::fs::symlink(target, &path) {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match std::fs::read_link(&path) {
            Ok(existing) if existing == Path::new(target) => Ok(true),
            _ => Err(LinkRefusal::Exists(rel.to_path_buf())),
        },
        Err(source) => Err(LinkRefusal::Create { path: rel.to_path_buf(), source }),
    }
}

/// The sender's mtime as a [`std::time::SystemTime`], if it has a valid one.
fn mtime_of(meta: &EntryMeta) -> Option<std::time::SystemTime> {
    let mtime = meta.mtime?;
    if mtime.nanos >= 1_000_000_000 {
        return None;
    }
    let epoch = std::time::UNIX_EPOCH;
    if mtime.secs >= 0 {
        epoch.checked_add(Duration::new(mtime.secs as u64, mtime.nanos))
    } else {
        epoch
            .checked_sub(Duration::from_secs(mtime.secs.unsigned_abs()))
            .and_then(|t| t.checked_add(Duration::from_nanos(u64::from(mtime.nanos))))
    }
}

/// Mode bits a received file gets: the sender's bits within [`MODE_MASK`] (never setuid,
/// setgid, sticky, nor group or other write), and always readable by its owner (so a later
/// send can be checked against it).
pub fn file_mode(sent: u32) -> u32 {
    (sent & MODE_MASK) | 0o400
}

/// Mode bits a directory this node created gets: the sender's rwx bits, never setgid or
/// sticky, and always `rwx` for its owner (so a later send can still write into it).
pub fn dir_mode(sent: u32) -> u32 {
    (sent & MODE_MASK) | 0o700
}

/// The sender's mode bits a receiver keeps: rwx for the owner, r-x for group and others. A
/// sender never makes what we receive writable by other local users (like a umask of 022).
const MODE_MASK: u32 = 0o755;

/// Sets a created directory's mode and mtime, through a handle that does not follow a link
/// (best effort: a directory that cannot take them keeps its own).
fn set_dir_meta(path: &Path, meta: &EntryMeta) {
    let Ok(dir) =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY).open(path)
    else {
        return;
    };
    if let Some(mode) = meta.mode {
        let _ = dir.set_permissions(std::fs::Permissions::from_mode(dir_mode(mode)));
    }
    if let Some(mtime) = mtime_of(meta) {
        let _ = dir.set_times(std::fs::FileTimes::new().set_modified(mtime));
    }
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

/// Indices of the files for which `out` holds something already: the file (or anything at
/// its name) or its `.part` (blocking).
fn present_files(out: &Path, rels: &[PathBuf]) -> Vec<u32> {
    rels.iter()
        .enumerate()
        .filter(|(_, rel)| {
            let path = out.join(rel);
            std::fs::symlink_metadata(&path).is_ok() || std::fs::symlink_metadata(part_path(&path)).is_ok()
        })
        .map(|(index, _)| index as u32)
        .collect()
}

/// A small file's bytes, which hashed to what its sender said.
type VerifiedSmall = (Vec<u8>, [u8; 32]);

/// Stores a verified small file (blocking): `Ok(true)` when the destination already holds
/// exactly this file, `Ok(false)` when it was written (unsynced) and moved into place.
fn store_small(
    out: &Path,
    rel: &Path,
    size: u64,
    meta: &EntryMeta,
    data: &[u8],
    hash: &[u8; 32],
) -> Result<bool, FileError> {
    let final_path = out.join(rel);
    match prepare(out, rel, size)? {
        Prepared::Exists => {
            let ours = super::scan::hash_file_nofollow(&final_path)
                .map_err(|source| FileError::Hash { path: rel.to_path_buf(), source: Box::new(source) })?;
            if ours == *hash {
                Ok(true)
            } else {
                Err(FileError::OtherContent(rel.to_path_buf()))
            }
        }
        Prepared::Resume { .. } => {
            let part = part_path(&final_path);
            write_whole(&part, data).map_err(|source| {
                if source.raw_os_error() == Some(libc::ENOSPC) {
                    FileError::DiskFull(part.clone())
                } else {
                    FileError::Write { part: part.clone(), source }
                }
            })?;
            finish(&final_path, meta, false)?;
            Ok(false)
        }
    }
}

/// Checks the destination and any `.part` (blocking).
fn prepare(out: &Path, rel: &Path, size: u64) -> Result<Prepared, FileError> {
    if let Some(parent) = rel.parent() {
        make_dirs(out, parent)
            .map_err(|source| FileError::CreateDirectory { path: rel.to_path_buf(), source })?;
    }
    let final_path = out.join(rel);
    match std::fs::symlink_metadata(&final_path) {
        Ok(meta) if meta.is_file() && meta.len() == size => return Ok(Prepared::Exists),
        Ok(meta) if meta.is_file() => return Err(FileError::OtherContent(rel.to_path_buf())),
        Ok(_) => return Err(FileError::NotRegular(rel.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(FileError::Check { path: rel.to_path_buf(), source }),
    }
    let part = part_path(&final_path);
    let read_error = |source| FileError::ReadPart { part: part.clone(), source };
    let mut hasher = blake3::Hasher::new();
    let offset = match std::fs::symlink_metadata(&part) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(source) => return Err(FileError::Check { path: part, source }),
        Ok(meta) if !meta.is_file() => return Err(FileError::PartNotRegular(part)),
        Ok(meta) if meta.len() > size || meta.nlink() > 1 => {
            // Longer than the file it should become: it belongs to something else. With
            // other hard links, writing it would change another file. Start over (removing
            // this name leaves any other file alone).
            std::fs::remove_file(&part)
                .map_err(|source| FileError::ResetPart { part: part.clone(), source })?;
            0
        }
        Ok(meta) => {
            let mut file = open_nofollow(&part).map_err(read_error)?;
            let mut buf = vec![0u8; CHUNK];
            let mut left = meta.len();
            while left > 0 {
                let n = file.read(&mut buf[..CHUNK.min(left as usize)]).map_err(read_error)?;
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

/// All bytes are in the `.part` (fsynced): the hash of what is there, and the hash the
/// sender sent after the data.
struct WriteOutcome {
    received: [u8; 32],
    sent: [u8; 32],
}

/// Appends the file's `size - offset` bytes to `<final>.part` on a blocking writer thread
/// (a bounded queue of reused buffers), hashing as it goes, then reads the sender's hash.
/// On an error, what arrived is kept in the `.part`.
async fn write_part(
    reader: FrameReader<quinn::RecvStream>,
    final_path: &Path,
    index: u32,
    offset: u64,
    size: u64,
    mut hasher: blake3::Hasher,
    progress: &ProgressCounter,
) -> Result<WriteOutcome, FileError> {
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
    // Bytes of the current buffer already counted in the progress.
    let mut counted = 0u64;
    let mut stream_error = None;
    while received < expected && stream_error.is_none() {
        let mut buf = spent_rx.try_recv().unwrap_or_default();
        buf.clear();
        // Whole buffers: hashing is fastest on large inputs and direct I/O wants whole blocks.
        let want = (expected - received).min(buf.spare().len() as u64) as usize;
        while buf.len() < want {
            let room = want - buf.len();
            match recv.read(&mut buf.spare()[..room]).await {
                Ok(Some(n)) => {
                    buf.filled(n);
                    // The file's first bytes count at once (the progress shows data flowing
                    // from the first packet, not from the first whole buffer).
                    if received == 0 && counted == 0 {
                        counted = n as u64;
                        progress.add(index, counted);
                    }
                }
                Ok(None) => {
                    stream_error =
                        Some(FileError::StreamEnded { received: offset + received + buf.len() as u64, size });
                    break;
                }
                Err(e) => {
                    stream_error = Some(FileError::Interrupted(e));
                    break;
                }
            }
        }
        received += buf.len() as u64;
        progress.add(index, buf.len() as u64 - counted);
        counted = 0;
        if !buf.is_empty() && tx.send(buf).await.is_err() {
            break; // The writer failed; its error is reported below.
        }
    }
    drop(tx);
    let hasher = match writer.await {
        Ok(Ok(hasher)) => hasher,
        Ok(Err(source)) => {
            // Stop the sender's writes: it then asks for our reason.
            let _ = recv.stop(0u32.into());
            return Err(if source.raw_os_error() == Some(libc::ENOSPC) {
                FileError::DiskFull(part)
            } else {
                FileError::Write { part, source }
            });
        }
        Err(e) => return Err(FileError::Task(e)),
    };
    if let Some(error) = stream_error {
        return Err(error);
    }
    // The sender's hash follows the data.
    let mut trailer = FrameReader::new(recv, MAX_FRAME_LEN, OFFER_TIMEOUT);
    let sent = match tokio::time::timeout(OFFER_TIMEOUT, trailer.next::<FileEnd>()).await {
        Ok(Ok(Some(FileEnd { blake3 }))) => blake3,
        Err(_) => return Err(FileError::HashTimeout),
        Ok(_) => return Err(FileError::NoHash),
    };
    Ok(WriteOutcome { received: *hasher.finalize().as_bytes(), sent })
}

/// Gives a verified `.part` the sender's mode bits (masked: [`file_mode`]) and mtime, moves
/// it into place without ever replacing an existing file, then makes the move durable.
fn finish(final_path: &Path, meta: &EntryMeta, sync_dir: bool) -> Result<(), FileError> {
    let part = part_path(final_path);
    if meta.mode.is_some() || meta.mtime.is_some() {
        // Through a handle on the .part itself (never a link): the name then appears with
        // its final mode and time. Best effort: a file system that takes no modes or times
        // (some FAT or network mounts) still gets the verified file.
        let set = open_nofollow(&part).and_then(|file| {
            if let Some(mode) = meta.mode {
                file.set_permissions(std::fs::Permissions::from_mode(file_mode(mode)))?;
            }
            if let Some(mtime) = mtime_of(meta) {
                file.set_times(std::fs::FileTimes::new().set_modified(mtime))?;
            }
            Ok(())
        });
        if let Err(error) = set {
            tracing::warn!(part = %part.display(), %error, "cannot set the sender's mode or mtime");
        }
    }
    std::fs::hard_link(&part, final_path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            FileError::Appeared { path: final_path.to_path_buf(), part: part.clone() }
        } else {
            FileError::MoveIntoPlace { part: part.clone(), source }
        }
    })?;
    std::fs::remove_file(&part).map_err(|source| FileError::RemovePart { part: part.clone(), source })?;
    if !sync_dir {
        return Ok(());
    }
    if let Some(dir) = final_path.parent() {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_is_settled_once_every_file_is_whatever_indices_repeat() {
        let mut settled = SettledFiles::new(3);
        assert!(!settled.settle(0));
        // A sender repeating a file, or naming one the offer does not have, settles nothing.
        assert!(!settled.settle(0));
        assert!(!settled.settle(7));
        assert!(!settled.settle(2));
        assert!(settled.settle(1));
        assert!(SettledFiles::new(0).done.is_empty() && SettledFiles::new(0).count == 0);
    }

    #[test]
    fn a_watched_allowlist_follows_its_file_and_keeps_the_last_good_list() {
        let home = tempfile::tempdir().expect("tempdir");
        let path = home.path().join("allowlist");
        let (a, b, c) =
            (NodeId::from_bytes([1; 32]), NodeId::from_bytes([2; 32]), NodeId::from_bytes([3; 32]));
        std::fs::write(&path, format!("{a}\n")).expect("write");
        let policy =
            AcceptPolicy::Watched(Arc::new(WatchedAllowlist::new(&path).expect("reads"))).allow_also([c]);
        assert!(policy.allows(&a) && policy.allows(&c) && !policy.allows(&b));
        // Edited while running: b now, a no longer (the length changes, whatever the clock).
        std::fs::write(&path, format!("# edited\n{b}\n")).expect("write");
        assert!(policy.allows(&b) && !policy.allows(&a) && policy.allows(&c));
        // A broken edit keeps what was allowed.
        std::fs::write(&path, "not an id\n").expect("write");
        assert!(policy.allows(&b) && !policy.allows(&a));
        // Removed: only the extra ids.
        std::fs::remove_file(&path).expect("remove");
        assert!(!policy.allows(&b) && policy.allows(&c));
    }
}
