//! A sealed segment's BM25 postings (`seg-<id>.post`): written once by the seal or merge that
//! makes the segment, memory-mapped, read in place by searches (page cache the kernel can drop,
//! not the process's memory), with block maxima so that a search skips blocks that cannot
//! reach the top k, and the tiers of its long lists' repeats ([`Tiers`]).
//!
//! Body (little endian; every section starts 8-byte aligned in the file):
//! - fixed part, 64 bytes: marker `RFPOST03` (`RFPOST02`: a file of before session 53, without
//!   the short lengths, whose rows' lengths are read from `lens`; `RFPOST01`: of before session
//!   32, without tiers either, whose tiers are made in memory), rows u32, terms u32, total length
//!   u64, pairs u64, blocks u64, term bytes u64, split lists u32, tier blocks u32, tier pairs u64
//!   (the last three zero in the first format);
//! - `lens`: each row's length in terms (u32);
//! - `toff`: where each term starts in the term bytes (u32, one more than the terms);
//! - `blob`: the terms' bytes, sorted;
//! - `pairs`: (row, term frequency) per posting (u32 each), each term's sorted by row;
//! - `blocks`: (last row, highest frequency, shortest row length) per [`BLOCK`] postings;
//! - `meta`: (first pair, pairs, first block, highest frequency, shortest length) per term;
//! - `tier pairs`: the split lists' postings of frequency 2, 3, and 4 or more, each tier's
//!   sorted by row, tier after tier, list after list;
//! - `tier blocks`: their summaries, as `blocks`;
//! - `splits`: per split list, in term order: the term, then per tier (first tier pair, tier
//!   pairs, first tier block, highest frequency, shortest length), zeros for an empty tier;
//! - `short`: each row's length as one byte, [`SHORT_LEN_MAX`] for a length of that or more (read
//!   from `lens` then). A search reads a length for most postings it scores, at random rows:
//!   a million rows' bytes stay in the caches where their 4-byte lengths did not (BM25 over a
//!   million sentences p50 x0.7).
use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::files::{map_checked, map_written, u32_at, u64_at, write_checked_streamed, HEADER};
use crate::IndexError;

mod encode;
mod tiers;

use encode::encode;
pub(crate) use encode::{Built, PostingsInput};
use tiers::{tier_ranges, TierRef, SPLIT_SHARE, TIERS};
pub(crate) use tiers::{Split, Tiers, SPLIT_MIN};

/// Postings a block summarises.
pub(crate) const BLOCK: usize = 128;
/// The first format's marker (no tiers stored), the second's (no short lengths) and the
/// current one's.
const MARKER1: &[u8; 8] = b"RFPOST01";
const MARKER2: &[u8; 8] = b"RFPOST02";
const MARKER: &[u8; 8] = b"RFPOST03";
/// A row's length in the `short` section from which it is read from `lens` instead.
pub(crate) const SHORT_LEN_MAX: u8 = u8::MAX;

/// A row's length as the `short` section stores it.
fn short_len(len: u32) -> u8 {
    len.min(SHORT_LEN_MAX as u32) as u8
}

/// Row `row`'s length from rows' lengths as bytes, when it is one of them and below
/// [`SHORT_LEN_MAX`] (else it is read whole).
#[inline]
pub(crate) fn short_len_of(short: &[u8], row: u32) -> Option<u32> {
    short
        .get(row as usize)
        .filter(|&&s| s < SHORT_LEN_MAX)
        .map(|&s| s as u32)
}

/// The formats a postings file is in (the older ones as files written before them are).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Format {
    /// No tiers stored.
    First,
    /// Tiers stored, no short lengths.
    Second,
    /// Tiers and short lengths stored (what is written).
    Third,
}
const FIXED: usize = 64;

/// One term's postings in one source: sorted (row, frequency) pairs and block summaries
/// (last row, highest frequency, shortest length), one per [`BLOCK`] pairs, or one for all.
#[derive(Clone, Copy)]
pub(crate) struct TermList<'a> {
    pub(crate) pairs: &'a [[u32; 2]],
    pub(crate) blocks: &'a [[u32; 3]],
    /// Rows that hold the term (removed ones not counted).
    pub(crate) df: u32,
    /// The whole list's highest frequency and shortest length (stored, not summed up from the
    /// blocks at each search).
    pub(crate) max_tf: u32,
    pub(crate) min_len: u32,
    /// A long list's postings of high frequency apart, when it has them.
    pub(crate) hi: Option<Tiers<'a>>,
}

impl TermList<'_> {
    /// The whole list's highest frequency and shortest length.
    pub(crate) fn bound(&self) -> (u32, u32) {
        (self.max_tf, self.min_len)
    }

    /// The term's frequency at `row` (0: not there, or removed).
    pub(crate) fn tf_at(&self, row: u32) -> u32 {
        self.pairs
            .binary_search_by_key(&row, |p| p[0])
            .map_or(0, |i| self.pairs[i][1])
    }
}

