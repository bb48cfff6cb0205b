//! `ragfleet bench`: throughput of the models and the index, each beside a baseline measured in
//! the same run, reported as ratios.
//!
//! The models' benches (embedder, reranker, generator) are in [`models`], one graph's beside
//! hnswlib and faiss in [`index`]; `bench shard`, `bench ingest` and `bench load` have their own
//! modules.
mod index;
mod models;

use anyhow::Result;
use clap::Subcommand;

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// HNSW segments: build time and single-thread QPS across search beams, recall@10 against
    /// exact search, and the QPS at recall 0.90/0.95/0.99; with `--reference`, hnswlib and
    /// faiss HNSW on the same vectors, degree, construction beam and threads, in the same run.
    Index {
        /// Vectors (384 dimensions, clustered, `--intrinsic` directions per cluster).
        #[arg(long, default_value_t = 100_000)]
        n: usize,
        /// Queries (drawn from the same clusters, not in the set).
        #[arg(long, default_value_t = 1000)]
        queries: usize,
        /// Search beams to sweep.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "10,16,24,32,48,64,96,128,192,256,384,512"
        )]
        ef: Vec<usize>,
        /// Construction beam (all libraries).
        #[arg(long, default_value_t = 100)]
        ef_construction: usize,
        /// Graph degree M (all libraries but instant-distance, whose degree is fixed).
        #[arg(long, default_value_t = 16)]
        m: usize,
        /// Leave instant-distance out (its build is slow at 1M vectors).
        #[arg(long)]
        no_instant: bool,
        /// Build and search ragfleet's graph once with each of these int8 kernels
        /// (`avx512-vnni`, `avx2`, `portable`; the first is reported as `ragfleet`, the others
        /// as `rf-NAME`), so that they are compared in one run; default: the one in use.
        #[arg(long, value_delimiter = ',')]
        int8_kernels: Vec<String>,
        /// Clusters in the synthetic set.
        #[arg(long, default_value_t = 10)]
        clusters: usize,
        /// Directions per cluster (more = harder).
        #[arg(long, default_value_t = 64)]
        intrinsic: usize,
        /// Isotropic noise (more = harder).
        #[arg(long, default_value_t = 0.5)]
        noise: f32,
        /// Real vectors instead of the synthetic set: a `.fvecs` file (`ragfleet embed --input
        /// LINES --fvecs FILE`, or an ANN benchmark's), best in random order: its last
        /// `--queries` rows are the queries, the `--n` rows before them the set (all of them if
        /// fewer).
        #[arg(long)]
        vectors: Option<std::path::PathBuf>,
        /// A Python with numpy, hnswlib and faiss-cpu: runs crates/index/bench/ann_reference.py
        /// on the same vectors (`python3 -m venv V && V/bin/pip install numpy hnswlib faiss-cpu`).
        #[arg(long)]
        reference: Option<std::path::PathBuf>,
    },
    /// One shard's index at growing sizes, through its write path (log, seals, background
    /// merges and graphs): ingest time, resident memory per million chunks, dense and BM25
    /// single-query latency p50/p99, recall@10 against exact search, the ratio between sizes,
    /// and p99 while a merge runs against p99 without.
    Shard(crate::bench_shard::ShardBench),
    /// Ingest throughput: a corpus into a fresh embedded cluster (docs/s, chunks/s, where the
    /// time goes, WAL fsyncs), beside the binary's embedder encoding the same chunks alone and
    /// sentence-transformers with `--reference`, in the same run.
    Ingest(crate::bench_ingest::IngestBench),
    /// Open-loop Poisson load on a running cluster's HTTP API (retrieve and chat) at several
    /// offered rates: throughput, errors, refusals, latency and per-stage percentiles; writes
    /// load.json and an SVG plot of latency against offered load.
    Load(crate::bench_load::LoadBench),
    /// Generator time to first token and tokens/s, 1 stream vs 4 concurrent streams.
    Generate {
        /// Models dir.
        #[arg(long, default_value = "models")]
        models: std::path::PathBuf,
        /// Tokens per stream.
        #[arg(long, default_value_t = 32)]
        tokens: usize,
        /// `flex` or `ndarray`.
        #[arg(long, default_value = "flex")]
        backend: String,
        /// A Python with transformers, torch and gguf: the PyTorch reference on the same
        /// prompts and threads (crates/models/bench/reference.py).
        #[arg(long)]
        reference: Option<std::path::PathBuf>,
    },
    /// Embedder sentences/s at several batch sizes, ndarray vs flex backends (and the
    /// sentence-transformers reference with `--reference`).
    Embed {
        /// Models dir.
        #[arg(long, default_value = "models")]
        models: std::path::PathBuf,
        /// A Python with sentence-transformers (crates/models/bench/reference.py).
        #[arg(long)]
        reference: Option<std::path::PathBuf>,
    },
    /// Reranker pairs/s: the cross-encoder at MiniLM size (the MiniLM encoder with a seeded
    /// head, made by the reference script) and the default sentence reranker, beside
    /// transformers' BertForSequenceClassification with `--reference`.
    Rerank {
        /// Models dir.
        #[arg(long, default_value = "models")]
        models: std::path::PathBuf,
        /// A Python with transformers and torch (needed: it makes the MiniLM-sized
        /// cross-encoder both sides load).
        #[arg(long)]
        reference: std::path::PathBuf,
        /// Pairs per call.
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
}

