//! The HNSW graph a sealed segment uses, on its own (vectors in, positions out): what the
//! benchmarks put beside other HNSW libraries on the same vectors.
use instant_distance::Builder;
pub use instant_distance::Search;

use crate::segment::Graph;
use crate::vector::{normalize, UnitVector};
use crate::IndexError;

/// An HNSW graph over unit vectors (distance `1 - dot`), built like a segment's.
pub struct Ann {
    graph: Graph,
    ef_search: usize,
    len: usize,
}

impl std::fmt::Debug for Ann {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ann")
            .field("len", &self.len)
            .field("ef_search", &self.ef_search)
            .finish()
    }
}

impl Ann {
    /// Builds the graph (on all cores) over `vectors`, normalised first.
    pub fn build(
        vectors: Vec<Vec<f32>>,
        ef_construction: usize,
        ef_search: usize,
        seed: u64,
    ) -> Ann {
        let len = vectors.len();
        let points: Vec<UnitVector> = vectors
            .into_iter()
            .map(|mut v| {
                normalize(&mut v);
                UnitVector(v)
            })
            .collect();
        let values: Vec<u32> = (0..len as u32).collect();
        let graph = Builder::default()
            .ef_construction(ef_construction)
            .ef_search(ef_search)
            .seed(seed)
            .build(points, values);
        Ann {
            graph,
            ef_search,
            len,
        }
    }

    /// Vectors held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the graph is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The search beam.
    pub fn ef_search(&self) -> usize {
        self.ef_search
    }

    /// The same graph with another search beam. instant-distance fixes the beam when it builds;
    /// it is the first field of its serialised form, so the graph goes through postcard with
    /// that field replaced (checked against the beam it was built with).
    pub fn with_ef_search(self, ef: usize) -> Result<Ann, IndexError> {
        let bytes =
            postcard::to_stdvec(&self.graph).map_err(|e| IndexError::BadInput(e.to_string()))?;
        drop(self.graph);
        let (old, rest) = postcard::take_from_bytes::<usize>(&bytes)
            .map_err(|e| IndexError::BadInput(e.to_string()))?;
        if old != self.ef_search {
            return Err(IndexError::BadInput(format!(
                "unexpected graph layout: leading field {old}, beam {}",
                self.ef_search
            )));
        }
        let mut out = postcard::to_stdvec(&ef).map_err(|e| IndexError::BadInput(e.to_string()))?;
        out.extend_from_slice(rest);
        drop(bytes);
        let graph: Graph =
            postcard::from_bytes(&out).map_err(|e| IndexError::BadInput(e.to_string()))?;
        Ok(Ann {
            graph,
            ef_search: ef,
            len: self.len,
        })
    }

    /// Positions of the (approximately) `k` nearest vectors to `q` (unit length), nearest first.
    pub fn search(&self, q: &[f32], k: usize, search: &mut Search) -> Vec<u32> {
        let point = UnitVector(q.to_vec());
        self.graph
            .search(&point, search)
            .take(k)
            .map(|item| *item.value)
            .collect()
    }
}

/// Exact top-`k` positions by dot product for every query, on `threads` threads.
pub fn exact_top_k(
    vectors: &[Vec<f32>],
    queries: &[Vec<f32>],
    k: usize,
    threads: usize,
) -> Vec<Vec<u32>> {
    exact_top_k_scored(vectors, queries, k, threads)
        .into_iter()
        .map(|top| top.into_iter().map(|(_, i)| i).collect())
        .collect()
}

