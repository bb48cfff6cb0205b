//! The index a shard replica holds: sealed HNSW segments plus one growing segment searched
//! exactly, a BM25 inverted index over the same chunks, a write-ahead log and snapshots.
//!
//! Knows nothing about actors; the shard actor wraps [`ShardIndex`].
#![warn(missing_docs, unreachable_pub)]

pub mod allocator;
pub mod ann;
mod bm25;
pub mod chunk;
mod codes;
mod datafile;
pub mod eval;
mod files;
pub mod fvecs;
pub mod hnsw;
mod lock;
mod postings;
pub mod priority;
pub mod ranking;
mod segment;
mod shard;
pub mod vector;
mod wal;
pub use wal::fsyncs as wal_fsyncs;

pub use bm25::Bm25;
pub use files::{read_checked, write_checked};
pub use lock::DirLock;
pub use ranking::{merge_top_k, rrf, sort_hits};
pub use segment::AnnKind;
pub use shard::{
    IndexSettings, MergeCommits, PreparedSeal, PullPlan, RecoveryReport, Room, ShardIndex,
    SharedShard, ToFree, DEFAULT_MAX_MERGES, IDLE_SEAL_MIN_CHUNKS,
};
pub use wal::{Wal, WalRecovery};

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
    /// The same error again, for each write of a group that failed together (`io::Error` is
    /// not `Clone`): an I/O error keeps its path, kind and message; kinds a log append cannot
    /// produce come back as bad input with their message.
    pub fn duplicate(&self) -> IndexError {
        match self {
            IndexError::Io { path, source } => IndexError::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            IndexError::Corrupt { path, reason } => IndexError::Corrupt {
                path: path.clone(),
                reason: reason.clone(),
            },
            IndexError::ModelMismatch { index, request } => IndexError::ModelMismatch {
                index: index.clone(),
                request: request.clone(),
            },
            other => IndexError::BadInput(other.to_string()),
        }
    }
}

impl IndexError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        IndexError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
