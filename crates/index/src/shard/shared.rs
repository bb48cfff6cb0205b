//! A shard index shared by searches and writes the way a replica serves it: searches under the
//! read side of a lock; a write takes the write side only to apply what it logged, while its
//! log append and fsync, and a seal's file writes, run under the read side beside the searches.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ragfleet_proto::{ModelIdentity, WriteOp};
use tracing::warn;

use super::ShardIndex;
use crate::IndexError;

/// How long applying a write holds the searches off at most before it lets them in (a large
/// write is applied in parts: deleting 500,000 documents held them ~950 ms in one piece).
const APPLY_SLICE: std::time::Duration = std::time::Duration::from_millis(2);

/// A [`ShardIndex`] behind a read-write lock, written in two halves (see
/// [`ShardIndex::log_group`] and [`ShardIndex::prepare_seal`]). The lock is parking_lot's,
/// which holds new readers back while a writer waits until that writer has had its turn: std's
/// lets a reader in the moment the last one leaves, so a write that comes back for the lock
/// between searches waited up to 143 ms behind a stream of them (`write_stall` example).
#[derive(Debug)]
pub struct SharedShard {
    index: RwLock<ShardIndex>,
    /// One writer at a time (logging, applying, sealing, maintenance): nothing applies or seals
    /// between the two halves of a write or a seal, so the second half never finds its first
    /// one overtaken (it would then redo the work under the write lock).
    writer: Mutex<()>,
    /// The longest the write side was held since [`SharedShard::take_longest_hold`] last
    /// asked, in nanoseconds (what a search could have waited for the index at most, besides
    /// its own thread's time off a CPU).
    longest_hold: AtomicU64,
}

impl SharedShard {
    /// Shares `index`.
    pub fn new(index: ShardIndex) -> SharedShard {
        SharedShard {
            index: RwLock::new(index),
            writer: Mutex::new(()),
            longest_hold: AtomicU64::new(0),
        }
    }

