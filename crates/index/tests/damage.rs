//! Every file of a shard's folder damaged every way a disk or an operator can damage it
//! (emptied, cut short, a byte flipped anywhere in its header and throughout its body, garbage
//! appended), then the shard opened and read in full: nothing may panic, and nothing may be lost
//! or altered without the recovery report saying so.
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use ragfleet_index::{IndexSettings, RecoveryReport, ShardIndex};
use ragfleet_proto::{
    ChunkRecord, ModelIdentity, SearchMode, SearchQuery, SentenceVectors, WriteOp,
};
use rand::{Rng, SeedableRng};

const DIM: usize = 16;

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

fn settings() -> IndexSettings {
    IndexSettings {
        segment_size: 48,
        merge_ratio: 2,
        ef_construction: 32,
        ef_search: 32,
        background: false,
        deletion_grace: None,
        ..IndexSettings::default()
    }
}

const WORDS: [&str; 12] = [
    "alpha", "beta", "gamma", "delta", "kernel", "shard", "graph", "merge", "query", "token",
    "vector", "replica",
];

fn vector(r: &mut impl Rng) -> Vec<f32> {
    (0..DIM).map(|_| r.gen_range(-1.0..1.0)).collect()
}

fn doc(i: u64, round: u64, r: &mut impl Rng) -> WriteOp {
    let doc_id = format!("d{i}");
    let chunks = (0..1 + i % 2)
        .map(|c| {
            let text: Vec<&str> = (0..6).map(|_| WORDS[r.gen_range(0..WORDS.len())]).collect();
            let sentences = if i.is_multiple_of(3) {
                SentenceVectors::quantize(&[vector(r), vector(r)])
            } else {
                SentenceVectors::default()
            };
            ChunkRecord {
                doc_id: doc_id.clone(),
                chunk_id: format!("{doc_id}#{c}"),
                text: format!("{} r{round}", text.join(" ")),
                vector: vector(r),
                sentences,
            }
        })
        .collect();
    WriteOp::Upsert {
        version: 0,
        doc_id,
        chunks,
    }
}

/// A shard with merged and unmerged sealed segments, replaced and deleted documents (so
/// deletion records), sentence vectors, and a log tail of four writes not yet sealed: the
/// documents of each of those writes (one log record each), in order.
fn write_shard(dir: &Path) -> Vec<Vec<String>> {
    let mut r = rand::rngs::StdRng::seed_from_u64(11);
    let (mut ix, _) = ShardIndex::open(dir, settings()).unwrap();
    for batch in (0..260u64).collect::<Vec<_>>().chunks(20) {
        let ops = batch.iter().map(|&i| doc(i, 0, &mut r)).collect();
        ix.write(ops, &model()).unwrap();
        ix.maintain().unwrap();
    }
    let deletes = (0..260u64)
        .step_by(4)
        .map(|i| WriteOp::Delete {
            doc_id: format!("d{i}"),
            version: 0,
        })
        .collect();
    ix.write(deletes, &model()).unwrap();
    let replaced = (1..260u64).step_by(13).map(|i| doc(i, 1, &mut r)).collect();
    ix.write(replaced, &model()).unwrap();
    // sealed segments left beside the merged one
    for batch in (400..500u64).collect::<Vec<_>>().chunks(25) {
        let ops = batch.iter().map(|&i| doc(i, 0, &mut r)).collect();
        ix.write(ops, &model()).unwrap();
    }
    ix.seal().unwrap();
    let mut tail = Vec::new();
    for w in 0..4u64 {
        let ids: Vec<u64> = (600 + 5 * w..605 + 5 * w).collect();
        ix.write(ids.iter().map(|&i| doc(i, 0, &mut r)).collect(), &model())
            .unwrap();
        tail.push(ids.iter().map(|i| format!("d{i}")).collect());
    }
    assert!(ix.growing_chunks() > 0, "a log tail stays unsealed");
    tail
}

/// What a shard holds, read through every path that touches its files.
#[derive(Debug, PartialEq)]
struct Held {
    docs: BTreeMap<String, String>,
}

