//! A shard replica: wraps a [`ShardIndex`]; recovers from disk, catches up from a serving peer
//! replica before it serves, answers searches and durable writes, and keeps converging with its
//! peers (anti-entropy, [`sync`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ragfleet_client::{groups, RoleMsg};
use ragfleet_index::{IndexSettings, ShardIndex, SharedShard};
use ragfleet_proto::{
    ActorInfo, ReplicaState, Request, Response, Role, SearchAnswer, WireError, WriteOp,
};
use tracing::{error, info, warn};

use ragfleet_client::typed::{self, call_typed};

use crate::call::{common, reply, unsupported};

mod sync;
use sync::{catch_up, check_buckets, FETCH_BYTES, MAX_FETCH};

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
    /// How often to compare digests with the peer replicas and pull what differs (None: never).
    pub anti_entropy: Option<Duration>,
    /// Searches run or held at once; past it a search is refused as overloaded.
    pub max_searches: usize,
}

/// The shard actor.
#[derive(Debug, Default, Clone)]
pub struct ShardActor;

/// A write waiting for the next group commit: its ops, model, reply port and request span.
type PendingWrite = (
    Vec<WriteOp>,
    ragfleet_proto::ModelIdentity,
    ractor::RpcReplyPort<ragfleet_client::Envelope<Response>>,
    Option<tracing::Span>,
);

#[derive(Debug)]
struct Shared {
    /// Searches read it beside writes' log appends and seals' file writes (see [`SharedShard`]).
    index: SharedShard,
    state: Mutex<ReplicaState>,
    counts: Mutex<(u64, u64, u64)>,
    /// Writes queued for the next group commit (see [`commit_writes`]).
    pending: Mutex<Vec<PendingWrite>>,
}

impl Shared {
    fn refresh_counts(&self, ix: &ShardIndex) {
        *self.counts.lock().expect("counts") = (ix.doc_count(), ix.chunk_count(), ix.last_seq());
    }
    fn state(&self) -> ReplicaState {
        *self.state.lock().expect("state")
    }
}

/// A task owned by an actor's state: aborted when the state drops, which ractor does when the
/// actor stops *and* when it panics (it skips `post_stop` then), so no task of an earlier
/// instance outlives it beside its successor.
#[derive(Debug)]
pub struct OwnedTask(tokio::task::JoinHandle<()>);

