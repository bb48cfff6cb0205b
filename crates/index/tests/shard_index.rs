use ragfleet_index::{IndexSettings, ShardIndex};
use ragfleet_proto::{ChunkRecord, ModelIdentity, SearchMode, SearchQuery, WriteOp};
use rand::{Rng, SeedableRng};

const DIM: usize = 32;

fn model() -> ModelIdentity {
    ModelIdentity {
        name: "test-model".into(),
        weights_sha256: "00".repeat(32),
        dim: DIM as u32,
        max_len: 256,
        pooling: "mean".into(),
        normalized: true,
    }
}

fn settings(segment_size: usize) -> IndexSettings {
    IndexSettings {
        segment_size,
        ef_construction: 64,
        ef_search: 64,
        background: false,
        deletion_grace: None,
        ..IndexSettings::default()
    }
}

/// Deletes `doc` through the write path with no version (as an unversioned client write).
fn delete_unversioned(ix: &mut ShardIndex, doc: &str) {
    let op = WriteOp::Delete {
        doc_id: doc.into(),
        version: 0,
    };
    ix.write(vec![op], &model()).unwrap();
}

fn vec_for(seed: u64) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..DIM).map(|_| r.gen_range(-1.0..1.0)).collect()
}

fn upsert(doc: &str, text: &str, seed: u64) -> WriteOp {
    WriteOp::Upsert {
        version: 0,
        doc_id: doc.into(),
        chunks: vec![ChunkRecord {
            doc_id: doc.into(),
            chunk_id: format!("{doc}#0"),
            text: text.into(),
            vector: vec_for(seed),
            sentences: Default::default(),
        }],
    }
}

fn query(seed: u64, text: &str, mode: SearchMode) -> SearchQuery {
    SearchQuery {
        vector: vec_for(seed),
        text: text.into(),
        k: 3,
        mode,
        model: Some(model()),
    }
}

#[test]
fn upserts_and_deletes_are_visible_to_the_next_search() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(1000)).unwrap();
    ix.write(
        vec![
            upsert("a", "alpha particles", 1),
            upsert("b", "beta decay", 2),
        ],
        &model(),
    )
    .unwrap();
    let hits = ix.search(&query(1, "", SearchMode::Dense)).unwrap();
    assert_eq!(hits[0].doc_id, "a");
    assert!(hits[0].score > 0.99);
    // replace a: its old vector no longer matches
    ix.write(vec![upsert("a", "alpha rays", 3)], &model())
        .unwrap();
    let hits = ix.search(&query(1, "", SearchMode::Dense)).unwrap();
    assert!(hits.iter().all(|h| h.score < 0.99));
    assert_eq!(
        ix.search(&query(3, "", SearchMode::Dense)).unwrap()[0].text,
        "alpha rays"
    );
    // delete b
    delete_unversioned(&mut ix, "b");
    let hits = ix.search(&query(2, "beta", SearchMode::Bm25)).unwrap();
    assert!(hits.is_empty());
    assert_eq!(ix.doc_count(), 1);
}

#[test]
fn recovers_from_log_and_segments_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), settings(16)).unwrap();
        for i in 0..40u64 {
            ix.write(
                vec![upsert(&format!("d{i}"), &format!("document {i}"), i)],
                &model(),
            )
            .unwrap();
        }
        delete_unversioned(&mut ix, "d3");
        assert!(ix.segment_stats().0 >= 1);
    }
    let (ix, report) = ShardIndex::open(dir.path(), settings(16)).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(ix.doc_count(), 39);
    assert!(ix.wait_for_graphs(std::time::Duration::from_secs(30)));
    for i in [0u64, 17, 39] {
        let h = ix.search(&query(i, "", SearchMode::Dense)).unwrap();
        assert_eq!(h[0].doc_id, format!("d{i}"));
    }
    assert!(ix
        .search(&query(3, "", SearchMode::Dense))
        .unwrap()
        .iter()
        .all(|h| h.doc_id != "d3"));
    assert_eq!(ix.last_seq(), 41);
}

#[test]
fn torn_log_tail_is_detected_and_the_rest_recovered() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), settings(1000)).unwrap();
        for i in 0..5u64 {
            ix.write(vec![upsert(&format!("d{i}"), "t", i)], &model())
                .unwrap();
        }
    }
    let wal = dir.path().join("wal.log");
    let bytes = std::fs::read(&wal).unwrap();
    std::fs::write(&wal, &bytes[..bytes.len() - 7]).unwrap();
    let (ix, report) = ShardIndex::open(dir.path(), settings(1000)).unwrap();
    assert_eq!(ix.doc_count(), 4);
    assert!(
        report.problems.iter().any(|p| p.contains("torn")),
        "{:?}",
        report.problems
    );
}

#[test]
fn corrupt_segment_is_reported_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), settings(16)).unwrap();
        for i in 0..20u64 {
            ix.write(vec![upsert(&format!("d{i}"), "t", i)], &model())
                .unwrap();
        }
    }
    let seg = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "bin")
                && p.file_name().unwrap().to_string_lossy().starts_with("seg-")
        })
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&seg, bytes).unwrap();
    let (ix, report) = ShardIndex::open(dir.path(), settings(16)).unwrap();
    assert!(report.needs_catch_up);
    assert!(
        report.problems.iter().any(|p| p.contains("checksum")),
        "{:?}",
        report.problems
    );
    // the log tail (after the seal) is still there
    assert_eq!(ix.doc_count(), 4);
}

#[test]
fn another_model_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(100)).unwrap();
    ix.write(vec![upsert("a", "t", 1)], &model()).unwrap();
    let mut other = model();
    other.name = "other-model".into();
    let e = ix
        .write(vec![upsert("b", "t", 2)], &other)
        .unwrap_err()
        .to_string();
    assert!(e.contains("test-model") && e.contains("other-model"), "{e}");
    let mut q = query(1, "", SearchMode::Dense);
    q.model = Some(other);
    assert!(ix.search(&q).is_err());
}

