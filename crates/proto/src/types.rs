//! Plain data types shared by every layer and carried on the wire.
use serde::{Deserialize, Serialize};

use crate::FrameError;

/// The embedding model contract between an index and the queries that search it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// Model name, e.g. `sentence-transformers/all-MiniLM-L6-v2`.
    pub name: String,
    /// sha256 of the weights file.
    pub weights_sha256: String,
    /// Output dimension.
    pub dim: u32,
    /// Maximum input length in tokens.
    pub max_len: u32,
    /// Pooling (`mean`, `cls`).
    pub pooling: String,
    /// Whether vectors are L2-normalised.
    pub normalized: bool,
}

impl std::fmt::Display for ModelIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sha: String = self.weights_sha256.chars().take(12).collect();
        write!(
            f,
            "{}@{} (dim {}, max_len {}, {} pooling{})",
            self.name,
            sha,
            self.dim,
            self.max_len,
            self.pooling,
            if self.normalized { ", normalised" } else { "" }
        )
    }
}

/// How a shard ranks chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// Vector search (HNSW + exact growing segment).
    #[default]
    Dense,
    /// BM25 over the chunk text.
    Bm25,
    /// Dense and BM25 rankings fused (`query.hybrid_fusion`: convex or reciprocal rank).
    Hybrid,
}

impl std::str::FromStr for SearchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dense" => Ok(Self::Dense),
            "bm25" => Ok(Self::Bm25),
            "hybrid" => Ok(Self::Hybrid),
            other => Err(format!(
                "unknown search mode {other:?} (dense, bm25, hybrid)"
            )),
        }
    }
}

/// One embedded chunk of a document, as stored by a shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkRecord {
    /// Id of the document the chunk belongs to.
    pub doc_id: String,
    /// Id of the chunk (`{doc_id}#{n}`).
    pub chunk_id: String,
    /// Text of the chunk.
    pub text: String,
    /// Its embedding.
    pub vector: Vec<f32>,
    /// Its sentences' embeddings, computed once at ingest (empty: none stored).
    #[serde(default)]
    pub sentences: SentenceVectors,
}

/// The embeddings of a chunk's sentences, int8 codes with one scale per sentence: what the
/// sentence reranker scores (a passage's sentence closest to the query), computed once at
/// ingest and stored with the chunk, so reranking is a few dot products at the shard.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SentenceVectors {
    /// One per sentence: code x scale is the vector's component.
    pub scales: Vec<f32>,
    /// The codes, sentence after sentence, `codes.len() / scales.len()` each.
    pub codes: Vec<i8>,
}

impl SentenceVectors {
    /// Quantises unit vectors (one per sentence) to int8 codes.
    pub fn quantize(vectors: &[Vec<f32>]) -> SentenceVectors {
        let mut out = SentenceVectors::default();
        let dim = vectors.first().map_or(0, Vec::len);
        if dim == 0 || vectors.iter().any(|v| v.len() != dim) {
            return out;
        }
        for v in vectors {
            let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            out.scales.push(scale);
            out.codes.extend(
                v.iter()
                    .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8),
            );
        }
        out
    }

    /// Sentences stored.
    pub fn len(&self) -> usize {
        self.scales.len()
    }

    /// Whether none are stored.
    pub fn is_empty(&self) -> bool {
        self.scales.is_empty()
    }

    /// The largest dot product of `query` with a sentence (its cosine, for unit vectors);
    /// `None` when none is stored or the dimensions differ.
    pub fn best_dot(&self, query: &[f32]) -> Option<f32> {
        let n = self.scales.len();
        if n == 0 || query.is_empty() || self.codes.len() != n * query.len() {
            return None;
        }
        self.codes
            .chunks_exact(query.len())
            .zip(&self.scales)
            .map(|(c, s)| c.iter().zip(query).map(|(&c, q)| c as f32 * q).sum::<f32>() * s)
            .reduce(f32::max)
    }
}

/// A change to a shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WriteOp {
    /// Replace every chunk of `doc_id` with these.
    Upsert {
        /// Document id.
        doc_id: String,
        /// Its chunks.
        chunks: Vec<ChunkRecord>,
        /// Write version (see [`WriteOp::version`]).
        version: u64,
    },
    /// Remove the document.
    Delete {
        /// Document id.
        doc_id: String,
        /// Write version (see [`WriteOp::version`]).
        version: u64,
    },
}

