//! Sealing the growing segment, merging small segments, dropping old deletion records, and
//! building graphs on background threads. A failed seal or merge leaves the index as it was.
use super::*;
use crate::postings::{Built, SegPostings};
use crate::segment::{GraphSpec, SegGraph};

/// Gives back a map's room when it fills under half of it (rehashing what is left, in
/// proportion to it; the rule [`ShardIndex::prepare_room`]'s copies follow).
fn shrink_sparse(map: &mut impl super::room::Roomy) {
    if let Some(room) = super::room::shrunk_room(map.len(), map.capacity()) {
        map.shrink_to(room);
    }
}

/// Memory a commit let go of, freed when this is dropped (by whoever took it with
/// [`ShardIndex::take_to_free`]).
#[derive(Default)]
pub struct ToFree(Vec<Box<dyn Send + Sync>>);

impl ToFree {
    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for ToFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ToFree({} items)", self.0.len())
    }
}

/// A seal's files, written and not referred to yet (see [`ShardIndex::prepare_seal`]).
#[derive(Debug)]
pub struct PreparedSeal {
    id: u64,
    seg: Option<Segment>,
    /// The growing segment it was written from: its length and first chunk.
    len: usize,
    first: Option<Arc<Entry>>,
}

impl ShardIndex {
    /// Seals the growing segment: writes it and a new manifest, empties the log, and builds the
    /// segment's graph in the background. Then runs the merge policy ([`ShardIndex::maintain`]).
    /// A failed seal leaves the index as it was (the growing segment searchable, the log
    /// intact); the files it did write are unreferenced and removed. Writes logged and not
    /// applied yet are applied first (the log is emptied).
    pub fn seal(&mut self) -> Result<(), IndexError> {
        self.apply_logged();
        let prepared = self.prepare_seal()?;
        self.commit_seal(prepared)?;
        drop(self.take_to_free());
        self.finish_seal()
    }

    /// What the last commit left to free (see [`ToFree`]): a shared index's writer drops it
    /// after letting the searches back in.
    pub fn take_to_free(&mut self) -> ToFree {
        std::mem::take(&mut self.to_free)
    }

    /// The last step of a seal, under a shared borrow: empties the log, whose writes the
    /// committed manifest holds (the next append does it first if this was not called or
    /// failed; a crash before it replays nothing: the log's records are all at or below the
    /// manifest's last sequence number).
    pub fn finish_seal(&self) -> Result<(), IndexError> {
        self.log_state().reset_if_due()
    }

    /// The first half of a [`seal`](Self::seal), under a shared borrow (searches go on): writes
    /// the growing segment's data and postings files. Nothing refers to them until
    /// [`commit_seal`](Self::commit_seal).
    pub fn prepare_seal(&self) -> Result<PreparedSeal, IndexError> {
        let id = self.next_segment_id;
        let seg = if self.growing.is_empty() {
            None
        } else {
            match self.write_segment(id, &self.growing) {
                Ok(seg) => Some(seg),
                Err(e) => {
                    self.remove_segment_files(id);
                    return Err(e);
                }
            }
        };
        Ok(PreparedSeal {
            id,
            seg,
            len: self.growing.len(),
            first: self.growing.first().cloned(),
        })
    }

