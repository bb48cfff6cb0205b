//! Background merges under a tiered policy, so a shard of N chunks holds O(log N) segments.
//!
//! Policy: segments (with their graphs built) sorted by live chunks, largest first; the first
//! position j from which the smaller segments together hold at least 1/`merge_ratio` of
//! segment j's live chunks starts a merge of j and everything smaller. In the steady state each
//! segment is more than `merge_ratio` times the next one, so a shard has about
//! log_ratio(N / segment_size) + 1 segments. A merge either *extends* (the largest source's graph
//! is copied and the others' vectors inserted into the copy: no data file is rewritten, the new
//! segment lists the sources' data files as its parts) or *compacts* (when a quarter or more of
//! the sources' chunks are dead: the live chunks go into a new data file and a fresh graph).
//!
//! Safety: the work (graph, files) runs on a low-priority thread and writes files under
//! temporary names; the owner commits it (renames, one manifest write: the atomic switch) only
//! if every source is still there. Searches see the sources until the commit and the merged
//! segment after it, never both and never neither; a chunk deleted or replaced meanwhile is
//! dead by its sequence number in either. A crash before the manifest write leaves temporary or
//! unreferenced files, removed at the next open; after it, the sources' obsolete files are.
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::segment::{flat, GraphSpec, SegGraph};

/// A merge in progress or done, waiting for its commit.
pub(super) struct MergeJob {
    sources: Vec<u64>,
    state: JobState,
    _cancel: CancelOnDrop,
}

/// Tells the merge thread to stop before writing more once its job is dropped (an index
/// dropped mid-merge: an actor restart).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl MergeJob {
    fn finished(&self) -> bool {
        match &self.state {
            JobState::Running(h) => h.is_finished(),
            JobState::Done(_) => true,
        }
    }

    /// The merge's result (waits for its thread).
    fn result(self) -> (Vec<u64>, Result<Merged, IndexError>) {
        let r = match self.state {
            JobState::Running(h) => h
                .join()
                .unwrap_or_else(|_| Err(IndexError::BadInput("merge thread panicked".into()))),
            JobState::Done(r) => r,
        };
        (self.sources, r)
    }
}

impl std::fmt::Debug for MergeJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergeJob")
            .field("sources", &self.sources)
            .finish()
    }
}

enum JobState {
    Running(std::thread::JoinHandle<Result<Merged, IndexError>>),
    Done(Result<Merged, IndexError>),
}

/// What a merge produced: the segment (graph built) and its files under temporary names.
pub(super) struct Merged {
    segment: Arc<Segment>,
    /// (temporary, final) file names, data files first.
    files: Vec<(PathBuf, PathBuf)>,
    compacted: bool,
}

/// What a compaction writes: the sources' live chunks, and which positions of each source they
/// are.
struct Compaction {
    entries: Vec<Arc<Entry>>,
    keep: Vec<Vec<bool>>,
}

/// Share of dead chunks from which a merge compacts instead of extending.
const COMPACT_DEAD_SHARE: f64 = 0.25;
/// Tombstones are pruned after a compaction when the dead rows left in the shard are at most
/// this many times those it dropped...
const PRUNE_SPAN: usize = 4;
/// ...or fewer than this.
const PRUNE_ALWAYS_BELOW: usize = 512;
/// An idle shard merges once the smaller segments hold 1/(this x `merge_ratio`) of a larger
/// one's live chunks.
const IDLE_MERGE_FACTOR: usize = 4;
/// Share of dead chunks from which a segment is compacted on its own.
const COMPACT_ALONE_SHARE: f64 = 0.5;

impl ShardIndex {
    /// Commits a finished merge, then starts the next one the policy asks for. Called after
    /// every seal and periodically by the shard's owner; with `background: false` the merges
    /// run here, to the end. Returns whether the segment set changed.
    pub fn maintain(&mut self) -> Result<bool, IndexError> {
        if self.idle_seal_due() {
            info!(
                dir = %self.dir.display(),
                chunks = self.growing.len(),
                idle_s = self.last_write.elapsed().as_secs_f64(),
                "sealing the idle growing segment"
            );
            // the seal runs the policy itself; a failed one is tried again after another idle
            // period, not at every poll
            if let Err(e) = self.seal() {
                self.last_write = std::time::Instant::now();
                return Err(e);
            }
            return Ok(true);
        }
        let mut changed = false;
        for _ in 0..64 {
            if let Some(job) = self.merge.take_if(|j| j.finished()) {
                let (sources, result) = job.result();
                match result {
                    Ok(merged) => {
                        self.commit_merge(&sources, merged)?;
                        changed = true;
                    }
                    Err(e) => {
                        warn!(dir = %self.dir.display(), error = %e, "merge failed; its sources stay");
                        return Ok(changed);
                    }
                }
            } else if self.merge.is_some() {
                return Ok(changed);
            }
            if !self.start_merge() {
                return Ok(changed);
            }
        }
        Ok(changed)
    }

