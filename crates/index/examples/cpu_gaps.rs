//! How long a busy thread of this machine loses its CPU to things outside the process: `cargo
//! run --release -p ragfleet-index --example cpu_gaps -- [SECONDS] [THREADS]` (default 30 s,
//! one thread a core) runs THREADS loops that only read the clock and counts the gaps between
//! two reads longer than 0.5, 1, 2, 4, 8 and 16 ms, with the longest, and the time the
//! hypervisor took from the machine's CPUs meanwhile (`steal` in `/proc/stat`). A lock holder
//! is such a thread: a gap while it holds the index's write side is a search's wait that no
//! code of ours makes, so this is the floor under `bench shard`'s longest holds on a machine.
use ragfleet_index::priority::stolen_ms;
use std::time::{Duration, Instant};

const LIMITS_MS: [f64; 6] = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().map_or(Ok(30.0), |a| a.parse())?;
    let threads: usize = match args.next() {
        Some(t) => t.parse()?,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let steal_before = stolen_ms();
    let span = Duration::from_secs_f64(secs);
    let loops: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let start = Instant::now();
                let (mut last, mut longest) = (start, Duration::ZERO);
                let mut counts = [0usize; LIMITS_MS.len()];
                loop {
                    let now = Instant::now();
                    let gap = now - last;
                    last = now;
                    if gap > longest {
                        longest = gap;
                    }
                    let ms = gap.as_secs_f64() * 1e3;
                    for (c, &limit) in counts.iter_mut().zip(&LIMITS_MS) {
                        *c += usize::from(ms > limit);
                    }
                    if now - start >= span {
                        return (counts, longest);
                    }
                }
            })
        })
        .collect();
    for (i, l) in loops.into_iter().enumerate() {
        let (counts, longest) = l.join().map_err(|_| "a loop panicked")?;
        let parts: Vec<String> = LIMITS_MS
            .iter()
            .zip(counts)
            .map(|(l, c)| format!("> {l} ms: {c}"))
            .collect();
        println!(
            "thread {i}: gaps {}; longest {:.2} ms",
            parts.join(", "),
            longest.as_secs_f64() * 1e3
        );
    }
    if let (Some(a), Some(b)) = (steal_before, stolen_ms()) {
        println!(
            "stolen by the hypervisor meanwhile: {} ms over all CPUs in {secs} s",
            b - a
        );
    }
    Ok(())
}
