//! The queue of sealed segments' graph builds (and graph loads at open): one worker thread for
//! the whole process, at background priority, taking them first come first served.
//!
//! A seal used to start a thread of its own for its graph. Writes that seal a segment every
//! few hundred milliseconds then kept a dozen builds running at once, each at nice 10 but
//! together weighing as much as a thread at normal priority, each build also using every core:
//! on two cores a writer holding the index's write lock lost its core to them for a tick or
//! more, and every search waited for it. One build at a time (which uses
//! `index.build_threads` threads itself) bounds what graph building takes from the node's
//! searches and writes to what one background build does, whatever the number of shards and
//! seals; the total work is the same, only done in order.
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Queued jobs and the worker's wake-up.
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
}

static QUEUE: OnceLock<Option<&'static Queue>> = OnceLock::new();

/// The queue, its worker started at the first call (None when the thread cannot be made).
fn queue() -> Option<&'static Queue> {
    *QUEUE.get_or_init(|| {
        let q: &'static Queue = Box::leak(Box::new(Queue {
            jobs: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("graph-builds".into())
            .spawn(move || {
                crate::priority::background();
                loop {
                    let job = {
                        let mut jobs = q.jobs.lock().unwrap_or_else(|e| e.into_inner());
                        loop {
                            if let Some(job) = jobs.pop_front() {
                                break job;
                            }
                            jobs = q.ready.wait(jobs).unwrap_or_else(|e| e.into_inner());
                        }
                    };
                    // a build that panics loses its graph (the segment stays searched by its
                    // codes), not the worker
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        tracing::error!("a graph build panicked; its segment is scanned instead");
                    }
                }
            })
            .ok()
            .map(|_| q)
    })
}

/// Runs `job` on the build worker after the jobs queued before it; on the calling thread,
/// now, when the worker could not be started.
pub(super) fn submit(job: impl FnOnce() + Send + 'static) {
    match queue() {
        Some(q) => {
            q.jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back(Box::new(job));
            q.ready.notify_one();
        }
        None => job(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn jobs_run_one_at_a_time_in_order_on_one_background_thread() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let names = Arc::new(Mutex::new(std::collections::HashSet::new()));
        for i in 0..20 {
            let (order, running, most, names) =
                (order.clone(), running.clone(), most.clone(), names.clone());
            submit(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                names
                    .lock()
                    .unwrap()
                    .insert(std::thread::current().name().map(String::from));
                if i == 3 {
                    running.fetch_sub(1, Ordering::SeqCst);
                    panic!("a build that fails");
                }
                order.lock().unwrap().push(i);
                running.fetch_sub(1, Ordering::SeqCst);
            });
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while order.lock().unwrap().len() < 19 {
            assert!(std::time::Instant::now() < deadline, "the jobs did not run");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let want: Vec<i32> = (0..20).filter(|&i| i != 3).collect();
        assert_eq!(
            *order.lock().unwrap(),
            want,
            "first come, first served; a panic skipped"
        );
        assert_eq!(most.load(Ordering::SeqCst), 1, "one job at a time");
        assert_eq!(
            *names.lock().unwrap(),
            [Some("graph-builds".to_string())].into_iter().collect(),
            "all on the build worker"
        );
    }
}
