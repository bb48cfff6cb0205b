//! The write path: validation, last-writer-wins by version, the durable log, and the
//! in-memory apply.
use super::*;

/// The write-ahead log and what was logged to it but not applied yet.
#[derive(Debug)]
pub(super) struct LogState {
    pub(super) wal: Wal,
    /// The last sequence number logged (applied or not; 0 before the first log here).
    logged_seq: u64,
    /// Logged, not applied yet, in order (the first may be partly applied).
    queued: std::collections::VecDeque<Queued>,
    /// The newest version of each document in `queued`.
    versions: HashMap<String, u64>,
    /// The model the queued writes pinned, while the index has none (set whenever one is
    /// queued then).
    model: Option<ModelIdentity>,
    /// A committed manifest holds every record of the log: it is emptied before the next
    /// append (see [`ShardIndex::finish_seal`]).
    pub(super) reset_due: bool,
    /// A manifest was renamed into place and its folder not fsynced yet: done before the log
    /// is emptied (the rename must be durable first).
    pub(super) dir_sync_due: bool,
}

/// A logged write not applied yet, or not to its end.
#[derive(Debug)]
struct Queued {
    /// The sequence number of the next op to apply.
    next_seq: u64,
    ops: std::vec::IntoIter<WriteOp>,
}

impl LogState {
    pub(super) fn new(wal: Wal) -> LogState {
        LogState {
            wal,
            logged_seq: 0,
            queued: std::collections::VecDeque::new(),
            versions: HashMap::new(),
            model: None,
            reset_due: false,
            dir_sync_due: false,
        }
    }

    /// Empties the log if a committed manifest holds all of it.
    pub(super) fn reset_if_due(&mut self) -> Result<(), IndexError> {
        if std::mem::take(&mut self.dir_sync_due) {
            // the manifest sits in the log's folder
            if let Some(dir) = self.wal.path().parent() {
                crate::files::sync_dir(dir);
            }
        }
        if self.reset_due {
            self.wal.reset()?;
            self.reset_due = false;
        }
        Ok(())
    }

    /// The ops logged and not applied yet, write by write.
    pub(super) fn queued(&self) -> impl Iterator<Item = &[WriteOp]> {
        self.queued.iter().map(|q| q.ops.as_slice())
    }

    /// Whether writes were logged and not applied yet.
    pub(super) fn has_queued(&self) -> bool {
        !self.queued.is_empty()
    }
}

impl ShardIndex {
    /// Adds a chunk of the growing segment (indexed for BM25 in memory).
    pub(super) fn add_slot(&mut self, e: Arc<Entry>) {
        let counts = crate::bm25::term_counts(e.text());
        let slot = self.add_live(e);
        self.bm25.insert_counts(slot, counts);
    }

    /// Gives a live chunk a slot (a sealed chunk's BM25 postings are in its segment's file).
    pub(super) fn add_live(&mut self, e: Arc<Entry>) -> u32 {
        // slots are given one after the other and wrap past 2^32 (a shard rewritten for long
        // enough): a number still held, or the chunk's mark for no slot, is passed over
        let slot = loop {
            let s = self.next_slot;
            self.next_slot = self.next_slot.wrapping_add(1);
            if s != crate::segment::NO_SLOT && self.slots.get(&s).is_none() {
                break s;
            }
        };
        e.set_slot(Some(slot));
        let d = self.docs.get_or_insert_with(e.doc_id(), || DocState {
            fine: super::sync::fine_bucket(e.doc_id()),
            ..DocState::default()
        });
        d.seq = e.seq;
        d.version = e.version;
        d.slots.push(slot);
        self.slots.insert(e);
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
        // the digest follows the document's entry: out before, in after
        let doc = match &op {
            WriteOp::Upsert { doc_id, .. } | WriteOp::Delete { doc_id, .. } => doc_id.clone(),
        };
        let before = self.digest_entry(&doc);
        self.apply_op(seq, op);
        let after = self.digest_entry(&doc);
        self.digests.change(&doc, before, after);
    }