    /// The second half of a [`seal`](Self::seal) (exclusive: a few renames and the manifest,
    /// only renamed into place when [`prepare_seal_manifest`](Self::prepare_seal_manifest)
    /// wrote it ahead; the log is emptied after it, by [`finish_seal`](Self::finish_seal)).
    /// When the growing segment changed since `prepared` was written, or writes were logged
    /// meanwhile, the files are dropped and the seal is done whole here.
    pub fn commit_seal(&mut self, prepared: PreparedSeal) -> Result<(), IndexError> {
        let unchanged = prepared.id == self.next_segment_id
            && prepared.len == self.growing.len()
            && match (&prepared.first, self.growing.first()) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
            && !self.log_state().has_queued();
        if !unchanged {
            if prepared.seg.is_some() {
                drop(prepared.seg);
                self.remove_segment_files(prepared.id);
            }
            return self.seal();
        }
        if let Some(seg) = prepared.seg {
            let seg = Arc::new(seg);
            // until its graph is built (in the background, at a lower priority than the
            // searches), the segment is scanned from the codes the growing segment kept
            if let Some(codes) = self.growing.take_codes() {
                seg.scan_codes_until_graph(codes);
            }
            // the chunks' bodies now live in the mapped file, not in memory
            self.rebind(&seg.entries);
            self.next_segment_id += 1;
            // the growing segment's chunks (their owned copies) and its BM25 (in the new
            // segment's postings file now) are freed by the caller, after the lock if it holds
            // one (thousands of allocations)
            self.to_free
                .0
                .push(Box::new(std::mem::take(&mut self.growing)));
            self.to_free
                .0
                .push(Box::new(std::mem::take(&mut self.bm25)));
            self.sealed.push(seg.clone());
            self.spawn_graph(seg, false);
        }
        self.sealed_seq = self.last_seq;
        self.purge_deletions()?;
        self.write_manifest()?;
        // the manifest now holds everything the log does: emptying the log (an fsync) is left
        // to `finish_seal` or to the next append, whichever comes first, so that a shared
        // index's searches do not wait for it
        self.log
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .reset_due = true;
        self.generation += 1;
        // a mass delete leaves the maps at the room their largest size took
        shrink_sparse(&mut self.docs);
        shrink_sparse(&mut self.slots);
        shrink_sparse(&mut self.records);
        if let Err(e) = self.maintain() {
            // the sources stay as they are; a later pass merges them
            warn!(dir = %self.dir.display(), error = %e, "merge failed");
        }
        Ok(())
    }

    /// Drops deletion records older than the grace period (before the manifest that no longer
    /// lists them is written, the new horizon is durable).
    pub(super) fn purge_deletions(&mut self) -> Result<(), IndexError> {
        let Some(horizon) = self.purge_due() else {
            return Ok(());
        };
        let horizon = horizon.max(self.purged_below);
        let bytes =
            postcard::to_stdvec(&horizon).map_err(|e| IndexError::BadInput(e.to_string()))?;
        write_checked(&self.dir.join("purged.bin"), &bytes)?;
        self.purged_below = horizon;
        let before = self.records.deleted_count();
        let dropped = self
            .records
            .deletions()
            .filter(|&(_, v)| v < horizon)
            .count();
        self.deletions_log.touched_many(
            dropped,
            self.records
                .deletions()
                .filter(|&(_, v)| v < horizon)
                .map(|(d, _)| d),
        );
        // the records dropped leave the digests (a record counts while its document is not live)
        for (d, v) in self.records.deletions() {
            if v < horizon && !self.docs.contains_key(d) {
                let gone = ragfleet_proto::entry_hash(d, v, false);
                self.digests.change(d, gone, 0);
            }
        }
        self.records.retain_deleted(|v| v >= horizon);
        info!(
            dropped = before - self.records.deleted_count(),
            "deletion records past the grace period dropped"
        );
        Ok(())
    }

    /// The grace horizon, when some deletion records are past it (the next seal drops them).
    fn purge_due(&self) -> Option<u64> {
        let horizon = self.grace_horizon()?;
        self.records
            .deletions()
            .any(|(_, v)| v < horizon)
            .then_some(horizon)
    }

    /// The version (a time in microseconds) below which deletion records are past the grace
    /// period; None when they are kept for ever.
    pub(super) fn grace_horizon(&self) -> Option<u64> {
        let grace = self.settings.deletion_grace?;
        Some(ragfleet_proto::clock_micros().saturating_sub(grace.as_micros() as u64))
    }

