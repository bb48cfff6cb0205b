//! Segment data files of format 3, laid out to be memory-mapped: a sealed segment's vectors,
//! texts and sentence vectors stay in the file (page cache the kernel can drop and read again)
//! instead of the process's memory, so a shard whose files exceed the machine's memory still
//! serves, more slowly. What stays in memory per chunk is its ids, sequence number and version.
//!
//! The body (after the checked-file header of [`crate::files`]), offsets from the body's start,
//! integers little-endian:
//! - `0..10` the marker (nine `0xFF` then `0x03`: not a postcard `u64`, so never the start of a
//!   format 1 or 2 body), then zeros to 16;
//! - `16..72` seven `u64`: chunks `n`, dimension `dim`, where the vectors, rows, blob and id
//!   table start, and the id table's length;
//! - the vectors, `n x dim` `f32`, placed so that they start at a file offset divisible by 64;
//! - `n` rows of 32 bytes: text offset (`u64`, into the blob), text length (`u32`), sentences
//!   (`u32`), sentence dimension (`u32`), zero (`u32`), sentence data offset (`u64`);
//! - the blob: texts (UTF-8), and per chunk with sentences their scales (`f32` each) then their
//!   int8 codes;
//! - the id table: postcard `Vec<(seq, version, doc_id, chunk_id)>`.
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use ragfleet_proto::SentenceVectors;

use crate::files::{map_checked, map_written, u32_at, u64_at, write_checked_streamed, HEADER};
use crate::segment::Entry;
use crate::IndexError;

/// Opens a format 3 body.
pub(crate) const MARKER: [u8; 10] = [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x03];
const FIXED: usize = 72;
const ROW: usize = 32;

/// A mapped data file of format 3.
pub(crate) struct DataFile {
    map: memmap2::Mmap,
    n: usize,
    dim: usize,
    /// Offsets into `map` (file offsets, header included).
    vectors: usize,
    rows: usize,
    blob: usize,
    /// Its rows known dead (deleted or replaced), marked by the shard as they die: a search
    /// tells a live row by a bit, and the merge policy reads a segment's live chunks off the
    /// count, without visiting them.
    dead_rows: Vec<std::sync::atomic::AtomicU64>,
    dead: std::sync::atomic::AtomicUsize,
    /// Newer files that compactions copied some of its rows into: a row that dies here dies
    /// there too (see [`DataFile::forward_deaths`]).
    forwards: std::sync::Mutex<Vec<Forward>>,
    /// Where the id table starts in `map`, and each row's ids in it.
    ids_at: usize,
    id_rows: IdRows,
}

/// Where a compaction copied a file's rows: `rows[r]` is row `r`'s row in `to`, [`NOT_COPIED`]
/// for rows it left out.
struct Forward {
    to: Arc<DataFile>,
    rows: Vec<u32>,
}

impl Forward {
    /// Marks row `row`'s copy dead, if it was copied.
    fn mark(&self, row: usize) {
        match self.rows.get(row) {
            Some(&r) if r != NOT_COPIED => self.to.mark_dead(r as usize),
            _ => {}
        }
    }
}

/// A row a compaction did not copy.
pub(crate) const NOT_COPIED: u32 = u32::MAX;

impl std::fmt::Debug for DataFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataFile")
            .field("n", &self.n)
            .field("dim", &self.dim)
            .finish()
    }
}

/// One row: where a chunk's text and sentence data are in the blob.
#[derive(Clone, Copy)]
struct Row {
    text_at: usize,
    text_len: usize,
    sentences: usize,
    sentence_dim: usize,
    sentences_at: usize,
}

impl Row {
    fn sentence_bytes(&self) -> usize {
        self.sentences * 4 + self.sentences * self.sentence_dim
    }
}

impl DataFile {
    /// Rows.
    pub(crate) fn len(&self) -> usize {
        self.n
    }

    /// Marks row `row` dead (once: marking it again changes nothing), and its copies in the
    /// files its deaths are forwarded to.
    pub(crate) fn mark_dead(&self, row: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let bit = 1u64 << (row % 64);
        if let Some(w) = self.dead_rows.get(row / 64) {
            if w.fetch_or(bit, Relaxed) & bit == 0 {
                self.dead.fetch_add(1, Relaxed);
                // after the mark: a forward added meanwhile sweeps the marks after it is
                // added, under the same lock, so the copy is marked by one or the other
                let forwards = self.forwards.lock().unwrap_or_else(|p| p.into_inner());
                forwards.iter().for_each(|f| f.mark(row));
            }
        }
    }

