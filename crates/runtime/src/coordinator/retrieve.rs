//! The retrieval path: embed the query, scatter it to one serving replica of every shard under
//! the shard deadline, merge, and rerank under the rerank stage's own deadline.
use std::sync::Arc;
use std::time::{Duration, Instant};

use ragfleet_client::groups;
use ragfleet_client::typed::{Embed, Rerank, SearchAt};
use ragfleet_index::ranking::{fuse_rerank, merge_shard_answers};
use ragfleet_proto::{
    Coverage, Hit, LeftOut, ModelIdentity, RetrieveOptions, RetrieveResult, SearchAnswer,
    SearchMode, SearchQuery, ShardHits, Timings, WireError,
};
use tokio::task::JoinSet;
use tracing::warn;

use super::cache::{self, CachedResult};
use super::replicas::{call_replicas, call_unless_suspected, with_failover, Budget, Failed};
use super::{ms, Ctx};
use crate::health::Member;

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

/// The most hits a query may ask for.
pub(crate) const MAX_K: u32 = 1000;

/// Refuses options out of range (rather than quietly answering something else than asked).
pub(crate) fn validate_options(opts: &RetrieveOptions) -> Result<(), WireError> {
    if let Some(k) = opts.k.filter(|k| !(1..=MAX_K).contains(k)) {
        return Err(WireError::BadRequest(format!(
            "k must be between 1 and {MAX_K} (got {k})"
        )));
    }
    if opts.deadline_ms == Some(0) {
        return Err(WireError::BadRequest("deadline_ms must be positive".into()));
    }
    Ok(())
}

