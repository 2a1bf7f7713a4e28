//! The sender's side of an offer: walk the paths the user named; hashing files.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use qpeer_wire::transfer::{EntryKind, EntryMeta, Mtime, OfferEntry, MAX_ENTRIES};

use super::sanitize::{check_link_target, LinkError};
use super::{SourceProblem, TransferError};

/// A file to send: where it is here and what the offer says about it.
#[derive(Debug, Clone)]
pub struct LocalFile {
    pub source: PathBuf,
    pub path: String,
    pub size: u64,
    /// Modification time when the offer was made: a file that changes while it is sent is
    /// reported, not delivered as a mix of old and new bytes.
    pub modified: Option<std::time::SystemTime>,
}

/// Everything one `send` offers.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub entries: Vec<OfferEntry>,
    /// The offer's File entries, in order (their index is the file index on the wire).
    pub files: Vec<LocalFile>,
    pub total_bytes: u64,
    /// Paths inside the named directories that are left out, and why.
    pub skipped: Vec<(PathBuf, Skipped)>,
    /// Symlink entries in the offer.
    pub links: usize,
}

/// Why a path inside a directory being sent is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// A symbolic link whose target is absolute or leads outside the directory being sent:
    /// it is neither followed nor sent.
    Symlink(LinkError),
    /// A symbolic link whose target is not UTF-8.
    SymlinkNotUtf8,
    NotRegularFile,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Symlink(why) => write!(f, "symbolic link not sent (not followed): {why}"),
            Self::SymlinkNotUtf8 => f.write_str("symbolic link not sent: its target is not UTF-8"),
            Self::NotRegularFile => f.write_str("not a regular file"),
        }
    }
}

/// The mode bits and modification time of `metadata`, as an offer carries them.
pub fn entry_meta(metadata: &std::fs::Metadata) -> EntryMeta {
    let nanos = u32::try_from(metadata.mtime_nsec()).ok().filter(|n| *n < 1_000_000_000);
    EntryMeta {
        mode: Some(metadata.mode() & 0o7777),
        mtime: nanos.map(|nanos| Mtime { secs: metadata.mtime(), nanos }),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TransferError + '_ {
    move |source| TransferError::Io { path: path.to_path_buf(), source }
}

/// Feeds the next `limit` bytes of `file` (fewer at its end) to `hasher`; returns how many
/// were read. One thread reads 8 MiB blocks while the previous block is hashed on every core
/// (BLAKE3's tree mode). Reading instead of memory-mapping keeps a file that shrinks
/// meanwhile an error, not a crash.
pub fn hash_into(file: &mut std::fs::File, limit: u64, hasher: &mut blake3::Hasher) -> std::io::Result<u64> {
    const BLOCK: usize = 8 << 20;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
    let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
    for _ in 0..2 {
        let _ = empty_tx.send(Vec::with_capacity(BLOCK));
    }
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> std::io::Result<u64> {
            let mut total = 0u64;
            while let Ok(mut buf) = empty_rx.recv() {
                buf.clear();
                let want = (limit - total).min(BLOCK as u64);
                (&mut *file).take(want).read_to_end(&mut buf)?;
                total += buf.len() as u64;
                let last = buf.is_empty();
                if full_tx.send(buf).is_err() || last {
                    break;
                }
            }
            Ok(total)
        });
        while let Ok(buf) = full_rx.recv() {
            if buf.is_empty() {
                break;
            }
            hasher.update_rayon(&buf);
            let _ = empty_tx.send(buf);
        }
        drop(empty_tx);
        reader.join().unwrap_or_else(|_| Err(std::io::Error::other("the reader thread failed")))
    })
}

/// BLAKE3 of a whole file.
pub fn hash_file(path: &Path) -> Result<[u8; 32], TransferError> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = blake3::Hasher::new();
    hash_into(&mut file, u64::MAX, &mut hasher).map_err(io_err(path))?;
    Ok(*hasher.finalize().as_bytes())
}

/// BLAKE3 of a whole file, refusing to follow a symlink at `path` (the receiver's side).
pub(crate) fn hash_file_nofollow(path: &Path) -> Result<[u8; 32], TransferError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(path))?;
    let mut hasher = blake3::Hasher::new();
    hash_into(&mut file, u64::MAX, &mut hasher).map_err(io_err(path))?;
    Ok(*hasher.finalize().as_bytes())
}

fn utf8_name(path: &Path) -> Result<String, TransferError> {
    path.file_name().and_then(|n| n.to_str()).map(str::to_string).ok_or_else(|| TransferError::BadSource {
        path: path.to_path_buf(),
        problem: SourceProblem::NameNotUtf8,
    })
}