    /// Whether a merge is running or waiting for its commit.
    pub fn merging(&self) -> bool {
        self.merge.is_some()
    }

    /// Merged-away segments whose memory and files a background thread is still giving back
    /// (a bench waits for none before it measures the process's memory or its files).
    pub fn segments_being_freed(&self) -> usize {
        self.freeing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether [`ShardIndex::maintain`] has something to do now (cheap: the owner polls it under
    /// a read lock and takes the write lock only when it says yes).
    pub fn needs_maintenance(&self) -> bool {
        if self.idle_seal_due() {
            return true;
        }
        match &self.merge {
            Some(job) => job.finished(),
            None => self.planned_at != self.plan_key(),
        }
    }

    /// Whether no write came for [`IndexSettings::seal_idle`].
    fn idle(&self) -> bool {
        self.settings
            .seal_idle
            .is_some_and(|idle| self.last_write.elapsed() >= idle)
    }

    /// Whether the growing segment should be sealed for want of writes (see
    /// [`IndexSettings::seal_idle`]).
    fn idle_seal_due(&self) -> bool {
        self.idle() && self.growing.len() >= IDLE_SEAL_MIN_CHUNKS
    }

    fn plan_key(&self) -> (u64, u64, bool) {
        (
            self.generation,
            self.graphs_done.load(Ordering::Acquire),
            self.idle(),
        )
    }

    /// Picks the next merge; None when the segments are in shape.
    fn plan_merge(&self) -> Option<(Vec<Arc<Segment>>, bool)> {
        let live = |e: &Entry| self.is_live(e);
        let mut segs: Vec<(usize, Arc<Segment>)> = self
            .sealed
            .iter()
            .filter(|s| s.graph.get().is_some())
            .map(|s| (s.live_count(&live), s.clone()))
            .collect();
        segs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
        // an idle shard merges its small segments into the larger ones sooner (the segment
        // an idle seal leaves would otherwise stay a graph of its own beside a much larger one
        // until 1/merge_ratio of it came): its cores have nothing else to do, and the copying
        // this costs is still bounded by IDLE_MERGE_FACTOR x merge_ratio x the new chunks
        let ratio = if self.idle() {
            self.settings.merge_ratio.max(2) * IDLE_MERGE_FACTOR
        } else {
            self.settings.merge_ratio.max(2)
        };
        let dead_share = |set: &[(usize, Arc<Segment>)]| {
            let total: usize = set.iter().map(|(_, s)| s.entries.len()).sum();
            let live: usize = set.iter().map(|(l, _)| *l).sum();
            if total == 0 {
                0.0
            } else {
                1.0 - live as f64 / total as f64
            }
        };
        for j in 0..segs.len().saturating_sub(1) {
            let rest: usize = segs[j + 1..].iter().map(|(l, _)| *l).sum();
            if rest * ratio >= segs[j].0 {
                let set = &segs[j..];
                let compact =
                    self.settings.ann != AnnKind::Hnsw || dead_share(set) >= COMPACT_DEAD_SHARE;
                return Some((set.iter().map(|(_, s)| s.clone()).collect(), compact));
            }
        }
        segs.iter()
            .find(|(l, s)| {
                !s.entries.is_empty()
                    && 1.0 - *l as f64 / s.entries.len() as f64 >= COMPACT_ALONE_SHARE
            })
            .map(|(_, s)| (vec![s.clone()], true))
    }

    /// Starts the merge the policy picks (running it to the end when not in the background).
    fn start_merge(&mut self) -> bool {
        self.planned_at = self.plan_key();
        let t = std::time::Instant::now();
        let planned = self.plan_merge();
        let plan_ms = t.elapsed().as_secs_f64() * 1e3;
        let Some((sources, compact)) = planned else {
            return false;
        };
        let id = self.next_segment_id;
        self.next_segment_id += 1;
        let live = |e: &Entry| self.is_live(e);
        // compaction snapshots the live chunks now (and which of each source's positions they
        // are, for the postings); a chunk that dies later is dead by its sequence number in the
        // merged segment too
        let entries: Option<Compaction> = compact.then(|| {
            let keep: Vec<Vec<bool>> = sources
                .iter()
                .map(|s| s.entries.iter().map(|e| live(e)).collect())
                .collect();
            let entries = sources
                .iter()
                .zip(&keep)
                .flat_map(|(s, k)| s.entries.iter().zip(k).filter(|(_, &k)| k))
                .map(|(e, _)| e.clone())
                .collect();
            Compaction { entries, keep }
        });
        let nonce: u64 = rand::random();
        // a merge leaves half the cores to the queries
        let spec = GraphSpec {
            threads: (self.settings.build_threads() / 2).max(1),
            ..self.graph_spec()
        };
        let dir = self.dir.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let job_sources = sources.clone();
        let stop = cancel.clone();
        let background = self.settings.background;
        let work = move || {
            if background {
                lower_priority();
            }
            run_merge(&dir, id, nonce, &job_sources, entries, spec, &stop)
        };
        let ids: Vec<u64> = sources.iter().map(|s| s.id).collect();
        info!(dir = %self.dir.display(), segment = id, sources = ?ids, compact, plan_ms, snapshot_ms = t.elapsed().as_secs_f64() * 1e3 - plan_ms, "merge started");
        let state = if background {
            match std::thread::Builder::new()
                .name(format!("merge-{}", seal::seg_id_for_name(&self.dir)))
                .spawn(work)
            {
                Ok(h) => JobState::Running(h),
                Err(e) => JobState::Done(Err(IndexError::io(&self.dir, e))),
            }
        } else {
            JobState::Done(work())
        };
        self.merge = Some(MergeJob {
            sources: ids,
            state,
            _cancel: CancelOnDrop(cancel),
        });
        true
    }

    pub(super) fn graph_spec(&self) -> GraphSpec {
        GraphSpec {
            ann: self.settings.ann,
            m: self.settings.hnsw_m,
            ef_construction: self.settings.ef_construction,
            ef_search: self.settings.ef_search,
            threads: self.settings.build_threads(),
            memory: self.settings.graph_memory(),
        }
    }

    /// Puts a finished merge in place of its sources: files renamed, one manifest write, then
    /// the sources' obsolete files removed. Discarded when a source has gone meanwhile.
    fn commit_merge(&mut self, sources: &[u64], merged: Merged) -> Result<(), IndexError> {
        let discard = |m: &Merged| {
            for (tmp, _) in &m.files {
                let _ = std::fs::remove_file(tmp);
            }
        };
        let present = |id: &u64| self.sealed.iter().any(|s| s.id == *id);
        if !sources.iter().all(present) {
            discard(&merged);
            return Ok(());
        }
        let started = std::time::Instant::now();
        let ms = |since: std::time::Instant| since.elapsed().as_secs_f64() * 1e3;
        for (tmp, path) in &merged.files {
            if let Err(e) = std::fs::rename(tmp, path) {
                discard(&merged);
                return Err(IndexError::io(path, e));
            }
        }
        crate::files::sync_dir(&self.dir);
        let before = self.sealed.clone();
        let at = self
            .sealed
            .iter()
            .position(|s| sources.contains(&s.id))
            .unwrap_or(self.sealed.len());
        self.sealed.retain(|s| !sources.contains(&s.id));
        self.sealed
            .insert(at.min(self.sealed.len()), merged.segment.clone());
        let renamed_ms = ms(started);
        let t = std::time::Instant::now();
        if let Err(e) = self.write_manifest() {
            self.sealed = before;
            for (_, path) in &merged.files {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        let manifest_ms = ms(t);
        let t = std::time::Instant::now();
        if merged.compacted {
            // the live chunks' slots move to the new file, so the sources' maps are let go
            self.rebind(&merged.segment.entries);
        }
        let rebound_ms = ms(t);
        let t = std::time::Instant::now();
        if merged.compacted && self.pruning_pays(&before, sources, &merged.segment) {
            // only a compaction drops chunks (an extension keeps every chunk of its sources);
            // after the manifest, so that this commit does not also rewrite the deletion
            // records (their file keeps the pruned ones until the next manifest write: a
            // tombstone without an older copy to mark is harmless), and after the rebinding,
            // which marks dead the new copies of chunks that died during the merge (their
            // tombstones stay)
            self.prune_tombstones();
        }
        let pruned_ms = ms(t);
        let t = std::time::Instant::now();
        // the sources' files, obsolete since the manifest (ids are never reused, and an open
        // removes what a crash left of them)
        let kept: HashSet<u64> = merged.segment.parts.iter().map(|(p, _)| *p).collect();
        let mut obsolete = Vec::new();
        for s in before.iter().filter(|s| sources.contains(&s.id)) {
            obsolete.push(Self::graph_path(&self.dir, s.id));
            obsolete.push(self.postings_path(s.id));
            for (p, _) in &s.parts {
                if !kept.contains(p) {
                    obsolete.push(self.segment_path(*p));
                }
            }
        }
        let remove = move |paths: Vec<PathBuf>| {
            for path in paths {
                let _ = std::fs::remove_file(path);
            }
        };
        self.generation += 1;
        // the sources' chunks, graphs and maps are let go, and their files removed, off the
        // owner's thread: freeing a large segment's chunks one by one would hold the index
        // (about 1 s at a million), and so would unlinking a few hundred files while an
        // ingest keeps the disk busy (0.4 s for a merge of 264 segments)
        let retired: Vec<Arc<Segment>> = before
            .into_iter()
            .filter(|s| sources.contains(&s.id))
            .collect();
        if self.settings.background {
            let freeing = Arc::clone(&self.freeing);
            freeing.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new()
                .name("merge-free".into())
                .spawn(move || {
                    remove(obsolete);
                    drop(retired);
                    freeing.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                // the closure (and the segments and paths with it) was dropped here: the files
                // go at the next open
                self.freeing.fetch_sub(1, Ordering::SeqCst);
                warn!(error = %e, "could not free merged segments in the background");
            }
        } else {
            remove(obsolete);
        }
        info!(
            dir = %self.dir.display(),
            segment = merged.segment.id,
            chunks = merged.segment.entries.len(),
            compacted = merged.compacted,
            segments = self.sealed.len(),
            held_ms = ms(started),
            renamed_ms,
            pruned_ms,
            manifest_ms,
            rebound_ms,
            removed_ms = ms(t),
            "merge committed"
        );
        Ok(())
    }

    /// Whether pruning the tombstones after this compaction is worth its cost: it visits the
    /// dead rows of every segment (1.5 s under the write lock for a compaction of two small
    /// segments beside a million-chunk one with 550,000 dead rows), while only the documents
    /// whose dead copies the compaction dropped can lose their last one. It runs when the dead
    /// rows left are at most [`PRUNE_SPAN`] times those dropped (or few), so its cost stays
    /// in proportion to what compactions drop; a tombstone kept meanwhile is harmless and goes
    /// at a later compaction.
    fn pruning_pays(&self, before: &[Arc<Segment>], sources: &[u64], merged: &Segment) -> bool {
        let held: usize = before
            .iter()
            .filter(|s| sources.contains(&s.id))
            .map(|s| s.entries.len())
            .sum();
        let dropped = held.saturating_sub(merged.entries.len());
        let live = |e: &Entry| self.is_live(e);
        let dead_left: usize = self
            .sealed
            .iter()
            .map(|s| s.entries.len().saturating_sub(s.live_count(&live)))
            .sum();
        let pays = dead_left < PRUNE_ALWAYS_BELOW || dead_left <= PRUNE_SPAN * dropped;
        if !pays {
            info!(dir = %self.dir.display(), dropped, dead_left, "tombstones left to a later compaction");
        }
        pays
    }

    /// Tombstones matter only while a sealed segment still holds an older copy.
    pub(super) fn prune_tombstones(&mut self) {
        if self.tombstones.is_empty() {
            return;
        }
        let mut present: HashSet<String> = HashSet::new();
        let mut check = |e: &Entry| {
            if self.tombstones.contains_key(&e.doc_id) && !present.contains(&e.doc_id) {
                present.insert(e.doc_id.clone());
            }
        };
        // a live copy is newer than any deletion of its document (a delete or replace marks
        // every copy it finds dead): only dead ones need their tombstone. A whole mapped data
        // file gives its dead rows from its marks, without visiting its chunks (a million of
        // them cost hundreds of milliseconds under the write lock); chunks in memory are
        // visited
        for seg in &self.sealed {
            for (part, file) in seg.file_parts() {
                match file {
                    Some(file) => file
                        .dead_rows()
                        .filter_map(|row| part.get(row))
                        .for_each(|e| check(e)),
                    None => part
                        .iter()
                        .filter(|e| e.marked_dead() != Some(false))
                        .for_each(|e| check(e)),
                }
            }
        }
        if present.len() == self.tombstones.len() {
            return;
        }
        // the kept ones into a new map; the old one (after a compaction that dropped many
        // deleted documents' last copies, most of it: 550,000 strings took ~190 ms to free
        // under the write lock) is freed on another thread
        let kept: HashMap<String, u64> = present
            .into_iter()
            .filter_map(|d| self.tombstones.get(&d).map(|&v| (d, v)))
            .collect();
        let old = std::mem::replace(&mut self.tombstones, kept);
        self.deletions_log.touched_many(
            old.len() - self.tombstones.len(),
            old.keys()
                .filter(|d| !self.tombstones.contains_key(*d))
                .map(String::as_str),
        );
        if self.settings.background && old.len() > 10_000 {
            if let Err(e) = std::thread::Builder::new()
                .name("tombstones-free".into())
                .spawn(move || drop(old))
            {
                warn!(error = %e, "could not free pruned tombstones in the background");
            }
        }
    }
}

/// The merge itself, off the owner's thread: the new data file (compaction), the graph, each
/// written under a temporary name.
fn run_merge(
    dir: &Path,
    id: u64,
    nonce: u64,
    sources: &[Arc<Segment>],
    compacted: Option<Compaction>,
    spec: GraphSpec,
    cancel: &AtomicBool,
) -> Result<Merged, IndexError> {
    let tmp = |name: &str| dir.join(format!("{name}.{nonce:016x}.merging"));
    let cancelled = || IndexError::BadInput("merge cancelled: the index was dropped".into());
    let mut files = Vec::new();
    let result = (|| {
        let compact = compacted.is_some();
        let (segment, graph) = match compacted {
            Some(Compaction { entries, keep }) => {
                let (bin, post) = (format!("seg-{id}.bin"), format!("seg-{id}.post"));
                files.push((tmp(&bin), dir.join(&bin)));
                files.push((tmp(&post), dir.join(&post)));
                // the postings are the sources' without the dead chunks: streamed from their
                // files, never gathered in memory
                let postings = |path: &Path| {
                    let inputs = source_postings(sources);
                    let keep: Vec<Option<&[bool]>> = keep.iter().map(|k| Some(&k[..])).collect();
                    crate::postings::SegPostings::write_kept(path, &inputs, &keep)
                };
                let seg = super::seal::write_part(&tmp(&bin), &tmp(&post), id, &entries, postings)?;
                if cancel.load(Ordering::Relaxed) {
                    return Err(cancelled());
                }
                let g = seg.build_graph(spec);
                (seg, g)
            }
            None => {
                // extend the largest source's graph with the others' vectors
                let base = &sources[0];
                let Some(SegGraph::Own(g)) = base.graph.get() else {
                    return Err(IndexError::BadInput(
                        "extending needs an own HNSW graph".into(),
                    ));
                };
                let mut parts = base.parts.clone();
                let mut entries = base.entries.clone();
                for s in &sources[1..] {
                    parts.extend(s.parts.iter().copied());
                    entries.extend(s.entries.iter().cloned());
                }
                let more = flat(&entries[base.entries.len()..]);
                if cancel.load(Ordering::Relaxed) {
                    return Err(cancelled());
                }
                // grown in a scratch file: the largest graph is not copied into memory
                let grown = g.extend_in(&more, spec.threads, Some(dir));
                // the sources' postings, one after the other (their rows numbered on)
                let inputs = source_postings(sources);
                let post = format!("seg-{id}.post");
                files.push((tmp(&post), dir.join(&post)));
                let postings = crate::postings::SegPostings::write(&tmp(&post), &inputs)?;
                let seg = Segment::with_parts(id, parts, entries, postings);
                (seg, SegGraph::Own(grown))
            }
        };
        if cancel.load(Ordering::Relaxed) {
            return Err(cancelled());
        }
        let name = format!("seg-{id}.hnsw");
        let graph = super::seal::persist_graph(&tmp(&name), graph, &segment.entries, &spec)
            .map_err(|(e, _)| e)?;
        files.push((tmp(&name), dir.join(&name)));
        segment.set_graph(graph);
        Ok((Arc::new(segment), compact))
    })();
    match result {
        Ok((segment, compacted)) => Ok(Merged {
            segment,
            files,
            compacted,
        }),
        Err(e) => {
            for (t, _) in &files {
                let _ = std::fs::remove_file(t);
            }
            Err(e)
        }
    }
}

/// The sources' postings, in order.
fn source_postings(sources: &[Arc<Segment>]) -> Vec<&dyn crate::postings::PostingsInput> {
    sources
        .iter()
        .map(|s| s.postings.as_ref() as &dyn crate::postings::PostingsInput)
        .collect()
}

/// Background work yields to queries: the calling thread gets a lower scheduling priority.
pub(super) fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take plain integers and only affect this thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}
