//! The walk: a beam search of one level with a reused visited set and prefetched codes, the
//! descent from the entry point, and a search's re-scoring of its beam with exact vectors.
use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use super::*;

/// Candidates re-scored beyond `k` at most (at most `3k` when that is more).
const RESCORE_EXTRA: usize = 20;
/// How far behind the k-th nearest by the codes a candidate is still re-scored, in standard
/// deviations of the codes' error in a dot product (see [`rescore_margin`]).
const RESCORE_SIGMAS: f32 = 10.0;
/// The beam of a search on the levels above level 0: narrower than the build's, which made a
/// graph whose upper levels lead a narrower beam down as well. On `bench shard`'s clustered set
/// (`upper_beam` example, 1,000 queries) 6 costs 0.82x the time of 16 at 100k and 1M vectors
/// with the same recall and the same worst query at every `ef`; 4 stranded none either, 3
/// left queries with none of their ten neighbours.
pub const SEARCH_UPPER_BEAM: usize = 6;

/// A walk of a mapped graph that waited for this many reads from disk (major page faults)
/// makes the next searches ask for their pages ahead. Asking costs a system call a node
/// (~1.5 us: a 1M-node walk at a beam of 48 then takes ~2.4 ms where it took 0.2 ms in the page
/// cache), so a few misses are waited for one by one instead.
const COLD_WALK_FAULTS: u64 = 16;

/// How a search re-scores the nearest of its beam with the vectors' exact values.
pub trait Rescore {
    /// The exact dot product of the query with node `i`'s vector.
    fn score(&self, i: u32) -> f32;
    /// The nodes about to be scored, all at once, so that their reads can be asked for
    /// together (they are at random places in memory, most of them misses).
    fn prefetch(&self, _ids: &[u32]) {}
}

impl<F: Fn(u32) -> f32> Rescore for F {
    fn score(&self, i: u32) -> f32 {
        self(i)
    }
}

/// A candidate: distance and node.
#[derive(Debug, Clone, Copy)]
pub(super) struct Near {
    pub(super) d: f32,
    pub(super) id: u32,
}

impl PartialEq for Near {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Near {}
impl PartialOrd for Near {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Near {
    fn cmp(&self, o: &Self) -> Ordering {
        self.d.total_cmp(&o.d).then(self.id.cmp(&o.id))
    }
}

/// Per-thread search state, reused across searches.
#[derive(Default)]
pub(super) struct Scratch {
    /// One bit a node: a search touches few of a large graph's nodes at random, so the set
    /// is kept small (a cold cache misses on a line of 512 nodes, not of 16) and only the
    /// words set since the last reset are cleared.
    visited: Vec<u64>,
    dirty: Vec<u32>,
    candidates: BinaryHeap<Reverse<Near>>,
    best: BinaryHeap<Near>,
    /// Whether this search asks the kernel for the pages of the nodes it is about to read (a
    /// graph walked from its file while it is not in memory).
    ahead: bool,
}

impl Scratch {
    pub(super) fn reset(&mut self, n: usize) {
        let words = n.div_ceil(64);
        if self.visited.len() < words {
            self.visited.resize(words, 0);
        }
        for &w in &self.dirty {
            self.visited[w as usize] = 0;
        }
        self.dirty.clear();
        self.candidates.clear();
        self.best.clear();
    }

