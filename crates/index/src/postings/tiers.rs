//! A long list's repeats apart: its postings of frequency 2, 3 and 4 or more in tiers of their
//! own (stored in the file, or made in memory for a file of the first format), so that a
//! search bounds most of a common term's postings by frequency 1.
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::*;

/// One tier of a split list.
#[derive(Clone, Copy)]
pub(super) struct TierRef<'a> {
    pub(super) pairs: &'a [[u32; 2]],
    pub(super) blocks: &'a [[u32; 3]],
    pub(super) max_tf: u32,
    pub(super) min_len: u32,
}

/// A long list's postings of frequency 2 and more, apart in tiers (2, 3, and 4 or more) with
/// their own block summaries, read from the postings file (or from a [`Split`] made in memory
/// for a file of the first format). A search walks each tier as a list of its own and the
/// whole list without them, bounded by frequency 1: on common terms nearly every block holds a
/// posting of high frequency, so the whole list's block bounds say little, while the rows
/// that can lift a chunk far are few. Two words, as every [`TermList`] carries one.
#[derive(Clone, Copy)]
pub(crate) enum Tiers<'a> {
    /// A file's stored tiers: the file and the list's record.
    Stored(&'a SegPostings, &'a SplitRecord),
    Made(&'a Split),
}

impl<'a> Tiers<'a> {
    /// The lowest frequency in the tiers (the whole list is walked below it).
    pub(crate) fn cut(self) -> u32 {
        TIERS[0]
    }

    /// Its tiers as lists, lowest frequencies first (empty ones left out).
    pub(crate) fn tiers(self) -> impl Iterator<Item = TermList<'a>> {
        let parts = match self {
            Tiers::Stored(file, rec) => file.stored_tiers_of(rec),
            Tiers::Made(split) => split.parts(),
        };
        parts.into_iter().flatten().map(|t| TermList {
            pairs: t.pairs,
            blocks: t.blocks,
            df: t.pairs.len() as u32,
            max_tf: t.max_tf,
            min_len: t.min_len,
            hi: None,
        })
    }
}

/// Lists shorter than this are not split ([`Split`]).
pub(crate) const SPLIT_MIN: usize = 4096;
/// The frequencies a split's tiers start at: 2, 3, and 4 or more.
pub(super) const TIERS: [u32; 3] = [2, 3, 4];

/// The frequencies each tier holds.
pub(super) fn tier_ranges() -> impl Iterator<Item = std::ops::Range<u32>> {
    TIERS
        .iter()
        .enumerate()
        .map(|(i, &lo)| lo..TIERS.get(i + 1).copied().unwrap_or(u32::MAX))
}
/// A list is split only when its tiers hold at most this share of its postings (1/n): where
/// most rows hold the term more than once, the tiers bound little and cost memory.
pub(super) const SPLIT_SHARE: usize = 4;
/// The bytes every split of the process may hold together; a list that would pass it is not
/// split (and searched as before).
const SPLIT_MEMORY: usize = 256 << 20;
static SPLIT_USED: AtomicUsize = AtomicUsize::new(0);

/// A long list's [`Tiers`] made in memory, for a postings file of the first format (which has
/// none stored): made on a background thread once the segment is opened, or by the first
/// search that reads the list, within [`SPLIT_MEMORY`] for the process.
pub(crate) struct Split {
    /// One per frequency range of [`TIERS`], empty ones left out.
    tiers: Vec<Tier>,
    /// Bytes charged to a budget ([`SPLIT_MEMORY`]), given back when dropped.
    charged: usize,
    budget: &'static AtomicUsize,
}

impl Drop for Split {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.charged, Relaxed);
    }
}

struct Tier {
    pairs: Vec<[u32; 2]>,
    blocks: Vec<[u32; 3]>,
    max_tf: u32,
    min_len: u32,
}

impl Split {
    /// The tiers of `list` (rows of lengths `lens`), when it has postings of frequency 2 or
    /// more, at most 1/[`SPLIT_SHARE`] of them, and [`SPLIT_MEMORY`] has room for them.
    pub(super) fn of(list: TermList<'_>, lens: &[u32]) -> Option<Split> {
        Split::within(list, lens, &SPLIT_USED, SPLIT_MEMORY)
    }

    /// [`Split::of`], charging `budget` (bytes used) up to `limit`.
    pub(super) fn within(
        list: TermList<'_>,
        lens: &[u32],
        budget: &'static AtomicUsize,
        limit: usize,
    ) -> Option<Split> {
        let apart = list.pairs.iter().filter(|p| p[1] >= TIERS[0]).count();
        if apart == 0 || apart * SPLIT_SHARE > list.pairs.len() {
            return None;
        }
        // pairs, and a block summary per BLOCK pairs, in each tier
        let charged = apart * 8 + (apart / BLOCK + TIERS.len()) * 12;
        budget
            .fetch_update(Relaxed, Relaxed, |u| {
                u.checked_add(charged).filter(|t| *t <= limit)
            })
            .ok()?;
        let mut tiers = Vec::new();
        for range in tier_ranges() {
            let pairs: Vec<[u32; 2]> = list
                .pairs
                .iter()
                .filter(|p| range.contains(&p[1]))
                .copied()
                .collect();
            if pairs.is_empty() {
                continue;
            }
            let blocks: Vec<[u32; 3]> = pairs
                .chunks(BLOCK)
                .map(|c| {
                    let tf = c.iter().map(|p| p[1]).max().unwrap_or(0);
                    let len = c.iter().map(|p| lens[p[0] as usize]).min().unwrap_or(0);
                    [c[c.len() - 1][0], tf, len]
                })
                .collect();
            tiers.push(Tier {
                max_tf: blocks.iter().map(|b| b[1]).max().unwrap_or(0),
                min_len: blocks.iter().map(|b| b[2]).min().unwrap_or(0),
                pairs,
                blocks,
            });
        }
        Some(Split {
            tiers,
            charged,
            budget,
        })
    }

    /// Its tiers, as a search reads them.
    fn parts(&self) -> [Option<TierRef<'_>>; 3] {
        let mut parts = [None; 3];
        for (part, t) in parts.iter_mut().zip(&self.tiers) {
            *part = Some(TierRef {
                pairs: &t.pairs,
                blocks: &t.blocks,
                max_tf: t.max_tf,
                min_len: t.min_len,
            });
        }
        parts
    }

    pub(super) fn memory_bytes(&self) -> usize {
        self.tiers
            .iter()
            .map(|t| t.pairs.capacity() * 8 + t.blocks.capacity() * 12)
            .sum()
    }
}
