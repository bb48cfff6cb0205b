//! Writes `bench shard`'s vector set for a reference library to read: `cargo run --release -p
//! ragfleet-index --example export_set -- N DIR` writes DIR/vectors.f32 (N 384-d unit vectors),
//! DIR/queries.f32 (its 1,000 queries) and DIR/truth.u32 (their exact top 10), the layout
//! `crates/index/bench/ann_reference.py --dir DIR --dim 384` reads, so hnswlib's cost over
//! sizes can be set beside the shard's on the same vectors.
use ragfleet_index::ann::exact_top_k;
use ragfleet_index::eval::{bench_shard_set, write_rows_le};
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).ok_or("N")?;
    let dir = std::path::PathBuf::from(args.next().ok_or("a DIR")?);
    std::fs::create_dir_all(&dir)?;
    let dim = 384;
    let data = bench_shard_set(n, dim, 1);
    let queries = bench_shard_set(1000, dim, u64::MAX - 1);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let truth = exact_top_k(&data, &queries, 10, threads);
    write_rows_le(&dir.join("vectors.f32"), &data, f32::to_le_bytes)?;
    write_rows_le(&dir.join("queries.f32"), &queries, f32::to_le_bytes)?;
    write_rows_le(&dir.join("truth.u32"), &truth, u32::to_le_bytes)?;
    println!(
        "{n} vectors, {} queries written to {}",
        queries.len(),
        dir.display()
    );
    Ok(())
}