/// Builds the offer for `paths` (blocking: walks the directories; files are read later, as
/// they are sent).
pub fn scan(paths: &[PathBuf]) -> Result<Plan, TransferError> {
    let mut plan = Plan::default();
    let mut top_names = std::collections::HashSet::new();
    for path in paths {
        let canonical = path.canonicalize().map_err(io_err(path))?;
        let name = utf8_name(&canonical)?;
        if !top_names.insert(name.clone()) {
            return Err(TransferError::BadSource {
                path: path.clone(),
                problem: SourceProblem::NameCollision(name),
            });
        }
        // A path named on the command line is followed if it is a link, like scp does.
        let metadata = std::fs::metadata(&canonical).map_err(io_err(path))?;
        if metadata.is_dir() {
            walk(&canonical, name, &mut plan)?;
        } else if metadata.is_file() {
            add_file(&canonical, name, &metadata, &mut plan);
        } else {
            return Err(TransferError::BadSource {
                path: path.clone(),
                problem: SourceProblem::NotFileOrDirectory,
            });
        }
    }
    if plan.entries.len() > MAX_ENTRIES as usize {
        return Err(TransferError::BadSource {
            path: paths.first().cloned().unwrap_or_default(),
            problem: SourceProblem::TooManyEntries(plan.entries.len()),
        });
    }
    Ok(plan)
}

fn add_file(source: &Path, path: String, metadata: &std::fs::Metadata, plan: &mut Plan) {
    let size = metadata.len();
    plan.entries.push(OfferEntry {
        path: path.clone(),
        kind: EntryKind::File { size },
        meta: entry_meta(metadata),
    });
    let modified = metadata.modified().ok();
    plan.files.push(LocalFile { source: source.to_path_buf(), path, size, modified });
    plan.total_bytes += size;
}

fn walk(dir: &Path, rel: String, plan: &mut Plan) -> Result<(), TransferError> {
    let metadata = std::fs::metadata(dir).map_err(io_err(dir))?;
    plan.entries.push(OfferEntry {
        path: rel.clone(),
        kind: EntryKind::Directory,
        meta: entry_meta(&metadata),
    });
    let mut children: Vec<_> =
        std::fs::read_dir(dir).map_err(io_err(dir))?.collect::<Result<Vec<_>, _>>().map_err(io_err(dir))?;
    children.sort_by_key(|e| e.file_name());
    for child in children {
        let source = child.path();
        let name = utf8_name(&source)?;
        let child_rel = format!("{rel}/{name}");
        let metadata = std::fs::symlink_metadata(&source).map_err(io_err(&source))?;
        if metadata.file_type().is_symlink() {
            add_link(source, child_rel, plan)?;
        } else if metadata.is_dir() {
            walk(&source, child_rel, plan)?;
        } else if metadata.is_file() {
            add_file(&source, child_rel, &metadata, plan);
        } else {
            plan.skipped.push((source, Skipped::NotRegularFile));
        }
    }
    Ok(())
}

/// A symlink inside a directory being sent: offered as a link (never followed) when its
/// target is relative and stays inside the directory named on the command line; skipped
/// otherwise.
fn add_link(source: PathBuf, rel: String, plan: &mut Plan) -> Result<(), TransferError> {
    let target = std::fs::read_link(&source).map_err(io_err(&source))?;
    let Some(target) = target.to_str().map(str::to_string) else {
        plan.skipped.push((source, Skipped::SymlinkNotUtf8));
        return Ok(());
    };
    match check_link_target(Path::new(&rel), &target, 1) {
        Ok(()) => {
            plan.entries.push(OfferEntry {
                path: rel,
                kind: EntryKind::Symlink { target },
                meta: EntryMeta::default(),
            });
            plan.links += 1;
        }
        Err(why) => plan.skipped.push((source, Skipped::Symlink(why))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_inside_the_tree_are_offered_and_others_skipped_with_modes_and_times() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
        std::fs::write(tree.join("sub/run.sh"), b"#!/bin/sh\n").expect("write");
        std::fs::write(dir.path().join("outside"), b"x").expect("write");
        use std::os::unix::fs::{symlink, PermissionsExt};
        std::fs::set_permissions(tree.join("sub/run.sh"), std::fs::Permissions::from_mode(0o750))
            .expect("chmod");
        symlink("sub/run.sh", tree.join("inside")).expect("link");
        symlink("../run.sh", tree.join("sub/up")).expect("link");
        symlink("../outside", tree.join("escapes")).expect("link");
        symlink("/etc/passwd", tree.join("absolute")).expect("link");
        let plan = scan(&[tree]).expect("scan");
        let links: Vec<_> = plan
            .entries
            .iter()
            .filter_map(|e| match &e.kind {
                EntryKind::Symlink { target } => Some((e.path.as_str(), target.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(links, [("tree/inside", "sub/run.sh"), ("tree/sub/up", "../run.sh")]);
        assert_eq!(plan.links, 2);
        let skipped: Vec<_> =
            plan.skipped.iter().map(|(p, _)| p.file_name().expect("name").to_owned()).collect();
        assert_eq!(skipped, ["absolute", "escapes"]);
        assert!(plan.skipped.iter().all(|(_, why)| matches!(why, Skipped::Symlink(_))));
        let script = plan.entries.iter().find(|e| e.path == "tree/sub/run.sh").expect("the script");
        assert_eq!(script.meta.mode, Some(0o750));
        assert!(script.meta.mtime.is_some());
    }
}