fn read_all(ix: &ShardIndex) -> Held {
    let mut r = rand::rngs::StdRng::seed_from_u64(5);
    for mode in [SearchMode::Dense, SearchMode::Bm25, SearchMode::Hybrid] {
        for q in 0..4 {
            let query = SearchQuery {
                vector: vector(&mut r),
                text: format!("{} {}", WORDS[q], WORDS[q + 5]),
                k: 10,
                mode,
                model: Some(model()),
            };
            let hits = ix.search(&query).expect("a search of an opened shard");
            for h in hits {
                assert!(h.score.is_finite(), "score {} for {}", h.score, h.doc_id);
            }
        }
    }
    let _ = ix.digest();
    let docs = ix
        .dump()
        .into_iter()
        .filter_map(|op| match op {
            WriteOp::Upsert { doc_id, chunks, .. } => Some((doc_id, format!("{chunks:?}"))),
            WriteOp::Delete { .. } => None,
        })
        .collect();
    Held { docs }
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() && e.file_name() != "LOCK" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The ways one file is damaged: a name for the failure message and the damaged bytes.
fn damages(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let n = bytes.len();
    let mut out = vec![
        ("emptied".to_string(), Vec::new()),
        ("cut to half".to_string(), bytes[..n / 2].to_vec()),
        (
            "last byte cut".to_string(),
            bytes[..n.saturating_sub(1)].to_vec(),
        ),
    ];
    let mut longer = bytes.to_vec();
    longer.extend((0..97u8).map(|i| i.wrapping_mul(37)));
    out.push(("97 bytes appended".to_string(), longer));
    // every byte of the header, then positions spread over the body
    let mut at: Vec<usize> = (0..n.min(96)).collect();
    at.extend((1..24).map(|i| n * i / 24));
    at.push(n.saturating_sub(1));
    at.sort_unstable();
    at.dedup();
    for p in at.into_iter().filter(|&p| p < n) {
        for x in [0xff, 0x01] {
            let mut b = bytes.to_vec();
            b[p] ^= x;
            out.push((format!("byte {p} xor {x:#04x}"), b));
        }
    }
    out
}

/// Whether `bytes` are in `dir` as `name`, or in one of its `damaged-<n>` folders.
fn kept_somewhere(dir: &Path, name: &str, bytes: &[u8]) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .map(|p| p.join(name))
        .chain([dir.join(name)])
        .any(|p| std::fs::read(p).is_ok_and(|b| b == bytes))
}

