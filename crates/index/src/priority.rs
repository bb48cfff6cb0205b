//! Scheduling hints for the threads around an index: the threads that serve searches, and a
//! writer while it holds the searches off, ask the kernel for a short time slice; long CPU
//! work keeps the default one; background index work (graph builds, merges) runs at nice 10,
//! or under `SCHED_IDLE` where a node is started so.
//!
//! On a machine whose cores are all busy (a writer, its background graph builds and merges,
//! searches), a search woken when the lock it waits for frees waits for a core until the
//! thread running there has used its slice; with the kernel's default slice (0.75 ms times a
//! factor of the core count) and the scheduler's tick (4 ms at 250 Hz) that is milliseconds.
//! A thread that asks for a shorter slice (`sched_setattr`'s `sched_runtime`, honoured for
//! ordinary threads since Linux 6.12) may preempt a longer-sliced one when it wakes. Older
//! kernels ignore the request; other systems have neither.
//!
//! At nice 10 a search and the writer that wakes it may share one core (the scheduler places
//! a woken thread beside its waker) while the other core runs a merge, and the search waits
//! for the writer's slice. A core that runs only `SCHED_IDLE` threads counts as idle when a
//! woken thread is placed (Linux 5.4 on), and such a thread gives its core up the moment any
//! other wants it: on kernels without the short slices that ends most of those waits. But an
//! idle-class thread runs only on what searches, writes and models leave: on cores saturated
//! for long (a CPU embedder ingesting) builds and merges stop, segments pile up unmerged and
//! scanned by their codes, and an unprivileged thread cannot be moved back out of the class to
//! catch up. So it is a choice ([`set_idle_background`], `RAGFLEET_BACKGROUND_IDLE=1`), not the
//! default.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// The slice a latency-sensitive thread asks for: the least the kernel grants (0.1 ms).
pub const SHORT_SLICE_NS: u64 = 100_000;

/// The nice value of background index work.
pub const BACKGROUND_NICE: i32 = 10;

/// Whether threads ask short slices at all ([`set_short_slices`]).
static SHORT_SLICES: AtomicBool = AtomicBool::new(true);

/// Whether background work asks `SCHED_IDLE` ([`set_idle_background`]).
static IDLE_BACKGROUND: AtomicBool = AtomicBool::new(false);

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

/// Background work under `SCHED_IDLE` (on: a node started with `RAGFLEET_BACKGROUND_IDLE=1`)
/// or at nice [`BACKGROUND_NICE`] (off, the default), for the threads that call [`background`]
/// from then on.
pub fn set_idle_background(on: bool) {
    IDLE_BACKGROUND.store(on, Relaxed);
}

/// Whether background work asks `SCHED_IDLE` ([`set_idle_background`]).
pub fn idle_background() -> bool {
    IDLE_BACKGROUND.load(Relaxed)
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

/// Background work yields to searches, writes and models: the calling thread, when it runs
/// under the ordinary policy, gets nice [`BACKGROUND_NICE`] (or keeps a higher one) and the
/// kernel's default slice (a thread made by a latency-sensitive one may have inherited its
/// short slice), or moves to `SCHED_IDLE` with that nice value where [`set_idle_background`]
/// turned it on and the kernel takes it. Threads it makes inherit it. Returns whether the
/// thread runs under `SCHED_IDLE`.
pub fn background() -> bool {
    background_as(idle_background())
}

/// [`background`], under `SCHED_IDLE` when `idle`.
fn background_as(idle: bool) -> bool {
    #[cfg(not(target_os = "linux"))]
    let _ = idle;
    #[cfg(target_os = "linux")]
    {
        if linux::policy() == Some(linux::IDLE) {
            return true;
        }
        let nice = linux::nice().unwrap_or(0).max(BACKGROUND_NICE);
        if linux::ordinary() {
            if idle && linux::set_policy(linux::IDLE, nice, 0).is_ok() {
                SHORT.set(Some(false));
                return true;
            }
            if linux::set(nice, 0).is_ok() {
                SHORT.set(Some(false));
                return false;
            }
        }
        linux::renice(nice);
    }
    false
}

/// The CPU time the machine's hypervisor has taken from all its CPUs since boot, in ms
/// (`steal` in `/proc/stat`; `None` where there is no such file). A thread that holds the
/// searches off while its virtual CPU is not running holds them that long whatever it does:
/// `bench shard` reports what was stolen beside its longest holds.
pub fn stolen_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: u64 = line.split_whitespace().nth(8)?.parse().ok()?;
    // USER_HZ is 100 on every Linux the kernel's ABI allows
    Some(ticks * 10)
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

    /// `SCHED_IDLE`.
    pub(super) const IDLE: u32 = libc::SCHED_IDLE as u32;

    /// The calling thread's scheduling policy.
    pub(super) fn policy() -> Option<u32> {
        // SAFETY: plain integer argument (0: the calling thread).
        let p = unsafe { libc::sched_getscheduler(0) };
        u32::try_from(p).ok()
    }

    /// Whether the calling thread runs under `SCHED_OTHER`.
    pub(super) fn ordinary() -> bool {
        policy() == Some(libc::SCHED_OTHER as u32)
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
        set_policy(libc::SCHED_OTHER as u32, nice, slice_ns)
    }

    /// The calling thread under `policy` (`SCHED_OTHER` or `SCHED_IDLE`) with `nice` and a
    /// slice of `slice_ns` (0: the kernel's default).
    pub(super) fn set_policy(policy: u32, nice: i32, slice_ns: u64) -> std::io::Result<()> {
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            policy,
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

    /// The calling thread's scheduling policy, as the kernel reports it.
    fn policy() -> i64 {
        let text = std::fs::read_to_string("/proc/thread-self/sched").expect("sched file");
        text.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some("policy"))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().parse().ok())
            .expect("policy")
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
            // threads made by it, turned to background work: nice 10 (or, turned on,
            // SCHED_IDLE), the default slice, inherited by the threads they make
            for idle in [false, true] {
                std::thread::spawn(move || {
                    // (the process's switch left as it is: other tests' threads read it)
                    let took_idle = background_as(idle);
                    let (bg_prio, bg_slice) = reported();
                    let nice = prio - 120;
                    assert_eq!(bg_prio, 120 + nice.max(i64::from(BACKGROUND_NICE)));
                    assert_eq!(policy(), if took_idle { 5 } else { 0 });
                    if idle {
                        // refused only where the kernel has no such policy
                        assert!(took_idle, "SCHED_IDLE is granted to an ordinary thread");
                    } else {
                        assert!(!took_idle, "by default: nice 10 only");
                    }
                    if custom_slices() && took {
                        assert_ne!(bg_slice, Some(SHORT_SLICE_NS), "the short slice is dropped");
                    }
                    // background work never raises a priority; a search asked on such a
                    // thread leaves it as it is
                    assert_eq!(background_as(idle), took_idle);
                    latency_sensitive();
                    assert_eq!(reported().0, bg_prio);
                    assert_eq!(policy(), if took_idle { 5 } else { 0 });
                    let child = std::thread::spawn(|| (reported().0, policy()))
                        .join()
                        .expect("child");
                    if took_idle {
                        assert_eq!(child.1, 5, "SCHED_IDLE inherited");
                    } else {
                        assert_eq!(child, (bg_prio, 0), "nice 10 inherited");
                    }
                })
                .join()
                .expect("background thread");
            }
        })
        .join()
        .expect("search thread");
    }
}
