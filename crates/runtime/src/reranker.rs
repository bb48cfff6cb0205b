//! A reranker replica: scores (query, passage) pairs with a cross-encoder on one dedicated
//! thread, taking requests from a bounded queue.
//!
//! Work is bounded and abandoned work is dropped: a request that finds the queue full is
//! refused at once ([`WireError::Overloaded`]: the coordinator tries another replica or skips
//! the stage), and a queued request whose caller has gone (its reply port closed, or its
//! timeout passed) is skipped, not scored. The thread ends with the actor's state (the queue's
//! sender), also when the actor panics.
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ragfleet_client::{groups, Envelope, RoleMsg};
use ragfleet_proto::{Request, Response, Role, WireError};
use tracing::debug;

use crate::call::{common, info, reply, unsupported};
use crate::models::RerankModel;

/// Start arguments.
#[derive(Clone)]
pub struct RerankerArgs {
    /// Node name.
    pub node: String,
    /// The model.
    pub model: Arc<dyn RerankModel>,
    /// Requests held waiting beside the one being scored.
    pub max_queue: usize,
}

/// The reranker actor.
#[derive(Debug, Default, Clone)]
pub struct RerankerActor;

/// One queued request.
struct Job {
    query: String,
    passages: Vec<String>,
    port: RpcReplyPort<Envelope<Response>>,
    /// When the caller stops waiting (from the call's timeout), if it said.
    deadline: Option<Instant>,
}

impl Job {
    fn abandoned(&self) -> bool {
        self.port.is_closed() || self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// Its state.
pub struct RerankerState {
    node: String,
    jobs: SyncSender<Job>,
}

fn work(model: Arc<dyn RerankModel>, jobs: Receiver<Job>) {
    let queued = crate::metrics::get()
        .queued
        .with_label_values(&["reranker"]);
    while let Ok(job) = jobs.recv() {
        queued.dec();
        if job.abandoned() {
            debug!("rerank request abandoned by its caller; skipped");
            continue;
        }
        let r = match model.score(&job.query, &job.passages) {
            Ok(s) => Response::Scores(s),
            Err(e) => Response::Error(WireError::Internal(e)),
        };
        reply(job.port, r);
    }
}

impl Actor for RerankerActor {
    type Msg = RoleMsg;
    type State = RerankerState;
    type Arguments = RerankerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RoleMsg>,
        args: RerankerArgs,
    ) -> Result<RerankerState, ActorProcessingErr> {
        let (tx, rx) = sync_channel::<Job>(args.max_queue.max(1));
        let model = args.model.clone();
        std::thread::Builder::new()
            .name("reranker".into())
            .spawn(move || work(model, rx))?;
        ractor::pg::join(groups::RERANKERS.to_string(), vec![myself.get_cell()]);
        Ok(RerankerState {
            node: args.node,
            jobs: tx,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<RoleMsg>,
        msg: RoleMsg,
        state: &mut RerankerState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((req, port)) = common(msg, "reranker", || info(&state.node, Role::Reranker)).await
        else {
            return Ok(());
        };
        match req {
            Request::Rerank { query, passages } => {
                let deadline = port.get_timeout().map(|t| Instant::now() + t);
                let job = Job {
                    query,
                    passages,
                    port,
                    deadline,
                };
                let queued = crate::metrics::get()
                    .queued
                    .with_label_values(&["reranker"]);
                queued.inc();
                match state.jobs.try_send(job) {
                    Ok(()) => {}
                    Err(TrySendError::Full(job)) => {
                        queued.dec();
                        reply(
                            job.port,
                            Response::Error(WireError::Overloaded("reranker queue is full".into())),
                        )
                    }
                    Err(TrySendError::Disconnected(job)) => {
                        queued.dec();
                        reply(
                            job.port,
                            Response::Error(WireError::Unavailable(
                                "reranker thread stopped".into(),
                            )),
                        )
                    }
                }
            }
            other => reply(port, unsupported(&other, "reranker")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use ragfleet_client::typed::{call_typed, Rerank};

    use crate::call::CallError;

    /// A model that blocks until released and counts the requests it scored.
    struct Gate {
        entered: AtomicUsize,
        open: Mutex<bool>,
        cv: std::sync::Condvar,
        scored: AtomicUsize,
    }

    impl RerankModel for Gate {
        fn score(&self, _q: &str, passages: &[String]) -> Result<Vec<f32>, String> {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.cv.wait(open).unwrap();
            }
            self.scored.fetch_add(1, Ordering::SeqCst);
            Ok(vec![0.5; passages.len()])
        }
    }

    fn req() -> Rerank {
        Rerank {
            query: "q".into(),
            passages: vec!["p".into()],
        }
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_abandoned_work_is_not_scored() {
        let gate = Arc::new(Gate {
            entered: AtomicUsize::new(0),
            open: Mutex::new(false),
            cv: std::sync::Condvar::new(),
            scored: AtomicUsize::new(0),
        });
        let args = RerankerArgs {
            node: "n".into(),
            model: gate.clone(),
            max_queue: 1,
        };
        let (actor, _) = Actor::spawn(None, RerankerActor, args).await.unwrap();
        // the first request is taken by the worker and blocks in the model; its caller gives up
        let first = call_typed(&actor, req(), Duration::from_millis(100)).await;
        assert!(matches!(first, Err(CallError::Timeout)), "{first:?}");
        let start = std::time::Instant::now();
        while gate.entered.load(Ordering::SeqCst) == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the worker never took it"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // the second waits in the queue (its caller gives up too); the third finds it full
        let second = call_typed(&actor, req(), Duration::from_millis(100)).await;
        assert!(matches!(second, Err(CallError::Timeout)), "{second:?}");
        let t = std::time::Instant::now();
        match call_typed(&actor, req(), Duration::from_secs(5)).await {
            Err(CallError::Remote(WireError::Overloaded(m))) => {
                assert!(m.contains("queue is full"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(1), "refused at once");
        // release the model: the request it holds is scored; the queued ones whose callers
        // left are dropped unscored
        *gate.open.lock().unwrap() = true;
        gate.cv.notify_all();
        let released = std::time::Instant::now();
        let ok = loop {
            match call_typed(&actor, req(), Duration::from_secs(5)).await {
                // the abandoned request may still sit in the queue for a moment
                Err(CallError::Remote(WireError::Overloaded(_))) => {
                    assert!(released.elapsed() < Duration::from_secs(5));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                r => break r.unwrap(),
            }
        };
        assert_eq!(ok, vec![0.5]);
        assert_eq!(
            gate.scored.load(Ordering::SeqCst),
            2,
            "abandoned work was scored"
        );
        actor.stop(None);
    }
}
