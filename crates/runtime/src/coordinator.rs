//! The coordinator: answers clients; owns the deadline of every stage. A query is embedded on an
//! embedder replica, scattered to one serving replica of every shard (failing over to another
//! replica of the same shard while the shard deadline leaves time), merged, optionally reranked,
//! and answered with a coverage report and per-stage timings. A shard that cannot answer in
//! time is left out and named; the query still answers.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ragfleet_config::{ClusterConfig, NoCoverage, RerankFusion};
use ragfleet_index::{merge_top_k, rrf};
use ragfleet_proto::{AskOptions, AskSummary, ClusterStatus, Coverage, Document, Hit, IngestResult, LeftOut, ModelIdentity, NodeStatus, ReplicaStatus, Request, Response, RetrieveOptions, RetrieveResult, Role, SearchMode, SearchQuery, ShardStatus, Source, Timings, WireError, WriteOp};
use ragfleet_client::{groups, RoleMsg};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::call::{call, common, info, reply, unsupported, CallError};
use crate::health::{Health, Member};
use crate::models::TokenCount;
use crate::streams::{next_response, StreamTable, StreamWriter};

/// Default system prompt of answers.
pub const SYSTEM_PROMPT: &str = "You are a helpful assistant. Answer the question using the passages given. \
Cite the passage ids you used in square brackets, like [doc-1]. If the passages do not contain the answer, say so.";

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
    /// Round-robin position per group (one shared counter would advance by the number of
    /// groups a request touches and always pick the same replica of some groups).
    rr: std::sync::Mutex<HashMap<String, u64>>,
    streams: StreamTable,
}

/// The coordinator actor.
#[derive(Debug, Default, Clone)]
pub struct CoordinatorActor;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Ctx {
    fn cfg(&self) -> &ClusterConfig {
        &self.args.cfg
    }

    /// Serving members of a group, rotated for load balance; members never pinged yet come
    /// last (a fresh cluster answers before the first heartbeat round).
    fn candidates(&self, group: &str) -> Vec<Member> {
        let h = &self.args.health;
        let mut serving = h.serving(group);
        if !serving.is_empty() {
            let mut rr = self.rr.lock().expect("rr");
            let n = rr
                .entry(group.to_string())
                .or_insert_with(|| rand::random::<u64>() % 1024);
            *n += 1;
            let r = (*n % serving.len() as u64) as usize;
            serving.rotate_left(r);
        }
        serving.extend(
            h.unproven(group)
                .into_iter()
                .map(|actor| Member::unproven(actor, group)),
        );
        serving
    }

    fn count_tokens(&self, text: &str) -> usize {
        match &self.args.gen_tokens {
            Some(t) => t.count(text),
            None => text.len().div_ceil(4),
        }
    }
}

fn validate_text(text: &str, max: usize, what: &str) -> Result<(), WireError> {
    if text.trim().is_empty() {
        return Err(WireError::BadRequest(format!("empty {what}")));
    }
    if text.len() > max {
        return Err(WireError::BadRequest(format!(
            "{what} of {} bytes exceeds the limit of {max} bytes (query.max_query_bytes)",
            text.len()
        )));
    }
    Ok(())
}

async fn embed_query(
    ctx: &Ctx,
    text: &str,
    deadline: Instant,
) -> Result<(Vec<f32>, ModelIdentity), WireError> {
    let mut last = "no embedder replica is reachable".to_string();
    for m in ctx.candidates(groups::EMBEDDERS) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(WireError::Deadline);
        }
        match call(
            &m.actor,
            Request::Embed {
                texts: vec![text.to_string()],
            },
            left,
        )
        .await
        {
            Ok(Response::Embeddings { model, mut vectors }) if vectors.len() == 1 => {
                return Ok((vectors.pop().unwrap_or_default(), model))
            }
            Ok(other) => last = format!("unexpected answer {other:?}"),
            Err(CallError::Remote(e @ WireError::BadRequest(_))) => return Err(e),
            Err(e) => {
                ctx.args.health.mark_failed(m.actor.get_id());
                last = format!(
                    "embedder on {}: {e}",
                    m.info.map(|i| i.node).unwrap_or_default()
                );
            }
        }
    }
    Err(WireError::Unavailable(last))
}

/// A shard's answer: one ranking, or the two unfused rankings of a hybrid search.
enum ShardHits {
    One(Vec<Hit>),
    Two(Vec<Hit>, Vec<Hit>),
}

