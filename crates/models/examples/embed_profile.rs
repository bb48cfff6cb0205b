//! Times the CPU embedder on long inputs (a profiling aid): `cargo run --release -p
//! ragfleet-models --example embed_profile -- MODEL_DIR [BATCH] [SECS]`.
use ragfleet_models::backend::Cpu;
use ragfleet_models::Embedder;

fn main() {
    ragfleet_models::lanes::keep_activation_memory();
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let batch: usize = args.get(2).map_or(8, |s| s.parse().unwrap());
    let secs: f64 = args.get(3).map_or(5.0, |s| s.parse().unwrap());
    let short = args.get(4).is_some_and(|s| s == "short");
    let lanes: usize = args.get(5).map_or(1, |s| s.parse().unwrap());
    let e = Embedder::<Cpu>::load(&dir, &Default::default())
        .unwrap()
        .with_lanes(lanes);
    let text = if short {
        "How do shards bound the latency of a query?".to_string()
    } else {
        "Replication keeps a copy of every shard on another node. ".repeat(40)
    };
    let texts = vec![text; batch];
    e.embed(&texts).unwrap();
    let t = std::time::Instant::now();
    let mut n = 0;
    while t.elapsed().as_secs_f64() < secs {
        e.embed(&texts).unwrap();
        n += 1;
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "batch {batch}: {:.1} texts/s ({:.1} ms a call)",
        (n * batch) as f64 / el,
        el * 1000.0 / n as f64
    );
}
