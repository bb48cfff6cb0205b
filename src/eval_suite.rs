//! `ragfleet eval --suite`: several judged corpora, each indexed once by an embedded one-node
//! cluster with the cluster file's index and query settings, measured in every mode, printed
//! as one table (or one JSON object).
//!
//! A suite file:
//!
//! ```toml
//! [[corpus]]
//! name = "scifact"                     # a folder name under --work-dir
//! corpus = "scifact/corpus.jsonl"      # paths relative to the suite file
//! queries = "scifact/queries.jsonl"
//! qrels = "scifact/qrels/train.tsv"
//! limit = 300                          # optional: the first N judged queries
//! ```
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ragfleet_config::{ClusterConfig, NodeConfig, NodeRole};
use serde::Deserialize;

use crate::corpus::Corpus;
use crate::eval::EvalMode;

/// A suite file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// The corpora, measured in file order.
    #[serde(default)]
    pub corpus: Vec<SuiteCorpus>,
}

/// One judged corpus of a suite.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteCorpus {
    pub name: String,
    pub corpus: PathBuf,
    pub queries: PathBuf,
    pub qrels: PathBuf,
    #[serde(default)]
    pub limit: Option<usize>,
}

impl Suite {
    /// Reads and checks a suite file: every corpus named (a plain folder name, once), its
    /// files present; relative paths are taken from the suite file's folder.
    pub fn load(path: &Path) -> Result<Suite> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the suite {}", path.display()))?;
        let mut suite: Suite = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("suite {}: {}", path.display(), e.message()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if suite.corpus.is_empty() {
            bail!("suite {}: no [[corpus]]", path.display());
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in suite.corpus.iter_mut().enumerate() {
            let at = format!("suite {}: corpus[{i}]", path.display());
            let plain = !c.name.is_empty()
                && c.name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
                && !c.name.starts_with('.');
            if !plain {
                bail!(
                    "{at}.name: {:?} is not a plain folder name (letters, digits, - _ .)",
                    c.name
                );
            }
            if !names.insert(c.name.clone()) {
                bail!("{at}.name: {:?} is listed twice", c.name);
            }
            if c.limit == Some(0) {
                bail!("{at}.limit: must be at least 1");
            }
            for (field, p) in [
                ("corpus", &mut c.corpus),
                ("queries", &mut c.queries),
                ("qrels", &mut c.qrels),
            ] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
                if !p.is_file() {
                    bail!("{at}.{field}: {} is not a file", p.display());
                }
            }
        }
        Ok(suite)
    }
}

/// The embedded one-node cluster that indexes one corpus: `base`'s settings, one node with
/// the coordinator, embedder and shard roles, and the reranker's where `reranker` says, each
/// shard once, its data in `data_dir`.
pub fn corpus_cluster(
    base: &ClusterConfig,
    data_dir: &Path,
    port: u16,
    reranker: bool,
) -> ClusterConfig {
    let mut cfg = base.clone();
    let mut roles = vec![NodeRole::Coordinator, NodeRole::Embedder, NodeRole::Shard];
    if reranker {
        roles.push(NodeRole::Reranker);
    }
    cfg.name = format!("{}-eval", base.name);
    cfg.nodes = vec![NodeConfig {
        name: "eval".into(),
        addr: format!("127.0.0.1:{port}"),
        roles,
        embedder_replicas: 1,
        http_addr: None,
    }];
    cfg.index.replication = 1;
    cfg.index.write_quorum = 1;
    cfg.data_dir = data_dir.to_path_buf();
    // judged queries are measured one at a time, none may be refused or cut short
    cfg.query.deadline_ms = cfg.query.deadline_ms.max(120_000);
    cfg.query.shard_deadline_ms = cfg.query.shard_deadline_ms.max(10_000);
    cfg.query.rerank_deadline_ms = cfg.query.rerank_deadline_ms.max(60_000);
    cfg
}

/// What an index folder was built from: the corpus file (size, modification time), the index
/// settings and the on-disk format. A folder with another stamp is rebuilt.
fn stamp(c: &SuiteCorpus, cfg: &ClusterConfig) -> Result<String> {
    let meta = std::fs::metadata(&c.corpus)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let index = toml::to_string(&cfg.index).unwrap_or_default();
    Ok(format!(
        "corpus {} ({} bytes, modified {mtime}), index format {}, [index] {}",
        c.corpus.display(),
        meta.len(),
        crate::demo::INDEX_FORMAT,
        index.replace('\n', "; ")
    ))
}