    /// Removes a segment's files (best effort: unreferenced files are garbage, not data).
    pub(super) fn remove_segment_files(&self, id: u64) {
        for p in [
            self.segment_path(id),
            self.postings_path(id),
            Self::graph_path(&self.dir, id),
        ] {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Writes chunks as segment `id`'s data file (format 3) and BM25 postings; gives the
    /// segment read back from its mapped files.
    pub(super) fn write_segment(
        &self,
        id: u64,
        entries: &[Arc<Entry>],
    ) -> Result<Segment, IndexError> {
        write_part(
            &self.segment_path(id),
            &self.postings_path(id),
            id,
            entries,
            |post| {
                let built = Built::of(entries.iter().map(|e| e.text()));
                SegPostings::write(post, &[&built])
            },
        )
    }

    /// Points the live chunks' slots at these copies of them (the same chunks, now read from a
    /// mapped file), so the copies they replace (in memory, or in a file a merge made obsolete)
    /// are let go; the copies of chunks that died meanwhile are counted dead in their file.
    pub(super) fn rebind(&mut self, entries: &[Arc<Entry>]) {
        // the older copies are let go of by whoever takes `to_free`, after the lock if it holds
        // one: the last copy of a merged-away data file unmaps it, and an unlinked file's pages
        // and blocks are freed then (a pass over 13,000 slots at 1M held the searches ~25 ms)
        let mut older = Vec::new();
        self.rebind_into(entries, &mut older);
        if !older.is_empty() {
            self.to_free.0.push(Box::new(older));
        }
    }

    /// [`ShardIndex::rebind`], the older copies pushed onto `older` (for the caller to free).
    pub(super) fn rebind_into(&mut self, entries: &[Arc<Entry>], older: &mut Vec<Arc<Entry>>) {
        for e in entries {
            // the copy carries the slot its original had when it was written
            let cur = e.slot().and_then(|slot| self.slots.get_mut(&slot));
            match cur {
                Some(cur) if cur.seq == e.seq && cur.chunk_id() == e.chunk_id() => {
                    older.push(std::mem::replace(cur, e.clone()));
                }
                _ => e.mark_dead(),
            }
        }
    }

    /// Writes the manifest, and before it what changed in the deletion records (see
    /// [`deletions`]); the files the new chain no longer needs are removed after it.
    pub(super) fn write_manifest(&mut self) -> Result<(), IndexError> {
        let ahead = self
            .deletions_ahead
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let written = match ahead {
            // written ahead, and nothing changed since
            Some((at, w)) if at == self.deletions_log.changes() => w,
            other => {
                if let Some((_, w)) = other {
                    w.abandon();
                }
                self.deletions_log.write(&self.dir, &self.records)?
            }
        };
        // what the sealed segments hold: a merge commits between seals, while the growing
        // segment's writes are in the log only
        let bytes = self.manifest_bytes(
            self.sealed_seq,
            self.sealed_metas(),
            written.head(),
            self.next_segment_id,
        )?;
        let ahead = self
            .manifest_ahead
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let ahead_path = self.dir.join(MANIFEST_AHEAD);
        let r = if ahead.is_some_and(|a| a == bytes) {
            // written and fsynced ahead, byte for byte this one: only the rename is left (and
            // the folder's fsync, for which the log's reset waits)
            std::fs::rename(&ahead_path, self.dir.join(MANIFEST))
                .map_err(|e| IndexError::io(&ahead_path, e))
                .map(|()| {
                    if written.superseded_none() {
                        self.log
                            .get_mut()
                            .unwrap_or_else(|e| e.into_inner())
                            .dir_sync_due = true;
                    } else {
                        // files are removed once this manifest is durable
                        crate::files::sync_dir(&self.dir);
                    }
                })
        } else {
            let _ = std::fs::remove_file(&ahead_path);
            write_checked(&self.dir.join(MANIFEST), &bytes)
        };
        if let Err(e) = r {
            written.abandon();
            return Err(e);
        }
        self.deletions_log.written(written);
        // the earlier formats' manifests, if any, are superseded
        let _ = std::fs::remove_file(self.dir.join(MANIFEST_V2));
        let _ = std::fs::remove_file(self.dir.join(MANIFEST_V1));
        Ok(())
    }

    /// The sealed segments as a manifest lists them.
    fn sealed_metas(&self) -> impl Iterator<Item = SegmentMeta> + '_ {
        self.sealed.iter().map(|s| SegmentMeta::of(s))
    }

    /// The manifest's bytes for these segments and this state.
    fn manifest_bytes(
        &self,
        last_seq: u64,
        segments: impl Iterator<Item = SegmentMeta>,
        deletions: u64,
        next_segment_id: u64,
    ) -> Result<Vec<u8>, IndexError> {
        let m = Manifest {
            last_seq,
            segments: segments.collect(),
            deletions,
            model: self.model.clone(),
            next_segment_id,
        };
        postcard::to_stdvec(&m).map_err(|e| IndexError::BadInput(e.to_string()))
    }

    /// Writes the manifest that committing `prepared` will write, ahead of the commit and under
    /// a shared borrow (searches go on while it is fsynced): the commit then only renames it
    /// into place, if its bytes are still what it would write (nothing applied, sealed, merged
    /// or deleted in between: the caller is the only writer), and writes its own otherwise.
    /// Nothing when deletion records are pending and not written ahead
    /// ([`prepare_deletions`](Self::prepare_deletions) first), or due to be dropped.
    pub fn prepare_seal_manifest(&self, prepared: &PreparedSeal) -> Result<(), IndexError> {
        if self.purge_due().is_some() || self.log_state().has_queued() {
            return Ok(());
        }
        let new = prepared.seg.as_ref().map(|_| SegmentMeta {
            id: prepared.id,
            parts: vec![prepared.id],
        });
        self.write_manifest_ahead(
            self.last_seq,
            self.sealed_metas().chain(new),
            self.next_segment_id + u64::from(prepared.seg.is_some()),
        )
    }

    /// Writes and fsyncs the manifest of these segments ahead of the commit that will write
    /// it (see [`prepare_seal_manifest`](Self::prepare_seal_manifest)); nothing when deletion
    /// records are pending and not written ahead.
    pub(super) fn write_manifest_ahead(
        &self,
        last_seq: u64,
        segments: impl Iterator<Item = SegmentMeta>,
        next_segment_id: u64,
    ) -> Result<(), IndexError> {
        let deletions = if self.deletions_log.pending() {
            let ahead = self
                .deletions_ahead
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match ahead.as_ref() {
                Some((at, w)) if *at == self.deletions_log.changes() => w.head(),
                _ => return Ok(()),
            }
        } else {
            self.deletions_log.head()
        };
        let bytes = self.manifest_bytes(last_seq, segments, deletions, next_segment_id)?;
        crate::files::write_synced(&self.dir.join(MANIFEST_AHEAD), &bytes)?;
        *self
            .manifest_ahead
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(bytes);
        Ok(())
    }

    /// Writes what changed in the deletion records ahead of the next manifest, under a shared
    /// borrow (searches go on): after a mass delete that is every record again (~145 ms for
    /// 500,000), which the manifest's writer (a seal's or a merge's commit) would otherwise
    /// write under the write lock. Used by that manifest if the records did not change in
    /// between, dropped otherwise; nothing when no record changed, or when records are due to
    /// be dropped for their age (the commit drops them first).
    pub fn prepare_deletions(&self) -> Result<(), IndexError> {
        if !self.deletions_log.pending() || self.purge_due().is_some() {
            return Ok(());
        }
        let at = self.deletions_log.changes();
        let mut ahead = self
            .deletions_ahead
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if ahead.as_ref().is_some_and(|(a, _)| *a == at) {
            return Ok(());
        }
        let w = self.deletions_log.write(&self.dir, &self.records)?;
        if let Some((_, old)) = ahead.replace((at, w)) {
            old.abandon();
        }
        Ok(())
    }

    pub(super) fn spawn_graph(&self, seg: Arc<Segment>, try_load: bool) {
        let dir = self.dir.clone();
        let spec = self.graph_spec();
        let done = self.graphs_done.clone();
        let work = move || {
            let path = Self::graph_path(&dir, seg.id);
            if try_load {
                // mapped, not read: the graph is decoded from the file's pages without a copy
                match crate::files::map_checked(&path) {
                    Ok(Some(map)) => match SegGraph::from_map(Arc::new(map), &seg.entries, &spec) {
                        Ok(g) => {
                            seg.set_graph(g);
                            done.fetch_add(1, std::sync::atomic::Ordering::Release);
                            // a merged segment's BM25 lists of repeats (see `run_merge`)
                            seg.postings.split_long_lists();
                            return;
                        }
                        Err(e) => {
                            warn!(path = %path.display(), error = %e, "graph file does not fit its segment; rebuilding")
                        }
                    },
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "graph file rejected; rebuilding"),
                }
            }
            let g = seg.build_graph(spec);
            let g = persist_graph(&path, g, &seg.entries, &spec).unwrap_or_else(|(e, g)| {
                // searchable from memory still; built again at the next open
                warn!(error = %e, "could not persist graph");
                g
            });
            seg.set_graph(g);
            done.fetch_add(1, std::sync::atomic::Ordering::Release);
            seg.postings.split_long_lists();
        };
        if self.settings.background {
            // at background priority (the queue's worker): searches come first, and until the
            // graph is built they scan the segment's codes
            super::builds::submit(work);
        } else {
            work();
        }
    }