#[test]
fn bad_vectors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(100)).unwrap();
    let bad = WriteOp::Upsert {
        version: 0,
        doc_id: "a".into(),
        chunks: vec![ChunkRecord {
            doc_id: "a".into(),
            chunk_id: "a#0".into(),
            text: "t".into(),
            vector: vec![0.0; DIM],
            sentences: Default::default(),
        }],
    };
    assert!(ix.write(vec![bad], &model()).is_err());
    let short = WriteOp::Upsert {
        version: 0,
        doc_id: "a".into(),
        chunks: vec![ChunkRecord {
            doc_id: "a".into(),
            chunk_id: "a#0".into(),
            text: "t".into(),
            vector: vec![1.0; 3],
            sentences: Default::default(),
        }],
    };
    assert!(ix.write(vec![short], &model()).is_err());
    assert_eq!(ix.doc_count(), 0);
}

#[test]
fn hybrid_fuses_dense_and_bm25() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(100)).unwrap();
    ix.write(
        vec![
            upsert("a", "zebra stripes", 1),
            upsert("b", "lion mane", 2),
            upsert("c", "other", 3),
        ],
        &model(),
    )
    .unwrap();
    // dense favours b, bm25 favours a: both in the fused top 2
    let mut q = query(2, "zebra", SearchMode::Hybrid);
    q.k = 2;
    let hits = ix.search(&q).unwrap();
    let ids: Vec<&str> = hits.iter().map(|h| h.doc_id.as_str()).collect();
    assert!(ids.contains(&"a") && ids.contains(&"b"), "{ids:?}");
    // every hit carries its cosine similarity to the query vector, BM25 hits included
    let (dense, bm25) = ix.hybrid_parts(&q).unwrap();
    let b_sim = dense
        .iter()
        .find(|h| h.doc_id == "b")
        .unwrap()
        .similarity
        .unwrap();
    assert!(b_sim > 0.99, "{b_sim}");
    let a_bm25 = bm25.iter().find(|h| h.doc_id == "a").unwrap();
    let a_dense = dense.iter().find(|h| h.doc_id == "a").unwrap();
    assert!((a_bm25.similarity.unwrap() - a_dense.similarity.unwrap()).abs() < 1e-5);
    // a BM25 query without a vector has none
    let mut q = query(2, "zebra", SearchMode::Bm25);
    q.vector.clear();
    assert!(ix
        .search(&q)
        .unwrap()
        .iter()
        .all(|h| h.similarity.is_none()));
}

fn bm25_ids(ix: &ShardIndex, text: &str) -> Vec<(String, u32)> {
    let mut q = query(0, text, SearchMode::Bm25);
    q.k = 20;
    ix.search(&q)
        .unwrap()
        .into_iter()
        .map(|h| (h.chunk_id, (h.score * 1e4) as u32))
        .collect()
}

#[test]
fn bm25_postings_are_written_per_segment_and_recovered_with_the_log_tail() {
    let dir = tempfile::tempdir().unwrap();
    let words = ["proton", "neutron", "electron", "quark", "gluon", "photon"];
    let text = |i: usize| format!("{} {} number {i}", words[i % 6], words[(i * 7 + 1) % 6]);
    let before;
    {
        // segment_size 10: 25 documents give two sealed segments and a growing tail in the log
        let (mut ix, _) = ShardIndex::open(dir.path(), settings(10)).unwrap();
        for i in 0..25 {
            ix.write(vec![upsert(&format!("d{i}"), &text(i), i as u64)], &model())
                .unwrap();
        }
        // a delete and a replace after the last seal live only in the log
        delete_unversioned(&mut ix, "d3");
        ix.write(vec![upsert("d4", "tachyon", 99)], &model())
            .unwrap();
        before = bm25_ids(&ix, "proton quark tachyon");
        assert!(before.iter().any(|(c, _)| c == "d4#0"));
        assert!(!before.iter().any(|(c, _)| c == "d3#0"));
    }
    let snaps: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "post"))
        .collect();
    assert!(!snaps.is_empty(), "no BM25 postings file written");
    let (ix, rep) = ShardIndex::open(dir.path(), settings(10)).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    // two seals of 10, merged into one segment of two data files: one postings file a
    // segment, all of them read
    assert!(rep.segments >= 1, "{rep:?}");
    assert_eq!(rep.bm25_snapshots, snaps.len());
    assert_eq!(snaps.len(), rep.segments, "{snaps:?}");
    assert!(rep.replayed > 0);
    assert_eq!(bm25_ids(&ix, "proton quark tachyon"), before);
    drop(ix);

    // a corrupt postings file is reported, never loaded; the postings are rebuilt from the
    // segment's text and written again, so the next open is clean again
    let victim = snaps[0].path();
    let mut bytes = std::fs::read(&victim).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x5a;
    std::fs::write(&victim, &bytes).unwrap();
    let (ix, rep) = ShardIndex::open(dir.path(), settings(10)).unwrap();
    assert_eq!(rep.problems.len(), 1, "{:?}", rep.problems);
    assert!(rep.problems[0].contains("checksum"), "{:?}", rep.problems);
    assert!(!rep.needs_catch_up, "BM25 is derivable from the segment");
    assert_eq!(bm25_ids(&ix, "proton quark tachyon"), before);
    drop(ix);
    let (_ix, rep) = ShardIndex::open(dir.path(), settings(10)).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    assert_eq!(rep.bm25_snapshots, snaps.len());
}

fn versioned(doc: &str, text: &str, seed: u64, version: u64) -> WriteOp {
    match upsert(doc, text, seed) {
        WriteOp::Upsert { doc_id, chunks, .. } => WriteOp::Upsert {
            doc_id,
            chunks,
            version,
        },
        other => other,
    }
}

fn text_of(ix: &ShardIndex, doc: &str) -> Option<String> {
    ix.dump().into_iter().find_map(|op| match op {
        WriteOp::Upsert { doc_id, chunks, .. } if doc_id == doc => Some(chunks[0].text.clone()),
        _ => None,
    })
}

