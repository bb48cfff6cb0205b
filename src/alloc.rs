//! The process's allocator with feature `jemalloc` (default, Linux): blocks of up to
//! [`SMALL`] bytes come from jemalloc, larger ones from the C library's malloc (glibc).
//!
//! Why split: a shard's index makes and frees small blocks by the million (each chunk's record,
//! its id, its map entries); after a merge frees a million-chunk segment, glibc keeps those
//! freed blocks in its arenas until `malloc_trim` walks them (50-118 ms at 1M, each arena locked
//! in turn, a dozen searches beside it waiting for up to 12 ms), while jemalloc's background
//! threads give such memory back in small steps as it decays. The models' tensors are a few MB
//! each, their sizes moving with every batch's lengths: glibc serves them from a heap that stays
//! mapped (`ragfleet_models::lanes` raises its thresholds), where jemalloc alone touched 7x the
//! fresh pages and embedded a third slower (`crates/index/MEASUREMENTS.md`, session 46). Each
//! allocator gets what it is good at; Rust hands `dealloc` and `realloc` the block's layout, so
//! a block always goes back to the allocator that made it.
use std::alloc::{GlobalAlloc, Layout, System};

use tikv_jemallocator::Jemalloc;

/// The largest block jemalloc serves (its "small" size classes end at 14 KiB; 16 KiB is the
/// first page-multiple class above them).
pub const SMALL: usize = 16 << 10;

/// jemalloc's settings, read when it starts (before `main`): background threads purge freed
/// pages after about a second, and give them back at once rather than keep them lazily.
/// `_RJEM_MALLOC_CONF` in the environment overrides them.
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: ConfString =
    ConfString(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string's address, as jemalloc reads its settings (`const char *`).
#[repr(transparent)]
pub struct ConfString(*const std::ffi::c_char);

// SAFETY: it points at a string literal, never written
unsafe impl Sync for ConfString {}

/// The split allocator (see the module).
pub struct Split;

/// Whether jemalloc serves a block of this layout.
fn small(layout: &Layout) -> bool {
    layout.size() <= SMALL && layout.align() <= SMALL
}

// SAFETY: every block is made and given back by the same allocator, chosen by its layout, which
// the caller passes unchanged to `dealloc` (and as the old layout to `realloc`); a `realloc`
// across the boundary allocates from the other, copies the bytes both layouts hold, and frees
// the old block where it came from.
unsafe impl GlobalAlloc for Split {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract (a non-zero size) is passed on
        unsafe {
            if small(&layout) {
                Jemalloc.alloc(layout)
            } else {
                System.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`
        unsafe {
            if small(&layout) {
                Jemalloc.alloc_zeroed(layout)
            } else {
                System.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was made by this allocator with `layout`, so by the one chosen here
        unsafe {
            if small(&layout) {
                Jemalloc.dealloc(ptr, layout)
            } else {
                System.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to the alignment, does not
        // overflow isize, so this layout is valid
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `ptr` was made with `layout` by the allocator `small(&layout)` names; the
        // copy reads the bytes both blocks hold
        unsafe {
            match (small(&layout), small(&new)) {
                (true, true) => Jemalloc.realloc(ptr, layout, new_size),
                (false, false) => System.realloc(ptr, layout, new_size),
                _ => {
                    let moved = self.alloc(new);
                    if !moved.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    moved
                }
            }
        }
    }
}

/// What the bench prints of the allocator.
pub fn describe() -> String {
    format!(
        "blocks of up to {} KiB from jemalloc (background purge, ~1 s decay{}), larger ones from glibc",
        SMALL >> 10,
        if std::env::var_os("_RJEM_MALLOC_CONF").is_some() {
            ", _RJEM_MALLOC_CONF set"
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills a block of `n` bytes with a pattern through `Split`, moves it to `m` bytes, and
    /// checks the bytes both sizes hold survived.
    fn round_trip(n: usize, m: usize, align: usize) {
        let layout = Layout::from_size_align(n, align).unwrap();
        // SAFETY: non-zero sizes; each block is given back with the layout it was made with
        unsafe {
            let p = Split.alloc(layout);
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0, "{n} bytes aligned to {align}");
            for i in 0..n {
                *p.add(i) = (i % 251) as u8;
            }
            let q = Split.realloc(p, layout, m);
            assert!(!q.is_null());
            assert_eq!(
                q as usize % align,
                0,
                "moved to {m} bytes, aligned to {align}"
            );
            for i in 0..n.min(m) {
                assert_eq!(*q.add(i), (i % 251) as u8, "byte {i} of {n} -> {m}");
            }
            Split.dealloc(q, Layout::from_size_align(m, align).unwrap());
        }
    }

    #[test]
    fn blocks_keep_their_bytes_within_and_across_the_boundary() {
        for &(n, m) in &[
            (24, 100),          // jemalloc to jemalloc
            (SMALL, SMALL + 1), // across, growing
            (SMALL + 1, SMALL), // across, shrinking
            (100, 1 << 20),     // small to large
            (1 << 20, 64),      // large to small
            (1 << 20, 3 << 20), // glibc to glibc
            (SMALL - 8, SMALL), // up to the boundary
        ] {
            for align in [1, 8, 64] {
                round_trip(n, m, align);
            }
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_on_both_sides() {
        for n in [16, SMALL, SMALL + 1, 1 << 20] {
            let layout = Layout::from_size_align(n, 16).unwrap();
            // SAFETY: a non-zero size, given back with its layout
            unsafe {
                let p = Split.alloc_zeroed(layout);
                assert!(!p.is_null());
                assert!(
                    std::slice::from_raw_parts(p, n).iter().all(|&b| b == 0),
                    "{n} bytes"
                );
                Split.dealloc(p, layout);
            }
        }
    }

    #[test]
    fn the_boundary_goes_by_size_and_alignment() {
        assert!(small(&Layout::from_size_align(SMALL, 8).unwrap()));
        assert!(!small(&Layout::from_size_align(SMALL + 1, 8).unwrap()));
        assert!(!small(&Layout::from_size_align(64, 2 * SMALL).unwrap()));
    }

    #[test]
    fn the_process_runs_on_it() {
        // this test binary's global allocator is the split one (main.rs declares it for every
        // target of the crate): a small box is jemalloc's (its usable size is the size class
        // jemalloc rounded 24 bytes up to; asked of a glibc block, jemalloc would fault)
        let small = Box::new([1u8; 24]);
        // SAFETY: the box's block is live; it is jemalloc's if the split allocator works
        let usable = unsafe { tikv_jemallocator::usable_size(small.as_ptr()) };
        assert!((24..=32).contains(&usable), "usable size {usable}");
        let big: Vec<u8> = vec![7; 4 << 20];
        assert_eq!(
            big.iter().map(|&b| b as usize).sum::<usize>(),
            7 * (4 << 20)
        );
    }
}
