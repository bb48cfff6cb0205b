//! The C allocator's settings for a process that serves shards.
//!
//! glibc keeps small freed blocks in "fast bins" without merging them with their neighbours,
//! and merges them all at once (`malloc_consolidate`) at the next request of a larger block
//! from the same arena, whoever makes it. A shard frees in the millions at a time on
//! background threads: a compaction's older copies, a merged-away segment's chunks, pruned
//! tombstones, all allocated by the thread that applied the writes. The next larger request
//! of that thread's arena then merged them all, under whatever lock it held: after a
//! compaction of a million-chunk shard, a slot-moving pass whose clock is read every few
//! hundred slots held the searches off for 20-122 ms, most of it in `malloc_consolidate`
//! and `_int_malloc` (perf, `bench shard`). Without fast bins a free merges its block at
//! once, on the thread that frees (the background one), and a request sorts at most 10,000
//! blocks that are left unsorted: the cost stays with who frees, in bounded pieces.

/// Turns glibc's fast bins off for the whole process (every later free merges its block
/// at once; the per-thread caches in front of them stay). Returns whether the setting was
/// taken: false where the allocator is not glibc's, or a `GLIBC_TUNABLES` setting in the
/// environment decides (it wins). Calling it again changes nothing.
pub fn coalesce_frees() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt only sets the allocator's parameters, under the allocator's lock
        // (it first merges what the main arena's fast bins hold)
        return unsafe { libc::mallopt(libc::M_MXFAST, 0) } == 1;
    }
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Bytes in freed blocks held in fast bins, over every arena.
    fn in_fast_bins() -> usize {
        // SAFETY: mallinfo2 only reads the allocator's statistics
        unsafe { libc::mallinfo2() }.fsmblks
    }

    /// Frees many small blocks (past what the thread's cache keeps of each size).
    fn churn() {
        let blocks: Vec<Box<[u8; 40]>> = (0..20_000).map(|_| Box::new([1u8; 40])).collect();
        drop(std::hint::black_box(blocks));
    }

    #[test]
    fn small_frees_are_merged_at_once_once_fast_bins_are_off() {
        if std::env::var_os("GLIBC_TUNABLES").is_some() {
            return;
        }
        // glibc's default keeps them (another test thread may free meanwhile: it adds)
        let before = in_fast_bins();
        churn();
        let kept = in_fast_bins();
        assert!(kept > before, "fast bins on: {before} -> {kept}");
        assert!(coalesce_frees());
        let before = in_fast_bins();
        churn();
        let after = in_fast_bins();
        assert!(after <= before, "fast bins off: {before} -> {after}");
    }
}
