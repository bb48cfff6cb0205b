//! Measuring an index: recall of the HNSW segments against exact search on the same data, and
//! clustered synthetic vectors shaped like real embeddings (tests and benchmarks share these).
use rand::{Rng, SeedableRng};

use ragfleet_proto::{ChunkRecord, Hit, ModelIdentity, SearchMode, SearchQuery, WriteOp};

use crate::{IndexError, ShardIndex};

/// Clustered vectors of low intrinsic dimension: each of `clusters` clusters is a centre plus a
/// random combination of a few cluster-specific directions, plus isotropic `noise`. The clusters
/// depend on `seed` only; `draw` picks the points (so queries can come from the same clusters).
pub fn clustered(
    n: usize,
    dim: usize,
    clusters: usize,
    noise: f32,
    seed: u64,
    draw: u64,
) -> Vec<Vec<f32>> {
    clustered_with(n, dim, clusters, 12, noise, seed, draw)
}

/// [`clustered`] with `intrinsic` directions per cluster: more directions and more noise make
/// a harder set for an approximate index (the benchmark uses 10 clusters, 64 and 0.5).
pub fn clustered_with(
    n: usize,
    dim: usize,
    clusters: usize,
    intrinsic: usize,
    noise: f32,
    seed: u64,
    draw: u64,
) -> Vec<Vec<f32>> {
    const INTRINSIC_MAX: usize = 1024;
    let intrinsic = intrinsic.clamp(1, INTRINSIC_MAX);
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let centers: Vec<Vec<f32>> = (0..clusters)
        .map(|_| (0..dim).map(|_| r.gen_range(-1.0..1.0)).collect())
        .collect();
    let dirs: Vec<Vec<Vec<f32>>> = (0..clusters)
        .map(|_| {
            (0..intrinsic)
                .map(|_| (0..dim).map(|_| r.gen_range(-0.5..0.5)).collect())
                .collect()
        })
        .collect();
    let mut r = rand::rngs::StdRng::seed_from_u64(draw);
    (0..n)
        .map(|i| {
            let c = i % clusters;
            let coef: Vec<f32> = (0..intrinsic).map(|_| r.gen_range(-1.0..1.0)).collect();
            (0..dim)
                .map(|d| {
                    centers[c][d]
                        + (0..intrinsic).map(|k| coef[k] * dirs[c][k][d]).sum::<f32>()
                        + r.gen_range(-noise..noise)
                })
                .collect()
        })
        .collect()
}

/// The model identity synthetic vectors of `dim` dimensions are written with (benches,
/// examples).
pub fn synthetic_model(dim: usize) -> ModelIdentity {
    ModelIdentity {
        name: "bench-synthetic".into(),
        weights_sha256: "00".repeat(32),
        dim: dim as u32,
        max_len: 256,
        pooling: "mean".into(),
        normalized: true,
    }
}

/// `bench shard`'s set at unit length: [`clustered_with`] 50 clusters of 24 directions, noise
/// 0.1, seed 7 (`draw` 1 for the vectors, `u64::MAX - 1` for the queries).
pub fn bench_shard_set(n: usize, dim: usize, draw: u64) -> Vec<Vec<f32>> {
    clustered_with(n, dim, 50, 24, 0.1, 7, draw)
        .into_iter()
        .map(|mut v| {
            crate::vector::normalize(&mut v);
            v
        })
        .collect()
}

/// One single-chunk upsert per vector (`d{i}`, text from `texts` when given).
pub fn upserts(vectors: Vec<Vec<f32>>, texts: Option<&[String]>) -> Vec<WriteOp> {
    upserts_from(0, vectors, |i| {
        texts.and_then(|t| t.get(i)).cloned().unwrap_or_default()
    })
}

/// One single-chunk upsert per vector, numbered from `first` (`d{first + j}`, text `text(i)`
/// of that number).
pub fn upserts_from(
    first: usize,
    vectors: Vec<Vec<f32>>,
    text: impl Fn(usize) -> String,
) -> Vec<WriteOp> {
    vectors
        .into_iter()
        .enumerate()
        .map(|(j, vector)| {
            let i = first + j;
            one_chunk_upsert(format!("d{i}"), vector, text(i))
        })
        .collect()
}

