//! `bench shard` under load: the largest size's dense searches while another thread writes
//! a stream of new documents through the shard, each search's time split into its lock wait,
//! its CPU and the host's stops.
use std::time::{Duration, Instant};

use anyhow::Result;
use ragfleet_index::eval::{one_chunk_upsert, synthetic_model};
use ragfleet_index::{priority, SharedShard};
use ragfleet_proto::{SearchQuery, WriteOp};

use super::measure::{settled, timed, ThreadUsage};
use crate::bench_set::BenchSet;
use crate::eval_answers::percentile;
use rand::SeedableRng;

/// The largest size's index and queries, for the measurements under load.
pub(super) struct Largest<'a> {
    pub(super) ix: &'a SharedShard,
    pub(super) dense: &'a [SearchQuery],
    pub(super) set: &'a BenchSet,
    pub(super) dim: usize,
    pub(super) n: usize,
}

/// Dense latency while writes come, against the same queries without: another thread writes
/// new documents in batches of 64 through the shard (as a replica takes an ingest, sealing as
/// segments fill) while this one searches back to back; a search waits only while a write
/// applies (in parts of ~2 ms) or a seal commits, besides sharing the cores. Four rounds, each
/// with its own documents (`w0`.. then on): every thread with the kernel's default time
/// slice, then with the short ones a node asks for (`ragfleet_index::priority`), alternating.
/// Returns the lines and the documents written.
pub(super) fn during_writes(at: &Largest) -> Result<(String, usize)> {
    let mut quiet = timed(at.ix, at.dense)?;
    let (q50, q99) = (percentile(&mut quiet, 0.5), percentile(&mut quiet, 0.99));
    let docs = (at.n / 4).clamp(20_000, 100_000);
    let mut lines = Vec::new();
    for (round, short) in [false, true, false, true].into_iter().enumerate() {
        // as a node's runtime sets its threads (RAGFLEET_SHORT_SLICES=0 for the baseline):
        // the searching thread short, the writer the kernel's default but for its holds of
        // the write lock (SharedShard)
        priority::set_short_slices(short);
        let granted = priority::latency_sensitive();
        let (secs, mut costs) = writing(at, round * docs, docs)?;
        let mut during: Vec<f64> = costs.iter().map(|c| c.ms).collect();
        let mut waits: Vec<f64> = costs.iter().map(|c| c.wait_ms).collect();
        let longest = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let (d50, d99) = (percentile(&mut during, 0.5), percentile(&mut during, 0.99));
        let slow = waits.iter().filter(|w| **w >= 3.0).count();
        lines.push(format!(
            "while writes come, {} ({docs} new documents in batches of {} from another thread, {:.0} a second; {} queries): dense p50 {d50:.2} ms p99 {d99:.2} ms, longest {:.1} ms; of which waiting for the lock: p99 {:.2} ms, longest {:.1} ms, {slow} waits of 3 ms or more; without writes: p50 {q50:.2} ms p99 {q99:.2} ms (p99 x{:.2})",
            match (short, granted) {
                (false, _) => "the kernel's default time slices".to_string(),
                (true, true) => format!("searches and the write lock's holds asking a {} ms slice", priority::SHORT_SLICE_NS as f64 / 1e6),
                (true, false) => "short slices asked, not granted here".to_string(),
            },
            WRITE_BATCH,
            docs as f64 / secs,
            during.len(),
            longest(&during),
            percentile(&mut waits, 0.99),
            longest(&waits),
            d99 / q99
        ));
        costs.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        for c in costs.iter_mut().take(5) {
            let q = &at.dense[c.query];
            let again = timed(at.ix, &[q.clone(), q.clone(), q.clone()])?;
            c.again_ms = again.into_iter().reduce(f64::min);
        }
        lines.push(format!(
            "  the longest five: {}",
            costs
                .iter()
                .take(5)
                .map(SearchCost::describe)
                .collect::<Vec<_>>()
                .join("; ")
        ));
        // the graphs and merges the writes left to do, done before the next measurement
        let deadline = Instant::now() + Duration::from_secs(600);
        while !settled(at.ix) && Instant::now() < deadline {
            at.ix.maintain()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // this thread as the runtime's threads are for what follows
    priority::set_short_slices(true);
    priority::latency_sensitive();
    Ok((lines.join("\n"), 4 * docs))
}

/// Documents written from another thread in one batch.
const WRITE_BATCH: usize = 64;

/// What one search cost while writes came, and the shard it searched.
struct SearchCost {
    /// From asking for the read lock to the answer.
    ms: f64,
    /// Of which waiting for the lock.
    wait_ms: f64,
    /// The thread's time on a CPU meanwhile (as its kernel counts it).
    cpu_ms: f64,
    /// Context switches meanwhile, voluntary (a wait) and involuntary (preempted).
    switches: i64,
    /// Page faults meanwhile: minor (a page already in memory mapped on first touch, such as
    /// a freshly written file's) and major (read from disk).
    faults: (i64, i64),
    /// Sealed segments, and of those with their graph built (the rest are scanned).
    segments: usize,
    graphs: usize,
    /// The time the hypervisor took from the machine's CPUs meanwhile (`steal` in
    /// `/proc/stat`, counted in 10 ms ticks), where the kernel tells it.
    stolen_ms: Option<u64>,
    /// Which of the queries it was.
    query: usize,
    /// The same query's best of three asked again once the writes stopped (before the
    /// graphs and merges they left are done): a long search that is fast again was slowed by
    /// what ran beside it, not by its own work.
    again_ms: Option<f64>,
}

impl SearchCost {
    /// `ms (lock, CPU, off the CPU, switches, segments)`. Time off the CPU with no context
    /// switch at all was not taken by this system's scheduler: a virtual machine's CPU that its
    /// host ran something else on (the steal time `vmstat` shows). A guest's kernel may also
    /// charge such a stop to the thread that was running as time on a CPU (this machine's does
    /// unless timer interrupts come often, as under `perf record`), so the hypervisor's steal
    /// meanwhile and the same query asked again are shown beside it.
    fn describe(&self) -> String {
        let off = (self.ms - self.cpu_ms).max(0.0);
        format!(
            "{:.1} ms (lock {:.1}, on a CPU {:.1}, off it {:.1}{}, {} page faults{}, {} segments, {} with graphs{}{})",
            self.ms,
            self.wait_ms,
            self.cpu_ms,
            off,
            if cfg!(target_os = "linux") && self.switches == 0 && off > 1.0 {
                " with no context switch: the host's".to_string()
            } else {
                format!(
                    " over {} context switch{}",
                    self.switches,
                    if self.switches == 1 { "" } else { "es" }
                )
            },
            self.faults.0 + self.faults.1,
            if self.faults.1 > 0 {
                format!(" ({} major)", self.faults.1)
            } else {
                String::new()
            },
            self.segments,
            self.graphs,
            match self.stolen_ms {
                Some(n) if n > 0 => format!("; the hypervisor took {n} ms of the CPUs meanwhile"),
                _ => String::new(),
            },
            self.again_ms
                .map(|a| format!("; asked again: {a:.2} ms"))
                .unwrap_or_default()
        )
    }
}

/// `docs` documents `w{first}`.. written from another thread while this one searches back to
/// back, the writer with the kernel's default slice (as a node's write tasks): (the writes'
/// seconds, each search's cost).
fn writing(at: &Largest, first: usize, docs: usize) -> Result<(f64, Vec<SearchCost>)> {
    let (ix, dense, dim, n) = (at.ix, at.dense, at.dim, at.n);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7 + first as u64);
    // made before the clock starts: the writer only writes
    let batches: Vec<Vec<WriteOp>> = (first..first + docs)
        .step_by(WRITE_BATCH)
        .map(|start| {
            let count = WRITE_BATCH.min(first + docs - start);
            at.set
                .vectors(n + start, count)
                .into_iter()
                .enumerate()
                .map(|(j, v)| {
                    let i = start + j;
                    one_chunk_upsert(format!("w{i}"), v, at.set.text(n + i, &mut rng))
                })
                .collect()
        })
        .collect();
    let model = synthetic_model(dim);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = s.spawn(|| -> Result<f64> {
            priority::default_slice();
            let t = Instant::now();
            let written = batches.into_iter().try_for_each(|ops| {
                ix.write(ops, &model)?;
                ix.maintain().map(drop)
            });
            done.store(true, std::sync::atomic::Ordering::Release);
            written?;
            Ok(t.elapsed().as_secs_f64())
        });
        let mut costs = Vec::new();
        // one read of the steal counter a search: the one after a search is the next's before
        let mut stolen_before = priority::stolen_ms();
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            for (query, q) in dense.iter().enumerate().take(50) {
                let before = ThreadUsage::now();
                let t = Instant::now();
                let r = ix.read();
                let wait_ms = t.elapsed().as_secs_f64() * 1e3;
                let (segments, graphs) = r.segment_stats();
                r.search(q)?;
                drop(r);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let after = ThreadUsage::now();
                let stolen_after = priority::stolen_ms();
                costs.push(SearchCost {
                    ms,
                    wait_ms,
                    cpu_ms: after.cpu_ms - before.cpu_ms,
                    switches: (after.involuntary - before.involuntary)
                        + (after.voluntary - before.voluntary),
                    faults: (
                        after.minor_faults - before.minor_faults,
                        after.major_faults - before.major_faults,
                    ),
                    segments,
                    graphs,
                    stolen_ms: stolen_before
                        .zip(stolen_after)
                        .map(|(b, a)| a.saturating_sub(b)),
                    query,
                    again_ms: None,
                });
                stolen_before = stolen_after;
            }
        }
        let secs = writer.join().expect("the writer thread")?;
        Ok((secs, costs))
    })
}
