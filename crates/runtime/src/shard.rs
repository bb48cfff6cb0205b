//! A shard replica: wraps a [`ShardIndex`]; recovers from disk, catches up from a serving peer
//! replica before it serves, answers searches and durable writes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ragfleet_index::{IndexSettings, ShardIndex};
use ragfleet_proto::{
    groups, ActorInfo, ReplicaState, Request, Response, Role, RoleMsg, WireError, WriteOp,
};
use tracing::{error, info, warn};

use crate::call::{call, common, reply, unsupported};

/// Start arguments of a shard replica.
#[derive(Debug, Clone)]
pub struct ShardArgs {
    /// Node name.
    pub node: String,
    /// Shard id.
    pub shard: u32,
    /// Data folder.
    pub dir: PathBuf,
    /// Index settings.
    pub settings: IndexSettings,
    /// How long to look for a serving peer before serving alone.
    pub peer_wait: Duration,
}

/// The shard actor.
#[derive(Debug, Default, Clone)]
pub struct ShardActor;

#[derive(Debug)]
struct Shared {
    index: RwLock<ShardIndex>,
    state: Mutex<ReplicaState>,
    counts: Mutex<(u64, u64, u64)>,
}

impl Shared {
    fn refresh_counts(&self, ix: &ShardIndex) {
        *self.counts.lock().expect("counts") = (ix.doc_count(), ix.chunk_count(), ix.last_seq());
    }
    fn state(&self) -> ReplicaState {
        *self.state.lock().expect("state")
    }
}

/// Its state.
#[derive(Debug)]
pub struct ShardState {
    args: ShardArgs,
    shared: Arc<Shared>,
    catch_up: Option<tokio::task::JoinHandle<()>>,
}

impl Actor for ShardActor {
    type Msg = RoleMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RoleMsg>,
        args: ShardArgs,
    ) -> Result<ShardState, ActorProcessingErr> {
        let (dir, settings) = (args.dir.clone(), args.settings.clone());
        let (index, report) =
            tokio::task::spawn_blocking(move || ShardIndex::open(&dir, settings)).await??;
        for p in &report.problems {
            warn!(shard = args.shard, problem = %p, "recovery found a problem");
        }
        let shared = Arc::new(Shared {
            index: RwLock::new(index),
            state: Mutex::new(ReplicaState::CatchingUp),
            counts: Mutex::new((0, 0, 0)),
        });
        shared.refresh_counts(&shared.index.read().expect("index"));
        ractor::pg::join(groups::shard(args.shard), vec![myself.get_cell()]);
        let catch_up = Some(tokio::spawn(catch_up(
            myself.clone(),
            args.clone(),
            shared.clone(),
        )));
        Ok(ShardState {
            args,
            shared,
            catch_up,
        })
    }

    async fn post_stop(
        &self,
        _me: ActorRef<RoleMsg>,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(h) = state.catch_up.take() {
            h.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        _me: ActorRef<RoleMsg>,
        msg: RoleMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        let shared = state.shared.clone();
        let describe = || {
            let (docs, chunks, last_seq) = *shared.counts.lock().expect("counts");
            ActorInfo {
                node: state.args.node.clone(),
                role: Role::Shard,
                shard: Some(state.args.shard),
                state: shared.state(),
                docs,
                chunks,
                last_seq,
            }
        };
        let Some((req, port)) = common(msg, "shard", describe).await else {
            return Ok(());
        };
        let shared = state.shared.clone();
        match req {
            Request::Search(q) => {
                if shared.state() != ReplicaState::Serving {
                    reply(
                        port,
                        Response::Error(WireError::Unavailable("replica is catching up".into())),
                    );
                    return Ok(());
                }
                tokio::task::spawn_blocking(move || {
                    let ix = shared.index.read().expect("index");
                    let r = if q.mode == ragfleet_proto::SearchMode::Hybrid {
                        ix.hybrid_parts(&q)
                            .map(|(dense, bm25)| Response::HybridHits { dense, bm25 })
                    } else {
                        ix.search(&q).map(Response::Hits)
                    };
                    reply(port, r.unwrap_or_else(|e| Response::Error(index_error(e))));
                });
            }
            Request::Write { ops, model } => {
                tokio::task::spawn_blocking(move || {
                    apply_write(&shared, port, |ix| ix.write(ops, &model))
                });
            }
            Request::Delete { doc_ids, version } => {
                tokio::task::spawn_blocking(move || {
                    apply_write(&shared, port, |ix| ix.delete(&doc_ids, version))
                });
            }
            Request::Dump => {
                tokio::task::spawn_blocking(move || {
                    let ix = shared.index.read().expect("index");
                    reply(
                        port,
                        Response::Dumped {
                            ops: ix.dump(),
                            model: ix.model().cloned(),
                        },
                    );
                });
            }
            other => reply(port, unsupported(&other, "shard")),
        }
        Ok(())
    }
}

