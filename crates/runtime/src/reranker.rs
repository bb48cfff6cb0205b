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
    /// Scores already known (from stored sentence vectors): only the others are scored.
    known: Vec<Option<f32>>,
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
    /// The model's [`RerankModel::sentence_model`].
    sentence_model: Option<ragfleet_proto::ModelIdentity>,
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
        let r = match score_unknown(&*model, &job.query, &job.passages, &job.known) {
            Ok(s) => Response::Scores(s),
            Err(e) => Response::Error(WireError::Internal(e)),
        };
        reply(job.port, r);
    }
}

/// Scores the passages whose score is not known (`known` empty or shorter: none is).
fn score_unknown(
    model: &dyn RerankModel,
    query: &str,
    passages: &[String],
    known: &[Option<f32>],
) -> Result<Vec<f32>, String> {
    let todo: Vec<usize> = (0..passages.len())
        .filter(|&i| known.get(i).copied().flatten().is_none())
        .collect();
    let texts: Vec<String> = todo.iter().map(|&i| passages[i].clone()).collect();
    let fresh = if texts.is_empty() {
        Vec::new()
    } else {
        model.score(query, &texts)?
    };
    if fresh.len() != texts.len() {
        return Err(format!(
            "the model scored {} of {} passages",
            fresh.len(),
            texts.len()
        ));
    }
    let mut out: Vec<f32> = (0..passages.len())
        .map(|i| known.get(i).copied().flatten().unwrap_or(f32::MIN))
        .collect();
    for (i, s) in todo.into_iter().zip(fresh) {
        out[i] = s;
    }
    Ok(out)
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
            .spawn(move || {
                // scoring keeps the kernel's default slice (see the embedder's thread)
                ragfleet_index::priority::default_slice();
                work(model, rx)
            })?;
        ractor::pg::join(groups::RERANKERS.to_string(), vec![myself.get_cell()]);
        Ok(RerankerState {
            node: args.node,
            jobs: tx,
            sentence_model: args.model.sentence_model(),
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
            Request::Rerank {
                query,
                passages,
                known,
                model,
            } => {
                // the shards' scores from stored sentence vectors stand for this model's own
                // when it is the sentence reranker of the same embedding model
                let usable = model.is_some() && model == state.sentence_model;
                let known = if usable && known.len() == passages.len() {
                    known
                } else {
                    Vec::new()
                };
                if !known.is_empty() && known.iter().all(Option::is_some) {
                    // every score known: no model work, no queue
                    reply(
                        port,
                        Response::Scores(known.into_iter().flatten().collect()),
                    );
                    return Ok(());
                }
                let deadline = port.get_timeout().map(|t| Instant::now() + t);
                let job = Job {
                    query,
                    passages,
                    known,
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
            known: Vec::new(),
            model: None,
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

    /// A sentence reranker stand-in: scores a passage by its length, records what it scored.
    struct Lengths {
        model: ragfleet_proto::ModelIdentity,
        seen: Mutex<Vec<String>>,
    }

    impl RerankModel for Lengths {
        fn score(&self, _q: &str, passages: &[String]) -> Result<Vec<f32>, String> {
            self.seen.lock().unwrap().extend(passages.iter().cloned());
            Ok(passages.iter().map(|p| p.len() as f32).collect())
        }
        fn sentence_model(&self) -> Option<ragfleet_proto::ModelIdentity> {
            Some(self.model.clone())
        }
    }

    fn identity(name: &str) -> ragfleet_proto::ModelIdentity {
        ragfleet_proto::ModelIdentity {
            name: name.into(),
            weights_sha256: "00".into(),
            dim: 4,
            max_len: 8,
            pooling: "mean".into(),
            normalized: true,
        }
    }

    #[tokio::test]
    async fn stored_sentence_scores_of_the_same_model_are_used_and_only_the_rest_scored() {
        let model = Arc::new(Lengths {
            model: identity("m"),
            seen: Mutex::new(Vec::new()),
        });
        let args = RerankerArgs {
            node: "n".into(),
            model: model.clone(),
            max_queue: 4,
        };
        let (actor, _) = Actor::spawn(None, RerankerActor, args).await.unwrap();
        let ask = |known: Vec<Option<f32>>, m: Option<&str>| Rerank {
            query: "q".into(),
            passages: vec!["a".into(), "bb".into(), "ccc".into()],
            known,
            model: m.map(identity),
        };
        let t = Duration::from_secs(5);
        // every score known, same model: the model does nothing
        let s = call_typed(
            &actor,
            ask(vec![Some(0.9), Some(0.1), Some(0.5)], Some("m")),
            t,
        )
        .await
        .unwrap();
        assert_eq!(s, vec![0.9, 0.1, 0.5]);
        assert!(model.seen.lock().unwrap().is_empty());
        // one unknown: only it is scored
        let s = call_typed(&actor, ask(vec![Some(0.9), None, Some(0.5)], Some("m")), t)
            .await
            .unwrap();
        assert_eq!(s, vec![0.9, 2.0, 0.5]);
        assert_eq!(*model.seen.lock().unwrap(), vec!["bb".to_string()]);
        // another model's scores, or none said: every passage is scored afresh
        model.seen.lock().unwrap().clear();
        for m in [Some("other"), None] {
            let s = call_typed(&actor, ask(vec![Some(0.9), Some(0.1), Some(0.5)], m), t)
                .await
                .unwrap();
            assert_eq!(s, vec![1.0, 2.0, 3.0]);
        }
        assert_eq!(model.seen.lock().unwrap().len(), 6);
        actor.stop(None);
    }
}
