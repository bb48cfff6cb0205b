//! Typed calls: each request type names the one reply shape it may get, so code that calls a
//! role never matches an impossible answer. An answer of another shape (a peer speaking a
//! mismatched protocol) is one error, [`CallError::Unexpected`], decided here once.
use std::time::Duration;

use ractor::ActorRef;
use ragfleet_proto::{
    ActorInfo, AskOptions, ChaosAction, ClusterStatus, Document, GenerationRequest, IngestResult,
    ModelIdentity, Request, Response, RetrieveOptions, RetrieveResult, SearchAnswer, SearchQuery,
    ShardHits, ShardVersions, StreamChunk, WriteOp,
};

use crate::call::{call, CallError};
use crate::RoleMsg;

/// A request with its one expected reply.
pub trait Typed: Clone + Send + 'static {
    /// What a successful answer carries.
    type Reply: Send + 'static;
    /// The wire request.
    fn request(self) -> Request;
    /// The reply, or the response back when it has another shape.
    #[allow(clippy::result_large_err)] // the response is handed back once, not carried
    fn reply(r: Response) -> Result<Self::Reply, Response>;
}

/// Calls `actor` with a typed request, waiting at most `timeout`.
pub async fn call_typed<R: Typed>(
    actor: &ActorRef<RoleMsg>,
    req: R,
    timeout: Duration,
) -> Result<R::Reply, CallError> {
    let name = std::any::type_name::<R>().rsplit("::").next().unwrap_or("");
    let r = call(actor, req.request(), timeout).await?;
    R::reply(r).map_err(|other| {
        let mut s = format!("{other:?}");
        s.truncate(200);
        CallError::Unexpected(format!("{name}: {s}"))
    })
}

