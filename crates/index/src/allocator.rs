//! The C allocator's arenas. glibc gives a process up to eight malloc arenas a core, and each
//! keeps the memory freed into it for its own next requests: in a node whose graph builds,
//! merges and searches allocate from many threads, that memory stays with the process
//! (`ragfleet bench shard --sizes 1000000 --no-load`, own memory after the ingest and
//! `malloc_trim`: 0.89-1.00 GB a million chunks with the default, 0.75-0.77 with two arenas on
//! two cores, the ingest no slower). A node limits them to one a core (at least two).

/// The environment variable glibc reads for the limit itself; when set, it is left alone.
pub const ARENA_ENV: &str = "MALLOC_ARENA_MAX";

/// The arenas to ask for on a machine of `cores`, given the environment's `MALLOC_ARENA_MAX`
/// (None when it is set: glibc applies it).
pub fn arenas_wanted(env: Option<&str>, cores: usize) -> Option<usize> {
    match env {
        Some(_) => None,
        None => Some(cores.max(2)),
    }
}

/// What [`limit_arenas`] set, once it ran.
static SET: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();

/// The arena limit [`limit_arenas`] set in this process (None: it did not run, or set none).
pub fn arena_limit() -> Option<usize> {
    SET.get().copied().flatten()
}

/// Limits glibc's malloc arenas as [`arenas_wanted`] says (call it first thing in `main`,
/// before other threads allocate); returns the limit set, None when none was (set by the
/// environment, or not glibc).
pub fn limit_arenas() -> Option<usize> {
    *SET.get_or_init(set_limit)
}

fn set_limit() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let n = arenas_wanted(std::env::var(ARENA_ENV).ok().as_deref(), cores)?;
        // SAFETY: mallopt sets one of the allocator's parameters; it takes the main arena's
        // lock itself
        let set = unsafe { libc::mallopt(libc::M_ARENA_MAX, n.min(i32::MAX as usize) as i32) };
        (set == 1).then_some(n)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Gives the memory the allocator holds free back to the system (glibc's `malloc_trim`);
/// returns whether any was. It takes each arena's lock in turn while it walks it, so a thread
/// allocating from that arena meanwhile waits: call it on an ordinary thread (not a
/// background one at a low priority, which could be preempted holding a lock) and only after
/// large frees. A no-op (false) where the allocator is not glibc's.
pub fn give_back() -> bool {
    let t = std::time::Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system
    let released = unsafe { libc::malloc_trim(0) == 1 };
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let released = false;
    let took = t.elapsed();
    if let Ok(mut g) = GIVE_BACKS.lock() {
        g.count += 1;
        g.last = Some((t, took));
    }
    tracing::debug!(
        ms = took.as_secs_f64() * 1e3,
        released,
        "the allocator gave its free memory back"
    );
    released
}

/// The give-backs of this process so far: how many, and when the last began and how long it
/// took (what `bench shard` puts beside the searches that ran meanwhile).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GiveBacks {
    /// [`give_back`] calls since the process started.
    pub count: u64,
    /// The last one's start and duration.
    pub last: Option<(std::time::Instant, std::time::Duration)>,
}

static GIVE_BACKS: std::sync::Mutex<GiveBacks> = std::sync::Mutex::new(GiveBacks {
    count: 0,
    last: None,
});

/// The give-backs so far (see [`GiveBacks`]).
pub fn give_backs() -> GiveBacks {
    GIVE_BACKS.lock().map(|g| *g).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_give_back_is_counted_with_its_start_and_duration() {
        let before = give_backs();
        let t = std::time::Instant::now();
        give_back();
        let after = give_backs();
        assert!(after.count > before.count);
        let (began, took) = after.last.expect("the last one is recorded");
        // another test's give-back may end meanwhile (tests run on several threads): only
        // when this call was the one counted between the two looks is it the last recorded
        if after.count == before.count + 1 {
            assert!(began >= t, "the last recorded is this call");
        }
        assert!(began + took <= std::time::Instant::now());
    }

    #[test]
    fn one_arena_a_core_unless_the_environment_says() {
        assert_eq!(arenas_wanted(None, 16), Some(16));
        assert_eq!(arenas_wanted(None, 1), Some(2), "at least two");
        assert_eq!(arenas_wanted(Some("8"), 16), None, "glibc applies it");
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if std::env::var(ARENA_ENV).is_err() {
            let set = limit_arenas();
            assert!(set.is_some(), "glibc takes the limit");
            assert_eq!(arena_limit(), set, "the limit set is reported");
            assert_eq!(limit_arenas(), set, "set once");
        }
    }
}
