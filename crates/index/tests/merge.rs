//! Tiered merges: recall at 100k chunks with merges during ingest, upserts and deletes across
//! merges, corrupt merged segments, and kill -9 at points of a merge.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ragfleet_index::eval::{clustered, recall, truth, upserts};
use ragfleet_index::{IndexSettings, ShardIndex};
use ragfleet_proto::{ChunkRecord, ModelIdentity, SearchMode, SearchQuery, WriteOp};

fn model(dim: usize) -> ModelIdentity {
    ModelIdentity {
        name: "test-model".into(),
        weights_sha256: "00".repeat(32),
        dim: dim as u32,
        max_len: 256,
        pooling: "mean".into(),
        normalized: true,
    }
}

fn settings(segment_size: usize, background: bool) -> IndexSettings {
    IndexSettings {
        segment_size,
        ef_construction: 64,
        ef_search: 64,
        background,
        build_threads: 2,
        ..IndexSettings::default()
    }
}

fn dense(v: Vec<f32>, k: u32, dim: usize) -> SearchQuery {
    SearchQuery {
        vector: v,
        text: String::new(),
        k,
        mode: SearchMode::Dense,
        model: Some(model(dim)),
    }
}

#[test]
fn recall_holds_at_100k_chunks_with_merges_during_ingest() {
    const DIM: usize = 384;
    let n = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let s = IndexSettings {
        ef_construction: 100,
        ..settings(4096, false)
    };
    let (mut ix, _) = ShardIndex::open(dir.path(), s).unwrap();
    let data = clustered(n, DIM, 50, 0.05, 3, 1);
    let ops = upserts(data, None);
    for batch in ops.chunks(1000) {
        ix.write(batch.to_vec(), &model(DIM)).unwrap();
    }
    let (segments, built) = ix.segment_stats();
    println!("{n} chunks: {segments} sealed segments ({built} with graphs)");
    assert_eq!(segments, built);
    // 24 seals of 4,096: the tiered policy keeps about log4(24) + 1 of them
    assert!(segments <= 4, "{segments} segments");
    let queries: Vec<SearchQuery> = clustered(200, DIM, 50, 0.05, 3, 2)
        .into_iter()
        .map(|v| dense(v, 10, DIM))
        .collect();
    let dir2 = tempfile::tempdir().unwrap();
    let exact_settings = IndexSettings {
        segment_size: usize::MAX,
        ..IndexSettings::default()
    };
    let (mut exact, _) = ShardIndex::open(dir2.path(), exact_settings).unwrap();
    exact.write(ops, &model(DIM)).unwrap();
    let r = recall(&ix, &queries, &truth(&exact, &queries).unwrap()).unwrap();
    println!("recall@10 at {n} chunks = {r:.4}");
    assert!(r >= 0.95, "recall@10 {r}");
}

fn one(doc: &str, text: &str, v: Vec<f32>, version: u64) -> WriteOp {
    WriteOp::Upsert {
        version,
        doc_id: doc.into(),
        chunks: vec![ChunkRecord {
            doc_id: doc.into(),
            chunk_id: format!("{doc}#0"),
            text: text.into(),
            vector: v,
            sentences: Default::default(),
        }],
    }
}

/// Every hit for every vector of `docs`, dense and BM25, as (doc, text).
fn all_hits(ix: &ShardIndex, probes: &[Vec<f32>], dim: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in probes {
        for mode in [SearchMode::Dense, SearchMode::Bm25] {
            let q = SearchQuery {
                vector: p.clone(),
                text: "old new marker".into(),
                k: 50,
                mode,
                model: Some(model(dim)),
            };
            out.extend(
                ix.search(&q)
                    .unwrap()
                    .into_iter()
                    .map(|h| (h.doc_id, h.text)),
            );
        }
    }
    out
}