impl WriteOp {
    /// About how many bytes the op takes on the wire (texts, ids, vectors, sentence codes).
    pub fn approx_bytes(&self) -> usize {
        match self {
            WriteOp::Upsert { doc_id, chunks, .. } => {
                doc_id.len()
                    + 16
                    + chunks
                        .iter()
                        .map(|c| {
                            c.doc_id.len()
                                + c.chunk_id.len()
                                + c.text.len()
                                + 4 * c.vector.len()
                                + c.sentences.codes.len()
                                + 4 * c.sentences.scales.len()
                                + 16
                        })
                        .sum::<usize>()
            }
            WriteOp::Delete { doc_id, .. } => doc_id.len() + 16,
        }
    }

    /// The document the op touches.
    pub fn doc_id(&self) -> &str {
        match self {
            WriteOp::Upsert { doc_id, .. } | WriteOp::Delete { doc_id, .. } => doc_id,
        }
    }

    /// The write's version, stamped by the coordinator that accepted it (a hybrid clock:
    /// microseconds since the epoch, strictly increasing per coordinator). Replicas keep the
    /// highest version of each document (last writer wins), so a late or replayed older copy,
    /// from a retry or a catch-up, never overwrites a newer write or resurrects a deleted
    /// document. Version 0 means unversioned: always applied.
    pub fn version(&self) -> u64 {
        match self {
            WriteOp::Upsert { version, .. } | WriteOp::Delete { version, .. } => *version,
        }
    }
}

/// A new write version: microseconds since the Unix epoch, strictly greater than every version
/// this process handed out before (see [`WriteOp::version`]).
pub fn next_write_version() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = clock_micros().max(1);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let v = now.max(last + 1);
        match LAST.compare_exchange_weak(last, v, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return v,
            Err(cur) => last = cur,
        }
    }
}

/// This machine's wall clock in microseconds since the Unix epoch: the unit of write versions
/// (0 if the clock is before the epoch).
pub fn clock_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A search hit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    /// Document id.
    pub doc_id: String,
    /// Chunk id.
    pub chunk_id: String,
    /// Score (higher is better; its scale depends on the mode).
    pub score: f32,
    /// Cosine similarity of the chunk to the query embedding, in every mode where the query
    /// has one (what a reranker's score is fused with).
    pub similarity: Option<f32>,
    /// Chunk text.
    pub text: String,
    /// The cosine of the chunk's sentence closest to the query (its stored sentence vectors;
    /// `None` when the chunk has none or the query no embedding): the sentence reranker's
    /// score, computed where the vectors are.
    #[serde(default)]
    pub sentence_score: Option<f32>,
}

/// A query as a shard sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchQuery {
    /// Query embedding (dense and hybrid).
    pub vector: Vec<f32>,
    /// Query text (bm25 and hybrid).
    pub text: String,
    /// Hits wanted.
    pub k: u32,
    /// Ranking.
    pub mode: SearchMode,
    /// Identity of the model that embedded `vector`.
    pub model: Option<ModelIdentity>,
}

/// Why a shard is missing from an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeftOut {
    /// Shard id.
    pub shard: u32,
    /// `deadline`, `no_live_replica` or `error: ...`.
    pub reason: String,
}

/// How much of the corpus an answer covered.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Coverage {
    /// Shards in the index.
    pub shards_total: u32,
    /// Shards whose hits are in the answer.
    pub shards_answered: u32,
    /// Shards left out, with the reason.
    pub left_out: Vec<LeftOut>,
}

impl Coverage {
    /// Fraction of shards that answered.
    pub fn fraction(&self) -> f64 {
        if self.shards_total == 0 {
            0.0
        } else {
            self.shards_answered as f64 / self.shards_total as f64
        }
    }
}

