//! The write paths: ingest (validate, chunk and embed on every embedder replica, version,
//! route, write at the quorum) and delete.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ragfleet_client::groups;
use ragfleet_client::typed::{call_typed, ChunkEmbed, Delete, Write};
use ragfleet_proto::{Document, IngestResult, WireError, WriteOp};
use tokio::task::JoinSet;
use tracing::warn;

use super::replicas::{call_unless_suspected, with_failover, Budget};
use super::Ctx;
use crate::health::Member;

/// How long one embedder replica may take to chunk and embed a batch.
const CHUNK_EMBED_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a shard replica may take to log a write durably.
const WRITE_TIMEOUT: Duration = Duration::from_secs(120);

/// Splits an ingest request into the documents to write and those refused, with the reason. A
/// document id given twice: the last copy wins (as later writes win everywhere else).
pub(crate) fn validate_documents(docs: Vec<Document>) -> (Vec<Document>, Vec<(String, String)>) {
    let mut seen = HashSet::new();
    let (mut good, mut failed) = (Vec::new(), Vec::new());
    for d in docs.into_iter().rev() {
        match d.check() {
            Err(e) => failed.push((d.id, e)),
            Ok(()) if seen.insert(d.id.clone()) => good.push(d),
            Ok(()) => {} // an earlier copy of a later document
        }
    }
    good.reverse();
    failed.reverse();
    (good, failed)
}

fn chunk_count(ops: &[WriteOp]) -> u64 {
    ops.iter()
        .map(|o| match o {
            WriteOp::Upsert { chunks, .. } => chunks.len() as u64,
            WriteOp::Delete { .. } => 0,
        })
        .sum()
}

/// The ingest path: chunk and embed on every embedder replica in parallel, route each document
/// to its shard, write to every reachable replica, acknowledge at the write quorum.
pub async fn ingest(ctx: Arc<Ctx>, docs: Vec<Document>) -> Result<IngestResult, WireError> {
    let cfg = ctx.cfg().clone();
    let t0 = std::time::Instant::now();
    let (good, failed) = validate_documents(docs);
    let mut result = IngestResult {
        failed,
        ..Default::default()
    };
    if good.is_empty() {
        return Ok(result);
    }
    let embedders = ctx.candidates(groups::EMBEDDERS);
    if embedders.is_empty() {
        return Err(WireError::Unavailable(
            "no embedder replica is reachable".into(),
        ));
    }
    // chunk + embed, spread over the replicas: batch i starts on replica i and fails over to
    // the others in turn
    let per = good.len().div_ceil(embedders.len()).max(1);
    let mut set = JoinSet::new();
    for (i, batch) in good.chunks(per).enumerate() {
        let mut order: Vec<Member> = embedders.clone();
        order.rotate_left(i % embedders.len());
        let req = ChunkEmbed {
            docs: batch.to_vec(),
            chunk_tokens: cfg.index.chunk_tokens as u32,
            overlap: cfg.index.chunk_overlap as u32,
            sentences: cfg.sentence_vectors(),
        };
        let ctx = ctx.clone();
        set.spawn(async move {
            let ids: Vec<String> = req.docs.iter().map(|d| d.id.clone()).collect();
            // long batch work, not latency-bound: a busy embedder is waited for, not
            // abandoned on a late heartbeat
            with_failover(
                &ctx.args.health,
                order,
                Budget::Each(CHUNK_EMBED_TIMEOUT),
                |actor, time| {
                    let req = req.clone();
                    async move { call_typed(&actor, req, time).await }
                },
            )
            .await
            .map_err(|f| (ids, f.reason("no embedder replica answered")))
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
    result.timings_ms.embed = t0.elapsed().as_secs_f64() * 1000.0;
    let t1 = std::time::Instant::now();
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
    for (shard, ops) in by_shard.into_iter().flat_map(|(s, ops)| {
        split_by_size(ops, WRITE_BYTES)
            .into_iter()
            .map(move |o| (s, o))
    }) {
        let ctx = ctx.clone();
        let model = model.clone();
        set.spawn(async move {
            let chunks = chunk_count(&ops);
            let ids: Vec<String> = ops.iter().map(|o| o.doc_id().to_string()).collect();
            match write_to_shard(&ctx, shard, Write { ops, model }).await {
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
    result.timings_ms.write = t1.elapsed().as_secs_f64() * 1000.0;
    Ok(result)
}

/// About how many bytes one write request to a replica carries at most (a frame holds 16 MiB;
/// one document's op is never split, and a document's stored sentence vectors are capped so
/// that it fits).
const WRITE_BYTES: usize = 6 << 20;

/// Splits ops into consecutive groups of about `max` bytes at most (an op larger than `max`
/// alone is a group of its own).
pub(crate) fn split_by_size(ops: Vec<WriteOp>, max: usize) -> Vec<Vec<WriteOp>> {
    let mut out: Vec<Vec<WriteOp>> = Vec::new();
    let mut bytes = 0usize;
    for op in ops {
        let size = op.approx_bytes();
        match out.last_mut() {
            Some(g) if bytes + size <= max => {
                bytes += size;
                g.push(op);
            }
            _ => {
                bytes = size;
                out.push(vec![op]);
            }
        }
    }
    out
}

/// Whether `acks` acknowledgements meet the write quorum; the error names the shard, the
/// counts and what the other replicas said.
pub(crate) fn quorum_met(
    shard: u32,
    acks: usize,
    quorum: usize,
    errors: &[String],
) -> Result<(), String> {
    if acks >= quorum {
        Ok(())
    } else {
        Err(format!(
            "shard {shard}: {acks} of {quorum} acknowledgements ({})",
            errors.join("; ")
        ))
    }
}

/// Sends a write (an upsert or delete request) to every reachable replica of `shard`; Ok once
/// the write quorum has it durably. Not a failover: every replica gets it.
async fn write_to_shard<R>(ctx: &Ctx, shard: u32, req: R) -> Result<(), String>
where
    R: ragfleet_client::typed::Typed<Reply = u64>,
{
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
        let (req, health) = (req.clone(), ctx.args.health.clone());
        writes.spawn(
            async move { call_unless_suspected(&health, &r.actor, req, WRITE_TIMEOUT).await },
        );
    }
    let mut acks = 0;
    let mut errors = Vec::new();
    while let Some(w) = writes.join_next().await {
        match w {
            Ok(Ok(_seq)) => acks += 1,
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    quorum_met(shard, acks, quorum, &errors)
}

/// Deletes documents from their shards at the write quorum; returns those that failed.
pub async fn delete(ctx: Arc<Ctx>, doc_ids: Vec<String>) -> IngestResult {
    let mut by_shard: HashMap<u32, Vec<String>> = HashMap::new();
    let mut result = IngestResult::default();
    for d in doc_ids {
        match ragfleet_proto::check_doc_id(&d) {
            Err(e) => result.failed.push((d, e)),
            Ok(()) => by_shard.entry(ctx.cfg().shard_of(&d)).or_default().push(d),
        }
    }
    let version = ragfleet_proto::next_write_version();
    let mut set = JoinSet::new();
    for (shard, ids) in by_shard {
        let ctx = ctx.clone();
        set.spawn(async move {
            let req = Delete {
                doc_ids: ids.clone(),
                version,
            };
            (ids, write_to_shard(&ctx, shard, req).await)
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