#[test]
fn deleted_and_replaced_documents_never_come_back_from_merged_segments() {
    const DIM: usize = 32;
    let dir = tempfile::tempdir().unwrap();
    let vecs = clustered(2000, DIM, 8, 0.1, 5, 1);
    let check = |ix: &ShardIndex, stage: &str| {
        let hits = all_hits(ix, &vecs[..200], DIM);
        for (doc, text) in hits.iter().filter(|(d, _)| d.starts_with('d')) {
            let i: usize = doc[1..].parse().unwrap();
            assert!(i % 10 != 3, "{stage}: deleted {doc} came back");
            if i % 10 == 7 {
                assert_eq!(text, "new marker", "{stage}: old copy of {doc} came back");
            }
        }
        // each hit once per search: no duplicates from a merge and its sources
        for p in &vecs[..50] {
            let hits = ix.search(&dense(p.clone(), 50, DIM)).unwrap();
            let mut ids: Vec<&str> = hits.iter().map(|h| h.chunk_id.as_str()).collect();
            let n = ids.len();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), n, "{stage}: duplicate hits");
        }
        // every live document is still found by its own vector
        for (i, v) in vecs.iter().enumerate().step_by(37) {
            let hits = ix.search(&dense(v.clone(), 3, DIM)).unwrap();
            if i % 10 != 3 {
                assert!(
                    hits.iter().any(|h| h.doc_id == format!("d{i}")),
                    "{stage}: d{i} not found by its own vector"
                );
            }
        }
    };
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), settings(100, false)).unwrap();
        for (i, v) in vecs.iter().enumerate() {
            ix.write(
                vec![one(&format!("d{i}"), "old marker", v.clone(), 1)],
                &model(DIM),
            )
            .unwrap();
        }
        let merged_before = ix.segment_stats().0;
        for (i, v) in vecs.iter().enumerate() {
            let doc = format!("d{i}");
            match i % 10 {
                3 => {
                    ix.delete(std::slice::from_ref(&doc), 2).unwrap();
                }
                7 => {
                    ix.write(vec![one(&doc, "new marker", v.clone(), 2)], &model(DIM))
                        .unwrap();
                }
                _ => {}
            }
        }
        // more seals: merges (and compactions of the now partly dead segments) run
        for i in 0..1500 {
            let v = clustered(1, DIM, 8, 0.1, 5, 1000 + i as u64).remove(0);
            ix.write(vec![one(&format!("x{i}"), "filler", v, 1)], &model(DIM))
                .unwrap();
        }
        println!(
            "segments: {merged_before} before the changes, {:?} after",
            ix.segment_stats()
        );
        assert!(ix.segment_stats().0 <= 6);
        check(&ix, "live");
    }
    let (ix, rep) = ShardIndex::open(dir.path(), settings(100, false)).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    assert!(ix.wait_for_graphs(Duration::from_secs(60)));
    check(&ix, "reopened");
}

fn files(dir: &std::path::Path, ext: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

#[test]
fn a_corrupt_merged_segment_is_detected_and_not_loaded() {
    const DIM: usize = 32;
    let dir = tempfile::tempdir().unwrap();
    let vecs = clustered(1000, DIM, 8, 0.1, 6, 1);
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), settings(100, false)).unwrap();
        ix.write(upserts(vecs.clone(), None), &model(DIM)).unwrap();
        ix.seal().unwrap();
        assert!(
            ix.segment_stats().0 < 10,
            "merges ran: {:?}",
            ix.segment_stats()
        );
    }
    // a damaged graph of a merged segment: rejected by its checksum, rebuilt, searches agree
    let graphs = files(dir.path(), "hnsw");
    let mut bytes = std::fs::read(&graphs[0]).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40;
    std::fs::write(&graphs[0], &bytes).unwrap();
    let (ix, rep) = ShardIndex::open(dir.path(), settings(100, false)).unwrap();
    assert!(
        rep.problems.is_empty(),
        "a graph is derivable: {:?}",
        rep.problems
    );
    assert!(ix.wait_for_graphs(Duration::from_secs(60)));
    let q = dense(vecs[17].clone(), 1, DIM);
    assert_eq!(ix.search(&q).unwrap()[0].doc_id, "d17");
    assert_ne!(std::fs::read(&graphs[0]).unwrap(), bytes, "graph rewritten");
    drop(ix);
    // a damaged data file of a merged segment: reported, not loaded, catch-up asked for
    let data = files(dir.path(), "bin")
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
        .collect::<Vec<_>>();
    let mut bytes = std::fs::read(&data[0]).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x01;
    std::fs::write(&data[0], &bytes).unwrap();
    let (ix, rep) = ShardIndex::open(dir.path(), settings(100, false)).unwrap();
    assert!(rep.needs_catch_up, "{rep:?}");
    assert!(
        rep.problems.iter().any(|p| p.contains("checksum")),
        "{:?}",
        rep.problems
    );
    assert!(
        ix.doc_count() < 1000,
        "the damaged segment's chunks are not served"
    );
}

