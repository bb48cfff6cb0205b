//! The coordinator: answers clients; owns the deadline of every stage. A query is embedded on an
//! embedder replica, scattered to one serving replica of every shard (failing over to another
//! replica of the same shard while the shard deadline leaves time), merged, optionally reranked,
//! and answered with a coverage report and per-stage timings. A shard that cannot answer in
//! time is left out and named; the query still answers.
//!
//! One module per concern: [`replicas`] (replica choice and the one failover helper),
//! `hedge` (hedged shard requests), `cache` (query embeddings and retrieval results),
//! [`retrieve`], [`ingest`] (and delete), [`ask`] (the answer relay), [`prompt`] (context
//! assembly), [`status`]. Ranking itself lives in `ragfleet_index::ranking`.
use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ragfleet_client::{groups, RoleMsg};
use ragfleet_config::ClusterConfig;
use ragfleet_proto::{Request, Response, Role, WireError};
use tracing::info;

use crate::call::{common, info, reply, request_id_of, traced, unsupported};
use crate::health::Health;
use crate::models::TokenCount;
use crate::streams::{next_response, StreamTable};

mod answer;
mod ask;
mod cache;
mod hedge;
pub mod ingest;
pub mod prompt;
pub(crate) mod replicas;
pub mod retrieve;
pub mod status;
#[cfg(test)]
mod tests;

pub use ingest::{delete, ingest};
pub use prompt::{assemble_context, SYSTEM_PROMPT};
pub use retrieve::retrieve;
pub use status::status;

/// Start arguments.
#[derive(Clone)]
pub struct CoordinatorArgs {
    /// Node name.
    pub node: String,
    /// The cluster.
    pub cfg: Arc<ClusterConfig>,
    /// The node's failure detector.
    pub health: Arc<Health>,
    /// The generator's tokenizer, when available (else ~4 characters a token).
    pub gen_tokens: Option<Arc<dyn TokenCount>>,
}

/// Shared context of a coordinator's requests.
pub struct Ctx {
    args: CoordinatorArgs,
    /// Requests being served, and answers being relayed (admission control).
    in_flight: Arc<AtomicUsize>,
    /// Query embeddings already made.
    embed_cache: cache::EmbedCache,
    /// Retrieval results already computed (checked against the shards' digests before use).
    results: cache::ResultCache,
    /// Per-replica search times and the hedge budget.
    hedging: hedge::Hedging,
    answers: Arc<AtomicUsize>,
    /// Round-robin position per group (one shared counter would advance by the number of
    /// groups a request touches and always pick the same replica of some groups).
    rr: std::sync::Mutex<HashMap<String, u64>>,
    streams: StreamTable,
}

impl Ctx {
    /// A context for `args`.
    pub fn new(args: CoordinatorArgs) -> Self {
        Ctx {
            embed_cache: cache::EmbedCache::new(args.cfg.query.embed_cache_entries),
            results: cache::ResultCache::new(args.cfg.query.result_cache_entries),
            hedging: hedge::Hedging::new(),
            args,
            in_flight: Arc::default(),
            answers: Arc::default(),
            rr: std::sync::Mutex::new(HashMap::new()),
            streams: StreamTable::default(),
        }
    }

    fn cfg(&self) -> &ClusterConfig {
        &self.args.cfg
    }

    /// Admits one more request (an answer when `answer`), or refuses it at once as overloaded
    /// when the coordinator already serves `query.max_in_flight` requests (or
    /// `query.max_answers_in_flight` answers): work past the bound is never queued.
    pub(crate) fn admit(&self, answer: bool) -> Result<Admission, WireError> {
        let q = &self.cfg().query;
        let refuse = |what: String| {
            crate::metrics::get()
                .refused
                .with_label_values(&[if answer { "answer" } else { "request" }])
                .inc();
            WireError::Overloaded(what)
        };
        let all = crate::bound::take(&self.in_flight, 1, q.max_in_flight).map_err(|_| {
            refuse(format!(
                "this coordinator is serving its limit of {} requests (query.max_in_flight); retry shortly",
                q.max_in_flight
            ))
        })?;
        let answers = answer
            .then(|| crate::bound::take(&self.answers, 1, q.max_answers_in_flight))
            .transpose()
            .map_err(|_| {
                refuse(format!(
                    "this coordinator is relaying its limit of {} answers (query.max_answers_in_flight); retry shortly",
                    q.max_answers_in_flight
                ))
            })?;
        Ok(Admission {
            _all: all,
            _answers: answers,
        })
    }

