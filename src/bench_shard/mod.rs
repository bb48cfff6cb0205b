//! `ragfleet bench shard`: one shard's index at growing sizes, through its normal write path
//! (a [`SharedShard`], as a replica serves it: writes logged beside the searches, applied in
//! parts, seals' files written beside them).
//!
//! Each size's ingest and measurement is here; [`measure`] holds the memory, timing and
//! side-by-side helpers, [`load`] the searches beside a stream of writes, [`merges`] the
//! searches during a merge and during the largest segment's compaction.
mod load;
mod measure;
mod merges;

use std::time::{Duration, Instant};

use anyhow::Result;
use ragfleet_index::ann::exact_top_k_scored;
use ragfleet_index::eval::{dense_queries, one_chunk_upsert, synthetic_model};
use ragfleet_index::hnsw::GraphMemory;
use ragfleet_index::{priority, AnnKind, IndexSettings, ShardIndex, SharedShard};
use ragfleet_proto::{SearchMode, SearchQuery, WriteOp};

use crate::bench_set::BenchSet;
use crate::eval_answers::percentile;
use load::{during_writes, Largest};
use measure::{
    alternate, disk_bytes, median_lid, resident_bytes, settled, timed, ALTERNATE_ROUNDS,
    LID_NEIGHBOURS,
};
use merges::{during_compaction, during_merge};
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
    /// Merges a shard runs at a time (`index.max_merges`, 1..=8).
    #[arg(long, default_value_t = ragfleet_index::DEFAULT_MAX_MERGES as u64, value_parser = clap::value_parser!(u64).range(1..=8))]
    max_merges: u64,
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

/// A size's shard, open and quiet, at the beam its ratio uses, with its queries.
pub(super) struct Kept {
    pub(super) n: usize,
    pub(super) ef: usize,
    pub(super) ix: SharedShard,
    pub(super) dense: Vec<SearchQuery>,
    pub(super) bm25: Vec<SearchQuery>,
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
    let graph_memory = GraphMemory::global();
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
    #[cfg(all(feature = "jemalloc", target_os = "linux"))]
    println!("allocator: {}", crate::alloc::describe());
    println!(
        "glibc's malloc arenas: {}",
        match (
            std::env::var(ragfleet_index::allocator::ARENA_ENV),
            ragfleet_index::allocator::arena_limit(),
        ) {
            (Ok(n), _) => format!("{n} (MALLOC_ARENA_MAX)"),
            (Err(_), Some(n)) => format!("{n}, one a core (MALLOC_ARENA_MAX to set)"),
            (Err(_), None) => "glibc's default (the limit could not be set)".to_string(),
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
        let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
        let ingested = ingest(&b, &set, ann, &dir, n, &mut rng)?;
        let (at_size, shard) = measure(&b, &set, n, threads, &mut rng, ingested)?;
        kept.push(shard);
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
    print_table(&rows);
    if let Some(a) = alternated {
        println!("{a}");
    }
    if let Some(l) = merge_line {
        println!("{l}");
    }
    Ok(())
}

/// A size's shard once its ingest is done and its background work settled.
struct Ingested {
    ix: SharedShard,
    /// The vectors written, row `i` document `d{i}` (for the exact answers).
    vectors: Vec<Vec<f32>>,
    ingest_s: f64,
    /// See [`Row::mem_per_million`].
    mem_per_million: (f64, f64, f64),
    /// See [`Row::live_per_million`].
    live_per_million: f64,
}

/// Writes the set's first `n` chunks into a fresh shard in `dir` through its write path, in
/// batches of 2,048, and waits for its background work (and with `--seal-idle-secs`, the
/// idle seal) to end; the shard's memory read then.
fn ingest(
    b: &ShardBench,
    set: &BenchSet,
    ann: AnnKind,
    dir: &std::path::Path,
    n: usize,
    rng: &mut rand::rngs::StdRng,
) -> Result<Ingested> {
    let dim = set.dim();
    let settings = IndexSettings {
        segment_size: b.segment_size,
        ef_construction: b.ef_construction,
        hnsw_m: b.m,
        max_merges: b.max_merges as usize,
        ef_search: b.ef_search.first().copied().unwrap_or(64),
        ann,
        background: true,
        seal_idle: (b.seal_idle_secs > 0).then(|| Duration::from_secs(b.seal_idle_secs)),
        ..IndexSettings::default()
    };
    // the baseline without the free memory the previous size left in the allocator (the
    // index would otherwise reuse it unseen)
    ragfleet_index::allocator::give_back();
    let rss0 = resident_bytes();
    let ix = SharedShard::new(ShardIndex::open(dir, settings)?.0);
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
                one_chunk_upsert(format!("d{i}"), v.clone(), set.text(i, rng))
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
        per_million(disk_bytes(dir)),
    );
    // glibc keeps freed memory in its arenas (the ingest's and merges' buffers, per thread):
    // how much of the figure above is that, and how much the index's live data
    ragfleet_index::allocator::give_back();
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
        per_million(GraphMemory::global().used() as u64),
        per_million(bm25 as u64)
    );
    Ok(Ingested {
        ix,
        vectors,
        ingest_s,
        mem_per_million,
        live_per_million,
    })
}