/// [`exact_top_k`] with each hit's inner product, best first.
pub fn exact_top_k_scored(
    vectors: &[Vec<f32>],
    queries: &[Vec<f32>],
    k: usize,
    threads: usize,
) -> Vec<Vec<(f32, u32)>> {
    let per = queries.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = queries
            .chunks(per)
            .map(|qs| {
                s.spawn(move || {
                    qs.iter()
                        .map(|q| {
                            let mut scored: Vec<(f32, u32)> = vectors
                                .iter()
                                .enumerate()
                                .map(|(i, v)| (crate::vector::dot(q, v), i as u32))
                                .collect();
                            if scored.len() > k {
                                scored.select_nth_unstable_by(k, |a, b| b.0.total_cmp(&a.0));
                                scored.truncate(k);
                            }
                            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
                            scored
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("exact search thread"))
            .collect()
    })
}

/// The local intrinsic dimensionality at one query, by the maximum-likelihood estimator
/// (Levina and Bickel; as Aumüller and Ceccarello use it to rank how hard a set is for
/// nearest-neighbour search): `-1 / mean(ln(d_i / d_k))` over the distances `d_1..d_k` to the
/// query's k nearest neighbours. `scores` are inner products of unit vectors, best first
/// (`d = sqrt(2 - 2 s)`). Neighbours at distance 0 (duplicates of the query) are left out;
/// `None` when fewer than two distinct distances remain.
pub fn lid_mle(scores: &[f32]) -> Option<f64> {
    let d: Vec<f64> = scores
        .iter()
        .map(|&s| (2.0 - 2.0 * s as f64).max(0.0).sqrt())
        .filter(|&d| d > 1e-9)
        .collect();
    let far = *d.last()?;
    let sum: f64 = d.iter().map(|x| (x / far).ln()).sum();
    (sum < 0.0).then(|| -(d.len() as f64) / sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changing_the_beam_keeps_the_graph_and_changes_the_search() {
        let data = crate::eval::clustered(2000, 32, 8, 0.3, 1, 2);
        let queries = crate::eval::clustered(50, 32, 8, 0.3, 1, 3);
        let norm = |mut v: Vec<f32>| {
            normalize(&mut v);
            v
        };
        let data: Vec<Vec<f32>> = data.into_iter().map(norm).collect();
        let queries: Vec<Vec<f32>> = queries.into_iter().map(norm).collect();
        let truth = exact_top_k(&data, &queries, 10, 2);
        let recall = |ann: &Ann| {
            let mut s = Search::default();
            let mut found = 0;
            for (q, t) in queries.iter().zip(&truth) {
                let got = ann.search(q, 10, &mut s);
                found += t.iter().filter(|x| got.contains(x)).count();
            }
            found as f64 / (10 * queries.len()) as f64
        };
        let ann = Ann::build(data.clone(), 40, 10, 7);
        let low = recall(&ann);
        let ann = ann.with_ef_search(200).unwrap();
        assert_eq!(ann.ef_search(), 200);
        assert_eq!(ann.len(), 2000);
        let high = recall(&ann);
        assert!(high >= 0.99, "ef 200 recall {high}");
        assert!(high >= low, "ef 10 {low} vs ef 200 {high}");
        // wider beam: the search returns more candidates than k would need
        let mut s = Search::default();
        assert_eq!(ann.search(&queries[0], 10, &mut s).len(), 10);
    }

    #[test]
    fn the_intrinsic_dimension_estimate_follows_the_dimension_the_points_fill() {
        use rand::{Rng, SeedableRng};
        // points on the unit sphere of an m-dimensional subspace of R^64: m - 1 dimensions
        let median_lid = |m: usize| {
            let mut r = rand::rngs::StdRng::seed_from_u64(m as u64);
            let mut point = || {
                let mut v = vec![0.0f32; 64];
                for x in v.iter_mut().take(m) {
                    *x = r.gen_range(-1.0f32..1.0);
                }
                normalize(&mut v);
                v
            };
            let data: Vec<Vec<f32>> = (0..20_000).map(|_| point()).collect();
            let queries: Vec<Vec<f32>> = (0..60).map(|_| point()).collect();
            let mut lids: Vec<f64> = exact_top_k_scored(&data, &queries, 20, 2)
                .iter()
                .filter_map(|top| lid_mle(&top.iter().map(|h| h.0).collect::<Vec<_>>()))
                .collect();
            assert_eq!(lids.len(), 60);
            lids.sort_by(f64::total_cmp);
            lids[30]
        };
        let (low, high) = (median_lid(3), median_lid(9));
        assert!(
            (1.4..2.8).contains(&low),
            "2-dimensional points estimated {low}"
        );
        assert!(
            (6.0..10.5).contains(&high),
            "8-dimensional points estimated {high}"
        );
        // a duplicate of the query is left out; too few distances give no estimate
        assert_eq!(lid_mle(&[1.0, 0.9]), None);
        assert_eq!(lid_mle(&[]), None);
        let with_dup = lid_mle(&[1.0, 0.95, 0.9, 0.8]).unwrap();
        assert_eq!(with_dup, lid_mle(&[0.95, 0.9, 0.8]).unwrap());
    }
}