#[test]
fn older_versions_never_overwrite_newer_ones_or_resurrect_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(4)).unwrap();
    // a replica that got the newer write of "a" (acknowledged at a quorum its peer missed)
    ix.write(vec![versioned("a", "new text", 1, 20)], &model())
        .unwrap();
    ix.write(
        vec![
            versioned("b", "doomed", 2, 10),
            WriteOp::Delete {
                doc_id: "b".into(),
                version: 30,
            },
        ],
        &model(),
    )
    .unwrap();
    // a lagging peer's dump: an older "a", and "b" as it was before the delete
    let stale = vec![
        versioned("a", "old text", 3, 15),
        versioned("b", "doomed", 2, 10),
    ];
    ix.write(stale.clone(), &model()).unwrap();
    assert_eq!(text_of(&ix, "a").as_deref(), Some("new text"));
    assert_eq!(text_of(&ix, "b"), None);
    assert_eq!(ix.version_of("a"), Some(20));
    assert_eq!(ix.version_of("b"), Some(30));
    // the same holds after a restart (versions and deletions are durable), with segments sealed
    for i in 0..6 {
        ix.write(
            vec![versioned(&format!("f{i}"), "filler", 10 + i, 40 + i)],
            &model(),
        )
        .unwrap();
    }
    drop(ix);
    let (mut ix, rep) = ShardIndex::open(dir.path(), settings(4)).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    assert!(rep.segments >= 1);
    ix.write(stale, &model()).unwrap();
    assert_eq!(text_of(&ix, "a").as_deref(), Some("new text"));
    assert_eq!(text_of(&ix, "b"), None);
    // the dump carries versions and deletions, so a peer replaying it converges here
    let dump = ix.dump();
    assert!(dump
        .iter()
        .any(|o| matches!(o, WriteOp::Delete { doc_id, version: 30 } if doc_id == "b")));
    assert!(dump
        .iter()
        .any(|o| matches!(o, WriteOp::Upsert { doc_id, version: 20, .. } if doc_id == "a")));
    let peer_dir = tempfile::tempdir().unwrap();
    let (mut peer, _) = ShardIndex::open(peer_dir.path(), settings(4)).unwrap();
    peer.write(vec![versioned("b", "doomed", 2, 10)], &model())
        .unwrap();
    peer.write(dump, &model()).unwrap();
    assert_eq!(text_of(&peer, "b"), None);
    assert_eq!(text_of(&peer, "a").as_deref(), Some("new text"));
    // a newer write still replaces
    ix.write(vec![versioned("a", "newest", 4, 50)], &model())
        .unwrap();
    assert_eq!(text_of(&ix, "a").as_deref(), Some("newest"));
}

/// Pulls what `to` lacks of `from`'s state, the way a catching-up or repairing replica does.
fn pull(to: &mut ShardIndex, from: &ShardIndex) -> ragfleet_index::PullPlan {
    let plan = to.plan_pull(&from.versions());
    let mut ops = from.fetch(&plan.fetch);
    ops.extend(plan.deletes.iter().cloned());
    to.write(ops, &model()).unwrap();
    plan
}

#[test]
fn replicas_that_diverged_both_ways_converge_by_pulling_only_what_differs() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, _) = ShardIndex::open(da.path(), settings(4)).unwrap();
    let (mut b, _) = ShardIndex::open(db.path(), settings(4)).unwrap();
    // both got the same 10 documents, in different orders
    let common: Vec<WriteOp> = (0..10)
        .map(|i| versioned(&format!("c{i}"), &format!("common {i}"), i, 100 + i))
        .collect();
    a.write(common.clone(), &model()).unwrap();
    b.write(common.into_iter().rev().collect(), &model())
        .unwrap();
    assert_eq!(a.versions().digest(), b.versions().digest());
    // then each missed writes the other got: a new document, a newer copy, a deletion
    a.write(vec![versioned("only-a", "written on a", 20, 200)], &model())
        .unwrap();
    a.write(vec![versioned("c1", "c1 rewritten", 21, 201)], &model())
        .unwrap();
    b.write(vec![versioned("only-b", "written on b", 22, 202)], &model())
        .unwrap();
    b.delete(&["c2".to_string()], 203).unwrap();
    b.write(
        vec![versioned("c3", "c3 rewritten on b", 23, 204)],
        &model(),
    )
    .unwrap();
    assert_ne!(a.versions().digest(), b.versions().digest());
    assert_ne!(a.digest(), b.digest());
    assert_eq!(b.digest(), b.versions().digest());

    let plan = pull(&mut a, &b);
    // only what differs travels: b's new document and newer copy, and b's deletion
    let mut fetched = plan.fetch.clone();
    fetched.sort();
    assert_eq!(fetched, vec!["c3".to_string(), "only-b".to_string()]);
    assert_eq!(plan.deletes.len(), 1);
    assert_eq!(text_of(&a, "c2"), None);
    assert_eq!(
        text_of(&a, "c1").as_deref(),
        Some("c1 rewritten"),
        "a's newer copy kept"
    );
    let plan = pull(&mut b, &a);
    let mut fetched = plan.fetch.clone();
    fetched.sort();
    assert_eq!(fetched, vec!["c1".to_string(), "only-a".to_string()]);
    assert!(plan.deletes.is_empty());
    assert_eq!(a.versions(), b.versions());
    assert_eq!(a.versions().digest(), b.versions().digest());
    assert_eq!(a.digest(), a.versions().digest());
    assert_eq!(a.digest(), b.digest());
    assert_eq!(a.dump(), b.dump());
    // converged: nothing left to pull either way
    assert!(a.plan_pull(&b.versions()).is_empty());
    assert!(b.plan_pull(&a.versions()).is_empty());
    // a stale peer (older copies, a deleted document still live) gives nothing to pull
    let dc = tempfile::tempdir().unwrap();
    let (mut stale, _) = ShardIndex::open(dc.path(), settings(4)).unwrap();
    stale
        .write(vec![versioned("c2", "common 2", 2, 102)], &model())
        .unwrap();
    stale
        .write(vec![versioned("c1", "common 1", 1, 101)], &model())
        .unwrap();
    assert!(a.plan_pull(&stale.versions()).is_empty());
}

