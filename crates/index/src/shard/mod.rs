//! One shard replica's index: segments, BM25, write-ahead log, snapshots, recovery.
//!
//! The type and its small accessors are here; each concern has its module: [`recovery`],
//! [`write`], [`growing`] (the growing segment), [`seal`] (seal, purge, graphs), [`merge`]
//! (the tiered background merges), [`search`], [`sync`] (replica sync), [`docmap`] and
//! [`slotmap`] (the live documents by id and chunks by slot, compact), [`records`] (the
//! deletion records).
mod builds;
mod codec;
mod deletions;
mod docmap;
mod growing;
mod merge;
mod records;
mod recovery;
mod room;
mod seal;
mod search;
mod shared;
mod slotmap;
mod sync;
mod write;

pub(crate) use codec::decode_entries;
pub use room::Room;
pub use seal::{PreparedSeal, ToFree};
pub use shared::SharedShard;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ragfleet_proto::{
    ChunkRecord, Hit, ModelIdentity, SearchMode, SearchQuery, ShardVersions, WriteOp,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::bm25::Bm25;
use crate::files::{read_checked, write_checked};
use crate::hnsw::GraphMemory;
use crate::segment::{AnnKind, Entry, Segment};
use crate::vector::normalize;
use crate::wal::Wal;
use crate::{rrf, IndexError};

/// Tunables of a shard index.
#[derive(Debug, Clone)]
pub struct IndexSettings {
    /// Chunks in the growing segment before it is sealed.
    pub segment_size: usize,
    /// Tiered merging: a segment merges with the smaller ones once they together hold
    /// 1/`merge_ratio` of its live chunks (at least 2).
    pub merge_ratio: usize,
    /// Merges that may run at a time (at least 1; default [`DEFAULT_MAX_MERGES`]). Beside a
    /// running merge the policy starts smaller ones over the segments it does not hold, each
    /// of at most a quarter of the smallest running one's chunks, so that an ingest streaming
    /// into a large shard does not pile up segments while its largest merge runs; 1 leaves the
    /// cores of a bulk load to its graph builds (measured: a 1M bulk load ~8% faster, its
    /// allocator ~10% smaller).
    pub max_merges: usize,
    /// The HNSW implementation of sealed segments.
    pub ann: AnnKind,
    /// HNSW degree M (own implementation).
    pub hnsw_m: usize,
    /// Threads a graph build may use (0: all cores).
    pub build_threads: usize,
    /// HNSW construction beam.
    pub ef_construction: usize,
    /// HNSW search beam.
    pub ef_search: usize,
    /// Build graphs on background threads (false: build inline, for tests and benches).
    pub background: bool,
    /// How long a deletion record (document id + version) is kept; older ones are dropped at
    /// the next seal (None: kept for ever). Write versions are microseconds on the
    /// coordinators' clocks, so a record's age is read off its version.
    pub deletion_grace: Option<std::time::Duration>,
    /// Seal the growing segment once no write has come for this long and it holds at least
    /// [`IDLE_SEAL_MIN_CHUNKS`] chunks (None: only when it is full). A shard that stops taking
    /// writes then answers from graphs alone, merged by the policy, instead of scanning up to
    /// `segment_size` chunks exactly in every query, and its log is emptied.
    pub seal_idle: Option<std::time::Duration>,
    /// The budget of graph bytes held in memory backed by huge pages rather than read from
    /// their mapped files (None: the process's, [`GraphMemory::global`]).
    pub graph_memory: Option<&'static GraphMemory>,
}

/// Merges at a time unless set (see [`IndexSettings::max_merges`]). Extending a shard's largest
/// segment copies it (a million chunks' graph and the others' vectors inserted take tens of
/// seconds at background priority); with one merge at a time, the seals of an ingest streaming
/// meanwhile stayed segments of their own, each a graph every search walks (89 beside a million
/// chunks after 100 s at 2,500 chunks a second). Merges beside it fold them meanwhile, each
/// smaller than the one before, so four cover a shard of (segment_size x 4^3 x merge_ratio)
/// chunks.
pub const DEFAULT_MAX_MERGES: usize = 4;

/// The fewest chunks an idle growing segment is sealed with: below it the exact scan costs
/// less than a graph's walk, and a trickle of writes would leave a segment a write.
pub const IDLE_SEAL_MIN_CHUNKS: usize = 256;

impl IndexSettings {
    /// The budget of graph bytes held in memory.
    pub fn graph_memory(&self) -> &'static GraphMemory {
        self.graph_memory.unwrap_or_else(GraphMemory::global)
    }

    /// Threads a graph build uses.
    pub fn build_threads(&self) -> usize {
        match self.build_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for IndexSettings {
    fn default() -> Self {
        IndexSettings {
            segment_size: 4096,
            merge_ratio: 16,
            max_merges: DEFAULT_MAX_MERGES,
            ann: AnnKind::Hnsw,
            hnsw_m: 16,
            build_threads: 0,
            ef_construction: 100,
            ef_search: 64,
            background: true,
            deletion_grace: None,
            seal_idle: None,
            graph_memory: None,
        }
    }
}

/// What a replica must pull from a peer (see [`ShardIndex::plan_pull`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PullPlan {
    /// Documents the peer holds at a newer version: fetch their copies.
    pub fetch: Vec<String>,
    /// The peer's deletions newer than what is held here.
    pub deletes: Vec<WriteOp>,
}

impl PullPlan {
    /// Whether there is nothing to pull.
    pub fn is_empty(&self) -> bool {
        self.fetch.is_empty() && self.deletes.is_empty()
    }
}

/// What opening an index found on disk.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Sealed segments loaded.
    pub segments: usize,
    /// Log records replayed.
    pub replayed: usize,
    /// Problems found (corrupt or torn files); the data they held is not loaded.
    pub problems: Vec<String>,
    /// Sealed segments whose BM25 postings were read from their files (the others' were
    /// rebuilt from their text and written again).
    pub bm25_snapshots: usize,
    /// Whether data may be missing and the replica should catch up from a peer.
    pub needs_catch_up: bool,
}