/// Merges the shards' answers: single rankings by score; for hybrid, each ranking across
/// shards by score, then the two global rankings fused by reciprocal rank (k = 60). Fusing the
/// shards' own fused lists by rank would rank every shard's first hit alike.
fn merge_shard_answers(answers: Vec<ShardHits>, depth: usize) -> Vec<Hit> {
    let (mut lists, mut dense, mut bm25) = (Vec::new(), Vec::new(), Vec::new());
    for a in answers {
        match a {
            ShardHits::One(h) => lists.push(h),
            ShardHits::Two(d, b) => {
                dense.push(d);
                bm25.push(b);
            }
        }
    }
    if dense.is_empty() {
        return merge_top_k(lists, depth);
    }
    let deep = (depth * 2).max(20);
    rrf(
        &[merge_top_k(dense, deep), merge_top_k(bm25, deep)],
        60.0,
        depth,
    )
}

async fn shard_search(
    ctx: Arc<Ctx>,
    shard: u32,
    q: SearchQuery,
    deadline: Instant,
) -> Result<ShardHits, String> {
    let replicas = ctx.candidates(&groups::shard(shard));
    if replicas.is_empty() {
        return Err("no_live_replica".into());
    }
    let mut reason = "no_live_replica".to_string();
    let n = replicas.len();
    for (i, r) in replicas.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("deadline".into());
        }
        // leave room to fail over to the next replica inside the same deadline
        let budget = if i + 1 < n { left / 2 } else { left };
        match call(&r.actor, Request::Search(q.clone()), budget).await {
            Ok(Response::Hits(h)) => return Ok(ShardHits::One(h)),
            Ok(Response::HybridHits { dense, bm25 }) => return Ok(ShardHits::Two(dense, bm25)),
            Ok(other) => reason = format!("error: unexpected answer {other:?}"),
            Err(CallError::Remote(e @ WireError::ModelMismatch { .. })) => {
                return Err(format!("error: {e}"))
            }
            Err(CallError::Remote(e @ WireError::BadRequest(_))) => {
                return Err(format!("error: {e}"))
            }
            Err(CallError::Timeout) => {
                ctx.args.health.mark_failed(r.actor.get_id());
                reason = "deadline".into();
            }
            // the replica is gone (its node died, the actor stopped): the reason stays
            // `no_live_replica` unless another replica timed out or failed
            Err(CallError::Unreachable(_)) => ctx.args.health.mark_failed(r.actor.get_id()),
            Err(e) => {
                ctx.args.health.mark_failed(r.actor.get_id());
                reason = format!("error: {e}");
            }
        }
    }
    Err(reason)
}

/// The retrieval path.
pub async fn retrieve(
    ctx: Arc<Ctx>,
    query: String,
    opts: RetrieveOptions,
) -> Result<RetrieveResult, WireError> {
    let t0 = Instant::now();
    let cfg = ctx.cfg().clone();
    validate_text(&query, cfg.query.max_query_bytes, "query")?;
    let deadline =
        t0 + Duration::from_millis(opts.deadline_ms.unwrap_or(cfg.query.deadline_ms).max(1));
    let k = opts.k.unwrap_or(cfg.query.top_k).clamp(1, 1000);
    let rerank = opts.rerank.unwrap_or_else(|| cfg.rerank_by_default());
    let mut timings = Timings::default();

    let (vector, model) = if opts.mode == SearchMode::Bm25 {
        (Vec::new(), None)
    } else {
        let (v, m) = embed_query(&ctx, &query, deadline).await?;
        (v, Some(m))
    };
    timings.embed = ms(t0.elapsed());

    let t1 = Instant::now();
    let depth = if rerank {
        k.max(cfg.query.rerank_depth)
    } else {
        k
    };
    let q = SearchQuery {
        vector,
        text: query.clone(),
        k: depth,
        mode: opts.mode,
        model,
    };
    let shard_deadline =
        (Instant::now() + Duration::from_millis(cfg.query.shard_deadline_ms)).min(deadline);
    let mut set = JoinSet::new();
    for s in 0..cfg.index.shards {
        let (ctx, q) = (ctx.clone(), q.clone());
        set.spawn(async move { (s, shard_search(ctx, s, q, shard_deadline).await) });
    }
    let mut coverage = Coverage {
        shards_total: cfg.index.shards,
        ..Default::default()
    };
    let mut answers = Vec::new();
    while let Some(res) = set.join_next().await {
        match res {
            Ok((_, Ok(h))) => {
                coverage.shards_answered += 1;
                answers.push(h);
            }
            Ok((s, Err(reason))) => coverage.left_out.push(LeftOut { shard: s, reason }),
            Err(e) => warn!(error = %e, "shard task failed"),
        }
    }
    coverage.left_out.sort_by_key(|l| l.shard);
    let mut hits = merge_shard_answers(answers, depth as usize);
    timings.search = ms(t1.elapsed());

    let mut rerank_outcome = None;
    if rerank && hits.len() > 1 {
        let t2 = Instant::now();
        // the stage's own deadline, inside the end-to-end one
        let rerank_deadline = (t2 + Duration::from_millis(cfg.query.rerank_deadline_ms)).min(deadline);
        // the reranker orders the head; the tail follows in retrieval order (and scores)
        let tail = hits.split_off(hits.len().min(cfg.query.rerank_depth as usize));
        match rerank_hits(&ctx, &query, &hits, rerank_deadline).await {
            Ok(scores) => {
                fuse_rerank(
                    &mut hits,
                    &scores,
                    cfg.query.rerank_fusion,
                    cfg.query.rerank_weight,
                );
                rerank_outcome = Some("applied".to_string());
            }
            Err(reason) => {
                warn!(%reason, "rerank stage skipped; keeping retrieval order");
                rerank_outcome = Some(format!("skipped: {reason}"));
            }
        }
        hits.extend(tail);
        timings.rerank = ms(t2.elapsed());
    } else if rerank {
        rerank_outcome = Some("skipped: fewer than two hits".to_string());
    }
    hits.truncate(k as usize);
    timings.total = ms(t0.elapsed());
    Ok(RetrieveResult {
        hits,
        coverage,
        timings_ms: timings,
        rerank: rerank_outcome,
    })
}