impl Drop for OwnedTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a restarted replica waits for its earlier instance to let go of the data folder
/// (a blocking write of the earlier instance may still be finishing).
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Opens the shard's index, waiting (polling, up to [`LOCK_WAIT`]) while another owner holds
/// its folder.
async fn open_index(
    args: &ShardArgs,
) -> Result<(ShardIndex, ragfleet_index::RecoveryReport), ragfleet_index::IndexError> {
    let start = Instant::now();
    loop {
        let (dir, settings) = (args.dir.clone(), args.settings.clone());
        let r = tokio::task::spawn_blocking(move || ShardIndex::open(&dir, settings))
            .await
            .map_err(|e| ragfleet_index::IndexError::BadInput(format!("open task: {e}")))?;
        match r {
            Err(ragfleet_index::IndexError::Locked { .. }) if start.elapsed() < LOCK_WAIT => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// Its state.
#[derive(Debug)]
pub struct ShardState {
    args: ShardArgs,
    shared: Arc<Shared>,
    catch_up: Option<OwnedTask>,
    maintenance: Option<OwnedTask>,
    /// Searches running or waiting for a blocking thread.
    searching: Arc<std::sync::atomic::AtomicUsize>,
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
        let (index, report) = open_index(&args).await?;
        for p in &report.problems {
            warn!(shard = args.shard, problem = %p, "recovery found a problem");
        }
        let shared = Arc::new(Shared {
            index: SharedShard::new(index),
            state: Mutex::new(ReplicaState::CatchingUp),
            counts: Mutex::new((0, 0, 0)),
            pending: Mutex::new(Vec::new()),
        });
        shared.refresh_counts(&shared.index.read());
        ractor::pg::join(groups::shard(args.shard), vec![myself.get_cell()]);
        let catch_up = Some(OwnedTask(tokio::spawn(catch_up(
            myself.clone(),
            args.clone(),
            shared.clone(),
        ))));
        let maintenance = Some(OwnedTask(tokio::spawn(maintain(
            args.shard,
            shared.clone(),
        ))));
        Ok(ShardState {
            args,
            shared,
            catch_up,
            maintenance,
            searching: Arc::default(),
        })
    }

    async fn post_stop(
        &self,
        _me: ActorRef<RoleMsg>,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        drop(state.catch_up.take());
        drop(state.maintenance.take());
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
        let rid = crate::call::request_id_of(&msg);
        let Some((req, port)) = common(msg, "shard", describe).await else {
            return Ok(());
        };
        // log lines of a client request's work carry its id
        let span = rid.map(|id| tracing::info_span!("request", id = %id));
        let shared = state.shared.clone();
        match req {
            Request::Search(_) | Request::SearchAt { .. }
                if shared.state() != ReplicaState::Serving =>
            {
                reply(
                    port,
                    Response::Error(WireError::Unavailable("replica is catching up".into())),
                );
            }
            Request::Search(q) => {
                spawn_search(state, port, span, q, None, |_, answer| match answer {
                    SearchAnswer::Two(dense, bm25) => Response::HybridHits { dense, bm25 },
                    SearchAnswer::One(h) => Response::Hits(h),
                    SearchAnswer::Unchanged => Response::Hits(Vec::new()),
                })
            }
            Request::SearchAt {
                query,
                known_digest,
            } => spawn_search(state, port, span, query, known_digest, |digest, answer| {
                Response::Searched { digest, answer }
            }),
            Request::Write { ops, model } => {
                shared
                    .pending
                    .lock()
                    .expect("pending")
                    .push((ops, model, port, span));
                tokio::task::spawn_blocking(move || commit_writes(&shared));
            }
            Request::Delete { doc_ids, version } => {
                tokio::task::spawn_blocking(move || {
                    apply_write(&shared, port, |ix| ix.delete(&doc_ids, version))
                });
            }
            Request::BucketDigests { buckets } => {
                if let Err(e) = check_buckets(buckets, &[]) {
                    reply(port, Response::Error(e));
                    return Ok(());
                }
                tokio::task::spawn_blocking(move || {
                    let d = shared.index.read().bucket_digests(buckets);
                    reply(port, Response::BucketDigests(d));
                });
            }
            Request::VersionsIn {
                buckets,
                wanted,
                max_bytes,
            } => {
                if let Err(e) = check_buckets(buckets, &wanted) {
                    reply(port, Response::Error(e));
                    return Ok(());
                }
                let max_bytes = max_bytes.min(ragfleet_proto::VERSIONS_PAGE_BYTES) as usize;
                tokio::task::spawn_blocking(move || {
                    let (versions, covered) =
                        shared.index.read().versions_in(buckets, &wanted, max_bytes);
                    let covered = covered as u32;
                    reply(port, Response::Versions { versions, covered });
                });
            }
            Request::Digest => {
                tokio::task::spawn_blocking(move || {
                    let ix = shared.index.read();
                    let r = Response::Digest {
                        digest: ix.digest(),
                        docs: ix.doc_count(),
                    };
                    drop(ix);
                    reply(port, r);
                });
            }
            Request::Fetch { doc_ids } => {
                if doc_ids.len() > MAX_FETCH {
                    reply(
                        port,
                        Response::Error(WireError::BadRequest(format!(
                            "fetch of {} documents (at most {MAX_FETCH} a call)",
                            doc_ids.len()
                        ))),
                    );
                    return Ok(());
                }
                tokio::task::spawn_blocking(move || {
                    let ix = shared.index.read();
                    let (ops, covered) = ix.fetch_bounded(&doc_ids, FETCH_BYTES);
                    let r = Response::Fetched {
                        ops,
                        model: ix.model().cloned(),
                        covered: covered as u32,
                    };
                    drop(ix);
                    reply(port, r);
                });
            }
            other => reply(port, unsupported(&other, "shard")),
        }
        Ok(())
    }
}

/// How often the index is asked whether a merge finished or should start.
const MAINTAIN_EVERY: Duration = Duration::from_millis(250);

/// Commits finished background merges and starts the next ones: a check under the read lock,
/// the write lock only when there is something to do (a commit is a rename and a manifest).
async fn maintain(shard: u32, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(MAINTAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = shared.clone();
        let r = tokio::task::spawn_blocking(move || {
            if !s.index.read().needs_maintenance() {
                return Ok(false);
            }
            s.index.maintain()
        })
        .await;
        match r {
            Ok(Err(e)) => warn!(shard, error = %e, "index maintenance failed"),
            // the runtime is shutting down
            Err(e) if e.is_cancelled() => return,
            Err(e) => warn!(shard, error = %e, "index maintenance task failed"),
            Ok(Ok(_)) => {}
        }
    }
}

/// Runs a search on the blocking pool and answers it as `answer` makes it; past
/// `index.max_searches` searches at once it is refused as overloaded.
fn spawn_search(
    state: &ShardState,
    port: ractor::RpcReplyPort<ragfleet_client::Envelope<Response>>,
    span: Option<tracing::Span>,
    q: ragfleet_proto::SearchQuery,
    known: Option<u64>,
    answer: impl FnOnce(u64, SearchAnswer) -> Response + Send + 'static,
) {
    let max = state.args.max_searches;
    let Ok(admitted) = crate::bound::take(&state.searching, 1, max) else {
        let e = format!("shard replica busy: {max} searches at once (index.max_searches)");
        return reply(port, Response::Error(WireError::Overloaded(e)));
    };
    let (shared, shard) = (state.shared.clone(), state.args.shard);
    tokio::task::spawn_blocking(move || {
        let _admitted = admitted;
        let _in = span.as_ref().map(|s| s.enter());
        // this blocking thread may have run a write last (ragfleet_index::priority)
        ragfleet_index::priority::latency_sensitive();
        let r = search(&shared, shard, &q, known).map(|(digest, a)| answer(digest, a));
        reply(port, r.unwrap_or_else(|e| Response::Error(index_error(e))));
    });
}

/// Searches the replica (blocking) unless its digest is still `known` (then `Unchanged`);
/// returns the digest of the state it read.
fn search(
    shared: &Shared,
    shard: u32,
    q: &ragfleet_proto::SearchQuery,
    known: Option<u64>,
) -> Result<(u64, SearchAnswer), ragfleet_index::IndexError> {
    let t = Instant::now();
    let ix = shared.index.read();
    let digest = ix.digest();
    if known == Some(digest) {
        return Ok((digest, SearchAnswer::Unchanged));
    }
    let answer = if q.mode == ragfleet_proto::SearchMode::Hybrid {
        ix.hybrid_parts(q).map(|(d, b)| SearchAnswer::Two(d, b))
    } else {
        ix.search(q).map(SearchAnswer::One)
    }?;
    drop(ix);
    crate::metrics::get().shard_search(shard, t.elapsed());
    Ok((digest, answer))
}

/// Group commit (blocking): whoever takes the index's writer role first logs every queued
/// write with one fsync (beside the searches), applies them (the only moment searches wait)
/// and answers each; a task that finds the queue emptied by an earlier one has nothing left to
/// do. Concurrent writes (ingest keeps several in flight, from every coordinator) thus share
/// fsyncs, and nothing is answered before it is durable and applied.
fn commit_writes(shared: &Shared) {
    // a write's log append, apply and seal files run long on the CPU: the kernel's default
    // slice, the short one only while it holds the searches off (SharedShard)
    ragfleet_index::priority::default_slice();
    let done = shared.index.write_queued(|| {
        std::mem::take(&mut *shared.pending.lock().expect("pending"))
            .into_iter()
            .map(|(ops, model, port, span)| (ops, model, (port, span)))
            .collect()
    });
    if done.is_empty() {
        return;
    }
    shared.refresh_counts(&shared.index.read());
    if done.len() > 1 {
        tracing::debug!(writes = done.len(), "group commit");
    }
    for ((port, span), r) in done {
        let _in = span.as_ref().map(|s| s.enter());
        reply(port, written(r));
    }
}

/// The answer to a durable write: the sequence number reached, or why it was refused.
fn written(r: Result<u64, ragfleet_index::IndexError>) -> Response {
    r.map(|seq| Response::Written { seq })
        .unwrap_or_else(|e| Response::Error(index_error(e)))
}

/// Applies a durable write (blocking) and answers it. Writes that arrive while catching up are
/// applied too: write versions keep the peer's older copies from overwriting them.
fn apply_write(
    shared: &Shared,
    port: ractor::RpcReplyPort<ragfleet_client::Envelope<Response>>,
    write: impl FnOnce(&SharedShard) -> Result<u64, ragfleet_index::IndexError>,
) {
    // as commit_writes
    ragfleet_index::priority::default_slice();
    let r = write(&shared.index);
    shared.refresh_counts(&shared.index.read());
    reply(port, written(r));
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
