//! How many segments a shard's searches visit while an ingest streams into it, and what that
//! costs them: `cargo run --release -p ragfleet-index --example ingest_segments -- DIR DOCS
//! [RATE] [EF]` opens the shard in DIR (made by `shard_probe N DIR`: `bench shard`'s 384-d
//! set, segments of 2,048, background graphs and merges), then writes DOCS new one-chunk
//! documents from another thread in batches of 64 at RATE documents a second (0: as fast as
//! it goes), calling the merge policy after each batch as a replica's write path does, while
//! this thread searches back to back (ef EF, default 24). It prints, each tenth of the
//! writes, the segments and those with a graph; then the searches' latency and the segments
//! they visited, during the writes and once the writes are done and the merges settled.
//! DIR is written to: run it on a copy.
use ragfleet_index::eval::{bench_shard_set, dense_queries, synthetic_model, upserts_from};
use ragfleet_index::{IndexSettings, ShardIndex, SharedShard};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// This thread's CPU time, in ms.
fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len().max(1) - 1) as f64 * p) as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().ok_or("a shard folder DIR")?);
    let docs: usize = args.next().ok_or("DOCS")?.parse()?;
    let rate: f64 = args.next().map_or(Ok(0.0), |r| r.parse())?;
    let ef: usize = args.next().map_or(Ok(24), |e| e.parse())?;
    let settings = IndexSettings {
        segment_size: 2048,
        ef_search: ef,
        background: true,
        seal_idle: Some(Duration::from_secs(1)),
        ..IndexSettings::default()
    };
    let (ix, _) = ShardIndex::open(&dir, settings)?;
    let have = ix.doc_count() as usize;
    println!("{have} documents in {} segments", ix.segment_stats().0);
    let ix = SharedShard::new(ix);
    let queries = dense_queries(&bench_shard_set(1000, 384, u64::MAX - 1));
    let first = 10_000_000 + have;
    let batches: Vec<_> = (0..docs)
        .step_by(64)
        .map(|s| {
            let count = 64.min(docs - s);
            upserts_from(
                first + s,
                bench_shard_set(count, 384, (first + s) as u64),
                |i| format!("w{} w{}", i % 97, i % 1013),
            )
        })
        .collect();
    let model = synthetic_model(384);
    let done = AtomicBool::new(false);
    let (mut lat, mut segs, mut built) = (Vec::new(), Vec::new(), Vec::new());
    let (mut waits, mut cpu) = (Vec::new(), Vec::new());
    let started = Instant::now();
    let secs = std::thread::scope(
        |s| -> Result<f64, Box<dyn std::error::Error + Send + Sync>> {
            let writer = s.spawn(|| -> Result<f64, ragfleet_index::IndexError> {
                let t = Instant::now();
                let tenth = (batches.len() / 10).max(1);
                for (b, ops) in batches.into_iter().enumerate() {
                    if rate > 0.0 {
                        let due = t + Duration::from_secs_f64((b * 64) as f64 / rate);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    ix.write(ops, &model)?;
                    ix.maintain()?;
                    if b % tenth == tenth - 1 {
                        let (s, g) = ix.read().segment_stats();
                        println!(
                            "  {:>6.1} s: {} written, {s} segments, {g} with a graph",
                            t.elapsed().as_secs_f64(),
                            (b + 1) * 64
                        );
                    }
                }
                done.store(true, Ordering::Release);
                Ok(t.elapsed().as_secs_f64())
            });
            let mut i = 0;
            while !done.load(Ordering::Acquire) {
                let (t, c) = (Instant::now(), cpu_ms());
                let r = ix.read();
                waits.push(t.elapsed().as_secs_f64() * 1e3);
                let (s, g) = r.segment_stats();
                r.search(&queries[i % queries.len()])?;
                drop(r);
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                cpu.push(cpu_ms() - c);
                segs.push(s as f64);
                built.push(g as f64);
                i += 1;
            }
            Ok(writer.join().expect("writer")?)
        },
    );
    let secs = secs.map_err(|e| e.to_string())?;
    println!(
        "  of the searches: waiting for the lock p50 {:.3} ms, p99 {:.3} ms; on a CPU p50 {:.3} ms, p99 {:.3} ms",
        pct(&mut waits.clone(), 0.5),
        pct(&mut waits, 0.99),
        pct(&mut cpu.clone(), 0.5),
        pct(&mut cpu, 0.99)
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    // over time: each search's count weighted by its time (the searches are back to back)
    let over_time = |v: &[f64]| {
        v.iter().zip(&lat).map(|(s, t)| s * t).sum::<f64>() / lat.iter().sum::<f64>().max(1e-9)
    };
    let (segs_time, built_time) = (over_time(&segs), over_time(&built));
    println!(
        "{docs} documents written in {secs:.1} s ({:.0} a second); {} searches meanwhile: p50 {:.3} ms, p99 {:.3} ms; segments visited mean {:.1} (over time {segs_time:.1}), max {}; with a graph mean {:.1} (over time {built_time:.1})",
        docs as f64 / secs,
        lat.len(),
        pct(&mut lat.clone(), 0.5),
        pct(&mut lat, 0.99),
        mean(&segs),
        segs.iter().copied().fold(0.0, f64::max),
        mean(&built),
    );
    // the merges settle (an idle seal, then the policy's folds)
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        ix.maintain()?;
        let r = ix.read();
        let (s, g) = r.segment_stats();
        if (s == g && !r.merging() && !r.needs_maintenance()) || Instant::now() > deadline {
            break;
        }
        drop(r);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s, _) = ix.read().segment_stats();
    let mut after: Vec<f64> = queries
        .iter()
        .map(|q| {
            let t = Instant::now();
            ix.read().search(q).map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_, _>>()?;
    println!(
        "settled {:.1} s after the start: {s} segments; searches p50 {:.3} ms, p99 {:.3} ms",
        started.elapsed().as_secs_f64(),
        pct(&mut after.clone(), 0.5),
        pct(&mut after, 0.99)
    );
    Ok(())
}