/// A sealed segment as the manifest lists it: its graph id and its data files, in order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct SegmentMeta {
    id: u64,
    parts: Vec<u64>,
}

impl SegmentMeta {
    /// How a manifest lists `seg`.
    fn of(seg: &Segment) -> SegmentMeta {
        SegmentMeta {
            id: seg.id,
            parts: seg.parts.iter().map(|(p, _)| *p).collect(),
        }
    }
}

/// The manifest of the first format (`manifest.bin`): one data file per segment. Read when no
/// newer manifest exists; the next write replaces it.
#[derive(Debug, Serialize, Deserialize, Default)]
struct ManifestV1 {
    last_seq: u64,
    segments: Vec<u64>,
    tombstones: HashMap<String, u64>,
    deleted: HashMap<String, u64>,
    model: Option<ModelIdentity>,
    next_segment_id: u64,
}

impl From<ManifestV1> for ManifestV2 {
    fn from(m: ManifestV1) -> Self {
        ManifestV2 {
            last_seq: m.last_seq,
            segments: m
                .segments
                .into_iter()
                .map(|id| SegmentMeta {
                    id,
                    parts: vec![id],
                })
                .collect(),
            tombstones: m.tombstones,
            deleted: m.deleted,
            model: m.model,
            next_segment_id: m.next_segment_id,
        }
    }
}

/// The manifest of the second format (`manifest2.bin`): the deletion records inside. Read when
/// no newer manifest exists; the next write replaces it.
#[derive(Debug, Serialize, Deserialize, Default)]
struct ManifestV2 {
    last_seq: u64,
    segments: Vec<SegmentMeta>,
    tombstones: HashMap<String, u64>,
    deleted: HashMap<String, u64>,
    model: Option<ModelIdentity>,
    next_segment_id: u64,
}

/// The manifest (`manifest3.bin`): what the sealed state is; writing it is the atomic switch of
/// seals and merges. The deletion records are in their own files (a base `deletions-<n>.bin`
/// and deltas `deletions-<n>.delta`, see [`deletions`]), written before the manifest that
/// names the last of them and only with what changed, so that a seal or a merge does not
/// rewrite (and fsync) every deletion record of the shard.
#[derive(Debug, Serialize, Deserialize, Default)]
struct Manifest {
    /// Every op with seq <= this is in the segments.
    last_seq: u64,
    segments: Vec<SegmentMeta>,
    /// The last of the deletion records' files (`deletions-<n>.bin` or `.delta`; 0: none).
    deletions: u64,
    model: Option<ModelIdentity>,
    next_segment_id: u64,
}

