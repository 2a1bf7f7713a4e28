//! File-transfer wire types (docs/PROTOCOL.md, "File transfer"). Pure data; encoded with the
//! shared length-prefixed bincode codec ([`crate::codec`]).
//!
//! A transfer uses one control stream (kind [`StreamKind::Transfer`]) and one stream per
//! file (kind [`StreamKind::FileData`]):
//!
//! ```text
//! control:  S→R Offer, Entries…, OfferEnd      R→S Accept | Reject
//!                                              R→S Present…       (after Accept)
//!                                              R→S EntryRefused…  (after Present: symlinks)
//! per file: S→R FileHeader                     R→S Start{offset} | Exists | Refused
//!           S→R <size - offset raw bytes>       (after Start; none after Exists)
//!           S→R FileEnd{blake3}, FIN           R→S Verified | HashMismatch | Failed
//!                                                  | AlreadyComplete | Refused (after Exists)
//! small:    S→R FileHeader{inline: n}, then n × (<size raw bytes>, FileEnd{blake3}), FIN
//!                                              R→S n × (Verified | HashMismatch | Failed
//!                                                  | AlreadyComplete | Refused), in order
//! control:  S→R Finish                         R→S Summary
//! ```
//!
//! The file's BLAKE3 hash travels after its data, so the sender reads each file once, hashing
//! the bytes as it sends them. Files of at most [`INLINE_MAX`] bytes are sent `inline`, up to
//! [`INLINE_BATCH_FILES`] consecutive ones (at most [`INLINE_BATCH_BYTES`]) on one stream:
//! their data follows the header at once, without waiting for `Start`, so small files cost
//! one round trip per batch, many batches are in flight at once, and a stream's setup is
//! shared by its files.
//!
//! [`StreamKind::Transfer`]: crate::peer::StreamKind::Transfer
//! [`StreamKind::FileData`]: crate::peer::StreamKind::FileData

use serde::{Deserialize, Serialize};

/// Version carried in [`ControlFrame::Offer`]. 3: entries carry [`EntryMeta`] (mode and
/// mtime), symlinks are offered ([`EntryKind::Symlink`]) and refused one by one
/// ([`ControlFrame::EntryRefused`]). 4: small files are sent inline ([`FileHeader::inline`]).
pub const TRANSFER_VERSION: u16 = 4;
/// Largest file sent inline (its data right after its [`FileHeader`], no resume).
pub const INLINE_MAX: u64 = 64 * 1024;
/// Most files in one inline batch.
pub const INLINE_BATCH_FILES: u32 = 256;
/// Most bytes of file data in one inline batch (the receiver holds a batch in memory).
pub const INLINE_BATCH_BYTES: u64 = 1 << 20;
/// Most entries in one offer.
pub const MAX_ENTRIES: u32 = 100_000;
/// Most entries in one [`ControlFrame::Entries`] frame (keeps frames under the codec limit).
pub const ENTRIES_PER_FRAME: usize = 64;
/// Longest relative path in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest reason string.
pub const MAX_REASON_LEN: usize = 1024;

/// A 128-bit random id naming one transfer session.
pub type TransferId = [u8; 16];

/// What an offered path is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file of `size` bytes (its hash follows its data, in [`FileEnd`]).
    File { size: u64 },
    /// A directory (listed so that empty directories arrive too).
    Directory,
    /// A symbolic link to `target`, as the sender's `readlink` gives it (never followed).
    /// The receiver creates it only when `target` is relative and, resolved from the link's
    /// own directory, stays inside the receive folder; otherwise it refuses that entry alone
    /// ([`ControlFrame::EntryRefused`]).
    Symlink { target: String },
}

/// A modification time: seconds since the Unix epoch (negative before it) and nanoseconds
/// (`< 1_000_000_000`; a receiver ignores a time whose `nanos` is out of range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mtime {
    pub secs: i64,
    pub nanos: u32,
}

/// What the sender's file system says about an entry, to be reproduced by the receiver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    /// Unix permission bits (`st_mode & 0o7777`); `None`: unknown, the receiver's default.
    /// Receivers mask it (no setuid, setgid or sticky bit; see docs/SECURITY.md).
    pub mode: Option<u32>,
    /// Modification time; `None`: unknown (the receiver's file keeps its write time).
    pub mtime: Option<Mtime>,
}

