//! The models ragfleet runs, in burn, generic over the backend: a BERT encoder (MiniLM embedder
//! and cross-encoder reranker) and a Llama-architecture generator loaded from GGUF.
//!
//! Library code never picks a backend; the binary does ([`backend`] names the defaults).
#![warn(missing_docs, unreachable_pub)]

pub mod backend;
mod bert;
pub mod cross_encoder;
pub mod embedder;
pub mod fetch;
mod host;
mod kernels;
pub mod lanes;
pub mod llama;
pub mod weights;

pub use bert::{BertConfig, BertModel};
pub use cross_encoder::CrossEncoder;
pub use embedder::Embedder;

/// Errors of the model layer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model file is missing or unreadable.
    #[error("cannot read model file {path}: {reason}")]
    Io {
        /// File.
        path: std::path::PathBuf,
        /// Cause.
        reason: String,
    },
    /// A model file is malformed.
    #[error("malformed model file {path}: {reason}")]
    Format {
        /// File.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor the architecture needs is not in the weights.
    #[error("weights lack tensor {0}")]
    MissingTensor(String),
    /// A tensor has the wrong shape.
    #[error("tensor {name} has shape {got:?}, expected {expected:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Shape found.
        got: Vec<usize>,
        /// Shape expected.
        expected: Vec<usize>,
    },
    /// Tokenizer failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Invalid input.
    #[error("bad input: {0}")]
    BadInput(String),
    /// Fetching models failed.
    #[error("models fetch failed: {0}")]
    Fetch(String),
}

impl ModelError {
    pub(crate) fn io(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
    pub(crate) fn format(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        ModelError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

/// sha256 of a file, lower-case hex.
pub fn sha256_file(path: &std::path::Path) -> Result<String, ModelError> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| ModelError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