/// A shard's deletion records (a base file `deletions-<n>.bin`: the documents' tombstones, then
/// their deletion versions; see [`records`]).
type Deletions = records::Records;

#[derive(Debug, Serialize, Deserialize)]
struct WalRecord {
    first_seq: u64,
    model: ModelIdentity,
    ops: Vec<WriteOp>,
}

#[derive(Debug, Default, Clone)]
struct DocState {
    seq: u64,
    version: u64,
    slots: Slots,
    /// The id's fine digest bucket ([`ragfleet_proto::doc_bucket`] of
    /// [`ragfleet_proto::MAX_DIGEST_BUCKETS`]), kept so that a page of versions by bucket
    /// reads no id's bytes to place it.
    fine: u16,
    /// The id's hash in the [`docmap::DocMap`] (set by it), so that its table grows without
    /// hashing ids.
    hash: u32,
}

/// A live document's chunks' slots: the run of consecutive slots its write gave them (an
/// upsert's chunks are given slots one after the other), or a list when they are not
/// consecutive. A run costs no allocation: most documents are one.
#[derive(Debug, Clone)]
enum Slots {
    Run { first: u32, count: u32 },
    List(Box<[u32]>),
}

impl Default for Slots {
    fn default() -> Self {
        Slots::Run { first: 0, count: 0 }
    }
}

