//! Where a graph's arrays live: in the process's memory, in a mapped graph file, in a scratch
//! file while a graph grows, or in memory backed by huge pages within a budget.
use super::*;

/// An array held in memory or read in place from a mapped graph file.
pub(super) enum Store<T> {
    Owned(Vec<T>),
    /// `len` items at byte `at` of the map; only for types valid for every bit pattern (i8,
    /// AtomicU32), at an offset aligned for them (checked where made).
    Mapped {
        map: Arc<memmap2::Mmap>,
        at: usize,
        len: usize,
    },
    /// `len` items at the start of a writable shared map of a scratch file that was unlinked
    /// once mapped: a graph being grown, whose pages are the page cache's (written back and
    /// dropped under memory pressure), not the process's own; gone with the map.
    Scratch {
        map: memmap2::MmapMut,
        len: usize,
    },
    /// `len` items at the start of an anonymous map advised to be backed by huge pages: a
    /// graph held in memory ([`Hnsw::into_memory`]), its bytes charged to a [`GraphMemory`]
    /// until dropped.
    Huge {
        map: memmap2::MmapMut,
        len: usize,
        _charge: Charge,
    },
}

impl<T> std::ops::Deref for Store<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Store::Owned(v) => v,
            // SAFETY: `mapped` checked that the range is inside the map and aligned for T;
            // T is i8 or AtomicU32 (same layout as u32), valid for any bytes. The map is
            // read-only and a mapped graph is never written (insertion builds an owned copy
            // first; a mapped graph has no node locks, so insertion into it panics before any
            // store).
            Store::Mapped { map, at, len } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().add(*at).cast::<T>(), *len)
            },
            // SAFETY: `scratch` made the map `len` items long, page aligned; T is i8 or
            // AtomicU32, valid for any bytes; the map is written only through `&AtomicU32`
            // (or before the store was made).
            Store::Scratch { map, len } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().cast::<T>(), *len)
            },
            // SAFETY: `huge_copy` made the map `len` items long, page aligned, from a slice of
            // T (i8 or AtomicU32, valid for any bytes); it is never written after.
            Store::Huge { map, len, .. } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().cast::<T>(), *len)
            },
        }
    }
}

impl<T> Store<T> {
    /// `len` items of `T` at byte `at` of `map`, if the range fits and is aligned.
    pub(super) fn mapped(map: &Arc<memmap2::Mmap>, at: usize, len: usize) -> Option<Store<T>> {
        let end = len.checked_mul(std::mem::size_of::<T>())?.checked_add(at)?;
        let aligned = (map.as_ptr() as usize + at).is_multiple_of(std::mem::align_of::<T>());
        (end <= map.len() && aligned).then(|| Store::Mapped {
            map: map.clone(),
            at,
            len,
        })
    }

    /// `len` items of `T` in a scratch file in `dir` (unlinked at once, so nothing is left
    /// behind), its bytes written by `fill` (zeros where it writes none).
    pub(super) fn scratch(
        dir: &std::path::Path,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> std::io::Result<Store<T>> {
        let path = dir.join(format!("hnsw-{:016x}.merging", rand::random::<u64>()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let mapped = (|| {
            file.set_len((len * std::mem::size_of::<T>()).max(1) as u64)?;
            // SAFETY: the file was just created by this process under a random name and is
            // unlinked below; nothing else maps or writes it.
            unsafe { memmap2::MmapMut::map_mut(&file) }
        })();
        let _ = std::fs::remove_file(&path);
        let mut map = mapped?;
        fill(&mut map[..len * std::mem::size_of::<T>()]);
        Ok(Store::Scratch { map, len })
    }

    /// A copy in anonymous memory advised to be backed by huge pages, charged to `budget`;
    /// None when the budget has no room or the memory cannot be mapped.
    pub(super) fn huge_copy(&self, budget: &'static GraphMemory) -> Option<Store<T>> {
        let bytes = self.len() * std::mem::size_of::<T>();
        let charge = budget.charge(bytes)?;
        let mut map = memmap2::MmapMut::map_anon(bytes.max(1)).ok()?;
        // before the first write, so that the pages are huge from the start
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        // SAFETY: T is i8 or AtomicU32: `bytes` plain bytes from the slice's start.
        let src = unsafe { std::slice::from_raw_parts(self.as_ptr().cast::<u8>(), bytes) };
        map[..bytes].copy_from_slice(src);
        Some(Store::Huge {
            map,
            len: self.len(),
            _charge: charge,
        })
    }

    /// Bytes it holds in the process's memory.
    pub(super) fn owned_bytes(&self) -> usize {
        match self {
            Store::Owned(v) => v.len() * std::mem::size_of::<T>(),
            Store::Huge { len, .. } => len * std::mem::size_of::<T>(),
            Store::Mapped { .. } | Store::Scratch { .. } => 0,
        }
    }

    pub(super) fn is_mapped(&self) -> bool {
        matches!(self, Store::Mapped { .. })
    }

    /// Asks the kernel to read items `first..first + items` from the file it is mapped from,
    /// without waiting for them (nothing when it is not mapped): reads asked for together are
    /// served together, where faulting on each in turn waits for one after the other.
    pub(super) fn read_ahead(&self, first: usize, items: usize) {
        if let Store::Mapped { map, at, .. } = self {
            let size = std::mem::size_of::<T>();
            let _ = map.advise_range(memmap2::Advice::WillNeed, at + first * size, items * size);
        }
    }

    /// Gives the kernel `advice` on its bytes in the file it is mapped from (nothing when it
    /// is not mapped).
    pub(super) fn advise(&self, advice: memmap2::Advice) {
        if let Store::Mapped { map, at, len } = self {
            let _ = map.advise_range(advice, *at, len * std::mem::size_of::<T>());
        }
    }
}

/// How many bytes of graphs may be copied out of their mapped files into memory backed by
/// huge pages ([`Hnsw::into_memory`]): a walk over a graph of a few hundred megabytes in
/// ordinary 4 KiB pages misses the TLB at nearly every node it scores (a million 384-d
/// nodes' codes span 94,000 pages), and the misses' page walks cost as much as the loads.
/// Graphs beyond the budget stay in their mapped files (page cache, evictable), so a shard
/// larger than memory still serves.
#[derive(Debug)]
pub struct GraphMemory {
    limit: AtomicUsize,
    used: AtomicUsize,
}

/// Bytes charged to a [`GraphMemory`], given back when dropped.
#[derive(Debug)]
pub(super) struct Charge {
    budget: &'static GraphMemory,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Relaxed);
    }
}

impl GraphMemory {
    /// A budget of `limit` bytes.
    pub const fn new(limit: usize) -> GraphMemory {
        GraphMemory {
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
        }
    }

    /// The process's budget: a quarter of the machine's memory unless [`GraphMemory::set_limit`]
    /// changed it, and nothing where the kernel gives no transparent huge pages (a copy would
    /// cost memory and gain nothing).
    pub fn global() -> &'static GraphMemory {
        static GLOBAL: std::sync::OnceLock<GraphMemory> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| {
            let limit = if huge_pages_available() {
                total_memory().map_or(0, |m| m / 4)
            } else {
                0
            };
            GraphMemory::new(limit as usize)
        })
    }