fn open_and_read(dir: &Path) -> Result<(RecoveryReport, Held), String> {
    match ShardIndex::open(dir, settings()) {
        Ok((ix, report)) => Ok((report, read_all(&ix))),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn every_file_damaged_every_way_is_reported_never_a_panic_nor_a_silent_loss() {
    let pristine = tempfile::tempdir().unwrap();
    let tail = write_shard(pristine.path());
    let (report, expected) = open_and_read(pristine.path()).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(report.segments >= 2, "segments: {}", report.segments);
    let mut files: Vec<PathBuf> = std::fs::read_dir(pristine.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.file_name().unwrap() != "LOCK")
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    for kind in [
        ".bin",
        ".hnsw",
        ".post",
        "manifest",
        "wal.log",
        "deletions-",
    ] {
        assert!(
            names.iter().any(|n| n.contains(kind)),
            "no {kind} file among {names:?}"
        );
    }

    let mut faults = Vec::new();
    let mut cases = 0;
    let (mut refused, mut reported) = (0, 0);
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let bytes = std::fs::read(file).unwrap();
        for (how, damaged) in damages(&bytes) {
            cases += 1;
            let dir = tempfile::tempdir().unwrap();
            copy_dir(pristine.path(), dir.path());
            std::fs::write(dir.path().join(&name), &damaged).unwrap();
            let outcome = catch_unwind(AssertUnwindSafe(|| open_and_read(dir.path())));
            let case = format!("{name} {how}");
            // a file that holds data (not a graph or postings, which are rebuilt from it) is
            // never deleted or written over: in its place, or moved aside
            let derived = name.ends_with(".hnsw") || name.ends_with(".post") || name == "wal.log";
            if !derived && !kept_somewhere(dir.path(), &name, &damaged) {
                faults.push(format!("{case}: the damaged file is gone"));
            }
            match outcome {
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    faults.push(format!("{case}: panicked: {msg}"));
                }
                Ok(Err(e)) => {
                    refused += 1;
                    if e.trim().is_empty() {
                        faults.push(format!("{case}: refused without a reason"));
                    }
                }
                Ok(Ok((report, held))) => {
                    if !report.problems.is_empty() {
                        reported += 1;
                    }
                    // what is served is what was written
                    for (d, chunks) in &held.docs {
                        if expected.docs.get(d) != Some(chunks) {
                            faults.push(format!("{case}: {d} served altered or resurrected"));
                        }
                    }
                    let lost: Vec<&String> = expected
                        .docs
                        .keys()
                        .filter(|d| !held.docs.contains_key(*d))
                        .collect();
                    let last_write = |d: &&String| tail[tail.len() - 1].contains(*d);
                    let in_tail = |d: &&String| tail.iter().any(|w| w.contains(*d));
                    let one_write =
                        |l: &[&String]| tail.iter().any(|w| l.iter().all(|d| w.contains(*d)));
                    let flip = how.starts_with("byte");
                    let explained = if report.needs_catch_up {
                        // a byte flipped in the log loses the record it is in, not the others
                        name != "wal.log" || !flip || one_write(&lost)
                    } else if name == "wal.log" && flip {
                        // a flip in the last record reads as a write torn by a crash (never
                        // acknowledged): indistinguishable
                        lost.iter().all(last_write)
                    } else if name == "wal.log" {
                        // a log cut short or emptied reads as one whose later writes never came
                        lost.iter().all(in_tail)
                    } else {
                        lost.is_empty()
                    };
                    if !explained {
                        faults.push(format!(
                            "{case}: {} documents lost ({:?}...; catch up asked: {}; problems: {:?})",
                            lost.len(),
                            &lost[..lost.len().min(4)],
                            report.needs_catch_up,
                            report.problems
                        ));
                    }
                }
            }
        }
    }
    eprintln!(
        "{cases} damaged folders over {} files: {refused} refused, {reported} opened with problems reported",
        files.len()
    );
    assert!(
        faults.is_empty(),
        "{} of {cases} cases:\n{}",
        faults.len(),
        faults.join("\n")
    );
}

#[test]
fn files_that_cannot_be_loaded_are_moved_aside_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    write_shard(dir.path());
    let originals: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.file_name().unwrap() != "LOCK")
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name, std::fs::read(&p).unwrap())
        })
        .filter(|(n, _)| n != "wal.log")
        .collect();
    // the manifest damaged: the shard starts empty and asks to catch up
    let manifest = dir.path().join("manifest3.bin");
    let mut b = std::fs::read(&manifest).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0x10;
    std::fs::write(&manifest, &b).unwrap();
    let aside = dir.path().join("damaged-1");
    {
        let (mut ix, report) = ShardIndex::open(dir.path(), settings()).unwrap();
        assert!(report.needs_catch_up);
        assert!(
            report.problems.iter().any(|p| p.contains("damaged-1")),
            "{:?}",
            report.problems
        );
        // what it writes next (segments numbered from 0 again, a manifest) overwrites nothing
        let mut r = rand::rngs::StdRng::seed_from_u64(2);
        for batch in (1000..1300u64).collect::<Vec<_>>().chunks(30) {
            let ops = batch.iter().map(|&i| doc(i, 0, &mut r)).collect();
            ix.write(ops, &model()).unwrap();
            ix.maintain().unwrap();
        }
        assert!(ix.segment_stats().0 >= 1);
    }
    let (ix, report) = ShardIndex::open(dir.path(), settings()).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(ix.doc_count() >= 300, "{}", ix.doc_count());
    for (name, bytes) in &originals {
        let found = std::fs::read(aside.join(name)).unwrap_or_default();
        let expected = if name == "manifest3.bin" { &b } else { bytes };
        assert!(&found == expected, "{name} not kept as it was");
    }
    drop(ix);
    // a sealed segment's data file damaged: that segment's files go aside, the others load
    let seg = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("seg-") && n.ends_with(".bin"))
        .max()
        .unwrap();
    let mut b = std::fs::read(dir.path().join(&seg)).unwrap();
    let at = b.len() / 3;
    b[at] ^= 0x01;
    std::fs::write(dir.path().join(&seg), &b).unwrap();
    let (ix, report) = ShardIndex::open(dir.path(), settings()).unwrap();
    assert!(report.needs_catch_up);
    assert_eq!(
        std::fs::read(dir.path().join("damaged-2").join(&seg)).unwrap(),
        b
    );
    assert!(!dir.path().join(&seg).exists());
    assert!(ix.doc_count() > 0);
}

