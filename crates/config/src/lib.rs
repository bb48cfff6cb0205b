//! `cluster.toml`: the description of a ragfleet cluster, with validation that names the field.
#![warn(missing_docs, unreachable_pub)]

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Environment variable that overrides `models_dir`.
pub const MODELS_ENV: &str = "RAGFLEET_MODELS";

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML does not parse or a key is unknown or of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message (names the key and line).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid cluster config: field `{field}`: {message}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A node name that the file does not define.
    #[error("unknown node {0:?} (not in cluster.toml)")]
    UnknownNode(String),
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A role a node can host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Orchestrates queries, answers clients.
    Coordinator,
    /// Runs the embedding model.
    Embedder,
    /// Hosts shard replicas.
    Shard,
    /// Runs the cross-encoder.
    Reranker,
    /// Runs the generator.
    Generator,
}

/// One `[[node]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique node name.
    pub name: String,
    /// host:port the node listens on.
    pub addr: String,
    /// Roles it hosts.
    pub roles: Vec<NodeRole>,
    /// Embedder replicas on this node (default 1 when the role is present).
    #[serde(default = "one")]
    pub embedder_replicas: u32,
    /// host:port of the node's HTTP gateway (coordinator nodes only; none: no gateway).
    #[serde(default)]
    pub http_addr: Option<String>,
}

fn one() -> u32 {
    1
}

impl NodeConfig {
    /// Whether the node hosts `role`.
    pub fn has(&self, role: NodeRole) -> bool {
        self.roles.contains(&role)
    }
}

/// `[index]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    /// Number of shards.
    pub shards: u32,
    /// Replicas per shard, on distinct nodes.
    pub replication: u32,
    /// Replicas that must have a write durably before it is acknowledged.
    pub write_quorum: u32,
    /// Explicit placement: `placement[s]` lists the nodes of shard `s`.
    pub placement: Option<Vec<Vec<String>>>,
    /// Chunks in the growing segment before it is sealed and its HNSW graph built.
    pub segment_size: usize,
    /// Deprecated and ignored: the tiered policy of `merge_ratio` replaced it.
    #[serde(skip_serializing)]
    pub merge_below: Option<usize>,
    /// Tiered merging: a sealed segment merges with the smaller ones once they together hold
    /// 1/`merge_ratio` of its live chunks, so a shard keeps about log_ratio(chunks /
    /// segment_size) + 1 segments (2..=64).
    pub merge_ratio: usize,
    /// Merges a shard replica runs at a time (1..=8): beside the one the policy picks over all
    /// segments, smaller ones fold the seals that come meanwhile (each at most a quarter of the
    /// smallest running one), so a shard taking a steady stream of writes keeps few segments
    /// while its largest merge runs. 1: one at a time, which leaves a bulk load's cores to its
    /// graph builds (a 1M load measured ~8% faster).
    pub max_merges: usize,
    /// The HNSW implementation: "hnsw" (ragfleet's own; grows by insertion when merging) or
    /// "instant-distance".
    pub ann: String,
    /// HNSW degree M of "hnsw" (4..=64; level 0 holds 2M).
    pub hnsw_m: usize,
    /// Threads a graph build may use (0: all cores).
    pub build_threads: usize,
    /// HNSW construction beam.
    pub ef_construction: usize,
    /// HNSW search beam.
    pub ef_search: usize,
    /// Chunk length in tokens.
    pub chunk_tokens: usize,
    /// Overlap between consecutive chunks in tokens.
    pub chunk_overlap: usize,
    /// How often a serving shard replica compares its digest with its peers' and pulls what it
    /// lacks (anti-entropy), in ms; 0 turns it off (catch-up at start still runs).
    pub anti_entropy_ms: u64,
    /// How long a deletion record is kept, in seconds (0: for ever). A replica down for longer
    /// than this may hold documents deleted meanwhile: bring it back empty.
    pub deletion_grace_secs: u64,
    /// Seconds without a write after which a shard replica seals its growing segment (when it
    /// holds 256 chunks or more), so that a shard done with its ingest answers from graphs
    /// alone instead of scanning the growing segment in every query; 0: only when it is full.
    pub seal_idle_secs: u64,
    /// Megabytes of HNSW graphs (int8 codes and level-0 neighbour lists) a node copies out of
    /// their mapped files into memory backed by huge pages, where a search walks them with
    /// far fewer TLB misses; graphs past it are walked from their files (page cache), so a
    /// shard larger than memory still serves. Unset: a quarter of the machine's memory
    /// (nothing where the kernel gives no transparent huge pages); 0: every graph from its
    /// file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph_memory_mb: Option<u64>,
    /// Searches a shard replica runs or holds at once; past it a search is refused at once as
    /// overloaded (the coordinator asks the shard's other replica).
    pub max_searches: usize,
    /// Whether ingest embeds each chunk's sentences too and stores their vectors (int8) with
    /// the chunk, so the sentence reranker scores at the shard in microseconds instead of
    /// embedding every candidate's sentences at query time (ingest embeds about twice the
    /// text). Default: on when a node has the reranker role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentence_vectors: Option<bool>,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            shards: 4,
            replication: 2,
            write_quorum: 1,
            placement: None,
            segment_size: 4096,
            merge_below: None,
            merge_ratio: 16,
            max_merges: 4,
            ann: "hnsw".into(),
            hnsw_m: 16,
            build_threads: 0,
            ef_construction: 100,
            ef_search: 64,
            chunk_tokens: 200,
            chunk_overlap: 32,
            anti_entropy_ms: 30_000,
            deletion_grace_secs: 7 * 24 * 3600,
            seal_idle_secs: 10,
            graph_memory_mb: None,
            max_searches: 64,
            sentence_vectors: None,
        }
    }
}

