//! What two replicas exchange to converge: `cargo run --release -p ragfleet-index --example
//! sync_probe -- N [MISSING] [ID_BYTES]` writes N one-chunk documents (8-d vectors, ids of about
//! ID_BYTES bytes, default 24) into two shards in temporary folders, the second missing MISSING
//! of them (default 10), then compares what a pull of the second from the first carries: the
//! whole version list in one answer (the protocol before 9; refused by a peer's cluster session
//! past 16 MiB) against per-bucket digests and the pages of the differing buckets' versions
//! (bytes as postcard encodes them, and the time the answering replica takes to make them); and
//! what asking a replica's digest costs after a write (every search through a replica answers
//! with it).
use ragfleet_index::eval::synthetic_model;
use ragfleet_index::{IndexSettings, ShardIndex};
use ragfleet_proto::{ChunkRecord, WriteOp};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().ok_or("N documents")?.parse()?;
    let missing: usize = args.next().map_or(Ok(10), |e| e.parse())?;
    let id_bytes: usize = args.next().map_or(Ok(24), |e| e.parse())?;
    let model = synthetic_model(8);
    let settings = IndexSettings {
        segment_size: 1 << 30, // one growing segment: no graphs to build for this probe
        background: false,
        ..IndexSettings::default()
    };
    let (da, db) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (mut a, _) = ShardIndex::open(da.path(), settings.clone())?;
    let (mut b, _) = ShardIndex::open(db.path(), settings)?;
    let id = |i: usize| {
        let s = format!("doc-{i:08}-");
        format!("{s}{}", "x".repeat(id_bytes.saturating_sub(s.len())))
    };
    let t = Instant::now();
    let skip = n / missing.max(1);
    for start in (0..n).step_by(8192) {
        let ops: Vec<WriteOp> = (start..(start + 8192).min(n))
            .map(|i| WriteOp::Upsert {
                doc_id: id(i),
                version: 1 + i as u64,
                chunks: vec![ChunkRecord {
                    doc_id: id(i),
                    chunk_id: format!("{}#0", id(i)),
                    text: "t".into(),
                    vector: (0..8)
                        .map(|d| ((i * 31 + d * 7) % 17) as f32 - 8.0)
                        .collect(),
                    sentences: Default::default(),
                }],
            })
            .collect();
        let kept: Vec<WriteOp> = ops
            .iter()
            .filter(|op| match op {
                WriteOp::Upsert { version, .. } => {
                    missing == 0 || !(*version as usize).is_multiple_of(skip)
                }
                WriteOp::Delete { .. } => true,
            })
            .cloned()
            .collect();
        a.write(ops, &model)?;
        b.write(kept, &model)?;
    }
    println!(
        "{n} documents (ids of {} bytes) written in {:.1} s; the second replica lacks {}",
        id(0).len(),
        t.elapsed().as_secs_f64(),
        a.doc_count() - b.doc_count()
    );
    // what a search through a replica pays for the digest it answers with, after a write
    let t = Instant::now();
    a.digest();
    let first = t.elapsed().as_secs_f64() * 1e3;
    a.write(
        vec![WriteOp::Delete {
            doc_id: id(0),
            version: u64::MAX / 2,
        }],
        &model,
    )?;
    let t = Instant::now();
    a.digest();
    println!(
        "the replica's digest: {first:.1} ms at first, {:.3} ms after a write (every search \
         answers with it)",
        t.elapsed().as_secs_f64() * 1e3
    );
    // before: one answer with every (id, version)
    let t = Instant::now();
    let all = a.versions();
    let made = t.elapsed().as_secs_f64() * 1e3;
    let whole = postcard::to_allocvec(&all)?.len();
    println!(
        "the whole version list: {:.2} MB in one answer ({}), made in {made:.0} ms",
        whole as f64 / 1e6,
        if whole > 16 << 20 {
            "over the 16 MiB cluster frame: refused"
        } else {
            "within the 16 MiB frame"
        }
    );
    // now: bucket digests, then pages of the differing buckets
    let buckets = ragfleet_proto::bucket_count(a.doc_count().max(b.doc_count()));
    let t = Instant::now();
    let theirs = a.bucket_digests(buckets);
    let digests_ms = t.elapsed().as_secs_f64() * 1e3;
    let mine = b.bucket_digests(buckets);
    let mut wanted: Vec<u32> = (0..buckets)
        .filter(|&i| mine[i as usize] != theirs[i as usize])
        .collect();
    let differing = wanted.len();
    let mut bytes = postcard::to_allocvec(&theirs)?.len();
    let (mut pages, mut pages_ms, mut fetch) = (0, 0.0, 0);
    while !wanted.is_empty() {
        let t = Instant::now();
        let (v, covered) = a.versions_in(
            buckets,
            &wanted,
            ragfleet_proto::VERSIONS_PAGE_BYTES as usize,
        );
        pages_ms += t.elapsed().as_secs_f64() * 1e3;
        bytes += postcard::to_allocvec(&v)?.len() + 4 * wanted.len();
        fetch += b.plan_pull(&v).fetch.len();
        wanted.drain(..covered);
        pages += 1;
    }
    println!(
        "by buckets: {buckets} digests ({digests_ms:.0} ms), {differing} differing, {pages} pages \
         of versions ({pages_ms:.0} ms): {:.3} MB in all, x{:.4} the whole list; {fetch} documents to fetch",
        bytes as f64 / 1e6,
        bytes as f64 / whole as f64
    );
    Ok(())
}