    /// From now on a row that dies here dies in `to` too, at `rows[row]` (`rows` has a row of
    /// `to` or [`NOT_COPIED`] for each row here); the rows already dead here are marked dead
    /// there now. What a compaction does once its new file exists, so that its copies of
    /// chunks that die while it runs, or after its commit while the shard's slots still point
    /// at the chunks' older copies, are dead in the new file too.
    pub(crate) fn forward_deaths(&self, to: &Arc<DataFile>, rows: Vec<u32>) {
        let mut forwards = self.forwards.lock().unwrap_or_else(|p| p.into_inner());
        forwards.push(Forward {
            to: to.clone(),
            rows,
        });
        let f = forwards.last().expect("just pushed");
        self.dead_rows().for_each(|row| f.mark(row));
    }

    /// Whether row `row` was marked dead.
    pub(crate) fn is_dead(&self, row: usize) -> bool {
        self.dead_rows.get(row / 64).is_some_and(|w| {
            w.load(std::sync::atomic::Ordering::Relaxed) & (1u64 << (row % 64)) != 0
        })
    }

    /// The rows marked dead, in order (read from the marks' words: a file with few dead rows
    /// costs a word per 64 rows).
    pub(crate) fn dead_rows(&self) -> impl Iterator<Item = usize> + '_ {
        self.dead_rows.iter().enumerate().flat_map(|(i, w)| {
            let mut bits = w.load(std::sync::atomic::Ordering::Relaxed);
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    i * 64 + b
                })
            })
        })
    }

    /// Rows not counted dead.
    pub(crate) fn live_rows(&self) -> usize {
        self.n
            .saturating_sub(self.dead.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Chunk `row`'s vector.
    pub(crate) fn vector(&self, row: usize) -> &[f32] {
        &self.all_vectors()[row * self.dim..(row + 1) * self.dim]
    }

    /// Asks the kernel to start reading chunk `row`'s vector from the file, so that several
    /// reads from disk are in flight at once rather than one fault after another (a system
    /// call each: only for reads likely to miss memory).
    pub(crate) fn read_vector_ahead(&self, row: usize) {
        let bytes = self.dim * 4;
        self.ahead(self.vectors + row * bytes, bytes);
    }

    /// Every chunk's vector, end to end.
    pub(crate) fn all_vectors(&self) -> &[f32] {
        let bytes = &self.map[self.vectors..self.vectors + self.n * self.dim * 4];
        // SAFETY: `parse` checked that the region is inside the map and 4-byte aligned, and
        // this build is little-endian (the file's byte order); every bit pattern is an f32.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), self.n * self.dim) }
    }

    fn row(&self, row: usize) -> Row {
        let at = self.rows + row * ROW;
        let b = &self.map[..];
        // saturating: a damaged offset must fail `parse`'s bounds checks, not overflow
        Row {
            text_at: self.blob.saturating_add(u64_at(b, at) as usize),
            text_len: u32_at(b, at + 8) as usize,
            sentences: u32_at(b, at + 12) as usize,
            sentence_dim: u32_at(b, at + 16) as usize,
            sentences_at: self.blob.saturating_add(u64_at(b, at + 24) as usize),
        }
    }

    /// Asks the kernel for chunk `row`'s record and ids without waiting for them (a hit about
    /// to be read, among others asked for at once).
    pub(crate) fn read_ids_ahead(&self, row: usize) {
        self.ahead(self.rows + row * ROW, ROW);
        // a document and a chunk id rarely span more
        self.ahead(self.ids_at.saturating_add(self.id_rows.get(row)), 128);
    }

    /// Asks the kernel for chunk `row`'s text without waiting for it (reads its record: after
    /// [`DataFile::read_ids_ahead`]).
    pub(crate) fn read_text_ahead(&self, row: usize) {
        let r = self.row(row);
        self.ahead(r.text_at, r.text_len);
    }

    /// `MADV_WILLNEED` on `len` bytes at `at`, cut to the map.
    fn ahead(&self, at: usize, len: usize) {
        let len = len.min(self.map.len().saturating_sub(at));
        if len > 0 {
            let _ = self.map.advise_range(memmap2::Advice::WillNeed, at, len);
        }
    }

    /// Chunk `row`'s text.
    pub(crate) fn text(&self, row: usize) -> &str {
        let r = self.row(row);
        let bytes = &self.map[r.text_at..r.text_at + r.text_len];
        // `parse` checked every text; a failure here would be a bug, not bad data
        std::str::from_utf8(bytes).unwrap_or("")
    }

    /// Chunk `row`'s (document id, chunk id), read from the id table in place.
    fn ids(&self, row: usize) -> (&str, &str) {
        let table = &self.map[self.ids_at..];
        let mut at = self.id_rows.get(row);
        // `parse` read every row's ids; a failure here would be a bug, not bad data
        let doc = string(table, &mut at).unwrap_or("");
        let chunk = string(table, &mut at).unwrap_or("");
        (doc, chunk)
    }

    /// Chunk `row`'s document id.
    pub(crate) fn doc_id(&self, row: usize) -> &str {
        self.ids(row).0
    }

    /// Chunk `row`'s id.
    pub(crate) fn chunk_id(&self, row: usize) -> &str {
        self.ids(row).1
    }

    /// Chunk `row`'s sentence vectors.
    pub(crate) fn sentences(&self, row: usize) -> SentenceVectors {
        let r = self.row(row);
        let b = &self.map[r.sentences_at..r.sentences_at + r.sentence_bytes()];
        let (scales, codes) = b.split_at(r.sentences * 4);
        SentenceVectors {
            scales: scales
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            codes: codes.iter().map(|&c| c as i8).collect(),
        }
    }

    /// The best dot product of `query` with chunk `row`'s sentences (as
    /// [`SentenceVectors::best_dot`], without copying them).
    pub(crate) fn best_sentence_dot(&self, row: usize, query: &[f32]) -> Option<f32> {
        let r = self.row(row);
        if r.sentences == 0 || query.is_empty() || r.sentence_dim != query.len() {
            return None;
        }
        let b = &self.map[r.sentences_at..r.sentences_at + r.sentence_bytes()];
        let (scales, codes) = b.split_at(r.sentences * 4);
        codes
            .chunks_exact(query.len())
            .zip(scales.chunks_exact(4))
            .map(|(c, s)| {
                let s = f32::from_le_bytes(s.try_into().expect("4 bytes"));
                c.iter()
                    .zip(query)
                    .map(|(&c, q)| c as i8 as f32 * q)
                    .sum::<f32>()
                    * s
            })
            .reduce(f32::max)
    }

    /// Checks a mapped body of format 3 and gives the file with its id table.
    fn parse(
        path: &Path,
        map: memmap2::Mmap,
    ) -> Result<(Arc<DataFile>, Vec<(u64, u64)>), IndexError> {
        let corrupt = |reason: String| IndexError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if cfg!(target_endian = "big") {
            return Err(corrupt(
                "format 3 data files need a little-endian machine".into(),
            ));
        }
        let body_len = map.len() - HEADER;
        if body_len < FIXED || map[HEADER..HEADER + 10] != MARKER {
            return Err(corrupt("not a format 3 data file".into()));
        }
        let field = |i: usize| u64_at(&map, HEADER + 16 + 8 * i) as usize;
        let (n, dim) = (field(0), field(1));
        let (vectors, rows, blob, ids, ids_len) =
            (field(2), field(3), field(4), field(5), field(6));
        let vec_end = n
            .checked_mul(dim)
            .and_then(|x| x.checked_mul(4))
            .and_then(|x| x.checked_add(vectors));
        let rows_end = n.checked_mul(ROW).and_then(|x| x.checked_add(rows));
        let fits = vectors >= FIXED
            && vec_end.is_some_and(|e| e <= rows)
            && rows_end.is_some_and(|e| e <= blob)
            && blob <= ids
            && ids.checked_add(ids_len) == Some(body_len);
        if !fits {
            return Err(corrupt("section offsets do not fit the file".into()));
        }
        let mut file = DataFile {
            n,
            dim,
            vectors: HEADER + vectors,
            rows: HEADER + rows,
            blob: HEADER + blob,
            map,
            dead_rows: (0..n.div_ceil(64)).map(|_| Default::default()).collect(),
            dead: Default::default(),
            forwards: Default::default(),
            ids_at: HEADER + ids,
            id_rows: IdRows::Narrow(Vec::new()),
        };
        if !(file.map.as_ptr() as usize + file.vectors).is_multiple_of(4) {
            return Err(corrupt("vectors not aligned".into()));
        }
        let blob_end = HEADER + ids;
        for i in 0..n {
            let r = file.row(i);
            let text_ok = r
                .text_at
                .checked_add(r.text_len)
                .is_some_and(|e| e <= blob_end)
                && std::str::from_utf8(&file.map[r.text_at..r.text_at + r.text_len]).is_ok();
            let sent_ok = r
                .sentences
                .checked_mul(r.sentence_dim.saturating_add(4))
                .and_then(|b| r.sentences_at.checked_add(b))
                .is_some_and(|e| e <= blob_end);
            if !text_ok || !sent_ok {
                return Err(corrupt(format!(
                    "chunk {i}'s text or sentences out of place"
                )));
            }
        }
        let (table, id_rows) = id_table(&file.map[blob_end..blob_end + ids_len], n)
            .map_err(|e| corrupt(format!("id table: {e}")))?;
        file.id_rows = id_rows;
        Ok((Arc::new(file), table))
    }
}

/// The (sequence number, document id) of every row of a format 3 data file that did not load
/// (a checksum that fails), read from its id table alone when that still parses: its offsets
/// fit the file and it decodes to exactly the rows the file says. What a shard needs to know
/// whose copies the file held. None otherwise (or for a file of an older format).
pub(crate) fn salvage_ids(path: &Path) -> Option<Vec<(u64, String)>> {
    let map = std::fs::read(path).ok()?;
    if map.len() < HEADER + FIXED || map[HEADER..HEADER + 10] != MARKER {
        return None;
    }
    let field = |i: usize| u64_at(&map, HEADER + 16 + 8 * i) as usize;
    let (n, ids, ids_len) = (field(0), field(5), field(6));
    if ids < FIXED || ids.checked_add(ids_len) != Some(map.len() - HEADER) {
        return None;
    }
    let b = &map[HEADER + ids..];
    // a row takes 4 bytes at the least: a damaged count must not size an allocation
    if n > b.len() / 4 {
        return None;
    }
    let (table, id_rows) = id_table(b, n).ok()?;
    table
        .iter()
        .enumerate()
        .map(|(row, &(seq, _))| {
            let mut at = id_rows.get(row);
            string(b, &mut at).map(|doc| (seq, doc.to_string()))
        })
        .collect()
}

/// Where each row's ids start in the id table (the length of its document id, a postcard
/// varint): 4 bytes a row, 8 for a table past 4 GiB.
enum IdRows {
    Narrow(Vec<u32>),
    Wide(Vec<u64>),
}

impl IdRows {
    fn get(&self, row: usize) -> usize {
        match self {
            IdRows::Narrow(v) => v.get(row).map_or(usize::MAX, |&x| x as usize),
            IdRows::Wide(v) => v.get(row).map_or(usize::MAX, |&x| x as usize),
        }
    }
}

/// A postcard varint (LEB128) at `*at`, moving `*at` past it.
fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7F).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// A postcard string (varint length, UTF-8) at `*at`, moving `*at` past it.
fn string<'a>(b: &'a [u8], at: &mut usize) -> Option<&'a str> {
    let len = usize::try_from(varint(b, at)?).ok()?;
    let end = at.checked_add(len).filter(|&e| e <= b.len())?;
    let s = std::str::from_utf8(&b[*at..end]).ok()?;
    *at = end;
    Some(s)
}