/// Orders `hits` (in retrieval order) by the reranker's `scores`: alone, weighted with each
/// hit's query similarity, or fused with the retrieval rank by reciprocal rank fusion (k = 60).
pub fn fuse_rerank(hits: &mut [Hit], scores: &[f32], fusion: RerankFusion, weight: f32) {
    let fusion = match fusion {
        RerankFusion::Weighted if hits.iter().any(|h| h.similarity.is_none()) => RerankFusion::Rrf,
        f => f,
    };
    match fusion {
        RerankFusion::Weighted => {
            for (h, s) in hits.iter_mut().zip(scores) {
                h.score = weight * s + (1.0 - weight) * h.similarity.unwrap_or(0.0);
            }
        }
        RerankFusion::Replace => {
            for (h, s) in hits.iter_mut().zip(scores) {
                h.score = *s;
            }
        }
        RerankFusion::Rrf => {
            let mut order: Vec<usize> = (0..hits.len()).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let mut rerank_rank = vec![0usize; hits.len()];
            for (r, &i) in order.iter().enumerate() {
                rerank_rank[i] = r;
            }
            for (i, h) in hits.iter_mut().enumerate() {
                h.score = 1.0 / (61.0 + i as f32) + 1.0 / (61.0 + rerank_rank[i] as f32);
            }
        }
    }
    ragfleet_index::sort_hits(hits);
}

/// Scores `hits` on a reranker replica before `deadline`, failing over to another replica
/// (each attempt but the last gets half the time left). `Err` names why the stage was skipped:
/// `deadline`, `overloaded`, `no reranker replica` or `error: ...`.
async fn rerank_hits(
    ctx: &Ctx,
    query: &str,
    hits: &[Hit],
    deadline: Instant,
) -> Result<Vec<f32>, String> {
    let passages: Vec<String> = hits.iter().map(|h| h.text.clone()).collect();
    let replicas = ctx.candidates(groups::RERANKERS);
    if replicas.is_empty() {
        return Err("no reranker replica".into());
    }
    let n = replicas.len();
    let mut reason = "no reranker replica".to_string();
    for (i, m) in replicas.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("deadline".into());
        }
        let budget = if i + 1 < n { left / 2 } else { left };
        match call(
            &m.actor,
            Request::Rerank {
                query: query.to_string(),
                passages: passages.clone(),
            },
            budget,
        )
        .await
        {
            Ok(Response::Scores(s)) if s.len() == passages.len() => return Ok(s),
            Ok(other) => reason = format!("error: unexpected answer {other:?}"),
            // busy, not broken: another replica may have room
            Err(CallError::Remote(WireError::Overloaded(_))) => reason = "overloaded".into(),
            Err(CallError::Timeout) => {
                ctx.args.health.mark_failed(m.actor.get_id());
                reason = "deadline".into();
            }
            Err(e) => {
                ctx.args.health.mark_failed(m.actor.get_id());
                reason = format!("error: {e}");
            }
        }
    }
    Err(reason)
}