/// Per-stage wall times in milliseconds.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Timings {
    /// Query embedding.
    pub embed: f64,
    /// Scatter-gather over the shards.
    pub search: f64,
    /// Cross-encoder reranking.
    pub rerank: f64,
    /// Time to the first generated token (ask only).
    pub first_token: f64,
    /// Generation (ask only).
    pub generate: f64,
    /// End to end.
    pub total: f64,
}

/// Options of a retrieval.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RetrieveOptions {
    /// Hits wanted (cluster default when `None`).
    pub k: Option<u32>,
    /// Ranking mode (cluster default `query.mode` when `None`).
    #[serde(default)]
    pub mode: Option<SearchMode>,
    /// Rerank on/off (cluster default when `None`).
    pub rerank: Option<bool>,
    /// End-to-end deadline in ms (cluster default when `None`).
    pub deadline_ms: Option<u64>,
    /// Whether the retrieval-result cache may answer (cluster default, on, when `None`;
    /// `Some(false)`: computed afresh and not kept).
    #[serde(default)]
    pub cache: Option<bool>,
    /// Whether a slow shard replica may be hedged (cluster default `query.hedge` when `None`).
    #[serde(default)]
    pub hedge: Option<bool>,
}

/// Result of a retrieval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrieveResult {
    /// Ranked hits.
    pub hits: Vec<Hit>,
    /// Coverage report.
    pub coverage: Coverage,
    /// Stage timings.
    pub timings_ms: Timings,
    /// What the rerank stage did: `None` when reranking was not asked for, `"applied"`, or
    /// `"skipped: REASON"` (deadline, overloaded, no reranker replica, error) when the hits
    /// kept their retrieval order.
    pub rerank: Option<String>,
    /// How the search was degraded, if it was: a dense or hybrid query whose embedding could
    /// not be had (no embedder replica reachable) is answered by BM25 alone and says so here.
    pub degraded: Option<String>,
    /// What the retrieval-result cache did: `None` when it was not asked (off or bypassed),
    /// `"hit"` (every shard still held the state the cached result was computed from),
    /// `"miss"`, or `"stale"` (a cached result existed but a shard had changed since).
    #[serde(default)]
    pub cache: Option<String>,
    /// Shards whose answer came from a hedged request (a second replica asked because the
    /// first was slower than its recent p95).
    #[serde(default)]
    pub hedged: Vec<u32>,
    /// The coordinator node that answered.
    #[serde(default)]
    pub coordinator: String,
}

/// A document to ingest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// Stable id; re-ingesting an id replaces the document.
    pub id: String,
    /// Optional title, prepended to the text.
    pub title: String,
    /// Body.
    pub text: String,
}

/// Outcome of an ingest request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct IngestResult {
    /// Documents acknowledged (durable on a write quorum).
    pub documents: u64,
    /// Chunks written.
    pub chunks: u64,
    /// Documents that failed, with the reason.
    pub failed: Vec<(String, String)>,
    /// Where the request's time went, in ms.
    #[serde(default)]
    pub timings_ms: IngestTimings,
}

/// Wall time of an ingest request's stages, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct IngestTimings {
    /// Chunking and embedding on the embedder replicas (in parallel across them).
    pub embed: f64,
    /// Routing and the durable writes on every shard's replicas, to the write quorum.
    pub write: f64,
}

/// Role of an actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Node agent (heartbeats).
    Node,
    /// Query orchestrator.
    Coordinator,
    /// Query / document encoder.
    Embedder,
    /// Index shard replica.
    Shard,
    /// Cross-encoder.
    Reranker,
    /// Answer generator.
    Generator,
}

/// Serving state of a shard replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaState {
    /// Copying missed writes from a peer; not searched.
    CatchingUp,
    /// Serving queries.
    Serving,
}

impl ReplicaState {
    /// Name used in status output.
    pub fn as_str(&self) -> &'static str {
        match self {
            ReplicaState::CatchingUp => "catching-up",
            ReplicaState::Serving => "serving",
        }
    }
}

/// What an actor says about itself in answer to a ping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActorInfo {
    /// Node the actor runs on.
    pub node: String,
    /// Its role.
    pub role: Role,
    /// Shard id (shard replicas).
    pub shard: Option<u32>,
    /// Replica state (shard replicas).
    pub state: ReplicaState,
    /// Live documents (shard replicas).
    pub docs: u64,
    /// Live chunks (shard replicas).
    pub chunks: u64,
    /// Last applied write sequence number (shard replicas).
    pub last_seq: u64,
}