/// Runs a benchmark.
pub async fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Load(b) => crate::bench_load::run(b).await,
        BenchCmd::Ingest(b) => crate::bench_ingest::run(b).await,
        BenchCmd::Shard(b) => {
            tokio::task::spawn_blocking(move || crate::bench_shard::run(b)).await?
        }
        BenchCmd::Embed { models, reference } => {
            tokio::task::spawn_blocking(move || models::embed(&models, reference.as_deref()))
                .await?
        }
        BenchCmd::Rerank {
            models,
            reference,
            batch,
        } => {
            tokio::task::spawn_blocking(move || models::rerank(&models, &reference, batch)).await?
        }
        BenchCmd::Index {
            n,
            queries,
            ef,
            ef_construction,
            m,
            no_instant,
            int8_kernels,
            clusters,
            intrinsic,
            noise,
            vectors,
            reference,
        } => {
            let kernels = index::kernels(&int8_kernels)?;
            let spec = index::IndexBench {
                n,
                nq: queries,
                efs: ef,
                efc: ef_construction,
                m,
                instant: !no_instant,
                kernels,
                clusters,
                intrinsic,
                noise,
                vectors,
                reference,
            };
            tokio::task::spawn_blocking(move || index::index(spec)).await?
        }
        BenchCmd::Generate {
            models,
            tokens,
            backend,
            reference,
        } => {
            tokio::task::spawn_blocking(move || match backend.as_str() {
                "ndarray" => models::generate::<ragfleet_models::backend::CpuNdArray>(
                    &models,
                    tokens,
                    reference.as_deref(),
                ),
                _ => models::generate::<ragfleet_models::backend::Cpu>(
                    &models,
                    tokens,
                    reference.as_deref(),
                ),
            })
            .await?
        }
    }
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The models' reference script (sentence-transformers / transformers).
pub(crate) const MODELS_REFERENCE: &str = "crates/models/bench/reference.py";
/// Runs a reference `script` (relative to the project) with `args` and this machine's thread
/// count; returns its JSON lines.
pub(crate) fn reference(
    py: &std::path::Path,
    script: &str,
    args: &[String],
) -> Result<Vec<serde_json::Value>> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    println!("reference: {} {}", py.display(), script.display());
    let out = std::process::Command::new(py)
        .arg(&script)
        .args(args)
        .args(["--threads".to_string(), threads().to_string()])
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", py.display()))?;
    if !out.status.success() {
        anyhow::bail!("the reference script failed ({})", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

/// Items per second of `f` (each call handles `items`), over at least two seconds.
fn rate(items: usize, f: &dyn Fn()) -> f64 {
    f();
    let t = std::time::Instant::now();
    let mut n = 0;
    while t.elapsed().as_secs_f64() < 2.0 || n < 2 {
        f();
        n += 1;
    }
    (n * items) as f64 / t.elapsed().as_secs_f64()
}
