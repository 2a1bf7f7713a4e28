//! Writing a `<name>.part` file as it arrives.
//!
//! Where the filesystem allows it, the file is written with direct I/O (`O_DIRECT`): the
//! data goes from our buffer to the disk, without a copy into the page cache and without the
//! kernel's writeback of that cache at the final fsync, which on the machines we measured was
//! the slowest part of a receive (docs/PERFORMANCE.md). Direct I/O wants buffers, lengths and
//! file offsets aligned to the device's block size; [`ALIGN`] (4 KiB) covers the usual 512 B
//! and 4 KiB blocks. A filesystem that refuses direct I/O (tmpfs, some network filesystems)
//! gets ordinary buffered writes, flushed in the background as data arrives.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Alignment of direct-I/O buffers, lengths and offsets.
pub const ALIGN: usize = 4096;
/// Bytes per buffer (a multiple of [`ALIGN`]).
pub const BUFFER: usize = 1 << 20;
/// Bytes written between background flushes when writing through the page cache.
const FLUSH_EVERY: u64 = 64 << 20;

/// A reusable buffer whose data starts at an [`ALIGN`]-aligned address.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new() -> Self {
        let storage = vec![0u8; BUFFER + ALIGN];
        let start = (ALIGN - storage.as_ptr() as usize % ALIGN) % ALIGN;
        Self { storage, start, len: 0 }
    }

    /// The data held.
    pub fn data(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == BUFFER
    }

    /// Room after the data, to read into; then [`AlignedBuf::filled`].
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.storage[self.start + self.len..self.start + BUFFER]
    }

    /// Marks `n` more bytes of [`AlignedBuf::spare`] as data.
    pub fn filled(&mut self, n: usize) {
        self.len = (self.len + n).min(BUFFER);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The data followed by zeros up to the next multiple of [`ALIGN`].
    fn padded(&mut self) -> &[u8] {
        let end = self.len.div_ceil(ALIGN) * ALIGN;
        self.storage[self.start + self.len..self.start + end].fill(0);
        &self.storage[self.start..self.start + end]
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        Self::new()
    }
}

/// Opens without following a symlink at `path` (`O_NOFOLLOW`: a link planted as the
/// `.part` makes the open fail rather than write elsewhere).
fn open(path: &Path, direct: bool) -> io::Result<File> {
    let mut flags = libc::O_NOFOLLOW;
    if direct {
        flags |= libc::O_DIRECT;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o644)
        .custom_flags(flags)
        .open(path)
}

/// Checked on the open handle (no race with the path): a `.part` with another name elsewhere
/// is never written, so no other file can change through it.
fn single_link(file: &File, path: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(io::Error::other(format!(
            "{} is not a regular file with a single link; it is not written",
            path.display()
        )));
    }
    Ok(())
}

/// Writes a small file's whole `.part` at once through the page cache, replacing what it
/// held, without a sync: small files are made durable together, at the end of their
/// transfer, rather than one fsync (and one device write) each.
pub fn write_whole(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut file = open(path, false)?;
    single_link(&file, path)?;
    file.set_len(0)?;
    file.write_all(data)
}

/// Appends to a `.part` file from a given offset.
pub struct PartWriter {
    path: PathBuf,
    file: File,
    direct: bool,
    /// Where the next byte goes.
    position: u64,
    unflushed: u64,
    flushers: Vec<std::thread::JoinHandle<()>>,
}

impl PartWriter {
    /// Opens (creating) `path`, cuts it to `offset` and positions there. Direct I/O needs an
    /// aligned start: a `.part` resumed from elsewhere is continued through the page cache.
    pub fn open(path: &Path, offset: u64) -> io::Result<Self> {
        let direct_possible = offset.is_multiple_of(ALIGN as u64);
        let (file, direct) = match direct_possible.then(|| open(path, true)) {
            Some(Ok(file)) => (file, true),
            // EINVAL: this filesystem does not do direct I/O.
            Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => (open(path, false)?, false),
            Some(Err(e)) => return Err(e),
            None => (open(path, false)?, false),
        };
        single_link(&file, path)?;
        let mut writer = Self {
            path: path.to_path_buf(),
            file,
            direct,
            position: offset,
            unflushed: 0,
            flushers: Vec::new(),
        };
        writer.file.set_len(offset)?;
        writer.file.seek(SeekFrom::Start(offset))?;
        Ok(writer)
    }

