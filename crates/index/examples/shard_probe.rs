//! One shard as an idle replica serves it: `cargo run --release -p ragfleet-index --example
//! shard_probe -- N DIR [EF] [ROUNDS]` writes `bench shard`'s 384-d set into the shard in DIR
//! (opened, or made) up to N one-chunk documents, in batches of 2,048 with background graphs
//! and merges (segments of 2,048, an idle time of 1 s), waits until the idle seal and every
//! merge are done, then times 1,000 dense queries at beam EF (default 24) ROUNDS times
//! (default 3): p50, mean and recall@10 against exact search. Run again with a larger N, it
//! adds the documents after those the folder holds (the set's first N are the same for every
//! N), so a shard's state before and after a change of policy can be timed on the same data.
//! Each round also counts the queries by how many of their true ten they found.
//! `SHARD_PROBE_TIMES_ONLY=1` skips the set and the exact answers (no recall is printed): for a
//! shard already written, timed in little memory (a memory cgroup of less than its files, say).
//! `SHARD_PROBE_GRAPH_MEMORY_MB=M` copies at most M MB of graphs into memory (0: every graph is
//! walked from its file); unset, the process's default budget.
use ragfleet_index::ann::exact_top_k;
use ragfleet_index::eval::{bench_shard_set, dense_queries, settle, synthetic_model, upserts_from};
use ragfleet_index::hnsw::GraphMemory;
use ragfleet_index::{IndexSettings, ShardIndex};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().ok_or("N documents")?.parse()?;
    let dir = std::path::PathBuf::from(args.next().ok_or("a shard folder DIR")?);
    let ef: usize = args.next().map_or(Ok(24), |e| e.parse())?;
    let rounds: usize = args.next().map_or(Ok(3), |e| e.parse())?;
    let settings = IndexSettings {
        segment_size: 2048,
        ef_search: ef,
        background: true,
        seal_idle: Some(Duration::from_secs(1)),
        graph_memory: match std::env::var("SHARD_PROBE_GRAPH_MEMORY_MB") {
            Ok(mb) => Some(&*Box::leak(Box::new(GraphMemory::new(
                mb.parse::<usize>()? << 20,
            )))),
            Err(_) => None,
        },
        ..IndexSettings::default()
    };
    let (mut ix, _) = ShardIndex::open(&dir, settings)?;
    let times_only = std::env::var_os("SHARD_PROBE_TIMES_ONLY").is_some();
    let data = if times_only {
        Vec::new()
    } else {
        bench_shard_set(n, 384, 1)
    };
    let have = ix.doc_count() as usize;
    if have < n && times_only {
        return Err("SHARD_PROBE_TIMES_ONLY needs a shard of N documents already".into());
    }
    if have < n {
        let t = Instant::now();
        for start in (have..n).step_by(2048) {
            let end = (start + 2048).min(n);
            let ops = upserts_from(start, data[start..end].to_vec(), |i| {
                format!("w{} w{}", i % 97, i % 1013)
            });
            ix.write(ops, &synthetic_model(384))?;
            ix.maintain()?;
        }
        println!("written in {:.1} s", t.elapsed().as_secs_f64());
    }
    // the shard is idle 1 s after its last write (or its opening): its idle seal and merges
    // are not due before
    let settled = settle(&mut ix, Duration::from_millis(1500))?;
    println!(
        "segments {:?}, growing {}, settled in {:.1} s",
        ix.segment_stats(),
        ix.growing_chunks(),
        settled.as_secs_f64()
    );
    let queries = bench_shard_set(1000, 384, u64::MAX - 1);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let truth = if times_only {
        Vec::new()
    } else {
        exact_top_k(&data, &queries, 10, threads)
    };
    drop(data);
    let qs = dense_queries(&queries);
    for _ in 0..rounds {
        let mut ts = Vec::new();
        let mut found = 0;
        // how many queries found each count of their true ten
        let mut spread = [0usize; 11];
        for (i, q) in qs.iter().enumerate() {
            let s = Instant::now();
            let hits = ix.search(q)?;
            ts.push(s.elapsed().as_secs_f64() * 1e3);
            if let Some(t) = truth.get(i) {
                let here = hits
                    .iter()
                    .filter(|h| t.iter().any(|&i| h.chunk_id == format!("d{i}#0")))
                    .count();
                found += here;
                spread[here.min(10)] += 1;
            }
        }
        ts.sort_by(|a, b| a.total_cmp(b));
        let (p50, mean) = (ts[ts.len() / 2], ts.iter().sum::<f64>() / ts.len() as f64);
        if times_only {
            println!("ef {ef}: p50 {p50:.4} ms mean {mean:.4}");
            continue;
        }
        println!(
            "ef {ef}: p50 {p50:.4} ms mean {mean:.4} recall {:.4}",
            found as f64 / (10 * qs.len()) as f64
        );
        println!("  queries by true neighbours found, 0..=10: {spread:?}");
    }
    Ok(())
}
