//! One shard replica's index: segments, BM25, write-ahead log, snapshots, recovery.
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
use crate::segment::{exact_search, Entry, Graph, Segment, SegmentTerms};
use crate::vector::normalize;
use crate::wal::Wal;
use crate::{rrf, sort_hits, IndexError};

/// Tunables of a shard index.
#[derive(Debug, Clone)]
pub struct IndexSettings {
    /// Chunks in the growing segment before it is sealed.
    pub segment_size: usize,
    /// Sealed segments with fewer live chunks are merged.
    pub merge_below: usize,
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
}

impl Default for IndexSettings {
    fn default() -> Self {
        IndexSettings {
            segment_size: 4096,
            merge_below: 1024,
            ef_construction: 100,
            ef_search: 64,
            background: true,
            deletion_grace: None,
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
    /// Sealed segments whose BM25 statistics came from their snapshot files.
    pub bm25_snapshots: usize,
    /// Whether data may be missing and the replica should catch up from a peer.
    pub needs_catch_up: bool,
}

#[derive(Debug, Serialize, Deserialize, Default)]
struct Manifest {
    /// Every op with seq <= this is in the segments.
    last_seq: u64,
    segments: Vec<u64>,
    tombstones: HashMap<String, u64>,
    /// Version of the latest delete of every deleted document, kept so that an older copy
    /// (from a retry or a lagging peer) cannot bring it back.
    deleted: HashMap<String, u64>,
    model: Option<ModelIdentity>,
    next_segment_id: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct WalRecord {
    first_seq: u64,
    model: ModelIdentity,
    ops: Vec<WriteOp>,
}

#[derive(Debug, Default)]
struct DocState {
    seq: u64,
    version: u64,
    slots: Vec<u32>,
}

/// A shard replica's index.
#[derive(Debug)]
pub struct ShardIndex {
    /// Held for the life of the index: one owner of the folder's files at a time.
    _lock: crate::DirLock,
    dir: PathBuf,
    settings: IndexSettings,
    wal: Wal,
    model: Option<ModelIdentity>,
    last_seq: u64,
    sealed_seq: u64,
    next_segment_id: u64,
    sealed: Vec<Arc<Segment>>,
    growing: Vec<Arc<Entry>>,
    docs: HashMap<String, DocState>,
    tombstones: HashMap<String, u64>,
    deleted: HashMap<String, u64>,
    bm25: Bm25,
    slots: HashMap<u32, Arc<Entry>>,
    next_slot: u32,
    /// Deletion records with a version below this were dropped: a copy of a document this
    /// replica does not hold, at a version below this, may be one deleted since, and is refused.
    purged_below: u64,
}

impl ShardIndex {
    /// Opens the index in `dir` (created if missing), recovering from the snapshot files and the
    /// log tail. Corrupt files are reported, never loaded. Takes an exclusive lock on `dir`
    /// ([`IndexError::Locked`] while another owner holds it), released when the index drops.
    pub fn open(
        dir: &Path,
        settings: IndexSettings,
    ) -> Result<(ShardIndex, RecoveryReport), IndexError> {
        let lock = crate::DirLock::acquire(dir)?;
        let mut report = RecoveryReport::default();
        let manifest_path = dir.join("manifest.bin");
        let manifest: Manifest = match read_checked(&manifest_path) {
            Ok(Some(b)) => postcard::from_bytes(&b).map_err(|e| IndexError::Corrupt {
                path: manifest_path.clone(),
                reason: e.to_string(),
            })?,
            Ok(None) => Manifest::default(),
            Err(e) => {
                // without the manifest the segments cannot be trusted: start empty, catch up
                report.problems.push(e.to_string());
                report.needs_catch_up = true;
                Manifest::default()
            }
        };
        let (wal, wal_rec) = Wal::open(&dir.join("wal.log"))?;
        let mut ix = ShardIndex {
            _lock: lock,
            dir: dir.to_path_buf(),
            settings,
            wal,
            model: manifest.model.clone(),
            last_seq: manifest.last_seq,
            sealed_seq: manifest.last_seq,
            next_segment_id: manifest.next_segment_id,
            sealed: Vec::new(),
            growing: Vec::new(),
            docs: HashMap::new(),
            tombstones: manifest.tombstones.clone(),
            deleted: manifest.deleted.clone(),
            bm25: Bm25::default(),
            slots: HashMap::new(),
            next_slot: 0,
            purged_below: 0,
        };
        let purge_path = dir.join("purged.bin");
        let problem = match read_checked(&purge_path) {
            Ok(None) => None,
            Ok(Some(b)) => match postcard::from_bytes::<u64>(&b) {
                Ok(v) => {
                    ix.purged_below = v;
                    None
                }
                Err(e) => Some(format!("{}: {e}", purge_path.display())),
            },
            Err(e) => Some(e.to_string()),
        };
        if let Some(p) = problem {
            report.problems.push(p);
            // unknown horizon: assume every record past the grace period was dropped
            ix.purged_below = ix.grace_horizon().unwrap_or(0);
        }
        for id in &manifest.segments {
            match ix.load_segment(*id) {
                Ok(seg) => ix.sealed.push(seg),
                Err(e) => {
                    report.problems.push(e.to_string());
                    report.needs_catch_up = true;
                }
            }
        }
        report.segments = ix.sealed.len();
        let mut seg_terms = HashMap::new();
        for seg in ix.sealed.clone() {
            match ix.load_terms(&seg) {
                Ok(t) => {
                    report.bm25_snapshots += 1;
                    seg_terms.insert(seg.id, t);
                }
                Err(e) => {
                    // derivable from the segment: rebuild it and write it again
                    report
                        .problems
                        .push(format!("{e}; BM25 rebuilt from the segment's text"));
                    let t = SegmentTerms::of(&seg);
                    if let Err(e) = ix.write_terms(seg.id, &t) {
                        warn!(error = %e, "could not rewrite the BM25 snapshot");
                    }
                    seg_terms.insert(seg.id, t);
                }
            }
        }
        ix.rebuild_liveness(&seg_terms);
        if let Some(err) = &wal_rec.tail_error {
            report.problems.push(format!(
                "write-ahead log: {err}; {} bytes dropped",
                wal_rec.dropped_bytes
            ));
        }
        for (i, raw) in wal_rec.records.iter().enumerate() {
            let rec: WalRecord = match postcard::from_bytes(raw) {
                Ok(r) => r,
                Err(e) => {
                    report
                        .problems
                        .push(format!("write-ahead log record {i} does not decode: {e}"));
                    report.needs_catch_up = true;
                    break;
                }
            };
            for (j, op) in rec.ops.into_iter().enumerate() {
                let seq = rec.first_seq + j as u64;
                if seq > ix.last_seq {
                    if ix.model.is_none() {
                        ix.model = Some(rec.model.clone());
                    }
                    ix.apply_in_memory(seq, op);
                    ix.last_seq = seq;
                }
            }
            report.replayed += 1;
        }
        for seg in &ix.sealed {
            ix.spawn_graph(seg.clone(), true);
        }
        info!(dir = %dir.display(), segments = report.segments, replayed = report.replayed, docs = ix.docs.len(), "shard index opened");
        Ok((ix, report))
    }

    fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("seg-{id}.bin"))
    }

    fn terms_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("seg-{id}.bm25"))
    }

    fn write_terms(&self, id: u64, t: &SegmentTerms) -> Result<(), IndexError> {
        let bytes = postcard::to_stdvec(t).map_err(|e| IndexError::BadInput(e.to_string()))?;
        write_checked(&self.terms_path(id), &bytes)
    }

    /// Loads and checks the BM25 snapshot of a sealed segment.
    fn load_terms(&self, seg: &Segment) -> Result<SegmentTerms, IndexError> {
        let path = self.terms_path(seg.id);
        let corrupt = |reason: String| IndexError::Corrupt {
            path: path.clone(),
            reason,
        };
        let bytes = read_checked(&path)?
            .ok_or_else(|| corrupt("BM25 snapshot of a listed segment is missing".into()))?;
        let t: SegmentTerms = postcard::from_bytes(&bytes).map_err(|e| corrupt(e.to_string()))?;
        t.check(seg.entries.len()).map_err(corrupt)?;
        Ok(t)
    }

    fn graph_path(dir: &Path, id: u64) -> PathBuf {
        dir.join(format!("seg-{id}.hnsw"))
    }

    fn load_segment(&self, id: u64) -> Result<Arc<Segment>, IndexError> {
        let path = self.segment_path(id);
        let bytes = read_checked(&path)?.ok_or_else(|| IndexError::Corrupt {
            path: path.clone(),
            reason: "segment file listed in the manifest is missing".into(),
        })?;
        let entries: Vec<Entry> =
            postcard::from_bytes(&bytes).map_err(|e| IndexError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Arc::new(Segment::new(
            id,
            entries.into_iter().map(Arc::new).collect(),
        )))
    }

    /// Recomputes document liveness, slots and BM25 from the sealed segments (with their BM25
    /// snapshots) and tombstones.
    fn rebuild_liveness(&mut self, seg_terms: &HashMap<u64, SegmentTerms>) {
        let mut latest: HashMap<String, u64> = HashMap::new();
        for seg in &self.sealed {
            for e in &seg.entries {
                let s = latest.entry(e.doc_id.clone()).or_insert(0);
                *s = (*s).max(e.seq);
            }
        }
        latest.retain(|doc, seq| self.tombstones.get(doc).is_none_or(|t| *t < *seq));
        self.docs.clear();
        self.slots.clear();
        self.bm25 = Bm25::default();
        let sealed = self.sealed.clone();
        for seg in &sealed {
            let terms = seg_terms.get(&seg.id);
            for (i, e) in seg.entries.iter().enumerate() {
                if latest.get(&e.doc_id) == Some(&e.seq) {
                    let counts = match terms {
                        Some(t) => t.counts(i),
                        None => crate::bm25::term_counts(&e.text),
                    };
                    self.add_slot_counts(e.clone(), counts);
                }
            }
        }
    }

    fn add_slot(&mut self, e: Arc<Entry>) {
        let counts = crate::bm25::term_counts(&e.text);
        self.add_slot_counts(e, counts);
    }

    fn add_slot_counts(&mut self, e: Arc<Entry>, counts: Vec<(String, u32)>) {
        let slot = self.next_slot;
        self.next_slot = self.next_slot.wrapping_add(1);
        self.bm25.insert_counts(slot, counts);
        let d = self.docs.entry(e.doc_id.clone()).or_default();
        d.seq = e.seq;
        d.version = e.version;
        d.slots.push(slot);
        self.slots.insert(slot, e);
    }

    fn remove_doc(&mut self, doc_id: &str) {
        if let Some(d) = self.docs.remove(doc_id) {
            for s in d.slots {
                self.bm25.remove(s);
                self.slots.remove(&s);
            }
        }
    }

    fn apply_in_memory(&mut self, seq: u64, op: WriteOp) {
        match op {
            WriteOp::Upsert {
                doc_id,
                chunks,
                version,
            } if !chunks.is_empty() => {
                self.remove_doc(&doc_id);
                self.deleted.remove(&doc_id);
                for c in chunks {
                    let e = Arc::new(Entry {
                        seq,
                        version,
                        doc_id: c.doc_id,
                        chunk_id: c.chunk_id,
                        text: c.text,
                        vector: c.vector,
                    });
                    self.growing.push(e.clone());
                    self.add_slot(e);
                }
            }
            WriteOp::Upsert {
                doc_id, version, ..
            }
            | WriteOp::Delete { doc_id, version } => {
                self.remove_doc(&doc_id);
                self.tombstones.insert(doc_id.clone(), seq);
                self.deleted.insert(doc_id, version);
            }
        }
    }

    fn is_live(&self, e: &Entry) -> bool {
        self.docs.get(&e.doc_id).is_some_and(|d| d.seq == e.seq)
    }

    /// Checks a write or query model against the pinned one.
    pub fn check_model(&self, model: &ModelIdentity) -> Result<(), IndexError> {
        match &self.model {
            Some(m) if m != model => Err(IndexError::ModelMismatch {
                index: m.to_string(),
                request: model.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// The version this replica holds of a document, live or deleted.
    pub fn version_of(&self, doc_id: &str) -> Option<u64> {
        self.docs
            .get(doc_id)
            .map(|d| d.version)
            .or_else(|| self.deleted.get(doc_id).copied())
    }

    /// Deletes documents durably at `version` (no model check: deletions carry no vectors).
    pub fn delete(&mut self, doc_ids: &[String], version: u64) -> Result<u64, IndexError> {
        let Some(model) = self.model.clone() else {
            return Ok(self.last_seq); // nothing was ever written
        };
        let ops = doc_ids
            .iter()
            .map(|d| WriteOp::Delete {
                doc_id: d.clone(),
                version,
            })
            .collect();
        self.write(ops, &model)
    }

    /// Validates, logs durably (fsync) and applies `ops`; returns the last sequence number.
    /// The first write pins the model identity. An op older than (or as old as) the version
    /// held of its document is skipped: last writer wins (see [`WriteOp::version`]).
    pub fn write(&mut self, ops: Vec<WriteOp>, model: &ModelIdentity) -> Result<u64, IndexError> {
        self.check_model(model)?;
        let mut ops = ops;
        for op in ops.iter_mut() {
            if op.doc_id().is_empty() {
                return Err(IndexError::BadInput("empty document id".into()));
            }
            if let WriteOp::Upsert { doc_id, chunks, .. } = op {
                for c in chunks.iter_mut() {
                    validate_chunk(doc_id, c, model.dim as usize)?;
                }
            }
        }
        let mut newest: HashMap<String, u64> = HashMap::new();
        ops.retain(|op| {
            let v = op.version();
            if v == 0 {
                return true;
            }
            let held = newest
                .get(op.doc_id())
                .copied()
                .or_else(|| self.version_of(op.doc_id()));
            if held.is_some_and(|h| h >= v) {
                return false;
            }
            // older than the dropped deletion records and not held: it may have been deleted
            if held.is_none() && v <= self.purged_below {
                return false;
            }
            newest.insert(op.doc_id().to_string(), v);
            true
        });
        if ops.is_empty() {
            return Ok(self.last_seq);
        }
        let first_seq = self.last_seq + 1;
        let rec = WalRecord {
            first_seq,
            model: model.clone(),
            ops,
        };
        let bytes = postcard::to_stdvec(&rec).map_err(|e| IndexError::BadInput(e.to_string()))?;
        self.wal.append(&[bytes])?;
        if self.model.is_none() {
            self.model = Some(model.clone());
        }
        let n = rec.ops.len() as u64;
        for (j, op) in rec.ops.into_iter().enumerate() {
            self.apply_in_memory(first_seq + j as u64, op);
        }
        self.last_seq = first_seq + n - 1;
        if self.growing.len() >= self.settings.segment_size {
            // the write is durable (logged) and applied whatever happens here: a seal that
            // fails (disk full) leaves the growing segment and the log as they were, and the
            // next write tries again
            if let Err(e) = self.seal() {
                warn!(dir = %self.dir.display(), error = %e, "seal failed; the growing segment stays in memory and in the log");
            }
        }
        Ok(self.last_seq)
    }

    /// Seals the growing segment: writes it and a new manifest, empties the log, and builds the
    /// segment's graph in the background. Then merges small segments.
    /// A failed seal leaves the index as it was (the growing segment searchable, the log
    /// intact); the files it did write are unreferenced and removed.
    pub fn seal(&mut self) -> Result<(), IndexError> {
        if !self.growing.is_empty() {
            let id = self.next_segment_id;
            let seg = Arc::new(Segment::new(id, self.growing.clone()));
            if let Err(e) = self.write_segment(&seg) {
                self.remove_segment_files(id);
                return Err(e);
            }
            self.next_segment_id += 1;
            self.growing.clear();
            self.sealed.push(seg.clone());
            self.spawn_graph(seg, false);
        }
        if let Err(e) = self.merge_small() {
            // the sources stay as they are; a later seal merges them
            warn!(dir = %self.dir.display(), error = %e, "merge failed");
        }
        self.sealed_seq = self.last_seq;
        self.purge_deletions()?;
        self.write_manifest()?;
        self.wal.reset()?;
        Ok(())
    }

    /// Drops deletion records older than the grace period (before the manifest that no longer
    /// lists them is written, the new horizon is durable).
    fn purge_deletions(&mut self) -> Result<(), IndexError> {
        let Some(horizon) = self.grace_horizon() else {
            return Ok(());
        };
        if !self.deleted.values().any(|&v| v < horizon) {
            return Ok(());
        }
        let horizon = horizon.max(self.purged_below);
        let bytes =
            postcard::to_stdvec(&horizon).map_err(|e| IndexError::BadInput(e.to_string()))?;
        write_checked(&self.dir.join("purged.bin"), &bytes)?;
        self.purged_below = horizon;
        let before = self.deleted.len();
        self.deleted.retain(|_, v| *v >= horizon);
        info!(
            dropped = before - self.deleted.len(),
            "deletion records past the grace period dropped"
        );
        Ok(())
    }

    /// The version (a time in microseconds) below which deletion records are past the grace
    /// period; None when they are kept for ever.
    fn grace_horizon(&self) -> Option<u64> {
        let grace = self.settings.deletion_grace?;
        Some(ragfleet_proto::clock_micros().saturating_sub(grace.as_micros() as u64))
    }

    /// Removes a segment's files (best effort: unreferenced files are garbage, not data).
    fn remove_segment_files(&self, id: u64) {
        for p in [
            self.segment_path(id),
            self.terms_path(id),
            Self::graph_path(&self.dir, id),
        ] {
            let _ = std::fs::remove_file(p);
        }
    }

    fn write_segment(&self, seg: &Segment) -> Result<(), IndexError> {
        let plain: Vec<&Entry> = seg.entries.iter().map(|e| e.as_ref()).collect();
        let bytes = postcard::to_stdvec(&plain).map_err(|e| IndexError::BadInput(e.to_string()))?;
        write_checked(&self.segment_path(seg.id), &bytes)?;
        self.write_terms(seg.id, &SegmentTerms::of(seg))
    }

    fn write_manifest(&self) -> Result<(), IndexError> {
        let m = Manifest {
            last_seq: self.last_seq,
            segments: self.sealed.iter().map(|s| s.id).collect(),
            tombstones: self.tombstones.clone(),
            deleted: self.deleted.clone(),
            model: self.model.clone(),
            next_segment_id: self.next_segment_id,
        };
        let bytes = postcard::to_stdvec(&m).map_err(|e| IndexError::BadInput(e.to_string()))?;
        write_checked(&self.dir.join("manifest.bin"), &bytes)
    }

    fn merge_small(&mut self) -> Result<(), IndexError> {
        let small: Vec<Arc<Segment>> = self
            .sealed
            .iter()
            .filter(|s| {
                s.entries.iter().filter(|e| self.is_live(e)).count() < self.settings.merge_below
            })
            .cloned()
            .collect();
        if small.len() < 2 {
            return Ok(());
        }
        let id = self.next_segment_id;
        self.next_segment_id += 1;
        let entries: Vec<Arc<Entry>> = small
            .iter()
            .flat_map(|s| s.entries.iter())
            .filter(|e| self.is_live(e))
            .cloned()
            .collect();
        let merged = Arc::new(Segment::new(id, entries));
        if let Err(e) = self.write_segment(&merged) {
            self.next_segment_id -= 1;
            self.remove_segment_files(id);
            return Err(e);
        }
        let gone: HashSet<u64> = small.iter().map(|s| s.id).collect();
        self.sealed.retain(|s| !gone.contains(&s.id));
        self.sealed.push(merged.clone());
        // tombstones matter only while a sealed segment still holds an older copy
        let present: HashSet<&str> = self
            .sealed
            .iter()
            .flat_map(|s| s.entries.iter().map(|e| e.doc_id.as_str()))
            .collect();
        let present: HashSet<String> = present.into_iter().map(str::to_string).collect();
        self.tombstones.retain(|d, _| present.contains(d));
        self.write_manifest()?;
        for g in gone {
            let _ = std::fs::remove_file(self.segment_path(g));
            let _ = std::fs::remove_file(self.terms_path(g));
            let _ = std::fs::remove_file(Self::graph_path(&self.dir, g));
        }
        self.spawn_graph(merged, false);
        info!(segment = id, "merged small segments");
        Ok(())
    }

    fn spawn_graph(&self, seg: Arc<Segment>, try_load: bool) {
        let dir = self.dir.clone();
        let (efc, efs) = (self.settings.ef_construction, self.settings.ef_search);
        let work = move || {
            let path = Self::graph_path(&dir, seg.id);
            if try_load {
                match read_checked(&path) {
                    Ok(Some(bytes)) => match postcard::from_bytes::<Graph>(&bytes) {
                        Ok(g) => {
                            let _ = seg.graph.set(g);
                            return;
                        }
                        Err(e) => {
                            warn!(path = %path.display(), error = %e, "graph file does not decode; rebuilding")
                        }
                    },
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "graph file rejected; rebuilding"),
                }
            }
            let g = seg.build_graph(efc, efs);
            if let Ok(bytes) = postcard::to_stdvec(&g) {
                if let Err(e) = write_checked(&path, &bytes) {
                    warn!(error = %e, "could not persist graph");
                }
            }
            let _ = seg.graph.set(g);
        };
        if self.settings.background {
            std::thread::Builder::new()
                .name(format!("hnsw-build-{}", seg_id_for_name(&self.dir)))
                .spawn(work)
                .ok();
        } else {
            work();
        }
    }

    /// Top hits for a query.
    pub fn search(&self, q: &SearchQuery) -> Result<Vec<Hit>, IndexError> {
        let k = q.k.clamp(1, 1000) as usize;
        match q.mode {
            SearchMode::Dense => self.dense(q, k),
            SearchMode::Bm25 => Ok(self.bm25_hits(q, k)),
            SearchMode::Hybrid => {
                let (d, b) = self.hybrid_parts(q)?;
                Ok(rrf(&[d, b], 60.0, k))
            }
        }
    }

    /// The two rankings a hybrid search fuses (dense, BM25), each `max(2k, 20)` deep.
    pub fn hybrid_parts(&self, q: &SearchQuery) -> Result<(Vec<Hit>, Vec<Hit>), IndexError> {
        let depth = (q.k.clamp(1, 1000) as usize * 2).max(20);
        Ok((self.dense(q, depth)?, self.bm25_hits(q, depth)))
    }

    fn dense(&self, q: &SearchQuery, k: usize) -> Result<Vec<Hit>, IndexError> {
        if let Some(m) = &q.model {
            self.check_model(m)?;
        }
        if self.slots.is_empty() {
            return Ok(Vec::new());
        }
        let v = self.query_unit(q)?;
        let live = |e: &Entry| self.is_live(e);
        let mut all: Vec<(f32, Arc<Entry>)> = exact_search(&self.growing, &v, k, &live);
        for seg in &self.sealed {
            all.extend(seg.search(&v, k, &live));
        }
        let mut hits: Vec<Hit> = all.into_iter().map(|(s, e)| hit(&e, s, Some(s))).collect();
        sort_hits(&mut hits);
        hits.truncate(k);
        Ok(hits)
    }

    /// The query vector at unit length, checked against the index's dimension.
    fn query_unit(&self, q: &SearchQuery) -> Result<Vec<f32>, IndexError> {
        let mut v = q.vector.clone();
        if let Some(m) = &self.model {
            if v.len() != m.dim as usize {
                return Err(IndexError::BadInput(format!(
                    "query vector has {} dimensions, index has {}",
                    v.len(),
                    m.dim
                )));
            }
        }
        if !normalize(&mut v) {
            return Err(IndexError::BadInput(
                "query vector is zero or not finite".into(),
            ));
        }
        Ok(v)
    }

    /// BM25 hits, with their cosine similarity to the query vector when it has a usable one.
    fn bm25_hits(&self, q: &SearchQuery, k: usize) -> Vec<Hit> {
        let model_ok = q.model.as_ref().is_none_or(|m| self.check_model(m).is_ok());
        let v = self
            .query_unit(q)
            .ok()
            .filter(|_| model_ok && self.model.is_some());
        self.bm25
            .search(&q.text, k)
            .into_iter()
            .filter_map(|(slot, s)| {
                self.slots.get(&slot).map(|e| {
                    let sim = v.as_ref().map(|v| crate::vector::dot(v, &e.vector));
                    hit(e, s, sim)
                })
            })
            .collect()
    }

    /// What this replica holds: the version of every live document and remembered deletion,
    /// sorted by document id (what a peer replica compares against its own to pull changes).
    pub fn versions(&self) -> ShardVersions {
        let mut live: Vec<(String, u64)> = self
            .docs
            .iter()
            .map(|(d, s)| (d.clone(), s.version))
            .collect();
        live.sort();
        let mut deleted: Vec<(String, u64)> = self
            .remembered_deletions()
            .map(|(d, v)| (d.to_string(), v))
            .collect();
        deleted.sort();
        ShardVersions {
            model: self.model.clone(),
            live,
            deleted,
        }
    }

    /// The live copies of `doc_ids` as upserts, chunks in order; absent documents are left out.
    pub fn fetch(&self, doc_ids: &[String]) -> Vec<WriteOp> {
        doc_ids
            .iter()
            .filter_map(|d| {
                let state = self.docs.get(d)?;
                let chunks = state
                    .slots
                    .iter()
                    .filter_map(|s| self.slots.get(s))
                    .map(|e| ChunkRecord {
                        doc_id: e.doc_id.clone(),
                        chunk_id: e.chunk_id.clone(),
                        text: e.text.clone(),
                        vector: e.vector.clone(),
                    })
                    .collect();
                Some(WriteOp::Upsert {
                    doc_id: d.clone(),
                    version: state.version,
                    chunks,
                })
            })
            .collect()
    }

    /// Every live document as an upsert, then every remembered deletion as a delete.
    pub fn dump(&self) -> Vec<WriteOp> {
        let v = self.versions();
        let ids: Vec<String> = v.live.into_iter().map(|(d, _)| d).collect();
        let mut ops = self.fetch(&ids);
        ops.extend(
            v.deleted
                .into_iter()
                .map(|(doc_id, version)| WriteOp::Delete { doc_id, version }),
        );
        ops
    }

    /// What this replica lacks of a peer's state: the documents the peer holds at a newer
    /// version (to fetch), and the peer's deletions newer than what is held here (applied as
    /// deletes, no data needed). Documents held here at a newer version, or that the peer
    /// lacks, are left alone: the peer pulls them from here in its own turn.
    pub fn plan_pull(&self, peer: &ShardVersions) -> PullPlan {
        let newer = |d: &str, v: u64| match self.version_of(d) {
            Some(held) => held < v,
            None => v == 0 || v > self.purged_below,
        };
        PullPlan {
            fetch: peer
                .live
                .iter()
                .filter(|(d, v)| newer(d, *v))
                .map(|(d, _)| d.clone())
                .collect(),
            deletes: peer
                .deleted
                .iter()
                .filter(|(d, v)| newer(d, *v))
                .map(|(d, v)| WriteOp::Delete {
                    doc_id: d.clone(),
                    version: *v,
                })
                .collect(),
        }
    }

    /// The digest of [`ShardIndex::versions`], computed without copying them.
    pub fn digest(&self) -> u64 {
        ragfleet_proto::shard_digest(
            self.docs.iter().map(|(d, s)| (d.as_str(), s.version)),
            self.remembered_deletions(),
        )
    }

    /// (id, version) of every deletion record of a document not live now.
    fn remembered_deletions(&self) -> impl Iterator<Item = (&str, u64)> {
        self.deleted
            .iter()
            .filter(|(d, _)| !self.docs.contains_key(*d))
            .map(|(d, v)| (d.as_str(), *v))
    }

    /// Ids of the live documents.
    pub fn doc_ids(&self) -> Vec<String> {
        self.docs.keys().cloned().collect()
    }

    /// Live documents.
    pub fn doc_count(&self) -> u64 {
        self.docs.len() as u64
    }

    /// Live chunks.
    pub fn chunk_count(&self) -> u64 {
        self.slots.len() as u64
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

fn seg_id_for_name(dir: &Path) -> String {
    dir.file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default()
}

fn hit(e: &Entry, score: f32, similarity: Option<f32>) -> Hit {
    Hit {
        doc_id: e.doc_id.clone(),
        chunk_id: e.chunk_id.clone(),
        score,
        similarity,
        text: e.text.clone(),
    }
}

fn validate_chunk(doc_id: &str, c: &mut ChunkRecord, dim: usize) -> Result<(), IndexError> {
    if c.doc_id != doc_id {
        return Err(IndexError::BadInput(format!(
            "chunk {} belongs to {}, not {}",
            c.chunk_id, c.doc_id, doc_id
        )));
    }
    if c.vector.len() != dim {
        return Err(IndexError::BadInput(format!(
            "chunk {} has {} dimensions, model has {}",
            c.chunk_id,
            c.vector.len(),
            dim
        )));
    }
    if !normalize(&mut c.vector) {
        return Err(IndexError::BadInput(format!(
            "chunk {} has a zero or non-finite vector",
            c.chunk_id
        )));
    }
    Ok(())
}