    pub(super) fn graph_path(dir: &Path, id: u64) -> PathBuf {
        dir.join(format!("seg-{id}.hnsw"))
    }

    pub(super) fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("seg-{id}.bin"))
    }

    /// A segment's BM25 postings file.
    pub(super) fn postings_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("seg-{id}.post"))
    }
}

/// Writes a freshly built graph to `path` and gives it back read from the mapped file (its
/// codes and level-0 rows then stay in the file), or as it is when the map cannot be read back;
/// a graph that cannot be written comes back with the error.
pub(super) fn persist_graph(
    path: &Path,
    g: SegGraph,
    entries: &[Arc<Entry>],
    spec: &GraphSpec,
) -> Result<SegGraph, (IndexError, SegGraph)> {
    let written = g
        .to_bytes()
        .map_err(IndexError::BadInput)
        .and_then(|bytes| write_checked(path, &bytes));
    if let Err(e) = written {
        return Err((e, g));
    }
    if !matches!(g, SegGraph::Own(_)) {
        // only an own graph can leave its arrays in the file
        return Ok(g);
    }
    match crate::files::map_written(path) {
        Ok(Some(map)) => match SegGraph::from_map(Arc::new(map), entries, spec) {
            Ok(mapped) => return Ok(mapped),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "graph just written does not read back")
            }
        },
        Ok(None) => {}
        Err(e) => warn!(error = %e, "graph just written does not map"),
    }
    Ok(g)
}

