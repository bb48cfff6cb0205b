//! Forward passes side by side on host threads ("lanes").
//!
//! On burn's CPU backend one matmul call scales poorly past one core (measured on the 2-core
//! machine: 2048x384x1536 runs at 69 GFLOP/s from one caller and 170 GFLOP/s in all from two
//! callers at once), and its element-wise kernels run on the calling thread. So an encoder
//! splits a batch into sub-batches and runs them on `lanes` threads at once, one per core.
//! On a GPU one lane is right: the device is the parallel part.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

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

/// Applies `f` to every job on up to `lanes` threads (the caller's among them), each taking the
/// next job when done with one; results come back in job order.
pub(crate) fn map<T, R, F>(jobs: Vec<T>, lanes: usize, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync,
{
    let n = jobs.len();
    let lanes = lanes.clamp(1, n.max(1));
    if lanes == 1 {
        return jobs.into_iter().map(f).collect();
    }
    let slots: Vec<Mutex<Option<T>>> = jobs.into_iter().map(|j| Mutex::new(Some(j))).collect();
    let results: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        let job = slots[i].lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(job) = job {
            let r = f(job);
            *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        }
    };
    std::thread::scope(|s| {
        for _ in 1..lanes {
            s.spawn(work);
        }
        work();
    });
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("every job ran: a panicking lane propagates out of the scope")
        })
        .collect()
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