/// The child side of the kill -9 test: writes documents in batches with background merges,
/// printing each acknowledged batch and each merge it sees start. Run by the parent only.
#[test]
#[ignore = "run by a_kill_during_a_merge_loses_nothing as a child process"]
fn merge_crash_child() {
    let Ok(dir) = std::env::var("RAGFLEET_MERGE_CHILD_DIR") else {
        return;
    };
    const DIM: usize = 64;
    let start: usize = std::env::var("RAGFLEET_MERGE_CHILD_START")
        .unwrap()
        .parse()
        .unwrap();
    let (mut ix, _) = ShardIndex::open(std::path::Path::new(&dir), settings(256, true)).unwrap();
    let mut merging = false;
    // whether a second merge ran beside the first at the last look
    let mut beside = false;
    let mut batches_while_merging = 0;
    for b in 0.. {
        let first = start + b * 64;
        let vecs = clustered(64, DIM, 8, 0.1, 9, first as u64);
        let ops: Vec<WriteOp> = vecs
            .into_iter()
            .enumerate()
            .map(|(j, v)| one(&format!("d{}", first + j), "doc", v, 1))
            .collect();
        ix.write(ops, &model(DIM)).unwrap();
        println!("acked {} {}", first, first + 64);
        if ix.maintain().unwrap() {
            println!("merged");
        }
        // pace the writer: on a busy machine the low-priority merge thread would otherwise fall
        // ever further behind a shard that keeps growing, and no merge would finish in time
        batches_while_merging = if ix.merging() {
            batches_while_merging + 1
        } else {
            0
        };
        // a second merge can start in the paced wait too: it is looked for there as well
        let mut look = |ix: &ShardIndex| {
            let running = ix.merges_running();
            if running == 2 && !beside {
                println!("beside");
            }
            beside = running == 2;
        };
        look(&ix);
        while ix.merging() && batches_while_merging > 16 {
            if ix.maintain().unwrap() {
                println!("merged");
            }
            look(&ix);
            std::thread::sleep(Duration::from_millis(5));
        }
        if ix.merging() != merging {
            merging = ix.merging();
            if merging {
                println!("merging");
            }
        }
    }
}

#[test]
fn a_kill_during_a_merge_loses_nothing() {
    const DIM: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let mut acked = 0usize;
    // kill at different points: as a merge starts, as one is committed, while a second runs
    // beside the first, mid-way
    for (round, point) in ["merging", "merged", "beside", "merging", "acked", "merged"]
        .iter()
        .enumerate()
    {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "merge_crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("RAGFLEET_MERGE_CHILD_DIR", dir.path())
            .env("RAGFLEET_MERGE_CHILD_START", acked.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut seen_acked_after_point = 0;
        let mut at_point = false;
        for line in out.lines() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("acked ") {
                acked = rest.split(' ').nth(1).unwrap().parse().unwrap();
                if at_point || *point == "acked" {
                    seen_acked_after_point += 1;
                }
            }
            if line == *point {
                at_point = true;
            }
            // "merging": kill at once; "merged": kill right after a commit; "acked": after a few
            // batches, wherever the merge thread is
            let now = match *point {
                "acked" => seen_acked_after_point >= 20 + round * 3,
                _ => at_point,
            };
            if now {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: no {point} seen");
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let (ix, rep) = ShardIndex::open(dir.path(), settings(256, false)).unwrap();
        assert!(
            rep.problems.iter().all(|p| !p.contains("corrupt")),
            "round {round}: {:?}",
            rep.problems
        );
        assert!(!rep.needs_catch_up, "round {round}: {rep:?}");
        assert!(
            ix.doc_count() as usize >= acked,
            "round {round} ({point}): {} documents, {acked} acknowledged",
            ix.doc_count()
        );
        assert!(ix.wait_for_graphs(Duration::from_secs(60)));
        // every acknowledged document is there, whole
        let ids: Vec<String> = (0..acked).map(|i| format!("d{i}")).collect();
        let held = ix.fetch(&ids);
        assert_eq!(
            held.len(),
            acked,
            "round {round}: acknowledged documents missing"
        );
        // and searchable through the (merged) graphs: found by its own vector (approximate
        // search: a rare miss is allowed, a lost graph or a wrong position map is not)
        let probes: Vec<usize> = (0..acked).step_by(97).collect();
        let found = probes
            .iter()
            .filter(|&&i| {
                let v = clustered(64, DIM, 8, 0.1, 9, (i - i % 64) as u64).remove(i % 64);
                let hits = ix.search(&dense(v, 10, DIM)).unwrap();
                hits.iter().any(|h| h.doc_id == format!("d{i}"))
            })
            .count();
        assert!(
            found * 100 >= probes.len() * 98,
            "round {round}: {found} of {} found by their own vectors",
            probes.len()
        );
        // no temporary or unlisted files survive the reopen
        assert!(files(dir.path(), "merging").is_empty());
        assert!(files(dir.path(), "tmp").is_empty());
        acked = ix.doc_count() as usize;
        println!(
            "round {round} ({point}): {acked} documents, {:?}",
            ix.segment_stats()
        );
    }
}
