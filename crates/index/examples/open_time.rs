//! How long a shard's folder takes to open (every file's checksum read, the chunks' ids and
//! maps rebuilt, graphs mapped and checked) and what the process then holds: `cargo run
//! --release -p ragfleet-index --example open_time -- DIR` on a folder a `bench shard --dir`
//! left (its `<size>` subfolder). Run it twice to see a warm page cache against a cold one
//! (`echo 3 > /proc/sys/vm/drop_caches` between, as root).
use ragfleet_index::{IndexSettings, ShardIndex};
use std::time::Instant;

fn main() {
    let dir = std::env::args().nth(1).expect("a shard folder");
    let t = Instant::now();
    let settings = IndexSettings {
        background: false,
        ..Default::default()
    };
    let (ix, report) = ShardIndex::open(std::path::Path::new(&dir), settings).unwrap();
    let opened = t.elapsed().as_secs_f64();
    let t = Instant::now();
    ix.wait_for_graphs(std::time::Duration::from_secs(3600));
    println!(
        "{} chunks in {} segments: opened in {opened:.2} s, graphs ready {:.2} s later; problems: {:?}",
        ix.chunk_count(),
        report.segments,
        t.elapsed().as_secs_f64(),
        report.problems
    );
}