/// Measures one corpus: its index built (or reused), every mode over its judged queries.
async fn measure_corpus(
    c: &SuiteCorpus,
    base: &ClusterConfig,
    work: &Path,
    models: &Path,
    modes: &[EvalMode],
    limit: Option<usize>,
    json: bool,
) -> Result<serde_json::Value> {
    let data_dir = work.join(&c.name);
    // a reranker where the cluster file has one (so are the stored sentence vectors)
    let reranker = base.nodes.iter().any(|n| n.has(NodeRole::Reranker));
    let cfg = corpus_cluster(base, &data_dir, crate::demo::free_port()?, reranker);
    let stamp = stamp(c, &cfg)?;
    let marker = data_dir.join("ingested.txt");
    let built = std::fs::read_to_string(&marker).ok();
    let reuse = built.as_deref() == Some(stamp.as_str());
    if !reuse && data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)
            .with_context(|| format!("cannot clear {}", data_dir.display()))?;
    }
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let cfg = Arc::new(cfg);
    let (node, client) = crate::demo::start_embedded(cfg.clone(), "eval", models)
        .await
        .with_context(|| c.name.clone())?;
    let result = async {
        let mut ingest = serde_json::Value::Null;
        if reuse {
            if !json {
                println!("{}: index reused from {}", c.name, data_dir.display());
            }
        } else {
            let corpus = Corpus::read_with(std::slice::from_ref(&c.corpus), false)?;
            if !json {
                println!(
                    "{}: ingesting {} documents into {} ...",
                    c.name,
                    corpus.docs.len(),
                    data_dir.display()
                );
            }
            let done = crate::demo::ingest_corpus(
                &client,
                corpus,
                cfg.embedder.ingest_batch.max(1),
                crate::demo::IngestReport::Silent,
            )
            .await
            .with_context(|| format!("{}: ingest", c.name))?;
            std::fs::write(&marker, &stamp)?;
            ingest = serde_json::json!({"documents": done.docs, "chunks": done.chunks,
                "seconds": done.seconds, "docs_per_s": done.docs as f64 / done.seconds.max(1e-9)});
        }
        let out =
            crate::eval::measure(&client, &c.queries, &c.qrels, modes, limit.or(c.limit)).await?;
        anyhow::Ok((out, ingest))
    }
    .await;
    client.close();
    node.shutdown().await;
    let (mut out, ingest) = result?;
    out["corpus"] = serde_json::json!(c.name);
    out["reused_index"] = serde_json::json!(reuse);
    out["ingest"] = ingest;
    Ok(out)
}

/// `ragfleet eval --suite`: every corpus, then one table (or one JSON object).
pub async fn run(
    suite: &Path,
    base: ClusterConfig,
    work: &Path,
    models: &Path,
    modes: &[EvalMode],
    limit: Option<usize>,
    json: bool,
) -> Result<()> {
    let suite = Suite::load(suite)?;
    if !ragfleet_models::fetch::models_present(models) {
        bail!(
            "no models in {} (run `ragfleet models fetch --dir {}`)",
            models.display(),
            models.display()
        );
    }
    crate::loader::require_backend().map_err(anyhow::Error::msg)?;
    let mut corpora = Vec::new();
    for c in &suite.corpus {
        corpora.push(measure_corpus(c, &base, work, models, modes, limit, json).await?);
    }
    if json {
        println!("{}", serde_json::json!({"corpora": corpora}));
        return Ok(());
    }
    for out in &corpora {
        println!();
        crate::eval::print_table(out["corpus"].as_str(), out);
    }
    print_summary(&corpora);
    Ok(())
}

