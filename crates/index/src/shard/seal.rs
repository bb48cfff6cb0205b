//! Sealing the growing segment, merging small segments, dropping old deletion records, and
//! building graphs on background threads. A failed seal or merge leaves the index as it was.
use super::*;

impl ShardIndex {
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
    pub(super) fn purge_deletions(&mut self) -> Result<(), IndexError> {
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
    pub(super) fn grace_horizon(&self) -> Option<u64> {
        let grace = self.settings.deletion_grace?;
        Some(ragfleet_proto::clock_micros().saturating_sub(grace.as_micros() as u64))
    }

    /// Removes a segment's files (best effort: unreferenced files are garbage, not data).
    pub(super) fn remove_segment_files(&self, id: u64) {
        for p in [
            self.segment_path(id),
            self.terms_path(id),
            Self::graph_path(&self.dir, id),
        ] {
            let _ = std::fs::remove_file(p);
        }
    }

    pub(super) fn write_segment(&self, seg: &Segment) -> Result<(), IndexError> {
        let plain: Vec<&Entry> = seg.entries.iter().map(|e| e.as_ref()).collect();
        let bytes = postcard::to_stdvec(&plain).map_err(|e| IndexError::BadInput(e.to_string()))?;
        write_checked(&self.segment_path(seg.id), &bytes)?;
        self.write_terms(seg.id, &SegmentTerms::of(seg))
    }

    pub(super) fn write_manifest(&self) -> Result<(), IndexError> {
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

    pub(super) fn write_terms(&self, id: u64, t: &SegmentTerms) -> Result<(), IndexError> {
        let bytes = postcard::to_stdvec(t).map_err(|e| IndexError::BadInput(e.to_string()))?;
        write_checked(&self.terms_path(id), &bytes)
    }

    pub(super) fn merge_small(&mut self) -> Result<(), IndexError> {
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

    pub(super) fn spawn_graph(&self, seg: Arc<Segment>, try_load: bool) {
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

    pub(super) fn graph_path(dir: &Path, id: u64) -> PathBuf {
        dir.join(format!("seg-{id}.hnsw"))
    }

    pub(super) fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("seg-{id}.bin"))
    }

    pub(super) fn terms_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("seg-{id}.bm25"))
    }
}

pub(super) fn seg_id_for_name(dir: &Path) -> String {
    dir.file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default()
}