/// Applies a durable write (blocking) and answers it. Writes that arrive while catching up are
/// applied too: write versions keep the peer's older copies from overwriting them.
fn apply_write(
    shared: &Shared,
    port: ractor::RpcReplyPort<ragfleet_proto::Frame<Response>>,
    write: impl FnOnce(&mut ShardIndex) -> Result<u64, ragfleet_index::IndexError>,
) {
    let mut ix = shared.index.write().expect("index");
    let r = write(&mut ix);
    shared.refresh_counts(&ix);
    reply(
        port,
        r.map(|seq| Response::Written { seq })
            .unwrap_or_else(|e| Response::Error(index_error(e))),
    );
}

fn index_error(e: ragfleet_index::IndexError) -> WireError {
    match e {
        ragfleet_index::IndexError::ModelMismatch { index, request } => {
            WireError::ModelMismatch { index, request }
        }
        ragfleet_index::IndexError::BadInput(m) => WireError::BadRequest(m),
        other => WireError::Internal(other.to_string()),
    }
}

/// Finds a serving peer replica and copies its documents; serves alone if none shows up.
async fn catch_up(me: ActorRef<RoleMsg>, args: ShardArgs, shared: Arc<Shared>) {
    let start = Instant::now();
    let group = groups::shard(args.shard);
    let mut source = None;
    while start.elapsed() < args.peer_wait {
        let (mut peers, mut all_catching_up_after_me) = (0, true);
        for cell in ractor::pg::get_members(&group) {
            if cell.get_id() == me.get_id() {
                continue;
            }
            let peer: ActorRef<RoleMsg> = cell.into();
            if let Ok(Response::Pong(info)) =
                call(&peer, Request::Ping, Duration::from_millis(500)).await
            {
                if info.state == ReplicaState::Serving {
                    source = Some((peer, info.node));
                    break;
                }
                peers += 1;
                all_catching_up_after_me &= info.node > args.node;
            }
        }
        if source.is_some() {
            break;
        }
        // a fresh cluster: every replica is catching up; the one on the lowest-named node
        // serves first and the others copy from it
        if peers > 0 && all_catching_up_after_me {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some((peer, node)) = source {
        match call(&peer, Request::Dump, Duration::from_secs(120)).await {
            Ok(Response::Dumped {
                ops,
                model: Some(model),
            }) => {
                let shared2 = shared.clone();
                let res =
                    tokio::task::spawn_blocking(move || apply_dump(&shared2, ops, &model)).await;
                match res {
                    Ok(Ok(n)) => {
                        info!(shard = args.shard, from = %node, changed = n, "caught up from peer")
                    }
                    Ok(Err(e)) => {
                        error!(shard = args.shard, error = %e, "catch-up failed; serving local data")
                    }
                    Err(e) => error!(shard = args.shard, error = %e, "catch-up task failed"),
                }
            }
            Ok(Response::Dumped { model: None, .. }) => info!(shard = args.shard, "peer is empty"),
            other => warn!(
                shard = args.shard,
                ?other,
                "catch-up dump failed; serving local data"
            ),
        }
    } else {
        info!(shard = args.shard, "no serving peer; serving local data");
    }
    *shared.state.lock().expect("state") = ReplicaState::Serving;
}

fn apply_dump(
    shared: &Shared,
    ops: Vec<WriteOp>,
    model: &ragfleet_proto::ModelIdentity,
) -> Result<usize, String> {
    // The index keeps the newer version of every document, so the peer's older copies (of
    // documents written here while catching up, or acknowledged here and missed by the peer)
    // are skipped. Local documents the peer lacks are kept (its deletions arrive as deletes).
    let mut ix = shared.index.write().expect("index");
    let changes: Vec<WriteOp> = ops.into_iter().filter(|o| !ix.has_identical(o)).collect();
    let n = changes.len();
    for batch in changes.chunks(256) {
        ix.write(batch.to_vec(), model).map_err(|e| e.to_string())?;
    }
    shared.refresh_counts(&ix);
    Ok(n)
}