impl Slots {
    fn push(&mut self, slot: u32) {
        match self {
            Slots::Run { first, count } if *count == 0 => (*first, *count) = (slot, 1),
            Slots::Run { first, count } if first.wrapping_add(*count) == slot => *count += 1,
            _ => {
                let mut list: Vec<u32> = self.iter().collect();
                list.push(slot);
                *self = Slots::List(list.into_boxed_slice());
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let (first, count, list): (u32, u32, &[u32]) = match self {
            Slots::Run { first, count } => (*first, *count, &[]),
            Slots::List(list) => (0, 0, list),
        };
        (0..count)
            .map(move |i| first.wrapping_add(i))
            .chain(list.iter().copied())
    }
}

/// How a shard's merges were committed since it was opened ([`ShardIndex::merge_commits`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeCommits {
    /// Prepared beside the searches ([`ShardIndex::prepare_merge_commit`]): their files
    /// renamed ahead, and their manifest too unless the index changed since, so the commit
    /// held the index for little more than the switch.
    pub prepared: u64,
    /// Committed in all.
    pub all: u64,
    /// Started while another merge ran (a small merge beside a large one).
    pub beside: u64,
}

/// A shard replica's index.
#[derive(Debug)]
pub struct ShardIndex {
    /// Held for the life of the index: one owner of the folder's files at a time.
    _lock: crate::DirLock,
    dir: PathBuf,
    settings: IndexSettings,
    /// The write-ahead log and the writes logged to it but not applied yet: logging takes a
    /// shared borrow of the index (searches go on while the log is written and fsynced),
    /// applying an exclusive one (see [`ShardIndex::log_group`]).
    log: std::sync::Mutex<write::LogState>,
    model: Option<ModelIdentity>,
    last_seq: u64,
    sealed_seq: u64,
    next_segment_id: u64,
    sealed: Vec<Arc<Segment>>,
    growing: growing::Growing,
    docs: docmap::DocMap,
    /// Documents deleted or replaced after a sealed segment took a copy (their tombstones: the
    /// op's sequence number, below which a sealed copy is dead), and the version of the latest
    /// delete of every deleted document (so that an older copy cannot bring it back).
    records: records::Records,
    /// The deletion records' files (a base and deltas) and what changed since they were
    /// written: a manifest write writes only the changes.
    deletions_log: deletions::DeletionLog,
    /// The deletion records written ahead of the next manifest, under a shared borrow (see
    /// [`ShardIndex::prepare_deletions`]), with the changes count they were written at.
    deletions_ahead: std::sync::Mutex<Option<(u64, deletions::Written)>>,
    /// A seal's manifest written (fsynced, not renamed into place) ahead of its commit, under
    /// a shared borrow: its bytes, used by the commit only if they are what it would write
    /// (see [`ShardIndex::prepare_seal_manifest`]).
    manifest_ahead: std::sync::Mutex<Option<Vec<u8>>>,
    /// What the last seal's commit let go of, to free after the lock (see [`seal::ToFree`]).
    to_free: seal::ToFree,
    bm25: Bm25,
    slots: slotmap::SlotMap,
    next_slot: u32,
    /// Deletion records with a version below this were dropped: a copy of a document this
    /// replica does not hold, at a version below this, may be one deleted since, and is refused.
    purged_below: u64,
    /// The merges in progress or waiting for their commits, their sources disjoint: at most
    /// [`IndexSettings::max_merges`], a second only a small one beside a larger (see
    /// [`merge::BESIDE_SHARE`]).
    merges: Vec<merge::MergeJob>,
    /// When the last write was applied (or the index opened): see [`IndexSettings::seal_idle`].
    last_write: std::time::Instant,
    /// Bumped by every change the merge policy looks at; the policy runs when it moved.
    generation: u64,
    /// Graphs finished by the background builders (the policy merges built segments only).
    graphs_done: Arc<std::sync::atomic::AtomicU64>,
    /// Merged-away segments still being freed on a background thread.
    freeing: Arc<std::sync::atomic::AtomicUsize>,
    /// Chunks of the segments merged away since the allocator last gave its free memory back
    /// (see [`ShardIndex::give_back_due`]).
    freed_since_give_back: std::sync::atomic::AtomicUsize,
    /// Compacted segments whose chunks the slots are still being pointed at, a bounded batch
    /// per [`ShardIndex::maintain`] (see [`merge::Rebinding`]).
    rebinding: std::collections::VecDeque<merge::Rebinding>,
    /// A compaction's commit found pruning the tombstones worth it (see
    /// [`ShardIndex::prune_tombstones`]): done by the next maintenance, beside the searches
    /// where the index is shared.
    prune_due: bool,
    /// Merges committed since the open: prepared beside the searches, and in all.
    merge_commits: MergeCommits,
    /// (generation, graphs_done, idle) when the policy last ran.
    planned_at: (u64, u64, bool),
    /// [`ShardIndex::digest`] and the bucket digests, kept up to date by every change of a
    /// document or deletion record (they are sums of per-entry hashes): every search answers
    /// with the digest, so it must not cost a pass over the shard's documents after each write
    /// (~0.2 s at a million).
    digests: sync::Digests,
    /// How many searches more ask the kernel for their hits' ids and texts all at once before
    /// reading them: set when a search's hits waited for reads from disk (see
    /// [`ShardIndex::read_hits`]).
    hits_cold: crate::files::ReadAhead,
}

/// The model identity the shard's unit tests write with (4 dimensions).
#[cfg(test)]
fn test_model() -> ModelIdentity {
    ModelIdentity {
        name: "m".into(),
        weights_sha256: "0".into(),
        dim: 4,
        max_len: 16,
        pooling: "mean".into(),
        normalized: true,
    }
}

/// The manifest file, and the earlier formats'.
const MANIFEST: &str = "manifest3.bin";
/// A seal's manifest written ahead of its commit (see [`ShardIndex::prepare_seal_manifest`]).
const MANIFEST_AHEAD: &str = "manifest3.next";
const MANIFEST_V2: &str = "manifest2.bin";
const MANIFEST_V1: &str = "manifest.bin";

impl ShardIndex {
    /// Ids of the live documents.
    pub fn doc_ids(&self) -> Vec<String> {
        self.docs.keys().map(|d| d.to_string()).collect()
    }

    /// Live documents.
    pub fn doc_count(&self) -> u64 {
        self.docs.len() as u64
    }

