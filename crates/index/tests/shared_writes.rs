//! Writes in two halves: logged (and fsynced) under a shared borrow beside the searches, applied
//! under an exclusive one; seals written beside the searches, then switched in.
use std::sync::Arc;

use ragfleet_index::eval::synthetic_model;
use ragfleet_index::{IndexSettings, ShardIndex, SharedShard};
use ragfleet_proto::{ChunkRecord, ModelIdentity, SearchMode, SearchQuery, WriteOp};
use rand::{Rng, SeedableRng};

const DIM: usize = 16;

fn model() -> ModelIdentity {
    synthetic_model(DIM)
}

fn settings(segment_size: usize) -> IndexSettings {
    IndexSettings {
        segment_size,
        ef_construction: 64,
        ef_search: 64,
        background: false,
        ..IndexSettings::default()
    }
}

fn vec_for(seed: u64) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..DIM).map(|_| r.gen_range(-1.0..1.0)).collect()
}

fn upsert(doc: &str, version: u64, seed: u64) -> WriteOp {
    WriteOp::Upsert {
        version,
        doc_id: doc.into(),
        chunks: vec![ChunkRecord {
            doc_id: doc.into(),
            chunk_id: format!("{doc}#0"),
            text: format!("text of {doc} at version {version}"),
            vector: vec_for(seed),
            sentences: Default::default(),
        }],
    }
}

fn finds(ix: &ShardIndex, doc: &str, seed: u64) -> bool {
    let q = SearchQuery {
        vector: vec_for(seed),
        text: String::new(),
        k: 1,
        mode: SearchMode::Dense,
        model: Some(model()),
    };
    ix.search(&q)
        .unwrap()
        .first()
        .is_some_and(|h| h.doc_id == doc)
}

/// Data files of sealed segments in `dir`.
fn segment_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|f| {
            let name = f.file_name().to_string_lossy().to_string();
            name.starts_with("seg-") && name.ends_with(".bin")
        })
        .count()
}

#[test]
fn a_logged_write_is_durable_before_it_is_applied_and_checked_against_the_logged_versions() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), settings(1000)).unwrap();
        ix.write(vec![upsert("a", 10, 1)], &model()).unwrap();
        let syncs = ix.log_syncs();
        let logged = ix.log_group(vec![(vec![upsert("b", 10, 2)], model())]);
        assert_eq!(logged.len(), 1);
        let seq = *logged[0].as_ref().unwrap();
        assert_eq!(seq, 2, "b is the second op logged");
        assert_eq!(ix.log_syncs(), syncs + 1, "logged with its own fsync");
        // not applied: not searched, not counted, its version not held
        assert!(!finds(&ix, "b", 2));
        assert_eq!(ix.doc_count(), 1);
        assert_eq!(ix.version_of("b"), None);
        assert_eq!(ix.last_seq(), 1);
        // an older copy of b, logged after it, is checked against the logged version
        let older = ix.log_group(vec![(vec![upsert("b", 5, 3)], model())]);
        assert_eq!(
            *older[0].as_ref().unwrap(),
            2,
            "nothing new: answered at seq 2"
        );
        assert_eq!(ix.log_syncs(), syncs + 1, "the stale copy was not logged");
        // dropped before it is applied (a crash after the fsync)
    }
    let (mut ix, report) = ShardIndex::open(dir.path(), settings(1000)).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(finds(&ix, "b", 2), "the logged write is replayed at open");
    assert_eq!(ix.version_of("b"), Some(10));
    // logged, then sealed: the seal applies it before it empties the log
    let logged = ix.log_group(vec![(vec![upsert("c", 10, 4)], model())]);
    assert!(logged[0].is_ok());
    ix.seal().unwrap();
    assert!(finds(&ix, "c", 4));
    assert_eq!(ix.doc_count(), 3);
    drop(ix);
    let (ix, report) = ShardIndex::open(dir.path(), settings(1000)).unwrap();
    assert_eq!(report.replayed, 0, "the seal emptied the log");
    assert_eq!(ix.doc_count(), 3);
    assert!(finds(&ix, "c", 4));
}

