//! `ragfleet`: nodes, the local cluster launcher, the embedded demo, the client commands, the
//! model commands, evaluation and benchmarks.
#[cfg(all(feature = "jemalloc", target_os = "linux"))]
mod alloc;
mod bench;
mod bench_ingest;
mod bench_load;
mod bench_set;
mod bench_shard;
mod chaos;
mod cli;
mod commands;
mod corpus;
mod demo;
mod eval;
mod eval_answers;
mod eval_suite;
mod loader;
mod output;

use std::time::Duration;

use clap::Parser;

use crate::cli::Cli;

// small blocks from jemalloc, large ones from glibc (see alloc.rs)
#[cfg(all(feature = "jemalloc", target_os = "linux"))]
#[global_allocator]
static GLOBAL: alloc::Split = alloc::Split;

fn main() {
    // one malloc arena a core (unless MALLOC_ARENA_MAX says otherwise), before any other
    // thread allocates: the memory freed by graph builds and merges on many threads otherwise
    // stays with the process in up to eight arenas a core (ragfleet_index::allocator)
    ragfleet_index::allocator::limit_arenas();
    let cli = Cli::parse();
    // searches run on the runtime's threads (async or blocking): each asks the kernel for a
    // short slice, so that one woken on a core busy with background index work (nice 10) gets
    // it soon; a write task keeps the default but while it holds the index's write lock
    // (ragfleet_index::priority); RAGFLEET_SHORT_SLICES=0 leaves every thread the default
    if std::env::var("RAGFLEET_SHORT_SLICES").as_deref() == Ok("0") {
        ragfleet_index::priority::set_short_slices(false);
    }
    // background graph builds and merges run at nice 10; RAGFLEET_BACKGROUND_IDLE=1 puts them
    // under SCHED_IDLE (only on what searches, writes and models leave: they stop on cores
    // saturated for long)
    if std::env::var("RAGFLEET_BACKGROUND_IDLE").as_deref() == Ok("1") {
        ragfleet_index::priority::set_idle_background(true);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| {
            ragfleet_index::priority::latency_sensitive();
        })
        .build()
        .expect("tokio runtime");
    let res = rt.block_on(commands::run(cli));
    if let Err(e) = res {
        eprintln!("error: {:#}", e);
        std::process::exit(1);
    }
    // do not wait for actors and blocking tasks still winding down
    rt.shutdown_timeout(Duration::from_millis(200));
}