/// The bytes behind a postings file: its map, or (when it could not be written) a copy in
/// memory, 8-byte aligned like the file's pages.
enum Backing {
    Map(memmap2::Mmap),
    Own(Vec<u64>, usize),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            // SAFETY: the vector holds at least `len` initialised bytes.
            Backing::Own(v, len) => unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), *len) },
        }
    }
}

/// A segment's postings file, checked and read in place.
pub(crate) struct SegPostings {
    data: Backing,
    rows: usize,
    terms: usize,
    total_len: u64,
    n_pairs: usize,
    n_blocks: usize,
    /// Absolute offsets of the sections in `data`.
    lens: usize,
    toff: usize,
    blob: usize,
    pairs: usize,
    blocks: usize,
    meta: usize,
    /// Whether the file stores its lists' tiers (the current format).
    stored_tiers: bool,
    /// The stored tiers' sizes, and their sections' absolute offsets (all zero in the first
    /// format).
    n_tier_pairs: usize,
    n_tier_blocks: usize,
    n_splits: usize,
    tier_pairs: usize,
    tier_blocks: usize,
    splits_at: usize,
    /// The short lengths' absolute offset (zero: none, an older format).
    short: usize,
    /// A first-format file's terms whose lists are [`SPLIT_MIN`] long or longer, in order,
    /// and their splits once made in memory (`None`: the list has none); empty otherwise.
    long: Vec<u32>,
    splits: Vec<OnceLock<Option<Split>>>,
}

/// A stored split list's record: the term, then five words per tier.
pub(crate) type SplitRecord = [u32; 1 + 5 * TIERS.len()];

impl std::fmt::Debug for SegPostings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegPostings")
            .field("rows", &self.rows)
            .field("terms", &self.terms)
            .field("pairs", &self.n_pairs)
            .finish()
    }
}

/// A list's postings and their block summaries.
type Placed<'b> = (&'b [[u32; 2]], &'b [[u32; 3]]);

/// A list's postings and block summaries, `[first pair, pairs, first block]` into `pairs` and
/// `blocks`, when both lie inside them.
fn placed<'b>(
    pairs: &'b [[u32; 2]],
    blocks: &'b [[u32; 3]],
    [first, count, first_block]: [u32; 3],
) -> Option<Placed<'b>> {
    let (first, count, first_block) = (first as usize, count as usize, first_block as usize);
    Some((
        pairs.get(first..first + count)?,
        blocks.get(first_block..first_block + count.div_ceil(BLOCK))?,
    ))
}

/// Whether `summ` summarises `list` (rows inside `lens`) block by block (last row, highest
/// frequency, shortest length per [`BLOCK`] postings) and `bound` (highest frequency,
/// shortest length; zeros for no postings) the whole list.
fn summarised(
    list: &[[u32; 2]],
    summ: &[[u32; 3]],
    bound: (u32, u32),
    lens: &[u32],
) -> Result<(), String> {
    let mut whole: Option<(u32, u32)> = None;
    for (j, chunk) in list.chunks(BLOCK).enumerate() {
        let tf = chunk.iter().map(|p| p[1]).max().unwrap_or(0);
        let len = chunk.iter().map(|p| lens[p[0] as usize]).min().unwrap_or(0);
        if summ[j] != [chunk[chunk.len() - 1][0], tf, len] {
            return Err(format!("block {j} does not summarise it"));
        }
        whole = Some(whole.map_or((tf, len), |(t, l)| (t.max(tf), l.min(len))));
    }
    if whole.unwrap_or((0, 0)) != bound {
        return Err("bound does not fit its postings".into());
    }
    Ok(())
}

/// Bytes to add at absolute position `at` to reach a multiple of 8.
fn pad8(at: usize) -> usize {
    (8 - at % 8) % 8
}

impl SegPostings {
    /// Maps and checks `path` (its checksum too) for a segment of `rows` rows; `Ok(None)` when
    /// there is no such file.
    pub(crate) fn open(path: &Path, rows: usize) -> Result<Option<Arc<SegPostings>>, IndexError> {
        match map_checked(path)? {
            Some(map) => SegPostings::parse(path, Backing::Map(map), rows).map(Some),
            None => Ok(None),
        }
    }

    /// Writes postings merged from `inputs` (rows numbered on from one input to the next) to
    /// `path`, atomically and streamed, and maps the file back.
    pub(crate) fn write(
        path: &Path,
        inputs: &[&dyn PostingsInput],
    ) -> Result<Arc<SegPostings>, IndexError> {
        SegPostings::write_kept(path, inputs, &[])
    }

