//! Opening a shard index: the manifest, sealed segments with their BM25 snapshots, the log
//! tail replayed; corrupt files reported and never loaded.
use super::*;

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

    /// Loads and checks the BM25 snapshot of a sealed segment.
    pub(super) fn load_terms(&self, seg: &Segment) -> Result<SegmentTerms, IndexError> {
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

    pub(super) fn load_segment(&self, id: u64) -> Result<Arc<Segment>, IndexError> {
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
    pub(super) fn rebuild_liveness(&mut self, seg_terms: &HashMap<u64, SegmentTerms>) {
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
}
