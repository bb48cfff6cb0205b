//! Writing a postings file: what it is written from (a mapped file, or postings built from
//! texts), merged and renumbered, with block summaries and the long lists' tiers.
use std::io::Write;

use super::*;

/// What a postings file is written from: rows with their lengths and sorted terms with their
/// postings (a mapped file, or postings built from texts).
pub(crate) trait PostingsInput {
    fn lens(&self) -> &[u32];
    fn term_count(&self) -> usize;
    fn term(&self, i: usize) -> &[u8];
    fn pairs(&self, i: usize) -> &[[u32; 2]];
}

/// Postings built in memory from texts (a seal's or a compaction's chunks), terms sorted.
#[derive(Default)]
pub(crate) struct Built {
    pub(super) lens: Vec<u32>,
    terms: Vec<(String, Vec<[u32; 2]>)>,
}

impl Built {
    /// Tokenises texts, row by row.
    pub(crate) fn of<'a>(texts: impl Iterator<Item = &'a str>) -> Built {
        let mut map: std::collections::HashMap<String, Vec<[u32; 2]>> = Default::default();
        let mut lens = Vec::new();
        for (row, text) in texts.enumerate() {
            let counts = crate::bm25::term_counts(text);
            lens.push(counts.iter().map(|(_, f)| *f).sum());
            for (t, f) in counts {
                map.entry(t).or_default().push([row as u32, f]);
            }
        }
        let mut terms: Vec<(String, Vec<[u32; 2]>)> = map.into_iter().collect();
        terms.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Built { lens, terms }
    }
}

impl PostingsInput for Built {
    fn lens(&self) -> &[u32] {
        &self.lens
    }
    fn term_count(&self) -> usize {
        self.terms.len()
    }
    fn term(&self, i: usize) -> &[u8] {
        self.terms[i].0.as_bytes()
    }
    fn pairs(&self, i: usize) -> &[[u32; 2]] {
        &self.terms[i].1
    }
}

impl PostingsInput for SegPostings {
    fn lens(&self) -> &[u32] {
        SegPostings::lens(self)
    }
    fn term_count(&self) -> usize {
        self.terms
    }
    fn term(&self, i: usize) -> &[u8] {
        let t = self.toff();
        let b = self.data.bytes();
        &b[self.blob + t[i] as usize..self.blob + t[i + 1] as usize]
    }
    fn pairs(&self, i: usize) -> &[[u32; 2]] {
        self.list(i).pairs
    }
}

/// Writes `postings` to `out` (through `buf`, flushed a block at a time) and their block
/// summaries onto `blocks`; returns how many, their highest frequency and shortest length
/// (zeros for none).
fn put_list(
    out: &mut Out<'_>,
    buf: &mut Vec<u8>,
    blocks: &mut Vec<[u32; 3]>,
    lens: &[u32],
    postings: impl Iterator<Item = [u32; 2]>,
) -> std::io::Result<(u32, u32, u32)> {
    let (mut n, mut hi_tf, mut lo_len) = (0usize, 0u32, 0u32);
    for [row, tf] in postings {
        let len = lens[row as usize];
        if n % BLOCK == 0 {
            blocks.push([row, tf, len]);
        } else {
            let b = blocks.last_mut().expect("a block");
            *b = [row, b[1].max(tf), b[2].min(len)];
        }
        hi_tf = hi_tf.max(tf);
        lo_len = if n == 0 { len } else { lo_len.min(len) };
        buf.extend_from_slice(&row.to_le_bytes());
        buf.extend_from_slice(&tf.to_le_bytes());
        if buf.len() >= BLOCK * 8 {
            out.put(buf)?;
            buf.clear();
        }
        n += 1;
    }
    Ok((n as u32, hi_tf, lo_len))
}

/// A body being written, with its absolute position in the file.
struct Out<'a> {
    w: &'a mut dyn Write,
    pos: usize,
}

impl Out<'_> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.pos += bytes.len();
        self.w.write_all(bytes)
    }

    /// Zeros up to the next multiple of 8.
    fn align(&mut self) -> std::io::Result<()> {
        let pad = [0u8; 8];
        self.put(&pad[..pad8(self.pos)])
    }

    /// A section of words, aligned.
    fn section(&mut self, words: impl Iterator<Item = u32>) -> std::io::Result<()> {
        self.align()?;
        let mut buf = Vec::with_capacity(1 << 16);
        for x in words {
            buf.extend_from_slice(&x.to_le_bytes());
            if buf.len() >= 1 << 16 {
                self.put(&buf)?;
                buf.clear();
            }
        }
        self.put(&buf)
    }
}