/// Pulls what `to` lacks of `from`'s state bucket by differing bucket, in pages of about
/// `page` bytes, as the runtime's pull does; (buckets that differed, pages).
fn pull_by_buckets(to: &mut ShardIndex, from: &ShardIndex, page: usize) -> (usize, usize) {
    let buckets = ragfleet_proto::bucket_count(to.doc_count().max(from.doc_count()));
    let (mine, theirs) = (to.bucket_digests(buckets), from.bucket_digests(buckets));
    let mut wanted: Vec<u32> = (0..buckets)
        .filter(|&b| mine[b as usize] != theirs[b as usize])
        .collect();
    let (differing, mut pages) = (wanted.len(), 0);
    while !wanted.is_empty() {
        let (versions, covered) = from.versions_in(buckets, &wanted, page);
        assert!(covered >= 1 && covered <= wanted.len());
        // a page is whole buckets within its bytes, unless one bucket alone is larger
        let bytes: usize = versions
            .live
            .iter()
            .chain(&versions.deleted)
            .map(|(d, _)| ragfleet_proto::version_entry_bytes(d))
            .sum();
        assert!(
            covered == 1 || bytes <= page,
            "{bytes} bytes in {covered} buckets"
        );
        for (d, _) in versions.live.iter().chain(&versions.deleted) {
            assert!(wanted[..covered].contains(&ragfleet_proto::doc_bucket(d, buckets)));
        }
        let plan = to.plan_pull(&versions);
        let mut ops = from.fetch(&plan.fetch);
        ops.extend(plan.deletes.iter().cloned());
        to.write(ops, &model()).unwrap();
        wanted.drain(..covered);
        pages += 1;
    }
    (differing, pages)
}

#[test]
fn bucket_digests_find_the_few_buckets_that_differ_and_pages_of_them_converge_replicas() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, _) = ShardIndex::open(da.path(), settings(512)).unwrap();
    let (mut b, _) = ShardIndex::open(db.path(), settings(512)).unwrap();
    let common: Vec<WriteOp> = (0..3000)
        .map(|i| versioned(&format!("doc-{i:05}"), "common", i, 1000 + i))
        .collect();
    a.write(common.clone(), &model()).unwrap();
    b.write(common, &model()).unwrap();
    b.delete(&["doc-00007".to_string()], 9000).unwrap();
    a.delete(&["doc-00007".to_string()], 9000).unwrap();
    let buckets = ragfleet_proto::bucket_count(a.doc_count());
    assert_eq!(buckets, 16, "~256 documents a bucket, a power of two");
    // the buckets sum to the digest, and agree where the replicas do
    let sum = |d: &[u64]| d.iter().fold(0u64, |s, x| s.wrapping_add(*x));
    assert_eq!(sum(&a.bucket_digests(buckets)), a.digest());
    assert_eq!(a.bucket_digests(buckets), b.bucket_digests(buckets));
    assert_eq!(a.bucket_digests(1), vec![a.digest()]);
    assert_eq!(pull_by_buckets(&mut a, &b, 1 << 20), (0, 0));
    // b misses two writes and a deletion: only their buckets differ
    a.write(vec![versioned("doc-00010", "newer", 10, 5000)], &model())
        .unwrap();
    a.write(vec![versioned("new-on-a", "new", 11, 5001)], &model())
        .unwrap();
    a.delete(&["doc-00020".to_string()], 5002).unwrap();
    let changed: std::collections::BTreeSet<u32> = ["doc-00010", "new-on-a", "doc-00020"]
        .iter()
        .map(|d| ragfleet_proto::doc_bucket(d, buckets))
        .collect();
    let (ma, mb) = (a.bucket_digests(buckets), b.bucket_digests(buckets));
    let differ: std::collections::BTreeSet<u32> = (0..buckets)
        .filter(|&i| ma[i as usize] != mb[i as usize])
        .collect();
    assert_eq!(differ, changed);
    let (differing, pages) = pull_by_buckets(&mut b, &a, 1 << 20);
    assert_eq!((differing, pages), (changed.len(), 1));
    assert_eq!(a.digest(), b.digest());
    assert_eq!(text_of(&b, "doc-00010").as_deref(), Some("newer"));
    assert_eq!(text_of(&b, "doc-00020"), None);
    assert_eq!(a.versions(), b.versions());

    // an empty replica pulls everything in pages of ~4 KB of versions, whole buckets each
    let dc = tempfile::tempdir().unwrap();
    let (mut c, _) = ShardIndex::open(dc.path(), settings(512)).unwrap();
    let (differing, pages) = pull_by_buckets(&mut c, &a, 4 << 10);
    assert_eq!(
        differing, buckets as usize,
        "every bucket differs from an empty one"
    );
    assert_eq!(
        pages, buckets as usize,
        "two buckets of ~190 ids outgrow 4 KB"
    );
    let (differing, pages) = pull_by_buckets(&mut c, &a, 1 << 20);
    assert_eq!((differing, pages), (0, 0));
    assert_eq!(c.versions(), a.versions());
    let dd = tempfile::tempdir().unwrap();
    let (mut d, _) = ShardIndex::open(dd.path(), settings(512)).unwrap();
    let (_, pages) = pull_by_buckets(&mut d, &a, 24 << 10);
    assert!(pages > 1 && pages < buckets as usize, "{pages} pages");
    assert_eq!(d.versions(), a.versions());
    // wanted buckets are answered in the order asked, and an unknown one is empty
    let (v, covered) = a.versions_in(buckets, &[3], 1 << 20);
    assert_eq!(covered, 1);
    assert!(v
        .live
        .iter()
        .all(|(d, _)| ragfleet_proto::doc_bucket(d, buckets) == 3));
    assert!(!v.live.is_empty());
    let (v, covered) = a.versions_in(buckets, &[], 1 << 20);
    assert_eq!((v.live.len(), covered), (0, 0));
}