#[test]
fn segment_files_beside_no_manifest_are_moved_aside_not_removed() {
    let dir = tempfile::tempdir().unwrap();
    let tail = write_shard(dir.path());
    let segs: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    assert!(!segs.is_empty());
    std::fs::remove_file(dir.path().join("manifest3.bin")).unwrap();
    let (ix, report) = ShardIndex::open(dir.path(), settings()).unwrap();
    assert!(report.needs_catch_up);
    assert!(
        report.problems.iter().any(|p| p.contains("no manifest")),
        "{:?}",
        report.problems
    );
    for (name, bytes) in &segs {
        assert_eq!(
            &std::fs::read(dir.path().join("damaged-1").join(name)).unwrap(),
            bytes,
            "{name}"
        );
    }
    // the log's writes are still there
    let held = ix.doc_ids();
    assert!(tail.iter().flatten().all(|d| held.contains(d)), "{held:?}");
}

/// Writes and queries a peer could send that no client of ours would (the cluster transport
/// carries them as they come): each is answered or refused, none panics, and the shard still
/// seals, reopens and serves what it accepted.
#[test]
fn hostile_writes_and_queries_are_answered_or_refused_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(9);
    let chunk =
        |doc: &str, id: &str, text: String, vector: Vec<f32>, s: SentenceVectors| ChunkRecord {
            doc_id: doc.into(),
            chunk_id: id.into(),
            text,
            vector,
            sentences: s,
        };
    let upsert = |doc: &str, chunks: Vec<ChunkRecord>| WriteOp::Upsert {
        version: 0,
        doc_id: doc.into(),
        chunks,
    };
    let good = vector(&mut r);
    let odd_sentences = [
        SentenceVectors {
            scales: vec![],
            codes: vec![1, 2, 3],
        },
        SentenceVectors {
            scales: vec![1.0],
            codes: vec![1; DIM + 1],
        },
        SentenceVectors {
            scales: vec![f32::NAN, f32::INFINITY],
            codes: vec![5; 2 * DIM],
        },
        SentenceVectors {
            scales: vec![1.0; 3],
            codes: vec![],
        },
    ];
    let mut ops = vec![
        upsert(
            "",
            vec![chunk(
                "",
                "#0",
                "t".into(),
                good.clone(),
                Default::default(),
            )],
        ),
        upsert("empty", vec![]),
        upsert(
            "no-id",
            vec![chunk(
                "no-id",
                "",
                "t".into(),
                good.clone(),
                Default::default(),
            )],
        ),
        upsert(
            "twice",
            vec![
                chunk(
                    "twice",
                    "twice#0",
                    "one".into(),
                    good.clone(),
                    Default::default(),
                ),
                chunk(
                    "twice",
                    "twice#0",
                    "two".into(),
                    vector(&mut r),
                    Default::default(),
                ),
            ],
        ),
        upsert(
            "nan",
            vec![chunk(
                "nan",
                "nan#0",
                "t".into(),
                vec![f32::NAN; DIM],
                Default::default(),
            )],
        ),
        upsert(
            "big",
            vec![chunk(
                "big",
                "big#0",
                "x".repeat(1 << 20),
                good.clone(),
                Default::default(),
            )],
        ),
        upsert(
            "nul",
            vec![chunk(
                "nul",
                "nul#0",
                "a\0b \u{fffd} \u{1F600} zz".into(),
                good.clone(),
                Default::default(),
            )],
        ),
        upsert(
            &"d".repeat(70_000),
            vec![chunk(
                &"d".repeat(70_000),
                "long#0",
                "t".into(),
                good.clone(),
                Default::default(),
            )],
        ),
        WriteOp::Delete {
            doc_id: "never-written".into(),
            version: u64::MAX,
        },
    ];
    for (i, s) in odd_sentences.iter().enumerate() {
        let doc = format!("s{i}");
        ops.push(upsert(
            &doc,
            vec![chunk(
                &doc,
                &format!("{doc}#0"),
                "sentence text".into(),
                vector(&mut r),
                s.clone(),
            )],
        ));
    }
    let mut accepted = 0;
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), settings()).unwrap();
        for op in ops.iter().cloned() {
            let name = op.doc_id().chars().take(12).collect::<String>();
            let r = ix.write(vec![op], &model());
            let should = ["empty", "big", "nul", "never-writte"].contains(&name.as_str());
            assert_eq!(r.is_ok(), should, "{name}: {r:?}");
            accepted += usize::from(r.is_ok());
        }
        // fill past a seal so the accepted ones are written to a data file
        let fill = (0..60u64).map(|i| doc(i, 0, &mut r)).collect();
        ix.write(fill, &model()).unwrap();
        ix.seal().unwrap();
    }
    let (ix, report) = ShardIndex::open(dir.path(), settings()).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(accepted, 4);
    assert!(ix.doc_ids().contains(&"nul".to_string()));
    let texts = [
        "",
        " ",
        "\0",
        &"word ".repeat(20_000),
        "zz \u{1F600}",
        "the a of",
    ];
    let vectors = [
        vec![],
        vec![f32::NAN; DIM],
        vec![0.0; DIM],
        vec![1.0; DIM + 3],
        good.clone(),
    ];
    for mode in [SearchMode::Dense, SearchMode::Bm25, SearchMode::Hybrid] {
        for k in [0, 1, 10, u32::MAX] {
            for t in texts {
                for v in &vectors {
                    let q = SearchQuery {
                        vector: v.clone(),
                        text: t.to_string(),
                        k,
                        mode,
                        model: Some(model()),
                    };
                    if let Ok(hits) = ix.search(&q) {
                        assert!(hits.len() <= 1000);
                        assert!(hits.iter().all(|h| h.score.is_finite()), "{hits:?}");
                    }
                }
            }
        }
    }
    let _ = ix.dump();
}