    /// [`SegPostings::write`] of only the rows `keep` marks (per input; `None` or missing: all),
    /// numbered on: a compaction's postings from its sources', without the dead chunks.
    pub(crate) fn write_kept(
        path: &Path,
        inputs: &[&dyn PostingsInput],
        keep: &[Option<&[bool]>],
    ) -> Result<Arc<SegPostings>, IndexError> {
        let rows: usize = inputs
            .iter()
            .enumerate()
            .map(|(k, i)| match keep.get(k).copied().flatten() {
                Some(kept) => kept.iter().filter(|&&x| x).count(),
                None => i.lens().len(),
            })
            .sum();
        write_checked_streamed(path, |w| encode(w, inputs, keep, Format::Third))?;
        let map = map_written(path)?.ok_or_else(|| IndexError::Corrupt {
            path: path.to_path_buf(),
            reason: "the postings file just written is gone".into(),
        })?;
        SegPostings::parse(path, Backing::Map(map), rows)
    }

    /// [`SegPostings::write`] in the first format (no tiers stored), as files written before
    /// session 32 are: tests of opening those.
    #[cfg(test)]
    pub(crate) fn write_first_format(
        path: &Path,
        inputs: &[&dyn PostingsInput],
    ) -> Result<Arc<SegPostings>, IndexError> {
        SegPostings::write_format(path, inputs, Format::First)
    }

    /// [`SegPostings::write`] in `format`: tests of opening the files of older formats.
    #[cfg(test)]
    pub(crate) fn write_format(
        path: &Path,
        inputs: &[&dyn PostingsInput],
        format: Format,
    ) -> Result<Arc<SegPostings>, IndexError> {
        let rows: usize = inputs.iter().map(|i| i.lens().len()).sum();
        write_checked_streamed(path, |w| encode(w, inputs, &[], format))?;
        SegPostings::open(path, rows)?.ok_or_else(|| IndexError::BadInput("gone".into()))
    }