    /// Marks `i` visited; false when it already was.
    #[inline]
    pub(super) fn visit(&mut self, i: u32) -> bool {
        let (w, bit) = ((i >> 6) as usize, 1u64 << (i & 63));
        let word = &mut self.visited[w];
        if *word & bit != 0 {
            return false;
        }
        if *word == 0 {
            self.dirty.push(w as u32);
        }
        *word |= bit;
        true
    }
}

thread_local! {
    pub(super) static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl Hnsw {
    /// The `beam` nearest found on level `down_to + 1`, going down from the entry point with
    /// that beam on each level from the entry's to there (the entry point alone when it is not
    /// above `down_to`): where the beam of level `down_to` starts.
    pub(super) fn down(
        &self,
        dist: &impl Fn(u32) -> f32,
        entry: (u32, usize),
        down_to: usize,
        beam: usize,
        s: &mut Scratch,
        buf: &mut Vec<u32>,
    ) -> Vec<Near> {
        let mut starts = vec![Near {
            d: dist(entry.0),
            id: entry.0,
        }];
        for level in (down_to + 1..=entry.1).rev() {
            starts = self.search_level(dist, &starts, beam, level, s, buf);
        }
        starts
    }

    /// The beam search of one level: the `ef` nearest found from `starts`, nearest first.
    pub(super) fn search_level(
        &self,
        dist: &impl Fn(u32) -> f32,
        starts: &[Near],
        ef: usize,
        level: usize,
        s: &mut Scratch,
        buf: &mut Vec<u32>,
    ) -> Vec<Near> {
        s.reset(self.len);
        for &p in starts {
            if s.visit(p.id) {
                s.candidates.push(Reverse(p));
                s.best.push(p);
            }
        }
        while s.best.len() > ef {
            s.best.pop();
        }
        while let Some(Reverse(c)) = s.candidates.pop() {
            if s.best.len() >= ef && s.best.peek().is_some_and(|w| c.d > w.d) {
                break;
            }
            self.neighbours(c.id, level, buf);
            // the unvisited ones: every vector asked for at once (their misses overlap), then
            // scored
            buf.retain(|&e| s.visit(e));
            if s.ahead {
                for &e in buf.iter() {
                    self.read_code_ahead(e);
                }
            }
            for &e in buf.iter() {
                self.prefetch(e);
            }
            for &e in buf.iter() {
                let d = dist(e);
                if s.best.len() < ef || s.best.peek().is_some_and(|w| d < w.d) {
                    let n = Near { d, id: e };
                    if level == 0 {
                        if s.ahead {
                            self.read_row_ahead(e);
                        }
                        self.prefetch_row(e);
                    }
                    s.candidates.push(Reverse(n));
                    s.best.push(n);
                    if s.best.len() > ef {
                        s.best.pop();
                    }
                }
            }
        }
        let mut out: Vec<Near> = s.best.drain().collect();
        out.sort_unstable();
        out
    }

    /// [`Hnsw::search_with`], ranked by the codes' dot products.
    pub fn search(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        accept: &dyn Fn(u32) -> bool,
    ) -> Vec<(f32, u32)> {
        self.search_with(q, k, ef, accept, None)
    }

    /// The (approximately) `k` nearest nodes to the unit vector `q`, with a beam of
    /// `max(ef, k)`, keeping only nodes `accept` takes; as (dot, node), nearest first. The
    /// graph is walked with int8 codes; `exact(i)`, when given, re-scores the beam (the dot of
    /// `q` with node `i`'s own vector). When the beam holds fewer than `k` accepted nodes it
    /// is widened (up to the whole graph).
    pub fn search_with(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        accept: &dyn Fn(u32) -> bool,
        exact: Option<&dyn Rescore>,
    ) -> Vec<(f32, u32)> {
        self.search_in(q, k, ef, SEARCH_UPPER_BEAM, accept, exact)
    }

    /// [`Hnsw::search_with`] with a beam of `upper_beam` on the levels above level 0 (at least
    /// 1: one greedy path) instead of [`SEARCH_UPPER_BEAM`].
    pub fn search_in(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        upper_beam: usize,
        accept: &dyn Fn(u32) -> bool,
        exact: Option<&dyn Rescore>,
    ) -> Vec<(f32, u32)> {
        let upper_beam = upper_beam.max(1);
        let Some(entry) = self.entry() else {
            return Vec::new();
        };
        if k == 0 {
            return Vec::new();
        }
        let mut buf = Vec::with_capacity(self.m0());
        // walk the graph with int8 codes, then re-score the beam exactly
        let code = quantize(q, self.scale);
        let inv = 1.0 / (self.scale * self.scale);
        let dist = |e: u32| 1.0 - dot_i8(&code, self.code(e)) as f32 * inv;
        let mut ef = ef.max(k);
        let rescore = (3 * k).max(k + RESCORE_EXTRA);
        let margin = rescore_margin(q, &code, self.scale);
        // a graph walked from its mapped file counts its walks' reads from disk: a walk that
        // waited for many makes the next searches ask for their nodes' pages ahead
        let mut watch = self.codes.is_mapped().then(|| self.cold.start());
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            s.ahead = watch.as_ref().is_some_and(|w| w.ahead());
            let starts = self.down(&dist, entry, 0, upper_beam, &mut s, &mut buf);
            loop {
                let found = self.search_level(&dist, &starts, ef, 0, &mut s, &mut buf);
                if let Some(w) = watch.take() {
                    self.cold.finish(w, COLD_WALK_FAULTS);
                }
                let seen = found.len();
                // re-score the nearest few by the codes: the exact vectors are read at random
                // places in memory (or on disk), so only the k nearest and those the codes'
                // error could lift among them, all asked for before the first is scored
                let near = |nodes: &mut dyn Iterator<Item = Near>| -> Vec<Near> {
                    let mut kth = f32::INFINITY;
                    let mut kept = Vec::with_capacity(rescore);
                    for n in nodes.take(rescore) {
                        if kept.len() >= k && n.d > kth + margin {
                            break;
                        }
                        kept.push(n);
                        if kept.len() == k {
                            kth = n.d;
                        }
                    }
                    kept
                };
                if let Some(x) = exact {
                    let ids: Vec<u32> = near(&mut found.iter().copied())
                        .iter()
                        .map(|n| n.id)
                        .collect();
                    x.prefetch(&ids);
                }
                let mut out: Vec<(f32, u32)> =
                    near(&mut found.into_iter().filter(|n| accept(n.id)))
                        .into_iter()
                        .map(|n| (exact.map_or(1.0 - n.d, |x| x.score(n.id)), n.id))
                        .collect();
                out.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                out.truncate(k);
                if out.len() >= k || seen < ef || ef >= self.len {
                    return out;
                }
                ef = (ef * 4).min(self.len);
            }
        })
    }
}

/// How far behind the k-th nearest candidate by the codes one can be and still be among the
/// k nearest by the exact vectors, with [`RESCORE_SIGMAS`] standard deviations to spare: codes
/// `round(x * scale)` err by up to half a step in each component, uniformly, so a dot product
/// with a unit vector errs by `step * |q| / sqrt(12)` from the vector's rounding; the query's
/// own error (its rounding, and anything clamped) is measured and spread over the dimensions;
/// two candidates' errors can go opposite ways (`sqrt(2)`).
pub(super) fn rescore_margin(q: &[f32], code: &[i8], scale: f32) -> f32 {
    if scale.is_nan() || scale <= 0.0 || q.is_empty() {
        return f32::INFINITY;
    }
    let step = 1.0 / scale;
    let (mut norm, mut err) = (0.0f32, 0.0f32);
    for (&x, &c) in q.iter().zip(code) {
        norm += x * x;
        let e = x - c as f32 * step;
        err += e * e;
    }
    let var = step * step * norm / 12.0 + err / q.len() as f32;
    RESCORE_SIGMAS * std::f32::consts::SQRT_2 * var.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector::normalize;

    fn unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        crate::eval::clustered(n, dim, 8, 0.3, 1, seed)
            .into_iter()
            .flat_map(|mut v| {
                normalize(&mut v);
                v
            })
            .collect()
    }