/// Reads the id table (a postcard `Vec<(seq, version, doc_id, chunk_id)>` of `n` rows) in
/// place: every row's (seq, version), and where its ids start, their UTF-8 checked once here
/// so that [`DataFile::doc_id`] reads them without a copy.
fn id_table(b: &[u8], n: usize) -> Result<(Vec<(u64, u64)>, IdRows), String> {
    let mut at = 0;
    let rows = varint(b, &mut at).ok_or("no row count")?;
    if rows != n as u64 {
        return Err(format!("{rows} chunks, {n} rows"));
    }
    let wide = b.len() > u32::MAX as usize;
    let (mut narrow, mut wide_at) = (Vec::new(), Vec::new());
    let mut table = Vec::with_capacity(n);
    for i in 0..n {
        let bad = || format!("chunk {i}'s ids are damaged");
        let seq = varint(b, &mut at).ok_or_else(bad)?;
        let version = varint(b, &mut at).ok_or_else(bad)?;
        if wide {
            wide_at.push(at as u64);
        } else {
            narrow.push(at as u32);
        }
        string(b, &mut at).ok_or_else(bad)?;
        string(b, &mut at).ok_or_else(bad)?;
        table.push((seq, version));
    }
    if at != b.len() {
        return Err(format!("{} bytes after the last chunk", b.len() - at));
    }
    let id_rows = if wide {
        IdRows::Wide(wide_at)
    } else {
        IdRows::Narrow(narrow)
    };
    Ok((table, id_rows))
}

