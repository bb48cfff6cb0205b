//! The write-ahead log: length- and crc32-framed records, fsynced before a write is acknowledged.
//!
//! The file is opened in append mode, so a record can only ever land after the last byte of the
//! file, never over another handle's records; and every append first checks that the file is
//! still as long as this handle left it, refusing to write after bytes it did not write.
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::IndexError;

/// Largest record accepted when reading (a corrupt length must not allocate gigabytes).
const MAX_RECORD: usize = 256 << 20;

/// What reading a log found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WalRecovery {
    /// Intact records, in order.
    pub records: Vec<Vec<u8>>,
    /// Bytes dropped from the tail (torn or corrupt), 0 when clean.
    pub dropped_bytes: u64,
    /// Why the tail was dropped.
    pub tail_error: Option<String>,
    /// Damage in the middle of the log: a record that does not read, with intact records after
    /// it (found again by their marker, see [`Wal::open_marked`]). Those later records are in
    /// `records`; what lay between is lost, and a crash cannot explain it (a torn write only
    /// ever leaves the log's last bytes behind), so acknowledged writes may be missing.
    pub damage: Vec<String>,
    /// Where the log was kept as it was found, when it had damage in the middle (it is then
    /// written again with its intact records only).
    pub damaged_copy: Option<PathBuf>,
}

/// An append-only log file.
#[derive(Debug)]
pub struct Wal {
    path: PathBuf,
    file: File,
    len: u64,
    syncs: u64,
}

impl Wal {
    /// Opens (or creates) the log, reads every intact record, and truncates a torn or corrupt
    /// tail so that new records follow the last good one.
    pub fn open(path: &Path) -> Result<(Wal, WalRecovery), IndexError> {
        Self::open_marked(path, &[])
    }

