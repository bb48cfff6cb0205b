//! What `bench shard` measures with: the process's memory, a run of timed searches, whether a
//! shard's background work has settled, the set's intrinsic dimensionality, and the sizes'
//! latencies taken side by side.
use std::time::Instant;

use anyhow::Result;
use ragfleet_index::ann::lid_mle;
use ragfleet_index::SharedShard;
use ragfleet_proto::SearchQuery;

use super::Kept;
use crate::eval_answers::percentile;

/// The process's resident memory: (its own, anonymous; mapped file pages), in bytes.
pub(super) fn resident_bytes() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("RssAnon:"), field("RssFile:"))
}

/// Bytes of the files under `dir`.
pub(super) fn disk_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Neighbours the intrinsic dimensionality is estimated from (the exact top k is taken this
/// deep; recall counts its first 10).
pub(super) const LID_NEIGHBOURS: usize = 20;

/// The median over the queries of [`lid_mle`] on their exact nearest neighbours (NaN if none
/// has an estimate).
pub(super) fn median_lid(scored: &[Vec<(f32, u32)>]) -> f64 {
    let mut lids: Vec<f64> = scored
        .iter()
        .filter_map(|top| lid_mle(&top.iter().map(|h| h.0).collect::<Vec<_>>()))
        .collect();
    if lids.is_empty() {
        return f64::NAN;
    }
    percentile(&mut lids, 0.5)
}

/// Latency (ms) of every query, run one at a time.
pub(super) fn timed(ix: &SharedShard, qs: &[SearchQuery]) -> Result<Vec<f64>> {
    qs.iter()
        .map(|q| {
            let t = Instant::now();
            ix.read().search(q)?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        })
        .collect()
}

/// Whether the background work is done: every graph built, no merge running or due, the
/// merged-away segments freed.
pub(super) fn settled(ix: &SharedShard) -> bool {
    let r = ix.read();
    let (segs, built) = r.segment_stats();
    segs == built && !r.merging() && !r.needs_maintenance() && r.segments_being_freed() == 0
}

/// Rounds of [`alternate`]: each size timed once a round.
pub(super) const ALTERNATE_ROUNDS: usize = 5;

/// The ratios between consecutive sizes' p50 taken side by side: `rounds` rounds, each timing
/// every size's dense and BM25 queries in turn, the ratio taken within each round (this
/// machine's speed drifts by tens of percent between sittings minutes apart, and the sizes
/// are otherwise measured one after the other, the larger minutes later); the median round's
/// ratio and the range.
pub(super) fn alternate(kept: &[Kept], rounds: usize) -> Result<String> {
    // per round, per size: (dense p50, BM25 p50)
    let mut taken: Vec<Vec<(f64, f64)>> = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let mut round = Vec::with_capacity(kept.len());
        for k in kept {
            timed(&k.ix, &k.dense[..k.dense.len().min(20)])?; // its caches warm again
            let mut d = timed(&k.ix, &k.dense)?;
            let mut b = timed(&k.ix, &k.bm25)?;
            round.push((percentile(&mut d, 0.5), percentile(&mut b, 0.5)));
        }
        taken.push(round);
    }
    let mut lines = Vec::new();
    for i in 1..kept.len() {
        let ratio = |f: fn(&(f64, f64)) -> f64| {
            let mut r: Vec<f64> = taken.iter().map(|t| f(&t[i]) / f(&t[i - 1])).collect();
            // (sorted by the percentile)
            let median = percentile(&mut r, 0.5);
            (median, r[0], r[r.len() - 1])
        };
        let (d, dl, dh) = ratio(|t| t.0);
        let (m, ml, mh) = ratio(|t| t.1);
        let p50s = |i: usize, f: fn(&(f64, f64)) -> f64| {
            let mut v: Vec<f64> = taken.iter().map(|t| f(&t[i])).collect();
            percentile(&mut v, 0.5)
        };
        lines.push(format!(
            "side by side, {rounds} rounds alternating the sizes ({} at ef {} -> {} at ef {}): dense p50 {:.3} -> {:.3} ms, x{d:.2} (rounds x{dl:.2}-x{dh:.2}); BM25 p50 {:.3} -> {:.3} ms, x{m:.2} (x{ml:.2}-x{mh:.2})",
            kept[i - 1].n,
            kept[i - 1].ef,
            kept[i].n,
            kept[i].ef,
            p50s(i - 1, |t| t.0),
            p50s(i, |t| t.0),
            p50s(i - 1, |t| t.1),
            p50s(i, |t| t.1),
        ));
    }
    Ok(lines.join("\n"))
}

/// The calling thread's CPU time and context switches so far.
pub(super) struct ThreadUsage {
    pub(super) cpu_ms: f64,
    pub(super) involuntary: i64,
    pub(super) voluntary: i64,
    pub(super) minor_faults: i64,
    pub(super) major_faults: i64,
}

impl ThreadUsage {
    #[cfg(target_os = "linux")]
    pub(super) fn now() -> ThreadUsage {
        // SAFETY: both calls only write the zeroed structs passed to them, which outlive them.
        let (usage, ts) = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
            let mut ts: libc::timespec = std::mem::zeroed();
            libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
            (usage, ts)
        };
        ThreadUsage {
            cpu_ms: ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6,
            involuntary: usage.ru_nivcsw,
            voluntary: usage.ru_nvcsw,
            minor_faults: usage.ru_minflt,
            major_faults: usage.ru_majflt,
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn now() -> ThreadUsage {
        ThreadUsage {
            cpu_ms: 0.0,
            involuntary: 0,
            voluntary: 0,
            minor_faults: 0,
            major_faults: 0,
        }
    }
}