    /// Whether writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Appends `buf`'s data. A buffer that is not a whole number of [`ALIGN`] blocks can only
    /// be the last one of a direct write: it is written padded, the file is cut back to its
    /// real length and later writes (if any) go through the page cache.
    pub fn write(&mut self, buf: &mut AlignedBuf) -> io::Result<()> {
        if self.direct {
            let whole = buf.len().is_multiple_of(ALIGN);
            let written =
                if whole { self.file.write_all(buf.data()) } else { self.file.write_all(buf.padded()) };
            match written {
                Ok(()) if whole => {
                    self.position += buf.len() as u64;
                    return Ok(());
                }
                Ok(()) => {
                    self.position += buf.len() as u64;
                    self.file.set_len(self.position)?;
                    return self.switch_to_buffered();
                }
                // Accepted at open but not for these writes (a larger block size): fall back.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.file.set_len(self.position)?;
                    self.switch_to_buffered()?;
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all(buf.data())?;
        self.position += buf.len() as u64;
        self.unflushed += buf.len() as u64;
        // Flush to disk in the background as data arrives, so the final fsync has little
        // left to do (it would otherwise write the whole file after the last byte arrived).
        if self.unflushed >= FLUSH_EVERY && self.flushers.iter().all(|f| f.is_finished()) {
            self.unflushed = 0;
            if let Ok(handle) = self.file.try_clone() {
                self.flushers.push(std::thread::spawn(move || {
                    let _ = handle.sync_data();
                }));
            }
        }
        Ok(())
    }

    fn switch_to_buffered(&mut self) -> io::Result<()> {
        let mut file = open(&self.path, false)?;
        file.seek(SeekFrom::Start(self.position))?;
        // The direct writes so far must be durable too; the final sync only sees this handle.
        self.file.sync_data()?;
        self.file = file;
        self.direct = false;
        Ok(())
    }

    /// Makes everything written durable.
    pub fn sync(mut self) -> io::Result<()> {
        for flusher in self.flushers.drain(..) {
            let _ = flusher.join();
        }
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(buf: &mut AlignedBuf, bytes: &[u8]) {
        buf.clear();
        buf.spare()[..bytes.len()].copy_from_slice(bytes);
        buf.filled(bytes.len());
    }

    #[test]
    fn buffers_are_aligned() {
        for _ in 0..8 {
            let mut buf = AlignedBuf::new();
            assert_eq!(buf.spare().as_ptr() as usize % ALIGN, 0);
            assert_eq!(buf.spare().len(), BUFFER);
        }
    }

    #[test]
    fn whole_and_partial_buffers_make_the_exact_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.part");
        let data: Vec<u8> = (0..(2 * BUFFER + 12345)).map(|i| (i * 7 % 251) as u8).collect();
        let mut writer = PartWriter::open(&path, 0).expect("open");
        let mut buf = AlignedBuf::new();
        for piece in data.chunks(BUFFER) {
            fill(&mut buf, piece);
            writer.write(&mut buf).expect("write");
        }
        writer.sync().expect("sync");
        assert_eq!(std::fs::read(&path).expect("read"), data);
    }

    #[test]
    fn writing_continues_after_an_unaligned_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.part");
        let mut writer = PartWriter::open(&path, 0).expect("open");
        let mut buf = AlignedBuf::new();
        fill(&mut buf, &[1; 100]);
        writer.write(&mut buf).expect("tail");
        fill(&mut buf, &[2; ALIGN]);
        writer.write(&mut buf).expect("after the tail");
        writer.sync().expect("sync");
        let mut expected = vec![1u8; 100];
        expected.extend([2u8; ALIGN]);
        assert_eq!(std::fs::read(&path).expect("read"), expected);
    }

    #[test]
    fn a_linked_part_is_never_written_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").expect("write");
        let linked = dir.path().join("hard.part");
        std::fs::hard_link(&victim, &linked).expect("hard link");
        assert!(PartWriter::open(&linked, 0).is_err());
        let symlinked = dir.path().join("soft.part");
        std::os::unix::fs::symlink(&victim, &symlinked).expect("symlink");
        assert!(PartWriter::open(&symlinked, 0).is_err());
        assert_eq!(std::fs::read(&victim).expect("read"), b"precious");
    }

    #[test]
    fn resuming_at_any_offset_cuts_the_part_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.part");
        for offset in [3 * ALIGN as u64, 3 * ALIGN as u64 + 5] {
            std::fs::write(&path, vec![9u8; 4 * ALIGN]).expect("write");
            let mut writer = PartWriter::open(&path, offset).expect("open");
            let mut buf = AlignedBuf::new();
            fill(&mut buf, &[4; 10]);
            writer.write(&mut buf).expect("write");
            writer.sync().expect("sync");
            let mut expected = vec![9u8; offset as usize];
            expected.extend([4u8; 10]);
            assert_eq!(std::fs::read(&path).expect("read"), expected);
        }
    }
}