    /// Two candidates' code dot products err against their exact ones by less than the
    /// margin between them (so a candidate left out could not have been among the k
    /// nearest), and the margin is narrow enough to leave most of the beam out.
    #[test]
    fn the_margin_covers_the_codes_error_and_stays_narrow() {
        let dim = 384;
        let data = unit_vectors(3000, dim, 3);
        let scale = quant_scale(&data[..1000 * dim]);
        let codes = quantize(&data, scale);
        for (qi, q) in unit_vectors(20, dim, 4).chunks(dim).enumerate() {
            let qc = quantize(q, scale);
            let margin = rescore_margin(q, &qc, scale);
            assert!(margin > 0.0 && margin < 0.05, "query {qi}: margin {margin}");
            let worst = data
                .chunks(dim)
                .zip(codes.chunks(dim))
                .map(|(x, c)| {
                    let exact = crate::vector::dot(q, x);
                    let coded = dot_i8(&qc, c) as f32 / (scale * scale);
                    (exact - coded).abs()
                })
                .fold(0.0f32, f32::max);
            assert!(
                2.0 * worst < margin,
                "query {qi}: error {worst}, margin {margin}"
            );
        }
    }

    /// A query with components past the codes' range (clamped) gets a wider margin.
    #[test]
    fn a_clamped_query_widens_the_margin() {
        let dim = 64;
        let data = unit_vectors(500, dim, 5);
        let scale = quant_scale(&data);
        let mut q = vec![0.0f32; dim];
        q[0] = 1.0;
        let qc = quantize(&q, scale);
        let inside = data[..dim].to_vec();
        let qi = quantize(&inside, scale);
        assert!(rescore_margin(&q, &qc, scale) > 2.0 * rescore_margin(&inside, &qi, scale));
        assert_eq!(rescore_margin(&q, &qc, 0.0), f32::INFINITY);
    }
}