    /// [`Wal::open`] for a log whose record bodies all begin with `marker` (non-empty): past a
    /// record that does not read, the rest of the log is searched for intact records (a header
    /// whose length and checksum match a body that begins with the marker). When some are
    /// found the damage was in the middle, not a torn tail: the records after it are kept
    /// ([`WalRecovery::damage`] says what was lost), the log as found is kept beside it
    /// (`wal.log.damaged-<n>`) and the log is written again with its intact records.
    pub fn open_marked(path: &Path, marker: &[u8]) -> Result<(Wal, WalRecovery), IndexError> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| IndexError::io(path, e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| IndexError::io(path, e))?;
        let mut rec = WalRecovery::default();
        let mut spans = Vec::new();
        let (mut pos, mut error) = read_records(&bytes, 0, &mut spans);
        while let Some(err) = error.take() {
            match resync(&bytes, pos + 1, marker) {
                Some(next) => {
                    rec.damage.push(format!(
                        "{err}; {} bytes skipped up to the intact record at byte {next}",
                        next - pos
                    ));
                    (pos, error) = read_records(&bytes, next, &mut spans);
                }
                None => {
                    rec.tail_error = Some(err);
                    break;
                }
            }
        }
        rec.records = spans.iter().map(|&(a, b)| bytes[a..b].to_vec()).collect();
        rec.dropped_bytes = (bytes.len() - pos) as u64;
        if !rec.damage.is_empty() {
            let (kept, (file, len)) = rewrite(path, &rec.records)?;
            rec.damaged_copy = Some(kept);
            rec.dropped_bytes = (bytes.len() as u64).saturating_sub(len);
            return Ok((
                Wal {
                    path: path.to_path_buf(),
                    file,
                    len,
                    syncs: 0,
                },
                rec,
            ));
        }
        if rec.dropped_bytes > 0 {
            file.set_len(pos as u64)
                .map_err(|e| IndexError::io(path, e))?;
            file.sync_all().map_err(|e| IndexError::io(path, e))?;
        }
        file.seek(SeekFrom::Start(pos as u64))
            .map_err(|e| IndexError::io(path, e))?;
        Ok((
            Wal {
                path: path.to_path_buf(),
                file,
                len: pos as u64,
                syncs: 0,
            },
            rec,
        ))
    }

    /// Appends records and fsyncs; when this returns Ok they survive a crash.
    pub fn append(&mut self, records: &[Vec<u8>]) -> Result<(), IndexError> {
        let on_disk = self
            .file
            .metadata()
            .map_err(|e| IndexError::io(&self.path, e))?
            .len();
        if on_disk != self.len {
            return Err(IndexError::Corrupt {
                path: self.path.clone(),
                reason: format!(
                    "the log is {on_disk} bytes but this handle wrote {}: another writer? refusing to append",
                    self.len
                ),
            });
        }
        let buf = frame(records);
        let res = self
            .file
            .write_all(&buf)
            .and_then(|_| self.file.sync_data());
        FSYNCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.syncs += 1;
        if let Err(e) = res {
            // leave no half record behind us (appends go to the end, wherever the cursor is)
            let _ = self.file.set_len(self.len);
            return Err(IndexError::io(&self.path, e));
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Empties the log (after a snapshot made its records redundant).
    pub fn reset(&mut self) -> Result<(), IndexError> {
        self.file
            .set_len(0)
            .map_err(|e| IndexError::io(&self.path, e))?;
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(|e| IndexError::io(&self.path, e))?;
        self.file
            .sync_all()
            .map_err(|e| IndexError::io(&self.path, e))?;
        self.len = 0;
        Ok(())
    }

    /// Appends (each one fsync) made through this handle.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// The log's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the log.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// WAL fsyncs (appends made durable) in this process so far.
static FSYNCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// WAL fsyncs made by this process so far (for its metrics).
pub fn fsyncs() -> u64 {
    FSYNCS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Records as the log holds them: each its length, its crc32, its bytes.
fn frame(records: &[Vec<u8>]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(records.iter().map(|r| 8 + r.len()).sum());
    for r in records {
        buf.extend_from_slice(&(r.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32fast::hash(r).to_le_bytes());
        buf.extend_from_slice(r);
    }
    buf
}

/// Reads framed records from `pos` on, pushing each body's span; returns where reading stopped
/// and why, when it stopped before the end.
fn read_records(
    bytes: &[u8],
    mut pos: usize,
    spans: &mut Vec<(usize, usize)>,
) -> (usize, Option<String>) {
    while pos < bytes.len() {
        if bytes.len() - pos < 8 {
            return (pos, Some(format!("torn record header at byte {pos}")));
        }
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("4"));
        if len > MAX_RECORD {
            return (
                pos,
                Some(format!("implausible record length {len} at byte {pos}")),
            );
        }
        if bytes.len() - pos - 8 < len {
            return (pos, Some(format!("torn record at byte {pos}")));
        }
        let body = pos + 8..pos + 8 + len;
        if crc32fast::hash(&bytes[body.clone()]) != crc {
            return (pos, Some(format!("checksum mismatch at byte {pos}")));
        }
        spans.push((body.start, body.end));
        pos = body.end;
    }
    (pos, None)
}

/// The first intact record starting at `from` or later whose body begins with `marker`: its
/// header's offset. None without a marker (a log of unmarked records is only read in order).
fn resync(bytes: &[u8], from: usize, marker: &[u8]) -> Option<usize> {
    if marker.is_empty() {
        return None;
    }
    let mut body = from.checked_add(8)?;
    while body + marker.len() <= bytes.len() {
        let i = bytes[body..]
            .windows(marker.len())
            .position(|w| w == marker)?;
        body += i;
        let header = body - 8;
        let len = u32::from_le_bytes(bytes[header..header + 4].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(bytes[header + 4..header + 8].try_into().expect("4"));
        if len <= MAX_RECORD
            && len >= marker.len()
            && bytes.len() - body >= len
            && crc32fast::hash(&bytes[body..body + len]) == crc
        {
            return Some(header);
        }
        body += 1;
    }
    None
}

/// Keeps the log at `path` as found (linked, or copied where links are not had, as the first
/// free `<name>.damaged-<n>`) and writes
/// a fresh one holding `records`, fsynced with its folder: the kept copy's path, and the fresh
/// log opened for appending with its length.
fn rewrite(path: &Path, records: &[Vec<u8>]) -> Result<(PathBuf, (File, u64)), IndexError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "wal.log".into());
    let kept = (1u32..)
        .map(|n| path.with_file_name(format!("{name}.damaged-{n}")))
        .find(|p| !p.exists())
        .expect("a free name");
    let buf = frame(records);
    let tmp = path.with_file_name(format!("{name}.tmp"));
    std::fs::write(&tmp, &buf)
        .and_then(|_| File::open(&tmp)?.sync_all())
        .map_err(|e| IndexError::io(&tmp, e))?;
    // the log as found gets a second name first, then the fresh one replaces it in one rename:
    // a crash anywhere leaves `path` whole, either as found or rewritten
    std::fs::hard_link(path, &kept)
        .or_else(|_| std::fs::copy(path, &kept).and_then(|_| File::open(&kept)?.sync_all()))
        .map_err(|e| IndexError::io(&kept, e))?;
    std::fs::rename(&tmp, path).map_err(|e| IndexError::io(path, e))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .open(path)
        .map_err(|e| IndexError::io(path, e))?;
    Ok((kept, (file, buf.len() as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wal");
        let (mut w, rec) = Wal::open(&p).unwrap();
        assert!(rec.records.is_empty());
        w.append(&[b"one".to_vec(), b"two".to_vec()]).unwrap();
        w.append(&[b"three".to_vec()]).unwrap();
        drop(w);
        let (_, rec) = Wal::open(&p).unwrap();
        assert_eq!(
            rec.records,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        assert_eq!(rec.dropped_bytes, 0);
    }

    #[test]
    fn a_second_handle_can_neither_overwrite_nor_append_after_foreign_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wal");
        let (mut a, _) = Wal::open(&p).unwrap();
        let (mut b, _) = Wal::open(&p).unwrap();
        a.append(&[b"first".to_vec()]).unwrap();
        a.append(&[b"second".to_vec()]).unwrap();
        // b's view of the file is stale: it must not write at its old offset (over a's
        // records) nor after bytes it did not write
        let e = b.append(&[b"stale".to_vec()]).unwrap_err().to_string();
        assert!(e.contains("another writer"), "{e}");
        a.append(&[b"third".to_vec()]).unwrap();
        drop((a, b));
        let (_, rec) = Wal::open(&p).unwrap();
        assert_eq!(
            rec.records,
            vec![b"first".to_vec(), b"second".to_vec(), b"third".to_vec()]
        );
        assert_eq!(rec.dropped_bytes, 0);
    }

    #[test]
    fn torn_and_corrupt_tails_are_dropped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wal");
        let (mut w, _) = Wal::open(&p).unwrap();
        w.append(&[b"good".to_vec(), b"also good".to_vec()])
            .unwrap();
        drop(w);
        let full = std::fs::read(&p).unwrap();
        // torn: cut in the middle of the last record
        std::fs::write(&p, &full[..full.len() - 4]).unwrap();
        let (mut w, rec) = Wal::open(&p).unwrap();
        assert_eq!(rec.records, vec![b"good".to_vec()]);
        assert!(rec.tail_error.unwrap().contains("torn"));
        // the log continues cleanly after the cut
        w.append(&[b"next".to_vec()]).unwrap();
        drop(w);
        let (_, rec) = Wal::open(&p).unwrap();
        assert_eq!(rec.records, vec![b"good".to_vec(), b"next".to_vec()]);
        // corrupt: flip a byte of the last record's body
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0xff;
        std::fs::write(&p, &bytes).unwrap();
        let (_, rec) = Wal::open(&p).unwrap();
        assert_eq!(rec.records, vec![b"good".to_vec()]);
        assert!(rec.tail_error.unwrap().contains("checksum"));
    }

    #[test]
    fn damage_in_the_middle_keeps_the_records_after_it_and_the_log_as_found() {
        const M: &[u8] = b"MARK";
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wal.log");
        let bodies: Vec<Vec<u8>> = (0..5u8).map(|i| [M, &[i; 40][..]].concat()).collect();
        let (mut w, _) = Wal::open_marked(&p, M).unwrap();
        for b in &bodies {
            w.append(std::slice::from_ref(b)).unwrap();
        }
        drop(w);
        let record = 8 + bodies[0].len();
        for (at, what) in [
            (record + 8 + 20, "checksum"), // record 1's body
            (record + 2, "implausible"),   // record 1's length: past the end of the log
            (record + 5, "checksum"),      // record 1's checksum
        ] {
            let mut bytes = std::fs::read(&p).unwrap();
            let found = bytes.clone();
            bytes[at] ^= 0x80;
            std::fs::write(&p, &bytes).unwrap();
            let (mut w, rec) = Wal::open_marked(&p, M).unwrap();
            let mut kept = bodies.clone();
            kept.remove(1);
            assert_eq!(rec.records, kept, "byte {at}");
            assert_eq!(rec.damage.len(), 1, "{:?}", rec.damage);
            assert!(
                rec.damage[0].contains(what)
                    || (what == "implausible" && rec.damage[0].contains("torn")),
                "byte {at}: {:?}",
                rec.damage
            );
            assert!(rec.tail_error.is_none());
            assert_eq!(rec.dropped_bytes, record as u64);
            // the log as found is kept; the log goes on from its intact records
            let copy = rec.damaged_copy.clone().unwrap();
            assert_eq!(std::fs::read(&copy).unwrap(), bytes);
            w.append(&[bodies[1].clone()]).unwrap();
            drop(w);
            let (_, again) = Wal::open_marked(&p, M).unwrap();
            kept.push(bodies[1].clone());
            assert_eq!(again.records, kept);
            assert!(again.damage.is_empty() && again.tail_error.is_none());
            std::fs::remove_file(&copy).unwrap();
            std::fs::write(&p, found).unwrap();
        }
        // without a marker, or in the last record, it is a tail
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[record + 8 + 20] ^= 0x80;
        std::fs::write(&p, &bytes).unwrap();
        let (_, rec) = Wal::open(&p).unwrap();
        assert_eq!(rec.records, bodies[..1].to_vec());
        assert!(rec.damage.is_empty() && rec.tail_error.is_some());
        let mut bytes: Vec<u8> = Vec::new();
        for b in &bodies {
            bytes.extend_from_slice(&(b.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(b).to_le_bytes());
            bytes.extend_from_slice(b);
        }
        let n = bytes.len();
        bytes[n - 3] ^= 0x80;
        std::fs::write(&p, &bytes).unwrap();
        let (_, rec) = Wal::open_marked(&p, M).unwrap();
        assert_eq!(rec.records, bodies[..4].to_vec());
        assert!(rec.damage.is_empty() && rec.damaged_copy.is_none());
        assert!(rec.tail_error.unwrap().contains("checksum"));
    }
}