    /// Postings merged from `inputs`, held in memory (when no file can be written).
    pub(crate) fn in_memory(inputs: &[&dyn PostingsInput]) -> Result<Arc<SegPostings>, IndexError> {
        let rows: usize = inputs.iter().map(|i| i.lens().len()).sum();
        let mut bytes = vec![0u8; HEADER];
        encode(&mut bytes, inputs, &[], Format::Third)
            .map_err(|e| IndexError::BadInput(e.to_string()))?;
        let len = bytes.len();
        let mut words = vec![0u64; len.div_ceil(8)];
        // SAFETY: `words` has room for `len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr().cast(), len);
        }
        SegPostings::parse(Path::new("(memory)"), Backing::Own(words, len), rows)
    }

    fn parse(path: &Path, data: Backing, rows: usize) -> Result<Arc<SegPostings>, IndexError> {
        let corrupt = |reason: String| IndexError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if cfg!(target_endian = "big") {
            return Err(corrupt(
                "postings files need a little-endian machine".into(),
            ));
        }
        let b = data.bytes();
        if b.len() < HEADER + FIXED {
            return Err(corrupt("not a postings file".into()));
        }
        let format = match &b[HEADER..HEADER + 8] {
            m if m == MARKER => Format::Third,
            m if m == MARKER2 => Format::Second,
            m if m == MARKER1 => Format::First,
            _ => return Err(corrupt("not a postings file".into())),
        };
        let stored_tiers = format >= Format::Second;
        let at = HEADER;
        let (n_rows, terms) = (u32_at(b, at + 8) as usize, u32_at(b, at + 12) as usize);
        let total_len = u64_at(b, at + 16);
        let (n_pairs, n_blocks, blob_len) = (
            u64_at(b, at + 24) as usize,
            u64_at(b, at + 32) as usize,
            u64_at(b, at + 40) as usize,
        );
        let (n_splits, n_tier_blocks, n_tier_pairs) = if stored_tiers {
            (
                u32_at(b, at + 48) as usize,
                u32_at(b, at + 52) as usize,
                u64_at(b, at + 56) as usize,
            )
        } else {
            (0, 0, 0)
        };
        if n_rows != rows {
            return Err(corrupt(format!(
                "postings of {n_rows} rows, segment of {rows}"
            )));
        }
        // the sections, in order, each 8-byte aligned
        let mut pos = HEADER + FIXED;
        let mut section = |bytes: Option<usize>| -> Result<usize, IndexError> {
            pos += pad8(pos);
            let start = pos;
            pos = bytes
                .and_then(|n| pos.checked_add(n))
                .ok_or_else(|| corrupt("section sizes overflow".into()))?;
            Ok(start)
        };
        let lens = section(n_rows.checked_mul(4))?;
        let toff = section(terms.checked_add(1).and_then(|t| t.checked_mul(4)))?;
        let blob = section(Some(blob_len))?;
        let pairs = section(n_pairs.checked_mul(8))?;
        let blocks = section(n_blocks.checked_mul(12))?;
        let meta = section(terms.checked_mul(20))?;
        // (the first format ends with `meta`, unpadded)
        let (tier_pairs, tier_blocks, splits_at) = if stored_tiers {
            (
                section(n_tier_pairs.checked_mul(8))?,
                section(n_tier_blocks.checked_mul(12))?,
                section(n_splits.checked_mul(std::mem::size_of::<SplitRecord>()))?,
            )
        } else {
            (0, 0, 0)
        };
        let short = if format >= Format::Third {
            section(Some(n_rows))?
        } else {
            0
        };
        if pos != b.len() {
            return Err(corrupt(format!(
                "sections end at {pos}, the file at {}",
                b.len()
            )));
        }
        if !(b.as_ptr() as usize).is_multiple_of(8) {
            return Err(corrupt("postings not aligned".into()));
        }
        let mut p = SegPostings {
            rows,
            terms,
            total_len,
            n_pairs,
            n_blocks,
            lens,
            toff,
            blob,
            pairs,
            blocks,
            meta,
            data,
            stored_tiers,
            n_tier_pairs,
            n_tier_blocks,
            n_splits,
            tier_pairs,
            tier_blocks,
            splits_at,
            short,
            long: Vec::new(),
            splits: Vec::new(),
        };
        p.check().map_err(&corrupt)?;
        p.check_tiers().map_err(corrupt)?;
        if !stored_tiers {
            p.long = (0..p.terms as u32)
                .filter(|&i| p.all_meta()[i as usize][1] as usize >= SPLIT_MIN)
                .collect();
            p.splits = p.long.iter().map(|_| OnceLock::new()).collect();
        }
        Ok(Arc::new(p))
    }

    /// Every count, offset and order the searches rely on.
    fn check(&self) -> Result<(), String> {
        let lens = self.lens();
        if lens.iter().map(|&l| l as u64).sum::<u64>() != self.total_len {
            return Err("row lengths do not add up".into());
        }
        if self.short != 0
            && !self
                .short_lens()
                .iter()
                .zip(lens)
                .all(|(&s, &l)| s == short_len(l))
        {
            return Err("short row lengths do not match the lengths".into());
        }
        let toff = self.toff();
        let blob_len = u64_at(self.data.bytes(), HEADER + 40) as usize;
        if toff[0] != 0
            || toff.windows(2).any(|w| w[0] > w[1])
            || toff[self.terms] as usize != blob_len
        {
            return Err("term offsets out of place".into());
        }
        for i in 1..self.terms {
            if self.term(i - 1) >= self.term(i) {
                return Err("terms not sorted".into());
            }
        }
        let (pairs, blocks) = (self.all_pairs(), self.all_blocks());
        let (mut next_pair, mut next_block) = (0usize, 0usize);
        for (i, m) in self.all_meta().iter().enumerate() {
            let [first, count, first_block, max_tf, min_len] = *m;
            if first as usize != next_pair || count == 0 || first_block as usize != next_block {
                return Err(format!("term {i}'s postings out of place"));
            }
            let Some((list, summ)) = placed(pairs, blocks, [first, count, first_block]) else {
                return Err(format!("term {i}'s postings past the end"));
            };
            let mut prev: Option<u32> = None;
            for &[row, tf] in list {
                if prev.is_some_and(|p| p >= row) || row as usize >= self.rows || tf == 0 {
                    return Err(format!("term {i}'s postings unsorted or out of range"));
                }
                prev = Some(row);
            }
            summarised(list, summ, (max_tf, min_len), lens)
                .map_err(|what| format!("term {i}'s {what}"))?;
            next_pair += list.len();
            next_block += summ.len();
        }
        if next_pair != self.n_pairs || next_block != self.n_blocks {
            return Err("postings or blocks left over".into());
        }
        Ok(())
    }

    /// The stored tiers: each exactly its list's postings in its frequency range, in order,
    /// summarised by its blocks and bounds, the records in term order, nothing left over.
    fn check_tiers(&self) -> Result<(), String> {
        let (pairs, blocks, lens) = (self.all_tier_pairs(), self.all_tier_blocks(), self.lens());
        let (mut next_pair, mut next_block) = (0usize, 0usize);
        let mut last_term: Option<usize> = None;
        for rec in self.split_records() {
            let term = rec[0] as usize;
            if term >= self.terms || last_term.is_some_and(|t| t >= term) {
                return Err(format!("split record of term {term} out of place"));
            }
            last_term = Some(term);
            let list = self.list(term);
            let mut held = 0usize;
            for (t, range) in tier_ranges().enumerate() {
                let [first, count, first_block, max_tf, min_len] =
                    std::array::from_fn(|j| rec[1 + 5 * t + j]);
                if first as usize != next_pair || first_block as usize != next_block {
                    return Err(format!("term {term}'s tier {t} out of place"));
                }
                let Some((tier, summ)) = placed(pairs, blocks, [first, count, first_block]) else {
                    return Err(format!("term {term}'s tier {t} past the end"));
                };
                // (its rows are then the list's, checked)
                if !list
                    .pairs
                    .iter()
                    .filter(|p| range.contains(&p[1]))
                    .eq(tier.iter())
                {
                    return Err(format!("term {term}'s tier {t} is not its list's repeats"));
                }
                summarised(tier, summ, (max_tf, min_len), lens)
                    .map_err(|what| format!("term {term}'s tier {t}: {what}"))?;
                held += tier.len();
                next_pair += tier.len();
                next_block += summ.len();
            }
            if held == 0 {
                return Err(format!("term {term}'s split has no tiers"));
            }
        }
        if next_pair != self.n_tier_pairs || next_block != self.n_tier_blocks {
            return Err("tier postings or blocks left over".into());
        }
        Ok(())
    }

    /// `n` items of `T` (plain words) at absolute offset `at`.
    fn slice<T>(&self, at: usize, n: usize) -> &[T] {
        let b = self.data.bytes();
        debug_assert!(at + n * std::mem::size_of::<T>() <= b.len());
        // SAFETY: `parse` checked that every section lies inside the bytes and starts 8-byte
        // aligned (the map or the owned words are 8-byte aligned); T is an array of u32 or a
        // byte.
        unsafe { std::slice::from_raw_parts(b.as_ptr().add(at).cast(), n) }
    }

    fn lens(&self) -> &[u32] {
        self.slice(self.lens, self.rows)
    }
    fn toff(&self) -> &[u32] {
        self.slice(self.toff, self.terms + 1)
    }
    fn all_pairs(&self) -> &[[u32; 2]] {
        self.slice(self.pairs, self.n_pairs)
    }
    fn all_blocks(&self) -> &[[u32; 3]] {
        self.slice(self.blocks, self.n_blocks)
    }
    fn all_meta(&self) -> &[[u32; 5]] {
        self.slice(self.meta, self.terms)
    }
    fn all_tier_pairs(&self) -> &[[u32; 2]] {
        self.slice(self.tier_pairs, self.n_tier_pairs)
    }
    fn all_tier_blocks(&self) -> &[[u32; 3]] {
        self.slice(self.tier_blocks, self.n_tier_blocks)
    }
    fn split_records(&self) -> &[SplitRecord] {
        self.slice(self.splits_at, self.n_splits)
    }

    /// Rows (chunks of the segment, dead ones included).
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// The rows' lengths in terms, summed.
    pub(crate) fn total_len(&self) -> u64 {
        self.total_len
    }

    /// The rows' lengths as bytes, [`SHORT_LEN_MAX`] for that or more (read with
    /// [`SegPostings::len_of`] then); empty in the older formats.
    pub(crate) fn short_lens(&self) -> &[u8] {
        self.slice(self.short, if self.short == 0 { 0 } else { self.rows })
    }

    /// Row `row`'s length in terms.
    pub(crate) fn len_of(&self, row: u32) -> u32 {
        short_len_of(self.short_lens(), row).unwrap_or_else(|| self.lens()[row as usize])
    }

    /// Whether the file stores its rows' short lengths (the current format).
    #[cfg(test)]
    pub(crate) fn stores_short_lengths(&self) -> bool {
        self.short != 0
    }

    /// Whether the file stores its long lists' tiers (else they are made in memory).
    #[cfg(test)]
    pub(crate) fn stores_tiers(&self) -> bool {
        self.stored_tiers
    }

    /// Bytes held in the process's memory (a mapped file: none but its splits).
    pub(crate) fn memory_bytes(&self) -> usize {
        let splits: usize = self
            .splits
            .iter()
            .filter_map(|s| s.get().and_then(Option::as_ref))
            .map(Split::memory_bytes)
            .sum();
        splits
            + match &self.data {
                Backing::Map(_) => 0,
                Backing::Own(_, len) => *len,
            }
    }

    /// The postings of `term`, if any row holds it.
    pub(crate) fn find(&self, term: &str) -> Option<TermList<'_>> {
        let (mut lo, mut hi) = (0usize, self.terms);
        let t = term.as_bytes();
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.term(mid).cmp(t) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    let mut list = self.list(mid);
                    list.hi = self.split(mid, list);
                    return Some(list);
                }
            }
        }
        None
    }

    /// Makes the splits of every long list now (within the process's budget), so that no
    /// search pays for one: called on a background thread once a segment is made or opened,
    /// before searches reach it or beside them. Returns how many lists are split (a file that
    /// stores its tiers: the lists it stores them for, nothing to make).
    pub(crate) fn split_long_lists(&self) -> usize {
        if self.stored_tiers {
            return self.n_splits;
        }
        (0..self.long.len())
            .filter(|&at| {
                let i = self.long[at] as usize;
                self.split(i, self.list(i)).is_some()
            })
            .count()
    }

    /// Term `i`'s tiers, when its list has them: read from the file, or (a file of the first
    /// format) made now if not yet.
    fn split(&self, i: usize, list: TermList<'_>) -> Option<Tiers<'_>> {
        if self.stored_tiers {
            let records = self.split_records();
            let at = records.binary_search_by_key(&(i as u32), |r| r[0]).ok()?;
            return Some(Tiers::Stored(self, &records[at]));
        }
        let at = self.long.binary_search(&(i as u32)).ok()?;
        self.splits[at]
            .get_or_init(|| Split::of(list, self.lens()))
            .as_ref()
            .map(Tiers::Made)
    }

    /// The tiers a stored record (one of this file's) lays out.
    fn stored_tiers_of(&self, rec: &SplitRecord) -> [Option<TierRef<'_>>; 3] {
        let (pairs, blocks) = (self.all_tier_pairs(), self.all_tier_blocks());
        std::array::from_fn(|t| {
            let [first, count, first_block, max_tf, min_len] =
                std::array::from_fn(|j| rec[1 + 5 * t + j]);
            // (checked at open: in place)
            let (pairs, blocks) = placed(pairs, blocks, [first, count, first_block])?;
            (count > 0).then_some(TierRef {
                pairs,
                blocks,
                max_tf,
                min_len,
            })
        })
    }

    fn list(&self, i: usize) -> TermList<'_> {
        let [first, count, first_block, max_tf, min_len] = self.all_meta()[i];
        let (first, count, first_block) = (first as usize, count as usize, first_block as usize);
        TermList {
            pairs: &self.all_pairs()[first..first + count],
            blocks: &self.all_blocks()[first_block..first_block + count.div_ceil(BLOCK)],
            df: count as u32,
            max_tf,
            min_len,
            hi: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    use super::*;

    fn texts(n: usize, seed: u64) -> Vec<String> {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                (0..r.gen_range(0..40))
                    .map(|_| format!("w{}", (r.gen::<f64>().powi(3) * 300.0) as u32))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    #[test]
    fn splits_are_made_only_within_their_memory_budget_and_give_it_back() {
        static USED: AtomicUsize = AtomicUsize::new(0);
        // a term in every row: once in most, 2..=5 times in every tenth
        let lens = vec![10u32; 5000];
        let pairs: Vec<[u32; 2]> = (0..5000u32)
            .map(|row| [row, if row % 10 == 0 { 2 + row % 4 } else { 1 }])
            .collect();
        let blocks: Vec<[u32; 3]> = pairs
            .chunks(BLOCK)
            .map(|c| [c[c.len() - 1][0], c.iter().map(|p| p[1]).max().unwrap(), 10])
            .collect();
        let list = TermList {
            pairs: &pairs,
            blocks: &blocks,
            df: 5000,
            max_tf: 5,
            min_len: 10,
            hi: None,
        };
        let whole = Split::within(list, &lens, &USED, usize::MAX).expect("split");
        let cost = USED.load(Relaxed);
        assert!(cost >= 500 * 8, "the tiers' 500 pairs charged: {cost}");
        assert_eq!(
            Tiers::Made(&whole)
                .tiers()
                .map(|t| t.pairs.len())
                .sum::<usize>(),
            500
        );
        // a second one fits only where the budget has room for both
        assert!(Split::within(list, &lens, &USED, 2 * cost - 1).is_none());
        assert_eq!(USED.load(Relaxed), cost, "a refused split charges nothing");
        let second = Split::within(list, &lens, &USED, 2 * cost).expect("room for two");
        drop((whole, second));
        assert_eq!(USED.load(Relaxed), 0, "given back when dropped");
        // a list mostly of repeated terms is not split
        let mostly: Vec<[u32; 2]> = (0..5000u32).map(|row| [row, 1 + row % 2]).collect();
        let list = TermList {
            pairs: &mostly,
            ..list
        };
        assert!(Split::within(list, &lens, &USED, usize::MAX).is_none());
    }

    /// Every term of every row, as (term, row, tf), from a source.
    fn flatten(p: &SegPostings) -> Vec<(String, u32, u32)> {
        let mut out = Vec::new();
        for i in 0..p.term_count() {
            let t = String::from_utf8(p.term(i).to_vec()).unwrap();
            for &[row, tf] in PostingsInput::pairs(p, i) {
                out.push((t.clone(), row, tf));
            }
        }
        out
    }

    fn expected(texts: &[String]) -> Vec<(String, u32, u32)> {
        let mut out = Vec::new();
        for (row, t) in texts.iter().enumerate() {
            for (term, tf) in crate::bm25::term_counts(t) {
                out.push((term, row as u32, tf));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn postings_files_round_trip_merge_and_refuse_damage() {
        let dir = tempfile::tempdir().unwrap();
        let a = texts(700, 1);
        let b = texts(300, 2);
        let built_a = Built::of(a.iter().map(|s| s.as_str()));
        let pa = SegPostings::write(&dir.path().join("a.post"), &[&built_a]).unwrap();
        assert_eq!(pa.rows(), 700);
        let mut got = flatten(&pa);
        got.sort();
        assert_eq!(got, expected(&a));
        // a term's list: blocks summarise it, lookups find it
        let l = pa.find("w0").expect("a common term");
        assert_eq!(l.blocks.len(), l.pairs.len().div_ceil(BLOCK));
        assert!(l.pairs.len() > BLOCK, "spans blocks");
        let (tf, len) = l.bound();
        assert!(l.pairs.iter().all(|p| p[1] <= tf && pa.len_of(p[0]) >= len));
        assert_eq!(l.tf_at(l.pairs[5][0]), l.pairs[5][1]);
        assert!(pa.find("nosuchterm").is_none());
        // merging a mapped file with built postings numbers the second input's rows on
        let built_b = Built::of(b.iter().map(|s| s.as_str()));
        let path = dir.path().join("ab.post");
        let pab = SegPostings::write(&path, &[pa.as_ref(), &built_b]).unwrap();
        let mut got = flatten(&pab);
        got.sort();
        let both: Vec<String> = a.iter().chain(&b).cloned().collect();
        assert_eq!(got, expected(&both));
        assert_eq!(
            pab.total_len(),
            pa.total_len() + built_b.lens.iter().map(|&l| l as u64).sum::<u64>()
        );
        // a compaction's: only the kept rows, numbered on; a term only dropped rows held is gone
        let keep_a: Vec<bool> = (0..700).map(|r| r % 3 != 0).collect();
        let keep_b: Vec<bool> = (0..300).map(|r| r % 5 == 1).collect();
        let kept = SegPostings::write_kept(
            &dir.path().join("kept.post"),
            &[pa.as_ref(), &built_b],
            &[Some(&keep_a[..]), Some(&keep_b[..])],
        )
        .unwrap();
        let kept_texts: Vec<String> = a
            .iter()
            .zip(&keep_a)
            .chain(b.iter().zip(&keep_b))
            .filter(|(_, &k)| k)
            .map(|(t, _)| t.clone())
            .collect();
        assert_eq!(kept.rows(), kept_texts.len());
        let mut got = flatten(&kept);
        got.sort();
        assert_eq!(got, expected(&kept_texts));
        let mem = SegPostings::in_memory(&[pa.as_ref(), &built_b]).unwrap();
        assert_eq!(flatten(&mem), flatten(&pab));
        assert!(mem.memory_bytes() > 0 && pab.memory_bytes() == 0);
        // reopened: the same; another segment size refused
        let again = SegPostings::open(&path, 1000).unwrap().unwrap();
        assert_eq!(flatten(&again), flatten(&pab));
        assert!(SegPostings::open(&path, 999)
            .unwrap_err()
            .to_string()
            .contains("rows"));
        assert!(SegPostings::open(&dir.path().join("none.post"), 1)
            .unwrap()
            .is_none());
        // damaged: a checksum error, and with the checksum made to fit, a structural error;
        // never a panic
        let good = std::fs::read(&path).unwrap();
        for at in (HEADER..good.len()).step_by(good.len() / 97 + 1) {
            let mut bad = good.clone();
            bad[at] ^= 0x41;
            std::fs::write(&path, &bad).unwrap();
            assert!(SegPostings::open(&path, 1000).is_err(), "byte {at}");
            let body = bad[HEADER..].to_vec();
            crate::files::write_checked(&path, &body).unwrap();
            if let Ok(Some(p)) = SegPostings::open(&path, 1000) {
                // a flip that keeps the file consistent (a term's bytes still sorted): readable
                assert_eq!(p.rows(), 1000);
            }
        }
        std::fs::write(&path, &good[..good.len() - 8]).unwrap();
        assert!(SegPostings::open(&path, 1000).is_err());
    }

    #[test]
    fn short_lengths_are_stored_checked_at_open_and_long_rows_read_whole() {
        // rows of every kind of length: none, short, at and past a byte's last value
        let texts: Vec<String> = [0usize, 1, 2, 254, 255, 256, 1000]
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|i| format!("w{}", i % 97))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .chain(texts(500, 53))
            .collect();
        let want: Vec<u32> = texts
            .iter()
            .map(|t| crate::bm25::terms(t).len() as u32)
            .collect();
        let lens_of = |p: &SegPostings| {
            (0..p.rows() as u32)
                .map(|r| p.len_of(r))
                .collect::<Vec<_>>()
        };
        let dir = tempfile::tempdir().unwrap();
        let built = Built::of(texts.iter().map(|s| s.as_str()));
        let path = dir.path().join("s.post");
        let p = SegPostings::write(&path, &[&built]).unwrap();
        assert!(p.stores_short_lengths());
        assert_eq!(lens_of(&p), want);
        // a second-format file (written before the short lengths): read from the whole
        // lengths, alike; a merge of it stores them; so do postings held in memory
        let second =
            SegPostings::write_format(&dir.path().join("2.post"), &[&built], Format::Second)
                .unwrap();
        assert!(!second.stores_short_lengths() && second.stores_tiers());
        assert_eq!(lens_of(&second), want);
        assert_eq!(flatten(&second), flatten(&p));
        let merged = SegPostings::write(&dir.path().join("m.post"), &[second.as_ref()]).unwrap();
        assert!(merged.stores_short_lengths());
        assert_eq!(lens_of(&merged), want);
        let mem = SegPostings::in_memory(&[&built]).unwrap();
        assert!(mem.stores_short_lengths());
        assert_eq!(lens_of(&mem), want);
        // a short length changed (the checksum made to fit) is refused at open, never loaded
        let good = std::fs::read(&path).unwrap();
        for row in [0, 1, 3, 4, 5, 6, 300] {
            let mut bad = good.clone();
            bad[p.short + row] ^= 0x01;
            crate::files::write_checked(&path, &bad[HEADER..]).unwrap();
            let err = SegPostings::open(&path, texts.len()).expect_err(&format!("row {row}"));
            assert!(err.to_string().contains("short"), "row {row}: {err}");
        }
    }

    #[test]
    fn tiers_are_stored_checked_at_open_and_equal_those_made_in_memory() {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(32);
        // `c` in every row, more than once in about one row of eight (up to past the last
        // tier); `d` in every row, more than once in half of them (not split: too many)
        let texts: Vec<String> = (0..6000)
            .map(|_| {
                let mut t = format!("a{} b{}", r.gen_range(0..50), r.gen_range(0..9));
                let c = if r.gen_bool(0.12) {
                    r.gen_range(2..7)
                } else {
                    1
                };
                (0..c).for_each(|_| t.push_str(" c"));
                (0..r.gen_range(1..3)).for_each(|_| t.push_str(" d"));
                t
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let built = Built::of(texts.iter().map(|s| s.as_str()));
        let path = dir.path().join("t.post");
        let stored = SegPostings::write(&path, &[&built]).unwrap();
        let first = SegPostings::write_first_format(&dir.path().join("f.post"), &[&built]).unwrap();
        assert!(stored.stores_tiers() && !first.stores_tiers());
        // the same lists split, into the same tiers, as the first format's in memory; a
        // stored file holds none of them in the process's memory
        assert_eq!(
            stored.split_long_lists(),
            1,
            "`c` split, `d` and the short lists not"
        );
        assert_eq!(first.split_long_lists(), 1);
        assert_eq!(stored.memory_bytes(), 0);
        assert!(first.memory_bytes() > 0);
        type Tier = (Vec<[u32; 2]>, Vec<[u32; 3]>, u32, u32);
        let tiers = |p: &SegPostings, w: &str| -> Vec<Tier> {
            p.find(w).and_then(|l| l.hi).map_or(Vec::new(), |h| {
                h.tiers()
                    .map(|t| (t.pairs.to_vec(), t.blocks.to_vec(), t.max_tf, t.min_len))
                    .collect()
            })
        };
        let c = tiers(&stored, "c");
        assert_eq!(c.len(), 3, "frequencies 2, 3, and 4 or more");
        assert_eq!(c, tiers(&first, "c"));
        assert!(tiers(&stored, "d").is_empty() && tiers(&stored, "a1").is_empty());
        // a merge and a compaction (rows left out, renumbered) store them too; reopened alike
        let keep: Vec<bool> = (0..6000).map(|r| r % 7 != 3).collect();
        let kept = SegPostings::write_kept(
            &dir.path().join("k.post"),
            &[stored.as_ref(), first.as_ref()],
            &[Some(&keep[..]), None],
        )
        .unwrap();
        let again = SegPostings::open(&dir.path().join("k.post"), kept.rows())
            .unwrap()
            .unwrap();
        let want: usize = kept
            .find("c")
            .unwrap()
            .pairs
            .iter()
            .filter(|p| p[1] >= 2)
            .count();
        let got: usize = tiers(&again, "c").iter().map(|t| t.0.len()).sum();
        assert_eq!(got, want);
        assert_eq!(tiers(&again, "c"), tiers(&kept, "c"));
        // any change to the stored tiers, their blocks or records is refused at open (the
        // checksum made to fit), never a panic and never loaded
        let good = std::fs::read(&path).unwrap();
        let from = stored.tier_pairs;
        let to = stored.splits_at + stored.n_splits * std::mem::size_of::<SplitRecord>();
        assert!(to - from > 1000, "tiers stored: {} bytes", to - from);
        let pad = stored.tier_blocks + stored.n_tier_blocks * 12..stored.splits_at;
        for at in (from..to).step_by((to - from) / 211 + 1) {
            if pad.contains(&at) {
                continue;
            }
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            let body = bad[HEADER..].to_vec();
            crate::files::write_checked(&path, &body).unwrap();
            let err = SegPostings::open(&path, 6000).expect_err(&format!("byte {at}"));
            assert!(err.to_string().contains("tier") || err.to_string().contains("split"));
        }
    }
}