    /// The index to read (search, count, digest); writes wait only while they apply.
    pub fn read(&self) -> RwLockReadGuard<'_, ShardIndex> {
        self.index.read()
    }

    fn writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock()
    }

    /// The write side of the lock, this thread asking a short time slice while it holds it
    /// (searches wait meanwhile: a holder that lost its core should get it back soonest;
    /// see [`crate::priority`]).
    fn hold(&self) -> Hold<'_> {
        let slice = crate::priority::ShortSlice::hold();
        let ix = self.index.write();
        Hold {
            ix,
            since: Instant::now(),
            longest: &self.longest_hold,
            slice,
        }
    }

    /// The longest the write side of the lock was held (by writes, seals, merges' commits and
    /// maintenance passes) since the last call, which starts the count again.
    pub fn take_longest_hold(&self) -> Duration {
        Duration::from_nanos(self.longest_hold.swap(0, Ordering::Relaxed))
    }

    /// Runs `f` with the index to itself (as the only writer, searches waiting).
    pub fn exclusive<R>(&self, f: impl FnOnce(&mut ShardIndex) -> R) -> R {
        let _writer = self.writer();
        let mut held = self.hold();
        let r = f(&mut held.ix);
        drop(held.release(false));
        r
    }

    /// [`ShardIndex::write_group`]: the writes are validated, logged and fsynced under the read
    /// side, applied under the write side, and a full growing segment is sealed the same way
    /// (its files written beside the searches, then switched in).
    pub fn write_group(
        &self,
        group: Vec<(Vec<WriteOp>, ModelIdentity)>,
    ) -> Vec<Result<u64, IndexError>> {
        let tagged = group.into_iter().map(|(ops, model)| (ops, model, ()));
        self.write_queued(|| tagged.collect())
            .into_iter()
            .map(|((), r)| r)
            .collect()
    }

    /// Group commit: [`SharedShard::write_group`] of what `take` gives once this caller is the
    /// writer (so writes queued while an earlier group was written go together), each write's
    /// result beside its tag.
    pub fn write_queued<T>(
        &self,
        take: impl FnOnce() -> Vec<(Vec<WriteOp>, ModelIdentity, T)>,
    ) -> Vec<(T, Result<u64, IndexError>)> {
        let _writer = self.writer();
        let queued = take();
        if queued.is_empty() {
            return Vec::new();
        }
        let mut tags = Vec::with_capacity(queued.len());
        let group = queued
            .into_iter()
            .map(|(ops, model, tag)| {
                tags.push(tag);
                (ops, model)
            })
            .collect();
        let results = self.read().log_group(group);
        self.apply_and_seal();
        tags.into_iter().zip(results).collect()
    }

    /// [`ShardIndex::write`], as [`SharedShard::write_group`] does it.
    pub fn write(&self, ops: Vec<WriteOp>, model: &ModelIdentity) -> Result<u64, IndexError> {
        self.write_group(vec![(ops, model.clone())])
            .pop()
            .expect("one result a write")
    }

    /// [`ShardIndex::delete`], logged under the read side.
    pub fn delete(&self, doc_ids: &[String], version: u64) -> Result<u64, IndexError> {
        let _writer = self.writer();
        let r = self.read().log_delete(doc_ids, version);
        self.apply_and_seal();
        r
    }

    /// [`ShardIndex::maintain`], with an idle growing segment sealed in two halves (its files
    /// written beside the searches).
    pub fn maintain(&self) -> Result<bool, IndexError> {
        let _writer = self.writer();
        if self.read().idle_seal_due() {
            if let Err(e) = self.seal_in_halves() {
                // tried again after another idle period, not at every poll
                self.hold().ix.last_write = std::time::Instant::now();
                return Err(e);
            }
            return Ok(true);
        }
        let r = self.maintain_merges();
        // after large merges, the memory their threads freed is given back to the system
        // (on this thread, which runs at the writer's priority: see allocator::give_back;
        // the read guard is dropped with the condition, so the index is not held meanwhile)
        if self.read().give_back_due() {
            crate::allocator::give_back();
        }
        r
    }

    /// The merges' part of [`SharedShard::maintain`] (writer held): a finished merge committed
    /// (prepared beside the searches), the next started, a batch of slots moved, the
    /// tombstones a compaction let go of pruned.
    fn maintain_merges(&self) -> Result<bool, IndexError> {
        // a merge's commit writes a manifest: the deletion records ahead of it (only then: a
        // trickle of deletes would otherwise have them written again at every poll)
        if self.read().merge_finished() {
            self.deletions_ahead();
            // its files renamed and its manifest written beside the searches: the commit
            // then holds them off for the switch alone (a failure here is the commit's to
            // meet: it renames and writes what was not done ahead)
            if let Err(e) = self.read().prepare_merge_commit() {
                warn!(error = %e, "preparing a merge's commit beside the searches failed");
            }
        }
        // the buffer for the older copies of the slots a pass moves, asked for before the lock
        // (see merge::REBIND_ROOM)
        let mut older = Vec::with_capacity(super::merge::REBIND_ROOM);
        std::hint::black_box(self.read().touch_rebind(super::merge::REBIND_ROOM));
        let mut held = self.hold();
        let r = held.ix.merges_keeping(&mut older);
        // the older copies of the slots moved (and the files they kept mapped) are let go of
        // beside the searches
        let to_free = held.ix.take_to_free();
        let slice = held.release(false);
        drop((older, to_free, slice));
        // the tombstones a compaction let go of: which to keep is read beside the searches
        // (nothing writes meanwhile: the writer is held), the maps swapped under the lock
        if self.read().prune_due() {
            let kept = self.read().tombstones_kept();
            let mut held = self.hold();
            let old = held.ix.keep_tombstones(kept);
            let slice = held.release(false);
            self.read().free_tombstones(old);
            drop(slice);
        }
        r
    }

    /// [`ShardIndex::prepare_deletions`] under the read side (writer held); a failure is left
    /// to the commit, which writes them itself.
    fn deletions_ahead(&self) {
        if let Err(e) = self.read().prepare_deletions() {
            warn!(error = %e, "writing the deletion records ahead of a commit failed");
        }
    }

    /// Applies what was logged; seals when that filled the growing segment (writer held). A
    /// map the writes would fill past its room is copied at its new size first, beside the
    /// searches ([`ShardIndex::prepare_room`]), and swapped in with the first part.
    fn apply_and_seal(&self) {
        let mut room = Some(self.read().prepare_room());
        let due = loop {
            let mut held = self.hold();
            let replaced = room.take().map(|r| held.ix.install_room(r));
            let done = held.ix.apply_logged_for(Some(APPLY_SLICE));
            let due = done && held.ix.seal_due();
            // the searches waiting get their turn before the next part (or the seal)
            let slice = held.release(true);
            drop((replaced, slice));
            if done {
                break due;
            }
        };
        // the writes are durable and applied whatever happens here: a seal that fails (disk
        // full) leaves the growing segment and the log as they were, and the next write tries
        // again
        if due {
            if let Err(e) = self.seal_in_halves() {
                warn!(error = %e, "seal failed; the growing segment stays in memory and in the log");
            }
        }
    }

    /// A seal whose files are written under the read side (writer held): nothing can change
    /// the growing segment between the halves.
    fn seal_in_halves(&self) -> Result<(), IndexError> {
        // a merge that finished meanwhile is committed first, in a hold of its own with its
        // files renamed and its manifest written ahead and a compaction's pruning after it;
        // the seal's commit would otherwise commit it inline, all of that under the lock
        if self.read().merge_finished() {
            if let Err(e) = self.maintain_merges() {
                warn!(error = %e, "committing a finished merge before a seal failed");
            }
        }
        let prepared = self.read().prepare_seal()?;
        self.deletions_ahead();
        if let Err(e) = self.read().prepare_seal_manifest(&prepared) {
            // the commit writes its own
            warn!(error = %e, "writing a seal's manifest ahead of its commit failed");
        }
        // the maps a mass delete left mostly empty are copied smaller beside the searches
        let room = self.read().prepare_room();
        let mut held = self.hold();
        let replaced = held.ix.install_room(room);
        let r = held.ix.commit_seal(prepared);
        // the growing segment's owned chunks and its BM25 are freed beside the searches
        let to_free = held.ix.take_to_free();
        let slice = held.release(false);
        drop((to_free, replaced, slice));
        r?;
        if let Err(e) = self.read().finish_seal() {
            // the next append empties it first (or refuses)
            warn!(error = %e, "emptying the log after a seal failed");
        }
        Ok(())
    }

    /// The index back.
    pub fn into_inner(self) -> ShardIndex {
        self.index.into_inner()
    }
}

/// The write side of a [`SharedShard`]'s lock and the short slice asked while it is held
/// (the lock is released first: the fields drop in order).
struct Hold<'a> {
    ix: RwLockWriteGuard<'a, ShardIndex>,
    since: Instant,
    longest: &'a AtomicU64,
    slice: crate::priority::ShortSlice,
}

impl Hold<'_> {
    /// Lets the searches back in (`fair`: those waiting go first, before this thread could
    /// take it again), counts how long it was held, and hands back the short slice, to be
    /// dropped once what the caller frees after the lock is freed.
    fn release(self, fair: bool) -> crate::priority::ShortSlice {
        if fair {
            RwLockWriteGuard::unlock_fair(self.ix);
        } else {
            drop(self.ix);
        }
        let held = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.longest.fetch_max(held, Ordering::Relaxed);
        self.slice
    }
}
