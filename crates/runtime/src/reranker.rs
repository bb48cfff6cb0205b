//! A reranker replica: scores (query, passage) pairs with a cross-encoder on a blocking thread.
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ragfleet_proto::{groups, Request, Response, Role, RoleMsg, WireError};

use crate::call::{common, info, reply, unsupported};
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

    async fn pre_start(
        &self,
        myself: ActorRef<RoleMsg>,
        args: RerankerArgs,
    ) -> Result<RerankerArgs, ActorProcessingErr> {
        ractor::pg::join(groups::RERANKERS.to_string(), vec![myself.get_cell()]);
        Ok(args)
    }

    async fn handle(
        &self,
        _me: ActorRef<RoleMsg>,
        msg: RoleMsg,
        state: &mut RerankerArgs,
    ) -> Result<(), ActorProcessingErr> {
        let Some((req, port)) = common(msg, "reranker", || info(&state.node, Role::Reranker)).await
        else {
            return Ok(());
        };
        match req {
            Request::Rerank { query, passages } => {
                let model = state.model.clone();
                tokio::task::spawn_blocking(move || {
                    reply(
                        port,
                        match model.score(&query, &passages) {
                            Ok(s) => Response::Scores(s),
                            Err(e) => Response::Error(WireError::Internal(e)),
                        },
                    )
                });
            }
            other => reply(port, unsupported(&other, "reranker")),
        }
        Ok(())
    }
}
