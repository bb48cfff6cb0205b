//! `ragfleet bench`: throughput of the models and the index, each beside a baseline measured in
//! the same run, reported as ratios.
use anyhow::Result;
use clap::Subcommand;

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Shard index: HNSW build time, QPS and recall@10 against exact search in the same run.
    Index {
        /// Vectors (384 dimensions, clustered like real embeddings).
        #[arg(long, default_value_t = 20_000)]
        n: usize,
        /// Queries.
        #[arg(long, default_value_t = 500)]
        queries: usize,
        /// HNSW search beams to measure (each needs its own build: instant-distance fixes it).
        #[arg(long, value_delimiter = ',', default_value = "16,64")]
        ef: Vec<usize>,
    },
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
    },
    /// Embedder sentences/s at several batch sizes, ndarray vs flex backends.
    Embed {
        /// Models dir.
        #[arg(long, default_value = "models")]
        models: std::path::PathBuf,
    },
}

/// Runs a benchmark.
pub async fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Embed { models } => tokio::task::spawn_blocking(move || embed(&models)).await?,
        BenchCmd::Index { n, queries, ef } => {
            tokio::task::spawn_blocking(move || index(n, queries, &ef)).await?
        }
        BenchCmd::Generate {
            models,
            tokens,
            backend,
        } => {
            tokio::task::spawn_blocking(move || match backend.as_str() {
                "ndarray" => generate::<ragfleet_models::backend::CpuNdArray>(&models, tokens),
                _ => generate::<ragfleet_models::backend::Cpu>(&models, tokens),
            })
            .await?
        }
    }
}

fn embed(models: &std::path::Path) -> Result<()> {
    use ragfleet_models::backend::{Cpu, CpuNdArray};
    use ragfleet_models::Embedder;
    let dir = models.join(ragfleet_models::fetch::EMBEDDER_DIR);
    let flex = Embedder::<Cpu>::load(&dir, &Default::default())?;
    let nd = Embedder::<CpuNdArray>::load(&dir, &Default::default())?;
    let short = "How do shards bound the latency of a query?".to_string();
    let long = "Replication keeps a copy of every shard on another node. ".repeat(40);
    println!(
        "{:<8} {:>6} {:>14} {:>14} {:>8}",
        "input", "batch", "flex sent/s", "ndarray sent/s", "ratio"
    );
    for (name, text) in [("short", &short), ("256-tok", &long)] {
        for batch in [1usize, 8, 64, 256] {
            if name == "256-tok" && batch == 256 {
                continue;
            }
            let texts = vec![text.clone(); batch];
            let rate = |f: &dyn Fn() -> ()| {
                f();
                let t = std::time::Instant::now();
                let mut n = 0;
                while t.elapsed().as_secs_f64() < 2.0 || n < 2 {
                    f();
                    n += 1;
                }
                (n * batch) as f64 / t.elapsed().as_secs_f64()
            };
            let a = rate(&|| {
                flex.embed(&texts).expect("embed");
            });
            let b = rate(&|| {
                nd.embed(&texts).expect("embed");
            });
            println!("{name:<8} {batch:>6} {a:>14.1} {b:>14.1} {:>8.2}", a / b);
        }
    }
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
            max_tokens: tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
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

fn generate<B: burn::prelude::Backend>(models: &std::path::Path, tokens: usize) -> Result<()> {
    let g = ragfleet_models::llama::Generator::<B>::load_gguf(
        &models.join(ragfleet_models::fetch::GENERATOR_GGUF),
        &Default::default(),
    )?;
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
    Ok(())
}

fn index(n: usize, nq: usize, efs: &[usize]) -> Result<()> {
    use ragfleet_index::eval::{clustered, recall, truth, upserts};
    use ragfleet_index::{IndexSettings, ShardIndex};
    use ragfleet_proto::{ModelIdentity, SearchMode, SearchQuery};
    use std::time::Instant;
    let model = ModelIdentity {
        name: "bench".into(),
        weights_sha256: "0".into(),
        dim: 384,
        max_len: 0,
        pooling: "mean".into(),
        normalized: true,
    };
    let ops = upserts(clustered(n, 384, 64, 0.05, 1, 2), None);
    let queries: Vec<SearchQuery> = clustered(nq, 384, 64, 0.05, 1, 3)
        .into_iter()
        .map(|v| SearchQuery {
            vector: v,
            text: String::new(),
            k: 10,
            mode: SearchMode::Dense,
            model: None,
        })
        .collect();
    let dir = tempfile::tempdir()?;
    let exact_settings = IndexSettings {
        segment_size: usize::MAX,
        ..IndexSettings::default()
    };
    let (mut exact, _) = ShardIndex::open(&dir.path().join("exact"), exact_settings)?;
    exact.write(ops.clone(), &model)?;
    let t = Instant::now();
    let truth = truth(&exact, &queries)?;
    let exact_qps = nq as f64 / t.elapsed().as_secs_f64();
    println!("{n} vectors x 384, {nq} queries, k = 10; baseline: exact scan {exact_qps:.0} QPS (1 thread)");
    println!(
        "{:>4} {:>10} {:>10} {:>10} {:>12}",
        "ef", "build s", "QPS", "recall@10", "QPS / exact"
    );
    for &ef in efs {
        let settings = IndexSettings {
            segment_size: n,
            merge_below: 1,
            ef_construction: 100,
            ef_search: ef,
            background: false,
        };
        let (mut ix, _) = ShardIndex::open(&dir.path().join(format!("hnsw-{ef}")), settings)?;
        let t = Instant::now();
        ix.write(ops.clone(), &model)?;
        let build = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let r = recall(&ix, &queries, &truth)?;
        let qps = nq as f64 / t.elapsed().as_secs_f64();
        println!(
            "{ef:>4} {build:>10.1} {qps:>10.0} {r:>10.4} {:>12.1}",
            qps / exact_qps
        );
    }
    Ok(())
}
