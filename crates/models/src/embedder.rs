//! The sentence embedder: BERT + mean pooling over the attention mask + L2 normalisation.
use std::path::Path;

use burn::prelude::*;
use ragfleet_proto::ModelIdentity;
use tokenizers::{Tokenizer, TruncationParams, TruncationStrategy};

use crate::bert::{BertConfig, BertModel};
use crate::weights::Weights;
use crate::{sha256_file, ModelError};

/// Name recorded in the model identity.
pub const MINILM_NAME: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// Texts per forward pass (inputs are sorted by length first so padding stays small).
const SUB_BATCH: usize = 32;

/// Loads a tokenizer with padding off and truncation at `max_len`.
pub fn load_tokenizer(
    path: &Path,
    max_len: usize,
    strategy: TruncationStrategy,
) -> Result<Tokenizer, ModelError> {
    let mut t = Tokenizer::from_file(path).map_err(|e| ModelError::format(path, e))?;
    t.with_padding(None);
    t.with_truncation(Some(TruncationParams {
        max_length: max_len,
        strategy,
        ..Default::default()
    }))
    .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok(t)
}

/// A loaded embedder.
#[derive(Debug)]
pub struct Embedder<B: Backend> {
    model: BertModel<B>,
    tokenizer: Tokenizer,
    identity: ModelIdentity,
    device: B::Device,
    lanes: usize,
}

impl<B: Backend> Embedder<B> {
    /// Loads `model.safetensors`, `config.json` and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        let max_len = 256;
        let weights_path = dir.join("model.safetensors");
        let cfg = BertConfig::load(&dir.join("config.json"))?;
        let mut w = Weights::load(&weights_path)?;
        let prefix = if w.has("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let model = BertModel::load(&cfg, &mut w, prefix, device)?;
        let tokenizer = load_tokenizer(
            &dir.join("tokenizer.json"),
            max_len,
            TruncationStrategy::LongestFirst,
        )?;
        let identity = ModelIdentity {
            name: MINILM_NAME.to_string(),
            weights_sha256: sha256_file(&weights_path)?,
            dim: cfg.hidden_size as u32,
            max_len: max_len as u32,
            pooling: "mean".into(),
            normalized: true,
        };
        Ok(Embedder {
            model,
            tokenizer,
            identity,
            device: device.clone(),
            lanes: 1,
        })
    }

    /// Runs sub-batches on `lanes` host threads at once (see [`crate::lanes`]); 1 by default.
    pub fn with_lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes.max(1);
        self
    }

    /// The model identity vectors from this embedder carry.
    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    /// Token ids of `text` with special tokens, truncated.
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token count of `text` without special tokens or truncation (for chunking).
    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| {
                e.get_ids().len()
                    + e.get_overflowing()
                        .iter()
                        .map(|o| o.get_ids().len())
                        .sum::<usize>()
            })
            .unwrap_or_else(|_| text.split_whitespace().count())
    }

    /// Unit embeddings of `texts`, in order. Runs on the calling thread: call it from a
    /// dedicated thread, never from an async runtime worker.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut ids = Vec::with_capacity(texts.len());
        for t in texts {
            ids.push(self.token_ids(t)?);
        }
        let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
        let out = crate::lanes::by_length(&lengths, SUB_BATCH, self.lanes, |group| {
            let batch: Vec<Vec<u32>> = group.iter().map(|&i| ids[i].clone()).collect();
            self.embed_ids(&batch)
        });
        Ok(out)
    }

    /// Embeds already tokenised inputs (one forward pass).
    pub fn embed_ids(&self, batch: &[Vec<u32>]) -> Vec<Vec<f32>> {
        if batch.is_empty() {
            return Vec::new();
        }
        let types: Vec<Vec<u32>> = batch.iter().map(|r| vec![0; r.len()]).collect();
        let hidden = self.model.forward(batch, &types, &self.device);
        let [b, s, h] = hidden.dims();
        let data: Vec<f32> = hidden
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        let mut out = Vec::with_capacity(b);
        for (r, row) in batch.iter().enumerate() {
            let n = row.len().min(s).max(1);
            let mut v = vec![0f32; h];
            for t in 0..n {
                let base = (r * s + t) * h;
                for (j, x) in v.iter_mut().enumerate() {
                    *x += data[base + j];
                }
            }
            // mean pooling then L2 normalisation: the 1/n of the mean cancels out
            let inv = 1.0 / v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            for x in v.iter_mut() {
                *x *= inv;
            }
            out.push(v);
        }
        out
    }
}