/// Asks the kernel to read whole, ahead, the mapped files that `entries` lie in, each once
/// (a merge or a graph build reads them through, and their maps are advised for random reads,
/// which would read them a page at a time where they are not in memory).
pub(crate) fn read_ahead<'a>(entries: impl IntoIterator<Item = &'a Entry>) {
    let mut last: *const DataFile = std::ptr::null();
    for e in entries {
        if let Some((file, _)) = e.mapped_at() {
            if !std::ptr::eq(Arc::as_ptr(file), last) {
                last = Arc::as_ptr(file);
                let _ = file.map.advise(memmap2::Advice::WillNeed);
            }
        }
    }
}

/// Writes `entries` as a format 3 data file (atomically, streamed: the vectors are never
/// gathered in memory).
pub(crate) fn write(path: &Path, entries: &[&Entry]) -> Result<(), IndexError> {
    read_ahead(entries.iter().copied());
    let n = entries.len();
    let dim = entries.first().map_or(0, |e| e.vector().len());
    if entries.iter().any(|e| e.vector().len() != dim) {
        return Err(IndexError::BadInput(
            "a segment's chunks differ in dimension".into(),
        ));
    }
    let table: Vec<(u64, u64, &str, &str)> = entries
        .iter()
        .map(|e| (e.seq, e.version, e.doc_id(), e.chunk_id()))
        .collect();
    let ids = postcard::to_stdvec(&table).map_err(|e| IndexError::BadInput(e.to_string()))?;
    let sentences: Vec<SentenceVectors> = entries.iter().map(|e| e.sentences()).collect();
    // the vectors start at a file offset divisible by 64
    let vectors = FIXED + (64 - (HEADER + FIXED) % 64) % 64;
    let rows = vectors + n * dim * 4;
    let blob = rows + n * ROW;
    let mut blob_len = 0usize;
    for (e, s) in entries.iter().zip(&sentences) {
        blob_len += e.text().len() + s.scales.len() * 4 + s.codes.len();
    }
    let ids_at = blob + blob_len;
    write_checked_streamed(path, |w| {
        let mut fixed = [0u8; FIXED];
        fixed[..10].copy_from_slice(&MARKER);
        for (i, v) in [n, dim, vectors, rows, blob, ids_at, ids.len()]
            .into_iter()
            .enumerate()
        {
            fixed[16 + 8 * i..24 + 8 * i].copy_from_slice(&(v as u64).to_le_bytes());
        }
        w.write_all(&fixed)?;
        w.write_all(&vec![0u8; vectors - FIXED])?;
        for e in entries {
            for x in e.vector() {
                w.write_all(&x.to_le_bytes())?;
            }
        }
        let mut at = 0u64;
        for (e, s) in entries.iter().zip(&sentences) {
            let text = e.text().len() as u64;
            let per = if s.scales.is_empty() {
                0
            } else {
                s.codes.len() / s.scales.len()
            };
            let mut row = [0u8; ROW];
            row[..8].copy_from_slice(&at.to_le_bytes());
            row[8..12].copy_from_slice(&(text as u32).to_le_bytes());
            row[12..16].copy_from_slice(&(s.scales.len() as u32).to_le_bytes());
            row[16..20].copy_from_slice(&(per as u32).to_le_bytes());
            row[24..32].copy_from_slice(&(at + text).to_le_bytes());
            w.write_all(&row)?;
            at += text + s.scales.len() as u64 * 4 + s.codes.len() as u64;
        }
        for (e, s) in entries.iter().zip(&sentences) {
            w.write_all(e.text().as_bytes())?;
            for x in &s.scales {
                w.write_all(&x.to_le_bytes())?;
            }
            let codes: Vec<u8> = s.codes.iter().map(|&c| c as u8).collect();
            w.write_all(&codes)?;
        }
        debug_assert_eq!(w.position() as usize, ids_at);
        w.write_all(&ids)
    })
}