#[test]
fn the_digest_kept_up_by_each_change_equals_one_computed_from_every_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(64)).unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(33);
    let mut version = 1_000u64;
    let check = |ix: &ShardIndex, when: &str| {
        assert_eq!(ix.digest(), ix.compute_digest(), "{when}");
        assert_eq!(ix.digest(), ix.versions().digest(), "{when}");
        // the bucket digests folded from the kept fine buckets equal a pass over the entries
        for b in [1, 2, 16, 4096, ragfleet_proto::MAX_DIGEST_BUCKETS] {
            assert_eq!(
                ix.bucket_digests(b),
                ix.bucket_digests_scanned(b),
                "{when}: {b} buckets"
            );
        }
        // a page of versions by bucket (placed by the fine buckets the documents keep, or, for
        // a count that is not a power of two, by hashing the ids) holds exactly the bucket's
        let all = ix.versions();
        for b in [1, 16, 12, 4096, ragfleet_proto::MAX_DIGEST_BUCKETS] {
            let every: Vec<u32> = (0..b).rev().collect();
            let (v, covered) = ix.versions_in(b, &every, usize::MAX);
            assert_eq!(covered, b as usize, "{when}: {b} buckets");
            assert_eq!(
                (&v.live, &v.deleted),
                (&all.live, &all.deleted),
                "{when}: {b} buckets"
            );
            for one in [0, b / 3, b - 1] {
                let (v, _) = ix.versions_in(b, &[one], usize::MAX);
                let of = |l: &[(String, u64)]| -> Vec<(String, u64)> {
                    l.iter()
                        .filter(|(d, _)| ragfleet_proto::doc_bucket(d, b) == one)
                        .cloned()
                        .collect()
                };
                assert_eq!(v.live, of(&all.live), "{when}: bucket {one} of {b}");
                assert_eq!(v.deleted, of(&all.deleted), "{when}: bucket {one} of {b}");
            }
        }
    };
    for round in 0..30 {
        let mut ops = Vec::new();
        for _ in 0..40 {
            let doc = format!("d{}", r.gen_range(0..150));
            // newer writes mostly, some older ones (skipped), deletions, several chunks
            version += 1;
            let v = if r.gen_bool(0.1) {
                version - 500
            } else {
                version
            };
            ops.push(match r.gen_range(0..10) {
                0..=5 => versioned(&doc, "text", version, v),
                6 => match upsert(&doc, "two chunks", version) {
                    WriteOp::Upsert {
                        doc_id, mut chunks, ..
                    } => {
                        let mut second = chunks[0].clone();
                        second.chunk_id = format!("{doc}#1");
                        chunks.push(second);
                        WriteOp::Upsert {
                            doc_id,
                            chunks,
                            version: v,
                        }
                    }
                    other => other,
                },
                _ => WriteOp::Delete {
                    doc_id: doc,
                    version: v,
                },
            });
        }
        ix.write(ops, &model()).unwrap();
        check(&ix, &format!("round {round}"));
        if round % 7 == 3 {
            ix.seal().unwrap();
            check(&ix, &format!("sealed after round {round}"));
        }
        if round % 10 == 9 {
            let before = ix.digest();
            drop(ix);
            ix = ShardIndex::open(dir.path(), settings(64)).unwrap().0;
            assert_eq!(ix.digest(), before, "reopened after round {round}");
            check(&ix, &format!("reopened after round {round}"));
        }
    }
    // deleting everything leaves the deletion records' hashes only
    let all: Vec<String> = (0..150).map(|i| format!("d{i}")).collect();
    ix.delete(&all, version + 10).unwrap();
    check(&ix, "all deleted");
    assert_eq!(ix.doc_count(), 0);
    assert_ne!(ix.digest(), 0);
}

#[test]
fn deletion_records_past_the_grace_period_are_dropped_and_their_documents_stay_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let graced = || IndexSettings {
        deletion_grace: Some(std::time::Duration::from_secs(3600)),
        ..settings(4)
    };
    let now = ragfleet_proto::next_write_version();
    let hours_ago = |h: u64| now - h * 3600 * 1_000_000;
    let (mut ix, _) = ShardIndex::open(dir.path(), graced()).unwrap();
    // "old" was deleted 3 hours ago, "recent" a minute ago
    ix.write(
        vec![
            versioned("old", "old text", 1, hours_ago(4)),
            versioned("recent", "recent text", 2, hours_ago(4)),
        ],
        &model(),
    )
    .unwrap();
    ix.delete(&["old".to_string()], hours_ago(3)).unwrap();
    ix.delete(&["recent".to_string()], now - 60_000_000)
        .unwrap();
    assert_eq!(ix.versions().deleted.len(), 2);
    let kept_before = ix.digest();
    ix.seal().unwrap();
    // the old record is gone, the recent one kept, and the digest follows
    let deleted: Vec<String> = ix.versions().deleted.into_iter().map(|(d, _)| d).collect();
    assert_eq!(deleted, vec!["recent".to_string()]);
    assert_ne!(ix.digest(), kept_before);
    assert_eq!(ix.digest(), ix.versions().digest());
    assert_eq!(ix.bucket_digests(64), ix.bucket_digests_scanned(64));
    // a stale copy of "old" (from a lagging peer or a late retry) still cannot bring it back,
    // neither written nor pulled, and neither can it after a restart
    let stale = versioned("old", "old text", 1, hours_ago(4));
    ix.write(vec![stale.clone()], &model()).unwrap();
    assert_eq!(text_of(&ix, "old"), None);
    drop(ix);
    let (mut ix, rep) = ShardIndex::open(dir.path(), graced()).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    ix.write(vec![stale.clone()], &model()).unwrap();
    assert_eq!(text_of(&ix, "old"), None);
    let pd = tempfile::tempdir().unwrap();
    let (mut peer, _) = ShardIndex::open(pd.path(), settings(4)).unwrap();
    peer.write(vec![stale], &model()).unwrap();
    assert!(ix.plan_pull(&peer.versions()).is_empty());
    // a new write of the same id is a new document
    ix.write(
        vec![versioned(
            "old",
            "written again",
            3,
            ragfleet_proto::next_write_version(),
        )],
        &model(),
    )
    .unwrap();
    assert_eq!(text_of(&ix, "old").as_deref(), Some("written again"));
    // without a grace period nothing is dropped
    let kd = tempfile::tempdir().unwrap();
    let (mut keep, _) = ShardIndex::open(kd.path(), settings(4)).unwrap();
    keep.write(vec![versioned("x", "x", 4, hours_ago(5))], &model())
        .unwrap();
    keep.delete(&["x".to_string()], hours_ago(4)).unwrap();
    keep.seal().unwrap();
    assert_eq!(keep.versions().deleted.len(), 1);
}

