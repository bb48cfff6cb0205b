//! A term's place in its postings during a search (its bounds per list and per block), and the
//! best rows found so far.
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::*;

/// A row's place in the ranking: its source, then the row.
pub(super) fn key(source: usize, row: u32) -> u64 {
    ((source as u64) << 32) | row as u64
}

/// A query term's place in its postings during a search.
pub(super) struct Cursor<'a> {
    list: TermList<'a>,
    at: usize,
    pub(super) idf: f32,
    /// Its bound over the whole list.
    pub(super) bound: f32,
    /// Its position in the plan's terms.
    pub(super) pos: usize,
    /// The block [`Cursor::block_bound`] last summed up (`usize::MAX`: none yet), its bound
    /// and the length part of term_score's denominator at its shortest length.
    blk: usize,
    blk_bound: f32,
    blk_norm: f32,
    /// Postings of this frequency or more are passed over (another cursor walks them, see
    /// [`crate::postings::Split`]).
    cap: u32,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(list: TermList<'a>, idf: f32, pos: usize, plan: &Plan) -> Cursor<'a> {
        Cursor::capped(list, idf, pos, plan, u32::MAX)
    }

    /// A cursor over the postings of `list` whose frequency is below `cap` (above 1).
    pub(super) fn capped(
        list: TermList<'a>,
        idf: f32,
        pos: usize,
        plan: &Plan,
        cap: u32,
    ) -> Cursor<'a> {
        let (tf, len) = list.bound();
        Cursor {
            list,
            at: 0,
            idf,
            bound: plan.bound(idf, tf.min(cap - 1), len),
            pos,
            blk: usize::MAX,
            blk_bound: 0.0,
            blk_norm: 0.0,
            cap,
        }
    }

    /// The bound of the cursor's block (its highest frequency at its shortest length),
    /// summed up once a block rather than at every row.
    pub(super) fn block_bound(&mut self, plan: &Plan) -> f32 {
        let b = self.block_at();
        if b != self.blk {
            let [_, tf, len] = self.list.blocks[b];
            self.blk = b;
            self.blk_bound = plan.bound(self.idf, tf.min(self.cap - 1), len);
            self.blk_norm = K1 * (1.0 - B + B * len as f32 / plan.avg);
        }
        self.blk_bound
    }

    /// The most the term adds at the current posting's frequency in a row of its block's
    /// shortest length or longer (after [`Cursor::block_bound`] for this block), a hair above
    /// as [`Plan::bound`].
    pub(super) fn row_bound(&self) -> f32 {
        let tf = self.tf() as f32;
        self.idf * tf * (K1 + 1.0) / (tf + self.blk_norm) * (1.0 + 2e-5)
    }

    /// The most the cursor's postings from its place up to row `end` (not included) can
    /// add: the highest bound of its blocks from its own up to the one that reaches `end`.
    pub(super) fn bound_before(&self, plan: &Plan, end: u64) -> f32 {
        if self.row().is_none() {
            return 0.0;
        }
        let blocks = self.list.blocks;
        let mut most = 0.0f32;
        for &[last, tf, len] in &blocks[self.block_at()..] {
            most = most.max(plan.bound(self.idf, tf.min(self.cap - 1), len));
            if last as u64 >= end {
                break;
            }
        }
        most
    }

    /// Whether at most `most` postings from the cursor's place on are at rows below `end`
    /// (dead ones counted): one read, `most` postings ahead.
    pub(super) fn few_before(&self, end: u64, most: usize) -> bool {
        self.list
            .pairs
            .get(self.at.saturating_add(most))
            .is_none_or(|p| p[0] as u64 >= end)
    }

    pub(super) fn row(&self) -> Option<u32> {
        self.list.pairs.get(self.at).map(|p| p[0])
    }

    pub(super) fn tf(&self) -> u32 {
        self.list.pairs[self.at][1]
    }

    /// The summary of the block the cursor is in: (last row, highest frequency, shortest
    /// length).
    pub(super) fn block(&self) -> [u32; 3] {
        self.list.blocks[self.block_at()]
    }

    /// The index of the block the cursor is in (a list summarised as one block: that one).
    fn block_at(&self) -> usize {
        (self.at / BLOCK).min(self.list.blocks.len() - 1)
    }

    /// Past removed slots (and postings at or above the cap).
    pub(super) fn skip_dead(&mut self) {
        // (tf == 0 or tf >= cap, in one comparison: cap is above 1)
        let above = self.cap - 1;
        while self
            .list
            .pairs
            .get(self.at)
            .is_some_and(|p| p[1].wrapping_sub(1) >= above)
        {
            self.at += 1;
        }
    }

    pub(super) fn advance(&mut self) {
        self.at += 1;
        self.skip_dead();
    }

    /// Moves to the first live posting at or after `row`; whether it is at `row`. A list
    /// with block summaries first finds the block by their last rows when `row` is past the
    /// cursor's block (galloping over the summaries: a few cache lines for a whole list);
    /// then the posting is found by galloping from the cursor (or the block's start) within
    /// the block (or the list), then binary search.
    pub(super) fn seek(&mut self, row: u32) -> bool {
        let list = self.list.pairs;
        if self.row().is_none_or(|r| r >= row) {
            return self.row() == Some(row);
        }
        let blocks = self.list.blocks;
        let (mut lo, end) = if blocks.len() > 1 && blocks.len() == list.len().div_ceil(BLOCK) {
            let mut b = self.at / BLOCK;
            if blocks[b][0] < row {
                let mut step = 1;
                while b + step < blocks.len() && blocks[b + step][0] < row {
                    b += step;
                    step *= 2;
                }
                let end = (b + step + 1).min(blocks.len());
                b += blocks[b..end].partition_point(|x| x[0] < row);
                if b == blocks.len() {
                    self.at = list.len();
                    return false;
                }
            }
            (self.at.max(b * BLOCK), ((b + 1) * BLOCK).min(list.len()))
        } else {
            (self.at, list.len())
        };
        // galloping from `lo` (the cursor, below `row`; or its block's first posting, which
        // may be at or past it: then the search ends there), then binary search
        let mut step = 1;
        while lo + step < end && list[lo + step][0] < row {
            lo += step;
            step *= 2;
        }
        let hi = (lo + step + 1).min(end);
        self.at = lo + list[lo..hi].partition_point(|p| p[0] < row);
        self.skip_dead();
        self.row() == Some(row)
    }
}

