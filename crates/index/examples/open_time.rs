//! How long a shard's folder takes to open again (every file's checksum read, the chunks'
//! sequence numbers and maps rebuilt, graphs mapped and checked): `cargo run --release -p
//! ragfleet-index --example open_time -- N` writes N one-chunk documents of `bench shard`'s
//! 384-d set through a shard's write path (segments of 2,048, merged in the foreground), closes
//! it, and opens it twice (the page cache warm from the writes).
use ragfleet_index::eval::{bench_shard_set, synthetic_model, upserts_from};
use ragfleet_index::{IndexSettings, ShardIndex};
use std::time::Instant;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(100_000, |s| s.parse().expect("a chunk count"));
    let dim = 384;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let model = synthetic_model(dim);
    let settings = IndexSettings {
        segment_size: 2048,
        background: false,
        ..Default::default()
    };
    let t = Instant::now();
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), settings.clone()).expect("open");
        for start in (0..n).step_by(10_000) {
            let count = 10_000.min(n - start);
            let ops = upserts_from(start, bench_shard_set(count, dim, start as u64 + 1), |i| {
                format!("text of chunk {i}")
            });
            ix.write(ops, &model).expect("write");
        }
        ix.seal().expect("seal");
        println!(
            "{n} chunks written in {:.1} s ({} segments)",
            t.elapsed().as_secs_f64(),
            ix.segment_stats().0
        );
    }
    for round in 1..=2 {
        let t = Instant::now();
        let (ix, report) = ShardIndex::open(dir.path(), settings.clone()).expect("reopen");
        let opened = t.elapsed().as_secs_f64();
        ix.wait_for_graphs(std::time::Duration::from_secs(3600));
        println!(
            "open {round}: {} chunks in {} segments opened in {opened:.2} s, graphs ready {:.2} s after the start; problems: {:?}",
            ix.chunk_count(),
            report.segments,
            t.elapsed().as_secs_f64(),
            report.problems
        );
    }
}
