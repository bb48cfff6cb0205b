//! `bench shard` during merges: the largest size's dense searches while a merge of small
//! segments runs, and while its largest segment is compacted after a mass delete.
use std::time::{Duration, Instant};

use anyhow::Result;
use ragfleet_index::eval::{one_chunk_upsert, synthetic_model};
use ragfleet_index::SharedShard;
use ragfleet_proto::{SearchQuery, WriteOp};

use super::load::Largest;
use super::measure::{timed, ThreadUsage};
use crate::eval_answers::percentile;
use rand::SeedableRng;

/// Dense p99 while a merge runs against p99 with none, at the largest size: enough chunks
/// are written to seal segments until a merge starts, then queries run until it is done.
pub(super) fn during_merge(at: &Largest) -> Result<(String, usize)> {
    let (ix, dense, set, dim, n) = (at.ix, at.dense, at.set, at.dim, at.n);
    let mut quiet = timed(ix, dense)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut next = n;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !ix.read().merging() {
        if Instant::now() > deadline {
            return Ok(("no merge started within 600 s".into(), next));
        }
        let ops: Vec<WriteOp> = set
            .vectors(next, 512)
            .into_iter()
            .enumerate()
            .map(|(j, v)| {
                one_chunk_upsert(format!("m{}", next + j), v, set.text(next + j, &mut rng))
            })
            .collect();
        next += 512;
        ix.write(ops, &synthetic_model(dim))?;
        ix.maintain()?;
    }
    // the first commit ends the window (a merge beside it may commit first: its window too)
    let (secs, figures) = while_merging(ix, dense, &mut quiet, |_| true)?;
    Ok((format!("during a merge ({secs:.1} s, {figures}"), next))
}