/// Writes chunks as segment `id` of one data file (`bin`, format 3) with its BM25 postings
/// (`post`, written by `postings`): what a seal and a compaction write; gives the segment read
/// back from the maps.
pub(super) fn write_part(
    bin: &Path,
    post: &Path,
    id: u64,
    entries: &[Arc<Entry>],
    postings: impl FnOnce(&Path) -> Result<Arc<SegPostings>, IndexError>,
) -> Result<Segment, IndexError> {
    let mapped = write_mapped(bin, entries)?;
    let postings = postings(post)?;
    Ok(Segment::new(id, mapped, postings))
}

/// Writes chunks as a format 3 data file at `path` and gives them back read from its map.
fn write_mapped(path: &Path, entries: &[Arc<Entry>]) -> Result<Vec<Arc<Entry>>, IndexError> {
    let plain: Vec<&Entry> = entries.iter().map(|e| e.as_ref()).collect();
    crate::datafile::write(path, &plain)?;
    let back = crate::datafile::read_written(path)?.ok_or_else(|| IndexError::Corrupt {
        path: path.to_path_buf(),
        reason: "the data file just written is gone".into(),
    })?;
    for (copy, original) in back.iter().zip(entries) {
        copy.set_slot(original.slot());
    }
    // not `into_iter().map(..).collect()`: that reuses `back`'s buffer in place, five times
    // the room the pointers need, kept as long as the segment (40 of 273 bytes a chunk at 1M)
    let mut shared = Vec::with_capacity(back.len());
    shared.extend(back.into_iter().map(Arc::new));
    Ok(shared)
}

pub(super) fn seg_id_for_name(dir: &Path) -> String {
    dir.file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default()
}
