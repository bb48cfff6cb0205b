//! What the runtime needs of models. The binary implements these with burn models on the
//! backend it picks; forward passes run on dedicated threads, never on the async runtime.
use std::sync::Arc;

use ragfleet_proto::{GenerationRequest, ModelIdentity};

/// A sentence embedder.
pub trait EmbedModel: Send + Sync + 'static {
    /// The identity its vectors carry.
    fn identity(&self) -> ModelIdentity;
    /// Unit vectors for `texts` (blocking).
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String>;
    /// Token count without special tokens (for chunking).
    fn count_tokens(&self, text: &str) -> usize;
}

/// A cross-encoder.
pub trait RerankModel: Send + Sync + 'static {
    /// Relevance scores of `passages` for `query` (blocking).
    fn score(&self, query: &str, passages: &[String]) -> Result<Vec<f32>, String>;
    /// When the model's score of a passage is the cosine of its sentence closest to the
    /// query under an embedding model (the sentence reranker), that model's identity: scores
    /// the shards computed from stored sentence vectors of the same model then stand for its
    /// own. `None` (a cross-encoder): it scores every passage itself.
    fn sentence_model(&self) -> Option<ModelIdentity> {
        None
    }
}

/// A piece of generated text.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// Text of one or more tokens.
    Text(String),
    /// End of the stream: `"stop"` or `"length"`.
    Done(&'static str),
    /// Generation failed.
    Error(String),
}

/// A causal language model serving several streams at once (continuous batching).
pub trait GenerateModel: Send + Sync + 'static {
    /// Prompt tokens of a chat message (for context budgets).
    fn count_tokens(&self, text: &str) -> usize;
    /// Runs the decode loop on the calling (dedicated) thread: takes new requests from `rx`
    /// between decode steps and sends each stream's events to its sender. Returns when `rx`
    /// is closed and every stream has ended.
    fn serve(
        &self,
        rx: std::sync::mpsc::Receiver<(
            GenerationRequest,
            tokio::sync::mpsc::UnboundedSender<GenEvent>,
        )>,
        max_streams: usize,
    );
}

/// Loads models on demand (cached: replicas on one node share weights).
pub trait ModelLoader: Send + Sync + 'static {
    /// The embedder.
    fn embedder(&self) -> Result<Arc<dyn EmbedModel>, String>;
    /// The cross-encoder, if the models dir has one.
    fn reranker(&self) -> Result<Arc<dyn RerankModel>, String>;
    /// The generator.
    fn generator(&self) -> Result<Arc<dyn GenerateModel>, String>;
    /// The generator's tokenizer alone (coordinators count context tokens with it).
    fn generator_tokens(&self) -> Result<Arc<dyn TokenCount>, String>;
}

/// Counts tokens with some tokenizer.
pub trait TokenCount: Send + Sync + 'static {
    /// Tokens of `text` (no special tokens).
    fn count(&self, text: &str) -> usize;
}
