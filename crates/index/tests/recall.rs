//! HNSW recall against exact search on clustered vectors (real-embedding recall lives in the
//! root crate's tests, which have the model).
use ragfleet_index::{IndexSettings, ShardIndex};
use ragfleet_proto::{ChunkRecord, ModelIdentity, SearchMode, SearchQuery, WriteOp};
use rand::{Rng, SeedableRng};

const DIM: usize = 384;

fn model() -> ModelIdentity {
    ModelIdentity {
        name: "m".into(),
        weights_sha256: "0".into(),
        dim: DIM as u32,
        max_len: 1,
        pooling: "mean".into(),
        normalized: true,
    }
}

/// Clustered vectors of low intrinsic dimension (like real embeddings): each cluster is a centre
/// plus a random combination of a few cluster-specific directions, plus a little isotropic noise.
/// The clusters (centres and directions) depend on `seed` only; `draw_seed` picks the points.
fn clustered(n: usize, clusters: usize, seed: u64, draw_seed: u64) -> Vec<Vec<f32>> {
    const INTRINSIC: usize = 12;
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let centers: Vec<Vec<f32>> = (0..clusters)
        .map(|_| (0..DIM).map(|_| r.gen_range(-1.0..1.0)).collect())
        .collect();
    let dirs: Vec<Vec<Vec<f32>>> = (0..clusters)
        .map(|_| {
            (0..INTRINSIC)
                .map(|_| (0..DIM).map(|_| r.gen_range(-0.5..0.5)).collect())
                .collect()
        })
        .collect();
    let mut r = rand::rngs::StdRng::seed_from_u64(draw_seed);
    (0..n)
        .map(|i| {
            let c = i % clusters;
            let coef: Vec<f32> = (0..INTRINSIC).map(|_| r.gen_range(-1.0..1.0)).collect();
            (0..DIM)
                .map(|d| {
                    centers[c][d]
                        + (0..INTRINSIC).map(|k| coef[k] * dirs[c][k][d]).sum::<f32>()
                        + r.gen_range(-0.02..0.02)
                })
                .collect()
        })
        .collect()
}

#[test]
fn hnsw_recall_at_10_is_at_least_095_on_clustered_vectors() {
    let n = 3000;
    let vectors = clustered(n, 40, 7, 1);
    let dir = tempfile::tempdir().unwrap();
    let settings = IndexSettings {
        segment_size: n,
        merge_below: 1,
        ef_construction: 100,
        ef_search: 64,
        background: false,
    };
    let (mut ix, _) = ShardIndex::open(dir.path(), settings).unwrap();
    let ops: Vec<WriteOp> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| WriteOp::Upsert {
            doc_id: format!("d{i}"),
            chunks: vec![ChunkRecord {
                doc_id: format!("d{i}"),
                chunk_id: format!("d{i}#0"),
                text: String::new(),
                vector: v.clone(),
            }],
        })
        .collect();
    ix.write(ops, &model()).unwrap();
    assert_eq!(
        ix.segment_stats(),
        (1, 1),
        "one sealed segment with its graph"
    );
    // exact reference: a second index that never seals
    let dir2 = tempfile::tempdir().unwrap();
    let exact_settings = IndexSettings {
        segment_size: usize::MAX,
        ..IndexSettings::default()
    };
    let (mut exact, _) = ShardIndex::open(dir2.path(), exact_settings).unwrap();
    exact.write(ix.dump(), &model()).unwrap();
    assert_eq!(exact.segment_stats().0, 0);
    let queries = clustered(200, 40, 7, 2);
    let mut found = 0;
    for q in &queries {
        let sq = SearchQuery {
            vector: q.clone(),
            text: String::new(),
            k: 10,
            mode: SearchMode::Dense,
            model: None,
        };
        let approx: Vec<String> = ix
            .search(&sq)
            .unwrap()
            .into_iter()
            .map(|h| h.chunk_id)
            .collect();
        let truth: Vec<String> = exact
            .search(&sq)
            .unwrap()
            .into_iter()
            .map(|h| h.chunk_id)
            .collect();
        found += truth.iter().filter(|t| approx.contains(t)).count();
    }
    let recall = found as f64 / (queries.len() * 10) as f64;
    println!("recall@10 = {recall:.4}");
    assert!(recall >= 0.95, "recall@10 {recall}");
}