#[test]
fn a_large_write_is_applied_in_parts_and_checked_against_its_unapplied_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(100_000)).unwrap();
    let docs: Vec<String> = (0..3000).map(|i| format!("d{i}")).collect();
    let ops: Vec<WriteOp> = (0..3000).map(|i| upsert(&docs[i], 1, i as u64)).collect();
    ix.write(ops, &model()).unwrap();
    let seq = ix.log_delete(&docs, 5).unwrap();
    assert_eq!(seq, 6000);
    // no time at all: one part of 256 ops, then it stops
    assert!(!ix.apply_logged_for(Some(std::time::Duration::ZERO)));
    assert_eq!(ix.doc_count(), 3000 - 256);
    assert_eq!(ix.last_seq(), 3000 + 256);
    assert_eq!(ix.version_of("d0"), Some(5));
    assert_eq!(ix.version_of("d2999"), Some(1), "not deleted yet");
    // an older copy of a document whose delete is logged and not applied yet is refused
    let older = ix.log_group(vec![(vec![upsert("d2999", 3, 7)], model())]);
    assert_eq!(*older[0].as_ref().unwrap(), 6000, "nothing new logged");
    // a newer one is logged after the delete and wins
    let newer = ix.log_group(vec![(vec![upsert("d2998", 9, 8)], model())]);
    assert_eq!(*newer[0].as_ref().unwrap(), 6001);
    assert!(ix.apply_logged_for(None));
    assert_eq!(ix.last_seq(), 6001);
    assert_eq!(ix.doc_count(), 1);
    assert_eq!(ix.version_of("d2999"), Some(5));
    assert_eq!(ix.version_of("d2998"), Some(9));
    drop(ix);
    let (ix, _) = ShardIndex::open(dir.path(), settings(100_000)).unwrap();
    assert_eq!(ix.doc_count(), 1);
    assert_eq!(ix.version_of("d2998"), Some(9));
}

#[test]
fn a_seal_prepared_before_more_writes_is_redone_whole_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(1000)).unwrap();
    let first: Vec<WriteOp> = (0..50)
        .map(|i| upsert(&format!("d{i}"), 1, i as u64))
        .collect();
    ix.write(first, &model()).unwrap();
    let prepared = ix.prepare_seal().unwrap();
    assert_eq!(
        segment_files(dir.path()),
        1,
        "the prepared files are written"
    );
    assert_eq!(ix.segment_stats().0, 0, "and not yet in the index");
    // the growing segment changes between the halves: one more document, one deleted
    ix.write(vec![upsert("d50", 1, 50)], &model()).unwrap();
    ix.delete(&["d7".to_string()], 2).unwrap();
    ix.commit_seal(prepared).unwrap();
    assert_eq!(ix.segment_stats().0, 1);
    assert_eq!(segment_files(dir.path()), 1, "the stale files were removed");
    assert_eq!(ix.growing_chunks(), 0);
    assert_eq!(ix.doc_count(), 50);
    assert_eq!(
        ix.stored_chunks(),
        51,
        "each chunk stored once (d7's dead copy until a compaction)"
    );
    assert!(finds(&ix, "d50", 50));
    assert!(!finds(&ix, "d7", 7));
    // a prepared seal whose growing segment did not change is switched in as written
    ix.write(vec![upsert("d51", 1, 51)], &model()).unwrap();
    let prepared = ix.prepare_seal().unwrap();
    ix.commit_seal(prepared).unwrap();
    ix.finish_seal().unwrap();
    assert_eq!(ix.segment_stats().0, 2);
    drop(ix);
    let (ix, report) = ShardIndex::open(dir.path(), settings(1000)).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.replayed, 0);
    assert_eq!(ix.doc_count(), 51);
    assert!(finds(&ix, "d51", 51));
    assert!(!finds(&ix, "d7", 7));
}

