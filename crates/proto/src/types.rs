//! Plain data types shared by every layer and carried on the wire: the requests, answers and
//! errors of the wire here, what they carry in the submodules (re-exported).
use serde::{Deserialize, Serialize};

use crate::FrameError;

mod answers;
mod chunks;
mod status;
mod sync;

pub use answers::*;
pub use chunks::*;
pub use status::*;
pub use sync::*;

/// Fault injection for chaos experiments and supervision tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChaosAction {
    /// The actor panics (its supervisor restarts it).
    Panic,
    /// The actor stalls for this many ms before answering anything else.
    Stall(u64),
}

/// Every request a ragfleet actor may receive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness and self-description.
    Ping,
    /// Embed texts (embedder).
    Embed {
        /// Texts.
        texts: Vec<String>,
    },
    /// Chunk documents and embed the chunks (embedder, ingest path).
    ChunkEmbed {
        /// Documents.
        docs: Vec<Document>,
        /// Chunk length in tokens.
        chunk_tokens: u32,
        /// Overlap in tokens.
        overlap: u32,
        /// Whether each chunk's sentences are embedded too (`index.sentence_vectors`).
        sentences: bool,
    },
    /// Search (shard).
    Search(SearchQuery),
    /// Search (shard) unless the replica's digest is still `known_digest` (then it answers
    /// `Unchanged`): the coordinator's retrieval-result cache checks a cached result this way.
    SearchAt {
        /// The query.
        query: SearchQuery,
        /// The digest the caller's cached answer was read at.
        known_digest: Option<u64>,
    },
    /// Apply writes durably (shard); answered once fsynced.
    Write {
        /// Operations.
        ops: Vec<WriteOp>,
        /// Model that embedded the chunks.
        model: ModelIdentity,
    },
    /// Delete documents (coordinator: routed to their shards; shard: applied durably).
    Delete {
        /// Document ids.
        doc_ids: Vec<String>,
        /// Write version: clients send 0, the coordinator stamps it for the shards.
        version: u64,
    },
    /// The digest of each of `buckets` buckets of a shard replica's documents and deletion
    /// records (shard; see [`doc_bucket`]): a peer replica compares them with its own and asks
    /// the versions of the buckets that differ only.
    BucketDigests {
        /// How many buckets the document ids are hashed into (1 to [`MAX_DIGEST_BUCKETS`]).
        buckets: u32,
    },
    /// The version of every document and deletion record in these buckets (shard), in pages:
    /// the start of a catch-up or an anti-entropy repair by a peer replica.
    VersionsIn {
        /// How many buckets the ids are hashed into (as in `BucketDigests`).
        buckets: u32,
        /// The buckets wanted, in the order they are answered.
        wanted: Vec<u32>,
        /// About how many bytes the answer may carry (at most [`VERSIONS_PAGE_BYTES`]); it
        /// covers whole buckets, at least one.
        max_bytes: u32,
    },
    /// A digest of what a shard replica holds (shard): replicas compare digests and exchange
    /// versions only when they differ.
    Digest,
    /// The live copies of these documents (shard), for a peer replica pulling what it lacks.
    Fetch {
        /// Document ids.
        doc_ids: Vec<String>,
    },
    /// Score (query, passage) pairs (reranker).
    Rerank {
        /// Query.
        query: String,
        /// Passages.
        passages: Vec<String>,
        /// Each passage's best-sentence cosine as its shard computed it from stored sentence
        /// vectors (`None` where it had none): a sentence reranker of the same `model` uses
        /// them instead of embedding the sentences again; a cross-encoder ignores them.
        known: Vec<Option<f32>>,
        /// The model that embedded the stored sentence vectors and the query.
        model: Option<ModelIdentity>,
    },
    /// Start generating an answer to a chat prompt (generator).
    Generate(GenerationRequest),
    /// Next piece of a stream, waiting up to `wait_ms` for news (generator, coordinator).
    StreamNext {
        /// Stream id.
        stream: u64,
        /// Long-poll wait.
        wait_ms: u64,
    },
    /// A piece of a stream pushed by its producer to the consumer's inbox (sent as a cast,
    /// `RoleMsg::Push`, never as a call).
    Pushed {
        /// The consumer's subscription (see [`PushTarget`]).
        sub: u64,
        /// What the producer had since its last push.
        chunk: StreamChunk,
        /// Set when the stream failed.
        error: Option<String>,
    },
    /// Abandon a stream (generator, coordinator): its producer stops.
    Cancel {
        /// Stream id.
        stream: u64,
    },
    /// Retrieve (coordinator).
    Retrieve {
        /// Query text.
        query: String,
        /// Options.
        options: RetrieveOptions,
    },
    /// Ask (coordinator); answered with a stream id.
    Ask {
        /// Question.
        question: String,
        /// Options.
        options: AskOptions,
    },
    /// Ingest documents (coordinator).
    Ingest {
        /// Documents.
        docs: Vec<Document>,
    },
    /// Cluster status (coordinator).
    Status,
    /// Fault injection.
    Chaos(ChaosAction),
    /// The node process's metrics (node agent), in Prometheus text format.
    Metrics,
}

