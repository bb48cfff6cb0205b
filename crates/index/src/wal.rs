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
        let mut pos = 0usize;
        while pos < bytes.len() {
            if bytes.len() - pos < 8 {
                rec.tail_error = Some(format!("torn record header at byte {pos}"));
                break;
            }
            let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4")) as usize;
            let crc = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("4"));
            if len > MAX_RECORD {
                rec.tail_error = Some(format!("implausible record length {len} at byte {pos}"));
                break;
            }
            if bytes.len() - pos - 8 < len {
                rec.tail_error = Some(format!("torn record at byte {pos}"));
                break;
            }
            let body = &bytes[pos + 8..pos + 8 + len];
            if crc32fast::hash(body) != crc {
                rec.tail_error = Some(format!("checksum mismatch at byte {pos}"));
                break;
            }
            rec.records.push(body.to_vec());
            pos += 8 + len;
        }
        rec.dropped_bytes = (bytes.len() - pos) as u64;
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
        let mut buf = Vec::new();
        for r in records {
            buf.extend_from_slice(&(r.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(r).to_le_bytes());
            buf.extend_from_slice(r);
        }
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
}