/// One line a corpus: each mode's nDCG@10, and the best single retriever's.
fn print_summary(corpora: &[serde_json::Value]) {
    let Some(first) = corpora.first() else { return };
    let names: Vec<String> = first["modes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["mode"].as_str().map(str::to_string))
        .collect();
    // the default against the better of the single retrievers measured (dense, bm25)
    let vs_best =
        names.iter().any(|n| n == "default") && names.iter().any(|n| n == "dense" || n == "bm25");
    println!("\nnDCG@10 by corpus and mode");
    print!("{:<16}", "corpus");
    for n in &names {
        print!(" {n:>14}");
    }
    if vs_best {
        print!(" {:>22}", "default - best single");
    }
    println!();
    for c in corpora {
        print!("{:<16}", c["corpus"].as_str().unwrap_or(""));
        let modes = c["modes"].as_array().cloned().unwrap_or_default();
        for m in &modes {
            print!(" {:>14.4}", m["ndcg@10"].as_f64().unwrap_or(0.0));
        }
        if vs_best {
            let of = |name: &str| {
                modes
                    .iter()
                    .find(|m| m["mode"] == name)
                    .and_then(|m| m["ndcg@10"].as_f64())
            };
            let best = of("dense")
                .into_iter()
                .chain(of("bm25"))
                .fold(f64::MIN, f64::max);
            if let Some(d) = of("default") {
                print!(" {:>+22.4}", d - best);
            }
        }
        println!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_suite_resolves_its_paths_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["c.jsonl", "q.jsonl", "r.tsv"] {
            write(dir.path(), f, "x\n");
        }
        let ok = write(
            dir.path(),
            "ok.toml",
            "[[corpus]]\nname = \"a\"\ncorpus = \"c.jsonl\"\nqueries = \"q.jsonl\"\nqrels = \"r.tsv\"\nlimit = 5\n",
        );
        let s = Suite::load(&ok).unwrap();
        assert_eq!(s.corpus.len(), 1);
        assert_eq!(s.corpus[0].corpus, dir.path().join("c.jsonl"));
        assert_eq!(s.corpus[0].limit, Some(5));

        let cases = [
            ("", "no [[corpus]]"),
            (
                "[[corpus]]\nname = \"a\"\ncorpus = \"c.jsonl\"\nqueries = \"q.jsonl\"\n",
                "qrels",
            ),
            (
                "[[corpus]]\nname = \"../up\"\ncorpus = \"c.jsonl\"\nqueries = \"q.jsonl\"\nqrels = \"r.tsv\"\n",
                "corpus[0].name",
            ),
            (
                "[[corpus]]\nname = \"a\"\ncorpus = \"missing.jsonl\"\nqueries = \"q.jsonl\"\nqrels = \"r.tsv\"\n",
                "corpus[0].corpus",
            ),
            (
                "[[corpus]]\nname = \"a\"\ncorpus = \"c.jsonl\"\nqueries = \"q.jsonl\"\nqrels = \"r.tsv\"\n[[corpus]]\nname = \"a\"\ncorpus = \"c.jsonl\"\nqueries = \"q.jsonl\"\nqrels = \"r.tsv\"\n",
                "listed twice",
            ),
            (
                "[[corpus]]\nname = \"a\"\ncorpus = \"c.jsonl\"\nqueries = \"q.jsonl\"\nqrels = \"r.tsv\"\nlimt = 3\n",
                "limt",
            ),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let p = write(dir.path(), &format!("bad{i}.toml"), text);
            let e = Suite::load(&p).unwrap_err().to_string();
            assert!(e.contains(want), "case {i}: {e:?} should name {want:?}");
        }
    }

    #[test]
    fn a_corpus_cluster_is_one_node_with_the_base_settings() {
        let base = ClusterConfig::parse(
            r#"
version = 1
name = "c"
cookie = "a-long-enough-cookie"
[[node]]
name = "n1"
addr = "127.0.0.1:7001"
roles = ["coordinator", "embedder", "shard"]
[[node]]
name = "n2"
addr = "127.0.0.1:7002"
roles = ["shard", "reranker"]
[index]
shards = 3
replication = 2
write_quorum = 2
[query]
hybrid_dense_weight = 0.7
"#,
        )
        .unwrap();
        let c = corpus_cluster(&base, Path::new("/tmp/x"), 7555, true);
        c.validate().unwrap();
        assert_eq!(c.nodes.len(), 1);
        assert!(c.nodes[0].has(NodeRole::Reranker) && c.nodes[0].has(NodeRole::Shard));
        assert_eq!((c.index.shards, c.index.replication), (3, 1));
        assert_eq!(c.query.hybrid_dense_weight, 0.7);
        assert_eq!(c.data_dir, Path::new("/tmp/x"));
    }
}
