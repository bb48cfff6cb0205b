//! What a client sends and gets back: documents and ingest outcomes, retrieval and `ask`
//! options, answers with their coverage, timings, grounding and sources, token streams.
use super::*;

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

impl Document {
    /// Why this document cannot be ingested (no id, an id longer than [`MAX_DOC_ID_BYTES`], no
    /// text, larger than [`MAX_DOCUMENT_BYTES`]); the one check of a document, wherever it is
    /// made.
    pub fn check(&self) -> Result<(), String> {
        let size = self.text.len() + self.title.len();
        check_doc_id(&self.id)?;
        if self.text.trim().is_empty() && self.title.trim().is_empty() {
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
