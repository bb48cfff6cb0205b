//! `ragfleet bench`: throughput of the models and the index, each beside a baseline measured in
//! the same run, reported as ratios.
use anyhow::Result;
use clap::Subcommand;
use std::sync::Arc;

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
            tokio::task::spawn_blocking(move || embed(&models, reference.as_deref())).await?
        }
        BenchCmd::Rerank {
            models,
            reference,
            batch,
        } => tokio::task::spawn_blocking(move || rerank(&models, &reference, batch)).await?,
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
            use ragfleet_index::vector::{int8_kernel, Int8Kernel};
            let kernels = if int8_kernels.is_empty() {
                vec![int8_kernel()]
            } else {
                int8_kernels
                    .iter()
                    .map(|name| match Int8Kernel::parse(name.trim()) {
                        Some(k) if k.available() => Ok(k),
                        Some(_) => Err(anyhow::anyhow!(
                            "--int8-kernels: this CPU cannot run {name}; it runs {}",
                            kernel_names()
                        )),
                        None => Err(anyhow::anyhow!(
                            "--int8-kernels: no kernel is named {name:?}; this CPU runs {}",
                            kernel_names()
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            let spec = IndexBench {
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
            tokio::task::spawn_blocking(move || index(spec)).await?
        }
        BenchCmd::Generate {
            models,
            tokens,
            backend,
            reference,
        } => {
            tokio::task::spawn_blocking(move || match backend.as_str() {
                "ndarray" => generate::<ragfleet_models::backend::CpuNdArray>(
                    &models,
                    tokens,
                    reference.as_deref(),
                ),
                _ => {
                    generate::<ragfleet_models::backend::Cpu>(&models, tokens, reference.as_deref())
                }
            })
            .await?
        }
    }
}

const SHORT: &str = "How do shards bound the latency of a query?";

fn long_text() -> String {
    "Replication keeps a copy of every shard on another node. ".repeat(40)
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The models' reference script (sentence-transformers / transformers).
pub(crate) const MODELS_REFERENCE: &str = "crates/models/bench/reference.py";
/// The index's reference script (hnswlib, faiss).
const ANN_REFERENCE: &str = "crates/index/bench/ann_reference.py";

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

fn embed(models: &std::path::Path, py: Option<&std::path::Path>) -> Result<()> {
    ragfleet_models::lanes::keep_activation_memory();
    use ragfleet_models::backend::{Cpu, CpuNdArray};
    use ragfleet_models::Embedder;
    let dir = models.join(ragfleet_models::fetch::EMBEDDER_DIR);
    let lanes = ragfleet_models::lanes::cpu_lanes();
    // the binary's backend (flex on the CPU, CUDA in a cuda build) with its lanes; the other
    // columns are the CPU backends
    let backend = if cfg!(feature = "cuda") {
        "cuda"
    } else {
        "flex"
    };
    let flex = Embedder::<crate::loader::Backend>::load(&dir, &Default::default())?
        .with_lanes(crate::loader::lanes());
    let flex1 = Embedder::<Cpu>::load(&dir, &Default::default())?;
    let nd = Embedder::<CpuNdArray>::load(&dir, &Default::default())?.with_lanes(lanes);
    let long = long_text();
    let torch: Vec<serde_json::Value> = match py {
        Some(py) => reference(
            py,
            MODELS_REFERENCE,
            &[
                "embed".into(),
                "--model".into(),
                dir.display().to_string(),
                "--short".into(),
                SHORT.into(),
                "--long".into(),
                long.clone(),
            ],
        )?,
        None => Vec::new(),
    };
    println!(
        "{} threads; the binary's backend ({backend}) runs sub-batches on {} lanes (1 lane: flex, one forward pass at a time); ratios are {backend} / other",
        threads(),
        crate::loader::lanes()
    );
    println!(
        "{:<8} {:>6} {:>12} {:>12} {:>7} {:>14} {:>7} {:>12} {:>7}",
        "input",
        "batch",
        format!("{backend} sent/s"),
        "1 lane",
        "ratio",
        "ndarray sent/s",
        "ratio",
        "torch sent/s",
        "ratio"
    );
    for (name, text) in [("short", SHORT.to_string()), ("256-tok", long)] {
        for batch in [1usize, 8, 64, 256] {
            if name == "256-tok" && batch == 256 {
                continue;
            }
            let texts = vec![text.clone(); batch];
            let a = rate(batch, &|| {
                flex.embed(&texts).expect("embed");
            });
            let one = rate(batch, &|| {
                flex1.embed(&texts).expect("embed");
            });
            let b = rate(batch, &|| {
                nd.embed(&texts).expect("embed");
            });
            let t = torch
                .iter()
                .find(|v| v["input"] == name && v["batch"] == batch)
                .and_then(|v| v["rate"].as_f64());
            let (tc, tr) = t.map_or(("-".to_string(), "-".to_string()), |t| {
                (format!("{t:.1}"), format!("{:.2}", a / t))
            });
            println!(
                "{name:<8} {batch:>6} {a:>12.1} {one:>12.1} {:>7.2} {b:>14.1} {:>7.2} {tc:>12} {tr:>7}",
                a / one,
                a / b
            );
        }
    }
    Ok(())
}

fn rerank(models: &std::path::Path, py: &std::path::Path, batch: usize) -> Result<()> {
    ragfleet_models::lanes::keep_activation_memory();
    use ragfleet_models::backend::Cpu;
    use ragfleet_runtime::RerankModel;
    let dir = tempfile::tempdir()?;
    let ce_dir = dir.path().join("cross-encoder");
    let minilm = models.join(ragfleet_models::fetch::EMBEDDER_DIR);
    reference(
        py,
        MODELS_REFERENCE,
        &[
            "make-cross-encoder".into(),
            "--model".into(),
            minilm.display().to_string(),
            "--out".into(),
            ce_dir.display().to_string(),
        ],
    )?;
    let long = long_text();
    let torch = reference(
        py,
        MODELS_REFERENCE,
        &[
            "rerank".into(),
            "--model".into(),
            ce_dir.display().to_string(),
            "--batch".into(),
            batch.to_string(),
            "--short".into(),
            SHORT.into(),
            "--long".into(),
            long.clone(),
        ],
    )?;
    let torch = torch
        .first()
        .and_then(|v| v["rate"].as_f64())
        .ok_or_else(|| anyhow::anyhow!("no rate from the reference"))?;
    let lanes = ragfleet_models::lanes::cpu_lanes();
    let ce =
        ragfleet_models::CrossEncoder::<Cpu>::load(&ce_dir, &Default::default())?.with_lanes(lanes);
    let ce1 = ragfleet_models::CrossEncoder::<Cpu>::load(&ce_dir, &Default::default())?;
    let passages = vec![long.clone(); batch];
    let ours = rate(batch, &|| {
        ce.score(SHORT, &passages).expect("score");
    });
    let ours1 = rate(batch, &|| {
        ce1.score(SHORT, &passages).expect("score");
    });
    let emb = Arc::new(crate::loader::EmbedderModel(
        ragfleet_models::Embedder::<crate::loader::Backend>::load(&minilm, &Default::default())?
            .with_lanes(crate::loader::lanes()),
    ));
    // distinct passages of real sentences, so the sentence cache does not answer
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let sent = rate(batch, &|| {
        let r = crate::loader::SentenceReranker::new(emb.clone());
        let k = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ps: Vec<String> = (0..batch)
            .map(|i| format!("Passage {k} {i}. {}", long.clone()))
            .collect();
        r.score(SHORT, &ps).expect("score");
    });
    println!(
        "{} threads, {batch} pairs per call, 256-token passages (truncated to 256 with the query)",
        threads()
    );
    println!(
        "cross-encoder (MiniLM-L6 size): ragfleet {ours:.1} pairs/s on {lanes} lanes ({ours1:.1} on 1 lane: {:.2}x), transformers {torch:.1} pairs/s: {:.2}x",
        ours / ours1,
        ours / torch
    );
    println!("sentence reranker (default, 20 sentences a passage, uncached): {sent:.1} pairs/s");
    Ok(())
}

/// Runs `streams` concurrent greedy generations; returns (mean time to first token, tokens/s).
fn run_streams<B: burn::prelude::Backend>(
    g: &ragfleet_models::llama::Generator<B>,
    prompts: &[&str],
    tokens: usize,
) -> (f64, f64) {
    use ragfleet_models::llama::{GenerationRequest, Sink, StreamEvent};
    use std::sync::{Arc, Mutex};
    let t0 = std::time::Instant::now();
    let stats: Vec<Arc<Mutex<(Option<f64>, usize)>>> = prompts
        .iter()
        .map(|_| Arc::new(Mutex::new((None, 0))))
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for (p, st) in prompts.iter().zip(&stats) {
        let req = GenerationRequest {
            system: String::new(),
            user: p.to_string(),
            max_tokens: tokens as u32,
            sampling: ragfleet_proto::Sampling {
                temperature: 0.0,
                top_p: 1.0,
                seed: 0,
                ..Default::default()
            },
            push_to: None,
        };
        tx.send((req, st.clone())).expect("queue");
    }
    drop(tx);
    g.serve(
        rx,
        prompts.len(),
        |(req, st): (GenerationRequest, Arc<Mutex<(Option<f64>, usize)>>)| {
            let sink: Sink = Box::new(move |ev| {
                if let StreamEvent::Text(_) = ev {
                    let mut s = st.lock().expect("stats");
                    s.0.get_or_insert(t0.elapsed().as_secs_f64());
                    s.1 += 1;
                }
                true
            });
            (req, sink)
        },
    );
    let total = t0.elapsed().as_secs_f64();
    let ttft: f64 = stats
        .iter()
        .map(|s| s.lock().expect("stats").0.unwrap_or(total))
        .sum::<f64>()
        / prompts.len() as f64;
    let n: usize = stats.iter().map(|s| s.lock().expect("stats").1).sum();
    (ttft, n as f64 / total)
}

/// Tokens/s of decode steps alone, one stream vs `prompts.len()` streams in one batch: every
/// prompt is prefilled first, then `steps` batched steps run (greedy, fixed next tokens).
fn decode_only<B: burn::prelude::Backend>(
    g: &ragfleet_models::llama::Generator<B>,
    prompts: &[&str],
    steps: usize,
) -> (f64, f64) {
    use ragfleet_models::llama::KvCache;
    let m = g.model();
    let device = Default::default();
    let rate = |n: usize| {
        let mut caches: Vec<KvCache<B>> = prompts[..n]
            .iter()
            .map(|p| {
                let mut c = KvCache::new(m.cfg.layers);
                m.forward(&[g.tokenizer().chat_prompt("", p)], &mut [&mut c], &device);
                c
            })
            .collect();
        let t = std::time::Instant::now();
        for step in 0..steps {
            let tokens: Vec<Vec<u32>> = (0..n).map(|i| vec![(100 + step + i) as u32]).collect();
            let mut refs: Vec<&mut KvCache<B>> = caches.iter_mut().collect();
            m.forward(&tokens, &mut refs, &device);
        }
        (n * steps) as f64 / t.elapsed().as_secs_f64()
    };
    (rate(1), rate(prompts.len()))
}

/// A sentence repeated into a long generator prompt (~13 tokens).
const LONG_PROMPT: &str = "Rust's ownership model makes memory safety a compile-time property. ";

fn generate<B: burn::prelude::Backend>(
    models: &std::path::Path,
    tokens: usize,
    py: Option<&std::path::Path>,
) -> Result<()> {
    ragfleet_models::lanes::keep_activation_memory();
    let gguf = models.join(ragfleet_models::fetch::GENERATOR_GGUF);
    let g = ragfleet_models::llama::Generator::<B>::load_gguf(&gguf, &Default::default())?;
    let prompts = [
        "Write one sentence about vector databases.",
        "What is the capital of France?",
        "Explain what a hash map is.",
        "Name three colors and a fruit.",
    ];
    let (ttft1, tps1) = run_streams(&g, &prompts[..1], tokens);
    let (ttft4, tps4) = run_streams(&g, &prompts, tokens);
    println!("streams  mean TTFT (s)  tokens/s (all streams)");
    println!("{:>7}  {:>13.2}  {:>22.1}", 1, ttft1, tps1);
    println!("{:>7}  {:>13.2}  {:>22.1}", 4, ttft4, tps4);
    println!(
        "continuous batching: 4 streams give {:.2}x the tokens/s of 1",
        tps4 / tps1
    );
    let (d1, d4) = decode_only(&g, &prompts, tokens);
    println!(
        "decode steps alone (prompts prefilled first): 1 stream {d1:.1} tokens/s, 4 streams \
         {d4:.1} tokens/s in all = {:.2}x",
        d4 / d1
    );
    // prefill of a long prompt (a RAG context): one forward pass over every token, best of 3
    let long = LONG_PROMPT.repeat(40);
    let long_ids = g.tokenizer().encode(&long);
    let prefill = (0..3)
        .map(|_| {
            let t = std::time::Instant::now();
            g.prompt_logits(&long_ids);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    println!(
        "prefill of a {}-token prompt: {:.2} s ({:.0} tokens/s)",
        long_ids.len(),
        prefill,
        long_ids.len() as f64 / prefill
    );
    if let Some(py) = py {
        let r = reference(
            py,
            MODELS_REFERENCE,
            &[
                "generate".into(),
                "--gguf".into(),
                gguf.display().to_string(),
                "--tokens".into(),
                tokens.to_string(),
                "--prompts".into(),
                prompts.join("\n"),
                "--long".into(),
                long,
            ],
        )?;
        println!(
            "transformers (PyTorch, f32 from the same GGUF, static batch of the same prompts):"
        );
        for v in r {
            if let Some(t) = v["prefill_s"].as_f64() {
                println!(
                    "prefill of the same {}-token prompt: {t:.2} s; ragfleet / transformers: {:.2}x the speed",
                    v["prefill_tokens"].as_u64().unwrap_or(0),
                    t / prefill
                );
                continue;
            }
            let (n, ttft, tps) = (
                v["streams"].as_u64().unwrap_or(0),
                v["ttft"].as_f64().unwrap_or(0.0),
                v["rate"].as_f64().unwrap_or(0.0),
            );
            let (mt, mr) = if n == 1 { (ttft1, tps1) } else { (ttft4, tps4) };
            println!(
                "{n:>7}  {ttft:>13.2}  {tps:>22.1}   ragfleet / transformers: TTFT {:.2}x, tokens/s {:.2}x",
                mt / ttft,
                mr / tps
            );
        }
    }
    Ok(())
}

/// Writes `rows` as consecutive little-endian values (what the reference scripts read).
struct IndexBench {
    n: usize,
    nq: usize,
    efs: Vec<usize>,
    efc: usize,
    m: usize,
    instant: bool,
    kernels: Vec<ragfleet_index::vector::Int8Kernel>,
    clusters: usize,
    intrinsic: usize,
    noise: f32,
    vectors: Option<std::path::PathBuf>,
    reference: Option<std::path::PathBuf>,
}

/// The int8 kernels this CPU runs, by name.
fn kernel_names() -> String {
    ragfleet_index::vector::Int8Kernel::usable()
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One point of a recall/QPS curve.
struct Point {
    lib: String,
    ef: usize,
    recall: f64,
    qps: f64,
}

fn index(b: IndexBench) -> Result<()> {
    use ragfleet_index::ann::{exact_top_k, Ann};
    use ragfleet_index::eval::{clustered_with, write_rows_le};
    use ragfleet_index::hnsw::{Hnsw, HnswParams};
    use ragfleet_index::vector::normalize;
    use std::time::Instant;
    const K: usize = 10;
    let threads = threads();
    let norm = |mut v: Vec<f32>| {
        normalize(&mut v);
        v
    };
    let t = Instant::now();
    let (data, queries, what) = match &b.vectors {
        None => (
            clustered_with(b.n, 384, b.clusters, b.intrinsic, b.noise, 1, 2)
                .into_iter()
                .map(norm)
                .collect::<Vec<_>>(),
            clustered_with(b.nq, 384, b.clusters, b.intrinsic, b.noise, 1, 3)
                .into_iter()
                .map(norm)
                .collect::<Vec<_>>(),
            format!(
                "{} clusters, {} directions each, noise {}",
                b.clusters, b.intrinsic, b.noise
            ),
        ),
        Some(path) => {
            let (mut rows, queries) = crate::bench_set::BenchSet::from_files(path, None, b.nq)?
                .into_rows()
                .ok_or_else(|| anyhow::anyhow!("{} read as no file set", path.display()))?;
            rows.truncate(b.n);
            (rows, queries, format!("from {}", path.display()))
        }
    };
    let dim = data.first().map_or(0, Vec::len);
    println!(
        "{} vectors x {dim} ({what}), {} queries, k = {K}, M = {}, ef_construction = {}, \
         {threads} build threads, 1 search thread; data {:.1} s",
        data.len(),
        b.nq,
        b.m,
        b.efc,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let truth = exact_top_k(&data, &queries, K, threads);
    let exact_qps = b.nq as f64 / t.elapsed().as_secs_f64() / threads as f64;
    println!("exact scan: {exact_qps:.0} QPS per thread (the truth for recall)");

    let mut points: Vec<Point> = Vec::new();
    let mut builds: Vec<(String, f64)> = Vec::new();
    let ef_list = b
        .efs
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if let Some(py) = &b.reference {
        let dir = tempfile::tempdir()?;
        write_rows_le(&dir.path().join("vectors.f32"), &data, f32::to_le_bytes)?;
        write_rows_le(&dir.path().join("queries.f32"), &queries, f32::to_le_bytes)?;
        write_rows_le(&dir.path().join("truth.u32"), &truth, u32::to_le_bytes)?;
        let args: Vec<String> = [
            "--dir",
            &dir.path().to_string_lossy(),
            "--dim",
            &dim.to_string(),
            "--k",
            &K.to_string(),
            "--m",
            &b.m.to_string(),
            "--efc",
            &b.efc.to_string(),
            "--ef",
            &ef_list,
        ]
        .map(String::from)
        .to_vec();
        for v in reference(py, ANN_REFERENCE, &args)? {
            let lib = v["lib"].as_str().unwrap_or("?").to_string();
            if let Some(s) = v["build_s"].as_f64() {
                builds.push((lib, s));
            } else {
                points.push(Point {
                    lib,
                    ef: v["ef"].as_u64().unwrap_or(0) as usize,
                    recall: v["recall"].as_f64().unwrap_or(0.0),
                    qps: v["qps"].as_f64().unwrap_or(0.0),
                });
            }
        }
    }

    let dim_flat: Vec<f32> = data.iter().flatten().copied().collect();
    let score = |found: &[Vec<u32>]| -> f64 {
        let hit: usize = found
            .iter()
            .zip(&truth)
            .map(|(f, t)| t.iter().filter(|x| f.contains(x)).count())
            .sum();
        hit as f64 / (K * b.nq) as f64
    };
    let params = HnswParams {
        m: b.m,
        ef_construction: b.efc,
        seed: 1,
    };
    // one point of a curve: every query timed on one thread, recall against the truth
    let point = |lib: &str, ef: usize, search: &mut dyn FnMut(&[f32]) -> Vec<u32>| {
        let t = Instant::now();
        let found: Vec<Vec<u32>> = queries.iter().map(|q| search(q)).collect();
        Point {
            lib: lib.into(),
            ef,
            recall: score(&found),
            qps: b.nq as f64 / t.elapsed().as_secs_f64(),
        }
    };
    let in_use = ragfleet_index::vector::int8_kernel();
    for (i, &kernel) in b.kernels.iter().enumerate() {
        ragfleet_index::vector::set_int8_kernel(kernel);
        let lib = if i == 0 {
            "ragfleet".to_string()
        } else {
            format!("rf-{}", kernel.name())
        };
        let t = Instant::now();
        let own = Hnsw::build(dim, &dim_flat, params, threads);
        builds.insert(i, (lib.clone(), t.elapsed().as_secs_f64()));
        for &ef in &b.efs {
            points.push(point(&lib, ef, &mut |q| {
                let exact = |i: u32| ragfleet_index::vector::dot(q, &data[i as usize]);
                own.search_with(q, K, ef, &|_| true, Some(&exact))
                    .into_iter()
                    .map(|x| x.1)
                    .collect()
            }));
        }
        println!(
            "{lib} graph (int8 kernel {}) in memory: {:.1} MB ({:.0} bytes a vector)",
            kernel.name(),
            own.memory_bytes() as f64 / 1e6,
            own.memory_bytes() as f64 / data.len() as f64
        );
    }
    ragfleet_index::vector::set_int8_kernel(in_use);
    drop(dim_flat);
    if b.instant {
        let t = Instant::now();
        let mut ann = Ann::build(data, b.efc, b.efs.first().copied().unwrap_or(K), 1);
        builds.push(("instant".into(), t.elapsed().as_secs_f64()));
        let mut search = ragfleet_index::ann::Search::default();
        for &ef in &b.efs {
            ann = ann.with_ef_search(ef.max(K))?;
            points.push(point("instant", ef, &mut |q| ann.search(q, K, &mut search)));
        }
    }

    println!("\n{:<16} {:>10}", "library", "build s");
    for (lib, s) in &builds {
        println!("{lib:<16} {s:>10.1}");
    }
    println!(
        "\n{:<16} {:>5} {:>10} {:>10}",
        "library", "ef", "recall@10", "QPS"
    );
    for p in &points {
        println!(
            "{:<16} {:>5} {:>10.4} {:>10.0}",
            p.lib, p.ef, p.recall, p.qps
        );
    }
    println!("\nbest QPS at a recall target (ef in brackets); ratios are ragfleet / other");
    let libs: Vec<String> = builds.iter().map(|(l, _)| l.clone()).collect();
    for target in [0.90, 0.95, 0.99] {
        let best = |lib: &str| {
            points
                .iter()
                .filter(|p| p.lib == lib && p.recall >= target)
                .max_by(|a, b| a.qps.total_cmp(&b.qps))
        };
        let mine = best("ragfleet");
        let mut line = format!("recall >= {target:.2}:");
        for lib in &libs {
            match best(lib) {
                Some(p) => line += &format!("  {lib} {:.0} QPS (ef {})", p.qps, p.ef),
                None => line += &format!("  {lib} not reached"),
            }
        }
        for lib in libs.iter().skip(1) {
            if let (Some(m), Some(o)) = (mine, best(lib)) {
                line += &format!("  x{:.2} vs {lib}", m.qps / o.qps);
            }
        }
        println!("{line}");
    }
    let mine = builds[0].1;
    for (lib, s) in builds.iter().skip(1) {
        println!("build time: ragfleet / {lib} = {:.2}", mine / s);
    }
    Ok(())
}
