//! What a shard stores and is asked: the model contract, chunks and their sentence vectors,
//! writes, queries and hits.
use super::*;

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
