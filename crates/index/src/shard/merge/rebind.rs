//! After a compaction: the shard's slots pointed at the compacted copies a bounded batch at a
//! time under the write lock, the pages they read faulted in beforehand beside the searches.
use super::*;

/// A compacted segment whose chunks the shard's slots are being pointed at, a bounded batch
/// at a time: until a slot is, it holds the chunk's older copy, whose death is forwarded to
/// this segment's (see [`crate::datafile::DataFile::forward_deaths`]), so searches are right
/// throughout; the batches only let the older copies (and their mapped files) go.
pub(in crate::shard) struct Rebinding {
    pub(super) segment: Arc<Segment>,
    /// Positions done.
    pub(super) at: usize,
}

impl std::fmt::Debug for Rebinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebinding")
            .field("segment", &self.segment.id)
            .field("at", &self.at)
            .finish()
    }
}

/// How long one [`ShardIndex::maintain`] may spend pointing slots at compacted copies (under
/// the write lock: searches wait for it).
pub(super) const REBIND_BUDGET: std::time::Duration = std::time::Duration::from_millis(4);
/// Slots pointed at their copies between two looks at the clock.
const REBIND_BATCH: usize = 128;
/// Older copies one maintenance pass may let go of: the room of the buffer they go into,
/// made before the pass takes the write lock. A pass asks the allocator for no large block
/// under the lock: glibc merges every small block freed since into its free lists at the
/// next such request from the same arena, whoever makes it, and after a compaction the
/// threads freeing a million-chunk segment's chunks and tombstones free them by the million
/// (perf: `malloc_consolidate` and `_int_malloc` in passes held 20-122 ms at 1M, the older
/// copies' buffer growing under the lock).
pub(in crate::shard) const REBIND_ROOM: usize = 16_384;

impl ShardIndex {
    /// Chunks of compacted segments whose slots still hold their older copies (see
    /// [`Rebinding`]).
    pub fn chunks_to_rebind(&self) -> usize {
        self.rebinding
            .iter()
            .map(|r| r.segment.entries.len() - r.at)
            .sum()
    }

    /// Reads what the next `n` slot moves read (each copy's chunk id and its slot's), under a
    /// shared borrow beside the searches: the pages of the mapped files a pass would read
    /// first are then faulted in here rather than under the write lock. Returns a sum of what
    /// it read (for the caller to keep the reads).
    pub fn touch_rebind(&self, n: usize) -> usize {
        let mut sum = 0usize;
        let mut left = n;
        for r in &self.rebinding {
            let end = r.at.saturating_add(left).min(r.segment.entries.len());
            for e in &r.segment.entries[r.at..end] {
                sum = sum.wrapping_add(e.chunk_id().len());
                if let Some(cur) = e.slot().and_then(|slot| self.slots.get(&slot)) {
                    sum = sum.wrapping_add(cur.chunk_id().len());
                }
            }
            left -= end - r.at;
            if left == 0 {
                break;
            }
        }
        sum
    }

    /// Points slots at their compacted copies for up to [`REBIND_BUDGET`] and as many as
    /// `older` has room for (all of them when the index runs its merges in the foreground).
    pub(super) fn rebind_some(&mut self, older: &mut Vec<Arc<Entry>>) {
        let started = std::time::Instant::now();
        let budget = self.settings.background.then_some(REBIND_BUDGET);
        let mut done = 0usize;
        while let Some(mut r) = self.rebinding.pop_front() {
            let end = r.segment.entries.len();
            while r.at < end {
                // the clock is read every REBIND_BATCH slots: one slot can cost ~0.1 ms when
                // its copy's page is first read (see `prepare_rebind`)
                let to = (r.at + REBIND_BATCH).min(end);
                self.rebind_into(&r.segment.entries[r.at..to], older);
                done += to - r.at;
                r.at = to;
                if budget.is_some_and(|b| {
                    started.elapsed() >= b || older.capacity() - older.len() < REBIND_BATCH
                }) {
                    break;
                }
            }
            if r.at < end {
                self.rebinding.push_front(r);
                break;
            }
        }
        if done > 0 {
            debug!(dir = %self.dir.display(), chunks = done, left = self.chunks_to_rebind(), ms = started.elapsed().as_secs_f64() * 1e3, "slots pointed at compacted copies");
        }
    }
}