/// Writes the body merged from `inputs` to `w`, which is at absolute offset [`HEADER`].
/// With `keep`, only the rows it marks (per input; `None`: all) are written, numbered on.
///
/// In the second format and after, every list of [`SPLIT_MIN`] postings or more whose
/// repeats are at most 1/[`SPLIT_SHARE`] of it has them written apart in tiers as well; in the
/// third (the current one), each row's length as a byte too. The older formats are written by
/// tests of the files written before them.
pub(super) fn encode(
    w: &mut dyn Write,
    inputs: &[&dyn PostingsInput],
    keep: &[Option<&[bool]>],
    format: Format,
) -> std::io::Result<()> {
    let tiers = format >= Format::Second;
    let too_big = |what: &str| std::io::Error::other(format!("postings too large: {what}"));
    // each input's rows' new numbers (u32::MAX: left out), and the kept rows' lengths
    let mut renumber: Vec<Vec<u32>> = Vec::with_capacity(inputs.len());
    let mut lens: Vec<u32> = Vec::new();
    for (k, inp) in inputs.iter().enumerate() {
        let kept = keep.get(k).copied().flatten();
        if kept.is_some_and(|kept| kept.len() != inp.lens().len()) {
            return Err(std::io::Error::other(
                "rows to keep do not match the postings",
            ));
        }
        let mut numbers = Vec::with_capacity(inp.lens().len());
        for (r, &len) in inp.lens().iter().enumerate() {
            if kept.is_none_or(|kept| kept[r]) {
                numbers.push(u32::try_from(lens.len()).map_err(|_| too_big("rows"))?);
                lens.push(len);
            } else {
                numbers.push(u32::MAX);
            }
        }
        renumber.push(numbers);
    }
    let rows = u32::try_from(lens.len()).map_err(|_| too_big("rows"))?;
    let renumber = &renumber;
    let kept_pairs = |k: usize, i: usize| {
        inputs[k]
            .pairs(i)
            .iter()
            .filter_map(move |&[row, tf]| match renumber[k][row as usize] {
                u32::MAX => None,
                new => Some([new, tf]),
            })
    };
    // every input's terms, merged: (term, input, index), equal terms side by side
    let mut all: Vec<(&[u8], usize, usize)> = inputs
        .iter()
        .enumerate()
        .flat_map(|(k, inp)| (0..inp.term_count()).map(move |i| (inp.term(i), k, i)))
        .collect();
    all.sort_unstable();
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, item) in all.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if all[g.start].0 == item.0 => g.end = i + 1,
            _ => groups.push(i..i + 1),
        }
    }
    let count = |g: &std::ops::Range<usize>| -> usize {
        all[g.clone()]
            .iter()
            .map(|&(_, k, i)| match keep.get(k).copied().flatten() {
                None => inputs[k].pairs(i).len(),
                Some(_) => kept_pairs(k, i).count(),
            })
            .sum()
    };
    // a term only left-out rows held is not written
    let counts: Vec<usize> = groups.iter().map(count).collect();
    let groups: Vec<std::ops::Range<usize>> = groups
        .into_iter()
        .zip(&counts)
        .filter(|(_, &c)| c > 0)
        .map(|(g, _)| g)
        .collect();
    let n_pairs: usize = counts.iter().sum();
    let n_blocks: usize = counts.iter().map(|c| c.div_ceil(BLOCK)).sum();
    let blob_len: usize = groups.iter().map(|g| all[g.start].0.len()).sum();
    let terms = u32::try_from(groups.len()).map_err(|_| too_big("terms"))?;
    if u32::try_from(n_pairs).is_err() || u32::try_from(blob_len).is_err() {
        return Err(too_big("postings"));
    }
    let total_len: u64 = lens.iter().map(|&l| l as u64).sum();
    let term_pairs = |g: &std::ops::Range<usize>| {
        all[g.clone()]
            .iter()
            .flat_map(move |&(_, k, i)| kept_pairs(k, i))
    };
    // the lists split in tiers, with their tiers' sizes, counted before the header says them
    let mut split: Vec<(usize, [usize; TIERS.len()])> = Vec::new();
    if tiers {
        for (t, g) in groups.iter().enumerate() {
            if count(g) < SPLIT_MIN {
                continue;
            }
            let mut sizes = [0usize; TIERS.len()];
            let mut n = 0usize;
            for [_, tf] in term_pairs(g) {
                n += 1;
                if let Some(at) = tier_ranges().position(|r| r.contains(&tf)) {
                    sizes[at] += 1;
                }
            }
            let apart: usize = sizes.iter().sum();
            if apart > 0 && apart * SPLIT_SHARE <= n {
                split.push((t, sizes));
            }
        }
    }
    let n_tier_pairs: usize = split.iter().flat_map(|(_, s)| s).sum();
    let n_tier_blocks: usize = split
        .iter()
        .flat_map(|(_, s)| s)
        .map(|c| c.div_ceil(BLOCK))
        .sum();
    let n_splits = u32::try_from(split.len()).map_err(|_| too_big("splits"))?;
    let n_tier_blocks_u32 = u32::try_from(n_tier_blocks).map_err(|_| too_big("tier blocks"))?;

    let mut out = Out { w, pos: HEADER };
    let mut fixed = Vec::with_capacity(FIXED);
    fixed.extend_from_slice(match format {
        Format::First => MARKER1,
        Format::Second => MARKER2,
        Format::Third => MARKER,
    });
    fixed.extend_from_slice(&rows.to_le_bytes());
    fixed.extend_from_slice(&terms.to_le_bytes());
    for x in [total_len, n_pairs as u64, n_blocks as u64, blob_len as u64] {
        fixed.extend_from_slice(&x.to_le_bytes());
    }
    if tiers {
        fixed.extend_from_slice(&n_splits.to_le_bytes());
        fixed.extend_from_slice(&n_tier_blocks_u32.to_le_bytes());
        fixed.extend_from_slice(&(n_tier_pairs as u64).to_le_bytes());
    }
    fixed.resize(FIXED, 0);
    out.put(&fixed)?;
    out.section(lens.iter().copied())?;
    let mut off = 0u32;
    let mut toff = vec![0u32];
    for g in &groups {
        off += all[g.start].0.len() as u32;
        toff.push(off);
    }
    out.section(toff.into_iter())?;
    out.align()?;
    for g in &groups {
        out.put(all[g.start].0)?;
    }
    out.align()?;
    let mut blocks: Vec<[u32; 3]> = Vec::with_capacity(n_blocks);
    let mut meta: Vec<[u32; 5]> = Vec::with_capacity(groups.len());
    let mut first = 0u32;
    let mut buf: Vec<u8> = Vec::with_capacity(BLOCK * 8);
    for g in &groups {
        let first_block = blocks.len() as u32;
        let (n, hi_tf, lo_len) = put_list(&mut out, &mut buf, &mut blocks, &lens, term_pairs(g))?;
        meta.push([first, n, first_block, hi_tf, lo_len]);
        first += n;
    }
    out.put(&buf)?;
    out.section(blocks.iter().flatten().copied())?;
    out.section(meta.iter().flatten().copied())?;
    if !tiers {
        return Ok(());
    }
    // the split lists' tiers, their blocks, and a record a list
    out.align()?;
    buf.clear();
    let mut tier_blocks: Vec<[u32; 3]> = Vec::with_capacity(n_tier_blocks);
    let mut records: Vec<SplitRecord> = Vec::with_capacity(split.len());
    let mut first = 0u32;
    for &(t, sizes) in &split {
        let mut rec: SplitRecord = [0; 1 + 5 * TIERS.len()];
        rec[0] = t as u32;
        for (at, range) in tier_ranges().enumerate() {
            let first_block = tier_blocks.len() as u32;
            let tier = term_pairs(&groups[t]).filter(|p| range.contains(&p[1]));
            let (count, hi_tf, lo_len) =
                put_list(&mut out, &mut buf, &mut tier_blocks, &lens, tier)?;
            debug_assert_eq!(count as usize, sizes[at]);
            rec[1 + 5 * at..6 + 5 * at].copy_from_slice(&[
                first,
                count,
                first_block,
                hi_tf,
                lo_len,
            ]);
            first += count;
        }
        records.push(rec);
    }
    out.put(&buf)?;
    out.section(tier_blocks.iter().flatten().copied())?;
    out.section(records.iter().flatten().copied())?;
    if format < Format::Third {
        return Ok(());
    }
    out.align()?;
    let short: Vec<u8> = lens.iter().map(|&l| short_len(l)).collect();
    out.put(&short)
}