/// `[query]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// Hits returned.
    pub top_k: u32,
    /// Time a shard has to answer, in ms.
    pub shard_deadline_ms: u64,
    /// Whether to rerank when a query does not say; unset: whenever some node has the reranker
    /// role (see [`ClusterConfig::rerank_by_default`]).
    pub rerank: Option<bool>,
    /// Candidates passed to the reranker.
    pub rerank_depth: u32,
    /// Ranking when a query does not say: `hybrid` (default: measured at or above the better
    /// single retriever on every judged corpus at hand, see the README), `dense` or `bm25`.
    pub mode: ragfleet_proto::SearchMode,
    /// How hybrid search fuses dense and BM25: `convex` (default), `adaptive` (convex with a
    /// per-query weight) or `rrf`.
    pub hybrid_fusion: ragfleet_proto::HybridFusion,
    /// `convex` fusion: the weight of the query similarity (the rest is BM25's).
    pub hybrid_dense_weight: f32,
    /// How reranker scores combine with the retrieval ranking.
    pub rerank_fusion: RerankFusion,
    /// Weight of the reranker score in `weighted` fusion (the rest goes to the query-chunk
    /// cosine similarity), 0 to 1.
    pub rerank_weight: f32,
    /// Whether the sentence reranker keeps the first-stage order when it has nothing to add:
    /// its scores barely differ, or (after a dense first stage) the candidates' best sentences
    /// are the passages themselves (`rerank: "abstained: ..."`).
    pub rerank_abstain: bool,
    /// End-to-end deadline in ms.
    pub deadline_ms: u64,
    /// Time the rerank stage has, in ms, inside the end-to-end deadline; past it the hits keep
    /// their retrieval order and the answer says `rerank: "skipped: deadline"`.
    pub rerank_deadline_ms: u64,
    /// Longest accepted query in bytes.
    pub max_query_bytes: usize,
    /// Requests a coordinator serves at once (retrievals, answers, ingests, deletes,
    /// embeddings); past it a request is refused at once as overloaded (HTTP 429), never queued.
    pub max_in_flight: usize,
    /// Answers a coordinator relays at once (a part of `max_in_flight`): generation is the
    /// scarce stage, and an answer queued behind others would only time out.
    pub max_answers_in_flight: usize,
    /// Query embeddings a coordinator keeps for queries asked again (0: none).
    pub embed_cache_entries: usize,
    /// Retrieval results a coordinator keeps for queries asked again (0: none). A kept result
    /// answers only while every shard replica asked still has the digest it was read at (any
    /// write or deletion changes it), so it is never older than an acknowledged write.
    pub result_cache_entries: usize,
    /// Hedged shard requests: a replica that has not answered within its recent p95 search
    /// time gets a second replica of its shard asked the same; the first answer wins.
    pub hedge: bool,
    /// Most hedges as a share of shard requests (a token bucket; 0 to 1).
    pub hedge_max_ratio: f64,
    /// Shortest wait before a hedge, in ms (the p95 of a fast replica can be tiny).
    pub hedge_min_ms: u64,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            top_k: 10,
            shard_deadline_ms: 500,
            rerank: None,
            rerank_depth: 30,
            mode: ragfleet_proto::SearchMode::Hybrid,
            hybrid_fusion: ragfleet_proto::HybridFusion::Convex,
            hybrid_dense_weight: 0.8,
            rerank_fusion: RerankFusion::Weighted,
            rerank_weight: 0.5,
            rerank_abstain: true,
            deadline_ms: 30_000,
            rerank_deadline_ms: 5_000,
            max_query_bytes: 8192,
            max_in_flight: 256,
            max_answers_in_flight: 8,
            embed_cache_entries: 4096,
            result_cache_entries: 1024,
            hedge: true,
            hedge_max_ratio: 0.1,
            hedge_min_ms: 2,
        }
    }
}