async fn embed_query(
    ctx: &Ctx,
    text: &str,
    deadline: Instant,
    use_cache: bool,
) -> Result<(Vec<f32>, ModelIdentity), WireError> {
    if let Some(hit) = use_cache.then(|| ctx.embed_cache.get(text)).flatten() {
        return Ok(hit);
    }
    let req = Embed {
        texts: vec![text.to_string()],
    };
    let replicas = ctx.candidates(groups::EMBEDDERS);
    match call_replicas(&ctx.args.health, replicas, req, Budget::Split(deadline)).await {
        Ok((model, mut vectors)) if vectors.len() == 1 => {
            let v = vectors.pop().unwrap_or_default();
            if use_cache {
                ctx.embed_cache.put(text, &v, &model);
            }
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

/// One shard's answer.
#[derive(Debug)]
pub(crate) struct ShardAnswer {
    /// The digest of the replica that answered.
    pub digest: u64,
    pub answer: SearchAnswer,
    /// Whether a hedged request answered it.
    pub hedged: bool,
}

/// One shard's search on a serving replica, failing over to another replica of the same shard
/// inside the shard deadline, and hedged (when `hedge`) on another replica when the first is
/// slower than its recent p95; `Err` is the reason the shard is left out. With `known_digest`
/// the replica answers `Unchanged` when it still holds that state.
pub(crate) async fn shard_search(
    ctx: Arc<Ctx>,
    shard: u32,
    query: SearchQuery,
    known_digest: Option<u64>,
    deadline: Instant,
    hedge: bool,
) -> Result<ShardAnswer, String> {
    let mut replicas = ctx.candidates(&groups::shard(shard));
    let q = &ctx.cfg().query;
    let hedge = hedge && q.hedge && q.hedge_max_ratio > 0.0 && replicas.len() > 1;
    if hedge {
        // a replica that just lost to a hedge is asked last for a while
        ctx.hedging.order(&mut replicas);
    }
    ctx.hedging.request(q.hedge_max_ratio);
    let req = SearchAt {
        query,
        known_digest,
    };
    let done = |r: Result<(u64, SearchAnswer), Failed>, hedged| {
        r.map(|(digest, answer)| ShardAnswer {
            digest,
            answer,
            hedged,
        })
        .map_err(|f| f.reason("no_live_replica"))
    };
    let first = replicas.first().map(|m| m.actor.get_id());
    let delay = first.and_then(|id| ctx.hedging.delay(id, Duration::from_millis(q.hedge_min_ms)));
    let primary = search_on(&ctx, replicas.clone(), req.clone(), deadline);
    let (Some(delay), Some(slow), true) = (delay, first, hedge) else {
        return done(primary.await, false);
    };
    tokio::pin!(primary);
    tokio::select! {
        r = &mut primary => return done(r, false),
        _ = tokio::time::sleep(delay) => {}
    }
    if !ctx.hedging.try_hedge() {
        return done(primary.await, false);
    }
    tracing::debug!(shard, ?delay, "hedging a slow shard replica");
    let hedged = search_on(&ctx, replicas[1..].to_vec(), req, deadline);
    tokio::pin!(hedged);
    // the first answer wins; the other call is dropped
    let (mut primary_failed, mut hedge_failed) = (None, None);
    loop {
        tokio::select! {
            r = &mut primary, if primary_failed.is_none() => match r {
                Ok(v) => return done(Ok(v), false),
                Err(f) => primary_failed = Some(f),
            },
            r = &mut hedged, if hedge_failed.is_none() => match r {
                Ok(v) => {
                    ctx.hedging.won(slow);
                    return done(Ok(v), true);
                }
                Err(f) => hedge_failed = Some(f),
            },
        }
        if let (Some(p), Some(_)) = (&primary_failed, &hedge_failed) {
            return done(Err(p.clone()), false);
        }
    }
}

/// A `SearchAt` on `replicas` with failover, recording each replica's answer time.
async fn search_on(
    ctx: &Ctx,
    replicas: Vec<Member>,
    req: SearchAt,
    deadline: Instant,
) -> Result<(u64, SearchAnswer), Failed> {
    let health = &ctx.args.health;
    with_failover(health, replicas, Budget::Split(deadline), |actor, time| {
        let req = req.clone();
        async move {
            let t = Instant::now();
            let r = call_unless_suspected(health, &actor, req, time).await;
            if r.is_ok() {
                ctx.hedging.record(actor.get_id(), t.elapsed());
            }
            r
        }
    })
    .await
}

/// Scatters `q` to the listed shards (each with the digest its cached answer was read at, if
/// any) under `deadline`.
async fn scatter(
    ctx: &Arc<Ctx>,
    q: &SearchQuery,
    shards: Vec<(u32, Option<u64>)>,
    deadline: Instant,
    hedge: bool,
) -> Vec<(u32, Result<ShardAnswer, String>)> {
    let mut set = JoinSet::new();
    for (s, known) in shards {
        let (ctx, q) = (ctx.clone(), q.clone());
        set.spawn(async move { (s, shard_search(ctx, s, q, known, deadline, hedge).await) });
    }
    let mut results = Vec::new();
    while let Some(res) = set.join_next().await {
        match res {
            Ok(r) => results.push(r),
            Err(e) => warn!(error = %e, "shard task failed"),
        }
    }
    results.sort_by_key(|(s, _)| *s);
    results
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
    validate_options(&opts)?;
    let deadline =
        t0 + Duration::from_millis(opts.deadline_ms.unwrap_or(cfg.query.deadline_ms).max(1));
    let k = opts.k.unwrap_or(cfg.query.top_k).clamp(1, MAX_K);
    let rerank = opts.rerank.unwrap_or_else(|| cfg.rerank_by_default());
    let mut timings = Timings::default();

    let mut mode = opts.mode.unwrap_or(cfg.query.mode);
    let mut degraded = None;
    let cache_key = if opts.cache == Some(false) {
        None
    } else {
        ctx.results.key(&query, mode, k, rerank)
    };
    let cached = cache_key.as_ref().and_then(|key| ctx.results.get(key));
    // a BM25 query is embedded too when it is reranked against stored sentence vectors (the
    // shards score its candidates' sentences with it); it ranks by BM25 all the same
    let bm25 = mode == SearchMode::Bm25;
    let (vector, model) = if bm25 && !(rerank && cfg.sentence_vectors()) {
        (Vec::new(), None)
    } else if let Some(c) = &cached {
        // the cached result's own embedding: no embedder round trip
        (c.vector.clone(), c.model.clone())
    } else {
        match embed_query(&ctx, &query, deadline, opts.cache != Some(false)).await {
            Ok((v, m)) => (v, Some(m)),
            Err(e @ WireError::BadRequest(_)) => return Err(e),
            // BM25 needed no embedding: its sentence scores are computed at the reranker
            Err(_) if bm25 => (Vec::new(), None),
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
        || (Instant::now() + Duration::from_millis(cfg.query.shard_deadline_ms)).min(deadline);
    let hedge = opts.hedge.unwrap_or(true);
    let known = |s: u32| {
        cached
            .as_ref()
            .and_then(|c| c.digests.get(s as usize).copied())
    };
    let shards = (0..cfg.index.shards).map(|s| (s, known(s))).collect();
    let mut results = scatter(&ctx, &q, shards, shard_deadline(), hedge).await;
    let unchanged =
        |r: &Result<ShardAnswer, String>| matches!(r, Ok(a) if a.answer == SearchAnswer::Unchanged);
    let hedged: Vec<u32> = results
        .iter()
        .filter(|(_, r)| r.as_ref().is_ok_and(|a| a.hedged))
        .map(|(s, _)| *s)
        .collect();
    if let Some(c) = &cached {
        if results.len() == cfg.index.shards as usize && results.iter().all(|(_, r)| unchanged(r)) {
            // every shard still holds what the cached result was read from
            ctx.results.count(cache::Outcome::Hit);
            let mut out = c.result.clone();
            out.timings_ms = Timings {
                search: ms(t1.elapsed()),
                total: ms(t0.elapsed()),
                ..Timings::default()
            };
            out.cache = Some("hit".into());
            out.hedged = hedged;
            return Ok(out);
        }
        ctx.results.count(cache::Outcome::Stale);
        // a shard changed: those that said `Unchanged` are asked for their hits now
        let again: Vec<(u32, Option<u64>)> = results
            .iter()
            .filter(|(_, r)| unchanged(r))
            .map(|(s, _)| (*s, None))
            .collect();
        if !again.is_empty() {
            let more = scatter(&ctx, &q, again, shard_deadline(), hedge).await;
            results.retain(|(_, r)| !unchanged(r));
            results.extend(more);
            results.sort_by_key(|(s, _)| *s);
        }
    } else if cache_key.is_some() {
        ctx.results.count(cache::Outcome::Miss);
    }
    let digests: Vec<u64> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().map(|a| a.digest))
        .collect();
    let results = results
        .into_iter()
        .map(|(s, r)| {
            let hits = r.and_then(|a| match a.answer {
                SearchAnswer::One(h) => Ok(ShardHits::One(h)),
                SearchAnswer::Two(d, b) => Ok(ShardHits::Two(d, b)),
                SearchAnswer::Unchanged => Err("error: the replica answered unchanged".into()),
            });
            (s, hits)
        })
        .collect();
    let (coverage, answers) = account(cfg.index.shards, results);
    let mut hits = merge_shard_answers(
        answers,
        depth as usize,
        cfg.query.hybrid_fusion,
        cfg.query.hybrid_dense_weight,
    );
    timings.search = ms(t1.elapsed());

    let mut rerank_outcome = None;
    if rerank && hits.len() > 1 {
        let t2 = Instant::now();
        // the stage's own deadline, inside the end-to-end one
        let stage_deadline =
            (t2 + Duration::from_millis(cfg.query.rerank_deadline_ms)).min(deadline);
        // the reranker orders the head; the tail follows in retrieval order (and scores)
        let tail = hits.split_off(hits.len().min(cfg.query.rerank_depth as usize));
        match rerank_hits(&ctx, &query, &hits, q.model.as_ref(), stage_deadline).await {
            Ok(scores) => {
                let abstains = cfg
                    .query
                    .rerank_abstain
                    .then(|| {
                        ragfleet_index::ranking::sentence_rerank_abstains(
                            &hits,
                            &scores,
                            mode == SearchMode::Dense,
                        )
                    })
                    .flatten();
                if let Some(why) = abstains {
                    rerank_outcome = Some(why);
                } else {
                    // after a score-based hybrid, the reranker is weighed against the fused score
                    // (the similarity alone would drop the BM25 evidence)
                    let on_score =
                        mode == SearchMode::Hybrid && cfg.query.hybrid_fusion.is_score_based();
                    fuse_rerank(
                        &mut hits,
                        &scores,
                        cfg.query.rerank_fusion,
                        cfg.query.rerank_weight,
                        on_score,
                    );
                    rerank_outcome = Some("applied".to_string());
                }
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
    let mut out = RetrieveResult {
        hits,
        coverage,
        timings_ms: timings,
        rerank: rerank_outcome,
        degraded,
        cache: None,
        hedged,
        coordinator: ctx.args.node.clone(),
    };
    if let Some(key) = cache_key {
        out.cache = Some(if cached.is_some() { "stale" } else { "miss" }.into());
        // only a whole answer is kept: every shard answered, nothing degraded or skipped
        let whole = out.coverage.left_out.is_empty()
            && digests.len() == cfg.index.shards as usize
            && out.degraded.is_none()
            && out
                .rerank
                .as_deref()
                .is_none_or(|r| r == "applied" || r.starts_with("abstained"));
        if whole {
            let mut result = out.clone();
            result.cache = None;
            result.hedged = Vec::new();
            ctx.results.put(
                key,
                CachedResult {
                    vector: q.vector,
                    model: q.model,
                    digests,
                    result,
                },
            );
        }
    }
    Ok(out)
}

/// Scores `hits` on a reranker replica before `deadline`, failing over to another replica;
/// `model` embedded the query (the shards' stored-sentence scores are of that model). `Err`
/// names why the stage was skipped: `deadline`, `overloaded`, `no reranker replica` or
/// `error: ...`.
async fn rerank_hits(
    ctx: &Ctx,
    query: &str,
    hits: &[Hit],
    model: Option<&ModelIdentity>,
    deadline: Instant,
) -> Result<Vec<f32>, String> {
    let req = Rerank {
        query: query.to_string(),
        passages: hits.iter().map(|h| h.text.clone()).collect(),
        known: hits.iter().map(|h| h.sentence_score).collect(),
        model: model.cloned(),
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
