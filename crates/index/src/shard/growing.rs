//! The growing segment: the chunks written since the last seal, searched exactly.
use std::sync::Arc;

use crate::segment::{exact_search, top_live, Entry};
use crate::vector::{dot, dot_i8_rows};

/// The growing segment's chunks, and their vectors side by side in one buffer, so that the
/// exact scan every query makes of them reads memory in order instead of following three
/// pointers a chunk. Each vector is also kept as int8 codes (a quarter of the bytes): the scan
/// reads the codes, bounds each chunk's exact score from them, and computes the exact score
/// only of the chunks whose bound can still reach the top k (the result is exact all the same).
#[derive(Default)]
pub(super) struct Growing {
    entries: Vec<Arc<Entry>>,
    /// Row `i` is `entries[i]`'s vector; empty when their lengths differ (then each chunk's
    /// own vector is read).
    vectors: Vec<f32>,
    /// Row `i` is `entries[i]`'s vector as int8 codes, their step in `rows[i]`.
    codes: Vec<i8>,
    rows: Vec<RowCode>,
    /// The rows' length (of the first chunk's vector); None when a chunk's differed.
    dim: Option<usize>,
}

/// How a row's codes stand for its vector.
#[derive(Clone, Copy, Debug)]
struct RowCode {
    /// Units per code: `max |x| / 127` (1 for a zero vector).
    step: f32,
    /// Half the codes' absolute values summed, in units: about half the vector's L1 norm.
    half_l1: f32,
}

/// Quantizes `v` to int8 codes of `max |x| / 127` each (appended to `out`).
fn quantize_into(v: &[f32], out: &mut Vec<i8>) -> RowCode {
    let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let step = if max > 0.0 && max.is_finite() {
        max / 127.0
    } else {
        1.0
    };
    let scale = 1.0 / step;
    let mut sum = 0u32;
    out.extend(v.iter().map(|x| {
        let c = (x * scale).round().clamp(-127.0, 127.0) as i8;
        sum += c.unsigned_abs() as u32;
        c
    }));
    RowCode {
        step,
        half_l1: 0.5 * sum as f32 * step,
    }
}

/// A query as codes (widened to i16 for [`dot_i8_rows`]), with what bounds the error of its
/// scores from them.
struct QueryCode {
    codes: Vec<i16>,
    row: RowCode,
    /// What a row's step multiplies in the bound: half the query's L1 norm, and the f32
    /// sums' rounding per unit of the row's largest |x| (at most d ulps of the sum of
    /// |q_j v_j| <= |q|_1 max |v|, generously; max |v| = 127 steps).
    per_step: f32,
}

impl QueryCode {
    fn new(q: &[f32]) -> QueryCode {
        let mut codes = Vec::with_capacity(q.len());
        let row = quantize_into(q, &mut codes);
        let l1: f32 = q.iter().map(|x| x.abs()).sum();
        let ulps = 4.0 * q.len() as f32 * f32::EPSILON * l1;
        QueryCode {
            codes: codes.into_iter().map(i16::from).collect(),
            row,
            per_step: 0.5 * l1 + 127.0 * ulps,
        }
    }

    /// A row's score from its codes' dot product with the query's, and how far its exact
    /// score can be from it: each side's rounding is at most half a step a dimension,
    /// weighted by the other side's values.
    #[inline]
    fn score(&self, dot: i32, r: &RowCode) -> (f32, f32) {
        let approx = dot as f32 * (self.row.step * r.step);
        let bound = r.half_l1 * self.row.step + self.per_step * r.step + 1e-6;
        (approx, bound)
    }
}

impl std::fmt::Debug for Growing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Growing")
            .field("chunks", &self.entries.len())
            .field("dim", &self.dim)
            .finish()
    }
}

impl std::ops::Deref for Growing {
    type Target = [Arc<Entry>];

    fn deref(&self) -> &[Arc<Entry>] {
        &self.entries
    }
}