#[test]
fn a_second_open_of_a_held_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(1000)).unwrap();
    ix.write(vec![upsert("a", "alpha", 1)], &model()).unwrap();
    // a restarted replica whose earlier instance still lives must not write beside it
    let e = ShardIndex::open(dir.path(), settings(1000)).unwrap_err();
    assert!(
        matches!(e, ragfleet_index::IndexError::Locked { .. }),
        "{e}"
    );
    drop(ix);
    let (ix, _) = ShardIndex::open(dir.path(), settings(1000)).unwrap();
    assert_eq!(ix.doc_count(), 1);
}

#[test]
fn a_failed_seal_keeps_the_growing_segment_searchable_and_the_write_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(4)).unwrap();
    // the segment file cannot be written: a folder stands where its temporary file goes (as
    // a full disk would refuse it)
    std::fs::create_dir(dir.path().join("seg-0.tmp")).unwrap();
    let docs: Vec<WriteOp> = (0..4)
        .map(|i| upsert(&format!("d{i}"), &format!("text {i}"), 100 + i))
        .collect();
    // the write is logged before the seal: it is acknowledged, not reported failed
    ix.write(docs, &model()).unwrap();
    assert_eq!(ix.segment_stats().0, 0, "no segment was sealed");
    for i in 0..4u64 {
        let hits = ix.search(&query(100 + i, "", SearchMode::Dense)).unwrap();
        assert_eq!(hits[0].doc_id, format!("d{i}"), "dense search lost d{i}");
    }
    assert!(dir.path().join("seg-0.tmp").is_dir());
    assert!(!dir.path().join("seg-0.bin").exists());
    // space returns: the next write seals everything
    std::fs::remove_dir(dir.path().join("seg-0.tmp")).unwrap();
    ix.write(vec![upsert("d4", "text 4", 104)], &model())
        .unwrap();
    assert_eq!(ix.segment_stats().0, 1);
    drop(ix);
    let (ix, report) = ShardIndex::open(dir.path(), settings(4)).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(ix.doc_count(), 5);
    for i in 0..5u64 {
        let hits = ix.search(&query(100 + i, "", SearchMode::Dense)).unwrap();
        assert_eq!(hits[0].doc_id, format!("d{i}"));
    }
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn the_remembered_digest_follows_every_write_deletion_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(4)).unwrap();
    let mut seen = vec![ix.digest()];
    ix.write(vec![versioned("a", "first", 1, 10)], &model())
        .unwrap();
    seen.push(ix.digest());
    // asked again without a change: the same (remembered) digest
    assert_eq!(ix.digest(), *seen.last().unwrap());
    ix.write(vec![versioned("a", "second", 2, 11)], &model())
        .unwrap();
    seen.push(ix.digest());
    ix.write(vec![versioned("b", "other", 3, 12)], &model())
        .unwrap();
    seen.push(ix.digest());
    ix.delete(&["a".to_string()], 13).unwrap();
    seen.push(ix.digest());
    // an older copy is skipped (last writer wins): nothing changed
    ix.write(vec![versioned("a", "stale", 4, 9)], &model())
        .unwrap();
    assert_eq!(ix.digest(), *seen.last().unwrap());
    for (i, d) in seen.iter().enumerate() {
        for e in &seen[i + 1..] {
            assert_ne!(d, e, "every change gives a new digest");
        }
    }
    assert_eq!(ix.digest(), ix.versions().digest());
    ix.seal().unwrap();
    let before = ix.digest();
    drop(ix);
    let (ix, _) = ShardIndex::open(dir.path(), settings(4)).unwrap();
    assert_eq!(
        ix.digest(),
        before,
        "a reopened replica has the digest it had"
    );
    assert_eq!(ix.digest(), ix.versions().digest());
}

/// A document whose chunk stores the vectors of three "sentences" (seeds s, s+1000, s+2000),
/// its own vector their sum.
fn with_sentences(doc: &str, seed: u64) -> WriteOp {
    let unit = |mut v: Vec<f32>| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        v
    };
    let sentences: Vec<Vec<f32>> = [seed, seed + 1000, seed + 2000]
        .iter()
        .map(|&s| unit(vec_for(s)))
        .collect();
    let mut op = upsert(
        doc,
        &format!("{doc} first. {doc} second. {doc} third."),
        seed,
    );
    if let WriteOp::Upsert { chunks, .. } = &mut op {
        // the chunk's vector near all three of its sentences
        chunks[0].vector = (0..DIM)
            .map(|i| sentences.iter().map(|s| s[i]).sum())
            .collect();
        chunks[0].sentences = ragfleet_proto::SentenceVectors::quantize(&sentences);
    }
    op
}

#[test]
fn stored_sentence_vectors_score_hits_through_the_log_seals_merges_reopen_and_fetch() {
    let dir = tempfile::tempdir().unwrap();
    // a query near d5's second sentence: d5's sentence score is about 1, others' lower
    let q = |mode| SearchQuery {
        vector: vec_for(1005),
        text: "d5".into(),
        k: 5,
        mode,
        model: Some(model()),
    };
    let check = |ix: &ShardIndex, when: &str| {
        for mode in [SearchMode::Dense, SearchMode::Bm25] {
            let hits = ix.search(&q(mode)).unwrap();
            assert!(!hits.is_empty(), "{when} {mode:?}");
            let d5 = hits.iter().find(|h| h.doc_id == "d5");
            let d5 = d5.unwrap_or_else(|| panic!("{when} {mode:?}: d5 not found"));
            let s = d5.sentence_score.unwrap();
            assert!(s > 0.99, "{when} {mode:?}: {s}");
            for h in &hits {
                let s = h
                    .sentence_score
                    .unwrap_or_else(|| panic!("{when}: no score"));
                assert!(s <= d5.sentence_score.unwrap() + 1e-6, "{when}: {h:?}");
            }
        }
        // a document written without sentence vectors has no sentence score
        let plain = ix.search(&query(77, "", SearchMode::Dense)).unwrap();
        assert_eq!(plain[0].doc_id, "plain");
        assert_eq!(plain[0].sentence_score, None, "{when}");
        // a query without a vector has none either
        let no_vec = SearchQuery {
            vector: Vec::new(),
            model: None,
            ..q(SearchMode::Bm25)
        };
        assert!(ix
            .search(&no_vec)
            .unwrap()
            .iter()
            .all(|h| h.sentence_score.is_none()));
    };
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), settings(8)).unwrap();
        for i in 0..30u64 {
            ix.write(vec![with_sentences(&format!("d{i}"), i)], &model())
                .unwrap();
        }
        ix.write(vec![upsert("plain", "no sentences here", 77)], &model())
            .unwrap();
        check(&ix, "live");
        // the segments merge: their entries keep their sentence vectors
        while ix.maintain().unwrap() {}
        assert!(ix.wait_for_graphs(std::time::Duration::from_secs(30)));
        check(&ix, "merged");
        // a replica catching up receives them with the document
        let fetched = ix.fetch(&["d5".to_string()]);
        let WriteOp::Upsert { chunks, .. } = &fetched[0] else {
            panic!("{fetched:?}")
        };
        assert_eq!(chunks[0].sentences.len(), 3);
    }
    let (ix, report) = ShardIndex::open(dir.path(), settings(8)).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(ix.wait_for_graphs(std::time::Duration::from_secs(30)));
    check(&ix, "reopened");
}

