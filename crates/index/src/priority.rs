//! Scheduling hints for the threads around an index: the threads that serve searches, and a
//! writer while it holds the searches off, ask the kernel for a short time slice; long CPU
//! work keeps the default one; background index work (graph builds, merges) runs at a lower
//! priority.
//!
//! On a machine whose cores are all busy (a writer, its background graph builds and merges,
//! searches), a search woken when the lock it waits for frees waits for a core until the
//! thread running there has used its slice; with the kernel's default slice (0.75 ms times a
//! factor of the core count) and the scheduler's tick (4 ms at 250 Hz) that is milliseconds.
//! A thread that asks for a shorter slice (`sched_setattr`'s `sched_runtime`, honoured for
//! ordinary threads since Linux 6.12) may preempt a longer-sliced one when it wakes. Older
//! kernels ignore the request; other systems have neither.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// The slice a latency-sensitive thread asks for: the least the kernel grants (0.1 ms).
pub const SHORT_SLICE_NS: u64 = 100_000;

/// The nice value of background index work.
pub const BACKGROUND_NICE: i32 = 10;

/// Whether threads ask short slices at all ([`set_short_slices`]).
static SHORT_SLICES: AtomicBool = AtomicBool::new(true);

thread_local! {
    /// The slice this thread last set: Some(true) short, Some(false) default, None unknown.
    static SHORT: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Turns short slices on or off for the whole process (on by default): off, the calls below
/// leave every thread the kernel's default slice (a node started with
/// `RAGFLEET_SHORT_SLICES=0`; the baseline `bench shard` measures them against).
pub fn set_short_slices(on: bool) {
    SHORT_SLICES.store(on, Relaxed);
}

/// The calling thread's slice, short or the kernel's default, keeping its nice value, when it
/// runs under the ordinary policy (a thread an operator moved to another policy is left as it
/// is); nothing when it is set so already. Whether it is set so.
fn set_slice(short: bool) -> bool {
    let short = short && SHORT_SLICES.load(Relaxed);
    if SHORT.get() == Some(short) {
        return true;
    }
    #[cfg(target_os = "linux")]
    let done = match linux::nice() {
        Some(nice) if linux::ordinary() => {
            linux::set(nice, if short { SHORT_SLICE_NS } else { 0 }).is_ok()
        }
        _ => false,
    };
    #[cfg(not(target_os = "linux"))]
    let done = false;
    SHORT.set(done.then_some(short));
    done
}

/// Asks a short time slice for the calling thread: for the threads that serve searches (a
/// runtime's worker and blocking threads, a search task). Costs a system call only when the
/// thread's slice changes. Returns whether the thread has it (false where short slices are
/// off, the kernel refused, or the thread is under another policy).
pub fn latency_sensitive() -> bool {
    set_slice(true) && SHORT_SLICES.load(Relaxed)
}

/// The calling thread back to the kernel's default slice: for work that runs long on the CPU
/// (a model's batches, a write's log append and seal files), so that it does not hand its
/// core over at every wakeup of another thread. Returns whether the kernel took it.
pub fn default_slice() -> bool {
    set_slice(false)
}

/// A short slice while a lock that searches wait for is held ([`ShortSlice::hold`]): a holder
/// that loses its core keeps every waiting search waiting, so it asks for it back soonest.
#[derive(Debug)]
#[must_use = "the short slice lasts while the guard is held"]
pub struct ShortSlice {
    restore: bool,
}

impl ShortSlice {
    /// The calling thread asks a short slice until the guard drops (nothing to do for a
    /// thread that has one already).
    pub fn hold() -> ShortSlice {
        let before = SHORT.get();
        let restore = before != Some(true) && latency_sensitive();
        ShortSlice { restore }
    }
}

impl Drop for ShortSlice {
    fn drop(&mut self) {
        if self.restore {
            default_slice();
        }
    }
}

/// Background work yields to searches and writes: the calling thread gets nice
/// [`BACKGROUND_NICE`] (or keeps a higher one) and the kernel's default slice (a thread made
/// by a latency-sensitive one may have inherited its short slice). Threads it makes inherit
/// both.
pub fn background() {
    #[cfg(target_os = "linux")]
    {
        let nice = linux::nice().unwrap_or(0).max(BACKGROUND_NICE);
        if linux::ordinary() && linux::set(nice, 0).is_ok() {
            SHORT.set(Some(false));
        } else {
            linux::renice(nice);
        }
    }
}

#[cfg(target_os = "linux")]
mod linux {
    /// `struct sched_attr` (its first version, 56 bytes).
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
        util_min: u32,
        util_max: u32,
    }

    fn tid() -> libc::id_t {
        // SAFETY: gettid takes no arguments and cannot fail.
        unsafe { libc::syscall(libc::SYS_gettid) as libc::id_t }
    }

    /// Whether the calling thread runs under `SCHED_OTHER`.
    pub(super) fn ordinary() -> bool {
        // SAFETY: plain integer argument (0: the calling thread).
        unsafe { libc::sched_getscheduler(0) == libc::SCHED_OTHER }
    }

    /// The calling thread's nice value.
    pub(super) fn nice() -> Option<i32> {
        // SAFETY: errno is thread-local; getpriority takes plain integers. -1 is a valid nice
        // value, so errno tells an error apart.
        unsafe {
            *libc::__errno_location() = 0;
            let n = libc::getpriority(libc::PRIO_PROCESS, tid());
            (n != -1 || *libc::__errno_location() == 0).then_some(n)
        }
    }

    /// The calling thread under `SCHED_OTHER` with `nice` and a slice of `slice_ns` (0: the
    /// kernel's default).
    pub(super) fn set(nice: i32, slice_ns: u64) -> std::io::Result<()> {
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            policy: libc::SCHED_OTHER as u32,
            flags: 0,
            nice,
            priority: 0,
            runtime: slice_ns,
            deadline: 0,
            period: 0,
            util_min: 0,
            util_max: 0,
        };
        // SAFETY: `attr` is a valid sched_attr of the size it states, read by the kernel only
        // during the call; pid 0 is the calling thread.
        let r =
            unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    pub(super) fn renice(nice: i32) {
        // SAFETY: plain integers; only the calling thread is affected.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, tid(), nice);
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// (prio, se.slice) of the calling thread, as the kernel reports them (se.slice only on
    /// kernels with the EEVDF scheduler).
    fn reported() -> (i64, Option<u64>) {
        let text = std::fs::read_to_string("/proc/thread-self/sched").expect("sched file");
        let field = |name: &str| {
            text.lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(name))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        };
        let prio = field("prio").and_then(|v| v.parse().ok()).expect("prio");
        (prio, field("se.slice").and_then(|v| v.parse().ok()))
    }

    /// Whether this kernel honours an ordinary thread's slice request (Linux 6.12 on).
    fn custom_slices() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release
            .trim()
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().ok());
        matches!((parts.next(), parts.next()), (Some(Some(major)), Some(Some(minor))) if (major, minor) >= (6, 12))
    }

    #[test]
    fn a_search_thread_asks_a_short_slice_and_background_work_a_lower_priority() {
        std::thread::spawn(|| {
            super::default_slice();
            let (prio, default_slice) = reported();
            let took = latency_sensitive();
            let (after, slice) = reported();
            assert_eq!(after, prio, "the nice value is kept");
            if custom_slices() && took {
                assert_eq!(slice, Some(SHORT_SLICE_NS), "the short slice is granted");
                assert_ne!(default_slice, Some(SHORT_SLICE_NS));
                // and given back
                assert!(super::default_slice());
                assert_eq!(reported(), (prio, default_slice));
                // held while a guard is: a thread with the default slice gets the short one
                // back to default after, one with the short one keeps it
                {
                    let _g = ShortSlice::hold();
                    assert_eq!(reported().1, Some(SHORT_SLICE_NS));
                }
                assert_eq!(reported(), (prio, default_slice));
                assert!(latency_sensitive());
                drop(ShortSlice::hold());
                assert_eq!(reported().1, Some(SHORT_SLICE_NS));
                // turned off for the process: no thread asks one, a guard neither
                set_short_slices(false);
                assert!(!latency_sensitive());
                assert_eq!(reported(), (prio, default_slice));
                drop(ShortSlice::hold());
                assert_eq!(reported(), (prio, default_slice));
                set_short_slices(true);
                assert!(latency_sensitive());
            }
            // a thread made by it, turned to background work: lower priority, default slice
            std::thread::spawn(move || {
                background();
                let (bg_prio, bg_slice) = reported();
                let nice = prio - 120;
                assert_eq!(bg_prio, 120 + nice.max(i64::from(BACKGROUND_NICE)));
                if custom_slices() && took {
                    assert_ne!(bg_slice, Some(SHORT_SLICE_NS), "the short slice is dropped");
                }
                // background work never raises a priority
                background();
                assert_eq!(reported().0, bg_prio);
            })
            .join()
            .expect("background thread");
        })
        .join()
        .expect("search thread");
    }
}