/// Reads a segment data file of any format: format 3 is mapped (its entries point into the
/// map), formats 1 and 2 are decoded into memory. `Ok(None)` when the file does not exist.
pub(crate) fn read(path: &Path) -> Result<Option<Vec<Entry>>, IndexError> {
    read_map(path, map_checked(path)?)
}

/// [`read`] of a file this process has just written with [`write`] (its checksum is not read
/// again).
pub(crate) fn read_written(path: &Path) -> Result<Option<Vec<Entry>>, IndexError> {
    read_map(path, map_written(path)?)
}

fn read_map(path: &Path, map: Option<memmap2::Mmap>) -> Result<Option<Vec<Entry>>, IndexError> {
    let Some(map) = map else {
        return Ok(None);
    };
    let body = &map[HEADER..];
    if body.len() >= 10 && body[..10] == MARKER {
        // read at random rows (a search's re-scored vectors, its hits' texts): no read-ahead,
        // which would read ~32 pages around every row not in memory and push out the rest
        let _ = map.advise(memmap2::Advice::Random);
        let (file, table) = DataFile::parse(path, map)?;
        return Ok(Some(
            table
                .into_iter()
                .enumerate()
                .map(|(row, (seq, version))| Entry::mapped(seq, version, file.clone(), row))
                .collect(),
        ));
    }
    crate::shard::decode_entries(body)
        .map(Some)
        .map_err(|e| IndexError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize, sentences: usize) -> Entry {
        let vs: Vec<Vec<f32>> = (0..sentences)
            .map(|s| vec![(i + s) as f32, 1.0, -0.5])
            .collect();
        let c = ragfleet_proto::ChunkRecord {
            doc_id: format!("d{i}"),
            chunk_id: format!("d{i}#0"),
            text: format!("chunk {i} — ünïcode text"),
            vector: vec![i as f32, 0.5, -1.0],
            sentences: SentenceVectors::quantize(&vs),
        };
        Entry::owned(i as u64 + 1, 7, c)
    }

    #[test]
    fn a_data_file_maps_back_to_the_same_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg-1.bin");
        let owned: Vec<Entry> = (0..50).map(|i| entry(i, i % 4)).collect();
        write(&path, &owned.iter().collect::<Vec<_>>()).unwrap();
        let back = read(&path).unwrap().unwrap();
        assert_eq!(back, owned);
        assert!(back.iter().all(Entry::is_mapped));
        let q = [0.6, 0.8, 0.0];
        for (a, b) in owned.iter().zip(&back) {
            assert_eq!(a.best_sentence_dot(&q), b.best_sentence_dot(&q));
        }
        // the vectors start 64-byte aligned in the file
        let (file, _) = back[0].mapped_at().unwrap();
        assert_eq!((file.vectors) % 64, 0);
        // an empty segment too
        write(&path, &[]).unwrap();
        assert!(read(&path).unwrap().unwrap().is_empty());
    }

    /// The dead rows come back from the marks in order, each once, across the marks' words.
    #[test]
    fn dead_rows_come_from_the_marks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg-1.bin");
        let owned: Vec<Entry> = (0..200).map(|i| entry(i, 1)).collect();
        write(&path, &owned.iter().collect::<Vec<_>>()).unwrap();
        let back = read(&path).unwrap().unwrap();
        let (file, _) = back[0].mapped_at().unwrap();
        assert_eq!(file.dead_rows().count(), 0);
        for row in [130, 0, 63, 64, 199, 63] {
            back[row].mark_dead();
        }
        assert_eq!(
            file.dead_rows().collect::<Vec<_>>(),
            vec![0, 63, 64, 130, 199]
        );
        assert_eq!(file.live_rows(), 195);
    }

    /// A row's death reaches its copies in the files its deaths are forwarded to: those dead
    /// before the forward at once, later ones as they die, along a chain of copies.
    #[test]
    fn deaths_are_forwarded_to_the_copies() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<Arc<DataFile>> = (0..3)
            .map(|f| {
                let path = dir.path().join(format!("seg-{f}.bin"));
                let owned: Vec<Entry> = (0..100).map(|i| entry(i, 0)).collect();
                write(&path, &owned.iter().collect::<Vec<_>>()).unwrap();
                let back = read(&path).unwrap().unwrap();
                back[0].mapped_at().unwrap().0.clone()
            })
            .collect();
        let (a, b, c) = (&files[0], &files[1], &files[2]);
        a.mark_dead(10);
        a.mark_dead(11);
        // a's even rows copied to b's rows 0..50, b's rows copied one on to c
        a.forward_deaths(
            b,
            (0..100u32)
                .map(|r| if r % 2 == 0 { r / 2 } else { NOT_COPIED })
                .collect(),
        );
        assert_eq!(b.dead_rows().collect::<Vec<_>>(), vec![5]);
        b.forward_deaths(c, (0..100u32).map(|r| (r + 1) % 100).collect());
        assert_eq!(c.dead_rows().collect::<Vec<_>>(), vec![6]);
        a.mark_dead(40);
        a.mark_dead(41);
        b.mark_dead(99);
        assert_eq!(a.dead_rows().collect::<Vec<_>>(), vec![10, 11, 40, 41]);
        assert_eq!(b.dead_rows().collect::<Vec<_>>(), vec![5, 20, 99]);
        assert_eq!(c.dead_rows().collect::<Vec<_>>(), vec![0, 6, 21]);
        assert_eq!(c.live_rows(), 97);
    }

    #[test]
    fn damaged_data_files_are_errors_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg-1.bin");
        let owned: Vec<Entry> = (0..5).map(|i| entry(i, 2)).collect();
        write(&path, &owned.iter().collect::<Vec<_>>()).unwrap();
        let good = std::fs::read(&path).unwrap();
        // a flipped byte fails the checksum; a cut file is truncated
        let mut bad = good.clone();
        bad[200] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(read(&path), Err(IndexError::Corrupt { .. })));
        std::fs::write(&path, &good[..good.len() - 9]).unwrap();
        assert!(matches!(read(&path), Err(IndexError::Corrupt { .. })));
        // offsets that do not fit, under a valid checksum: refused by the layout checks
        let body = &good[HEADER..];
        for (field, value) in [(0usize, u64::MAX / 2), (1, 1 << 40), (3, 8), (6, 1 << 30)] {
            let mut b = body.to_vec();
            b[16 + 8 * field..24 + 8 * field].copy_from_slice(&value.to_le_bytes());
            crate::files::write_checked(&path, &b).unwrap();
            let e = read(&path).unwrap_err().to_string();
            assert!(e.contains("corrupt"), "{e}");
        }
        // a text offset pointing past the blob
        let rows = u64_at(body, 16 + 8 * 3) as usize;
        let mut b = body.to_vec();
        b[rows..rows + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        crate::files::write_checked(&path, &b).unwrap();
        assert!(read(&path)
            .unwrap_err()
            .to_string()
            .contains("out of place"));
        // the id table, read in place: a count that is not the rows', an id that is not
        // UTF-8, a length running past the table
        let ids = u64_at(body, 16 + 8 * 5) as usize;
        let last = body.len() - 1;
        for (at, byte) in [(ids, 6u8), (last, 0xFF), (last - 4, 0x7F)] {
            let mut b = body.to_vec();
            b[at] = byte;
            crate::files::write_checked(&path, &b).unwrap();
            let e = read(&path).unwrap_err().to_string();
            assert!(e.contains("id table"), "{e}");
        }
    }

    /// A mapped chunk's ids are read from the file's id table in place, each row its own.
    #[test]
    fn a_mapped_chunk_reads_its_ids_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg-1.bin");
        let mut owned: Vec<Entry> = (0..300).map(|i| entry(i, 0)).collect();
        // ids whose lengths take two varint bytes, and an empty one
        let long = "é".repeat(100);
        owned.push(Entry::owned(
            1000,
            1,
            ragfleet_proto::ChunkRecord {
                doc_id: long.clone(),
                chunk_id: String::new(),
                text: "x".into(),
                vector: vec![0.0, 1.0, 0.0],
                sentences: SentenceVectors::default(),
            },
        ));
        write(&path, &owned.iter().collect::<Vec<_>>()).unwrap();
        let back = read(&path).unwrap().unwrap();
        for (i, e) in back.iter().enumerate().take(300) {
            assert!(e.is_mapped());
            assert_eq!(e.doc_id(), format!("d{i}"));
            assert_eq!(e.chunk_id(), format!("d{i}#0"));
        }
        assert_eq!((back[300].doc_id(), back[300].chunk_id()), (&*long, ""));
        assert_eq!(back[300].seq, 1000);
    }
}
