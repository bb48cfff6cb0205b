//! Search time, recall@10 and the worst query's neighbours found, by the beam of the levels
//! above level 0 and by `ef`, on one graph: `cargo run --release -p ragfleet-index --example
//! upper_beam -- N FILE [BEAMS] [M] [EFC]` (N 384-d vectors of `bench shard`'s clustered set;
//! the graph, of degree M (default 16) and construction beam EFC (default 100), is kept in FILE
//! and read from it when it is there; BEAMS comma-separated, default 16,6,4,3; 1,000 queries,
//! the true neighbours by exact search; the best of three rounds).
use ragfleet_index::ann::exact_top_k;
use ragfleet_index::eval::bench_shard_set;
use ragfleet_index::hnsw::{GraphMemory, Hnsw, HnswParams};
use ragfleet_index::vector::dot;
use std::sync::Arc;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let path = std::path::PathBuf::from(args.next().ok_or("a graph FILE")?);
    let beams: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "16,6,4,3".into())
        .split(',')
        .map(|b| b.parse())
        .collect::<Result<_, _>>()?;
    let m: usize = args.next().map_or(Ok(16), |m| m.parse())?;
    let ef_construction: usize = args.next().map_or(Ok(100), |m| m.parse())?;
    let dim = 384;
    let data = bench_shard_set(n, dim, 1);
    let queries = bench_shard_set(1000, dim, u64::MAX - 1);
    if !path.exists() {
        let flat: Vec<f32> = data.iter().flatten().copied().collect();
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        let t = Instant::now();
        let built = Hnsw::build(
            dim,
            &flat,
            HnswParams {
                m,
                ef_construction,
                ..HnswParams::default()
            },
            threads,
        );
        println!("built in {:.1} s", t.elapsed().as_secs_f64());
        std::fs::write(&path, built.to_bytes_at(0))?;
    }
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let truth = exact_top_k(&data, &queries, 10, threads);
    let file = std::fs::File::open(&path)?;
    // SAFETY: the file is written above or by an earlier run, and nothing changes it while mapped.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }?);
    let mut g = Hnsw::from_map(map, 0).map_err(|e| e.to_string())?;
    let budget: &'static GraphMemory = Box::leak(Box::new(GraphMemory::new(usize::MAX)));
    g.into_memory(budget);
    for &beam in &beams {
        for ef in [16, 24, 32, 40, 48, 64] {
            let (mut best, mut found, mut worst) = (f64::INFINITY, 0, 10);
            for round in 0..3 {
                let t = Instant::now();
                for (q, truth) in queries.iter().zip(&truth) {
                    let exact = |i: u32| dot(q, &data[i as usize]);
                    let got = g.search_in(q, 10, ef, beam, &|_| true, Some(&exact));
                    if round == 0 {
                        let hits = got.iter().filter(|x| truth.contains(&x.1)).count();
                        found += hits;
                        worst = worst.min(hits);
                    }
                }
                best = best.min(t.elapsed().as_secs_f64() * 1e3 / queries.len() as f64);
            }
            println!(
                "upper beam {beam:>2}, ef {ef:>2}: {best:.4} ms a query, recall@10 {:.4}, the worst query found {worst} of 10",
                found as f64 / (10 * queries.len()) as f64
            );
        }
    }
    Ok(())
}