    /// Live chunks.
    pub fn chunk_count(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Chunks stored, dead ones included (a compaction drops those).
    pub fn stored_chunks(&self) -> u64 {
        (self.sealed.iter().map(|s| s.entries.len()).sum::<usize>() + self.growing.len()) as u64
    }

    /// Deleted documents whose deletion is kept as a tombstone (an older copy of each may
    /// still be stored; compactions prune the rest).
    pub fn tombstone_count(&self) -> usize {
        self.records.tombstone_count()
    }

    /// Chunks in the growing segment (searched exactly until it is sealed), dead ones included.
    pub fn growing_chunks(&self) -> usize {
        self.growing.len()
    }

    /// Durable log appends (one fsync each) since this index was opened.
    pub fn log_syncs(&self) -> u64 {
        self.log_state().wal.syncs()
    }

    /// Last applied sequence number.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Pinned model.
    pub fn model(&self) -> Option<&ModelIdentity> {
        self.model.as_ref()
    }

    /// Sealed segments and how many have their graph built.
    pub fn segment_stats(&self) -> (usize, usize) {
        (
            self.sealed.len(),
            self.sealed
                .iter()
                .filter(|s| s.graph.get().is_some())
                .count(),
        )
    }

    /// Bytes the index holds in the process's memory, roughly, as (graphs, BM25); chunk bodies
    /// and BM25 postings of sealed segments are in mapped files and not counted.
    pub fn memory_bytes(&self) -> (usize, usize) {
        let graphs = self
            .sealed
            .iter()
            .filter_map(|s| s.graph.get())
            .map(|g| g.memory_bytes())
            .sum();
        let postings: usize = self.sealed.iter().map(|s| s.postings.memory_bytes()).sum();
        (graphs, self.bm25.memory_bytes() + postings)
    }

    /// Changes the HNSW search beam of later searches (ragfleet's graphs; an instant-distance
    /// graph keeps the beam it was built with).
    pub fn set_ef_search(&mut self, ef: usize) {
        self.settings.ef_search = ef.max(1);
    }

    /// Blocks until every sealed segment has its graph (tests, benches, clean shutdown).
    pub fn wait_for_graphs(&self, timeout: std::time::Duration) -> bool {
        let start = std::time::Instant::now();
        loop {
            let (n, built) = self.segment_stats();
            if n == built {
                return true;
            }
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragfleet_proto::ChunkRecord;

    /// Settings that keep every chunk in the growing segment until a seal, merging inline.
    fn one_segment_settings() -> IndexSettings {
        IndexSettings {
            segment_size: 1 << 20,
            background: false,
            ..IndexSettings::default()
        }
    }

    /// Document `d{i}` at `version` with `chunks` chunks (`d{i}#{c}`), each with a word of its own.
    fn upsert(i: usize, version: u64, chunks: usize) -> WriteOp {
        WriteOp::Upsert {
            version,
            doc_id: format!("d{i}"),
            chunks: (0..chunks)
                .map(|c| ChunkRecord {
                    doc_id: format!("d{i}"),
                    chunk_id: format!("d{i}#{c}"),
                    text: format!("word{i}x{c} common"),
                    vector: vec![1.0, i as f32, c as f32, 0.5],
                    sentences: Default::default(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_documents_slots_are_a_run_until_one_does_not_follow() {
        let mut s = Slots::default();
        assert_eq!(s.iter().count(), 0);
        for slot in [u32::MAX - 2, u32::MAX - 1, u32::MAX, 0, 1] {
            s.push(slot);
        }
        // consecutive across the wrap: still a run, no allocation
        assert!(matches!(s, Slots::Run { count: 5, .. }));
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![u32::MAX - 2, u32::MAX - 1, u32::MAX, 0, 1]
        );
        s.push(7);
        s.push(8);
        assert!(matches!(s, Slots::List(_)));
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![u32::MAX - 2, u32::MAX - 1, u32::MAX, 0, 1, 7, 8]
        );
    }

    /// Past 2^32 chunks written the slot numbers wrap: a number a live chunk still holds, and
    /// the chunks' mark for no slot, are passed over, so no chunk takes another's place.
    #[test]
    fn slots_wrapping_past_2_to_the_32_pass_over_those_still_held() {
        let dir = tempfile::tempdir().unwrap();
        let settings = one_segment_settings();
        let upsert = |i: usize, chunks: usize| upsert(i, 1, chunks);
        let (mut ix, _) = ShardIndex::open(dir.path(), settings.clone()).unwrap();
        ix.write((0..10).map(|i| upsert(i, 1)).collect(), &test_model())
            .unwrap();
        ix.next_slot = u32::MAX - 2;
        ix.write((10..20).map(|i| upsert(i, 2)).collect(), &test_model())
            .unwrap();
        let check = |ix: &ShardIndex, docs: &[(usize, usize)]| {
            let mut held = HashSet::new();
            for &(i, chunks) in docs {
                let d = format!("d{i}");
                let got: Vec<String> = ix.docs[&*d]
                    .slots
                    .iter()
                    .inspect(|&s| {
                        assert_ne!(s, crate::segment::NO_SLOT);
                        assert!(held.insert(s), "slot {s} given twice");
                    })
                    .map(|s| ix.slots[&s].chunk_id().to_string())
                    .collect();
                let want: Vec<String> = (0..chunks).map(|c| format!("d{i}#{c}")).collect();
                assert_eq!(got, want);
                // the growing segment's BM25 finds a chunk by its slot
                let top = ix.bm25_ranked(&format!("word{i}x0"), 1);
                assert_eq!(top[0].0.chunk_id(), format!("d{i}#0"));
            }
            assert_eq!(ix.chunk_count() as usize, held.len());
        };
        let mut docs: Vec<(usize, usize)> = (0..10).map(|i| (i, 1)).collect();
        docs.extend((10..20).map(|i| (i, 2)));
        check(&ix, &docs);
        // a slot let go of is given again
        ix.delete(&["d3".into()], 5).unwrap();
        ix.next_slot = 0;
        ix.write(vec![upsert(20, 1)], &test_model()).unwrap();
        assert_eq!(ix.docs["d20"].slots.iter().collect::<Vec<_>>(), [3]);
        docs.retain(|&(i, _)| i != 3);
        docs.push((20, 1));
        check(&ix, &docs);
        ix.seal().unwrap();
        drop(ix);
        let (ix, _) = ShardIndex::open(dir.path(), settings).unwrap();
        assert_eq!(ix.doc_count(), 20);
        assert_eq!(ix.chunk_count(), 30);
    }

    /// A document written with several chunks, rewritten, and reopened from its segment keeps
    /// every chunk; after most documents are deleted a seal gives the maps' room back.
    #[test]
    fn documents_keep_their_chunks_and_a_seal_after_a_mass_delete_shrinks_the_maps() {
        let dir = tempfile::tempdir().unwrap();
        let settings = one_segment_settings();
        let (mut ix, _) = ShardIndex::open(dir.path(), settings.clone()).unwrap();
        let n = 20_000;
        ix.write(
            (0..n).map(|i| upsert(i, 1, 1 + i % 3)).collect(),
            &test_model(),
        )
        .unwrap();
        ix.write(vec![upsert(5, 2, 4)], &test_model()).unwrap();
        ix.seal().unwrap();
        drop(ix);
        let (mut ix, _) = ShardIndex::open(dir.path(), settings).unwrap();
        let chunks_of = |ix: &ShardIndex, d: &str| -> Vec<String> {
            ix.docs[d]
                .slots
                .iter()
                .map(|s| ix.slots[&s].chunk_id().to_string())
                .collect()
        };
        assert_eq!(chunks_of(&ix, "d5"), ["d5#0", "d5#1", "d5#2", "d5#3"]);
        assert_eq!(chunks_of(&ix, "d7"), ["d7#0", "d7#1"]);
        assert!(ix
            .docs
            .values()
            .all(|d| matches!(d.slots, Slots::Run { .. })));
        let (docs_room, slots_room) = (ix.docs.capacity(), ix.slots.capacity());
        let gone: Vec<String> = (100..n).map(|i| format!("d{i}")).collect();
        ix.delete(&gone, 9).unwrap();
        assert_eq!(ix.doc_count(), 100);
        ix.seal().unwrap();
        assert!(
            ix.docs.capacity() * 8 < docs_room && ix.slots.capacity() * 8 < slots_room,
            "room {} of {docs_room}, {} of {slots_room}",
            ix.docs.capacity(),
            ix.slots.capacity()
        );
        assert_eq!(chunks_of(&ix, "d5").len(), 4);
    }
}