/// `[embedder]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedderConfig {
    /// Largest dynamic batch.
    pub max_batch: usize,
    /// Longest wait for a batch to fill, in ms.
    pub max_wait_ms: u64,
    /// Texts per embedding request on the ingest path.
    pub ingest_batch: usize,
    /// Texts an embedder replica holds waiting or embedding at once; past it a request is
    /// refused at once as overloaded (the coordinator tries another replica).
    pub max_queue: usize,
}

impl Default for EmbedderConfig {
    fn default() -> Self {
        EmbedderConfig {
            max_batch: 32,
            max_wait_ms: 3,
            ingest_batch: 64,
            max_queue: 4096,
        }
    }
}

/// `[reranker]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RerankerConfig {
    /// Requests a reranker replica holds waiting beside the one it scores; past it a request
    /// is refused at once (`overloaded`) and the coordinator tries another replica or skips.
    pub max_queue: usize,
}

impl Default for RerankerConfig {
    fn default() -> Self {
        RerankerConfig { max_queue: 8 }
    }
}

/// How reranker scores combine with the retrieval ranking (plain data, from the wire crate).
pub use ragfleet_proto::RerankFusion;

/// What to do when no shard answers an `ask`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoCoverage {
    /// Answer from the model alone, marked unsourced.
    Unsourced,
    /// Refuse with an error.
    Refuse,
}

/// `[generator]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Default answer length in tokens.
    pub max_tokens: u32,
    /// Token budget of a prompt and its answer: the passages fill what the question, the system
    /// prompt and the answer's `max_tokens` leave, an answer keeping back at most half of it (a
    /// longer one runs on to the model's own window).
    pub context_tokens: u32,
    /// Streams decoded together.
    pub max_streams: usize,
    /// Answers a generator replica lets wait for a free stream; past `max_streams + max_queue`
    /// it refuses at once (overloaded) and the coordinator tries another replica.
    pub max_queue: usize,
    /// Time allowed before the first token, in ms, before another replica is tried.
    pub first_token_timeout_ms: u64,
    /// Behaviour with zero coverage.
    pub on_no_coverage: NoCoverage,
    /// Default repetition penalty of answers (1: off; see `Sampling::repetition_penalty`).
    pub repetition_penalty: f32,
    /// Default frequency penalty of answers (0: off).
    pub frequency_penalty: f32,
    /// Default presence penalty of answers (0: off).
    pub presence_penalty: f32,
    /// Default size of n-grams an answer may not repeat (0: off).
    pub no_repeat_ngram: u32,
    /// How answers are made unless a request says: `generate`, `extractive` (the sources'
    /// sentences closest to the question), or `auto` (generated, checked against its sources,
    /// and extractive when no generator can answer or the generated answer's grounding is below
    /// `min_grounding`).
    pub answer_mode: ragfleet_proto::AnswerMode,
    /// The grounding score (0..=1) below which an `auto` answer is replaced by an extractive one.
    pub min_grounding: f32,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            max_tokens: 96,
            context_tokens: 1024,
            max_streams: 4,
            max_queue: 4,
            first_token_timeout_ms: 15_000,
            on_no_coverage: NoCoverage::Unsourced,
            repetition_penalty: 1.15,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            no_repeat_ngram: 4,
            answer_mode: ragfleet_proto::AnswerMode::Auto,
            min_grounding: 0.6,
        }
    }
}

/// `[failure]`: failure detection and reconnection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailureConfig {
    /// Heartbeat period in ms.
    pub heartbeat_ms: u64,
    /// Silence after which an actor or node is suspected, in ms.
    pub suspect_after_ms: u64,
    /// Longest reconnect backoff in ms.
    pub reconnect_max_ms: u64,
}

impl Default for FailureConfig {
    fn default() -> Self {
        FailureConfig {
            heartbeat_ms: 200,
            suspect_after_ms: 1000,
            reconnect_max_ms: 2000,
        }
    }
}

