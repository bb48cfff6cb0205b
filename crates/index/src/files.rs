//! Checksummed files written atomically (temporary file, fsync, rename, fsync of the folder).
use std::io::Write;
use std::path::Path;

use crate::IndexError;

const MAGIC: &[u8; 8] = b"RFSNAP01";

/// Writes `body` with a header (magic, length, crc32) atomically.
pub fn write_checked(path: &Path, body: &[u8]) -> Result<(), IndexError> {
    let tmp = path.with_extension("tmp");
    let r = write_then_rename(&tmp, path, body);
    if r.is_err() {
        // a failed write (disk full) leaves no temporary file behind
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Writes `body` with [`write_checked`]'s header to `tmp` and fsyncs it, without renaming it
/// into place (the caller renames it when it takes effect).
pub(crate) fn write_synced(tmp: &Path, body: &[u8]) -> Result<(), IndexError> {
    let mut f = std::fs::File::create(tmp).map_err(|e| IndexError::io(tmp, e))?;
    f.write_all(&header(body.len() as u64, crc32fast::hash(body)))
        .map_err(|e| IndexError::io(tmp, e))?;
    f.write_all(body).map_err(|e| IndexError::io(tmp, e))?;
    f.sync_all().map_err(|e| IndexError::io(tmp, e))
}

fn write_then_rename(tmp: &Path, path: &Path, body: &[u8]) -> Result<(), IndexError> {
    write_synced(tmp, body)?;
    std::fs::rename(tmp, path).map_err(|e| IndexError::io(path, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Writes a file of the same form as [`write_checked`] whose body is streamed by `fill` (so a
/// large body never needs to be in memory at once): the header is written last, once the
/// length and checksum are known; atomic like [`write_checked`].
pub(crate) fn write_checked_streamed(
    path: &Path,
    fill: impl FnOnce(&mut CheckedWriter) -> std::io::Result<()>,
) -> Result<(), IndexError> {
    use std::io::{Seek, SeekFrom};
    let tmp = path.with_extension("tmp");
    let r = (|| {
        {
            let f = std::fs::File::create(&tmp).map_err(|e| IndexError::io(&tmp, e))?;
            let mut w = CheckedWriter {
                out: std::io::BufWriter::with_capacity(1 << 20, f),
                crc: crc32fast::Hasher::new(),
                len: 0,
            };
            w.out
                .write_all(&[0u8; HEADER])
                .map_err(|e| IndexError::io(&tmp, e))?;
            fill(&mut w).map_err(|e| IndexError::io(&tmp, e))?;
            let mut f = w
                .out
                .into_inner()
                .map_err(|e| IndexError::io(&tmp, e.into_error()))?;
            f.seek(SeekFrom::Start(0))
                .map_err(|e| IndexError::io(&tmp, e))?;
            f.write_all(&header(w.len, w.crc.finalize()))
                .map_err(|e| IndexError::io(&tmp, e))?;
            f.sync_all().map_err(|e| IndexError::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| IndexError::io(path, e))?;
        if let Some(dir) = path.parent() {
            sync_dir(dir);
        }
        Ok(())
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// The body of a file being written by [`write_checked_streamed`]: counts and checksums what
/// goes through it.
pub(crate) struct CheckedWriter {
    out: std::io::BufWriter<std::fs::File>,
    crc: crc32fast::Hasher,
    len: u64,
}

impl CheckedWriter {
    /// Bytes of the body so far.
    pub(crate) fn position(&self) -> u64 {
        self.len
    }
}

impl Write for CheckedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The little-endian u64 at byte `at` of `b` (the caller checked the range).
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The little-endian u32 at byte `at` of `b` (the caller checked the range).
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The header's length: where the body starts in the file.
pub(crate) const HEADER: usize = 20;

fn header(len: u64, crc: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&len.to_le_bytes());
    h[16..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Maps a file written by [`write_checked`] or [`write_checked_streamed`] into memory
/// (read-only) after checking its header and checksum: the body is `&map[HEADER..]`. The pages
/// are the file's, so they count as page cache that the kernel can drop, not as the process's
/// own memory. `Ok(None)` when the file does not exist.
pub(crate) fn map_checked(path: &Path) -> Result<Option<memmap2::Mmap>, IndexError> {
    map_file(path, true)
}

/// [`map_checked`] without reading the whole file for its checksum, for a file this process
/// has just written (and checksummed while writing).
pub(crate) fn map_written(path: &Path) -> Result<Option<memmap2::Mmap>, IndexError> {
    map_file(path, false)
}

fn map_file(path: &Path, verify: bool) -> Result<Option<memmap2::Mmap>, IndexError> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(IndexError::io(path, e)),
    };
    let size = f.metadata().map_err(|e| IndexError::io(path, e))?.len();
    if size < HEADER as u64 {
        return Err(IndexError::Corrupt {
            path: path.to_path_buf(),
            reason: "missing header".into(),
        });
    }
    // SAFETY: the index's files are written once under a temporary name and renamed into
    // place, never modified afterwards, and the folder has one owner at a time (`DirLock`),
    // so the mapped bytes do not change while the map lives.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| IndexError::io(path, e))?;
    if verify {
        check_body(path, &map)?;
    }
    Ok(Some(map))
}

/// Checks a whole file's header, length and checksum; the body is `&bytes[HEADER..]`.
fn check_body(path: &Path, bytes: &[u8]) -> Result<(), IndexError> {
    let corrupt = |reason: &str| IndexError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(corrupt("missing header"));
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
    let body = &bytes[HEADER..];
    if body.len() != len {
        return Err(corrupt(&format!(
            "truncated: {} of {} bytes",
            body.len(),
            len
        )));
    }
    if crc32fast::hash(body) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(())
}

/// Makes a folder's entries (renames, new files) durable; best effort.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Reads a file written by [`write_checked`]; `Ok(None)` when it does not exist, an error when
/// it is truncated or fails its checksum.
pub fn read_checked(path: &Path) -> Result<Option<Vec<u8>>, IndexError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(IndexError::io(path, e)),
    };
    check_body(path, &bytes)?;
    Ok(Some(bytes[HEADER..].to_vec()))
}

/// Searches that ask the kernel for their reads ahead after one that waited on disk.
pub(crate) const READ_AHEAD_SEARCHES: u32 = 1024;

/// How many searches more ask the kernel for what they will read from mapped files, all at
/// once (`MADV_WILLNEED`, a system call a read: too dear while the pages are in memory): set to
/// [`READ_AHEAD_SEARCHES`] by a search that waited for reads from disk (major page faults,
/// counted per thread, so a host stop does not set it), counted down by each that did not.
#[derive(Debug, Default)]
pub(crate) struct ReadAhead(pub(crate) std::sync::atomic::AtomicU32);

/// One search's reads as [`ReadAhead::start`] saw them begin.
pub(crate) struct ReadWatch {
    left: u32,
    faults: Option<u64>,
}

impl ReadWatch {
    /// Whether this search asks for its reads ahead.
    pub(crate) fn ahead(&self) -> bool {
        self.left > 0
    }
}

impl ReadAhead {
    /// Watches a search's reads from here.
    pub(crate) fn start(&self) -> ReadWatch {
        ReadWatch {
            left: self.0.load(std::sync::atomic::Ordering::Relaxed),
            faults: major_faults(),
        }
    }

    /// Ends the watch: `threshold` major faults or more since it started set the countdown,
    /// fewer count it down.
    pub(crate) fn finish(&self, watch: ReadWatch, threshold: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let waited = watch
            .faults
            .and_then(|b| Some(major_faults()?.saturating_sub(b)))
            .unwrap_or(0);
        if waited >= threshold {
            self.0.store(READ_AHEAD_SEARCHES, Relaxed);
        } else if watch.left > 0 {
            self.0.store(watch.left - 1, Relaxed);
        }
    }
}

/// Major page faults of the calling thread so far (None where it cannot be told).
fn major_faults() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a whole `rusage` into the pointer it is given, which points
        // to one; nothing is read from it unless the call succeeded.
        let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
        // SAFETY: the call succeeded, so it filled the struct (zeroed before in any case).
        (r == 0).then(|| unsafe { usage.assume_init() }.ru_majflt as u64)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        assert!(read_checked(&p).unwrap().is_none());
        write_checked(&p, b"hello world").unwrap();
        assert_eq!(read_checked(&p).unwrap().unwrap(), b"hello world");
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(read_checked(&p), Err(IndexError::Corrupt { .. })));
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = read_checked(&p).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