    /// Sets the limit (bytes); graphs already copied stay in memory.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Relaxed);
    }

    /// Sets the limit in megabytes (`index.graph_memory_mb`).
    pub fn set_limit_mb(&self, mb: u64) {
        self.set_limit(usize::try_from(mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX));
    }

    /// Bytes the budget allows.
    pub fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    fn charge(&'static self, bytes: usize) -> Option<Charge> {
        let limit = self.limit.load(Relaxed);
        self.used
            .fetch_update(Relaxed, Relaxed, |u| {
                u.checked_add(bytes).filter(|t| *t <= limit)
            })
            .ok()?;
        Some(Charge {
            budget: self,
            bytes,
        })
    }
}

/// Whether the kernel backs an anonymous map advised with `MADV_HUGEPAGE` by huge pages.
fn huge_pages_available() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]"))
}

/// The memory the process may use in bytes (Linux), if known: the machine's, or the lowest
/// limit of its memory control group and the groups above it when lower (a container, or a
/// service with a memory limit, sees the host's `MemTotal`).
fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let machine = kb * 1024;
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let limit = cgroup_limit(&own, std::path::Path::new("/sys/fs/cgroup"));
    Some(limit.map_or(machine, |l| l.min(machine)))
}

/// The lowest memory limit of the groups named in `own` (the text of `/proc/self/cgroup`) and
/// of the groups above them, under the control group file systems mounted at `root`: cgroup v2
/// (`0::/path`, `memory.max`) and v1's memory controller (`N:memory:/path`,
/// `memory.limit_in_bytes`). "max", an absurdly large number or an unreadable file: no limit.
fn cgroup_limit(own: &str, root: &std::path::Path) -> Option<u64> {
    let mut lowest: Option<u64> = None;
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (mount, file) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        // the group's folder, then each one above it up to the mount
        let mut group = mount.join(path.trim_start_matches('/'));
        loop {
            let limit = std::fs::read_to_string(group.join(file))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            if let Some(l) = limit {
                lowest = Some(lowest.map_or(l, |b| b.min(l)));
            }
            if group == mount || !group.pop() || !group.starts_with(&mount) {
                break;
            }
        }
    }
    lowest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_limit_is_the_lowest_of_the_groups_own_and_above() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let write = |dir: &str, file: &str, value: &str| {
            std::fs::create_dir_all(r.join(dir)).unwrap();
            std::fs::write(r.join(dir).join(file), value).unwrap();
        };
        // v1: the group's own limit is above its parent's; the root has none
        write("memory", "memory.limit_in_bytes", "9223372036854771712\n");
        write("memory/svc", "memory.limit_in_bytes", "600000000\n");
        write("memory/svc/probe", "memory.limit_in_bytes", "900000000\n");
        let v1 = "4:memory:/svc/probe\n3:cpu,cpuacct:/svc\n";
        assert_eq!(cgroup_limit(v1, r), Some(600_000_000));
        // v2: "max" is no limit; a lower one below it counts
        write("app", "memory.max", "max\n");
        write("app/worker", "memory.max", "300000000\n");
        assert_eq!(cgroup_limit("0::/app/worker\n", r), Some(300_000_000));
        assert_eq!(cgroup_limit("0::/app\n", r), None);
        // both listed (a hybrid mount): the lowest of all
        assert_eq!(
            cgroup_limit("0::/app/worker\n4:memory:/svc\n", r),
            Some(300_000_000)
        );
        // a group whose folder is not there (another namespace's path), or a malformed line
        assert_eq!(cgroup_limit("0::/elsewhere\nnot a line\n", r), None);
    }
}
