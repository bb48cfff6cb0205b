//! `ragfleet bench shard`: one shard's index at growing sizes, through its normal write path
//! (a [`SharedShard`], as a replica serves it: writes logged beside the searches, applied in
//! parts, seals' files written beside them).
use std::time::{Duration, Instant};

use anyhow::Result;
use ragfleet_index::ann::{exact_top_k_scored, lid_mle};
use ragfleet_index::eval::synthetic_model;
use ragfleet_index::{priority, AnnKind, IndexSettings, ShardIndex, SharedShard};
use ragfleet_proto::{ChunkRecord, SearchMode, SearchQuery, WriteOp};

use crate::bench_set::BenchSet;
use crate::eval_answers::percentile;
use rand::SeedableRng;

/// Arguments of `bench shard`.
#[derive(clap::Args, Debug)]
pub struct ShardBench {
    /// Chunk counts, each ingested into a fresh index (add 1000000 for the million; on two
    /// cores it takes tens of minutes).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    sizes: Vec<usize>,
    /// Queries per size.
    #[arg(long, default_value_t = 300)]
    queries: usize,
    /// Vector dimension (of the synthetic set).
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// Real vectors instead of the synthetic set: a `.fvecs` file (`ragfleet embed --input
    /// LINES --fvecs FILE`, or an ANN benchmark's), best in random order; its last `--queries`
    /// rows are held out as the queries, each size is its first rows.
    #[arg(long)]
    vectors: Option<std::path::PathBuf>,
    /// With `--vectors`: the texts of its rows, one line a row (BM25's documents; the held-out
    /// rows' lines are BM25's queries).
    #[arg(long, requires = "vectors")]
    texts: Option<std::path::PathBuf>,
    /// Chunks per sealed segment (cluster.toml's).
    #[arg(long, default_value_t = 2048)]
    segment_size: usize,
    /// HNSW search beams: each size is measured at each; the summary compares sizes at the
    /// narrowest beam that reaches recall@10 0.95.
    #[arg(long, value_delimiter = ',', default_value = "64,128,256")]
    ef_search: Vec<usize>,
    /// HNSW construction beam.
    #[arg(long, default_value_t = 100)]
    ef_construction: usize,
    /// HNSW degree M (twice as many neighbours on level 0).
    #[arg(long, default_value_t = 16)]
    m: usize,
    /// HNSW implementation: hnsw or instant-distance.
    #[arg(long, default_value = "hnsw")]
    ann: String,
    /// Where the indexes are written (default: a temporary folder).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Measure each size as a shard serves once its ingest stopped (`index.seal_idle_secs`):
    /// after this many seconds without a write its growing segment is sealed and merged, and
    /// the bench waits for that before it searches (0: measured with the growing segment, as
    /// during an ingest).
    #[arg(long, default_value_t = 0)]
    seal_idle_secs: u64,
    /// Megabytes of graphs copied from their mapped files into memory backed by huge pages
    /// (`index.graph_memory_mb`; default: a quarter of the machine's memory; 0: every graph
    /// walked from its file).
    #[arg(long)]
    graph_memory_mb: Option<u64>,
    /// Measure the shards idle only: leave out the largest size's rounds of writes, merge and
    /// compaction (minutes at 1M).
    #[arg(long)]
    no_load: bool,
}

/// A one-chunk document.
fn upsert(id: String, vector: Vec<f32>, text: String) -> WriteOp {
    WriteOp::Upsert {
        version: 0,
        chunks: vec![ChunkRecord {
            doc_id: id.clone(),
            chunk_id: format!("{id}#0"),
            text,
            vector,
            sentences: Default::default(),
        }],
        doc_id: id,
    }
}

