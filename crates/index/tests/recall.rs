//! HNSW recall against exact search on clustered vectors (real-embedding recall lives in the
//! root crate's tests, which have the model).
use ragfleet_index::eval::{clustered, recall, truth, upserts};
use ragfleet_index::{AnnKind, IndexSettings, ShardIndex};
use ragfleet_proto::{ModelIdentity, SearchMode, SearchQuery};

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

#[test]
fn hnsw_recall_at_10_is_at_least_095_on_clustered_vectors() {
    let n = 3000;
    let dir = tempfile::tempdir().unwrap();
    let settings = IndexSettings {
        segment_size: n,
        ef_construction: 100,
        ef_search: 64,
        background: false,
        deletion_grace: None,
        ..IndexSettings::default()
    };
    let (mut ix, _) = ShardIndex::open(dir.path(), settings).unwrap();
    ix.write(upserts(clustered(n, DIM, 40, 0.02, 7, 1), None), &model())
        .unwrap();
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
    let queries: Vec<SearchQuery> = clustered(200, DIM, 40, 0.02, 7, 2)
        .into_iter()
        .map(|v| SearchQuery {
            vector: v,
            text: String::new(),
            k: 10,
            mode: SearchMode::Dense,
            model: None,
        })
        .collect();
    let r = recall(&ix, &queries, &truth(&exact, &queries).unwrap()).unwrap();
    println!("recall@10 = {r:.4}");
    assert!(r >= 0.95, "recall@10 {r}");
}

/// Both HNSW implementations (`index.ann`) on the same data through `ShardIndex`, merges
/// included: each reaches recall@10 >= 0.95 and they agree within 0.03.
#[test]
fn both_ann_implementations_reach_the_same_recall() {
    let data = clustered(4000, DIM, 40, 0.02, 11, 1);
    let queries: Vec<SearchQuery> = clustered(200, DIM, 40, 0.02, 11, 2)
        .into_iter()
        .map(|v| SearchQuery {
            vector: v,
            text: String::new(),
            k: 10,
            mode: SearchMode::Dense,
            model: None,
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let (mut exact, _) = ShardIndex::open(
        &dir.path().join("exact"),
        IndexSettings {
            segment_size: usize::MAX,
            ..IndexSettings::default()
        },
    )
    .unwrap();
    exact.write(upserts(data.clone(), None), &model()).unwrap();
    let truth = truth(&exact, &queries).unwrap();
    let mut got = Vec::new();
    for ann in [AnnKind::Hnsw, AnnKind::InstantDistance] {
        let settings = IndexSettings {
            segment_size: 1000,
            ef_construction: 100,
            ef_search: 64,
            background: false,
            ann,
            ..IndexSettings::default()
        };
        let (mut ix, _) = ShardIndex::open(&dir.path().join(format!("{ann:?}")), settings).unwrap();
        for batch in upserts(data.clone(), None).chunks(500) {
            ix.write(batch.to_vec(), &model()).unwrap();
        }
        let (segments, built) = ix.segment_stats();
        assert_eq!(segments, built);
        let r = recall(&ix, &queries, &truth).unwrap();
        println!("{ann:?}: {segments} segments, recall@10 {r:.4}");
        assert!(r >= 0.95, "{ann:?} recall@10 {r}");
        got.push(r);
    }
    assert!((got[0] - got[1]).abs() <= 0.03, "{got:?}");
}
