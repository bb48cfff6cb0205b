//! Search time of one graph walked from its mapped file (4 KiB pages of the page cache) and
//! after [`Hnsw::into_memory`] (anonymous memory advised to be backed by huge pages), in one
//! run on the same queries: `cargo run --release -p ragfleet-index --example graph_pages -- N
//! [FILE]` (N 384-d vectors of `bench shard`'s clustered set, default 100,000; the graph is
//! kept in FILE when given, and read from it when it is there, so that two builds of the code
//! can be compared on the same graph).
use ragfleet_index::eval::bench_shard_set;
use ragfleet_index::hnsw::{GraphMemory, Hnsw, HnswParams};
use ragfleet_index::vector::dot;
use std::sync::Arc;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let dim = 384;
    let data = bench_shard_set(n, dim, 1);
    let queries = bench_shard_set(2000, dim, u64::MAX - 1);
    let dir = tempfile::tempdir()?;
    let path = std::env::args()
        .nth(2)
        .map_or_else(|| dir.path().join("g.hnsw"), std::path::PathBuf::from);
    if path.exists() {
        println!("{n} vectors: graph read from {}", path.display());
    } else {
        let flat: Vec<f32> = data.iter().flatten().copied().collect();
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        let t = Instant::now();
        let built = Hnsw::build(dim, &flat, HnswParams::default(), threads);
        println!(
            "{n} vectors: graph built in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        std::fs::write(&path, built.to_bytes_at(0))?;
    }
    let file = std::fs::File::open(&path)?;
    // SAFETY: the file was written above and nothing changes it while mapped.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }?);
    let mapped = Hnsw::from_map(map.clone(), 0).map_err(|e| e.to_string())?;
    let mut in_memory = Hnsw::from_map(map, 0).map_err(|e| e.to_string())?;
    let budget: &'static GraphMemory = Box::leak(Box::new(GraphMemory::new(usize::MAX)));
    if !in_memory.into_memory(budget) {
        return Err("the graph was not copied into memory".into());
    }
    let huge = std::fs::read_to_string("/proc/self/smaps_rollup")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("AnonHugePages"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        .unwrap_or_else(|| "?".into());
    println!(
        "in memory: {:.0} MB, of which the kernel backs {huge} kB with huge pages",
        budget.used() as f64 / 1e6
    );
    // ms a query, the best of three rounds over every query
    let time = |g: &Hnsw, ef: usize| {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                for q in &queries {
                    let exact = |i: u32| dot(q, &data[i as usize]);
                    std::hint::black_box(g.search_with(q, 10, ef, &|_| true, Some(&exact)));
                }
                t.elapsed().as_secs_f64() * 1e3 / queries.len() as f64
            })
            .fold(f64::INFINITY, f64::min)
    };
    for ef in [24, 48, 64] {
        // alternated, so that a slow spell of the machine falls on both
        let (a, b) = (time(&mapped, ef), time(&in_memory, ef));
        let (c, d) = (time(&in_memory, ef), time(&mapped, ef));
        let (file_ms, mem_ms) = (a.min(d), b.min(c));
        println!(
            "ef {ef}: mapped file {file_ms:.4} ms, huge pages {mem_ms:.4} ms a query: x{:.2}",
            mem_ms / file_ms
        );
    }
    Ok(())
}
