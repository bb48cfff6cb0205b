//! A shard whose data files are larger than the memory its process may take for itself still
//! opens and serves: sealed segments are mapped (page cache the kernel can drop and read again),
//! not loaded. The shard is opened in a child process whose private memory (`RLIMIT_DATA`:
//! heap and private writable mappings; file mappings do not count) is capped below the size of
//! the shard's data files. The chunks are like the shipped configuration's: 384-d vectors,
//! about a kilobyte of text in eight sentences, each sentence's vector stored (int8).
use std::process::Command;

use ragfleet_index::eval::clustered;
use ragfleet_index::hnsw::GraphMemory;
use ragfleet_index::{IndexSettings, ShardIndex};
use ragfleet_proto::{
    ChunkRecord, ModelIdentity, SearchMode, SearchQuery, SentenceVectors, WriteOp,
};

const DIM: usize = 384;
const N: usize = 10_000;
const SENTENCES: usize = 8;
const CHILD_DIR: &str = "RAGFLEET_MEMORY_CHILD_DIR";
const CHILD_BUDGET: &str = "RAGFLEET_MEMORY_CHILD_BUDGET";
const CHILD_PROBES: &str = "RAGFLEET_MEMORY_CHILD_PROBES";
const CHILD_DATA: &str = "RAGFLEET_MEMORY_CHILD_DATA";

fn model() -> ModelIdentity {
    ModelIdentity {
        name: "test-model".into(),
        weights_sha256: "00".repeat(32),
        dim: DIM as u32,
        max_len: 512,
        pooling: "mean".into(),
        normalized: true,
    }
}

/// No room for graphs in memory (`index.graph_memory_mb = 0`, or a node whose budget other
/// shards took): every graph is walked from its mapped file.
static NO_GRAPH_MEMORY: GraphMemory = GraphMemory::new(0);

fn settings() -> IndexSettings {
    IndexSettings {
        segment_size: 4096,
        ef_construction: 64,
        ef_search: 64,
        background: false,
        build_threads: 2,
        graph_memory: Some(&NO_GRAPH_MEMORY),
        ..IndexSettings::default()
    }
}

/// Chunk `i`'s text: eight sentences of common words, the first with a word of its own.
fn text(i: usize) -> String {
    (0..SENTENCES)
        .map(|s| {
            let words: Vec<String> = (0..18)
                .map(|j| format!("w{}", (i * 7 + s * 31 + j * 13) % 400))
                .collect();
            let own = if s == 0 {
                format!("uniq{i} ")
            } else {
                String::new()
            };
            format!("{own}{}.", words.join(" "))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Chunk `i`'s write: its vector, text and sentence vectors (the chunk's vector turned).
fn upsert(i: usize, v: Vec<f32>) -> WriteOp {
    let sentences: Vec<Vec<f32>> = (0..SENTENCES)
        .map(|s| {
            let mut t = v.clone();
            t.rotate_left(s);
            t
        })
        .collect();
    let id = format!("d{i}");
    WriteOp::Upsert {
        version: 0,
        doc_id: id.clone(),
        chunks: vec![ChunkRecord {
            doc_id: id.clone(),
            chunk_id: format!("{id}#0"),
            text: text(i),
            vector: v,
            sentences: SentenceVectors::quantize(&sentences),
        }],
    }
}

fn vectors() -> Vec<Vec<f32>> {
    clustered(N, DIM, 40, 0.05, 3, 11)
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The child: caps its private memory at what it holds now plus the budget, checks that the cap
/// holds (the data files' size cannot be allocated), then opens the shard and searches it.
#[test]
fn memory_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let budget: u64 = std::env::var(CHILD_BUDGET).unwrap().parse().unwrap();
    let data_bytes: u64 = std::env::var(CHILD_DATA).unwrap().parse().unwrap();
    // the probes come from the parent: generating every vector here would leave the freed
    // memory to the allocator, for the index to use under the cap
    let probes: Vec<(usize, Vec<f32>)> =
        serde_json::from_slice(&std::fs::read(std::env::var(CHILD_PROBES).unwrap()).unwrap())
            .unwrap();
    let cap = status_kb("VmData:") * 1024 + budget;
    let lim = libc::rlimit {
        rlim_cur: cap,
        rlim_max: cap,
    };
    // SAFETY: setrlimit reads the struct passed by reference and lowers this process's limit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_DATA, &lim) }, 0);
    let mut v: Vec<u8> = Vec::new();
    assert!(
        v.try_reserve_exact(data_bytes as usize).is_err(),
        "the cap does not hold: {data_bytes} bytes could be allocated"
    );
    let before = status_kb("VmData:");
    let (ix, report) = ShardIndex::open(std::path::Path::new(&dir), settings()).unwrap();
    let (graphs, bm25) = ix.memory_bytes();
    println!(
        "child: open took {} MiB of private memory (graphs {} KiB, BM25 {} KiB)",
        (status_kb("VmData:") - before) / 1024,
        graphs >> 10,
        bm25 >> 10
    );
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(ix.chunk_count(), N as u64);
    let mut found = 0;
    for (i, v) in &probes {
        let i = *i;
        let q = SearchQuery {
            vector: v.clone(),
            text: format!("uniq{i}"),
            k: 10,
            mode: SearchMode::Dense,
            model: Some(model()),
        };
        let dense = ix.search(&q).unwrap();
        let bm25 = ix
            .search(&SearchQuery {
                mode: SearchMode::Bm25,
                ..q
            })
            .unwrap();
        let id = format!("d{i}");
        if dense.first().is_some_and(|h| h.doc_id == id) && bm25[0].doc_id == id {
            assert_eq!(bm25[0].text, text(i));
            // the best stored sentence is the chunk's own vector, unturned
            let best = dense[0].sentence_score.expect("sentence vectors stored");
            assert!(best > 0.99, "{best}");
            found += 1;
        }
    }
    println!(
        "child: {found}/{} found; VmData {} MiB under a cap of {} MiB; data files {} MiB",
        probes.len(),
        status_kb("VmData:") / 1024,
        cap >> 20,
        data_bytes >> 20
    );
    assert!(found * 10 >= probes.len() * 9, "{found}/{}", probes.len());
}

#[test]
fn a_shard_whose_files_exceed_its_memory_limit_opens_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let probe_dir = tempfile::tempdir().unwrap();
    let probe_file = probe_dir.path().join("probes.json");
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), settings()).unwrap();
        let vs = vectors();
        let probes: Vec<(usize, Vec<f32>)> =
            (0..N).step_by(N / 60).map(|i| (i, vs[i].clone())).collect();
        std::fs::write(&probe_file, serde_json::to_vec(&probes).unwrap()).unwrap();
        let ops: Vec<WriteOp> = vs
            .into_iter()
            .enumerate()
            .map(|(i, v)| upsert(i, v))
            .collect();
        for batch in ops.chunks(1000) {
            ix.write(batch.to_vec(), &model()).unwrap();
        }
        ix.seal().unwrap();
        assert_eq!(ix.segment_stats().0, ix.segment_stats().1);
        // graphs written by seals and merges are read back mapped: a few bytes a node stay
        let (graphs, _) = ix.memory_bytes();
        assert!(graphs < N * 32, "graphs hold {graphs} bytes in memory");
    }
    let data: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".bin"))
        .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    // the child may take, on top of what it holds at the start, half the data files'
    // size (what stays in memory is the graph, BM25 and the chunks' ids)
    let budget = data / 2;
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "memory_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_DIR, dir.path())
        .env(CHILD_BUDGET, budget.to_string())
        .env(CHILD_DATA, data.to_string())
        .env(CHILD_PROBES, &probe_file)
        // out of memory, a backtrace would need memory too: the child just aborts
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert!(out.status.success(), "the child failed: {:?}", out.status);
    assert!(
        stdout.contains("child: "),
        "the child did not run: {stdout}"
    );
}

