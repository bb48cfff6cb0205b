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
use ragfleet_proto::{Request, Response, Role, WireError};
use ragfleet_client::{groups, Envelope, RoleMsg};
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
    while let Ok(job) = jobs.recv() {
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
                match state.jobs.try_send(job) {
                    Ok(()) => {}
                    Err(TrySendError::Full(job)) => reply(
                        job.port,
                        Response::Error(WireError::Overloaded(
                            "reranker queue is full".into(),
                        )),
                    ),
                    Err(TrySendError::Disconnected(job)) => reply(
                        job.port,
                        Response::Error(WireError::Unavailable("reranker thread stopped".into())),
                    ),
                }
            }
            other => reply(port, unsupported(&other, "reranker")),
        }
        Ok(())
    }
}
