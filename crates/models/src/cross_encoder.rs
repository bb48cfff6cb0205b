//! A cross-encoder reranker in the `BertForSequenceClassification` layout: `[CLS] query [SEP]
//! passage [SEP]` with token types 0/1, pooler, one logit.
use std::path::Path;

use burn::prelude::*;
use tokenizers::{EncodeInput, Tokenizer, TruncationStrategy};

use crate::bert::{BertConfig, BertModel};
use crate::embedder::load_tokenizer;
use crate::weights::{Linear, Weights};
use crate::ModelError;

/// Pairs per forward pass.
const SUB_BATCH: usize = 16;

/// A loaded cross-encoder.
#[derive(Debug)]
pub struct CrossEncoder<B: Backend> {
    model: BertModel<B>,
    classifier: Linear<B>,
    tokenizer: Tokenizer,
    device: B::Device,
    lanes: usize,
}

impl<B: Backend> CrossEncoder<B> {
    /// Loads `model.safetensors` (`bert.*` + `classifier.*`), `config.json`, `tokenizer.json`.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        let cfg = BertConfig::load(&dir.join("config.json"))?;
        let mut w = Weights::load(&dir.join("model.safetensors"))?;
        let model = BertModel::load(&cfg, &mut w, "bert.", device)?;
        let classifier = w.linear("classifier", cfg.hidden_size, 1, true, device)?;
        let tokenizer = load_tokenizer(
            &dir.join("tokenizer.json"),
            256,
            TruncationStrategy::OnlySecond,
        )?;
        Ok(CrossEncoder {
            model,
            classifier,
            tokenizer,
            device: device.clone(),
            lanes: 1,
        })
    }

    /// Runs sub-batches on `lanes` host threads at once (see [`crate::lanes`]); 1 by default.
    pub fn with_lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes.max(1);
        self
    }

    /// Token ids and types of a pair, the passage truncated.
    pub fn encode_pair(
        &self,
        query: &str,
        passage: &str,
    ) -> Result<(Vec<u32>, Vec<u32>), ModelError> {
        let input = EncodeInput::Dual(query.into(), passage.into());
        let enc = self
            .tokenizer
            .encode(input, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }

    /// Relevance logits of `passages` for `query`, in order. Call from a dedicated thread.
    pub fn score(&self, query: &str, passages: &[String]) -> Result<Vec<f32>, ModelError> {
        let mut pairs = Vec::with_capacity(passages.len());
        for p in passages {
            pairs.push(self.encode_pair(query, p)?);
        }
        let lengths: Vec<usize> = pairs.iter().map(|p| p.0.len()).collect();
        let out = crate::lanes::by_length(&lengths, SUB_BATCH, self.lanes, |group| {
            let ids: Vec<Vec<u32>> = group.iter().map(|&i| pairs[i].0.clone()).collect();
            let types: Vec<Vec<u32>> = group.iter().map(|&i| pairs[i].1.clone()).collect();
            let hidden = self.model.forward(&ids, &types, &self.device);
            self.classifier
                .forward2(self.model.pool(hidden))
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap_or_default()
        });
        Ok(out)
    }
}
