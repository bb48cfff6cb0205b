//! The growing segment: the chunks written since the last seal, searched exactly.
use std::sync::Arc;

use crate::codes::RowCodes;
use crate::segment::{exact_search, top_live, Entry};
use crate::vector::dot;

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
    /// Row `i` is `entries[i]`'s vector as int8 codes (empty with `vectors`).
    codes: RowCodes,
    /// The rows' length (of the first chunk's vector); None when a chunk's differed.
    dim: Option<usize>,
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
                self.codes.push(v);
            }
            _ => {
                self.dim = None;
                self.vectors = Vec::new();
                self.codes = RowCodes::default();
            }
        }
        self.entries.push(e);
    }

    /// The chunks' codes (row `i` is chunk `i`'s), when every chunk's vector had one length:
    /// what a sealed segment of these chunks scans until its graph is built. The growing
    /// segment keeps none afterwards (it is cleared next).
    pub(super) fn take_codes(&mut self) -> Option<RowCodes> {
        match self.dim {
            Some(d) if d > 0 && self.codes.len() == self.entries.len() => {
                Some(std::mem::take(&mut self.codes))
            }
            _ => None,
        }
    }

    /// The exact top `k` live chunks by dot product with `q`, best first.
    #[cfg(test)]
    pub(super) fn search(
        &self,
        q: &[f32],
        k: usize,
        live: &dyn Fn(&Entry) -> bool,
    ) -> Vec<(f32, Arc<Entry>)> {
        self.search_above(q, k, None, live)
    }

    /// [`Growing::search`] of only the chunks that may score `floor` or more (a k-th best
    /// score found elsewhere); those it returns are still the exact best of them. Only the
    /// buffer's scan by codes uses the floor.
    pub(super) fn search_above(
        &self,
        q: &[f32],
        k: usize,
        floor: Option<f32>,
        live: &dyn Fn(&Entry) -> bool,
    ) -> Vec<(f32, Arc<Entry>)> {
        match self.dim.filter(|&d| d > 0 && d == q.len()) {
            Some(d)
                if q.iter().all(|x| x.is_finite()) && self.codes.len() == self.entries.len() =>
            {
                let exact = |i: usize| dot(q, &self.vectors[i * d..(i + 1) * d]);
                self.codes.top_k(q, k, floor, &self.entries, exact, live)
            }
            Some(d) => top_live(
                &self.entries,
                self.vectors.chunks_exact(d).map(|v| dot(q, v)),
                k,
                live,
            ),
            None => exact_search(&self.entries, q, k, live),
        }
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
        let live = |e: &Entry| !e.seq.is_multiple_of(5);
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
            g = Growing::default();
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

    /// `n` rows of 384 dims, row `i` a random direction perturbed by up to `eps(i)` a
    /// dimension (then at unit length), and that direction as the query.
    fn around_a_query(seed: u64, n: u64, eps: impl Fn(u64) -> f32) -> (Growing, Vec<f32>) {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let base: Vec<f32> = (0..384).map(|_| r.gen_range(-1.0..1.0)).collect();
        let mut g = Growing::default();
        for i in 0..n {
            let e = eps(i);
            let mut v: Vec<f32> = base
                .iter()
                .map(|x| x + e * r.gen_range(-1.0f32..1.0))
                .collect();
            crate::vector::normalize(&mut v);
            g.push(entry(i, v));
        }
        let mut q = base;
        crate::vector::normalize(&mut q);
        (g, q)
    }

    /// Many rows nearly as good as each other (their bounds overlap), most of the best dead:
    /// the scan from the codes still returns exactly what a scan of every live vector does.
    #[test]
    fn near_ties_and_dead_rows_still_give_the_exact_top_k() {
        // a tenth of the rows are tiny perturbations of the query's direction
        let (g, q) = around_a_query(11, 1500, |i| if i % 10 == 0 { 0.002 } else { 1.0 });
        assert_eq!(g.codes.len(), 1500);
        let live = |e: &Entry| !e.seq.is_multiple_of(20);
        let ids = |v: Vec<(f32, Arc<Entry>)>| -> Vec<(f32, u64)> {
            v.into_iter().map(|(s, e)| (s, e.seq)).collect()
        };
        for k in [1, 10, 100, 200] {
            let got = ids(g.search(&q, k, &live));
            assert_eq!(got.len(), k);
            assert_eq!(got, ids(exact_search(&g, &q, k, &live)), "k {k}");
        }
    }

    /// A floor (the k-th best score of segments searched before) leaves out rows that cannot
    /// reach it without losing any that do: the rows at or above it are the exact top k's,
    /// and fewer rows are asked for liveness and scored exactly than without it.
    #[test]
    fn a_floor_skips_only_rows_that_cannot_reach_it() {
        use std::cell::Cell;
        let (g, q) = around_a_query(12, 2000, |i| 0.05 + (i % 100) as f32 * 0.02);
        let asked = Cell::new(0usize);
        let live = |e: &Entry| {
            asked.set(asked.get() + 1);
            !e.seq.is_multiple_of(7)
        };
        let ids = |v: Vec<(f32, Arc<Entry>)>| -> Vec<(f32, u64)> {
            v.into_iter().map(|(s, e)| (s, e.seq)).collect()
        };
        for k in [10, 100] {
            let want = ids(exact_search(&g, &q, k, &|e| e.seq % 7 != 0));
            asked.set(0);
            assert_eq!(ids(g.search_above(&q, k, None, &live)), want);
            let unfloored = asked.get();
            for at in [0, k / 2, k - 1] {
                // a floor at the score of the exact top k's row `at`, and just above it
                for floor in [want[at].0, want[at].0 + 1e-6] {
                    asked.set(0);
                    let got = ids(g.search_above(&q, k, Some(floor), &live));
                    let above = |v: &[(f32, u64)]| -> Vec<(f32, u64)> {
                        v.iter().copied().filter(|h| h.0 >= floor).collect()
                    };
                    assert_eq!(above(&got), above(&want), "k {k}, floor at row {at}");
                    assert!(got.iter().all(|h| want.contains(h)), "k {k}, row {at}");
                    // never more rows; fewer when the floor is the best row's score
                    assert!(
                        asked.get() <= unfloored && (at > 0 || asked.get() < unfloored),
                        "k {k}, floor at row {at}: {} rows asked, {unfloored} without",
                        asked.get()
                    );
                }
            }
            // a floor above every row: nothing is scored
            asked.set(0);
            assert!(g.search_above(&q, k, Some(1.5), &live).is_empty());
            assert_eq!(asked.get(), 0);
        }
    }
}