impl Growing {
    pub(super) fn push(&mut self, e: Arc<Entry>) {
        let v = e.vector();
        if self.entries.is_empty() {
            self.dim = Some(v.len());
        }
        match self.dim {
            Some(d) if d == v.len() && v.iter().all(|x| x.is_finite()) => {
                self.vectors.extend_from_slice(v);
                let row = quantize_into(v, &mut self.codes);
                self.rows.push(row);
            }
            _ => {
                self.dim = None;
                self.vectors = Vec::new();
                self.codes = Vec::new();
                self.rows = Vec::new();
            }
        }
        self.entries.push(e);
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.vectors.clear();
        self.codes.clear();
        self.rows.clear();
        self.dim = None;
    }

    /// The exact top `k` live chunks by dot product with `q`, best first.
    pub(super) fn search(
        &self,
        q: &[f32],
        k: usize,
        live: &dyn Fn(&Entry) -> bool,
    ) -> Vec<(f32, Arc<Entry>)> {
        match self.dim.filter(|&d| d > 0 && d == q.len()) {
            Some(_) if q.iter().all(|x| x.is_finite()) => self.bounded_scan(q, k, live),
            Some(d) => top_live(
                &self.entries,
                self.vectors.chunks_exact(d).map(|v| dot(q, v)),
                k,
                live,
            ),
            None => exact_search(&self.entries, q, k, live),
        }
    }