#[test]
fn a_damaged_segment_never_brings_an_older_copy_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(3);
    let text = |ix: &ShardIndex, d: &str| -> Option<String> {
        ix.fetch(&[d.to_string()])
            .into_iter()
            .find_map(|op| match op {
                WriteOp::Upsert { chunks, .. } => Some(chunks[0].text.clone()),
                WriteOp::Delete { .. } => None,
            })
    };
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), settings()).unwrap();
        ix.write((0..60u64).map(|i| doc(i, 0, &mut r)).collect(), &model())
            .unwrap();
        ix.seal().unwrap();
        // d2 and d4 replaced: their newer copies in a segment of their own
        ix.write(vec![doc(2, 1, &mut r), doc(4, 1, &mut r)], &model())
            .unwrap();
        ix.seal().unwrap();
        assert_eq!(ix.segment_stats().0, 2);
        assert!(text(&ix, "d2").unwrap().ends_with("r1"));
    }
    let newest = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("seg-") && n.ends_with(".bin"))
        .max_by_key(|n| n[4..n.len() - 4].parse::<u64>().unwrap())
        .unwrap();
    let path = dir.path().join(&newest);
    let mut b = std::fs::read(&path).unwrap();
    // a byte of the vectors: the checksum fails, the id table still reads
    b[200] ^= 0x40;
    std::fs::write(&path, &b).unwrap();
    {
        let (mut ix, report) = ShardIndex::open(dir.path(), settings()).unwrap();
        assert!(report.needs_catch_up, "{report:?}");
        // not served at their older copies: absent until a peer or a write brings them
        assert_eq!(text(&ix, "d2"), None);
        assert_eq!(text(&ix, "d4"), None);
        assert!(!ix.doc_ids().contains(&"d2".to_string()));
        assert!(text(&ix, "d3").unwrap().ends_with("r0"));
        assert_eq!(ix.doc_count(), 58);
        // a seal writes a manifest without the damaged segment: the knowledge stays
        ix.write(vec![doc(70, 0, &mut r)], &model()).unwrap();
        ix.seal().unwrap();
    }
    {
        let (mut ix, report) = ShardIndex::open(dir.path(), settings()).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(text(&ix, "d2"), None);
        // a newer write of d2 is served, and stays served after a reopen
        ix.write(vec![doc(2, 2, &mut r)], &model()).unwrap();
        assert!(text(&ix, "d2").unwrap().ends_with("r2"));
        ix.seal().unwrap();
    }
    let (ix, _) = ShardIndex::open(dir.path(), settings()).unwrap();
    assert!(text(&ix, "d2").unwrap().ends_with("r2"));
    assert_eq!(text(&ix, "d4"), None);
    assert_eq!(ix.doc_count(), 60);
}

