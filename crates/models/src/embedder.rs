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

/// The input shapes forward passes are padded to, so that a backend that compiles kernels per
/// input shape (burn's CUDA backend compiles and tunes each new shape on first use, hundreds of
/// milliseconds) meets only shapes [`Embedder::warm_up`] ran before the first request. A
/// forward pass's sequence length goes up to the nearest of `lengths` and its row count to the
/// nearest of `rows` (filler rows, dropped from the result); the largest of `rows` is also the
/// most texts one forward pass takes. The CPU backends compile nothing and run unpadded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shapes {
    /// Sequence lengths (tokens), ascending.
    pub lengths: Vec<usize>,
    /// Rows per forward pass, ascending.
    pub rows: Vec<usize>,
}

impl Shapes {
    /// Lengths 16, 32, 64, 128 and `max_len`; rows 1, 2, 4, ... up to `max_rows`.
    pub fn powers_of_two(max_len: usize, max_rows: usize) -> Self {
        let mut lengths: Vec<usize> = [16, 32, 64, 128]
            .into_iter()
            .filter(|&l| l < max_len)
            .collect();
        lengths.push(max_len.max(1));
        let mut rows = vec![1];
        while rows[rows.len() - 1] < max_rows {
            rows.push((rows[rows.len() - 1] * 2).min(max_rows));
        }
        Shapes { lengths, rows }
    }

    fn up(buckets: &[usize], n: usize) -> usize {
        buckets.iter().copied().find(|&b| b >= n).unwrap_or(n)
    }
}

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
    shapes: Option<Shapes>,
    /// (rows, sequence length) of every forward pass run so far.
    seen: std::sync::Mutex<std::collections::BTreeSet<(usize, usize)>>,
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
            shapes: None,
            seen: Default::default(),
        })
    }

    /// Runs sub-batches on `lanes` host threads at once (see [`crate::lanes`]); 1 by default.
    pub fn with_lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes.max(1);
        self
    }

    /// Pads forward passes to `shapes` (see [`Shapes`]); unpadded by default.
    pub fn with_shapes(mut self, shapes: Shapes) -> Self {
        self.shapes = Some(shapes);
        self
    }

    /// Runs one forward pass of every shape of [`Shapes`] (none without them); returns how
    /// many. For a backend that compiles kernels per shape: call it before serving.
    pub fn warm_up(&self) -> usize {
        let Some(shapes) = &self.shapes else {
            return 0;
        };
        // [CLS] ordinary words [SEP]: the path a real input takes through the model
        let id = |t: &str, or: u32| self.tokenizer.token_to_id(t).unwrap_or(or);
        let (cls, word, sep) = (id("[CLS]", 101), id("the", 1996), id("[SEP]", 102));
        let mut n = 0;
        for &rows in &shapes.rows {
            for &len in &shapes.lengths {
                let len = len.max(2);
                let mut row = vec![word; len];
                (row[0], row[len - 1]) = (cls, sep);
                self.embed_ids(&vec![row; rows]);
                n += 1;
            }
        }
        n
    }

    /// The (rows, sequence length) shapes of the forward passes run so far.
    pub fn forward_shapes(&self) -> Vec<(usize, usize)> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
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
        let per_pass = self
            .shapes
            .as_ref()
            .and_then(|s| s.rows.last().copied())
            .unwrap_or(SUB_BATCH);
        let out = crate::lanes::by_length(&lengths, per_pass, self.lanes, |group| {
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
        let longest = batch.iter().map(Vec::len).max().unwrap_or(1);
        let (rows, seq) = match &self.shapes {
            Some(s) => (
                Shapes::up(&s.rows, batch.len()),
                Shapes::up(&s.lengths, longest),
            ),
            None => (batch.len(), longest),
        };
        let mut padded;
        let inputs = if rows > batch.len() {
            // filler rows of one token; their outputs are dropped
            padded = batch.to_vec();
            padded.resize(rows, vec![0]);
            &padded[..]
        } else {
            batch
        };
        let types: Vec<Vec<u32>> = inputs.iter().map(|r| vec![0; r.len()]).collect();
        let hidden = self.model.forward_to(inputs, &types, seq, &self.device);
        let [_, s, h] = hidden.dims();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.insert((inputs.len(), s)) && self.shapes.is_some() {
                tracing::debug!(
                    rows = inputs.len(),
                    seq = s,
                    "a forward pass of a new shape"
                );
            }
        }
        let data: Vec<f32> = hidden
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        let mut out = Vec::with_capacity(batch.len());
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