/// The ingest path: chunk and embed on every embedder replica in parallel, route each document
/// to its shard, write to every reachable replica, acknowledge at the write quorum.
pub async fn ingest(ctx: Arc<Ctx>, docs: Vec<Document>) -> Result<IngestResult, WireError> {
    let cfg = ctx.cfg().clone();
    let mut result = IngestResult::default();
    // a document id given twice: the last copy wins (as later writes win everywhere else)
    let mut seen = HashSet::new();
    let mut good = Vec::new();
    for d in docs.into_iter().rev() {
        let size = d.text.len() + d.title.len();
        if d.id.trim().is_empty() {
            result.failed.push((d.id, "empty document id".into()));
        } else if d.text.trim().is_empty() && d.title.trim().is_empty() {
            result.failed.push((d.id, "document has no text".into()));
        } else if size > ragfleet_proto::MAX_DOCUMENT_BYTES {
            result.failed.push((
                d.id,
                format!(
                    "document of {size} bytes exceeds the limit of {} bytes",
                    ragfleet_proto::MAX_DOCUMENT_BYTES
                ),
            ));
        } else if seen.insert(d.id.clone()) {
            good.push(d);
        }
    }
    good.reverse();
    result.failed.reverse();
    if good.is_empty() {
        return Ok(result);
    }
    let embedders = ctx.candidates(groups::EMBEDDERS);
    if embedders.is_empty() {
        return Err(WireError::Unavailable(
            "no embedder replica is reachable".into(),
        ));
    }
    // chunk + embed, spread over the replicas
    let per = good.len().div_ceil(embedders.len()).max(1);
    let mut set = JoinSet::new();
    for (i, batch) in good.chunks(per).enumerate() {
        let batch = batch.to_vec();
        let order: Vec<Member> = embedders
            .iter()
            .cycle()
            .skip(i)
            .take(embedders.len())
            .cloned()
            .collect();
        let (tokens, overlap) = (
            cfg.index.chunk_tokens as u32,
            cfg.index.chunk_overlap as u32,
        );
        set.spawn(async move {
            let mut last = String::new();
            for m in order {
                let req = Request::ChunkEmbed {
                    docs: batch.clone(),
                    chunk_tokens: tokens,
                    overlap,
                };
                match call(&m.actor, req, Duration::from_secs(600)).await {
                    Ok(Response::Chunked { model, ops, failed }) => {
                        return Ok((model, ops, failed))
                    }
                    Ok(other) => last = format!("unexpected answer {other:?}"),
                    Err(e) => last = e.to_string(),
                }
            }
            Err((batch.into_iter().map(|d| d.id).collect::<Vec<_>>(), last))
        });
    }
    let mut model = None;
    let mut ops: Vec<WriteOp> = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok((m, o, failed))) => {
                model = Some(m);
                ops.extend(o);
                result.failed.extend(failed);
            }
            Ok(Err((ids, e))) => result.failed.extend(
                ids.into_iter()
                    .map(|id| (id, format!("embedding failed: {e}"))),
            ),
            Err(e) => warn!(error = %e, "embedding task failed"),
        }
    }
    let Some(model) = model else {
        return Ok(result);
    };
    // one version for this request's documents (their ids are distinct)
    let version = ragfleet_proto::next_write_version();
    for op in ops.iter_mut() {
        let (WriteOp::Upsert { version: v, .. } | WriteOp::Delete { version: v, .. }) = op;
        *v = version;
    }
    // route and write
    let mut by_shard: HashMap<u32, Vec<WriteOp>> = HashMap::new();
    for op in ops {
        by_shard
            .entry(cfg.shard_of(op.doc_id()))
            .or_default()
            .push(op);
    }
    let mut set = JoinSet::new();
    for (shard, ops) in by_shard {
        let ctx = ctx.clone();
        let req = Request::Write {
            ops: ops.clone(),
            model: model.clone(),
        };
        set.spawn(async move {
            let chunks: u64 = ops
                .iter()
                .map(|o| {
                    if let WriteOp::Upsert { chunks, .. } = o {
                        chunks.len() as u64
                    } else {
                        0
                    }
                })
                .sum();
            let ids: Vec<String> = ops.iter().map(|o| o.doc_id().to_string()).collect();
            match write_to_shard(&ctx, shard, req).await {
                Ok(()) => Ok((ids.len() as u64, chunks)),
                Err(e) => Err((ids, e)),
            }
        });
    }
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok((d, c))) => {
                result.documents += d;
                result.chunks += c;
            }
            Ok(Err((ids, e))) => result
                .failed
                .extend(ids.into_iter().map(|id| (id, e.clone()))),
            Err(e) => warn!(error = %e, "write task failed"),
        }
    }
    Ok(result)
}

