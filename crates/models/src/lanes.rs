//! Forward passes side by side on host threads ("lanes").
//!
//! On burn's CPU backend one matmul call scales poorly past one core (measured on the 2-core
//! machine: 2048x384x1536 runs at 69 GFLOP/s from one caller and 170 GFLOP/s in all from two
//! callers at once), and its element-wise kernels run on the calling thread. So an encoder
//! splits a batch into sub-batches and runs them on `lanes` threads at once, one per core.
//! On a GPU one lane is right: the device is the parallel part.
use std::sync::Mutex;

/// Lets the C allocator keep the memory of freed activations for the next forward pass. A
/// BERT forward pass on the CPU allocates and frees tensors of several MB each (a 256-token
/// batch of 8: 3 MB per projection, 12.6 MB per feed-forward activation). By default glibc
/// serves blocks over a moving threshold with fresh `mmap`s and gives the top of its heap back
/// past 128 KB free, so each of them is page-faulted in and zeroed again: measured on the
/// 2-core machine, 24-30% of a forward pass's time. This serves blocks under 64 MB from the
/// heap and keeps up to 256 MB free at its top (larger blocks, such as an index merge's
/// buffers, still come from and go back to the system). It is process-wide and costs memory
/// kept for reuse, so the binary calls it where a process loads a model (a process serving
/// only shards keeps glibc's defaults). Calling it again changes nothing; glibc's `mallopt`
/// takes the allocator's lock, so other threads may be running. A `GLIBC_TUNABLES` setting in
/// the environment wins. Elsewhere than Linux with glibc it does nothing.
pub fn keep_activation_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt only sets the allocator's parameters, under the allocator's lock
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        }
    }
}

/// Lanes the calling machine's CPU offers (its available parallelism, at least 1).
pub fn cpu_lanes() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Splits `n` inputs (sorted by length) into sub-batches of at most `max_batch`, and into at
/// least `lanes` when there are that many inputs, so that every lane has work; the sizes
/// differ by at most one.
pub(crate) fn split(n: usize, max_batch: usize, lanes: usize) -> Vec<std::ops::Range<usize>> {
    if n == 0 {
        return Vec::new();
    }
    let parts = n.div_ceil(max_batch.max(1)).max(lanes.min(n)).max(1);
    let (base, extra) = (n / parts, n % parts);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 0..parts {
        let len = base + usize::from(p < extra);
        out.push(start..start + len);
        start += len;
    }
    out
}

/// Runs `f` over sub-batches of inputs grouped by length: `lengths[i]` is input `i`'s length;
/// the inputs are sorted by it (so padding stays small), split as [`split`] does and the
/// sub-batches run on `lanes` threads. `f` gets a sub-batch's input indices and returns one
/// result per index; the results come back in input order.
pub(crate) fn by_length<R, F>(lengths: &[usize], max_batch: usize, lanes: usize, f: F) -> Vec<R>
where
    R: Send,
    F: Fn(&[usize]) -> Vec<R> + Sync,
{
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let groups: Vec<&[usize]> = split(order.len(), max_batch, lanes)
        .into_iter()
        .map(|r| &order[r])
        .collect();
    let mut out: Vec<Option<R>> = (0..lengths.len()).map(|_| None).collect();
    for (group, results) in groups.clone().into_iter().zip(map(groups, lanes, &f)) {
        for (&i, r) in group.iter().zip(results) {
            out[i] = Some(r);
        }
    }
    out.into_iter()
        .map(|r| r.expect("f returns one result per input of its sub-batch"))
        .collect()
}

/// Applies `f` to every job on up to `lanes` threads (the caller's among them), each taking the
/// next job when done with one; results come back in job order.
pub(crate) fn map<T, R, F>(jobs: Vec<T>, lanes: usize, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync,
{
    let lanes = lanes.clamp(1, jobs.len().max(1));
    if lanes == 1 {
        return jobs.into_iter().map(f).collect();
    }
    let queue = Mutex::new(jobs.into_iter().enumerate());
    let work = || {
        let mut done = Vec::new();
        loop {
            let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
            let Some((i, job)) = next else {
                return done;
            };
            done.push((i, f(job)));
        }
    };
    let mut all = std::thread::scope(|s| {
        let others: Vec<_> = (1..lanes).map(|_| s.spawn(work)).collect();
        let mut all = work();
        for lane in others {
            all.extend(lane.join().expect("a lane panicked"));
        }
        all
    });
    all.sort_unstable_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_every_input_once_and_give_every_lane_work() {
        for n in 0..100 {
            for max_batch in [1, 4, 32] {
                for lanes in [1, 2, 3, 8] {
                    let parts = split(n, max_batch, lanes);
                    let mut next = 0;
                    for p in &parts {
                        assert_eq!(p.start, next);
                        assert!(!p.is_empty() && p.len() <= max_batch.max(n.div_ceil(lanes)));
                        next = p.end;
                    }
                    assert_eq!(next, n);
                    if n >= lanes {
                        assert!(parts.len() >= lanes, "n {n} lanes {lanes}: {parts:?}");
                    }
                    let (lo, hi) = (
                        parts.iter().map(|p| p.len()).min().unwrap_or(0),
                        parts.iter().map(|p| p.len()).max().unwrap_or(0),
                    );
                    assert!(hi - lo <= 1);
                }
            }
        }
    }

    #[test]
    fn by_length_groups_similar_lengths_and_answers_in_input_order() {
        let lengths = [5usize, 1, 9, 3, 3, 7, 2];
        for lanes in [1, 2, 3] {
            let got = by_length(&lengths, 2, lanes, |group| {
                let lens: Vec<usize> = group.iter().map(|&i| lengths[i]).collect();
                // a sub-batch holds neighbours in length order
                assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 2);
                group.iter().map(|&i| (i, lengths[i] * 10)).collect()
            });
            let want: Vec<(usize, usize)> = lengths
                .iter()
                .enumerate()
                .map(|(i, l)| (i, l * 10))
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn map_keeps_job_order_on_any_number_of_lanes() {
        for lanes in [1, 2, 5] {
            let jobs: Vec<u64> = (0..37).collect();
            let got = map(jobs, lanes, |j| {
                // uneven work so that lanes finish out of order
                let spin = (0..(j % 7) * 20_000).fold(0u64, |a, x| a ^ std::hint::black_box(x));
                std::hint::black_box(spin);
                j * 3
            });
            assert_eq!(got, (0..37).map(|j| j * 3).collect::<Vec<u64>>());
        }
    }
}