/// One offered path, relative, with `/` separators; the first component is the name of what
/// the user sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferEntry {
    pub path: String,
    pub kind: EntryKind,
    /// Mode and mtime (ignored for symlinks).
    pub meta: EntryMeta,
}

/// Frames on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlFrame {
    /// S→R: a transfer of `entries` entries totalling `total_bytes` file bytes.
    Offer { version: u16, transfer_id: TransferId, entries: u32, total_bytes: u64 },
    /// S→R: the next entries, in order (file indices count files only, in this order).
    Entries(Vec<OfferEntry>),
    /// S→R: all entries sent.
    OfferEnd,
    /// R→S: the receiver takes the offer.
    Accept,
    /// R→S: the receiver refuses the whole offer.
    Reject { reason: String },
    /// S→R: every file has its result; the sender is done.
    Finish,
    /// R→S: what the receiver holds now from this transfer.
    Summary { files: u32, bytes: u64 },
    /// R→S, after [`ControlFrame::Accept`] and before [`ControlFrame::Summary`]: the entry at
    /// `path` (a symlink) was not created, and why. The rest of the transfer goes on.
    EntryRefused { path: String, reason: String },
    /// R→S, right after [`ControlFrame::Accept`], one or more (the last with `more: false`):
    /// the files (by file index) for which the receiver already holds something (the file,
    /// or a `.part` of it). The sender sends those one by one (Start / Exists), never inline,
    /// so what is already there is not sent again.
    Present { files: Vec<u32>, more: bool },
}

/// Most file indices in one [`ControlFrame::Present`] frame (keeps frames under the codec
/// limit).
pub const PRESENT_PER_FRAME: usize = 4096;

/// First frame of a file stream, S→R.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHeader {
    pub transfer_id: TransferId,
    /// Index of the file among the offer's File entries.
    pub index: u32,
    /// 0: the file `index` alone, its data after the receiver's `Start`. n ≥ 1: the files
    /// `index .. index + n` (each at most [`INLINE_MAX`] bytes, [`INLINE_BATCH_FILES`] and
    /// [`INLINE_BATCH_BYTES`] at most in all) follow at once, each as its bytes then its
    /// [`FileEnd`]; the receiver sends no `Start` or `Exists`, and one answer per file, in
    /// order.
    pub inline: u32,
}

/// S→R, after the file's data: the BLAKE3 hash of the whole file as the sender read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEnd {
    pub blake3: [u8; 32],
}

/// R→S answers on a file stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileReply {
    /// Send from `offset`: the receiver already holds the bytes before it (in `<name>.part`).
    Start { offset: u64 },
    /// After [`FileEnd`] that followed [`FileReply::Exists`]: the receiver's file is this
    /// exact file.
    AlreadyComplete,
    /// The receiver will not take this file.
    Refused { reason: String },
    /// After the data: the file is complete, verified and in place.
    Verified { blake3: [u8; 32] },
    /// After the data: the file's hash does not match the offer; the partial file was discarded,
    /// so a retry starts from zero.
    HashMismatch,
    /// After the data: writing failed; what was written is kept in `<name>.part` for resume.
    Failed { reason: String },
    /// The destination already holds a file of this size: send no data, only [`FileEnd`], and
    /// the receiver answers whether it is the same file.
    Exists,
}

#[cfg(test)]
mod tests {
    use crate::codec::{decode_body, encode_frame, FrameDecoder};
    use crate::tracker::MAX_FRAME_LEN;
    use proptest::prelude::*;

    use super::*;

    fn entry() -> impl Strategy<Value = OfferEntry> {
        let kind = prop_oneof![
            any::<u64>().prop_map(|size| EntryKind::File { size }),
            Just(EntryKind::Directory),
            ".{0,20}".prop_map(|target| EntryKind::Symlink { target }),
        ];
        let mtime =
            prop::option::of((any::<i64>(), any::<u32>()).prop_map(|(secs, nanos)| Mtime { secs, nanos }));
        let meta =
            (prop::option::of(any::<u32>()), mtime).prop_map(|(mode, mtime)| EntryMeta { mode, mtime });
        (".{0,40}", kind, meta).prop_map(|(path, kind, meta)| OfferEntry { path, kind, meta })
    }