/// Status of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// host:port.
    pub addr: String,
    /// Whether it answers heartbeats.
    pub alive: bool,
}

/// Status of a replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Node hosting it.
    pub node: String,
    /// `serving`, `catching-up`, `suspected` or `down`.
    pub state: String,
    /// Documents it holds.
    pub docs: u64,
}

/// Status of a shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardStatus {
    /// Shard id.
    pub id: u32,
    /// Its replicas as placed by cluster.toml.
    pub replicas: Vec<ReplicaStatus>,
}

/// Cluster status as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Nodes of cluster.toml.
    pub nodes: Vec<NodeStatus>,
    /// Shards and their replicas.
    pub shards: Vec<ShardStatus>,
    /// Embedding model the cluster runs.
    pub model: Option<ModelIdentity>,
    /// The answering coordinator's caches.
    #[serde(default)]
    pub caches: Vec<CacheStatus>,
    /// The answering coordinator's hedged shard requests.
    #[serde(default)]
    pub hedges: HedgeStatus,
}

/// One cache of a coordinator, counted since it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheStatus {
    /// `query_embedding` or `retrieval`.
    pub name: String,
    /// Entries held.
    pub entries: u64,
    /// Most entries it holds.
    pub capacity: u64,
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Lookups that found an entry made stale by a write since (retrieval only).
    pub stale: u64,
}

impl CacheStatus {
    /// Hits over all lookups (0 before the first).
    pub fn hit_rate(&self) -> f64 {
        let all = self.hits + self.misses + self.stale;
        if all == 0 {
            0.0
        } else {
            self.hits as f64 / all as f64
        }
    }
}

/// Hedged shard requests of a coordinator, counted since it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HedgeStatus {
    /// Shard requests sent (first attempts).
    pub requests: u64,
    /// Hedges sent: the same request to a second replica.
    pub sent: u64,
    /// Hedges whose answer came first.
    pub won: u64,
    /// Hedges not sent because the cap (`query.hedge_max_ratio`) was reached.
    pub capped: u64,
}

/// Sampling settings of generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// RNG seed.
    pub seed: u64,
    /// Repetition penalty (CTRL-style, over the stream's own generated tokens): a positive logit
    /// of a token already generated is divided by it, a negative one multiplied; 1 or `None`:
    /// off. `None` takes the cluster's `generator.repetition_penalty`.
    pub repetition_penalty: Option<f32>,
    /// Subtracted from a token's logit once per time it was generated (OpenAI's
    /// `frequency_penalty`); `None` takes the cluster default.
    pub frequency_penalty: Option<f32>,
    /// Subtracted from the logit of any token generated before (OpenAI's `presence_penalty`);
    /// `None` takes the cluster default.
    pub presence_penalty: Option<f32>,
    /// A token that would repeat an n-gram of this size already generated is never picked
    /// (0: off); `None` takes the cluster default.
    pub no_repeat_ngram: Option<u32>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            repetition_penalty: None,
            frequency_penalty: None,
            presence_penalty: None,
            no_repeat_ngram: None,
        }
    }
}

/// Options of an `ask`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AskOptions {
    /// Retrieval options.
    pub retrieve: RetrieveOptions,
    /// Answer length limit in tokens (cluster default when `None`).
    pub max_tokens: Option<u32>,
    /// Sampling.
    pub sampling: Sampling,
    /// How to answer (the cluster's `generator.answer_mode` when `None`).
    pub answer_mode: Option<AnswerMode>,
    /// Answer without retrieval (the model alone; no coverage is claimed).
    pub skip_retrieval: bool,
    /// The client's own system prompt: it replaces ragfleet's when retrieval is skipped and
    /// follows it otherwise.
    pub system: Option<String>,
    /// Push the answer's pieces as they are produced (`None`: yes, when the client has an
    /// inbox); `Some(false)`: the client long-polls for them, and so does the coordinator for
    /// the generator's.
    #[serde(default)]
    pub push: Option<bool>,
    /// The client's inbox (set by the client library).
    #[serde(default)]
    pub push_to: Option<PushTarget>,
}

