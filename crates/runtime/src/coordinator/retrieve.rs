//! The retrieval path: embed the query, scatter it to one serving replica of every shard under
//! the shard deadline, merge, and rerank under the rerank stage's own deadline.
use std::sync::Arc;
use std::time::{Duration, Instant};

use ragfleet_client::groups;
use ragfleet_client::typed::{Embed, Rerank, Search};
use ragfleet_index::ranking::{fuse_rerank, merge_shard_answers};
use ragfleet_proto::{
    Coverage, Hit, LeftOut, ModelIdentity, RetrieveOptions, RetrieveResult, SearchMode,
    SearchQuery, ShardHits, Timings, WireError,
};
use tokio::task::JoinSet;
use tracing::warn;

use super::replicas::{call_replicas, Budget, Failed};
use super::{ms, Ctx};

/// Refuses an empty or oversized query.
pub(crate) fn validate_text(text: &str, max: usize, what: &str) -> Result<(), WireError> {
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
    if let Some(hit) = ctx.embed_cache.get(text) {
        return Ok(hit);
    }
    let req = Embed {
        texts: vec![text.to_string()],
    };
    let replicas = ctx.candidates(groups::EMBEDDERS);
    match call_replicas(&ctx.args.health, replicas, req, Budget::Split(deadline)).await {
        Ok((model, mut vectors)) if vectors.len() == 1 => {
            let v = vectors.pop().unwrap_or_default();
            ctx.embed_cache.put(text, &v, &model);
            Ok((v, model))
        }
        Ok((_, v)) => Err(WireError::Internal(format!(
            "the embedder returned {} vectors for one query",
            v.len()
        ))),
        Err(Failed::Refused(e)) => Err(e),
        Err(Failed::Deadline) => Err(WireError::Deadline),
        Err(f) => Err(WireError::Unavailable(format!(
            "embedder: {}",
            f.reason("no embedder replica is reachable")
        ))),
    }
}

/// One shard's search on a serving replica, failing over to another replica of the same shard
/// inside the shard deadline; `Err` is the reason the shard is left out.
pub(crate) async fn shard_search(
    ctx: Arc<Ctx>,
    shard: u32,
    query: SearchQuery,
    deadline: Instant,
) -> Result<ShardHits, String> {
    let replicas = ctx.candidates(&groups::shard(shard));
    call_replicas(
        &ctx.args.health,
        replicas,
        Search { query },
        Budget::Split(deadline),
    )
    .await
    .map_err(|f| f.reason("no_live_replica"))
}

/// Coverage of a scatter: every shard that answered counts; every other is left out, named,
/// with its reason, in shard order.
pub(crate) fn account(
    shards_total: u32,
    results: Vec<(u32, Result<ShardHits, String>)>,
) -> (Coverage, Vec<ShardHits>) {
    let mut coverage = Coverage {
        shards_total,
        ..Default::default()
    };
    let mut answers = Vec::new();
    let mut answered = std::collections::HashSet::new();
    for (shard, r) in results {
        match r {
            Ok(h) => {
                answered.insert(shard);
                answers.push(h);
            }
            Err(reason) => coverage.left_out.push(LeftOut { shard, reason }),
        }
    }
    // a shard whose task produced nothing at all (it panicked) is left out too
    for s in 0..shards_total {
        if !answered.contains(&s) && !coverage.left_out.iter().any(|l| l.shard == s) {
            coverage.left_out.push(LeftOut {
                shard: s,
                reason: "error: search task failed".into(),
            });
        }
    }
    coverage.shards_answered = answered.len() as u32;
    coverage.left_out.sort_by_key(|l| l.shard);
    (coverage, answers)
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

    let mut mode = opts.mode;
    let mut degraded = None;
    let (vector, model) = if mode == SearchMode::Bm25 {
        (Vec::new(), None)
    } else {
        match embed_query(&ctx, &query, deadline).await {
            Ok((v, m)) => (v, Some(m)),
            Err(e @ WireError::BadRequest(_)) => return Err(e),
            Err(e) => {
                // degrade rather than fail: BM25 needs no embedding, and the answer says so
                warn!(error = %e, "no query embedding; answering with BM25 alone");
                degraded = Some(format!("bm25 only: no query embedding ({e})"));
                mode = SearchMode::Bm25;
                (Vec::new(), None)
            }
        }
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
        mode,
        model,
    };
    let shard_deadline =
        (Instant::now() + Duration::from_millis(cfg.query.shard_deadline_ms)).min(deadline);
    let mut set = JoinSet::new();
    for s in 0..cfg.index.shards {
        let (ctx, q) = (ctx.clone(), q.clone());
        set.spawn(async move { (s, shard_search(ctx, s, q, shard_deadline).await) });
    }
    let mut results = Vec::new();
    while let Some(res) = set.join_next().await {
        match res {
            Ok(r) => results.push(r),
            Err(e) => warn!(error = %e, "shard task failed"),
        }
    }
    let (coverage, answers) = account(cfg.index.shards, results);
    let mut hits = merge_shard_answers(answers, depth as usize);
    timings.search = ms(t1.elapsed());

    let mut rerank_outcome = None;
    if rerank && hits.len() > 1 {
        let t2 = Instant::now();
        // the stage's own deadline, inside the end-to-end one
        let stage_deadline =
            (t2 + Duration::from_millis(cfg.query.rerank_deadline_ms)).min(deadline);
        // the reranker orders the head; the tail follows in retrieval order (and scores)
        let tail = hits.split_off(hits.len().min(cfg.query.rerank_depth as usize));
        match rerank_hits(&ctx, &query, &hits, stage_deadline).await {
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
        degraded,
    })
}

/// Scores `hits` on a reranker replica before `deadline`, failing over to another replica.
/// `Err` names why the stage was skipped: `deadline`, `overloaded`, `no reranker replica` or
/// `error: ...`.
async fn rerank_hits(
    ctx: &Ctx,
    query: &str,
    hits: &[Hit],
    deadline: Instant,
) -> Result<Vec<f32>, String> {
    let req = Rerank {
        query: query.to_string(),
        passages: hits.iter().map(|h| h.text.clone()).collect(),
    };
    let replicas = ctx.candidates(groups::RERANKERS);
    match call_replicas(&ctx.args.health, replicas, req, Budget::Split(deadline)).await {
        Ok(s) if s.len() == hits.len() => Ok(s),
        Ok(s) => Err(format!(
            "error: {} scores for {} passages",
            s.len(),
            hits.len()
        )),
        Err(f) => Err(f.reason("no reranker replica")),
    }
}