/// A crash in a folder's very first seal, after its files and before its manifest, while the
/// log still holds every write: nothing is damaged. The open reports no problem and asks for
/// no catch-up, the uncommitted files are removed (not moved aside), every write is served from
/// the log, and the next seal and open keep them.
#[test]
fn a_crash_in_the_first_seal_is_no_damage() {
    let (crashed, sealed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut r = rand::rngs::StdRng::seed_from_u64(3);
    let (mut ix, _) = ShardIndex::open(sealed.path(), settings()).unwrap();
    for batch in (0..24u64).collect::<Vec<_>>().chunks(8) {
        let ops = batch.iter().map(|&i| doc(i, 0, &mut r)).collect();
        ix.write(ops, &model()).unwrap();
    }
    ix.write(
        vec![WriteOp::Delete {
            doc_id: "d7".into(),
            version: 0,
        }],
        &model(),
    )
    .unwrap();
    assert!(ix.growing_chunks() > 0, "nothing sealed yet");
    assert!(!sealed.path().join("manifest3.bin").exists());
    let expected = read_all(&ix);
    // the log as it stood when the seal began
    std::fs::copy(
        sealed.path().join("wal.log"),
        crashed.path().join("wal.log"),
    )
    .unwrap();
    ix.seal().unwrap();
    drop(ix);
    // the seal's files without its manifest: where a crash before the manifest's rename leaves
    // the folder
    let mut copied = Vec::new();
    for e in std::fs::read_dir(sealed.path()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        if name.starts_with("seg-") || name.starts_with("deletions-") {
            std::fs::copy(sealed.path().join(&name), crashed.path().join(&name)).unwrap();
            copied.push(name);
        }
    }
    assert!(copied.iter().any(|n| n.ends_with(".bin")), "{copied:?}");

    let (ix, report) = ShardIndex::open(crashed.path(), settings()).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(!report.needs_catch_up);
    assert_eq!(read_all(&ix), expected);
    let left: Vec<String> = std::fs::read_dir(crashed.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| {
            ["seg-", "deletions-", "damaged"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
    drop(ix);

    let (mut ix, _) = ShardIndex::open(crashed.path(), settings()).unwrap();
    ix.seal().unwrap();
    drop(ix);
    let (ix, report) = ShardIndex::open(crashed.path(), settings()).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.segments, 1);
    assert_eq!(read_all(&ix), expected);
}