    /// The exact top `k` from the codes: each row's exact score `dot(q, v)` lies within a
    /// bound of what the codes give ([`QueryCode::score`]). Rows are taken by their upper
    /// bound, best first, and scored exactly until the next one's upper bound is below the
    /// k-th best live exact score.
    fn bounded_scan(
        &self,
        q: &[f32],
        k: usize,
        live: &dyn Fn(&Entry) -> bool,
    ) -> Vec<(f32, Arc<Entry>)> {
        let d = q.len();
        let qq = QueryCode::new(q);
        let mut dots = Vec::new();
        dot_i8_rows(&qq.codes, &self.codes, &mut dots);
        let mut upper: Vec<(f32, u32)> = dots
            .iter()
            .zip(&self.rows)
            .enumerate()
            .map(|(i, (&dot, r))| {
                let (approx, bound) = qq.score(dot, r);
                (approx + bound, i as u32)
            })
            .collect();
        let better = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        // the k best live exact scores so far, best first
        let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
        let (mut from, mut round) = (0, (2 * k).max(16));
        'rounds: while from < upper.len() {
            let rest = &mut upper[from..];
            let n = round.min(rest.len());
            if n < rest.len() {
                rest.select_nth_unstable_by(n - 1, better);
            }
            rest[..n].sort_unstable_by(better);
            for &(ub, i) in &rest[..n] {
                if best.len() == k && best.last().is_some_and(|w| ub < w.0) {
                    break 'rounds;
                }
                let e = &self.entries[i as usize];
                if !live(e) {
                    continue;
                }
                let s = dot(q, &self.vectors[i as usize * d..(i as usize + 1) * d]);
                let at = best.partition_point(|b| better(b, &(s, i)).is_lt());
                if at < k {
                    best.insert(at, (s, i));
                    best.truncate(k);
                }
            }
            from += n;
            round *= 2;
        }
        best.into_iter()
            .map(|(s, i)| (s, self.entries[i as usize].clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::tests::entry;

    /// The buffer's scan finds what a scan of each chunk's own vector finds, before and after
    /// a clear, and with a chunk of another length among them (then by each chunk's vector).
    #[test]
    fn the_buffer_scans_like_the_chunks_vectors() {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(9);
        let mut g = Growing::default();
        let q: Vec<f32> = (0..6).map(|_| r.gen_range(-1.0..1.0)).collect();
        let live = |e: &Entry| e.seq % 5 != 0;
        let ids = |v: Vec<(f32, Arc<Entry>)>| -> Vec<(f32, u64)> {
            v.into_iter().map(|(s, e)| (s, e.seq)).collect()
        };
        for round in 0..2 {
            for i in 0..200 {
                g.push(entry(
                    round * 1000 + i,
                    (0..6).map(|_| r.gen_range(-1.0..1.0)).collect(),
                ));
            }
            assert_eq!(g.vectors.len(), 200 * 6, "every row in the buffer");
            for k in [1, 10, 50] {
                assert_eq!(
                    ids(g.search(&q, k, &live)),
                    ids(exact_search(&g, &q, k, &live))
                );
            }
            g.clear();
            assert!(g.is_empty() && g.vectors.is_empty());
        }
        g.push(entry(1, vec![0.5; 6]));
        g.push(entry(2, vec![1.0; 3]));
        g.push(entry(3, vec![0.9; 6]));
        assert!(g.vectors.is_empty(), "lengths differ: no buffer");
        let found: Vec<u64> = ids(g.search(&q, 3, &|_| true))
            .iter()
            .map(|x| x.1)
            .collect();
        let want: Vec<u64> = ids(exact_search(&g, &q, 3, &|_| true))
            .iter()
            .map(|x| x.1)
            .collect();
        assert_eq!(found, want);
    }

    /// The codes' score of a row is within its bound of the exact score, for unit vectors of
    /// 384 dimensions and for unnormalized ones with one large value.
    #[test]
    fn the_codes_bound_the_exact_score() {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(3);
        for round in 0..400 {
            let d = if round % 2 == 0 { 384 } else { 7 };
            let mut v: Vec<f32> = (0..d).map(|_| r.gen_range(-1.0..1.0)).collect();
            let mut q: Vec<f32> = (0..d).map(|_| r.gen_range(-1.0..1.0)).collect();
            if round % 3 == 0 {
                crate::vector::normalize(&mut v);
                crate::vector::normalize(&mut q);
            } else {
                v[0] = 40.0;
            }
            let mut codes = Vec::new();
            let row = quantize_into(&v, &mut codes);
            let qq = QueryCode::new(&q);
            let mut dots = Vec::new();
            dot_i8_rows(&qq.codes, &codes, &mut dots);
            let (approx, bound) = qq.score(dots[0], &row);
            let exact = dot(&q, &v);
            assert!(
                (exact - approx).abs() <= bound,
                "round {round}: exact {exact} approx {approx} bound {bound}"
            );
            if round % 3 == 0 {
                assert!(bound < 0.05, "a unit vector's bound is small: {bound}");
            }
        }
    }

    /// Many rows nearly as good as each other (their bounds overlap), most of the best dead:
    /// the scan from the codes still returns exactly what a scan of every live vector does.
    #[test]
    fn near_ties_and_dead_rows_still_give_the_exact_top_k() {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(11);
        let base: Vec<f32> = (0..384).map(|_| r.gen_range(-1.0..1.0)).collect();
        let mut g = Growing::default();
        for i in 0..1500u64 {
            // a tenth of the rows are tiny perturbations of the query's direction
            let eps = if i % 10 == 0 { 0.002 } else { 1.0 };
            let mut v: Vec<f32> = base
                .iter()
                .map(|x| x + eps * r.gen_range(-1.0f32..1.0))
                .collect();
            crate::vector::normalize(&mut v);
            g.push(entry(i, v));
        }
        assert_eq!(g.codes.len(), 1500 * 384);
        let mut q = base.clone();
        crate::vector::normalize(&mut q);
        let live = |e: &Entry| e.seq % 20 != 0;
        let ids = |v: Vec<(f32, Arc<Entry>)>| -> Vec<(f32, u64)> {
            v.into_iter().map(|(s, e)| (s, e.seq)).collect()
        };
        for k in [1, 10, 100, 200] {
            let got = ids(g.search(&q, k, &live));
            assert_eq!(got.len(), k);
            assert_eq!(got, ids(exact_search(&g, &q, k, &live)), "k {k}");
        }
    }
}