/// Declares typed requests: `Name { fields } -> Reply: |response| pattern => value`.
macro_rules! typed {
    ($(
        $(#[$doc:meta])*
        $name:ident { $($f:ident : $t:ty),* $(,)? } => $reply:ty,
            |$wire:pat_param| $mk:expr,
            { $($pat:pat => $out:expr),+ $(,)? };
    )*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name { $(#[allow(missing_docs)] pub $f: $t),* }
        impl Typed for $name {
            type Reply = $reply;
            fn request(self) -> Request {
                let $wire = self;
                $mk
            }
            fn reply(r: Response) -> Result<$reply, Response> {
                match r {
                    $($pat => Ok($out),)+
                    other => Err(other),
                }
            }
        }
    )*};
}

typed! {
    /// Any role: who are you, how are you.
    Ping {} => ActorInfo, |_| Request::Ping, { Response::Pong(i) => i };

    /// Node agent: its process's transport address and metrics (Prometheus text).
    Metrics {} => (String, String), |_| Request::Metrics, { Response::Metrics { instance, text } => (instance, text) };
    /// Any role: fault injection.
    Chaos { action: ChaosAction } => (), |x| Request::Chaos(x.action), { Response::Ack => () };
    /// Embedder: unit vectors of texts, with the model identity they carry.
    Embed { texts: Vec<String> } => (ModelIdentity, Vec<Vec<f32>>),
        |x| Request::Embed { texts: x.texts }, { Response::Embeddings { model, vectors } => (model, vectors) };
    /// Embedder: chunk and embed documents (ingest); documents that failed come back named.
    ChunkEmbed { docs: Vec<Document>, chunk_tokens: u32, overlap: u32, sentences: bool }
        => (ModelIdentity, Vec<WriteOp>, Vec<(String, String)>),
        |x| Request::ChunkEmbed { docs: x.docs, chunk_tokens: x.chunk_tokens, overlap: x.overlap, sentences: x.sentences }, { Response::Chunked { model, ops, failed } => (model, ops, failed) };
    /// Shard replica: search.
    Search { query: SearchQuery } => ShardHits,
        |x| Request::Search(x.query), { Response::Hits(h) => ShardHits::One(h),
            Response::HybridHits { dense, bm25 } => ShardHits::Two(dense, bm25) };
    /// Shard replica: search unless its digest is still `known_digest`; the digest it read at.
    SearchAt { query: SearchQuery, known_digest: Option<u64> } => (u64, SearchAnswer),
        |x| Request::SearchAt { query: x.query, known_digest: x.known_digest },
        { Response::Searched { digest, answer } => (digest, answer) };
    /// Shard replica: a durable write; the last sequence number.
    Write { ops: Vec<WriteOp>, model: ModelIdentity } => u64,
        |x| Request::Write { ops: x.ops, model: x.model }, { Response::Written { seq } => seq };
    /// Shard replica: durable deletions at a version; the last sequence number.
    Delete { doc_ids: Vec<String>, version: u64 } => u64,
        |x| Request::Delete { doc_ids: x.doc_ids, version: x.version },
        { Response::Written { seq } => seq };
    /// Coordinator: delete documents at the write quorum (the coordinator picks the version).
    DeleteDocuments { doc_ids: Vec<String> } => IngestResult,
        |x| Request::Delete { doc_ids: x.doc_ids, version: 0 },
        { Response::Ingested(r) => r };
    /// Shard replica: the digest of each bucket of its documents.
    BucketDigests { buckets: u32 } => Vec<u64>,
        |x| Request::BucketDigests { buckets: x.buckets }, { Response::BucketDigests(d) => d };
    /// Shard replica: the versions of the documents in the first buckets wanted (a page); with
    /// how many buckets it covers.
    VersionsIn { buckets: u32, wanted: Vec<u32>, max_bytes: u32 } => (ShardVersions, u32),
        |x| Request::VersionsIn { buckets: x.buckets, wanted: x.wanted, max_bytes: x.max_bytes },
        { Response::Versions { versions, covered } => (versions, covered) };
    /// Shard replica: the digest of its versions, and its document count.
    Digest {} => (u64, u64), |_| Request::Digest, { Response::Digest { digest, docs } => (digest, docs) };
    /// Shard replica: the live copies of documents.
    Fetch { doc_ids: Vec<String> } => (Vec<WriteOp>, Option<ModelIdentity>, u32),
        |x| Request::Fetch { doc_ids: x.doc_ids }, { Response::Fetched { ops, model, covered } => (ops, model, covered) };
    /// Reranker: relevance scores of passages for a query.
    Rerank { query: String, passages: Vec<String>, known: Vec<Option<f32>>, model: Option<ModelIdentity> } => Vec<f32>,
        |x| Request::Rerank { query: x.query, passages: x.passages, known: x.known, model: x.model }, { Response::Scores(s) => s };
    /// Generator: start a stream; its id.
    Generate { request: GenerationRequest } => u64,
        |x| Request::Generate(x.request), { Response::StreamStarted { stream } => stream };
    /// Generator or coordinator: the next piece of a stream.
    StreamNext { stream: u64, wait_ms: u64 } => StreamChunk,
        |x| Request::StreamNext { stream: x.stream, wait_ms: x.wait_ms }, { Response::Stream(c) => c };
    /// Generator: stop a stream.
    Cancel { stream: u64 } => (), |x| Request::Cancel { stream: x.stream }, { Response::Ack => () };
    /// Coordinator: retrieval.
    Retrieve { query: String, options: RetrieveOptions } => RetrieveResult,
        |x| Request::Retrieve { query: x.query, options: x.options }, { Response::Retrieved(r) => r };
    /// Coordinator: start an answer stream; its id.
    Ask { question: String, options: AskOptions } => u64,
        |x| Request::Ask { question: x.question, options: x.options }, { Response::StreamStarted { stream } => stream };
    /// Coordinator: ingest documents.
    Ingest { docs: Vec<Document> } => IngestResult,
        |x| Request::Ingest { docs: x.docs }, { Response::Ingested(r) => r };
    /// Coordinator: the cluster's status.
    Status {} => ClusterStatus, |_| Request::Status, { Response::Status(s) => s };
}

/// Fetches the live copies of `doc_ids` from shard replica `replica`, asking again for the ids
/// an answer did not cover (answers stop at a size bound); each call gets `timeout`.
pub async fn fetch_all(
    replica: &ActorRef<RoleMsg>,
    doc_ids: &[String],
    timeout: std::time::Duration,
) -> Result<(Vec<WriteOp>, Option<ModelIdentity>), CallError> {
    let (mut ops, mut model) = (Vec::new(), None);
    let mut rest = doc_ids;
    while !rest.is_empty() {
        let (got, m, covered) = call_typed(
            replica,
            Fetch {
                doc_ids: rest.to_vec(),
            },
            timeout,
        )
        .await?;
        ops.extend(got);
        model = model.or(m);
        let covered = (covered as usize).min(rest.len());
        if covered == 0 {
            return Err(CallError::Unexpected(
                "the replica covered none of the ids asked for".into(),
            ));
        }
        rest = &rest[covered..];
    }
    Ok((ops, model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragfleet_proto::{Hit, WireError};

    #[test]
    fn replies_of_the_expected_shape_are_taken_and_others_handed_back() {
        let hit = Hit {
            doc_id: "d".into(),
            chunk_id: "d#0".into(),
            score: 1.0,
            similarity: None,
            text: "t".into(),
            sentence_score: None,
        };
        assert_eq!(
            Search::reply(Response::Hits(vec![hit.clone()])),
            Ok(ShardHits::One(vec![hit.clone()]))
        );
        assert_eq!(
            Search::reply(Response::HybridHits {
                dense: vec![hit.clone()],
                bm25: vec![]
            }),
            Ok(ShardHits::Two(vec![hit], vec![]))
        );
        assert_eq!(Search::reply(Response::Ack), Err(Response::Ack));
        assert_eq!(Rerank::reply(Response::Scores(vec![0.5])), Ok(vec![0.5]));
        let e = Response::Error(WireError::Deadline);
        assert_eq!(Rerank::reply(e.clone()), Err(e));
        assert!(matches!((Ping {}).request(), Request::Ping));
        assert!(matches!(
            (StreamNext {
                stream: 3,
                wait_ms: 9
            })
            .request(),
            Request::StreamNext {
                stream: 3,
                wait_ms: 9
            }
        ));
    }
}
