//! HNSW recall against exact search on real MiniLM embeddings: the sentences of the bundled Rust
//! Book corpus, embedded in the test.
mod common;

use ragfleet_index::eval::{recall, truth, upserts};
use ragfleet_index::{IndexSettings, ShardIndex};
use ragfleet_models::backend::Cpu;
use ragfleet_models::Embedder;
use ragfleet_proto::{SearchMode, SearchQuery};

#[test]
fn hnsw_recall_at_10_is_at_least_095_on_real_embeddings() {
    let corpus =
        std::fs::read_to_string(common::root().join("examples/corpus/rust-book.jsonl")).unwrap();
    let mut sentences: Vec<String> = Vec::new();
    for line in corpus.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for s in ragfleet_index::chunk::sentences(v["text"].as_str().unwrap()) {
            if s.split_whitespace().count() >= 4 && !sentences.iter().any(|x| x == s) {
                sentences.push(s.to_string());
            }
        }
    }
    assert!(sentences.len() > 600, "{} sentences", sentences.len());
    let emb =
        Embedder::<Cpu>::load(&common::models_dir().join("minilm"), &Default::default()).unwrap();
    let vectors = emb.embed(&sentences).unwrap();
    let model = emb.identity().clone();
    // every 10th sentence is a query, the rest the index
    let (mut kept, mut texts, mut queries) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (s, v)) in sentences.iter().zip(vectors).enumerate() {
        if i % 10 == 0 {
            queries.push(SearchQuery {
                vector: v,
                text: String::new(),
                k: 10,
                mode: SearchMode::Dense,
                model: Some(model.clone()),
            });
        } else {
            kept.push(v);
            texts.push(s.clone());
        }
    }
    let n = kept.len();
    let ops = upserts(kept, Some(&texts));
    let dir = tempfile::tempdir().unwrap();
    let settings = IndexSettings {
        segment_size: n,
        ef_construction: 100,
        ef_search: 64,
        background: false,
        deletion_grace: None,
        ..IndexSettings::default()
    };
    let (mut hnsw, _) = ShardIndex::open(&dir.path().join("hnsw"), settings).unwrap();
    hnsw.write(ops.clone(), &model).unwrap();
    assert_eq!(
        hnsw.segment_stats(),
        (1, 1),
        "one sealed segment with its graph"
    );
    let exact_settings = IndexSettings {
        segment_size: usize::MAX,
        ..IndexSettings::default()
    };
    let (mut exact, _) = ShardIndex::open(&dir.path().join("exact"), exact_settings).unwrap();
    exact.write(ops, &model).unwrap();
    let recall = recall(&hnsw, &queries, &truth(&exact, &queries).unwrap()).unwrap();
    println!(
        "{} vectors, {} queries: recall@10 = {recall:.4}",
        n,
        queries.len()
    );
    assert!(recall >= 0.95, "recall@10 {recall}");
}
