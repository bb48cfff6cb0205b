//! A reranker replica: scores (query, passage) pairs with a cross-encoder on a blocking thread.
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ragfleet_proto::{groups, ActorInfo, ChaosAction, ReplicaState, Request, Response, Role, RoleMsg, WireError};

use crate::call::{refuse, reply, unsupported};
use crate::models::RerankModel;

/// Start arguments.
#[derive(Clone)]
pub struct RerankerArgs {
    /// Node name.
    pub node: String,
    /// The model.
    pub model: Arc<dyn RerankModel>,
}

/// The reranker actor.
#[derive(Debug, Default, Clone)]
pub struct RerankerActor;

impl Actor for RerankerActor {
    type Msg = RoleMsg;
    type State = RerankerArgs;
    type Arguments = RerankerArgs;

    async fn pre_start(&self, myself: ActorRef<RoleMsg>, args: RerankerArgs) -> Result<RerankerArgs, ActorProcessingErr> {
        ractor::pg::join(groups::RERANKERS.to_string(), vec![myself.get_cell()]);
        Ok(args)
    }

    async fn handle(&self, _me: ActorRef<RoleMsg>, msg: RoleMsg, state: &mut RerankerArgs) -> Result<(), ActorProcessingErr> {
        let RoleMsg::Call(frame, port) = msg;
        if let Some(r) = refuse(&frame, "reranker") {
            reply(port, r);
            return Ok(());
        }
        let Ok(req) = frame.0 else { return Ok(()) };
        match req {
            Request::Ping => reply(
                port,
                Response::Pong(ActorInfo {
                    node: state.node.clone(),
                    role: Role::Reranker,
                    shard: None,
                    state: ReplicaState::Serving,
                    docs: 0,
                    chunks: 0,
                    last_seq: 0,
                }),
            ),
            Request::Rerank { query, passages } => {
                let model = state.model.clone();
                tokio::task::spawn_blocking(move || {
                    reply(port, match model.score(&query, &passages) {
                        Ok(s) => Response::Scores(s),
                        Err(e) => Response::Error(WireError::Internal(e)),
                    })
                });
            }
            Request::Chaos(ChaosAction::Panic) => panic!("chaos: reranker told to panic"),
            Request::Chaos(ChaosAction::Stall(ms)) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                reply(port, Response::Ack);
            }
            other => reply(port, unsupported(&other, "reranker")),
        }
        Ok(())
    }
}