    fn apply_op(&mut self, seq: u64, op: WriteOp) {
        match op {
            WriteOp::Upsert {
                doc_id,
                chunks,
                version,
            } if !chunks.is_empty() => {
                self.remove_doc(&doc_id);
                if self.records.set_deleted(&doc_id, None) {
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
                self.records.set_tombstone(&doc_id, Some(seq));
                self.records.set_deleted(&doc_id, Some(version));
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
            .or_else(|| self.records.deleted(doc_id))
    }

    /// Deletes documents durably at `version` (no model check: deletions carry no vectors).
    pub fn delete(&mut self, doc_ids: &[String], version: u64) -> Result<u64, IndexError> {
        let r = self.log_delete(doc_ids, version);
        self.apply_logged();
        r
    }

    /// [`delete`](Self::delete)'s logging half (see [`log_group`](Self::log_group)).
    pub fn log_delete(&self, doc_ids: &[String], version: u64) -> Result<u64, IndexError> {
        let model = self
            .model
            .clone()
            .or_else(|| self.log_state().model.clone());
        let Some(model) = model else {
            return Ok(self.last_seq); // nothing was ever written
        };
        let ops = doc_ids
            .iter()
            .map(|d| WriteOp::Delete {
                doc_id: d.clone(),
                version,
            })
            .collect();
        self.log_group(vec![(ops, model)])
            .pop()
            .expect("one result a write")
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
    /// a log that cannot be written refuses them all and applies none. Seals the growing
    /// segment when it is full.
    pub fn write_group(
        &mut self,
        group: Vec<(Vec<WriteOp>, ModelIdentity)>,
    ) -> Vec<Result<u64, IndexError>> {
        let results = self.log_group(group);
        self.apply_logged();
        if self.seal_due() {
            // the writes are durable (logged) and applied whatever happens here: a seal that
            // fails (disk full) leaves the growing segment and the log as they were, and the
            // next write tries again
            if let Err(e) = self.seal() {
                warn!(dir = %self.dir.display(), error = %e, "seal failed; the growing segment stays in memory and in the log");
            }
        }
        results
    }

    /// The first half of [`write_group`](Self::write_group), under a shared borrow: validates
    /// the writes and logs them durably (one fsync), without applying them, so that a replica
    /// keeps serving searches while its log is written. What it logged is applied by the next
    /// [`apply_logged`](Self::apply_logged) (or seal), in the order it was logged, and nothing
    /// may be acknowledged before that. Logging calls are serialised among themselves; each
    /// checks versions against what is applied and what is logged before it.
    pub fn log_group(
        &self,
        group: Vec<(Vec<WriteOp>, ModelIdentity)>,
    ) -> Vec<Result<u64, IndexError>> {
        let mut log = self.log_state();
        // one result a write: refused, answered without logging, or (Ok(0)) to be logged
        let mut results: Vec<Result<u64, IndexError>> = Vec::with_capacity(group.len());
        // (index in `group`, its record)
        let mut records: Vec<(usize, WalRecord)> = Vec::new();
        let mut pinned = self.model.clone().or_else(|| log.model.clone());
        let mut next_seq = self.last_seq.max(log.logged_seq) + 1;
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
                    .or_else(|| log.versions.get(op.doc_id()))
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
        // a seal's log reset not done yet is done first: what it drops is in the manifest, and
        // nothing is appended to a log that could not be emptied
        if let Err(e) = encoded.and_then(|bytes| {
            log.reset_if_due()?;
            log.wal.append(&bytes)
        }) {
            // nothing of the group is logged; each write gets the error
            for (i, _) in &records {
                results[*i] = Err(e.duplicate());
            }
            return results;
        }
        if self.model.is_none() {
            log.model = pinned;
        }
        log.versions.extend(newest);
        log.logged_seq = next_seq - 1;
        for (i, rec) in records {
            results[i] = Ok(rec.first_seq + rec.ops.len() as u64 - 1);
            log.queued.push_back(Queued {
                next_seq: rec.first_seq,
                ops: rec.ops.into_iter(),
            });
        }
        results
    }

    /// The second half of [`write_group`](Self::write_group): applies every write logged and
    /// not applied yet, in order (whoever logged it). The growing segment may be full after it
    /// ([`seal_due`](Self::seal_due)).
    pub fn apply_logged(&mut self) {
        self.apply_logged_for(None);
    }

    /// [`apply_logged`](Self::apply_logged) for about `budget` at most (None: to the end), so
    /// that an owner can let searches in between the parts of a large write (a mass delete:
    /// ~2 us a document); returns whether everything logged is applied. A search between two
    /// parts sees the write's first ops and not its last ones; the write is answered after
    /// its last.
    pub fn apply_logged_for(&mut self, budget: Option<std::time::Duration>) -> bool {
        let started = std::time::Instant::now();
        let log = self.log.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = log.model.take() {
            self.model.get_or_insert(m);
        }
        let mut queued = std::mem::take(&mut log.queued);
        let mut applied = 0u64;
        while let Some(front) = queued.front_mut() {
            if let Some(op) = front.ops.next() {
                self.apply_in_memory(front.next_seq, op);
                self.last_seq = front.next_seq;
                front.next_seq += 1;
                applied += 1;
            }
            if front.ops.len() == 0 {
                queued.pop_front();
            }
            if applied.is_multiple_of(256) && budget.is_some_and(|b| started.elapsed() >= b) {
                break;
            }
        }
        if applied > 0 {
            self.last_write = std::time::Instant::now();
        }
        let log = self.log.get_mut().unwrap_or_else(|e| e.into_inner());
        let done = queued.is_empty();
        log.queued = queued;
        if done {
            log.versions.clear();
        }
        done
    }

    /// Whether the growing segment is full: the next [`seal`](Self::seal) is due.
    pub fn seal_due(&self) -> bool {
        self.growing.len() >= self.settings.segment_size
    }

    /// The log, locked (a panic while it was held leaves it as the file is: a torn append is
    /// cut at the next open).
    pub(super) fn log_state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
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
            // what a coordinator refuses from a client, refused from any sender
            ragfleet_proto::check_doc_id(op.doc_id()).map_err(IndexError::BadInput)?;
            if let WriteOp::Upsert { doc_id, chunks, .. } = op {
                // repeats looked for only where there can be one (most documents are one
                // chunk): a set never inserted into allocates nothing
                let many = chunks.len() > 1;
                let mut ids = HashSet::with_capacity(if many { chunks.len() } else { 0 });
                for c in chunks.iter_mut() {
                    validate_chunk(doc_id, c, model.dim as usize)?;
                    if many && !ids.insert(c.chunk_id.as_str()) {
                        return Err(IndexError::BadInput(format!(
                            "chunk id {} twice in document {doc_id}",
                            c.chunk_id
                        )));
                    }
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
    if c.chunk_id.is_empty() {
        return Err(IndexError::BadInput(format!(
            "a chunk of {doc_id} has an empty chunk id"
        )));
    }
    let s = &c.sentences;
    if s.codes.len() != s.scales.len() * dim || s.scales.iter().any(|x| !x.is_finite() || *x <= 0.0)
    {
        return Err(IndexError::BadInput(format!(
            "chunk {} has malformed sentence vectors ({} scales, {} codes, {dim} dimensions)",
            c.chunk_id,
            s.scales.len(),
            s.codes.len()
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
