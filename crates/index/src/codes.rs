//! Int8 codes of a run of vectors, each row with its own step, and the scan that gives the
//! exact top k from them: every row's dot product with the query comes from the codes (a
//! quarter of f32's bytes, read in order), bounded by how far rounding can move it, and only
//! the rows whose bound can still reach the top k are scored exactly. The growing segment
//! scans its chunks so, and a sealed segment until its graph is built.
use std::sync::Arc;

use crate::segment::Entry;
use crate::vector::dot_i8_rows;

/// The codes of consecutive rows of one length.
#[derive(Default)]
pub(crate) struct RowCodes {
    /// Row `i`'s codes at `i * dim`, their step in `rows[i]`.
    codes: Vec<i8>,
    rows: Vec<RowCode>,
}

impl std::fmt::Debug for RowCodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowCodes")
            .field("rows", &self.rows.len())
            .finish()
    }
}

impl RowCodes {
    /// Appends a row (its length must be every other row's).
    pub(crate) fn push(&mut self, v: &[f32]) {
        let row = quantize_into(v, &mut self.codes);
        self.rows.push(row);
    }

    /// Rows held.
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// The exact top `k` live rows by `exact(i)` (the dot product of `q` with row `i`'s own
    /// vector), best first; row `i` is `entries[i]`. Each row's exact score lies within a
    /// bound of what the codes give ([`QueryCode::score`]): rows are taken by their upper
    /// bound, best first, and scored exactly until the next one's upper bound is below the
    /// k-th best live exact score, or below `floor` (a k-th best score found elsewhere: rows
    /// that cannot reach it are not wanted). `q` must be finite and of the rows' length.
    pub(crate) fn top_k(
        &self,
        q: &[f32],
        k: usize,
        floor: Option<f32>,
        entries: &[Arc<Entry>],
        exact: impl Fn(usize) -> f32,
        live: &dyn Fn(&Entry) -> bool,
    ) -> Vec<(f32, Arc<Entry>)> {
        let floor = floor.unwrap_or(f32::NEG_INFINITY);
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
                if ub < floor || (best.len() == k && best.last().is_some_and(|w| ub < w.0)) {
                    break 'rounds;
                }
                if !live(&entries[i as usize]) {
                    continue;
                }
                let s = exact(i as usize);
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
            .map(|(s, i)| (s, entries[i as usize].clone()))
            .collect()
    }
}

/// How a row's codes stand for its vector.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowCode {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector::dot;

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
}