/// One size's searches, idle: the exact answers and the set's intrinsic dimensionality, BM25
/// p50 / p99, then dense p50 / p99 and recall@10 at each beam; the shard is left at the
/// narrowest beam reaching recall 0.95 (else the widest), kept with its queries.
fn measure(
    b: &ShardBench,
    set: &BenchSet,
    n: usize,
    threads: usize,
    rng: &mut rand::rngs::StdRng,
    got: Ingested,
) -> Result<(Vec<Row>, Kept)> {
    let Ingested {
        ix,
        vectors,
        ingest_s,
        mem_per_million,
        live_per_million,
    } = got;
    let qv = set.query_vectors(b.queries);
    let scored = exact_top_k_scored(&vectors, &qv, LID_NEIGHBOURS, threads);
    drop(vectors);
    let truth: Vec<Vec<u32>> = scored
        .iter()
        .map(|top| top.iter().take(10).map(|h| h.1).collect())
        .collect();
    let lid = median_lid(&scored);
    let dense = dense_queries(&qv);
    let bm25: Vec<SearchQuery> = set
        .bm25_queries(b.queries, rng)
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
        .find(|r| r.recall >= RECALL_GOAL)
        .or(at_size.last())
        .map_or(64, |r| r.ef);
    ix.exclusive(|ix| ix.set_ef_search(chosen_ef));
    let shard = Kept {
        n,
        ef: chosen_ef,
        ix,
        dense,
        bm25,
    };
    Ok((at_size, shard))
}

/// The table of every size at every beam, then the ratios between consecutive sizes, each
/// at its narrowest beam reaching recall 0.95 (else its widest).
fn print_table(rows: &[Vec<Row>]) {
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
        .filter_map(|at| at.iter().find(|r| r.recall >= RECALL_GOAL).or(at.last()))
        .collect();
    let exact: Vec<Option<f64>> = rows
        .iter()
        .map(|at| {
            let curve: Vec<(f64, f64)> = at.iter().map(|r| (r.recall, r.dense.0)).collect();
            p50_at_recall(&curve, RECALL_GOAL)
        })
        .collect();
    for (i, w) in chosen.windows(2).enumerate() {
        let x = w[1].n as f64 / w[0].n as f64;
        println!(
            "{x}x the chunks ({} at ef {}, recall {:.3} -> {} at ef {}, recall {:.3}): dense p50 x{:.2}, BM25 p50 x{:.2} (goal: <= x1.3 dense at recall >= 0.95)",
            w[0].n, w[0].ef, w[0].recall, w[1].n, w[1].ef, w[1].recall,
            w[1].dense.0 / w[0].dense.0, w[1].bm25.0 / w[0].bm25.0
        );
        // the grid of beams can flatter the ratio (a size that just misses 0.95 at one beam
        // takes the next): the same step read off at recall 0.95 exactly
        if let (Some(a), Some(b)) = (exact[i], exact[i + 1]) {
            println!(
                "  read off at recall 0.95 exactly (between the beams around it): dense p50 {a:.3} -> {b:.3} ms, x{:.2}",
                b / a
            );
        }
    }
}

/// The recall@10 at which the dense goal compares sizes.
const RECALL_GOAL: f64 = 0.95;

/// The p50 at recall `target` exactly on a curve of (recall, p50) by widening beam, read off
/// on the line between the last beam below `target` and the first at or above it; none when
/// no beam reaches it or the narrowest already does (then nothing brackets it).
fn p50_at_recall(curve: &[(f64, f64)], target: f64) -> Option<f64> {
    let i = curve.iter().position(|&(recall, _)| recall >= target)?;
    let (below, above) = (curve[i.checked_sub(1)?], curve[i]);
    let f = (target - below.0) / (above.0 - below.0);
    Some(below.1 + f * (above.1 - below.1))
}

#[cfg(test)]
mod tests {
    use super::p50_at_recall;

    #[test]
    fn the_p50_at_a_recall_is_read_off_between_the_beams_around_it() {
        // session 51's 100k row: 0.9499 at ef 32 (0.043 ms), 0.961 at ef 40 (0.051 ms)
        let curve = [
            (0.889, 0.033),
            (0.927, 0.037),
            (0.9499, 0.043),
            (0.961, 0.051),
        ];
        let p = p50_at_recall(&curve, 0.95).unwrap();
        assert!((p - 0.043_072).abs() < 1e-5, "{p}");
        // exactly on a beam: that beam's p50
        let p = p50_at_recall(&[(0.90, 0.1), (0.95, 0.2), (0.99, 0.4)], 0.95).unwrap();
        assert!((p - 0.2).abs() < 1e-12, "{p}");
        // never reached, or reached by the narrowest beam: nothing brackets it
        assert_eq!(p50_at_recall(&[(0.90, 0.1), (0.94, 0.2)], 0.95), None);
        assert_eq!(p50_at_recall(&[(0.96, 0.1), (0.99, 0.2)], 0.95), None);
        assert_eq!(p50_at_recall(&[], 0.95), None);
    }
}