/// `[supervision]`: OTP-style restart intensity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    /// Restarts allowed within `within_secs` before escalating.
    pub max_restarts: u32,
    /// The window.
    pub within_secs: u64,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig {
            max_restarts: 3,
            within_secs: 10,
        }
    }
}

/// A whole `cluster.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Format version; must be 1.
    pub version: u32,
    /// Cluster name.
    pub name: String,
    /// Shared secret of the nodes.
    pub cookie: String,
    /// Where shard replicas keep their files.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Where model files are.
    #[serde(default = "default_models_dir")]
    pub models_dir: PathBuf,
    /// The nodes.
    #[serde(rename = "node")]
    pub nodes: Vec<NodeConfig>,
    /// Index settings.
    #[serde(default)]
    pub index: IndexConfig,
    /// Query settings.
    #[serde(default)]
    pub query: QueryConfig,
    /// Embedder settings.
    #[serde(default)]
    pub embedder: EmbedderConfig,
    /// Reranker settings.
    #[serde(default)]
    pub reranker: RerankerConfig,
    /// Generator settings.
    #[serde(default)]
    pub generator: GeneratorConfig,
    /// Failure detection.
    #[serde(default)]
    pub failure: FailureConfig,
    /// Supervision.
    #[serde(default)]
    pub supervision: SupervisionConfig,
    /// The HTTP gateway of coordinator nodes.
    #[serde(default)]
    pub http: HttpConfig,
    /// TLS between nodes (and clients): none means plain TCP with the cookie.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// `[tls]`: mutual TLS on the cluster transport. Every node and client presents a certificate
/// the CA signed for `server_name`; one without cannot join. The cookie stays a second check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA that signs every node's and client's certificate.
    pub ca: PathBuf,
    /// PEM file of this process's certificate (chain).
    pub cert: PathBuf,
    /// PEM file of its private key.
    pub key: PathBuf,
    /// The DNS name every node certificate carries (checked by whoever dials a node).
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

fn default_server_name() -> String {
    "ragfleet".into()
}

/// `[http]`: the HTTP gateway (`http_addr` of a coordinator node turns it on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Bearer tokens accepted by the API (with those of the environment variable
    /// `api_keys_env`); none at all: the API is open.
    pub api_keys: Vec<String>,
    /// Environment variable holding more API keys, comma-separated.
    pub api_keys_env: String,
    /// Largest request body in bytes (413 past it).
    pub max_body_bytes: usize,
    /// Documents one `POST /v1/documents` may carry.
    pub max_documents: usize,
    /// Connections the gateway holds open at once; past it the next waits, unaccepted, until
    /// one closes (each costs a file descriptor the node's files and cluster links share).
    pub max_connections: usize,
    /// Time a client has to send a request's headers once its connection is ready for one (a
    /// new connection, or an idle kept-alive one); past it the connection is closed.
    pub header_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            api_keys: Vec::new(),
            api_keys_env: "RAGFLEET_API_KEYS".into(),
            max_body_bytes: 8 << 20,
            max_documents: 1000,
            max_connections: 1024,
            header_timeout_ms: 10_000,
        }
    }
}

impl HttpConfig {
    /// Every accepted key: the file's and the environment's (blank entries dropped).
    pub fn keys(&self) -> Vec<String> {
        let env = std::env::var(&self.api_keys_env).unwrap_or_default();
        self.api_keys
            .iter()
            .cloned()
            .chain(env.split(',').map(|k| k.trim().to_string()))
            .filter(|k| !k.is_empty())
            .collect()
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_models_dir() -> PathBuf {
    PathBuf::from("models")
}

impl ClusterConfig {
    /// Whether queries are reranked when they do not say: `query.rerank`, or when unset,
    /// whether some node has the reranker role.
    pub fn rerank_by_default(&self) -> bool {
        self.query
            .rerank
            .unwrap_or_else(|| self.nodes.iter().any(|n| n.has(NodeRole::Reranker)))
    }

    /// Whether ingest stores sentence vectors (`index.sentence_vectors`, by default on when a
    /// node has the reranker role).
    pub fn sentence_vectors(&self) -> bool {
        self.index
            .sentence_vectors
            .unwrap_or_else(|| self.nodes.iter().any(|n| n.has(NodeRole::Reranker)))
    }
}

mod load;
mod placement;
mod validate;

pub use placement::shard_for;

#[cfg(test)]
mod tests;