    fn count_tokens(&self, text: &str) -> usize {
        match &self.args.gen_tokens {
            Some(t) => t.count(text),
            None => text.len().div_ceil(4),
        }
    }
}

/// An admitted request: counted until dropped.
pub(crate) struct Admission {
    _all: crate::bound::Taken,
    _answers: Option<crate::bound::Taken>,
}

/// The coordinator actor.
#[derive(Debug, Default, Clone)]
pub struct CoordinatorActor;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Actor for CoordinatorActor {
    type Msg = RoleMsg;
    type State = Arc<Ctx>;
    type Arguments = CoordinatorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RoleMsg>,
        args: CoordinatorArgs,
    ) -> Result<Arc<Ctx>, ActorProcessingErr> {
        ractor::pg::join(groups::COORDINATORS.to_string(), vec![myself.get_cell()]);
        info!(node = %args.node, "coordinator started");
        Ok(Arc::new(Ctx::new(args)))
    }

    async fn handle(
        &self,
        _me: ActorRef<RoleMsg>,
        msg: RoleMsg,
        ctx: &mut Arc<Ctx>,
    ) -> Result<(), ActorProcessingErr> {
        let rid = request_id_of(&msg);
        let Some((req, port)) = common(msg, "coordinator", || {
            info(&ctx.args.node, Role::Coordinator)
        })
        .await
        else {
            return Ok(());
        };
        let ctx = ctx.clone();
        // admission: work past the coordinator's bounds is refused at once, never queued
        let admitted = match &req {
            Request::Retrieve { .. }
            | Request::Ingest { .. }
            | Request::Delete { .. }
            | Request::Embed { .. }
            | Request::Ask { .. } => match ctx.admit(matches!(req, Request::Ask { .. })) {
                Ok(a) => Some(a),
                Err(e) => {
                    reply(port, Response::Error(e));
                    return Ok(());
                }
            },
            _ => None,
        };
        // a request in flight is counted until its answer is sent
        let serving = (crate::metrics::get().serving("coordinator"), admitted);
        match req {
            Request::Retrieve { query, options } => {
                tokio::spawn(traced(rid, async move {
                    let _serving = serving;
                    reply(
                        port,
                        match retrieve(ctx, query, options).await {
                            Ok(r) => Response::Retrieved(r),
                            Err(e) => Response::Error(e),
                        },
                    );
                }));
            }
            Request::Ingest { docs } => {
                tokio::spawn(traced(rid, async move {
                    let _serving = serving;
                    reply(
                        port,
                        match ingest(ctx, docs).await {
                            Ok(r) => {
                                let m = &crate::metrics::get().ingested;
                                m.with_label_values(&["documents"]).inc_by(r.documents);
                                m.with_label_values(&["chunks"]).inc_by(r.chunks);
                                Response::Ingested(r)
                            }
                            Err(e) => Response::Error(e),
                        },
                    );
                }));
            }
            Request::Status => reply(port, Response::Status(status(&ctx))),
            Request::Delete { doc_ids, .. } => {
                tokio::spawn(traced(rid, async move {
                    let _serving = serving;
                    reply(port, Response::Ingested(delete(ctx, doc_ids).await))
                }));
            }
            Request::Ask { question, options } => {
                if let Err(e) =
                    retrieve::validate_text(&question, ctx.cfg().query.max_query_bytes, "question")
                        .and_then(|()| retrieve::validate_options(&options.retrieve))
                {
                    reply(port, Response::Error(e));
                    return Ok(());
                }
                // the answer's pieces are pushed to the client's inbox when it gave one
                let target = options
                    .push_to
                    .clone()
                    .filter(|_| options.push != Some(false));
                let (id, w) = ctx.streams.open_to(target);
                tokio::spawn(traced(rid, async move {
                    let _serving = serving;
                    ask::ask_task(ctx, question, options, w).await
                }));
                reply(port, Response::StreamStarted { stream: id });
            }
            Request::Embed { texts } => {
                tokio::spawn(traced(rid, async move {
                    let _serving = serving;
                    reply(port, answer::embed_request(&ctx, texts).await)
                }));
            }
            Request::Cancel { stream } => {
                // the client went away: the answer's relay sees it and cancels its generator
                if ctx.streams.cancel(stream) {
                    info!(stream, "answer cancelled by its client");
                }
                reply(port, Response::Ack);
            }
            Request::StreamNext { stream, wait_ms } => {
                tokio::spawn(async move {
                    reply(port, next_response(&ctx.streams, stream, wait_ms).await)
                });
            }
            other => reply(port, unsupported(&other, "coordinator")),
        }
        Ok(())
    }
}