/// Every response.
// a stream's last chunk carries the answer's summary inline: responses are moved once, from
// the decoder to their caller, so the size of the largest variant costs nothing worth boxing
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `Ping`.
    Pong(ActorInfo),
    /// A node process's metrics.
    Metrics {
        /// The process's transport address (one process may host several logical nodes).
        instance: String,
        /// Prometheus text exposition.
        text: String,
    },
    /// Embeddings, in input order.
    Embeddings {
        /// Model identity.
        model: ModelIdentity,
        /// Vectors.
        vectors: Vec<Vec<f32>>,
    },
    /// Chunked and embedded documents.
    Chunked {
        /// Model identity.
        model: ModelIdentity,
        /// Upserts, one per document.
        ops: Vec<WriteOp>,
        /// Documents refused, with the reason.
        failed: Vec<(String, String)>,
    },
    /// Hits of a shard.
    Hits(Vec<Hit>),
    /// Hybrid hits of a shard, unfused: the coordinator merges each list across shards and
    /// fuses the two global rankings.
    HybridHits {
        /// Dense ranking.
        dense: Vec<Hit>,
        /// BM25 ranking.
        bm25: Vec<Hit>,
    },
    /// A shard's answer to `SearchAt`, with the digest of the state it read.
    Searched {
        /// The replica's digest (see [`ShardVersions::digest`]) when it searched.
        digest: u64,
        /// The hits, or that nothing changed since `known_digest`.
        answer: SearchAnswer,
    },
    /// Writes durable up to this sequence number.
    Written {
        /// Last sequence number.
        seq: u64,
    },
    /// Per-bucket digests of a shard replica (answer to `BucketDigests`).
    BucketDigests(Vec<u64>),
    /// What a shard replica holds in the first `covered` buckets asked for (answer to
    /// `VersionsIn`).
    Versions {
        /// The versions of those buckets' documents and deletion records.
        versions: ShardVersions,
        /// How many of the buckets asked for (from the first) this answer covers.
        covered: u32,
    },
    /// A shard replica's digest (see [`ShardVersions::digest`]).
    Digest {
        /// Order-independent hash of every (document, version, live or deleted).
        digest: u64,
        /// Live documents.
        docs: u64,
    },
    /// Live documents of a shard, as upserts (answer to `Fetch`).
    Fetched {
        /// Upserts of the live documents asked for (absent ones are left out).
        ops: Vec<WriteOp>,
        /// Model pinned by the shard.
        model: Option<ModelIdentity>,
        /// How many of the ids asked for (from the first) this answer covers: an answer stops
        /// at a size bound, and the rest are asked for again.
        covered: u32,
    },
    /// Reranker scores, in input order.
    Scores(Vec<f32>),
    /// A stream was opened.
    StreamStarted {
        /// Its id.
        stream: u64,
    },
    /// Next piece of a stream.
    Stream(StreamChunk),
    /// Result of a retrieval.
    Retrieved(RetrieveResult),
    /// Result of an ingest.
    Ingested(IngestResult),
    /// Cluster status.
    Status(ClusterStatus),
    /// Generic acknowledgement.
    Ack,
    /// The request failed.
    Error(WireError),
}