/// How an answer is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerMode {
    /// The generator writes it.
    Generate,
    /// Built from the sources' sentences closest to the question, quoted with their labels.
    Extractive,
    /// Generated and checked against the sources before it is sent: extractive when no
    /// generator replica can answer or the generated answer is weakly grounded.
    Auto,
}

impl std::str::FromStr for AnswerMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "generate" => Ok(AnswerMode::Generate),
            "extractive" => Ok(AnswerMode::Extractive),
            "auto" => Ok(AnswerMode::Auto),
            other => Err(format!(
                "unknown answer mode {other:?} (generate, extractive, auto)"
            )),
        }
    }
}

/// How well one sentence of an answer is supported by the passages it was given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentenceSupport {
    /// The sentence.
    pub text: String,
    /// Support in [0, 1]: half its best cosine similarity to a passage sentence, half the share
    /// of its content words found in the passages.
    pub support: f32,
    /// Below the weak-support line (0.5).
    pub weak: bool,
}

/// The grounding of an answer in its context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grounding {
    /// Mean support of the sentences.
    pub score: f32,
    /// Each sentence's support.
    pub sentences: Vec<SentenceSupport>,
}

/// A cited source of an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// Document id.
    pub doc_id: String,
    /// Retrieval score.
    pub score: f32,
}

/// The closing part of an `ask` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AskSummary {
    /// Whole answer text.
    pub answer: String,
    /// Sources in the context.
    pub sources: Vec<Source>,
    /// Coverage of the retrieval.
    pub coverage: Coverage,
    /// Stage timings.
    pub timings_ms: Timings,
    /// No shard answered: the model answered alone.
    pub unsourced: bool,
    /// Why the answer ended: `stop` (the model ended it, at a sentence end or its end of
    /// sequence), `length` (the token budget ran out), `deadline`, `error`.
    pub end_reason: String,
    /// The answer ended before its natural end (see `truncated_reason`).
    pub truncated: bool,
    /// Why the answer ended early: `"deadline"` (the end-to-end deadline) or
    /// `"error: ..."` (the generator failed or stalled mid-answer); `None` when complete.
    pub truncated_reason: Option<String>,
    /// What the rerank stage did (see [`RetrieveResult::rerank`]).
    pub rerank: Option<String>,
    /// How retrieval was degraded, if it was (see [`RetrieveResult::degraded`]).
    pub degraded: Option<String>,
    /// How the answer was made: `generate` or `extractive`.
    pub answer_mode: String,
    /// Why an `auto` answer is extractive although a generator answered (its grounding was
    /// below `generator.min_grounding`), or why it fell back at all; `None` otherwise.
    pub fallback: Option<String>,
    /// How well each sentence of a generated answer is supported by its context (`None` when
    /// it could not be measured: no context, no embedder).
    pub grounding: Option<Grounding>,
}

/// A piece of a token stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamChunk {
    /// Text produced since the last chunk.
    pub text: String,
    /// Tokens produced since the last chunk.
    pub tokens: u32,
    /// Whether the stream has ended.
    pub done: bool,
    /// With `done`: why a generation ended (`stop` or `length`), when the producer says.
    pub end: Option<String>,
    /// Set on the last chunk of an ask stream.
    pub summary: Option<AskSummary>,
}

/// What a shard replica holds of every document: the version of each live document and of each
/// deletion it remembers, sorted by document id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardVersions {
    /// Model pinned by the replica.
    pub model: Option<ModelIdentity>,
    /// (document id, version) of every live document.
    pub live: Vec<(String, u64)>,
    /// (document id, version) of every remembered deletion.
    pub deleted: Vec<(String, u64)>,
}

impl ShardVersions {
    /// Order-independent digest: the wrapping sum of a 64-bit FNV-1a hash of every entry, so two
    /// replicas holding the same versions agree whatever order they were written in.
    pub fn digest(&self) -> u64 {
        shard_digest(
            self.live.iter().map(|(d, v)| (d.as_str(), *v)),
            self.deleted.iter().map(|(d, v)| (d.as_str(), *v)),
        )
    }
}

