//! `ragfleet bench`: throughput of the models and the index, each beside a baseline measured in
//! the same run, reported as ratios.
use anyhow::Result;
use clap::Subcommand;

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCmd {
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
