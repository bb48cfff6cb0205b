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

fn write_then_rename(tmp: &Path, path: &Path, body: &[u8]) -> Result<(), IndexError> {
    {
        let mut f = std::fs::File::create(tmp).map_err(|e| IndexError::io(tmp, e))?;
        let mut header = Vec::with_capacity(20);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&(body.len() as u64).to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        f.write_all(&header).map_err(|e| IndexError::io(tmp, e))?;
        f.write_all(body).map_err(|e| IndexError::io(tmp, e))?;
        f.sync_all().map_err(|e| IndexError::io(tmp, e))?;
    }
    std::fs::rename(tmp, path).map_err(|e| IndexError::io(path, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
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
    let corrupt = |reason: &str| IndexError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < 20 || &bytes[..8] != MAGIC {
        return Err(corrupt("missing header"));
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
    let body = &bytes[20..];
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
    Ok(Some(body.to_vec()))
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