/// The best `k` scored rows so far: a min-heap with the worst (lower score, higher key) on top.
pub(super) struct TopK {
    heap: BinaryHeap<Reverse<Ranked>>,
    pub(super) k: usize,
}

impl TopK {
    pub(super) fn new(k: usize) -> TopK {
        TopK {
            heap: BinaryHeap::with_capacity(k + 1),
            k,
        }
    }

    /// The k-th best score, once there are k.
    pub(super) fn kth(&self) -> Option<f32> {
        (self.heap.len() == self.k).then(|| self.heap.peek().map_or(f32::MIN, |w| w.0.score))
    }

    /// Whether `r` would be kept.
    pub(super) fn accepts(&self, r: &Ranked) -> bool {
        self.heap.len() < self.k || self.heap.peek().is_some_and(|w| *r > w.0)
    }

    /// Keeps `r` if it is among the best k so far; whether it was kept.
    pub(super) fn offer(&mut self, r: Ranked) -> bool {
        if self.heap.len() < self.k {
            self.heap.push(Reverse(r));
        } else if self.heap.peek().is_some_and(|w| r > w.0) {
            self.heap.pop();
            self.heap.push(Reverse(r));
        } else {
            return false;
        }
        true
    }

    /// (key, score), best first (ties: lower key first).
    pub(super) fn into_sorted(self) -> Vec<(u64, f32)> {
        let mut out: Vec<(u64, f32)> = self
            .heap
            .into_iter()
            .map(|r| (r.0.key, r.0.score))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }
}

/// A scored row: ordered by score, then the lower key ranks higher.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Ranked {
    pub(super) score: f32,
    pub(super) key: u64,
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Ranked {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&o.score).then(o.key.cmp(&self.key))
    }
}
