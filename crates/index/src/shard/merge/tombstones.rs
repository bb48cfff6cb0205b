//! Tombstones after a compaction: kept only while a sealed segment still holds an older copy,
//! pruned when that pays, the old map freed off the write lock.
use super::*;
use crate::shard::records::Records;

/// Tombstones are pruned after a compaction when the dead rows left in the shard are at most
/// this many times those it dropped...
const PRUNE_SPAN: usize = 4;
/// ...or fewer than this.
const PRUNE_ALWAYS_BELOW: usize = 512;

impl ShardIndex {
    /// Whether pruning the tombstones after this compaction is worth its cost: it visits the
    /// dead rows of every segment (1.5 s under the write lock for a compaction of two small
    /// segments beside a million-chunk one with 550,000 dead rows), while only the documents
    /// whose dead copies the compaction dropped can lose their last one. It runs when the dead
    /// rows left are at most [`PRUNE_SPAN`] times those dropped (or few), so its cost stays
    /// in proportion to what compactions drop; a tombstone kept meanwhile is harmless and goes
    /// at a later compaction.
    pub(super) fn pruning_pays(
        &self,
        before: &[Arc<Segment>],
        sources: &[u64],
        merged: &Segment,
    ) -> bool {
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

    /// Tombstones matter only while a sealed segment still holds an older copy: drops the
    /// others (the old map freed on another thread when large).
    pub(in crate::shard) fn prune_tombstones(&mut self) {
        let kept = self.tombstones_kept();
        let old = self.keep_tombstones(kept);
        self.free_tombstones(old);
    }

    /// Whether a compaction's commit left the tombstones to prune ([`ShardIndex::maintain`]).
    pub(in crate::shard) fn prune_due(&self) -> bool {
        self.prune_due
    }

    /// Frees replaced deletion records: on another thread when large (550,000 strings took
    /// ~190 ms to free under the write lock).
    pub(in crate::shard) fn free_tombstones(&self, old: Records) {
        if self.settings.background && old.len() > 10_000 {
            if let Err(e) = std::thread::Builder::new()
                .name("tombstones-free".into())
                .spawn(move || {
                    crate::priority::background();
                    drop(old)
                })
            {
                warn!(error = %e, "could not free pruned tombstones in the background");
            }
        }
    }

    /// The deletion records with only the tombstones still needed (those of documents a
    /// sealed segment holds a dead copy of), made under a shared borrow; None when all of them
    /// are (or there are none).
    pub(in crate::shard) fn tombstones_kept(&self) -> Option<Records> {
        if self.records.tombstone_count() == 0 {
            return None;
        }
        // keyed by the ids as the chunks hold them (a mapped chunk's in its file): no copy
        let mut present: HashSet<&str> = HashSet::new();
        fn check<'a>(records: &Records, present: &mut HashSet<&'a str>, e: &'a Entry) {
            if records.tombstone(e.doc_id()).is_some() {
                present.insert(e.doc_id());
            }
        }
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
                        .for_each(|e| check(&self.records, &mut present, e)),
                    None => part
                        .iter()
                        .filter(|e| e.marked_dead() != Some(false))
                        .for_each(|e| check(&self.records, &mut present, e)),
                }
            }
        }
        if present.len() == self.records.tombstone_count() {
            return None;
        }
        Some(self.records.with_tombstones_of(|d| present.contains(d)))
    }

    /// Replaces the deletion records by `kept` ([`ShardIndex::tombstones_kept`], nothing
    /// deleted since; None keeps them all); gives back the old ones, to be freed after the lock.
    pub(in crate::shard) fn keep_tombstones(&mut self, kept: Option<Records>) -> Records {
        self.prune_due = false;
        let Some(kept) = kept.filter(|k| k.pruned_from(&self.records)) else {
            // kept all, or (not expected: the writer is held) the records changed since
            return Records::default();
        };
        let old = std::mem::replace(&mut self.records, kept);
        self.deletions_log.touched_many(
            old.tombstone_count() - self.records.tombstone_count(),
            old.tombstones()
                .filter(|(d, _)| self.records.tombstone(d).is_none())
                .map(|(d, _)| d),
        );
        old
    }
}