#[test]
fn concurrent_writers_and_searches_keep_the_newest_version_of_every_document() {
    let dir = tempfile::tempdir().unwrap();
    let (ix, _) = ShardIndex::open(dir.path(), settings(64)).unwrap();
    let shard = Arc::new(SharedShard::new(ix));
    let docs = 40u64;
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let shard = shard.clone();
            std::thread::spawn(move || {
                let mut r = rand::rngs::StdRng::seed_from_u64(w);
                for _ in 0..60 {
                    let ops: Vec<WriteOp> = (0..8)
                        .map(|_| {
                            let d = r.gen_range(0..docs);
                            // versions unique across writers: (round, writer)
                            let v = r.gen_range(1..1000u64) * 4 + w;
                            upsert(&format!("d{d}"), v, v)
                        })
                        .collect();
                    let mut newest = std::collections::HashMap::new();
                    for op in &ops {
                        let e = newest.entry(op.doc_id().to_string()).or_insert(0);
                        *e = op.version().max(*e);
                    }
                    if r.gen_bool(0.2) {
                        let d = format!("d{}", r.gen_range(0..docs));
                        let v = r.gen_range(1..1000u64) * 4 + w;
                        shard.delete(std::slice::from_ref(&d), v).unwrap();
                        let e = newest.entry(d).or_insert(0);
                        *e = v.max(*e);
                    }
                    shard.write(ops, &model()).unwrap();
                    // what this write made durable is applied when it returns
                    let ix = shard.read();
                    for (d, v) in newest {
                        assert!(ix.version_of(&d).is_some_and(|held| held >= v), "{d}");
                    }
                }
            })
        })
        .collect();
    let searcher = {
        let shard = shard.clone();
        std::thread::spawn(move || {
            let mut searched = 0;
            while searched < 200 {
                let ix = shard.read();
                let q = SearchQuery {
                    vector: vec_for(searched),
                    text: String::new(),
                    k: 5,
                    mode: SearchMode::Dense,
                    model: None,
                };
                let hits = ix.search(&q).unwrap();
                let mut ids: Vec<&str> = hits.iter().map(|h| h.doc_id.as_str()).collect();
                ids.dedup();
                assert_eq!(ids.len(), hits.len(), "a document twice in one answer");
                searched += 1;
            }
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    searcher.join().unwrap();
    let ix = Arc::try_unwrap(shard).unwrap().into_inner();
    // every live document holds one chunk, at the version its text names
    let live = ix.doc_count();
    assert_eq!(ix.chunk_count(), live);
    let held: Vec<(String, u64)> = (0..docs)
        .filter_map(|d| {
            let id = format!("d{d}");
            ix.version_of(&id).map(|v| (id, v))
        })
        .collect();
    assert_eq!(
        held.len() as u64,
        docs,
        "every document written was written"
    );
    drop(ix);
    let (ix, report) = ShardIndex::open(dir.path(), settings(64)).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(ix.doc_count(), live);
    for (id, v) in held {
        assert_eq!(ix.version_of(&id), Some(v), "{id} after reopening");
    }
}

/// The deletion records' files in `dir`, sorted.
fn deletion_files(dir: &std::path::Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|f| f.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("deletions-"))
        .collect();
    out.sort();
    out
}

#[test]
fn deletion_records_written_ahead_are_used_or_dropped_by_the_next_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(100_000)).unwrap();
    let docs: Vec<String> = (0..4000).map(|i| format!("d{i}")).collect();
    let ops: Vec<WriteOp> = (0..4000).map(|i| upsert(&docs[i], 1, i as u64)).collect();
    ix.write(ops, &model()).unwrap();
    ix.seal().unwrap();
    assert!(deletion_files(dir.path()).is_empty());
    // a mass delete: every record goes into a new base
    ix.delete(&docs[..2000], 5).unwrap();
    ix.prepare_deletions().unwrap();
    let ahead = deletion_files(dir.path());
    assert_eq!(ahead.len(), 1, "written ahead: {ahead:?}");
    ix.prepare_deletions().unwrap();
    assert_eq!(
        deletion_files(dir.path()),
        ahead,
        "nothing changed: not again"
    );
    ix.write(vec![upsert("new", 1, 9000)], &model()).unwrap();
    ix.seal().unwrap();
    assert_eq!(
        deletion_files(dir.path()),
        ahead,
        "the seal's manifest names the file written ahead"
    );
    // written ahead, then a record changes: dropped, and the manifest writes its own
    ix.delete(&docs[2000..2001], 6).unwrap();
    ix.prepare_deletions().unwrap();
    let stale: Vec<String> = deletion_files(dir.path())
        .into_iter()
        .filter(|f| !ahead.contains(f))
        .collect();
    assert_eq!(stale.len(), 1, "a delta written ahead");
    ix.delete(&docs[2001..2002], 7).unwrap();
    ix.write(vec![upsert("newer", 1, 9001)], &model()).unwrap();
    ix.seal().unwrap();
    let files = deletion_files(dir.path());
    assert!(
        !files.contains(&stale[0]),
        "the stale file is removed: {files:?}"
    );
    drop(ix);
    let (ix, report) = ShardIndex::open(dir.path(), settings(100_000)).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(ix.doc_count(), 4000 - 2002 + 2);
    assert_eq!(ix.version_of("d0"), Some(5));
    assert_eq!(ix.version_of("d2000"), Some(6));
    assert_eq!(
        ix.version_of("d2001"),
        Some(7),
        "the record the stale file missed"
    );
    assert_eq!(ix.version_of("d2002"), Some(1));
}

