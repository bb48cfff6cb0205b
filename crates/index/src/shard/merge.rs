//! Background merges under a tiered policy, so a shard of N chunks holds O(log N) segments.
//!
//! Policy: segments (with their graphs built) sorted by live chunks, largest first; the first
//! position j from which the smaller segments together hold at least 1/`merge_ratio` of
//! segment j's live chunks starts a merge of j and everything smaller. In the steady state each
//! segment is more than `merge_ratio` times the next one, so a shard has about
//! log_ratio(N / segment_size) + 1 segments. While merges run, another may run beside them
//! over the other segments, at most 1/[`BESIDE_SHARE`] of the smallest's size (up to
//! [`IndexSettings::max_merges`](super::IndexSettings::max_merges)): the seals an ingest makes during a long merge into the largest segment are
//! folded meanwhile instead of each staying a graph every search walks. Merges beside start
//! only while every sealed segment has its graph, so a bulk ingest (seals outrunning the
//! builds) leaves the cores to the builds. A merge either *extends* (the largest source's graph
//! is copied and the others' vectors inserted into the copy: no data file is rewritten, the new
//! segment lists the sources' data files as its parts) or *compacts* (when a quarter or more of
//! the sources' chunks are dead: the live chunks go into a new data file and a fresh graph).
//!
//! Safety: the work (graph, files) runs on a low-priority thread and writes files under
//! temporary names; the owner commits it (renames, one manifest write: the atomic switch) only
//! if every source is still there. Searches see the sources until the commit and the merged
//! segment after it, never both and never neither; a chunk deleted or replaced meanwhile is
//! dead in either (a compaction's sources forward their rows' deaths to the copies, so the
//! slots can be moved to the copies after the commit, in bounded batches). A crash before the manifest write leaves temporary or
//! unreferenced files, removed at the next open; after it, the sources' obsolete files are.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use super::*;
use crate::segment::GraphSpec;
use tracing::debug;

mod rebind;
mod run;
mod tombstones;

use rebind::REBIND_BUDGET;
pub(super) use rebind::{Rebinding, REBIND_ROOM};
use run::{rename_all, run_merge, Compaction};