#[test]
fn a_bounded_fetch_covers_the_ids_that_fit_and_says_how_many() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(1000)).unwrap();
    let long = "word ".repeat(200); // ~1 KB of text a document
    for i in 0..10u64 {
        ix.write(vec![upsert(&format!("d{i}"), &long, i)], &model())
            .unwrap();
    }
    let ids: Vec<String> = ["d0", "gone", "d1", "d2", "d3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // room for about two documents: d0 and the absent id, then d1; d2 does not fit
    let (ops, covered) = ix.fetch_bounded(&ids, 2500);
    assert_eq!(covered, 3);
    let got: Vec<&str> = ops.iter().map(|o| o.doc_id()).collect();
    assert_eq!(got, vec!["d0", "d1"]);
    // the first id is always covered, however large
    let (ops, covered) = ix.fetch_bounded(&ids, 10);
    assert_eq!((ops.len(), covered), (1, 1));
    // room for everything: every id covered, absent ones left out
    let (ops, covered) = ix.fetch_bounded(&ids, usize::MAX);
    assert_eq!((ops.len(), covered), (4, 5));
}

#[test]
fn a_group_commit_logs_many_writes_with_one_fsync_and_refuses_a_bad_one_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(100)).unwrap();
    let mut other = model();
    other.name = "other-model".into();
    let mut bad_dim = upsert("bad", "wrong dimension", 9);
    if let WriteOp::Upsert { chunks, .. } = &mut bad_dim {
        chunks[0].vector.truncate(3);
    }
    let before = ix.log_syncs();
    // the first write of an empty index pins the model for the rest of the group
    let results = ix.write_group(vec![
        (vec![versioned("a", "alpha first", 1, 5)], model()),
        (vec![upsert("b", "beta", 2)], other.clone()),
        (vec![bad_dim], model()),
        // an older version of "a" within the same group is skipped, as it would be alone
        (vec![versioned("a", "alpha stale", 3, 4)], model()),
        (
            vec![upsert("c", "gamma", 4), upsert("d", "delta", 5)],
            model(),
        ),
    ]);
    assert_eq!(ix.log_syncs() - before, 1, "one fsync for the whole group");
    assert_eq!(results.len(), 5);
    assert_eq!(*results[0].as_ref().unwrap(), 1);
    let e = results[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("other-model"), "{e}");
    assert!(results[2].is_err(), "a bad chunk refuses its write");
    assert_eq!(
        *results[3].as_ref().unwrap(),
        1,
        "nothing new: the seq reached"
    );
    assert_eq!(*results[4].as_ref().unwrap(), 3);
    assert_eq!(ix.doc_count(), 3);
    assert_eq!(text_of(&ix, "a").as_deref(), Some("alpha first"));
    assert_eq!(ix.model(), Some(&model()));
    // a group of only refused or stale writes logs nothing
    let none = ix.write_group(vec![(vec![versioned("a", "older", 6, 2)], model())]);
    assert_eq!(*none[0].as_ref().unwrap(), 3);
    assert_eq!(ix.log_syncs() - before, 1);
    // what the group acknowledged survives a reopen
    drop(ix);
    let (ix, _) = ShardIndex::open(dir.path(), settings(100)).unwrap();
    assert_eq!(ix.doc_count(), 3);
    assert_eq!(ix.last_seq(), 3);
    assert_eq!(text_of(&ix, "c").as_deref(), Some("gamma"));
}

fn idle_after(segment_size: usize, idle: std::time::Duration) -> IndexSettings {
    IndexSettings {
        seal_idle: Some(idle),
        ..settings(segment_size)
    }
}

/// (doc id, score) of the dense and BM25 top 3 of a few queries.
fn answers(ix: &ShardIndex) -> Vec<Vec<(String, u32)>> {
    (0..20u64)
        .flat_map(|i| {
            [
                query(500 + i * 7, "", SearchMode::Dense),
                query(0, &format!("word{i} text"), SearchMode::Bm25),
            ]
        })
        .map(|q| {
            ix.search(&q)
                .unwrap()
                .into_iter()
                .map(|h| (h.doc_id, (h.score * 1e4).round() as u32))
                .collect()
        })
        .collect()
}