#[test]
fn a_compaction_after_a_mass_delete_commits_through_the_shared_index_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let background = IndexSettings {
        background: true,
        ..settings(512)
    };
    let (ix, _) = ShardIndex::open(dir.path(), background.clone()).unwrap();
    let shard = SharedShard::new(ix);
    let docs: Vec<String> = (0..3000).map(|i| format!("d{i}")).collect();
    for part in docs.chunks(500) {
        let ops = part
            .iter()
            .map(|d| upsert(d, 1, d[1..].parse().unwrap()))
            .collect();
        shard.write(ops, &model()).unwrap();
    }
    // the segments merged into one, then most of it deleted: a compaction follows
    let settle = |shard: &SharedShard, what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            shard.maintain().unwrap();
            let ix = shard.read();
            let (segs, built) = ix.segment_stats();
            if segs == built && !ix.merging() && !ix.needs_maintenance() {
                return;
            }
            drop(ix);
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    settle(&shard, "the merges of the ingest");
    let stored = shard.read().stored_chunks();
    shard.delete(&docs[..2500], 5).unwrap();
    assert_eq!(shard.read().tombstone_count(), 2500);
    settle(&shard, "the compaction");
    {
        let ix = shard.read();
        // the compaction dropped every dead copy: the maintenance after its commit pruned
        // their tombstones (found beside the searches)
        assert_eq!(ix.tombstone_count(), 0);
        assert!(
            ix.stored_chunks() < stored,
            "compacted: {} of {stored} stored",
            ix.stored_chunks()
        );
        assert_eq!(ix.doc_count(), 500);
        assert!(!finds(&ix, "d7", 7));
        assert!(finds(&ix, "d2700", 2700));
    }
    drop(shard);
    let (mut ix, report) = ShardIndex::open(dir.path(), background).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(ix.doc_count(), 500);
    assert_eq!(ix.version_of("d7"), Some(5));
    assert!(!finds(&ix, "d7", 7));
    // an older copy of a deleted document stays refused
    ix.write(vec![upsert("d7", 3, 7)], &model()).unwrap();
    assert_eq!(ix.version_of("d7"), Some(5));
    assert!(!finds(&ix, "d7", 7));
}

/// Whether the manifest written ahead of a seal's commit is still in the folder.
fn manifest_ahead_left(dir: &std::path::Path) -> bool {
    dir.join("manifest3.next").exists()
}

#[test]
fn a_seal_commits_the_manifest_written_ahead_and_empties_the_log_after_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (ix, _) = ShardIndex::open(dir.path(), settings(32)).unwrap();
        let shard = SharedShard::new(ix);
        for i in 0..32u64 {
            shard
                .write(vec![upsert(&format!("d{i}"), 1, i)], &model())
                .unwrap();
        }
        // the 32nd write filled the growing segment: sealed in halves, the manifest written
        // ahead renamed into place (nothing left of it), the log emptied after the commit
        assert_eq!(shard.read().growing_chunks(), 0);
        assert_eq!(segment_files(dir.path()), 1);
        assert!(!manifest_ahead_left(dir.path()));
    }
    let (mut ix, report) = ShardIndex::open(dir.path(), settings(32)).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.replayed, 0, "the log was emptied after the seal");
    assert_eq!(ix.doc_count(), 32);
    assert!(finds(&ix, "d7", 7));

    // the same halves by hand, stopped after the commit: the log is not emptied yet, and a
    // crash there replays nothing twice (its records are all in the manifest)
    for i in 32..64u64 {
        ix.write(vec![upsert(&format!("d{i}"), 1, i)], &model())
            .unwrap();
    }
    for i in 64..80u64 {
        ix.log_group(vec![(vec![upsert(&format!("d{i}"), 1, i)], model())]);
    }
    ix.apply_logged();
    let prepared = ix.prepare_seal().unwrap();
    ix.prepare_seal_manifest(&prepared).unwrap();
    assert!(manifest_ahead_left(dir.path()));
    ix.commit_seal(prepared).unwrap();
    assert!(!manifest_ahead_left(dir.path()), "renamed into place");
    drop(ix.take_to_free());
    drop(ix); // no finish_seal: the log still holds d64..d79
    let (mut ix, report) = ShardIndex::open(dir.path(), settings(32)).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(report.replayed > 0, "the log was not emptied");
    assert_eq!(ix.doc_count(), 80);
    assert_eq!(
        ix.growing_chunks(),
        0,
        "nothing replayed into the growing segment"
    );

    // a commit after an ahead manifest went stale (a delete in between) writes its own: the
    // delete holds after a reopen; and the next append empties the pending log first
    for i in 80..90u64 {
        ix.log_group(vec![(vec![upsert(&format!("d{i}"), 1, i)], model())]);
    }
    ix.apply_logged();
    let prepared = ix.prepare_seal().unwrap();
    ix.prepare_seal_manifest(&prepared).unwrap();
    ix.delete(&["d3".to_string()], 5).unwrap();
    ix.commit_seal(prepared).unwrap();
    assert!(!manifest_ahead_left(dir.path()), "the stale one is removed");
    ix.write(vec![upsert("late", 1, 999)], &model()).unwrap();
    drop(ix);
    let (ix, report) = ShardIndex::open(dir.path(), settings(32)).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(ix.version_of("d3"), Some(5), "deleted at version 5");
    assert!(!finds(&ix, "d3", 3));
    assert!(finds(&ix, "late", 999), "written after the log's reset");
    assert!(finds(&ix, "d85", 85));
    assert_eq!(ix.doc_count(), 90, "89 of d0..d89 and late");
    assert_eq!(ix.growing_chunks(), 1, "only late is replayed");
}