/// Errors that cross the wire.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum WireError {
    /// The request is invalid.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The actor cannot serve it now.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Query or write embedded with another model than the index pins.
    #[error("embedding model mismatch: index has {index}, request has {request}")]
    ModelMismatch {
        /// The index's model.
        index: String,
        /// The request's model.
        request: String,
    },
    /// The deadline passed.
    #[error("deadline exceeded")]
    Deadline,
    /// The actor does not handle this request.
    #[error("unsupported request {0}")]
    Unsupported(String),
    /// Anything else.
    #[error("internal error: {0}")]
    Internal(String),
    /// The frame did not decode.
    #[error("bad frame: {0}")]
    Frame(FrameError),
    /// The actor's queue is full: refused at once rather than queued without limit.
    #[error("overloaded: {0}")]
    Overloaded(String),
}

/// The largest cluster frame a node accepts (ractor_cluster's inbound limit); larger requests
/// are refused by the client before they are sent.
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// The largest document text an ingest accepts (its chunks and vectors must fit one frame).
pub const MAX_DOCUMENT_BYTES: usize = 4 << 20;

/// The most document text the client sends in one ingest request (it splits larger batches).
pub const MAX_INGEST_REQUEST_BYTES: usize = 2 << 20;

/// How reranker scores combine with the retrieval ranking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RerankFusion {
    /// `rerank_weight` x reranker score + the rest x cosine similarity of query and chunk (both
    /// cosines with the default sentence reranker); rank fusion for hits without a similarity
    /// (`bm25` mode).
    Weighted,
    /// Reciprocal rank fusion (k = 60) of the retrieval rank and the reranker rank.
    Rrf,
    /// The reranker's order alone (for a strong cross-encoder).
    Replace,
}

/// How a hybrid search fuses its dense and BM25 rankings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HybridFusion {
    /// Reciprocal rank fusion (k = 60) of the two ranks.
    Rrf,
    /// A convex combination of the two scores, each min-max normalised over the candidates:
    /// `hybrid_dense_weight` x the query similarity + the rest x the BM25 score (the default:
    /// never below dense retrieval on the corpora measured, where equal-weight RRF lost up to
    /// 0.044 nDCG@10).
    #[default]
    Convex,
    /// The convex combination with a dense weight moved per query towards the retriever whose
    /// ranking is the more confident for this query (its top score's standing above the rest
    /// of its list): a flat BM25 list (few or weak term matches) leaves the ranking to dense
    /// similarity, a flat similarity list leans on BM25. Measured no better than `convex` on the
    /// corpora at hand (see the README), so not the default.
    Adaptive,
}

impl HybridFusion {
    /// Whether the fused score is a normalised score combination (convex or adaptive) rather
    /// than reciprocal ranks.
    pub fn is_score_based(self) -> bool {
        matches!(self, HybridFusion::Convex | HybridFusion::Adaptive)
    }
}

/// A shard's answer to a search: one ranking, or the two unfused rankings of a hybrid search
/// (the coordinator fuses them across shards; see `ragfleet_index::ranking`).
#[derive(Debug, Clone, PartialEq)]
pub enum ShardHits {
    /// Dense or BM25 hits, by score.
    One(Vec<Hit>),
    /// A hybrid search's dense and BM25 rankings, unfused.
    Two(Vec<Hit>, Vec<Hit>),
}

/// What a shard replica answers to `SearchAt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SearchAnswer {
    /// Its digest is still the one the caller knows: the caller's cached answer stands.
    Unchanged,
    /// Dense or BM25 hits.
    One(Vec<Hit>),
    /// Hybrid: dense and BM25 rankings, unfused.
    Two(Vec<Hit>, Vec<Hit>),
}

/// A chat generation request: the one shape it has from the wire to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRequest {
    /// System prompt (the model's default when empty).
    pub system: String,
    /// User message.
    pub user: String,
    /// Token limit.
    pub max_tokens: u32,
    /// Sampling.
    pub sampling: Sampling,
    /// Where to push the tokens as they are produced (else they wait for `StreamNext` polls).
    #[serde(default)]
    pub push_to: Option<PushTarget>,
}

/// A consumer's inbox for pushed stream pieces: the process group its inbox actor is in, and
/// the subscription the pieces belong to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushTarget {
    /// The inbox actor's process group (one inbox per process).
    pub group: String,
    /// The subscription.
    pub sub: u64,
}