    fn control() -> impl Strategy<Value = ControlFrame> {
        prop_oneof![
            (any::<u16>(), any::<[u8; 16]>(), any::<u32>(), any::<u64>()).prop_map(
                |(version, transfer_id, entries, total_bytes)| ControlFrame::Offer {
                    version,
                    transfer_id,
                    entries,
                    total_bytes
                }
            ),
            prop::collection::vec(entry(), 0..ENTRIES_PER_FRAME).prop_map(ControlFrame::Entries),
            Just(ControlFrame::OfferEnd),
            Just(ControlFrame::Accept),
            ".{0,50}".prop_map(|reason| ControlFrame::Reject { reason }),
            Just(ControlFrame::Finish),
            (any::<u32>(), any::<u64>()).prop_map(|(files, bytes)| ControlFrame::Summary { files, bytes }),
            (".{0,40}", ".{0,50}").prop_map(|(path, reason)| ControlFrame::EntryRefused { path, reason }),
            (prop::collection::vec(any::<u32>(), 0..PRESENT_PER_FRAME), any::<bool>())
                .prop_map(|(files, more)| ControlFrame::Present { files, more }),
        ]
    }

    fn reply() -> impl Strategy<Value = FileReply> {
        prop_oneof![
            any::<u64>().prop_map(|offset| FileReply::Start { offset }),
            Just(FileReply::AlreadyComplete),
            ".{0,50}".prop_map(|reason| FileReply::Refused { reason }),
            any::<[u8; 32]>().prop_map(|blake3| FileReply::Verified { blake3 }),
            Just(FileReply::HashMismatch),
            ".{0,50}".prop_map(|reason| FileReply::Failed { reason }),
            Just(FileReply::Exists),
        ]
    }

    fn roundtrip<T>(value: &T) -> T
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let frame = encode_frame(value, MAX_FRAME_LEN).expect("encode");
        let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
        decoder.extend(&frame);
        decoder.next_frame().expect("decode").expect("a frame")
    }

    #[test]
    fn a_full_entries_frame_of_long_paths_fits_the_frame_limit() {
        let meta = EntryMeta { mode: Some(u32::MAX), mtime: Some(Mtime { secs: i64::MIN, nanos: u32::MAX }) };
        let long =
            OfferEntry {
                path: "é".repeat(MAX_PATH_LEN / 2), kind: EntryKind::File { size: u64::MAX }, meta
            };
        let frame = ControlFrame::Entries(vec![long; 8]);
        assert!(encode_frame(&frame, MAX_FRAME_LEN).is_ok());
    }

    proptest! {
        #[test]
        fn control_frames_roundtrip(frame in control()) {
            prop_assert_eq!(roundtrip(&frame), frame);
        }

        #[test]
        fn file_frames_roundtrip(
            reply in reply(),
            id in any::<[u8; 16]>(),
            index in any::<u32>(),
            inline in any::<u32>(),
            blake3 in any::<[u8; 32]>(),
        ) {
            prop_assert_eq!(roundtrip(&reply), reply);
            let header = FileHeader { transfer_id: id, index, inline };
            prop_assert_eq!(roundtrip(&header), header);
            let end = FileEnd { blake3 };
            prop_assert_eq!(roundtrip(&end), end);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
            let _ = decode_body::<ControlFrame>(&bytes);
            let _ = decode_body::<FileHeader>(&bytes);
            let _ = decode_body::<FileReply>(&bytes);
            let _ = decode_body::<FileEnd>(&bytes);
            let _ = decode_body::<OfferEntry>(&bytes);
            let _ = decode_body::<EntryMeta>(&bytes);
        }

        #[test]
        fn mutated_offers_never_panic(
            frame in control(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let mut bytes = encode_frame(&frame, MAX_FRAME_LEN).expect("encode");
            for (index, value) in flips {
                let i = index.index(bytes.len());
                bytes[i] ^= value;
            }
            let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
            decoder.extend(&bytes);
            let _ = decoder.next_frame::<ControlFrame>();
        }
    }
}
