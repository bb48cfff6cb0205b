//! The index's own heap memory per chunk, counted by the allocator: `cargo run --release -p
//! ragfleet-index --example chunk_memory -- N [CHUNKS_PER_DOC]` writes N chunks (8-d vectors,
//! ids like `document-00000001#0`) into a shard, seals them into one segment with its graph,
//! and prints the bytes the process's heap holds per chunk beyond what it held before (the
//! graph's share apart); then again after half the documents are deleted (their deletion
//! records held), and once that is sealed and their copies compacted away.
use ragfleet_index::eval::synthetic_model;
use ragfleet_index::hnsw::GraphMemory;
use ragfleet_index::{IndexSettings, ShardIndex};
use ragfleet_proto::{ChunkRecord, WriteOp};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

struct Counting;
static HELD: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, counting the bytes it hands out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HELD.fetch_add(l.size(), Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HELD.fetch_sub(l.size(), Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        HELD.fetch_add(new, Relaxed);
        HELD.fetch_sub(l.size(), Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static A: Counting = Counting;

static NO_GRAPH_MEMORY: GraphMemory = GraphMemory::new(0);

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(1_000_000, |s| s.parse().unwrap());
    let per_doc: usize = args.next().map_or(1, |s| s.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model(8);
    let settings = IndexSettings {
        segment_size: 1 << 30,
        background: false,
        // graphs stay on the heap or in their files: a copy in huge-page memory is not the
        // allocator's, and counting it as the graphs' share would hide as much of the rest
        graph_memory: Some(&NO_GRAPH_MEMORY),
        ..Default::default()
    };
    let (mut ix, _) = ShardIndex::open(dir.path(), settings).unwrap();
    let before = HELD.load(Relaxed);
    let docs = n / per_doc;
    for b in (0..docs).step_by(10_000) {
        let ops = (b..(b + 10_000).min(docs))
            .map(|i| WriteOp::Upsert {
                version: 0,
                doc_id: format!("document-{i:08}"),
                chunks: (0..per_doc)
                    .map(|c| ChunkRecord {
                        doc_id: format!("document-{i:08}"),
                        chunk_id: format!("document-{i:08}#{c}"),
                        text: format!("text {i} {c}"),
                        vector: (0..8)
                            .map(|d| ((i * 7 + c * 3 + d) % 13) as f32 - 6.0)
                            .collect(),
                        sentences: Default::default(),
                    })
                    .collect(),
            })
            .collect();
        ix.write(ops, &model).unwrap();
    }
    ix.seal().unwrap();
    let report = |ix: &ShardIndex, what: &str| {
        let held = HELD.load(Relaxed) - before;
        let (graphs, bm25) = ix.memory_bytes();
        let chunks = ix.chunk_count().max(1) as f64;
        println!(
            "{what}: {} live chunks, {} stored; heap {:.1} MB: {:.0} bytes a live chunk beside the graphs ({:.0}) and BM25 ({:.0})",
            ix.chunk_count(),
            ix.stored_chunks(),
            held as f64 / 1e6,
            (held - graphs - bm25) as f64 / chunks,
            graphs as f64 / chunks,
            bm25 as f64 / chunks,
        );
    };
    report(&ix, "sealed");
    let ids: Vec<String> = (0..docs / 2).map(|i| format!("document-{i:08}")).collect();
    ix.delete(&ids, 100).unwrap();
    // the deletion records (each document's tombstone and deletion version) before the
    // compaction drops the dead copies and with them the tombstones
    report(&ix, "half the documents deleted, before the compaction");
    ix.seal().unwrap();
    report(&ix, "half the documents deleted");
}
