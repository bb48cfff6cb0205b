//! The write path: validation, last-writer-wins by version, the durable log, and the
//! in-memory apply.
use super::*;

impl ShardIndex {
    /// Adds a chunk of the growing segment (indexed for BM25 in memory).
    pub(super) fn add_slot(&mut self, e: Arc<Entry>) {
        let counts = crate::bm25::term_counts(e.text());
        let slot = self.add_live(e);
        self.bm25.insert_counts(slot, counts);
    }

    /// Gives a live chunk a slot (a sealed chunk's BM25 postings are in its segment's file).
    pub(super) fn add_live(&mut self, e: Arc<Entry>) -> u32 {
        let slot = self.next_slot;
        self.next_slot = self.next_slot.wrapping_add(1);
        e.set_slot(Some(slot));
        let d = match self.docs.get_mut(e.doc_id()) {
            Some(d) => d,
            None => self.docs.entry(e.doc_id().into()).or_default(),
        };
        d.seq = e.seq;
        d.version = e.version;
        d.slots.push(slot);
        self.slots.insert(slot, e);
        slot
    }

    pub(super) fn remove_doc(&mut self, doc_id: &str) {
        if let Some(d) = self.docs.remove(doc_id) {
            for s in d.slots.iter() {
                if let Some(e) = self.slots.remove(&s) {
                    // a sealed chunk is not in the in-memory index: nothing to do there (its
                    // segment's postings skip it as dead)
                    self.bm25.remove(s, e.text());
                    e.mark_dead();
                }
            }
        }
    }

    pub(super) fn apply_in_memory(&mut self, seq: u64, op: WriteOp) {
        self.changed();
        match op {
            WriteOp::Upsert {
                doc_id,
                chunks,
                version,
            } if !chunks.is_empty() => {
                self.remove_doc(&doc_id);
                if self.deleted.remove(&doc_id).is_some() {
                    self.deletions_log.touched(&doc_id);
                }
                for c in chunks {
                    let e = Arc::new(Entry::owned(seq, version, c));
                    self.growing.push(e.clone());
                    self.add_slot(e);
                }
            }
            WriteOp::Upsert {
                doc_id, version, ..
            }
            | WriteOp::Delete { doc_id, version } => {
                self.remove_doc(&doc_id);
                self.deletions_log.touched(&doc_id);
                self.tombstones.insert(doc_id.clone(), seq);
                self.deleted.insert(doc_id, version);
            }
        }
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
        self.write_group(vec![(ops, model.clone())])
            .pop()
            .expect("one result a write")
    }

    /// Group commit: several writes (each as [`write`](Self::write) would take it) logged with
    /// one fsync, then applied in order; one result each, the last sequence number of that
    /// write or why it was refused. A refused write (bad input, another model) refuses alone;
    /// a log that cannot be written refuses them all and applies none.
    pub fn write_group(
        &mut self,
        group: Vec<(Vec<WriteOp>, ModelIdentity)>,
    ) -> Vec<Result<u64, IndexError>> {
        // one result a write: refused, answered without logging, or (Ok(0)) to be logged
        let mut results: Vec<Result<u64, IndexError>> = Vec::with_capacity(group.len());
        // (index in `group`, its record)
        let mut records: Vec<(usize, WalRecord)> = Vec::new();
        let mut pinned = self.model.clone();
        let mut next_seq = self.last_seq + 1;
        // the newest version of each document in this group so far
        let mut newest: HashMap<String, u64> = HashMap::new();
        for (i, (mut ops, model)) in group.into_iter().enumerate() {
            if let Err(e) = self.validate_write(&mut ops, &model, pinned.as_ref()) {
                results.push(Err(e));
                continue;
            }
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
                // nothing new: answered with the sequence number reached before this write
                results.push(Ok(next_seq - 1));
                continue;
            }
            pinned.get_or_insert_with(|| model.clone());
            let n = ops.len() as u64;
            records.push((
                i,
                WalRecord {
                    first_seq: next_seq,
                    model,
                    ops,
                },
            ));
            next_seq += n;
            results.push(Ok(0));
        }
        if records.is_empty() {
            return results;
        }
        let encoded: Result<Vec<Vec<u8>>, IndexError> = records
            .iter()
            .map(|(_, rec)| codec::encode_wal(rec).map_err(|e| IndexError::BadInput(e.to_string())))
            .collect();
        if let Err(e) = encoded.and_then(|bytes| self.wal.append(&bytes)) {
            // nothing of the group is applied; each logged write gets the error
            for (i, _) in &records {
                results[*i] = Err(e.duplicate());
            }
            return results;
        }
        if self.model.is_none() {
            self.model = pinned;
        }
        for (i, rec) in records {
            let n = rec.ops.len() as u64;
            for (j, op) in rec.ops.into_iter().enumerate() {
                self.apply_in_memory(rec.first_seq + j as u64, op);
            }
            self.last_seq = rec.first_seq + n - 1;
            results[i] = Ok(self.last_seq);
        }
        self.last_write = std::time::Instant::now();
        if self.growing.len() >= self.settings.segment_size {
            // the writes are durable (logged) and applied whatever happens here: a seal that
            // fails (disk full) leaves the growing segment and the log as they were, and the
            // next write tries again
            if let Err(e) = self.seal() {
                warn!(dir = %self.dir.display(), error = %e, "seal failed; the growing segment stays in memory and in the log");
            }
        }
        results
    }

    /// One write's checks: the model (against the pinned one, or the group's first), document
    /// ids, and every chunk.
    fn validate_write(
        &self,
        ops: &mut [WriteOp],
        model: &ModelIdentity,
        pinned: Option<&ModelIdentity>,
    ) -> Result<(), IndexError> {
        if let Some(m) = pinned.filter(|m| *m != model) {
            return Err(IndexError::ModelMismatch {
                index: m.to_string(),
                request: model.to_string(),
            });
        }
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
        Ok(())
    }
}

pub(super) fn validate_chunk(
    doc_id: &str,
    c: &mut ChunkRecord,
    dim: usize,
) -> Result<(), IndexError> {
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
