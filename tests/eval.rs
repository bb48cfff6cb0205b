//! `ragfleet eval --suite`: several judged corpora in one command, each indexed once by an
//! embedded cluster with the cluster file's settings (real models, real files), one table.
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

/// Writes a BEIR corpus, queries and qrels: each query judged relevant to one document.
fn judged(dir: &Path, docs: &[(String, String)], queries: &[(String, String)]) {
    std::fs::create_dir_all(dir).unwrap();
    let line = |id: &str, text: &str| {
        serde_json::json!({"_id": id, "title": "", "text": text}).to_string() + "\n"
    };
    let corpus: String = docs.iter().map(|(id, t)| line(id, t)).collect();
    std::fs::write(dir.join("corpus.jsonl"), corpus).unwrap();
    let qs: String = queries
        .iter()
        .enumerate()
        .map(|(i, (_, q))| line(&format!("q{i}"), q))
        .collect();
    std::fs::write(dir.join("queries.jsonl"), qs).unwrap();
    let mut qrels = String::from("query-id\tcorpus-id\tscore\n");
    for (i, (doc, _)) in queries.iter().enumerate() {
        qrels.push_str(&format!("q{i}\t{doc}\t1\n"));
    }
    std::fs::write(dir.join("qrels.tsv"), qrels).unwrap();
}

fn eval_suite(config: &Path, suite: &Path, work: &Path) -> Value {
    let out = Command::new(bin())
        .args(["eval", "--config"])
        .arg(config)
        .arg("--suite")
        .arg(suite)
        .arg("--work-dir")
        .arg(work)
        .args(["--modes", "dense,bm25,hybrid+rerank,default", "--json"])
        .env("RAGFLEET_MODELS", models_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "eval --suite failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

#[test]
fn a_suite_measures_every_corpus_in_every_mode_and_reuses_its_indexes() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    // corpus 1: sections of the bundled Rust book, found by their titles
    let book = std::fs::read_to_string(root().join("examples/corpus/rust-book.jsonl")).unwrap();
    let (mut docs, mut queries) = (Vec::new(), Vec::new());
    for l in book.lines().take(24) {
        let v: Value = serde_json::from_str(l).unwrap();
        let id = v["id"].as_str().unwrap().to_string();
        docs.push((id.clone(), v["text"].as_str().unwrap().to_string()));
        queries.push((id, v["title"].as_str().unwrap().to_string()));
    }
    judged(&dir.path().join("book"), &docs, &queries);
    // corpus 2: short passages of distinct topics, found by questions
    let topics: Vec<(String, String)> = corpus()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["_id"].as_str().unwrap().to_string(),
                v["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let asked = [
        ("volcano", "why does lava flow out of a mountain"),
        ("tides", "what makes the sea rise and fall"),
        ("bees", "where do bees keep their honey"),
        ("espresso", "how is strong coffee brewed under pressure"),
        ("mitochondria", "what powers a cell"),
        ("compilers", "how is source code turned into machine code"),
    ];
    let asked: Vec<(String, String)> = asked
        .iter()
        .map(|(d, q)| (d.to_string(), q.to_string()))
        .collect();
    judged(&dir.path().join("topics"), &topics, &asked);
    let suite = dir.path().join("suite.toml");
    let entry = |name: &str| {
        format!(
            "[[corpus]]\nname = \"{name}\"\ncorpus = \"{name}/corpus.jsonl\"\nqueries = \"{name}/queries.jsonl\"\nqrels = \"{name}/qrels.tsv\"\n"
        )
    };
    std::fs::write(&suite, entry("book") + &entry("topics")).unwrap();
    // the cluster file whose settings every corpus's embedded cluster takes
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\nname = \"evalsuite\"\ncookie = \"eval-suite-cookie\"\ndata_dir = \"{}\"\n\
             [[node]]\nname = \"n1\"\naddr = \"127.0.0.1:{}\"\nroles = [\"coordinator\", \"embedder\", \"shard\", \"reranker\"]\n\
             [index]\nshards = 2\nreplication = 1\nwrite_quorum = 1\n",
            dir.path().join("data").display(),
            free_port()
        ),
    )
    .unwrap();
    let work = dir.path().join("work");

    let first = eval_suite(&config, &suite, &work);
    let corpora = first["corpora"].as_array().unwrap();
    assert_eq!(corpora.len(), 2, "{first}");
    for (c, (name, n)) in corpora.iter().zip([("book", 24), ("topics", 6)]) {
        assert_eq!(c["corpus"], name);
        assert_eq!(c["queries"], n, "{c}");
        assert_eq!(c["reused_index"], false);
        assert!(c["ingest"]["documents"].as_u64().unwrap() > 0);
        let modes: Vec<&str> = c["modes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mode"].as_str().unwrap())
            .collect();
        assert_eq!(modes, ["dense", "bm25", "hybrid+rerank", "default"]);
        for m in c["modes"].as_array().unwrap() {
            let ndcg = m["ndcg@10"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&ndcg), "{m}");
            assert_eq!(m["mean_coverage"].as_f64(), Some(1.0), "{m}");
            if m["mode"] != "dense" {
                assert_eq!(m["ndcg@10_vs_baseline"]["baseline"], "dense", "{m}");
            }
        }
        // real retrieval: the judged document is found far above chance
        let dense = c["modes"][0]["ndcg@10"].as_f64().unwrap();
        assert!(dense > 0.5, "{name}: dense nDCG@10 {dense}");
    }
    assert!(work.join("book/ingested.txt").is_file());

    // a second run reuses both indexes and measures the same
    let second = eval_suite(&config, &suite, &work);
    for (a, b) in corpora.iter().zip(second["corpora"].as_array().unwrap()) {
        assert_eq!(b["reused_index"], true, "{b}");
        assert_eq!(a["modes"][0]["ndcg@10"], b["modes"][0]["ndcg@10"]);
        assert_eq!(a["modes"][1]["ndcg@10"], b["modes"][1]["ndcg@10"]);
    }
}
