//! Vector sets in the `.fvecs` format of the ANN benchmarks (TEXMEX: SIFT1M, GIST1M, Deep1B's
//! subsets): each row is its dimension as a little-endian `i32`, then that many little-endian
//! `f32`s. `ragfleet embed --fvecs` writes a corpus's embeddings so; `ragfleet bench shard
//! --vectors` reads them.
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use crate::IndexError;

/// The largest dimension a row may declare (a corrupt header otherwise asks for gigabytes).
pub const MAX_DIM: usize = 65_536;

/// Writes `rows` (all of one dimension) to `path`.
pub fn write(path: &Path, rows: &[Vec<f32>]) -> Result<(), IndexError> {
    let io = |source| IndexError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = BufWriter::new(std::fs::File::create(path).map_err(io)?);
    append(&mut f, rows).map_err(|e| match e {
        AppendError::Io(source) => io(source),
        AppendError::Bad(reason) => IndexError::BadInput(format!("{}: {reason}", path.display())),
    })?;
    f.flush().map_err(io)
}

/// Why [`append`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Writing failed.
    #[error("writing vectors: {0}")]
    Io(std::io::Error),
    /// A row of no or another dimension than the first, or over [`MAX_DIM`].
    #[error("{0}")]
    Bad(String),
}

/// Appends `rows` to an `.fvecs` stream; every row must have the first one's dimension.
pub fn append(out: &mut impl Write, rows: &[Vec<f32>]) -> Result<(), AppendError> {
    let dim = rows.first().map_or(0, Vec::len);
    for (i, r) in rows.iter().enumerate() {
        if r.is_empty() || r.len() != dim || r.len() > MAX_DIM {
            return Err(AppendError::Bad(format!(
                "row {i} has {} dimensions (the first {dim}, at most {MAX_DIM})",
                r.len()
            )));
        }
        out.write_all(&(r.len() as i32).to_le_bytes())
            .map_err(AppendError::Io)?;
        for x in r {
            out.write_all(&x.to_le_bytes()).map_err(AppendError::Io)?;
        }
    }
    Ok(())
}

/// Reads every row of `path`: all of one dimension, each value finite. A truncated last row,
/// a dimension that changes, is not positive or is over [`MAX_DIM`], or a NaN or infinite
/// value is refused with the row's number.
pub fn read(path: &Path) -> Result<Vec<Vec<f32>>, IndexError> {
    let io = |source| IndexError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason: String| IndexError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut f = BufReader::new(file);
    let mut rows: Vec<Vec<f32>> = Vec::new();
    let mut at = 0u64;
    let mut dim = None;
    while at < len {
        let row = rows.len();
        let mut head = [0u8; 4];
        if len - at < 4 {
            return Err(bad(format!("row {row} is cut off in its dimension")));
        }
        f.read_exact(&mut head).map_err(io)?;
        let d = i32::from_le_bytes(head);
        if d <= 0 || d as usize > MAX_DIM {
            return Err(bad(format!(
                "row {row} declares {d} dimensions (1 to {MAX_DIM})"
            )));
        }
        let d = d as usize;
        if *dim.get_or_insert(d) != d {
            return Err(bad(format!(
                "row {row} has {d} dimensions, the rows before it {}",
                dim.unwrap_or(d)
            )));
        }
        let bytes = 4 * d as u64;
        if len - at - 4 < bytes {
            return Err(bad(format!(
                "row {row} is cut off: {} of its {bytes} bytes",
                len - at - 4
            )));
        }
        let mut buf = vec![0u8; bytes as usize];
        f.read_exact(&mut buf).map_err(io)?;
        let v: Vec<f32> = buf
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some(j) = v.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!(
                "row {row} has a value that is not finite at {j}"
            )));
        }
        rows.push(v);
        at += 4 + bytes;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_back_as_written_and_damaged_files_are_refused_with_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("set.fvecs");
        let rows: Vec<Vec<f32>> = (0..5)
            .map(|i| (0..3).map(|j| (i * 3 + j) as f32 * 0.5 - 1.0).collect())
            .collect();
        write(&path, &rows).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 5 * (4 + 12));
        assert_eq!(read(&path).unwrap(), rows);

        let bytes = std::fs::read(&path).unwrap();
        let damaged = |b: &[u8]| {
            std::fs::write(&path, b).unwrap();
            match read(&path) {
                Err(IndexError::Corrupt { reason, .. }) => reason,
                other => panic!("damaged file read as {other:?}"),
            }
        };
        // the last row cut off, in its values and in its dimension
        assert!(damaged(&bytes[..bytes.len() - 1]).contains("row 4 is cut off"));
        assert!(damaged(&bytes[..4 * 16 + 2]).contains("row 4 is cut off in its dimension"));
        // a row of another dimension
        let mut b = bytes.clone();
        b[2 * 16..2 * 16 + 4].copy_from_slice(&2i32.to_le_bytes());
        assert!(damaged(&b).contains("row 2 has 2 dimensions"));
        // a nonsensical dimension
        let mut b = bytes.clone();
        b[0..4].copy_from_slice(&(-1i32).to_le_bytes());
        assert!(damaged(&b).contains("row 0 declares -1"));
        // a NaN
        let mut b = bytes.clone();
        b[16 + 8..16 + 12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(damaged(&b).contains("row 1 has a value that is not finite at 1"));
        // an empty file is an empty set
        std::fs::write(&path, b"").unwrap();
        assert!(read(&path).unwrap().is_empty());

        // rows of different dimensions are not written
        let err = write(&path, &[vec![1.0, 2.0], vec![1.0]]).unwrap_err();
        assert!(err.to_string().contains("row 1 has 1 dimensions"), "{err}");
    }
}
