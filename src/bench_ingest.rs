//! `ragfleet bench ingest`: a corpus ingested into a fresh embedded cluster (the cluster file's
//! settings, one node: coordinator, embedder, shards), beside what the same machine does with
//! the same chunks in the same run: the binary's embedder encoding them alone (embed-only, the
//! ceiling the pipeline aims at) and, with `--reference`, sentence-transformers encoding them.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use ragfleet_config::ClusterConfig;

use crate::corpus::Corpus;
use crate::demo::{IngestReport, IngestSummary};
use crate::loader::Backend;

/// `ragfleet bench ingest` options.
#[derive(Args, Debug, Clone)]
pub struct IngestBench {
    /// The cluster file whose [index], [embedder] and [query] settings the embedded cluster
    /// takes (its nodes are replaced by one).
    #[arg(long, default_value = "cluster.toml")]
    config: PathBuf,
    /// The corpus (BEIR corpus.jsonl, id/text JSON lines, .txt/.md files or folders);
    /// default: the bundled Rust-book sections. SciFact: `--corpus scifact/corpus.jsonl`.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Only the first N documents.
    #[arg(long)]
    limit: Option<usize>,
    /// Models dir (also RAGFLEET_MODELS; default: the cluster file's).
    #[arg(long)]
    models: Option<PathBuf>,
    /// Store sentence vectors too (a reranker role on the node): more texts to embed than
    /// the chunks the baselines encode.
    #[arg(long)]
    sentences: bool,
    /// Documents per ingest request (default: the cluster file's embedder.ingest_batch).
    #[arg(long)]
    batch: Option<usize>,
    /// A Python with sentence-transformers: encodes the same chunks in the same run
    /// (crates/models/bench/reference.py encode).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// The chunk texts the ingest embeds, cut by the same chunker and tokenizer.
fn chunk_texts(
    corpus: &Corpus,
    model: &ragfleet_models::Embedder<Backend>,
    cfg: &ClusterConfig,
) -> Vec<String> {
    let mut out = Vec::new();
    for d in &corpus.docs {
        let chunks = ragfleet_index::chunk::chunk_document(
            &d.id,
            &d.body(),
            &|t| model.count_tokens(t),
            cfg.index.chunk_tokens,
            cfg.index.chunk_overlap,
        );
        out.extend(chunks.into_iter().map(|c| c.text));
    }
    out
}

/// Embed-only: the binary's embedder (its backend, its lanes) encoding `texts` in batches of
/// `batch`, after one warm-up batch; chunks per second.
fn embed_only(model: &ragfleet_models::Embedder<Backend>, texts: &[String], batch: usize) -> f64 {
    if let Some(first) = texts.chunks(batch).next() {
        let _ = model.embed(first);
    }
    let t = Instant::now();
    for b in texts.chunks(batch) {
        model.embed(b).expect("embed");
    }
    texts.len() as f64 / t.elapsed().as_secs_f64().max(1e-9)
}

/// Runs the bench.
pub async fn run(b: IngestBench) -> Result<()> {
    ragfleet_models::lanes::keep_activation_memory();
    let mut base = ClusterConfig::load(&b.config)?;
    if let Some(m) = &b.models {
        base.models_dir = m.clone();
    }
    let models = base.models_dir.clone();
    if !ragfleet_models::fetch::models_present(&models) {
        bail!(
            "no models in {} (run `ragfleet models fetch`)",
            models.display()
        );
    }
    crate::loader::require_backend().map_err(anyhow::Error::msg)?;
    let mut corpus = match &b.corpus {
        Some(p) => Corpus::read_with(std::slice::from_ref(p), false)?,
        None => Corpus::read_str(crate::demo::DEMO_CORPUS, "rust-book.jsonl"),
    };
    if let Some(n) = b.limit {
        corpus.docs.truncate(n);
    }
    if corpus.docs.is_empty() {
        bail!("no document to ingest");
    }
    let batch = b.batch.unwrap_or(base.embedder.ingest_batch).max(1);
    let embed_batch = base.embedder.ingest_batch.max(1);
    let source = b
        .corpus
        .as_ref()
        .map_or("the bundled Rust-book sections".to_string(), |p| {
            p.display().to_string()
        });

    // the baselines first, with the whole machine to themselves
    let embedder_dir = models.join(ragfleet_models::fetch::EMBEDDER_DIR);
    let dir = embedder_dir.clone();
    let cfg2 = base.clone();
    let (corpus, texts, embed_rate) = tokio::task::spawn_blocking(move || -> Result<_> {
        let model = ragfleet_models::Embedder::<Backend>::load(&dir, &Default::default())?
            .with_lanes(crate::loader::lanes());
        let texts = chunk_texts(&corpus, &model, &cfg2);
        let rate = embed_only(&model, &texts, embed_batch);
        Ok((corpus, texts, rate))
    })
    .await??;
    let work = tempfile::tempdir()?;
    let torch = match &b.reference {
        Some(py) => {
            let path = work.path().join("texts.json");
            std::fs::write(&path, serde_json::to_string(&texts)?)?;
            let args = [
                "encode".to_string(),
                "--model".into(),
                embedder_dir.display().to_string(),
                "--texts".into(),
                path.display().to_string(),
                "--batch".into(),
                embed_batch.to_string(),
            ];
            let py = py.clone();
            let out = tokio::task::spawn_blocking(move || {
                crate::bench::reference(&py, crate::bench::MODELS_REFERENCE, &args)
            })
            .await??;
            out.first().and_then(|v| v["rate"].as_f64())
        }
        None => None,
    };

    // the ingest: a fresh embedded cluster, the whole pipeline
    let data = work.path().join("data");
    std::fs::create_dir_all(&data)?;
    let cfg = Arc::new(crate::eval_suite::corpus_cluster(
        &base,
        &data,
        crate::demo::free_port()?,
        b.sentences,
    ));
    let (node, client) = crate::demo::start_embedded(cfg.clone(), "eval", &models).await?;
    let syncs = ragfleet_index::wal_fsyncs();
    let done = crate::demo::ingest_corpus(&client, corpus, batch, IngestReport::Silent).await;
    let syncs = ragfleet_index::wal_fsyncs() - syncs;
    client.close();
    node.shutdown().await;
    let done = done?;
    report(
        &b,
        &source,
        &texts,
        embed_rate,
        torch,
        done,
        syncs,
        batch,
        cfg.index.shards,
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn report(
    b: &IngestBench,
    source: &str,
    texts: &[String],
    embed_rate: f64,
    torch: Option<f64>,
    done: IngestSummary,
    syncs: u64,
    batch: usize,
    shards: u32,
) {
    let secs = done.seconds.max(1e-9);
    let (docs_s, chunks_s) = (done.docs as f64 / secs, done.chunks as f64 / secs);
    let busy = (done.embed_ms + done.write_ms).max(1e-9);
    let (embed_share, write_share) = (done.embed_ms / busy, done.write_ms / busy);
    let writes = done.requests * shards as u64;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if b.json {
        println!(
            "{}",
            serde_json::json!({
                "corpus": source, "documents": done.docs, "chunks": done.chunks,
                "baseline_chunks": texts.len(), "seconds": done.seconds,
                "docs_per_s": docs_s, "chunks_per_s": chunks_s,
                "stages_share": {"embed": embed_share, "write": write_share},
                "stages_ms": {"embed": done.embed_ms, "write": done.write_ms},
                "embed_only_chunks_per_s": embed_rate,
                "vs_embed_only": chunks_s / embed_rate.max(1e-9),
                "reference_chunks_per_s": torch,
                "vs_reference": torch.map(|t| chunks_s / t.max(1e-9)),
                "requests": done.requests, "batch": batch, "wal_fsyncs": syncs,
                "sentences": b.sentences, "threads": threads,
                "backend": if cfg!(feature = "cuda") { "cuda" } else { "cpu" },
            })
        );
        return;
    }
    println!(
        "{} documents of {source}: {} chunks ({} chunk texts in the baselines); {threads} threads, {} backend{}",
        done.docs,
        done.chunks,
        texts.len(),
        if cfg!(feature = "cuda") { "cuda" } else { "cpu" },
        if b.sentences {
            "; sentence vectors stored too"
        } else {
            ""
        }
    );
    println!(
        "{:<34} {:>10} {:>10} {:>8}",
        "", "docs/s", "chunks/s", "ratio"
    );
    println!(
        "{:<34} {:>10.1} {:>10.1} {:>8}",
        "ragfleet ingest (whole pipeline)", docs_s, chunks_s, "1.00"
    );
    println!(
        "{:<34} {:>10} {:>10.1} {:>8.2}",
        "ragfleet embed-only",
        "-",
        embed_rate,
        chunks_s / embed_rate.max(1e-9)
    );
    match torch {
        Some(t) => println!(
            "{:<34} {:>10} {:>10.1} {:>8.2}",
            "sentence-transformers encode",
            "-",
            t,
            chunks_s / t.max(1e-9)
        ),
        None => println!("sentence-transformers encode: not run (--reference PYTHON)"),
    }
    println!(
        "ratio: ingest chunks/s over the row's; {:.1} s in all; requests spent {:.0}% embedding, {:.0}% writing (routing is in writing); {} requests of {batch} documents; {syncs} WAL fsyncs for about {writes} shard writes",
        done.seconds,
        100.0 * embed_share,
        100.0 * write_share,
        done.requests
    );
}