/// Graph files in `dir` (one a sealed segment, merged or not, with its graph written).
fn graph_files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|f| f.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("seg-") && n.ends_with(".hnsw"))
        .collect();
    v.sort();
    v
}

/// Writes `n` documents from `from` into a background-merging index and waits (polling) for
/// a merge that finished and waits for its commit (starting one once the graphs are built,
/// as the shard's owner does), then for every sealed segment's graph, so that no seal's
/// graph file appears in the folder after the caller's look at it (a seal the merge left
/// out may still be building its graph on a loaded machine).
fn until_a_merge_waits(ix: &mut ShardIndex, from: u64, n: u64) {
    for i in from..from + n {
        ix.write(vec![upsert(&format!("d{i}"), 1, i)], &model())
            .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ix.merge_finished() {
        if !ix.merging() && ix.needs_maintenance() {
            ix.maintain().unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "no merge finished");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        ix.wait_for_graphs(std::time::Duration::from_secs(60)),
        "a sealed segment's graph was not built"
    );
}

#[test]
fn a_merge_that_finished_before_a_seal_is_committed_prepared_not_inside_the_seal() {
    let dir = tempfile::tempdir().unwrap();
    let background = IndexSettings {
        background: true,
        ..settings(32)
    };
    let (mut ix, _) = ShardIndex::open(dir.path(), background).unwrap();
    until_a_merge_waits(&mut ix, 0, 96);
    let segments = ix.segment_stats().0;
    // (a merge that finished during the writes may have been committed by their seals)
    let before = ix.merge_commits();
    // the next writes fill the growing segment: their seal finds the merge waiting and
    // commits it first, its files renamed and its manifest written ahead, in a hold of its
    // own (before, the seal's commit committed it inline: renames, manifest and a
    // compaction's pruning under the lock)
    let shard = SharedShard::new(ix);
    for i in 96..128 {
        shard
            .write(vec![upsert(&format!("d{i}"), 1, i)], &model())
            .unwrap();
    }
    let ix = shard.into_inner();
    // the merge that waited was committed prepared; a merge the seal's commit itself starts
    // may finish at once on these tiny segments and be committed there too
    let commits = ix.merge_commits();
    assert_eq!(
        commits.prepared - before.prepared,
        1,
        "{before:?} -> {commits:?}"
    );
    assert!(commits.all > before.all);
    // one more sealed, and the merge's sources replaced by one
    assert!(ix.segment_stats().0 < segments + 1);
    assert_eq!(ix.doc_count(), 128);
    assert!((0..128).all(|i| finds(&ix, &format!("d{i}"), i)));
}

#[test]
fn a_merge_commit_prepared_beside_the_searches_is_crash_safe_and_kept_or_redone() {
    let dir = tempfile::tempdir().unwrap();
    let background = IndexSettings {
        background: true,
        ..settings(32)
    };
    // a merge of the first seals finished; its commit prepared (files renamed, the manifest
    // written ahead), then the process "dies" before the commit: the open keeps the sources,
    // removes the merged files no manifest lists, and every document is there
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), background.clone()).unwrap();
        until_a_merge_waits(&mut ix, 0, 96);
        let before = graph_files(dir.path());
        ix.prepare_merge_commit().unwrap();
        assert!(manifest_ahead_left(dir.path()));
        let after = graph_files(dir.path());
        assert_eq!(after.len(), before.len() + 1, "{before:?} -> {after:?}");
        // preparing twice renames nothing twice
        ix.prepare_merge_commit().unwrap();
    }
    let listed = |dir: &std::path::Path| {
        let (ix, report) = ShardIndex::open(dir, settings(32)).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        ix
    };
    {
        let files_then = graph_files(dir.path());
        let (ix, report) = ShardIndex::open(dir.path(), background.clone()).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(!manifest_ahead_left(dir.path()));
        assert!(
            graph_files(dir.path()).len() < files_then.len(),
            "the unlisted merged segment's files are removed"
        );
        assert_eq!(ix.doc_count(), 96);
        assert!((0..96).all(|i| finds(&ix, &format!("d{i}"), i)));
    }
    // prepared and committed: the commit renames the manifest written ahead into place
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), background.clone()).unwrap();
        until_a_merge_waits(&mut ix, 96, 64);
        let segments = ix.segment_stats().0;
        ix.prepare_merge_commit().unwrap();
        assert!(manifest_ahead_left(dir.path()));
        assert!(ix.maintain().unwrap(), "committed");
        assert!(ix.segment_stats().0 < segments);
        assert!(!manifest_ahead_left(dir.path()), "renamed into place");
    }
    let ix = listed(dir.path());
    assert_eq!(ix.doc_count(), 160);
    assert!((0..160).all(|i| finds(&ix, &format!("d{i}"), i)));
    drop(ix);
    // a delete between the preparation and the commit makes the manifest written ahead
    // stale: the commit writes its own, and the delete holds after a reopen
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), background).unwrap();
        until_a_merge_waits(&mut ix, 160, 64);
        ix.prepare_merge_commit().unwrap();
        ix.delete(&["d5".to_string(), "d170".to_string()], 5)
            .unwrap();
        ix.maintain().unwrap();
        assert!(!manifest_ahead_left(dir.path()), "the stale one is removed");
    }
    let ix = listed(dir.path());
    assert_eq!(ix.version_of("d5"), Some(5));
    assert!(!finds(&ix, "d5", 5) && !finds(&ix, "d170", 170));
    assert_eq!(ix.doc_count(), 222);
    assert!((0..224)
        .filter(|i| *i != 5 && *i != 170)
        .all(|i| finds(&ix, &format!("d{i}"), i)));
}