/// The process's resident memory: (its own, anonymous; mapped file pages), in bytes.
fn resident_bytes() -> (u64, u64) {
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

/// Lets glibc give the free memory it holds back to the system.
fn trim_allocator() {
    // SAFETY: malloc_trim only returns free memory to the system
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes of the files under `dir`.
fn disk_bytes(dir: &std::path::Path) -> u64 {
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

struct Row {
    n: usize,
    ef: usize,
    ingest_s: f64,
    segments: usize,
    /// Chunks in the growing segment (scanned exactly by every query).
    growing: usize,
    /// GB a million chunks: the process's own memory, mapped file pages resident, files.
    mem_per_million: (f64, f64, f64),
    /// The process's own memory after the allocator gave back what it held free (GB a
    /// million chunks): what the index's live data takes.
    live_per_million: f64,
    dense: (f64, f64),
    recall: f64,
    bm25: (f64, f64),
    /// The median query's local intrinsic dimensionality in this size's set.
    lid: f64,
}

/// Neighbours the intrinsic dimensionality is estimated from (the exact top k is taken this
/// deep; recall counts its first 10).
const LID_NEIGHBOURS: usize = 20;

/// The median over the queries of [`lid_mle`] on their exact nearest neighbours (NaN if none
/// has an estimate).
fn median_lid(scored: &[Vec<(f32, u32)>]) -> f64 {
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
fn timed(ix: &SharedShard, qs: &[SearchQuery]) -> Result<Vec<f64>> {
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
fn settled(ix: &SharedShard) -> bool {
    let r = ix.read();
    let (segs, built) = r.segment_stats();
    segs == built && !r.merging() && !r.needs_maintenance() && r.segments_being_freed() == 0
}

/// Runs the benchmark.
pub fn run(b: ShardBench) -> Result<()> {
    let ann: AnnKind = b.ann.parse().map_err(anyhow::Error::msg)?;
    let set = match &b.vectors {
        Some(path) => BenchSet::from_files(path, b.texts.as_deref(), b.queries)?,
        None => BenchSet::synthetic(b.dim),
    };
    if let Some(max) = set.max_size() {
        if let Some(n) = b.sizes.iter().find(|&&n| n > max) {
            anyhow::bail!(
                "a size of {n} chunks is more than the {max} vectors left after the queries"
            );
        }
    }
    let dim = set.dim();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let root = match &b.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::tempdir_in(d)?
        }
        None => tempfile::tempdir()?,
    };
    println!(
        "one shard, {dim} dims, segment_size {}, ef_search {:?}, M {}, ef_construction {}, ann {}, {} queries a size, {threads} cores",
        b.segment_size, b.ef_search, b.m, b.ef_construction, b.ann, b.queries
    );
    println!("{}", set.describe());
    let graph_memory = ragfleet_index::hnsw::GraphMemory::global();
    if let Some(mb) = b.graph_memory_mb {
        graph_memory.set_limit_mb(mb);
    }
    println!(
        "graphs held in huge-page memory up to {:.0} MB (index.graph_memory_mb), the rest walked from their mapped files",
        graph_memory.limit() as f64 / (1u64 << 20) as f64
    );
    println!(
        "background graph builds and merges {}",
        if priority::idle_background() {
            "under SCHED_IDLE where the kernel has it (RAGFLEET_BACKGROUND_IDLE=1)"
        } else {
            "at nice 10 (RAGFLEET_BACKGROUND_IDLE=1: under SCHED_IDLE)"
        }
    );
    let mut rows = Vec::new();
    let mut merge_line = None;
    let mut alternated = None;
    // the smaller sizes' shards, kept open (quiet) until the largest is measured, so that the
    // sizes' latencies can also be taken side by side, in alternating rounds
    let mut kept: Vec<Kept> = Vec::new();
    let largest = b.sizes.iter().copied().max().unwrap_or(0);
    for &n in &b.sizes {
        let dir = root.path().join(format!("n{n}"));
        let settings = IndexSettings {
            segment_size: b.segment_size,
            ef_construction: b.ef_construction,
            hnsw_m: b.m,
            ef_search: b.ef_search.first().copied().unwrap_or(64),
            ann,
            background: true,
            seal_idle: (b.seal_idle_secs > 0).then(|| Duration::from_secs(b.seal_idle_secs)),
            ..IndexSettings::default()
        };
        // the baseline without the free memory the previous size left in the allocator (the
        // index would otherwise reuse it unseen)
        trim_allocator();
        let rss0 = resident_bytes();
        let ix = SharedShard::new(ShardIndex::open(&dir, settings)?.0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
        let t = Instant::now();
        let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(n);
        let batch = 2048;
        for start in (0..n).step_by(batch) {
            let count = batch.min(n - start);
            let vs = set.vectors(start, count);
            let ops: Vec<WriteOp> = vs
                .iter()
                .enumerate()
                .map(|(j, v)| {
                    let i = start + j;
                    upsert(format!("d{i}"), v.clone(), set.text(i, &mut rng))
                })
                .collect();
            ix.write(ops, &synthetic_model(dim))?;
            ix.maintain()?;
            vectors.extend(vs);
        }
        // the background work to its end: graphs built, merges committed, merged-away
        // segments freed (the memory figures below are read next)
        let mut ingested = None;
        loop {
            ix.maintain()?;
            let idle_sealed = b.seal_idle_secs == 0
                || ix.read().growing_chunks() < ragfleet_index::IDLE_SEAL_MIN_CHUNKS;
            if settled(&ix) {
                // the ingest's time does not count the wait for the idle seal
                ingested.get_or_insert_with(|| t.elapsed().as_secs_f64());
                if idle_sealed {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let ingest_s = ingested.unwrap_or_else(|| t.elapsed().as_secs_f64());
        let rss = resident_bytes();
        // the bench's own copy of the vectors is not the index's
        let own = (vectors.len() * (dim * 4 + 24)) as u64;
        let per_million = |bytes: u64| bytes as f64 / n as f64 * 1e6 / 1e9;
        let mem_per_million = (
            per_million(rss.0.saturating_sub(rss0.0).saturating_sub(own)),
            per_million(rss.1.saturating_sub(rss0.1)),
            per_million(disk_bytes(&dir)),
        );
        // glibc keeps freed memory in its arenas (the ingest's and merges' buffers, per thread):
        // how much of the figure above is that, and how much the index's live data
        trim_allocator();
        let live_per_million = per_million(
            resident_bytes()
                .0
                .saturating_sub(rss0.0)
                .saturating_sub(own),
        );
        let (graphs, bm25) = ix.read().memory_bytes();
        println!(
            "{n:>9} chunks: of the index's own memory, a million chunks: graphs {:.2} GB ({:.2} GB of codes and level-0 rows in huge-page memory, the rest of them mapped), BM25 postings {:.2} GB",
            per_million(graphs as u64),
            per_million(graph_memory.used() as u64),
            per_million(bm25 as u64)
        );
        let qv = set.query_vectors(b.queries);
        let scored = exact_top_k_scored(&vectors, &qv, LID_NEIGHBOURS, threads);
        drop(vectors);
        let truth: Vec<Vec<u32>> = scored
            .iter()
            .map(|top| top.iter().take(10).map(|h| h.1).collect())
            .collect();
        let lid = median_lid(&scored);
        let dense: Vec<SearchQuery> = qv
            .iter()
            .map(|v| SearchQuery {
                vector: v.clone(),
                text: String::new(),
                k: 10,
                mode: SearchMode::Dense,
                model: None,
            })
            .collect();
        let bm25: Vec<SearchQuery> = set
            .bm25_queries(b.queries, &mut rng)
            .into_iter()
            .map(|text| SearchQuery {
                vector: Vec::new(),
                text,
                k: 10,
                mode: SearchMode::Bm25,
                model: None,
            })
            .collect();
        timed(&ix, &dense[..dense.len().min(20)])?; // warm the caches
        let mut bm = timed(&ix, &bm25)?;
        let bm25_p = (percentile(&mut bm, 0.5), percentile(&mut bm, 0.99));
        let mut at_size = Vec::new();
        for &ef in &b.ef_search {
            ix.exclusive(|ix| ix.set_ef_search(ef));
            let mut d = timed(&ix, &dense)?;
            let mut found = 0;
            for (q, t) in dense.iter().zip(&truth) {
                let hits = ix.read().search(q)?;
                found += t
                    .iter()
                    .filter(|i| hits.iter().any(|h| h.doc_id == format!("d{i}")))
                    .count();
            }
            let row = Row {
                n,
                ef,
                ingest_s,
                segments: ix.read().segment_stats().0,
                growing: ix.read().growing_chunks(),
                mem_per_million,
                live_per_million,
                dense: (percentile(&mut d, 0.5), percentile(&mut d, 0.99)),
                recall: found as f64 / (10 * dense.len()).max(1) as f64,
                bm25: bm25_p,
                lid,
            };
            println!(
                "{n:>9} chunks, ef {ef}: ingest {:.1} s, {} segments + {} chunks growing, intrinsic dimensionality {:.1}, dense p50 {:.2} ms p99 {:.2} ms recall@10 {:.4}, bm25 p50 {:.2} ms p99 {:.2} ms; a million chunks: {:.2} GB own memory ({:.2} GB live, after the allocator gave back its free memory), {:.2} GB mapped pages resident, {:.2} GB files",
                row.ingest_s, row.segments, row.growing, row.lid, row.dense.0, row.dense.1, row.recall, row.bm25.0, row.bm25.1, row.mem_per_million.0, row.live_per_million, row.mem_per_million.1, row.mem_per_million.2
            );
            at_size.push(row);
        }
        // the narrowest beam reaching recall 0.95 (else the widest): the one the ratio uses
        let chosen_ef = at_size
            .iter()
            .find(|r| r.recall >= 0.95)
            .or(at_size.last())
            .map_or(64, |r| r.ef);
        ix.exclusive(|ix| ix.set_ef_search(chosen_ef));
        kept.push(Kept {
            n,
            ef: chosen_ef,
            ix,
            dense,
            bm25,
        });
        rows.push(at_size);
        if n != largest {
            continue;
        }
        alternated = Some(alternate(&kept, ALTERNATE_ROUNDS)?);
        if b.no_load {
            continue;
        }
        // the smaller sizes are done with; the largest's measurements under load follow
        let Kept { ix, dense, .. } = kept.pop().expect("the largest");
        for k in kept.drain(..) {
            drop(k.ix);
            let _ = std::fs::remove_dir_all(root.path().join(format!("n{}", k.n)));
        }
        ix.exclusive(|ix| ix.set_ef_search(b.ef_search.first().copied().unwrap_or(64)));
        let at = Largest {
            ix: &ix,
            dense: &dense,
            set: &set,
            dim,
            n,
        };
        let (writes, written) = during_writes(&at)?;
        let (merge, merged) = during_merge(&at)?;
        let families = [("d", 0..n), ("w", 0..written), ("m", n..merged)];
        let compaction = during_compaction(&ix, &dense, &families)?;
        merge_line = Some(format!("{writes}\n{merge}\n{compaction}"));
        drop(ix);
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!(
        "\n{:>9} {:>5} {:>9} {:>5} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6}",
        "chunks",
        "ef",
        "ingest s",
        "segs",
        "LID",
        "dense p50",
        "dense p99",
        "recall@10",
        "bm25 p50",
        "bm25 p99",
        "own/M",
        "live/M",
        "map/M",
        "disk/M"
    );
    for r in rows.iter().flatten() {
        println!(
            "{:>9} {:>5} {:>9.1} {:>5} {:>5.1} {:>9.3} {:>9.3} {:>9.4} {:>9.3} {:>9.3} {:>6.2} {:>6.2} {:>6.2} {:>6.2}",
            r.n,
            r.ef,
            r.ingest_s,
            r.segments,
            r.lid,
            r.dense.0,
            r.dense.1,
            r.recall,
            r.bm25.0,
            r.bm25.1,
            r.mem_per_million.0,
            r.live_per_million,
            r.mem_per_million.1,
            r.mem_per_million.2
        );
    }
    // each size at the narrowest beam reaching recall 0.95 (else its widest)
    let chosen: Vec<&Row> = rows
        .iter()
        .filter_map(|at| at.iter().find(|r| r.recall >= 0.95).or(at.last()))
        .collect();
    for w in chosen.windows(2) {
        let x = w[1].n as f64 / w[0].n as f64;
        println!(
            "{x}x the chunks ({} at ef {}, recall {:.3} -> {} at ef {}, recall {:.3}): dense p50 x{:.2}, BM25 p50 x{:.2} (goal: <= x1.3 dense at recall >= 0.95)",
            w[0].n, w[0].ef, w[0].recall, w[1].n, w[1].ef, w[1].recall,
            w[1].dense.0 / w[0].dense.0, w[1].bm25.0 / w[0].bm25.0
        );
    }
    if let Some(a) = alternated {
        println!("{a}");
    }
    if let Some(l) = merge_line {
        println!("{l}");
    }
    Ok(())
}

/// Rounds of [`alternate`]: each size timed once a round.
const ALTERNATE_ROUNDS: usize = 5;

/// A size's shard, open and quiet, at the beam its ratio uses, with its queries.
struct Kept {
    n: usize,
    ef: usize,
    ix: SharedShard,
    dense: Vec<SearchQuery>,
    bm25: Vec<SearchQuery>,
}

/// The ratios between consecutive sizes' p50 taken side by side: `rounds` rounds, each timing
/// every size's dense and BM25 queries in turn, the ratio taken within each round (this
/// machine's speed drifts by tens of percent between sittings minutes apart, and the sizes
/// are otherwise measured one after the other, the larger minutes later); the median round's
/// ratio and the range.
fn alternate(kept: &[Kept], rounds: usize) -> Result<String> {
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

/// The largest size's index and queries, for the measurements under load.
struct Largest<'a> {
    ix: &'a SharedShard,
    dense: &'a [SearchQuery],
    set: &'a BenchSet,
    dim: usize,
    n: usize,
}

/// Dense latency while writes come, against the same queries without: another thread writes
/// new documents in batches of 64 through the shard (as a replica takes an ingest, sealing as
/// segments fill) while this one searches back to back; a search waits only while a write
/// applies (in parts of ~2 ms) or a seal commits, besides sharing the cores. Four rounds, each
/// with its own documents (`w0`.. then on): every thread with the kernel's default time
/// slice, then with the short ones a node asks for (`ragfleet_index::priority`), alternating.
/// Returns the lines and the documents written.
fn during_writes(at: &Largest) -> Result<(String, usize)> {
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

/// The calling thread's CPU time and context switches so far.
struct ThreadUsage {
    cpu_ms: f64,
    involuntary: i64,
    voluntary: i64,
    minor_faults: i64,
    major_faults: i64,
}

impl ThreadUsage {
    #[cfg(target_os = "linux")]
    fn now() -> ThreadUsage {
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
    fn now() -> ThreadUsage {
        ThreadUsage {
            cpu_ms: 0.0,
            involuntary: 0,
            voluntary: 0,
            minor_faults: 0,
            major_faults: 0,
        }
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
                    upsert(format!("w{i}"), v, at.set.text(n + i, &mut rng))
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

/// Dense p99 while a merge runs against p99 with none, at the largest size: enough chunks
/// are written to seal segments until a merge starts, then queries run until it is done.
fn during_merge(at: &Largest) -> Result<(String, usize)> {
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
            .map(|(j, v)| upsert(format!("m{}", next + j), v, set.text(next + j, &mut rng)))
            .collect();
        next += 512;
        ix.write(ops, &synthetic_model(dim))?;
        ix.maintain()?;
    }
    let (secs, figures) = while_merging(ix, dense, &mut quiet)?;
    Ok((format!("during a merge ({secs:.1} s, {figures}"), next))
}

/// Single queries, over and over, until the running merge finishes (then it is committed):
/// its seconds and "N queries): dense p50/p99 during; without: p50/p99 of `quiet`".
fn while_merging(
    ix: &SharedShard,
    dense: &[SearchQuery],
    quiet: &mut [f64],
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
            if ix.maintain()? {
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
fn during_compaction(
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
    // the merges that run first (of the last seals) are waited out; the one measured is the
    // one that drops chunks
    let stored = ix.read().stored_chunks();
    loop {
        ix.maintain()?;
        if !ix.read().merging() {
            return Ok(format!(
                "no compaction started after deleting {} of {n} documents",
                doomed.len()
            ));
        }
        let (secs, figures) = while_merging(ix, dense, &mut quiet)?;
        if ix.read().stored_chunks() < stored {
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
            // a reader beside the passes: how long one waited for the index at most (a pass's
            // own time also counts what it frees after letting the searches back in)
            let stop = std::sync::atomic::AtomicBool::new(false);
            let waited = std::thread::scope(|s| -> Result<f64> {
                let reader = s.spawn(|| {
                    let mut worst = 0.0f64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let t = Instant::now();
                        drop(ix.read());
                        worst = worst.max(t.elapsed().as_secs_f64() * 1e3);
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    worst
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
                    Ok(())
                })();
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let worst = reader
                    .join()
                    .map_err(|_| anyhow::anyhow!("the reader panicked"))?;
                r.map(|()| worst)
            })?;
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
                "during a compaction of the largest segment ({} of {n} documents deleted; {secs:.1} s, {figures}; then {chunks} slots pointed at the copies in {passes} passes of at most {:.1} ms (on a CPU {:.1} ms; context switches: {} waits, {} preemptions), the index held at most {held_ms:.1} ms a pass, a reader beside them waiting at most {waited:.1} ms{stolen}{commits}",
                doomed.len(),
                longest.0,
                longest.1,
                longest.2,
                longest.3
            ));
        }
    }
}