/// A document `id` of one chunk (`{id}#0`) at version 0 (the write path gives it one).
pub fn one_chunk_upsert(id: String, vector: Vec<f32>, text: String) -> WriteOp {
    WriteOp::Upsert {
        version: 0,
        chunks: vec![ChunkRecord {
            doc_id: id.clone(),
            chunk_id: format!("{id}#0"),
            text,
            vector,
            sentences: Default::default(),
        }],
        doc_id: id,
    }
}

/// A dense query for the top 10 of each vector.
pub fn dense_queries(vectors: &[Vec<f32>]) -> Vec<SearchQuery> {
    vectors
        .iter()
        .map(|v| SearchQuery {
            vector: v.clone(),
            text: String::new(),
            k: 10,
            mode: SearchMode::Dense,
            model: None,
        })
        .collect()
}

/// Writes rows of numbers one after the other, little-endian (`bytes`: the type's
/// `to_le_bytes`): the files `crates/index/bench/ann_reference.py` reads.
pub fn write_rows_le<T: Copy, const N: usize>(
    path: &std::path::Path,
    rows: &[Vec<T>],
    bytes: fn(T) -> [u8; N],
) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for x in rows.iter().flatten() {
        f.write_all(&bytes(*x))?;
    }
    f.flush()
}

/// Exact top-k chunk ids of every query (the reference of [`recall`]).
pub fn truth(exact: &ShardIndex, queries: &[SearchQuery]) -> Result<Vec<Vec<String>>, IndexError> {
    queries.iter().map(|q| exact.search(q).map(ids)).collect()
}

/// Mean fraction of the reference top-k that `index` finds.
pub fn recall(
    index: &ShardIndex,
    queries: &[SearchQuery],
    truth: &[Vec<String>],
) -> Result<f64, IndexError> {
    let (mut found, mut total) = (0, 0);
    for (q, want) in queries.iter().zip(truth) {
        let got = ids(index.search(q)?);
        found += want.iter().filter(|w| got.contains(w)).count();
        total += want.len();
    }
    Ok(if total == 0 {
        1.0
    } else {
        found as f64 / total as f64
    })
}

fn ids(hits: Vec<Hit>) -> Vec<String> {
    hits.into_iter().map(|h| h.chunk_id).collect()
}

/// A Zipf-distributed vocabulary sampler (s = 1), so that BM25 sees common and rare terms.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// Words `t0`..`t{n-1}`, `t{r}` drawn with weight 1/(r+1).
    pub fn new(n: usize) -> Zipf {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|r| {
                acc += 1.0 / r as f64;
                acc
            })
            .collect();
        cdf.iter_mut().for_each(|c| *c /= acc);
        Zipf { cdf }
    }
    /// Twelve words: a chunk's text.
    pub fn text(&self, r: &mut impl Rng) -> String {
        (0..12).map(|_| self.word(r)).collect::<Vec<_>>().join(" ")
    }

    /// One word.
    pub fn word(&self, r: &mut impl Rng) -> String {
        let u: f64 = r.gen();
        let i = self.cdf.partition_point(|c| *c < u);
        format!("t{i}")
    }
}

/// Runs `ix`'s maintenance until it is settled as an idle replica: every graph built, no merge
/// running or due, nothing left to free, its idle seal done (at least `idle` after the call);
/// how long it took.
pub fn settle(
    ix: &mut ShardIndex,
    idle: std::time::Duration,
) -> Result<std::time::Duration, IndexError> {
    let start = std::time::Instant::now();
    loop {
        ix.maintain()?;
        let (segs, built) = ix.segment_stats();
        if segs == built
            && !ix.merging()
            && !ix.needs_maintenance()
            && ix.segments_being_freed() == 0
            && ix.growing_chunks() < crate::IDLE_SEAL_MIN_CHUNKS
            && start.elapsed() > idle
        {
            return Ok(start.elapsed());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