/// Sends a write to every reachable replica of `shard`; Ok once the write quorum has it durably.
async fn write_to_shard(ctx: &Ctx, shard: u32, req: Request) -> Result<(), String> {
    let quorum = ctx.cfg().index.write_quorum as usize;
    let h = &ctx.args.health;
    let group = groups::shard(shard);
    let mut replicas: Vec<Member> = h
        .members(&group)
        .into_iter()
        .filter(|m| m.healthy(h.suspect_after))
        .collect();
    replicas.extend(
        h.unproven(&group)
            .into_iter()
            .map(|a| Member::unproven(a, &group)),
    );
    if replicas.len() < quorum {
        return Err(format!(
            "shard {shard}: {} replicas reachable, write quorum is {quorum}",
            replicas.len()
        ));
    }
    let mut writes = JoinSet::new();
    for r in replicas {
        let req = req.clone();
        writes.spawn(async move { call(&r.actor, req, Duration::from_secs(120)).await });
    }
    let mut acks = 0;
    let mut errors = Vec::new();
    while let Some(w) = writes.join_next().await {
        match w {
            Ok(Ok(Response::Written { .. })) => acks += 1,
            Ok(Ok(other)) => errors.push(format!("{other:?}")),
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if acks >= quorum {
        Ok(())
    } else {
        Err(format!(
            "shard {shard}: {acks} of {quorum} acknowledgements ({})",
            errors.join("; ")
        ))
    }
}

/// Deletes documents from their shards at the write quorum; returns those that failed.
pub async fn delete(ctx: Arc<Ctx>, doc_ids: Vec<String>) -> IngestResult {
    let mut by_shard: HashMap<u32, Vec<String>> = HashMap::new();
    let mut result = IngestResult::default();
    for d in doc_ids {
        if d.trim().is_empty() {
            result.failed.push((d, "empty document id".into()));
        } else {
            by_shard.entry(ctx.cfg().shard_of(&d)).or_default().push(d);
        }
    }
    let version = ragfleet_proto::next_write_version();
    let mut set = JoinSet::new();
    for (shard, ids) in by_shard {
        let ctx = ctx.clone();
        set.spawn(async move {
            let r = write_to_shard(
                &ctx,
                shard,
                Request::Delete {
                    doc_ids: ids.clone(),
                    version,
                },
            )
            .await;
            (ids, r)
        });
    }
    while let Some(r) = set.join_next().await {
        match r {
            Ok((ids, Ok(()))) => result.documents += ids.len() as u64,
            Ok((ids, Err(e))) => result
                .failed
                .extend(ids.into_iter().map(|i| (i, e.clone()))),
            Err(e) => warn!(error = %e, "delete task failed"),
        }
    }
    result
}

/// The cluster as this coordinator's failure detector sees it.
pub fn status(ctx: &Ctx) -> ClusterStatus {
    let cfg = ctx.cfg();
    let h = &ctx.args.health;
    let agents = h.members(groups::NODES);
    let nodes = cfg
        .nodes
        .iter()
        .map(|n| NodeStatus {
            name: n.name.clone(),
            addr: n.addr.clone(),
            alive: agents.iter().any(|a| {
                a.info.as_ref().is_some_and(|i| i.node == n.name) && a.healthy(h.suspect_after)
            }),
        })
        .collect();
    let placement = cfg.placement();
    let shards = (0..cfg.index.shards)
        .map(|s| {
            let members = h.members(&groups::shard(s));
            let replicas = placement[s as usize]
                .iter()
                .map(|node| {
                    let m = members
                        .iter()
                        .find(|m| m.info.as_ref().is_some_and(|i| &i.node == node));
                    match m {
                        Some(m) if m.healthy(h.suspect_after) => {
                            let info = m.info.as_ref().expect("checked");
                            ReplicaStatus {
                                node: node.clone(),
                                state: info.state.as_str().into(),
                                docs: info.docs,
                            }
                        }
                        Some(m) => ReplicaStatus {
                            node: node.clone(),
                            state: "suspected".into(),
                            docs: m.info.as_ref().map(|i| i.docs).unwrap_or(0),
                        },
                        None => ReplicaStatus {
                            node: node.clone(),
                            state: "down".into(),
                            docs: 0,
                        },
                    }
                })
                .collect();
            ShardStatus { id: s, replicas }
        })
        .collect();
    ClusterStatus {
        nodes,
        shards,
        model: None,
    }
}

/// 3-word shingles of a passage (lower-cased, punctuation dropped), for near-duplicate detection.
fn shingles(text: &str) -> HashSet<String> {
    let w: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|x| !x.is_empty())
        .map(|x| x.to_lowercase())
        .collect();
    if w.len() < 3 {
        return std::iter::once(w.join(" ")).collect();
    }
    w.windows(3).map(|x| x.join(" ")).collect()
}

/// Picks passages for the prompt: most relevant first, duplicates and near-duplicates
/// (3-word-shingle Jaccard >= 0.8) dropped, within `budget` tokens; each labelled by doc id.
pub fn assemble_context(
    hits: &[Hit],
    budget: usize,
    count: &dyn Fn(&str) -> usize,
) -> (String, Vec<Source>) {
    let mut used: Vec<HashSet<String>> = Vec::new();
    let mut out = String::new();
    let mut sources: Vec<Source> = Vec::new();
    let mut spent = 0;
    for h in hits {
        let sh = shingles(&h.text);
        let dup = used.iter().any(|u| {
            let inter = u.intersection(&sh).count() as f64;
            let union = u.union(&sh).count().max(1) as f64;
            inter / union >= 0.8
        });
        if dup {
            continue;
        }
        let block = format!("[{}] {}\n\n", h.doc_id, h.text.trim());
        let n = count(&block);
        if spent + n > budget {
            continue;
        }
        spent += n;
        out.push_str(&block);
        used.push(sh);
        if !sources.iter().any(|s| s.doc_id == h.doc_id) {
            sources.push(Source {
                doc_id: h.doc_id.clone(),
                score: h.score,
            });
        }
    }
    (out, sources)
}

async fn ask_task(ctx: Arc<Ctx>, question: String, opts: AskOptions, w: StreamWriter) {
    let t0 = Instant::now();
    let cfg = ctx.cfg().clone();
    let deadline =
        t0 + Duration::from_millis(opts.retrieve.deadline_ms.unwrap_or(cfg.query.deadline_ms));
    let max_tokens = opts
        .max_tokens
        .unwrap_or(cfg.generator.max_tokens)
        .clamp(1, 2048);
    let (hits, coverage, mut timings, rerank) =
        match retrieve(ctx.clone(), question.clone(), opts.retrieve.clone()).await {
            Ok(r) => (r.hits, r.coverage, r.timings_ms, r.rerank),
            Err(e @ WireError::BadRequest(_)) => return w.fail(e.to_string()),
            Err(e) => {
                warn!(error = %e, "retrieval failed; answering without sources");
                let cov = Coverage {
                    shards_total: cfg.index.shards,
                    shards_answered: 0,
                    left_out: (0..cfg.index.shards)
                        .map(|s| LeftOut {
                            shard: s,
                            reason: format!("error: {e}"),
                        })
                        .collect(),
                };
                (Vec::new(), cov, Timings::default(), None)
            }
        };
    let unsourced = coverage.shards_answered == 0 || hits.is_empty();
    if unsourced && cfg.generator.on_no_coverage == NoCoverage::Refuse {
        return w.fail("no shard answered and generator.on_no_coverage = \"refuse\"".into());
    }
    // tokenising the passages is CPU work: off the async runtime's threads
    let (c2, q2, context_tokens) = (
        ctx.clone(),
        question.clone(),
        cfg.generator.context_tokens as usize,
    );
    let assembled = tokio::task::spawn_blocking(move || {
        let count = |t: &str| c2.count_tokens(t);
        let reserve = max_tokens as usize + count(&q2) + count(SYSTEM_PROMPT) + 48;
        assemble_context(&hits, context_tokens.saturating_sub(reserve), &count)
    })
    .await;
    let Ok((context, sources)) = assembled else {
        return w.fail("context assembly failed".into());
    };
    let user = if unsourced {
        format!("No passages are available. Answer from general knowledge, briefly.\n\nQuestion: {question}")
    } else {
        format!("Passages:\n\n{context}Question: {question}")
    };
    let t_gen = Instant::now();
    let mut first_token = None;
    let mut answer = String::new();
    let mut truncated = false;
    let mut error = None;
    'replicas: for m in ctx.candidates(groups::GENERATORS) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            truncated = true;
            break;
        }
        let req = Request::Generate {
            system: SYSTEM_PROMPT.into(),
            user: user.clone(),
            max_tokens,
            sampling: opts.sampling.clone(),
        };
        let first_token_timeout = Duration::from_millis(cfg.generator.first_token_timeout_ms);
        let stream = match call(&m.actor, req, left.min(first_token_timeout)).await {
            Ok(Response::StreamStarted { stream }) => stream,
            other => {
                warn!(?other, "generator refused; trying another replica");
                ctx.args.health.mark_failed(m.actor.get_id());
                continue;
            }
        };
        let started = Instant::now();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                truncated = true;
                let _ = call(
                    &m.actor,
                    Request::Cancel { stream },
                    Duration::from_millis(500),
                )
                .await;
                break 'replicas;
            }
            let wait = left.min(Duration::from_millis(250));
            match call(
                &m.actor,
                Request::StreamNext {
                    stream,
                    wait_ms: wait.as_millis() as u64,
                },
                wait + Duration::from_secs(2),
            )
            .await
            {
                Ok(Response::Stream(c)) => {
                    if !c.text.is_empty() {
                        first_token.get_or_insert_with(|| t0.elapsed());
                        answer.push_str(&c.text);
                        w.push(&c.text, c.tokens);
                    }
                    if c.done {
                        break 'replicas;
                    }
                    if first_token.is_none()
                        && started.elapsed()
                            > Duration::from_millis(cfg.generator.first_token_timeout_ms)
                    {
                        warn!("generator stalled before its first token; trying another replica");
                        ctx.args.health.mark_failed(m.actor.get_id());
                        continue 'replicas;
                    }
                }
                other => {
                    ctx.args.health.mark_failed(m.actor.get_id());
                    if first_token.is_none() {
                        warn!(
                            ?other,
                            "generator failed before its first token; trying another replica"
                        );
                        continue 'replicas;
                    }
                    let why = match &other {
                        Err(e) => e.to_string(),
                        Ok(r) => format!("unexpected answer {r:?}"),
                    };
                    error = Some(format!("generator failed mid-answer: {why}"));
                    break 'replicas;
                }
            }
        }
    }
    if first_token.is_none() && !truncated && error.is_none() {
        error = Some("no generator replica could answer".into());
    }
    let mut truncated_reason = truncated.then(|| "deadline".to_string());
    if truncated {
        let marker = " [answer cut: end-to-end deadline reached]";
        answer.push_str(marker);
        w.push(marker, 0);
    }
    if let Some(e) = error {
        if answer.is_empty() {
            return w.fail(e);
        }
        // an answer that ends for any reason but its natural end says so
        warn!(error = %e, "answer incomplete");
        let marker = " [answer cut: the generator failed mid-answer]";
        answer.push_str(marker);
        w.push(marker, 0);
        truncated = true;
        truncated_reason = Some(format!("error: {e}"));
    }
    timings.first_token = first_token.map(ms).unwrap_or(0.0);
    timings.generate = ms(t_gen.elapsed());
    timings.total = ms(t0.elapsed());
    let summary = AskSummary {
        answer,
        sources,
        coverage,
        timings_ms: timings,
        unsourced,
        truncated,
        truncated_reason,
        rerank,
    };
    w.finish(Some(summary));
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
        Ok(Arc::new(Ctx {
            args,
            rr: std::sync::Mutex::new(HashMap::new()),
            streams: StreamTable::default(),
        }))
    }

    async fn handle(
        &self,
        _me: ActorRef<RoleMsg>,
        msg: RoleMsg,
        ctx: &mut Arc<Ctx>,
    ) -> Result<(), ActorProcessingErr> {
        let Some((req, port)) = common(msg, "coordinator", || {
            info(&ctx.args.node, Role::Coordinator)
        })
        .await
        else {
            return Ok(());
        };
        let ctx = ctx.clone();
        match req {
            Request::Retrieve { query, options } => {
                tokio::spawn(async move {
                    reply(
                        port,
                        match retrieve(ctx, query, options).await {
                            Ok(r) => Response::Retrieved(r),
                            Err(e) => Response::Error(e),
                        },
                    );
                });
            }
            Request::Ingest { docs } => {
                tokio::spawn(async move {
                    reply(
                        port,
                        match ingest(ctx, docs).await {
                            Ok(r) => Response::Ingested(r),
                            Err(e) => Response::Error(e),
                        },
                    );
                });
            }
            Request::Status => reply(port, Response::Status(status(&ctx))),
            Request::Delete { doc_ids, .. } => {
                tokio::spawn(
                    async move { reply(port, Response::Ingested(delete(ctx, doc_ids).await)) },
                );
            }
            Request::Ask { question, options } => {
                if let Err(e) =
                    validate_text(&question, ctx.cfg().query.max_query_bytes, "question")
                {
                    reply(port, Response::Error(e));
                    return Ok(());
                }
                let (id, w) = ctx.streams.open();
                tokio::spawn(ask_task(ctx, question, options, w));
                reply(port, Response::StreamStarted { stream: id });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(doc: &str, text: &str, score: f32) -> Hit {
        Hit {
            doc_id: doc.into(),
            chunk_id: format!("{doc}#0"),
            score,
            similarity: Some(score),
            text: text.into(),
        }
    }

    #[test]
    fn rerank_fusion_replaces_or_fuses_ranks() {
        let base: Vec<Hit> = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, d)| hit(d, d, 1.0 - i as f32 * 0.1))
            .collect();
        // the reranker loves d, then c
        let scores = [0.1, 0.2, 0.8, 0.9];
        let mut h = base.clone();
        fuse_rerank(&mut h, &scores, RerankFusion::Replace, 0.5);
        let ids: Vec<&str> = h.iter().map(|x| x.doc_id.as_str()).collect();
        assert_eq!(ids, ["d", "c", "b", "a"]);
        // fused: a (ranks 0 and 3) ties d (3 and 0) and beats the tie of b (1 and 2) and
        // c (2 and 1), reciprocal ranks being convex; the chunk id breaks ties
        let mut h = base.clone();
        fuse_rerank(&mut h, &scores, RerankFusion::Rrf, 0.5);
        let ids: Vec<&str> = h.iter().map(|x| x.doc_id.as_str()).collect();
        assert_eq!(ids, ["a", "d", "b", "c"]);
        assert_eq!(h[0].score, h[1].score);
        // a reranker that agrees with retrieval changes nothing
        let mut h = base.clone();
        fuse_rerank(&mut h, &[0.9, 0.8, 0.7, 0.6], RerankFusion::Rrf, 0.5);
        let ids: Vec<&str> = h.iter().map(|x| x.doc_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        // weighted: 0.5 x score + 0.5 x similarity (1.0, 0.9, 0.8, 0.7)
        let mut h = base.clone();
        fuse_rerank(&mut h, &[0.0, 0.3, 0.8, 0.95], RerankFusion::Weighted, 0.5);
        let ids: Vec<&str> = h.iter().map(|x| x.doc_id.as_str()).collect();
        assert_eq!(ids, ["d", "c", "b", "a"]);
        assert!((h[0].score - 0.825).abs() < 1e-6);
        // without similarities (bm25 mode) weighted falls back to rank fusion
        let mut h = base.clone();
        h.iter_mut().for_each(|x| x.similarity = None);
        fuse_rerank(&mut h, &scores, RerankFusion::Weighted, 0.5);
        let ids: Vec<&str> = h.iter().map(|x| x.doc_id.as_str()).collect();
        assert_eq!(ids, ["a", "d", "b", "c"]);
    }

    #[test]
    fn context_drops_near_duplicates_and_respects_the_budget() {
        let words = |t: &str| t.split_whitespace().count();
        let hits = vec![
            hit(
                "a",
                "the quick brown fox jumps over the lazy dog today",
                3.0,
            ),
            hit(
                "b",
                "the quick brown fox jumps over the lazy dog today!",
                2.5,
            ),
            hit(
                "c",
                "an entirely different passage about shard replicas",
                2.0,
            ),
            hit("d", &"long ".repeat(500), 1.0),
        ];
        let (ctx, sources) = assemble_context(&hits, 40, &words);
        assert!(ctx.starts_with("[a] the quick"));
        assert!(!ctx.contains("[b]"), "near duplicate kept");
        assert!(ctx.contains("[c]"));
        assert!(!ctx.contains("[d]"), "over budget kept");
        assert_eq!(
            sources
                .iter()
                .map(|s| s.doc_id.as_str())
                .collect::<Vec<_>>(),
            vec!["a", "c"]
        );
    }

    #[test]
    fn hybrid_merge_fuses_global_rankings_not_shard_lists() {
        // shard 0 holds the two best documents; shard 1 only weak ones
        let a = ShardHits::Two(
            vec![hit("a1", "x", 0.9), hit("a2", "x", 0.8)],
            vec![hit("a1", "x", 9.0), hit("a2", "x", 8.0)],
        );
        let b = ShardHits::Two(vec![hit("b1", "x", 0.1)], vec![hit("b1", "x", 0.5)]);
        let merged = merge_shard_answers(vec![b, a], 3);
        let ids: Vec<&str> = merged.iter().map(|h| h.doc_id.as_str()).collect();
        assert_eq!(ids, vec!["a1", "a2", "b1"]);
        // single rankings merge by score
        let merged = merge_shard_answers(
            vec![
                ShardHits::One(vec![hit("x", "t", 0.2)]),
                ShardHits::One(vec![hit("y", "t", 0.7)]),
            ],
            2,
        );
        assert_eq!(merged[0].doc_id, "y");
    }

    #[test]
    fn empty_and_huge_queries_are_refused() {
        assert!(matches!(
            validate_text("  ", 10, "query"),
            Err(WireError::BadRequest(_))
        ));
        let e = validate_text(&"x".repeat(11), 10, "query")
            .unwrap_err()
            .to_string();
        assert!(e.contains("11 bytes"), "{e}");
        assert!(validate_text("ok", 10, "query").is_ok());
    }
}
