//! How long writes hold a shard's index away from its searches, the way a replica serves them
//! (the index behind a read-write lock, searches under its read side, writes under its write
//! side): `cargo run --release -p ragfleet-index --example write_stall -- N [DOCS]` writes N
//! one-chunk documents of `bench shard`'s 384-d set (segments of 2,048, background graphs and
//! merges), waits for its graphs, times dense searches alone, then again while another thread
//! writes DOCS more (default 20,000) in batches of 64 with texts, as an ingest does, calling
//! the merge policy every 32 batches: each write whole under the write lock (as replicas did up
//! to session 22), then logged and sealed under the read side and applied under the write side
//! ([`SharedShard`]), twice over; then deletes N/4 documents in one write, whole, and another
//! N/4 logged beside the searches and applied in parts. It prints the searches' latency and
//! their wait for the lock.
use ragfleet_index::eval::{bench_shard_set, dense_queries, synthetic_model, upserts_from};
use ragfleet_index::{IndexSettings, ShardIndex, SharedShard};
use ragfleet_proto::{SearchQuery, WriteOp};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `count` documents numbered from `start`, with texts, as an ingest writes them.
fn ops(start: usize, count: usize) -> Vec<WriteOp> {
    upserts_from(start, bench_shard_set(count, 384, start as u64 + 1), |i| {
        format!("text of chunk {i} about the retrieval of passages from a sharded index under load")
    })
}

fn summary(name: &str, v: &mut [f64]) {
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() - 1) as f64 * p) as usize];
    println!(
        "{name}: {} timed, p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        v.len(),
        at(0.5),
        at(0.99),
        at(0.999),
        v[v.len() - 1]
    );
}

/// One search under the read side: (its whole time, its wait for the lock) in ms.
fn search(index: &SharedShard, q: &SearchQuery) -> (f64, f64) {
    let t = Instant::now();
    let ix = index.read();
    let waited = t.elapsed().as_secs_f64() * 1e3;
    ix.search(q).expect("search");
    drop(ix);
    (t.elapsed().as_secs_f64() * 1e3, waited)
}

/// Runs `work` on another thread while this one searches back to back: (its seconds, the
/// searches' times, their waits for the lock).
fn searching_while(
    index: &Arc<SharedShard>,
    queries: &[SearchQuery],
    work: impl FnOnce(&SharedShard) + Send + 'static,
) -> (f64, Vec<f64>, Vec<f64>) {
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (index, done) = (index.clone(), done.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            work(&index);
            done.store(true, Ordering::Release);
            t.elapsed().as_secs_f64()
        })
    };
    let (mut during, mut waits) = (Vec::new(), Vec::new());
    let mut i = 0;
    while !done.load(Ordering::Acquire) {
        let (took, waited) = search(index, &queries[i % queries.len()]);
        during.push(took);
        waits.push(waited);
        i += 1;
    }
    (writer.join().expect("writer"), during, waits)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(100_000, |s| s.parse().expect("N"));
    let more: usize = args.next().map_or(20_000, |s| s.parse().expect("DOCS"));
    let dir = tempfile::tempdir().expect("a temporary folder");
    let model = synthetic_model(384);
    let settings = IndexSettings {
        segment_size: 2048,
        background: true,
        ..Default::default()
    };
    let (mut ix, _) = ShardIndex::open(dir.path(), settings).expect("open");
    for start in (0..n).step_by(2048) {
        ix.write(ops(start, 2048.min(n - start)), &model)
            .expect("write");
        ix.maintain().expect("maintain");
    }
    ix.seal().expect("seal");
    let deadline = Instant::now() + Duration::from_secs(3600);
    while Instant::now() < deadline {
        ix.maintain().expect("maintain");
        let (segs, built) = ix.segment_stats();
        if segs == built && !ix.merging() && !ix.needs_maintenance() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("{n} chunks in {} segments", ix.segment_stats().0);
    let queries = dense_queries(&bench_shard_set(1000, 384, u64::MAX - 1));
    let index = Arc::new(SharedShard::new(ix));
    let (mut quiet, _): (Vec<f64>, Vec<f64>) = (0..3)
        .flat_map(|_| queries.iter().map(|q| search(&index, q)))
        .unzip();
    summary("searches alone", &mut quiet);
    let mut next = n;
    for round in 0..2 {
        for halves in [false, true] {
            // the batches are made before the clock starts (an embedder's work, not the shard's)
            let batches: Vec<Vec<WriteOp>> = (0..more)
                .step_by(64)
                .map(|s| ops(next + s, 64.min(more - s)))
                .collect();
            next += more;
            let model = model.clone();
            let (secs, mut during, mut waits) = searching_while(&index, &queries, move |index| {
                for (b, batch) in batches.into_iter().enumerate() {
                    if halves {
                        index.write(batch, &model).expect("write");
                    } else {
                        index.exclusive(|ix| ix.write(batch, &model).expect("write"));
                    }
                    if b % 32 == 31 {
                        if halves {
                            index.maintain().expect("maintain");
                        } else {
                            index.exclusive(|ix| ix.maintain().expect("maintain"));
                        }
                    }
                }
            });
            let how = if halves {
                "logged and sealed beside the searches, applied alone"
            } else {
                "each write whole under the write lock"
            };
            println!(
                "round {round}, {how}: {more} documents written in {secs:.2} s ({:.0} a second)",
                more as f64 / secs
            );
            summary("  searches during the writes", &mut during);
            summary("  of which waiting for the lock", &mut waits);
        }
    }
    // a mass delete: a quarter of the documents at once, whole, then another quarter in parts
    for halves in [false, true] {
        let first = if halves { n / 4 } else { 0 };
        let ids: Vec<String> = (first..first + n / 4).map(|i| format!("d{i}")).collect();
        let (secs, mut during, mut waits) = searching_while(&index, &queries, move |index| {
            if halves {
                index.delete(&ids, 1).expect("delete");
            } else {
                index.exclusive(|ix| ix.delete(&ids, 1).expect("delete"));
            }
        });
        let how = if halves {
            "logged beside the searches, applied in parts of ~2 ms"
        } else {
            "whole under the write lock"
        };
        println!("a delete of {} documents, {how}: {secs:.2} s", n / 4);
        summary("  searches during the delete", &mut during);
        summary("  of which waiting for the lock", &mut waits);
    }
}