/// Single queries, over and over, until a merge's commit after which `measured` holds (then
/// the window ends), or none runs: its seconds and "N queries): dense p50/p99 during; without:
/// p50/p99 of `quiet`". Merges run beside one another: the commits of others before the one
/// measured are part of its window.
fn while_merging(
    ix: &SharedShard,
    dense: &[SearchQuery],
    quiet: &mut [f64],
    measured: impl Fn(&SharedShard) -> bool,
) -> Result<(f64, String)> {
    let mut during = Vec::new();
    let t = Instant::now();
    // the commit runs under the shard's write lock: searches wait for it. `maintain` says
    // whether it committed (it also runs when a graph build finished meanwhile, committing
    // nothing while the merge runs)
    let mut commit_ms = None;
    while commit_ms.is_none() && ix.read().merging() {
        for q in dense.iter().take(50) {
            let s = Instant::now();
            ix.read().search(q)?;
            during.push(s.elapsed().as_secs_f64() * 1e3);
        }
        if ix.read().needs_maintenance() {
            // the longest the call held the write lock (its preparation beside the searches
            // and the pruning after it are not a hold)
            ix.take_longest_hold();
            if ix.maintain()? && measured(ix) {
                commit_ms = Some(ix.take_longest_hold().as_secs_f64() * 1e3);
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let commit_ms = commit_ms.unwrap_or(0.0);
    let (q99, q50) = (percentile(quiet, 0.99), percentile(quiet, 0.5));
    let n_during = during.len();
    let (d99, d50) = (percentile(&mut during, 0.99), percentile(&mut during, 0.5));
    Ok((
        secs,
        format!(
            "{n_during} queries): dense p50 {d50:.2} ms p99 {d99:.2} ms; without: p50 {q50:.2} ms p99 {q99:.2} ms (p99 x{:.2}); its commit held the index {commit_ms:.1} ms",
            d99 / q99
        ),
    ))
}

/// Dense p99 while the largest segment is compacted against p99 before: over half of the
/// first `n` documents deleted, so the segment holding them is rewritten on its own (its live
/// chunks to a new data file, a fresh graph), the heaviest merge there is.
pub(super) fn during_compaction(
    ix: &SharedShard,
    dense: &[SearchQuery],
    families: &[(&str, std::ops::Range<usize>)],
) -> Result<String> {
    let mut quiet = timed(ix, dense)?;
    // 11 of every 20 of each family of ids written (the ingest's, the writes' and the merge's)
    let doomed: Vec<String> = families
        .iter()
        .flat_map(|(prefix, ids)| {
            ids.clone()
                .filter(|i| i % 20 < 11)
                .map(move |i| format!("{prefix}{i}"))
        })
        .collect();
    let n: usize = families.iter().map(|(_, ids)| ids.len()).sum();
    for ids in doomed.chunks(10_000) {
        ix.delete(ids, 0)?;
    }
    // the one measured is the compaction that drops the largest segment's dead chunks (over
    // half of those deleted); smaller merges (of the last seals, which lost chunks too) run
    // first or beside it
    let stored = ix.read().stored_chunks();
    let half = doomed.len() as u64 / 2;
    let dropped = |ix: &SharedShard| ix.read().stored_chunks() + half <= stored;
    loop {
        ix.maintain()?;
        if !ix.read().merging() {
            return Ok(format!(
                "no compaction started after deleting {} of {n} documents",
                doomed.len()
            ));
        }
        let (secs, figures) = while_merging(ix, dense, &mut quiet, dropped)?;
        if dropped(ix) {
            // the slots are pointed at the copies a bounded batch per maintenance pass, as the
            // shard's owner runs them (each under the write lock)
            let chunks = ix.read().chunks_to_rebind();
            // the longest pass: (ms, on a CPU, voluntary and involuntary context switches)
            let (mut passes, mut longest) = (0, (0.0f64, 0.0f64, 0i64, 0i64));
            // the longest any pass held the write side of the lock, timed by the holder
            let mut held_ms = 0.0f64;
            ix.take_longest_hold();
            let (stolen_before, passes_began) =
                (ragfleet_index::priority::stolen_ms(), Instant::now());
            let deadline = Instant::now() + Duration::from_secs(600);
            let gave_before = ragfleet_index::allocator::give_backs().count;
            // searches beside the passes, the freeing of the merged-away segment after them and
            // the allocator's give-back that follows it: how long one waited for the index at
            // most (a pass's own time also counts what it frees after letting the searches back
            // in), and each one's start and time
            let stop = std::sync::atomic::AtomicBool::new(false);
            let (waited, beside) = std::thread::scope(|s| -> Result<(f64, Vec<(Instant, f64)>)> {
                let searcher = s.spawn(|| -> Result<(f64, Vec<(Instant, f64)>)> {
                    let (mut worst, mut beside) = (0.0f64, Vec::new());
                    for q in dense.iter().cycle() {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        let t = Instant::now();
                        let shard = ix.read();
                        worst = worst.max(t.elapsed().as_secs_f64() * 1e3);
                        shard.search(q)?;
                        drop(shard);
                        beside.push((t, t.elapsed().as_secs_f64() * 1e3));
                    }
                    Ok((worst, beside))
                });
                let r = (|| -> Result<()> {
                    while ix.read().chunks_to_rebind() > 0 && Instant::now() < deadline {
                        let (t, u) = (Instant::now(), ThreadUsage::now());
                        ix.maintain()?;
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        held_ms = held_ms.max(ix.take_longest_hold().as_secs_f64() * 1e3);
                        if ms > longest.0 {
                            let v = ThreadUsage::now();
                            longest = (
                                ms,
                                v.cpu_ms - u.cpu_ms,
                                v.voluntary - u.voluntary,
                                v.involuntary - u.involuntary,
                            );
                        }
                        passes += 1;
                    }
                    // the merged-away segment freed on its thread, then the give-back, as the
                    // shard's owner runs them
                    while Instant::now() < deadline {
                        let shard = ix.read();
                        let (freeing, due) =
                            (shard.segments_being_freed() > 0, shard.needs_maintenance());
                        drop(shard);
                        if due {
                            ix.maintain()?;
                        } else if freeing {
                            std::thread::sleep(Duration::from_millis(2));
                        } else {
                            break;
                        }
                    }
                    Ok(())
                })();
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let searched = searcher
                    .join()
                    .map_err(|_| anyhow::anyhow!("the searcher panicked"))?;
                r.and(searched)
            })?;
            let give_back = give_back_beside(gave_before, &beside, &quiet);
            // what the hypervisor took from the machine meanwhile: a holder whose virtual CPU
            // is not running holds the searches off whatever it does
            let stolen = match (stolen_before, ragfleet_index::priority::stolen_ms()) {
                (Some(a), Some(b)) => format!(
                    "; the hypervisor took {} ms of the machine's CPUs in those {:.1} s",
                    b.saturating_sub(a),
                    passes_began.elapsed().as_secs_f64()
                ),
                _ => String::new(),
            };
            let commits = ix.read().merge_commits();
            let commits = format!(
                "; of the {} merges committed since the open, {} prepared beside the searches (files renamed ahead)",
                commits.all, commits.prepared
            );
            return Ok(format!(
                "during a compaction of the largest segment ({} of {n} documents deleted; {secs:.1} s, {figures}; then {chunks} slots pointed at the copies in {passes} passes of at most {:.1} ms (on a CPU {:.1} ms; context switches: {} waits, {} preemptions), the index held at most {held_ms:.1} ms a pass, a search beside them waiting for it at most {waited:.1} ms{give_back}{stolen}{commits}",
                doomed.len(),
                longest.0,
                longest.1,
                longest.2,
                longest.3
            ));
        }
    }
}

/// What the allocator's give-back after the compaction cost the searches beside it (`beside`:
/// each search's start and milliseconds, from the first pointing pass to the give-back's end):
/// how long it took, the searches that overlapped it and the longest of them, and the p99 of
/// them all against the quiet p99; a line saying so when none ran after `count_before`.
fn give_back_beside(count_before: u64, beside: &[(Instant, f64)], quiet: &[f64]) -> String {
    let gave = ragfleet_index::allocator::give_backs();
    let Some((began, took)) = gave.last.filter(|_| gave.count > count_before) else {
        return "; the allocator gave nothing back (not glibc's, or too little merged away)".into();
    };
    let ended = began + took;
    let overlapping: Vec<f64> = beside
        .iter()
        .filter(|(t, ms)| *t < ended && *t + Duration::from_secs_f64(ms / 1e3) > began)
        .map(|(_, ms)| *ms)
        .collect();
    let longest = overlapping.iter().copied().fold(0.0f64, f64::max);
    let slow = overlapping.iter().filter(|ms| **ms >= 1.0).count();
    let mut all: Vec<f64> = beside.iter().map(|(_, ms)| *ms).collect();
    let mut quiet = quiet.to_vec();
    let (p99, q99) = (percentile(&mut all, 0.99), percentile(&mut quiet, 0.99));
    format!(
        "; the allocator then gave its free memory back in {:.1} ms, {} searches beside it ({slow} of 1 ms or more, the longest {longest:.2} ms); the {} searches from the first pass to its end p99 {p99:.2} ms (x{:.2} the quiet p99)",
        took.as_secs_f64() * 1e3,
        overlapping.len(),
        all.len(),
        p99 / q99
    )
}