/// The digest of live documents and remembered deletions given as (id, version) pairs, in any
/// order (what [`ShardVersions::digest`] computes, for callers that hold them otherwise).
pub fn shard_digest<'a>(
    live: impl Iterator<Item = (&'a str, u64)>,
    deleted: impl Iterator<Item = (&'a str, u64)>,
) -> u64 {
    let live = live.map(|(d, v)| entry_hash(d, v, true));
    let deleted = deleted.map(|(d, v)| entry_hash(d, v, false));
    live.chain(deleted).fold(0u64, u64::wrapping_add)
}

/// The most buckets a `BucketDigests` or `VersionsIn` request may name.
pub const MAX_DIGEST_BUCKETS: u32 = 1 << 16;

/// The most bytes of versions one `VersionsIn` answer carries (a frame holds 16 MiB): a shard of
/// a million documents has ~20-50 MB of (id, version) pairs.
pub const VERSIONS_PAGE_BYTES: u32 = 4 << 20;

/// The longest document id accepted, in bytes (as Elasticsearch's `_id`): ids travel in every
/// write, version list and hit.
pub const MAX_DOC_ID_BYTES: usize = 512;

/// Which of `buckets` buckets a document id falls in (its FNV-1a hash, version left out, so a
/// document stays in its bucket across versions, then mixed: FNV's bits alone put ids that
/// differ in their last characters into a few buckets). `buckets` of 0 counts as 1. For a power
/// of two, an id's bucket is its bucket of [`MAX_DIGEST_BUCKETS`] modulo the count (a shard
/// keeps its digests in those and folds them).
pub fn doc_bucket(doc_id: &str, buckets: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in doc_id.as_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // MurmurHash3's 64-bit finaliser
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h % buckets.max(1) as u64) as u32
}

/// How many buckets two replicas of about `docs` documents compare: a power of two giving
/// ~256 documents a bucket (so a repair of a few documents moves a few buckets' versions, not
/// the shard's), at most [`MAX_DIGEST_BUCKETS`].
pub fn bucket_count(docs: u64) -> u32 {
    (docs / 256)
        .max(1)
        .next_power_of_two()
        .min(MAX_DIGEST_BUCKETS as u64) as u32
}

/// The bytes an (id, version) pair takes in a version list, about (postcard: a length, the id,
/// a varint version).
pub fn version_entry_bytes(doc_id: &str) -> usize {
    doc_id.len() + 12
}

/// 64-bit FNV-1a of (document id, version, live or deleted), stable across processes.
pub fn entry_hash(doc_id: &str, version: u64, live: bool) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for &b in doc_id.as_bytes() {
        eat(b);
    }
    eat(0xff); // no id byte is 0xff in UTF-8: separates the id from the version
    for b in version.to_le_bytes() {
        eat(b);
    }
    eat(live as u8);
    h
}

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

impl Document {
    /// Why this document cannot be ingested (no id, an id longer than [`MAX_DOC_ID_BYTES`], no
    /// text, larger than [`MAX_DOCUMENT_BYTES`]); the one check of a document, wherever it is
    /// made.
    pub fn check(&self) -> Result<(), String> {
        let size = self.text.len() + self.title.len();
        if self.id.trim().is_empty() {
            Err("empty document id".into())
        } else if self.id.len() > MAX_DOC_ID_BYTES {
            Err(format!(
                "document id of {} bytes exceeds the limit of {MAX_DOC_ID_BYTES} bytes",
                self.id.len()
            ))
        } else if self.text.trim().is_empty() && self.title.trim().is_empty() {
            Err("document has no text".into())
        } else if size > MAX_DOCUMENT_BYTES {
            Err(format!(
                "document of {size} bytes exceeds the limit of {MAX_DOCUMENT_BYTES} bytes"
            ))
        } else {
            Ok(())
        }
    }

    /// The text that is chunked and embedded: the title (when there is one) as a first
    /// sentence, then the body.
    pub fn body(&self) -> String {
        if self.title.trim().is_empty() {
            self.text.clone()
        } else {
            format!("{}. {}", self.title.trim(), self.text)
        }
    }
}