/// A merge in progress or done, waiting for its commit.
pub(super) struct MergeJob {
    sources: Vec<u64>,
    /// The sources' chunks, live or dead (what the merge's work is in proportion to).
    chunks: usize,
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
            JobState::Running { handle, .. } => handle.is_finished(),
            JobState::Done(_) => true,
        }
    }

    /// The merged segment, once its thread made it (under a shared borrow: its commit is
    /// prepared beside the searches).
    fn made(&self) -> Option<&Merged> {
        match &self.state {
            JobState::Running { out, .. } => out.get()?.as_ref().ok(),
            JobState::Done(r) => r.as_ref().ok(),
        }
    }

    /// The merge's result (waits for its thread).
    fn result(self) -> (Vec<u64>, Result<Merged, IndexError>) {
        let r = match self.state {
            JobState::Running { handle, out } => {
                let joined = handle.join();
                Arc::try_unwrap(out)
                    .ok()
                    .and_then(OnceLock::into_inner)
                    .filter(|_| joined.is_ok())
                    .unwrap_or_else(|| Err(IndexError::BadInput("merge thread panicked".into())))
            }
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
    /// The merge thread, which leaves its result in `out` as its last step.
    Running {
        handle: std::thread::JoinHandle<()>,
        out: Arc<OnceLock<Result<Merged, IndexError>>>,
    },
    Done(Result<Merged, IndexError>),
}

/// What a merge produced: the segment (graph built) and its files under temporary names.
pub(super) struct Merged {
    segment: Arc<Segment>,
    /// (temporary, final) file names, data files first.
    files: Vec<(PathBuf, PathBuf)>,
    compacted: bool,
    /// A compaction's positions whose chunk's deaths are not forwarded from its older copy
    /// (one read into memory from an older file format): the commit checks them by their slots.
    unforwarded: Vec<usize>,
    /// Whether the files were renamed to their final names ahead of the commit
    /// ([`ShardIndex::prepare_merge_commit`]).
    in_place: AtomicBool,
}

/// Share of dead chunks from which a merge compacts instead of extending.
const COMPACT_DEAD_SHARE: f64 = 0.25;
/// An idle shard merges once the smaller segments hold 1/(this x `merge_ratio`) of a larger
/// one's live chunks (1/1,024 with the default ratio of 16): a small graph beside a large one
/// costs a search most of its nodes (a walk of 6,144 beside 993,280 took a third of the large
/// one's time), so an idle shard folds what came since its last merge into its largest segment.
/// Extending that segment copies its graph, so a chunk costs at most this x `merge_ratio`
/// graph rows copied (~0.5 MB at 384 dimensions), and a trickle of writes folds once every
/// 1/1,024 of the shard rather than at every idle seal.
const IDLE_MERGE_FACTOR: usize = 64;
/// Share of dead chunks from which a segment is compacted on its own.
const COMPACT_ALONE_SHARE: f64 = 0.5;
/// A merge beside running ones takes at most 1/this of the smallest's chunks: it folds the
/// small segments the larger ones leave behind, and never makes two large merges share the
/// cores, the disk and the memory of their copies.
pub(super) const BESIDE_SHARE: usize = 4;

/// Chunks merged away after which a shard has the allocator give its free memory back (see
/// [`ShardIndex::give_back_due`]): ~64 MB or more of chunks, maps and graphs, so that the
/// arenas' walk (a few ms, each arena locked in turn) is paid after large merges only.
pub(super) const GIVE_BACK_AFTER_CHUNKS: usize = 65_536;

impl ShardIndex {
    /// Commits a finished merge, then starts the next one the policy asks for. Called after
    /// every seal and periodically by the shard's owner; with `background: false` the merges
    /// run here, to the end. Returns whether the segment set changed.
    pub fn maintain(&mut self) -> Result<bool, IndexError> {
        let mut older = Vec::with_capacity(REBIND_ROOM);
        let r = self.maintain_keeping(&mut older);
        drop(older);
        if std::mem::take(&mut self.prune_due) {
            self.prune_tombstones();
        }
        drop(self.take_to_free());
        // after large merges, the memory their threads freed is given back (see
        // SharedShard::maintain, which does the same outside its lock)
        if self.give_back_due() {
            crate::allocator::give_back();
        }
        r
    }

    /// [`ShardIndex::maintain`], leaving what it let go of to [`ShardIndex::take_to_free`]
    /// (a shared index frees it after letting the searches back in).
    /// The older copies of the slots it moves go onto `older`, at most to its capacity in the
    /// background (none is asked of the allocator under the lock: see [`REBIND_ROOM`]).
    fn maintain_keeping(&mut self, older: &mut Vec<Arc<Entry>>) -> Result<bool, IndexError> {
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
        self.merges_keeping(older)
    }

    /// [`ShardIndex::maintain_keeping`] without the idle seal: a batch of slots moved, a
    /// finished merge committed, the next started (a shared index seals in halves itself,
    /// never under its lock).
    pub(super) fn merges_keeping(
        &mut self,
        older: &mut Vec<Arc<Entry>>,
    ) -> Result<bool, IndexError> {
        let started = std::time::Instant::now();
        self.rebind_some(older);
        let rebind_ms = started.elapsed().as_secs_f64() * 1e3;
        let r = self.commit_and_start();
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if ms >= 2.0 * REBIND_BUDGET.as_secs_f64() * 1e3 {
            debug!(dir = %self.dir.display(), ms, rebind_ms, "a long maintenance pass");
        }
        r
    }

    /// Commits a finished merge and starts the next ones the policy asks for.
    fn commit_and_start(&mut self) -> Result<bool, IndexError> {
        let mut changed = false;
        for round in 0..64 {
            // in the background, one commit a pass: the other's is prepared beside the
            // searches before the next pass commits it
            let next = if round == 0 || !self.settings.background {
                self.next_to_commit()
            } else {
                None
            };
            if let Some(at) = next {
                let job = self.merges.remove(at);
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
            }
            if !self.start_merge() {
                return Ok(changed);
            }
        }
        Ok(changed)
    }

    /// Whether a merge finished and waits for its commit (the next [`ShardIndex::maintain`]).
    pub fn merge_finished(&self) -> bool {
        self.merges.iter().any(MergeJob::finished)
    }

    /// The finished merge to commit next: the one whose commit was prepared, if any, else
    /// the first that finished.
    fn next_to_commit(&self) -> Option<usize> {
        let prepared = |j: &MergeJob| {
            j.finished() && j.made().is_some_and(|m| m.in_place.load(Ordering::Acquire))
        };
        self.merges
            .iter()
            .position(prepared)
            .or_else(|| self.merges.iter().position(MergeJob::finished))
    }

    /// How the merges were committed since the open.
    pub fn merge_commits(&self) -> MergeCommits {
        self.merge_commits
    }

    /// Whether a merge is running or waiting for its commit.
    pub fn merging(&self) -> bool {
        !self.merges.is_empty()
    }

    /// Merges running or waiting for their commits.
    pub fn merges_running(&self) -> usize {
        self.merges.len()
    }

    /// Merged-away segments whose memory and files a background thread is still giving back
    /// (a bench waits for none before it measures the process's memory or its files).
    pub fn segments_being_freed(&self) -> usize {
        self.freeing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the segments merged away since the allocator last gave its free memory back
    /// hold [`GIVE_BACK_AFTER_CHUNKS`] or more chunks and are all freed: their chunks, maps,
    /// graphs and the merges' buffers were freed on several threads, and glibc keeps what each
    /// thread's arena freed for its next requests (`bench shard --sizes 1000000`: ~0.13-0.2 GB
    /// a million chunks). True once: the count starts again.
    pub fn give_back_due(&self) -> bool {
        if !self.give_back_pending() {
            return false;
        }
        self.freed_since_give_back.store(0, Ordering::Relaxed);
        true
    }

    /// [`ShardIndex::give_back_due`] without starting the count again.
    fn give_back_pending(&self) -> bool {
        self.freed_since_give_back.load(Ordering::Relaxed) >= GIVE_BACK_AFTER_CHUNKS
            && self.segments_being_freed() == 0
    }

    /// Whether [`ShardIndex::maintain`] has something to do now (cheap: the owner polls it under
    /// a read lock and takes the write lock only when it says yes).
    pub fn needs_maintenance(&self) -> bool {
        if self.idle_seal_due()
            || !self.rebinding.is_empty()
            || self.prune_due
            || self.give_back_pending()
        {
            return true;
        }
        self.merge_finished()
            || (self.merges.len() < self.max_merges() && self.planned_at != self.plan_key())
    }

    /// Merges that may run at a time ([`IndexSettings::max_merges`], at least 1).
    fn max_merges(&self) -> usize {
        self.settings.max_merges.max(1)
    }

    /// Whether no write came for [`IndexSettings::seal_idle`].
    fn idle(&self) -> bool {
        self.settings
            .seal_idle
            .is_some_and(|idle| self.last_write.elapsed() >= idle)
    }

    /// Whether the growing segment should be sealed for want of writes (see
    /// [`IndexSettings::seal_idle`]).
    pub(super) fn idle_seal_due(&self) -> bool {
        self.idle() && self.growing.len() >= IDLE_SEAL_MIN_CHUNKS
    }

    fn plan_key(&self) -> (u64, u64, bool) {
        (
            self.generation,
            self.graphs_done.load(Ordering::Acquire),
            self.idle(),
        )
    }

    /// Picks the next merge among the segments not in `busy` (those of the running merges),
    /// of at most `cap` chunks; None when the segments are in shape.
    fn plan_merge(&self, busy: &[u64], cap: Option<usize>) -> Option<(Vec<Arc<Segment>>, bool)> {
        let live = |e: &Entry| self.is_live(e);
        let within = |set: &[(usize, Arc<Segment>)]| {
            cap.is_none_or(|c| set.iter().map(|(_, s)| s.entries.len()).sum::<usize>() <= c)
        };
        let mut segs: Vec<(usize, Arc<Segment>)> = self
            .sealed
            .iter()
            .filter(|s| s.graph.get().is_some() && !busy.contains(&s.id))
            .map(|s| (s.live_count(&live), s.clone()))
            .collect();
        segs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
        // an idle shard merges its small segments into the larger ones far sooner (the segment
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
            if rest * ratio >= segs[j].0 && within(&segs[j..]) {
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
                    && cap.is_none_or(|c| s.entries.len() <= c)
            })
            .map(|(_, s)| (vec![s.clone()], true))
    }

    /// Starts the merge the policy picks (running it to the end when not in the background):
    /// beside running ones, a small one of the others' segments, if any.
    fn start_merge(&mut self) -> bool {
        if self.merges.len() >= self.max_merges() {
            return false;
        }
        self.planned_at = self.plan_key();
        // beside running merges, only once every sealed segment has its graph: while seals
        // outrun the graph builds (a bulk ingest) the cores go to the builds, and merges beside
        // would only copy what the next large merge copies again (the policy runs again as a
        // graph is done)
        if !self.merges.is_empty() && self.sealed.iter().any(|s| s.graph.get().is_none()) {
            return false;
        }
        let t = std::time::Instant::now();
        let busy: Vec<u64> = self
            .merges
            .iter()
            .flat_map(|j| j.sources.iter().copied())
            .collect();
        let cap = self.merges.iter().map(|j| j.chunks / BESIDE_SHARE).min();
        let planned = self.plan_merge(&busy, cap);
        let plan_ms = t.elapsed().as_secs_f64() * 1e3;
        let Some((sources, compact)) = planned else {
            return false;
        };
        let id = self.next_segment_id;
        self.next_segment_id += 1;
        let live = |e: &Entry| self.is_live(e);
        // compaction snapshots which of each source's positions are live now (a whole data
        // file's from its marks, without visiting its chunks); a chunk that dies later dies in
        // the merged segment too, its death forwarded from its older copy
        let entries: Option<Compaction> = compact.then(|| Compaction {
            keep: sources.iter().map(|s| s.live_positions(&live)).collect(),
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
                crate::priority::background();
            }
            run_merge(&dir, id, nonce, &job_sources, entries, spec, &stop)
        };
        let ids: Vec<u64> = sources.iter().map(|s| s.id).collect();
        let chunks = sources.iter().map(|s| s.entries.len()).sum();
        let beside = self.merges.len();
        self.merge_commits.beside += u64::from(beside > 0);
        info!(dir = %self.dir.display(), segment = id, sources = ?ids, chunks, beside, compact, plan_ms, snapshot_ms = t.elapsed().as_secs_f64() * 1e3 - plan_ms, "merge started");
        let state = if background {
            let out = Arc::new(OnceLock::new());
            let put = Arc::clone(&out);
            match std::thread::Builder::new()
                .name(format!("merge-{}", seal::seg_id_for_name(&self.dir)))
                .spawn(move || {
                    let _ = put.set(work());
                }) {
                Ok(handle) => JobState::Running { handle, out },
                Err(e) => JobState::Done(Err(IndexError::io(&self.dir, e))),
            }
        } else {
            JobState::Done(work())
        };
        self.merges.push(MergeJob {
            sources: ids,
            chunks,
            state,
            _cancel: CancelOnDrop(cancel),
        });
        true
    }

    /// Prepares the commit of a finished merge under a shared borrow, beside the searches
    /// (the caller is the only writer, so nothing changes the segments before the commit):
    /// its files renamed to their final names (unlisted until the manifest lists them: a
    /// crash before that leaves them to the next open to remove) and the manifest the commit
    /// will write written ahead, so the commit holds the index for the switch alone. Nothing
    /// when no merge waits or a source is gone (the commit drops it).
    pub fn prepare_merge_commit(&self) -> Result<(), IndexError> {
        let Some(job) = self.next_to_commit().map(|at| &self.merges[at]) else {
            return Ok(());
        };
        let Some(merged) = job.made() else {
            return Ok(());
        };
        let Some(at) = self.merged_position(&job.sources) else {
            return Ok(());
        };
        if !merged.in_place.load(Ordering::Acquire) {
            rename_all(&merged.files)?;
            crate::files::sync_dir(&self.dir);
            merged.in_place.store(true, Ordering::Release);
        }
        let mut metas: Vec<SegmentMeta> = self
            .sealed
            .iter()
            .filter(|s| !job.sources.contains(&s.id))
            .map(|s| SegmentMeta::of(s))
            .collect();
        metas.insert(at.min(metas.len()), SegmentMeta::of(&merged.segment));
        self.write_manifest_ahead(self.sealed_seq, metas.into_iter(), self.next_segment_id)
    }

    /// Where the merged segment goes among the sealed ones (the first source's place), None
    /// when a source is gone.
    fn merged_position(&self, sources: &[u64]) -> Option<usize> {
        let present = |id: &u64| self.sealed.iter().any(|s| s.id == *id);
        if !sources.iter().all(present) {
            return None;
        }
        self.sealed.iter().position(|s| sources.contains(&s.id))
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
            let in_place = m.in_place.load(Ordering::Acquire);
            for (tmp, path) in &m.files {
                let _ = std::fs::remove_file(if in_place { path } else { tmp });
            }
        };
        let Some(at) = self.merged_position(sources) else {
            discard(&merged);
            return Ok(());
        };
        let started = std::time::Instant::now();
        let ms = |since: std::time::Instant| since.elapsed().as_secs_f64() * 1e3;
        let prepared = merged.in_place.load(Ordering::Acquire);
        if !prepared {
            if let Err(e) = rename_all(&merged.files) {
                discard(&merged);
                return Err(e);
            }
            crate::files::sync_dir(&self.dir);
        }
        let before = self.sealed.clone();
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
        self.merge_commits.all += 1;
        self.merge_commits.prepared += u64::from(prepared);
        let t = std::time::Instant::now();
        if merged.compacted {
            // the live chunks' slots move to the new file, so that the sources' maps are let
            // go: a bounded batch per maintenance pass from now on, as the chunks' deaths are
            // forwarded to the new copies (only copies of chunks read into memory are checked
            // now). A compacted source's own pending rebinding is dropped: this one covers its
            // chunks (slots are matched by sequence number and chunk id)
            let unforwarded: Vec<Arc<Entry>> = merged
                .unforwarded
                .iter()
                .filter_map(|&i| merged.segment.entries.get(i).cloned())
                .collect();
            self.rebind(&unforwarded);
            self.rebinding.retain(|r| !sources.contains(&r.segment.id));
            self.rebinding.push_back(Rebinding {
                segment: merged.segment.clone(),
                at: 0,
            });
        }
        let rebound_ms = ms(t);
        let t = std::time::Instant::now();
        if merged.compacted && self.pruning_pays(&before, sources, &merged.segment) {
            // only a compaction drops chunks (an extension keeps every chunk of its sources);
            // after the manifest, so that this commit does not also rewrite the deletion
            // records (their file keeps the pruned ones until the next manifest write: a
            // tombstone without an older copy to mark is harmless); the new copies of chunks
            // that died during the merge are dead already (forwarded), so their tombstones
            // stay. Left to the maintenance that follows: a shared index finds which to keep
            // beside the searches (~10 ms at a million chunks)
            self.prune_due = true;
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
        self.freed_since_give_back.fetch_add(
            retired.iter().map(|s| s.entries.len()).sum(),
            Ordering::Relaxed,
        );
        if self.settings.background {
            let freeing = Arc::clone(&self.freeing);
            freeing.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new()
                .name("merge-free".into())
                .spawn(move || {
                    // it would otherwise inherit the short slice of the lock holder that
                    // spawned it, and take a core from the searches and the next holder
                    crate::priority::background();
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
}

#[cfg(test)]
mod tests {
    use super::super::test_model as model;
    use super::*;
    use ragfleet_proto::ChunkRecord;

    fn doc(i: usize, text: &str, version: u64) -> WriteOp {
        WriteOp::Upsert {
            version,
            doc_id: format!("d{i}"),
            chunks: vec![ChunkRecord {
                doc_id: format!("d{i}"),
                chunk_id: format!("d{i}#0"),
                text: text.into(),
                vector: vector(i),
                sentences: Default::default(),
            }],
        }
    }

    /// Distinct directions (near-equal ones tie in the graph's int8 codes).
    fn vector(i: usize) -> Vec<f32> {
        let (a, b) = (i as f32 * 0.7, i as f32 * 1.3);
        vec![a.cos(), a.sin(), b.cos(), b.sin()]
    }

    /// Every live document found once, with its text; no dead one found; each sealed chunk
    /// dead by its mark exactly when its document's sequence number says so.
    fn check(ix: &ShardIndex, live: &[(usize, &str)], stage: &str) {
        let q = SearchQuery {
            vector: vec![1.0, 1.0, 0.5, -1.0],
            text: String::new(),
            k: 1000,
            mode: SearchMode::Dense,
            model: Some(model()),
        };
        let mut got: Vec<(String, String)> = ix
            .search(&q)
            .unwrap()
            .into_iter()
            .map(|h| (h.doc_id, h.text))
            .collect();
        got.sort();
        let mut want: Vec<(String, String)> = live
            .iter()
            .map(|(i, t)| (format!("d{i}"), t.to_string()))
            .collect();
        want.sort();
        assert_eq!(got, want, "{stage}");
        for s in &ix.sealed {
            for e in &s.entries {
                assert_eq!(
                    ix.is_live(e),
                    ix.live_by_seq(e),
                    "{stage}: {}",
                    e.chunk_id()
                );
            }
        }
    }

    /// A shard whose postings files are of the first format (as written before the tiers were
    /// stored) answers exactly as its twin whose files store them, its long lists split in
    /// memory; the merge that rewrites such a file stores their tiers, and the twins still
    /// answer alike, score for score.
    #[test]
    fn first_format_postings_answer_alike_and_a_merge_stores_their_tiers() {
        use crate::postings::SegPostings;
        let settings = IndexSettings {
            segment_size: 4096,
            background: false,
            ..IndexSettings::default()
        };
        // `c` in every chunk, twice in one of eight (a long list that is split)
        let text = |i: usize| {
            let c = if i.is_multiple_of(8) { "c c" } else { "c" };
            format!("w{} v{} {c}", i % 97, i % 13)
        };
        let write = |ix: &mut ShardIndex, range: std::ops::Range<usize>| {
            let ops: Vec<WriteOp> = range.map(|i| doc(i, &text(i), 1)).collect();
            for batch in ops.chunks(1024) {
                ix.write(batch.to_vec(), &model()).unwrap();
            }
            ix.seal().unwrap();
            while ix.maintain().unwrap() {}
        };
        let answers = |ix: &ShardIndex| -> Vec<Vec<(String, u32)>> {
            ["c", "c w5", "c v3 w7", "w11 v2 c"]
                .iter()
                .map(|q| {
                    let q = SearchQuery {
                        vector: vector(0),
                        text: q.to_string(),
                        k: 10,
                        mode: SearchMode::Bm25,
                        model: Some(model()),
                    };
                    let hits = ix.search(&q).unwrap();
                    hits.into_iter()
                        .map(|h| (h.doc_id, h.score.to_bits()))
                        .collect()
                })
                .collect()
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for dir in [&a, &b] {
            let (mut ix, _) = ShardIndex::open(dir.path(), settings.clone()).unwrap();
            write(&mut ix, 0..8192);
            assert_eq!(ix.sealed.len(), 1, "one segment of 8,192");
        }
        // the second twin's postings files rewritten in the first format
        let mut rewritten = 0;
        for e in std::fs::read_dir(b.path()).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "post") {
                let p = SegPostings::open(&path, 8192).unwrap().unwrap();
                assert!(p.stores_tiers());
                SegPostings::write_first_format(&path, &[p.as_ref()]).unwrap();
                rewritten += 1;
            }
        }
        assert_eq!(rewritten, 1);
        let (mut ia, _) = ShardIndex::open(a.path(), settings.clone()).unwrap();
        let (mut ib, _) = ShardIndex::open(b.path(), settings.clone()).unwrap();
        let first = &ib.sealed[0].postings;
        assert!(!first.stores_tiers() && ia.sealed[0].postings.stores_tiers());
        assert!(first.find("c").unwrap().hi.is_some(), "split in memory");
        assert!(first.memory_bytes() > 0 && ia.sealed[0].postings.memory_bytes() == 0);
        let before = answers(&ia);
        assert_eq!(before[0].len(), 10);
        assert_eq!(answers(&ib), before);
        // 600 more (over 1/16 of the segment): merged into it, its postings rewritten
        write(&mut ia, 8192..8792);
        write(&mut ib, 8192..8792);
        assert_eq!(ib.sealed.len(), 1, "merged into one");
        assert!(
            ib.sealed[0].postings.stores_tiers(),
            "the merge stores them"
        );
        assert_eq!(ib.sealed[0].postings.memory_bytes(), 0);
        let after = answers(&ia);
        assert_ne!(after, before, "the statistics moved");
        assert_eq!(answers(&ib), after);
    }

    /// The chunks of merged-away segments are counted; once they reach
    /// GIVE_BACK_AFTER_CHUNKS and every merged-away segment is freed, the shard asks for
    /// maintenance and the allocator's give-back is due, once; a shared shard's maintenance
    /// does it and starts the count again.
    #[test]
    fn the_allocator_gives_back_once_large_merges_are_freed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ix, _, _) = merged_shard(dir.path(), 0);
        write_sealing(&mut ix, 0..8, "old");
        assert_eq!(
            sizes(&ix),
            vec![512],
            "one segment, merged from eight of 64"
        );
        let counted = ix.freed_since_give_back.load(Ordering::Relaxed);
        assert!(counted >= 512, "every first segment merged away: {counted}");
        assert!(!ix.needs_maintenance() && !ix.give_back_due(), "far below");
        // merges past the threshold: given back by the index's own maintenance
        ix.freed_since_give_back
            .store(GIVE_BACK_AFTER_CHUNKS - 600, Ordering::Relaxed);
        write_sealing(&mut ix, 8..16, "new");
        assert_eq!(sizes(&ix), vec![1024]);
        let left = ix.freed_since_give_back.load(Ordering::Relaxed);
        assert!(
            left < GIVE_BACK_AFTER_CHUNKS - 600,
            "given back on the way, the count started again: {left}"
        );
        assert!(!ix.needs_maintenance(), "not asked again");
        // a merge's sources still being freed on another thread: not yet
        ix.freed_since_give_back
            .store(GIVE_BACK_AFTER_CHUNKS, Ordering::Relaxed);
        ix.freeing.fetch_add(1, Ordering::SeqCst);
        assert!(!ix.needs_maintenance() && !ix.give_back_due());
        ix.freeing.fetch_sub(1, Ordering::SeqCst);
        assert!(ix.needs_maintenance(), "due once they are freed");
        let shared = SharedShard::new(ix);
        shared.maintain().unwrap();
        let ix = shared.read();
        assert_eq!(ix.freed_since_give_back.load(Ordering::Relaxed), 0);
        assert!(!ix.needs_maintenance() && !ix.give_back_due(), "done, once");
    }

    /// Writes the 64 documents of each batch in `batches` (document `64 * b + j`, `text`,
    /// version 1), each a 64-chunk seal, maintaining the index to the end after each.
    fn write_sealing(ix: &mut ShardIndex, batches: std::ops::Range<usize>, text: &str) {
        for b in batches {
            ix.write(
                (b * 64..b * 64 + 64).map(|i| doc(i, text, 1)).collect(),
                &model(),
            )
            .unwrap();
            while ix.maintain().unwrap() {}
        }
    }

    /// A shard of 64-chunk segments merging in the foreground, `n` documents written ("old")
    /// and merged: (it, its settings, the live documents).
    fn merged_shard(
        dir: &std::path::Path,
        n: usize,
    ) -> (ShardIndex, IndexSettings, Vec<(usize, &'static str)>) {
        let settings = IndexSettings {
            segment_size: 64,
            background: false,
            ..IndexSettings::default()
        };
        let (mut ix, _) = ShardIndex::open(dir, settings.clone()).unwrap();
        ix.write((0..n).map(|i| doc(i, "old", 1)).collect(), &model())
            .unwrap();
        while ix.maintain().unwrap() {}
        (ix, settings, (0..n).map(|i| (i, "old")).collect())
    }

    /// Puts a long merge of segment `source` (`chunks` chunks) among `ix`'s running ones: a
    /// thread that fails it once told to (a stand-in for the merge thread).
    fn hold_a_merge(
        ix: &mut ShardIndex,
        source: u64,
        chunks: usize,
    ) -> std::sync::mpsc::Sender<()> {
        let (tell, told) = std::sync::mpsc::channel::<()>();
        let out: Arc<OnceLock<Result<Merged, IndexError>>> = Arc::new(OnceLock::new());
        let put = out.clone();
        let handle = std::thread::spawn(move || {
            let _ = told.recv();
            let _ = put.set(Err(IndexError::BadInput("stopped".into())));
        });
        ix.merges.push(MergeJob {
            sources: vec![source],
            chunks,
            state: JobState::Running { handle, out },
            _cancel: CancelOnDrop(Arc::new(AtomicBool::new(false))),
        });
        tell
    }

    /// Lets the held merge fail and waits until it has.
    fn release_the_merge(ix: &ShardIndex, tell: std::sync::mpsc::Sender<()>) {
        tell.send(()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !ix.merge_finished() {
            assert!(std::time::Instant::now() < deadline, "the long merge ends");
            std::thread::yield_now();
        }
    }

    fn sizes(ix: &ShardIndex) -> Vec<usize> {
        let mut sizes: Vec<usize> = ix.sealed.iter().map(|s| s.entries.len()).collect();
        sizes.sort_unstable();
        sizes
    }

    /// While a merge of the largest segment runs, the seals that come meanwhile are folded by
    /// merges beside it, each at most 1/BESIDE_SHARE of its chunks, and every document is
    /// found once throughout; once it ends (here: it fails, its sources staying), the policy
    /// folds everything into one, and so after a reopen.
    #[test]
    fn seals_during_a_long_merge_are_folded_by_small_merges_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ix, settings, mut live) = merged_shard(dir.path(), 512);
        assert_eq!(ix.sealed.len(), 1, "one segment of 512");
        let large = ix.sealed[0].id;
        let tell = hold_a_merge(&mut ix, large, 512);
        // six seals of 64 come meanwhile (a write seals the growing segment once it is full)
        for i in 512..512 + 6 * 64 {
            ix.write(vec![doc(i, "new", 1)], &model()).unwrap();
            live.push((i, "new"));
            if i % 64 == 63 {
                while ix.maintain().unwrap() {}
                check(&ix, &live, "beside the long merge");
            }
        }
        assert_eq!(ix.merges_running(), 1, "the long merge still runs");
        assert_eq!(ix.sealed.iter().filter(|s| s.id == large).count(), 1);
        // the six folded beside it, in merges of at most a quarter of its chunks (128): two
        // of the six, then the fourth and fifth, then the last two
        assert_eq!(sizes(&ix), vec![128, 128, 128, 512]);
        assert_eq!(ix.merge_commits().beside, 3, "{:?}", ix.merge_commits());
        release_the_merge(&ix, tell);
        // its failure leaves its source (the pass that meets it starts nothing); the next
        // pass folds the four into one
        assert!(!ix.maintain().unwrap());
        assert!(!ix.merging());
        check(&ix, &live, "after the long merge failed");
        while ix.maintain().unwrap() {}
        let sizes: Vec<usize> = ix.sealed.iter().map(|s| s.entries.len()).collect();
        assert_eq!(sizes, vec![512 + 6 * 64]);
        check(&ix, &live, "folded");
        drop(ix);
        let (ix, rep) = ShardIndex::open(dir.path(), settings).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        check(&ix, &live, "reopened");
    }

    /// `max_merges` bounds the merges at a time, and a merge beside running ones waits until
    /// every sealed segment has its graph (in a bulk ingest the seals outrun the builds: the
    /// cores go to those); once the graph is there the policy folds the small segments beside
    /// the long merge.
    #[test]
    fn merges_beside_wait_for_every_graph_and_stay_within_max_merges() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ix, settings, mut live) = merged_shard(dir.path(), 512);
        let large = ix.sealed[0].id;
        let tell = hold_a_merge(&mut ix, large, 512);
        ix.settings.max_merges = 1;
        for i in 512..512 + 3 * 64 {
            ix.write(vec![doc(i, "new", 1)], &model()).unwrap();
            live.push((i, "new"));
        }
        while ix.maintain().unwrap() {}
        check(&ix, &live, "one merge at a time");
        assert_eq!(sizes(&ix), vec![64, 64, 64, 512], "nothing merged beside");
        assert_eq!(ix.merge_commits().beside, 0);
        assert!(!ix.needs_maintenance(), "no room for a merge beside");

        // room for a second, but one small segment's graph is not built yet (as while its
        // build waits in the queue): the same segment, without its graph
        ix.settings.max_merges = 2;
        let at = ix.sealed.iter().position(|s| s.id != large).unwrap();
        let s = ix.sealed[at].clone();
        let bare = Arc::new(Segment::with_parts(
            s.id,
            s.parts.clone(),
            s.entries.clone(),
            s.postings.clone(),
        ));
        ix.sealed[at] = bare.clone();
        drop(s);
        ix.graphs_done.fetch_add(1, Ordering::Release);
        assert!(ix.needs_maintenance(), "the policy runs again");
        assert!(
            !ix.maintain().unwrap(),
            "no merge beside while a graph is missing"
        );
        assert_eq!(sizes(&ix), vec![64, 64, 64, 512]);
        assert_eq!(ix.merges_running(), 1);
        check(&ix, &live, "a segment without its graph");

        // its graph done, two of the small ones merge beside the long one (three would pass
        // a quarter of its chunks)
        bare.set_graph(bare.build_graph(ix.graph_spec()));
        ix.graphs_done.fetch_add(1, Ordering::Release);
        while ix.maintain().unwrap() {}
        assert_eq!(sizes(&ix), vec![64, 128, 512]);
        assert_eq!(ix.merge_commits().beside, 1, "{:?}", ix.merge_commits());
        check(&ix, &live, "folded beside");

        release_the_merge(&ix, tell);
        // its failure leaves its source; the next pass folds the three into one
        assert!(!ix.maintain().unwrap());
        while ix.maintain().unwrap() {}
        assert_eq!(sizes(&ix), vec![512 + 3 * 64]);
        check(&ix, &live, "folded");
        drop(ix);
        let (ix, rep) = ShardIndex::open(dir.path(), settings).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        check(&ix, &live, "reopened");
    }

    /// Deletes document `gone` and replaces `replaced.0` with text `replaced.1` (versions
    /// `version` and `version + 1`), and says so in `live`.
    fn delete_and_replace(
        ix: &mut ShardIndex,
        live: &mut Vec<(usize, &'static str)>,
        gone: usize,
        replaced: (usize, &'static str),
        version: u64,
    ) {
        ix.delete(&[format!("d{gone}")], version).unwrap();
        ix.write(vec![doc(replaced.0, replaced.1, version + 1)], &model())
            .unwrap();
        live.retain(|(j, _)| *j != gone && *j != replaced.0);
        live.push(replaced);
    }

    /// A compaction's copies of chunks that die while it waits for its commit, after its commit
    /// while the slots still hold the older copies, or after they were pointed at the copies,
    /// are dead in the copy; a replaced document's new copy is the one found, and so after a
    /// reopen.
    #[test]
    fn chunks_that_die_during_or_after_a_compaction_stay_dead_in_its_copies() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ix, settings, mut live) = merged_shard(dir.path(), 128);
        // two thirds deleted: a compaction, run here, left waiting for its commit
        let gone: Vec<String> = (0..128)
            .filter(|i| i % 3 != 0)
            .map(|i| format!("d{i}"))
            .collect();
        ix.delete(&gone, 5).unwrap();
        live.retain(|(i, _)| i % 3 == 0);
        assert!(ix.start_merge(), "a compaction starts");
        assert!(ix.merging());
        let before: Vec<u64> = ix.sealed.iter().map(|s| s.id).collect();
        // copied chunks deleted and replaced before the commit
        delete_and_replace(&mut ix, &mut live, 0, (3, "new 3"), 6);
        check(&ix, &live, "before the commit");
        assert!(ix.maintain().unwrap(), "the compaction is committed");
        assert_ne!(ix.sealed.iter().map(|s| s.id).collect::<Vec<_>>(), before);
        let stored: usize = ix.sealed.iter().map(|s| s.entries.len()).sum();
        assert!(stored < 128, "the deleted chunks were dropped: {stored}");
        assert!(ix.chunks_to_rebind() > 0, "the slots are pointed later");
        assert!(ix.needs_maintenance());
        // after the commit, while the slots still hold the older copies
        delete_and_replace(&mut ix, &mut live, 6, (9, "new 9"), 8);
        check(&ix, &live, "before the rebinding");
        // the older copies the slots let go of are handed to whoever frees them (a shared
        // index: after letting the searches back in), not dropped under the lock
        // what a pass reads is read ahead of it: every copy's chunk id and its slot's
        let left = ix.chunks_to_rebind();
        let ids: usize = ix.rebinding[0].segment.entries[ix.rebinding[0].at..]
            .iter()
            .map(|e| 2 * e.chunk_id().len())
            .sum();
        assert!(ix.touch_rebind(left) <= ids && ix.touch_rebind(left) > 0);
        assert_eq!(ix.touch_rebind(0), 0);
        let mut older = Vec::with_capacity(REBIND_ROOM);
        ix.maintain_keeping(&mut older).unwrap();
        assert_eq!(ix.chunks_to_rebind(), 0);
        assert!(!older.is_empty(), "the older copies to free");
        assert_eq!(older.capacity(), REBIND_ROOM, "no larger buffer asked for");
        drop(older);
        ix.maintain().unwrap();
        assert!(
            ix.take_to_free().is_empty(),
            "maintain frees what it let go of"
        );
        // every slot holds its chunk's copy in a current segment's file (or in memory)
        let current: Vec<*const crate::datafile::DataFile> = ix
            .sealed
            .iter()
            .flat_map(|s| s.file_parts())
            .filter_map(|(_, f)| f.map(Arc::as_ptr))
            .collect();
        for e in ix.slots.values() {
            if let Some((file, _)) = e.mapped_at() {
                assert!(current.contains(&Arc::as_ptr(file)), "{}", e.chunk_id());
            }
        }
        ix.delete(&["d12".into()], 10).unwrap();
        live.retain(|(j, _)| *j != 12);
        check(&ix, &live, "after the rebinding");
        drop(ix);
        let (ix, rep) = ShardIndex::open(dir.path(), settings).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        check(&ix, &live, "reopened");
    }
}