#[test]
fn maps_grown_and_shrunk_beside_the_searches_keep_every_document() {
    let dir = tempfile::tempdir().unwrap();
    let (ix, _) = ShardIndex::open(dir.path(), settings(1024)).unwrap();
    let shard = SharedShard::new(ix);
    for batch in 0..24u64 {
        let ops = (batch * 500..(batch + 1) * 500)
            .map(|i| upsert(&format!("d{i}"), 1, i))
            .collect();
        shard.write(ops, &model()).unwrap();
    }
    let (docs_room, slots_room) = shard.read().maps_room();
    assert!(
        docs_room >= 12_000 && slots_room >= 12_000,
        "grown by copies: {docs_room} {slots_room}"
    );
    assert_eq!(shard.read().doc_count(), 12_000);
    for i in [0u64, 4_095, 4_096, 8_191, 11_999] {
        assert!(finds(&shard.read(), &format!("d{i}"), i), "d{i}");
    }
    // most documents deleted: the next write's maps are copied smaller
    let doomed: Vec<String> = (0..11_000).map(|i| format!("d{i}")).collect();
    shard.delete(&doomed, 2).unwrap();
    shard
        .write(vec![upsert("after", 1, 77_777)], &model())
        .unwrap();
    let (docs_room, slots_room) = shard.read().maps_room();
    assert!(
        docs_room < 6_000 && slots_room < 6_000,
        "shrunk by copies: {docs_room} {slots_room}"
    );
    {
        let ix = shard.read();
        assert_eq!(ix.doc_count(), 1_001);
        assert_eq!(ix.version_of("d5"), Some(2), "the deletion's version");
        assert!(!finds(&ix, "d10999", 10_999));
        assert!(finds(&ix, "d11000", 11_000));
        assert!(finds(&ix, "after", 77_777));
    }
    drop(shard);
    let (ix, report) = ShardIndex::open(dir.path(), settings(1024)).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(ix.doc_count(), 1_001);
    assert!(finds(&ix, "d11999", 11_999));
    assert!(!finds(&ix, "d3", 3));
}
