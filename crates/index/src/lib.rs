//! The index a shard replica holds: sealed HNSW segments plus one growing segment searched
//! exactly, a BM25 inverted index over the same chunks, a write-ahead log and snapshots.
//!
//! Knows nothing about actors; the shard actor wraps [`ShardIndex`].
#![warn(missing_docs, unreachable_pub)]

pub mod ann;
mod bm25;
pub mod chunk;
pub mod eval;
mod files;
mod lock;
mod segment;
mod shard;
pub mod vector;
mod wal;

pub use bm25::Bm25;
pub use files::{read_checked, write_checked};
pub use lock::DirLock;
pub use shard::{IndexSettings, PullPlan, RecoveryReport, ShardIndex};
pub use wal::{Wal, WalRecovery};

use ragfleet_proto::Hit;

/// Errors of the index layer.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// File system failure.
    #[error("io error on {path}: {source}")]
    Io {
        /// File or folder.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A file failed its checksum or does not decode.
    #[error("corrupt file {path}: {reason}")]
    Corrupt {
        /// File.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The request was embedded with another model than the index pins.
    #[error("embedding model mismatch: index has {index}, request has {request}")]
    ModelMismatch {
        /// Pinned model.
        index: String,
        /// Request's model.
        request: String,
    },
    /// Invalid input.
    #[error("bad input: {0}")]
    BadInput(String),
    /// Another owner (an earlier instance of the replica, another process) holds the data
    /// folder: one owner of a shard's files at a time.
    #[error("{path} is locked by another owner of this shard's files")]
    Locked {
        /// The data folder.
        path: std::path::PathBuf,
    },
}

impl IndexError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        IndexError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Reciprocal rank fusion with constant `k` (60 in ragfleet) of several ranked lists, keyed by
/// chunk id. Returns at most `limit` hits with the fused score.
pub fn rrf(lists: &[Vec<Hit>], k: f32, limit: usize) -> Vec<Hit> {
    let mut fused: std::collections::HashMap<&str, (f32, &Hit)> = std::collections::HashMap::new();
    for list in lists {
        for (rank, hit) in list.iter().enumerate() {
            let e = fused.entry(hit.chunk_id.as_str()).or_insert((0.0, hit));
            e.0 += 1.0 / (k + rank as f32 + 1.0);
        }
    }
    let mut out: Vec<Hit> = fused
        .into_values()
        .map(|(score, h)| Hit { score, ..h.clone() })
        .collect();
    sort_hits(&mut out);
    out.truncate(limit);
    out
}

/// Sorts hits best first, ties broken by chunk id so results are deterministic.
pub fn sort_hits(hits: &mut [Hit]) {
    hits.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.chunk_id.cmp(&b.chunk_id))
    });
}

/// Merges per-shard top-k lists by score.
pub fn merge_top_k(lists: Vec<Vec<Hit>>, k: usize) -> Vec<Hit> {
    let mut all: Vec<Hit> = lists.into_iter().flatten().collect();
    sort_hits(&mut all);
    all.truncate(k);
    all
}