#[test]
fn a_shard_copies_its_graphs_into_memory_within_the_budget_and_answers_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let vs: Vec<Vec<f32>> = vectors().into_iter().take(4296).collect();
    {
        let (mut ix, _) = ShardIndex::open(dir.path(), settings()).unwrap();
        let ops: Vec<WriteOp> = vs
            .iter()
            .enumerate()
            .map(|(i, v)| upsert(i, v.clone()))
            .collect();
        for batch in ops.chunks(4096) {
            ix.write(batch.to_vec(), &model()).unwrap();
            ix.seal().unwrap();
        }
        assert_eq!(
            ix.segment_stats().0,
            2,
            "two graphs: 4,096 and 200 chunks: {:?}",
            ix.segment_stats()
        );
    }
    let query = |i: usize| SearchQuery {
        vector: vs[i].clone(),
        text: String::new(),
        k: 10,
        mode: SearchMode::Dense,
        model: Some(model()),
    };
    let (mapped, _) = ShardIndex::open(dir.path(), settings()).unwrap();
    let (mapped_bytes, _) = mapped.memory_bytes();
    let answers: Vec<Vec<String>> = (0..4296)
        .step_by(97)
        .map(|i| {
            let hits = mapped.search(&query(i)).unwrap();
            hits.into_iter().map(|h| h.doc_id).collect()
        })
        .collect();
    drop(mapped);
    // codes (384 bytes) and level-0 rows (33 words) of every node
    let arrays = 4296 * (DIM + 33 * 4);
    // room for the larger graph only: it moves, the smaller one stays in its file
    let open = |budget: &'static GraphMemory| {
        let settings = IndexSettings {
            graph_memory: Some(budget),
            ..settings()
        };
        ShardIndex::open(dir.path(), settings).unwrap().0
    };
    static SOME: GraphMemory = GraphMemory::new(4096 * (DIM + 33 * 4) + 1000);
    let ix = open(&SOME);
    assert_eq!(SOME.used(), 4096 * (DIM + 33 * 4));
    drop(ix);
    assert_eq!(SOME.used(), 0, "given back when the shard closes");
    static ALL: GraphMemory = GraphMemory::new(1 << 30);
    let ix = open(&ALL);
    assert_eq!(ALL.used(), arrays);
    let (in_memory, _) = ix.memory_bytes();
    assert_eq!(in_memory, mapped_bytes + arrays);
    for (n, i) in (0..4296).step_by(97).enumerate() {
        let hits: Vec<String> = ix
            .search(&query(i))
            .unwrap()
            .into_iter()
            .map(|h| h.doc_id)
            .collect();
        assert_eq!(hits, answers[n], "query {i}");
        assert_eq!(hits[0], format!("d{i}"));
    }
}
