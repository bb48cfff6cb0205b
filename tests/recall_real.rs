//! HNSW recall against exact search on real MiniLM embeddings: the sentences of the bundled Rust
//! Book corpus, embedded in the test.
mod common;

use ragfleet_index::eval::{recall, truth, upserts};
use ragfleet_index::{IndexSettings, ShardIndex};
use ragfleet_models::backend::Cpu;
use ragfleet_models::Embedder;
use ragfleet_proto::{SearchMode, SearchQuery};

/// The bundled Rust Book corpus's distinct sentences of four words or more.
fn book_sentences() -> Vec<String> {
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
    sentences
}

#[test]
fn hnsw_recall_at_10_is_at_least_095_on_real_embeddings() {
    let sentences = book_sentences();
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

/// `ragfleet embed --input --fvecs` writes a file of real embeddings that `ragfleet bench shard
/// --vectors --texts` writes a shard from and measures, and bad sets are refused by name.
#[test]
fn a_file_of_real_embeddings_is_written_and_a_shard_benched_on_it() {
    let sentences: Vec<String> = book_sentences().into_iter().take(400).collect();
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("sentences.txt");
    std::fs::write(&lines, sentences.join("\n") + "\n").unwrap();
    let fvecs = dir.path().join("sentences.fvecs");
    let models = common::models_dir();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::bin())
            .args(args)
            .env("RAGFLEET_MODELS", &models)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, out) = run(&[
        "embed",
        "--input",
        lines.to_str().unwrap(),
        "--fvecs",
        fvecs.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let rows = ragfleet_index::fvecs::read(&fvecs).unwrap();
    assert_eq!(rows.len(), 400);
    // in the lines' order, as the embedder makes them
    let emb = Embedder::<Cpu>::load(&models.join("minilm"), &Default::default()).unwrap();
    let direct = emb.embed(&sentences[..5]).unwrap();
    for (a, b) in rows.iter().zip(&direct) {
        assert_eq!(a.len(), 384);
        let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        assert!(cos > 0.9999, "cosine {cos}");
    }

    // 360 rows written (40 held out as queries), at 100 and 360 chunks
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "shard",
            "--vectors",
            fvecs.to_str().unwrap(),
            "--queries",
            "40",
            "--segment-size",
            "64",
            "--ef-search",
            "8,64",
            "--no-load",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (ok, out) = bench(&["--texts", lines.to_str().unwrap(), "--sizes", "100,360"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("360 rows of 384 dims written, 40 held out as queries"),
        "{out}"
    );
    // the table: chunks, ef, ingest s, segments, LID, dense p50, p99, recall@10, ...
    let table: Vec<Vec<f64>> = out
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("chunks"))
        .skip(1)
        .map(|l| {
            l.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect::<Vec<f64>>()
        })
        .take_while(|r| r.len() == 14)
        .collect();
    assert_eq!(table.len(), 4, "{out}");
    for (r, (n, ef)) in table
        .iter()
        .zip([(100.0, 8.0), (100.0, 64.0), (360.0, 8.0), (360.0, 64.0)])
    {
        assert_eq!((r[0], r[1]), (n, ef), "{out}");
        let (lid, recall, bm25_p50) = (r[4], r[7], r[8]);
        assert!(
            lid > 1.0 && lid < 384.0,
            "intrinsic dimensionality {lid}: {out}"
        );
        assert!((0.0..=1.0).contains(&recall), "{out}");
        assert!(bm25_p50 > 0.0, "{out}");
    }
    // the wide beam finds the true neighbours of real queries in these small graphs
    assert!(table[3][7] >= 0.95, "recall at ef 64: {out}");
    assert!(out.contains("3.6x the chunks (100 at ef"), "{out}");

    // the graph alone on the same file: its first 300 rows, the last 40 the queries, with
    // the best int8 kernel this CPU runs and the portable one
    let best_kernel = ragfleet_index::vector::Int8Kernel::usable()[0].name();
    let (ok, out) = run(&[
        "bench",
        "index",
        "--vectors",
        fvecs.to_str().unwrap(),
        "--n",
        "300",
        "--queries",
        "40",
        "--ef",
        "8,64",
        "--no-instant",
        "--int8-kernels",
        &format!("{},portable", best_kernel),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("300 vectors x 384 (from"), "{out}");
    let recall_at = |lib: &str, ef: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().take(2).eq([lib, ef]))
            .unwrap_or_else(|| panic!("no point of {lib} at ef {ef}: {out}"));
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    assert!(recall_at("ragfleet", "64") >= 0.95, "{out}");
    assert!(
        recall_at("ragfleet", "8") <= recall_at("ragfleet", "64"),
        "{out}"
    );
    // the same graph built and searched with the plain loops, compared in the same run
    assert!(
        out.contains(&format!("ragfleet graph (int8 kernel {best_kernel})")),
        "{out}"
    );
    assert!(recall_at("rf-portable", "64") >= 0.95, "{out}");
    assert!(out.contains("vs rf-portable"), "{out}");
    let (ok, out) = run(&["bench", "index", "--n", "300", "--int8-kernels", "avx9000"]);
    assert!(
        !ok && out.contains("no kernel is named \"avx9000\""),
        "{out}"
    );

    // more chunks than the file holds past its queries; texts that do not match the vectors;
    // a damaged file
    let (ok, out) = bench(&["--sizes", "361"]);
    assert!(!ok && out.contains("more than the 360 vectors"), "{out}");
    std::fs::write(&lines, sentences[..399].join("\n")).unwrap();
    let (ok, out) = bench(&["--texts", lines.to_str().unwrap(), "--sizes", "100"]);
    assert!(
        !ok && out.contains("399 lines for the 400 vectors"),
        "{out}"
    );
    let bytes = std::fs::read(&fvecs).unwrap();
    std::fs::write(&fvecs, &bytes[..bytes.len() - 10]).unwrap();
    let (ok, out) = bench(&["--sizes", "100"]);
    assert!(!ok && out.contains("row 399 is cut off"), "{out}");
}