#[test]
fn an_idle_growing_segment_is_sealed_and_answers_the_same() {
    let hour = std::time::Duration::from_secs(3600);
    let second = std::time::Duration::from_secs(1);
    let n = ragfleet_index::IDLE_SEAL_MIN_CHUNKS as u64 + 44;
    let docs = |range: std::ops::Range<u64>| -> Vec<WriteOp> {
        range
            .map(|i| {
                upsert(
                    &format!("d{i}"),
                    &format!("word{} text {i}", i % 20),
                    500 + i,
                )
            })
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    // not idle for long enough: the growing segment stays
    let (mut ix, _) = ShardIndex::open(dir.path(), idle_after(4096, hour)).unwrap();
    ix.write(docs(0..n), &model()).unwrap();
    ix.maintain().unwrap();
    assert_eq!(ix.growing_chunks(), n as usize);
    assert_eq!(ix.segment_stats().0, 0);
    let before = answers(&ix);
    drop(ix);

    // reopened (the log replayed into the growing segment) with a short idle time: due once
    // it passed with no write
    let (mut ix, report) = ShardIndex::open(dir.path(), idle_after(4096, second)).unwrap();
    assert_eq!(report.replayed, 1, "one logged write");
    assert_eq!(ix.growing_chunks(), n as usize);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ix.needs_maintenance() {
        assert!(std::time::Instant::now() < deadline, "never due");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(ix.maintain().unwrap(), "the idle seal changed the segments");
    assert_eq!(ix.growing_chunks(), 0);
    assert_eq!(ix.segment_stats(), (1, 1));
    assert!(
        !ix.needs_maintenance(),
        "an empty growing segment is not sealed again"
    );
    assert_eq!(answers(&ix), before);
    // a small growing segment is left to be scanned
    ix.write(docs(n..n + 10), &model()).unwrap();
    ix.maintain().unwrap();
    assert_eq!(ix.growing_chunks(), 10);
    drop(ix);

    // what was sealed is out of the log: only the 10 later writes are replayed
    let (ix, report) = ShardIndex::open(dir.path(), idle_after(4096, hour)).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.replayed, 1, "the later write only");
    assert_eq!(ix.growing_chunks(), 10);
    assert_eq!(ix.doc_count(), n + 10);
    let after: Vec<_> = answers(&ix);
    // the 10 later documents may enter the answers (and change BM25's statistics); every
    // earlier answer's first hit stays unless one of them beat it
    for (a, b) in before.iter().zip(&after) {
        if let (Some(x), Some(y)) = (a.first(), b.first()) {
            let later = y.0[1..].parse::<u64>().unwrap() >= n;
            assert!(x.0 == y.0 || later, "{x:?} became {y:?}");
        }
    }
}

/// One-chunk documents `d{i}` of a few shared words, the vector of seed `seed + i`.
fn worded_docs(r: std::ops::Range<u64>, seed: u64) -> Vec<WriteOp> {
    r.map(|i| {
        upsert(
            &format!("d{i}"),
            &format!("word{} text {i}", i % 20),
            seed + i,
        )
    })
    .collect()
}

#[test]
fn an_idle_shard_merges_the_segment_its_idle_seal_left_into_the_largest() {
    // a segment of 8,192 sealed by size, then 300 chunks: under 1/16 of it (so the tiered
    // policy leaves them apart while writes come) but over 1/1,024 (an idle shard's ratio)
    let write = |ix: &mut ShardIndex| {
        let docs = |r| worded_docs(r, 900);
        ix.write(docs(0..8192), &model()).unwrap();
        assert_eq!(ix.segment_stats(), (1, 1));
        ix.write(docs(8192..8492), &model()).unwrap();
        assert_eq!(ix.growing_chunks(), 300);
    };
    // writes keep coming (no idle time): a seal leaves two segments
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), settings(8192)).unwrap();
    write(&mut ix);
    ix.seal().unwrap();
    ix.maintain().unwrap();
    assert_eq!(ix.segment_stats(), (2, 2), "the tiered policy merged them");
    let apart = answers(&ix);
    drop(ix);
    // idle: sealed, then merged into one
    let dir = tempfile::tempdir().unwrap();
    let idle = std::time::Duration::from_secs(1);
    let (mut ix, _) = ShardIndex::open(dir.path(), idle_after(8192, idle)).unwrap();
    write(&mut ix);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ix.growing_chunks() > 0 {
        assert!(std::time::Instant::now() < deadline, "never sealed");
        ix.maintain().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    while ix.merging() || ix.needs_maintenance() {
        assert!(std::time::Instant::now() < deadline, "never merged");
        ix.maintain().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(ix.segment_stats(), (1, 1));
    assert_eq!(ix.growing_chunks(), 0);
    assert_eq!(ix.doc_count(), 8492);
    // the same documents found: every answer's first hit as with the segments apart
    let merged = answers(&ix);
    for (a, b) in apart.iter().zip(&merged) {
        assert_eq!(a.first().map(|h| &h.0), b.first().map(|h| &h.0));
    }
}

#[test]
fn an_idle_shard_folds_a_segment_of_a_hundredth_into_the_largest_but_not_a_thousandth() {
    // 8,192 chunks sealed by size; then 5 chunks sealed (under 1/1,024 of it: an idle shard
    // leaves them apart, so that a trickle of writes does not copy the largest graph at every
    // idle time), then 100 more sealed (together ~1/78: under the 1/64 an idle shard needed
    // before, over 1/1,024): folded into the largest once idle
    let docs = |r| worded_docs(r, 700);
    let idle = std::time::Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let (mut ix, _) = ShardIndex::open(dir.path(), idle_after(8192, idle)).unwrap();
    ix.write(docs(0..8192), &model()).unwrap();
    ix.write(docs(8192..8197), &model()).unwrap();
    ix.seal().unwrap();
    assert_eq!(ix.segment_stats(), (2, 2));
    // idle for three times the idle time, maintained all along: nothing to merge
    let quiet = std::time::Instant::now() + 3 * idle;
    while std::time::Instant::now() < quiet {
        ix.maintain().unwrap();
        assert_eq!(
            ix.segment_stats(),
            (2, 2),
            "5 chunks beside 8,192 were folded"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // (the merges run inline here: a write makes the shard busy, so the seal leaves three)
    ix.write(docs(8197..8297), &model()).unwrap();
    ix.seal().unwrap();
    assert_eq!(ix.segment_stats(), (3, 3));
    let apart = answers(&ix);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ix.segment_stats() != (1, 1) || ix.merging() || ix.needs_maintenance() {
        assert!(
            std::time::Instant::now() < deadline,
            "never merged: {:?}",
            ix.segment_stats()
        );
        ix.maintain().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(ix.doc_count(), 8297);
    assert_eq!(ix.growing_chunks(), 0);
    // what was found before the fold is found after it
    let merged = answers(&ix);
    for (a, b) in apart.iter().zip(&merged) {
        assert_eq!(a.first().map(|h| &h.0), b.first().map(|h| &h.0));
    }
    // and every chunk of the folded segments is found by its own vector
    for i in [8192u64, 8196, 8197, 8296] {
        let hits = ix.search(&query(700 + i, "", SearchMode::Dense)).unwrap();
        assert_eq!(hits[0].doc_id, format!("d{i}"));
    }
}
