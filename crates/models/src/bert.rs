//! A BERT encoder (the architecture of all-MiniLM-L6-v2 and of MS MARCO cross-encoders).
use std::path::Path;

use burn::prelude::*;
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Int, TensorData};
use serde::Deserialize;

use crate::weights::{LayerNorm, Linear, Weights};
use crate::ModelError;

/// The fields of a Hugging Face `config.json` that a BERT needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Hidden size.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward size.
    pub intermediate_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Position embeddings.
    pub max_position_embeddings: usize,
    /// Token types.
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Activation (`gelu` only).
    #[serde(default = "gelu_name")]
    pub hidden_act: String,
}

fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}
fn gelu_name() -> String {
    "gelu".into()
}

impl BertConfig {
    /// Reads `config.json`.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let cfg: BertConfig =
            serde_json::from_str(&text).map_err(|e| ModelError::format(path, e))?;
        if cfg.hidden_act != "gelu" {
            return Err(ModelError::format(
                path,
                format!("activation {} not supported", cfg.hidden_act),
            ));
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(ModelError::format(
                path,
                "hidden_size must be a multiple of num_attention_heads",
            ));
        }
        Ok(cfg)
    }
}

#[derive(Debug, Clone)]
struct Layer<B: Backend> {
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    attn_out: Linear<B>,
    ln1: LayerNorm<B>,
    inter: Linear<B>,
    out: Linear<B>,
    ln2: LayerNorm<B>,
}

/// BERT encoder weights on a device.
#[derive(Debug, Clone)]
pub struct BertModel<B: Backend> {
    cfg: BertConfig,
    word: Tensor<B, 2>,
    pos: Tensor<B, 2>,
    types: Tensor<B, 2>,
    ln: LayerNorm<B>,
    layers: Vec<Layer<B>>,
    pooler: Option<Linear<B>>,
}

impl<B: Backend> BertModel<B> {
    /// Loads the encoder from `weights`, tensor names under `prefix` (`""` or `"bert."`).
    pub fn load(
        cfg: &BertConfig,
        w: &mut Weights,
        prefix: &str,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let p = |s: &str| format!("{prefix}{s}");
        let word = w.take(
            &p("embeddings.word_embeddings.weight"),
            [cfg.vocab_size, h],
            device,
        )?;
        let pos = w.take(
            &p("embeddings.position_embeddings.weight"),
            [cfg.max_position_embeddings, h],
            device,
        )?;
        let types = w.take(
            &p("embeddings.token_type_embeddings.weight"),
            [cfg.type_vocab_size, h],
            device,
        )?;
        let ln = LayerNorm::load(w, &p("embeddings.LayerNorm"), h, cfg.layer_norm_eps, device)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = |s: &str| p(&format!("encoder.layer.{i}.{s}"));
            // the attention scale 1/sqrt(head_dim) is folded into the query projection, so the
            // [batch, heads, seq, seq] scores are not scaled again in every layer
            let mut q = w.linear(&l("attention.self.query"), h, h, true, device)?;
            q.scale(1.0 / ((h / cfg.num_attention_heads) as f64).sqrt());
            layers.push(Layer {
                q,
                k: w.linear(&l("attention.self.key"), h, h, true, device)?,
                v: w.linear(&l("attention.self.value"), h, h, true, device)?,
                attn_out: w.linear(&l("attention.output.dense"), h, h, true, device)?,
                ln1: LayerNorm::load(
                    w,
                    &l("attention.output.LayerNorm"),
                    h,
                    cfg.layer_norm_eps,
                    device,
                )?,
                inter: w.linear(
                    &l("intermediate.dense"),
                    h,
                    cfg.intermediate_size,
                    true,
                    device,
                )?,
                out: w.linear(&l("output.dense"), cfg.intermediate_size, h, true, device)?,
                ln2: LayerNorm::load(w, &l("output.LayerNorm"), h, cfg.layer_norm_eps, device)?,
            });
        }
        let pooler = if w.has(&p("pooler.dense.weight")) {
            Some(w.linear(&p("pooler.dense"), h, h, true, device)?)
        } else {
            None
        };
        Ok(BertModel {
            cfg: cfg.clone(),
            word,
            pos,
            types,
            ln,
            layers,
            pooler,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// Hidden states [batch, seq, hidden] of token ids and token types (rows of any lengths,
    /// padded to the longest; a padded position's state is unspecified).
    pub fn forward(
        &self,
        ids: &[Vec<u32>],
        type_ids: &[Vec<u32>],
        device: &B::Device,
    ) -> Tensor<B, 3> {
        self.forward_to(ids, type_ids, 0, device)
    }

    /// [`forward`](Self::forward) padded to at least `seq` positions.
    pub fn forward_to(
        &self,
        ids: &[Vec<u32>],
        type_ids: &[Vec<u32>],
        seq: usize,
        device: &B::Device,
    ) -> Tensor<B, 3> {
        let b = ids.len();
        let s = ids
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0)
            .max(seq)
            .clamp(1, self.cfg.max_position_embeddings);
        let h = self.cfg.hidden_size;
        let nh = self.cfg.num_attention_heads;
        let hd = h / nh;
        let mut flat_ids = vec![0i32; b * s];
        let mut flat_types = vec![0i32; b * s];
        for (r, row) in ids.iter().enumerate() {
            for (c, &t) in row.iter().take(s).enumerate() {
                flat_ids[r * s + c] = (t as usize).min(self.cfg.vocab_size - 1) as i32;
                flat_types[r * s + c] = type_ids
                    .get(r)
                    .and_then(|t| t.get(c))
                    .copied()
                    .unwrap_or(0)
                    .min(self.cfg.type_vocab_size as u32 - 1)
                    as i32;
            }
        }
        let idt = Tensor::<B, 1, Int>::from_data(TensorData::new(flat_ids, [b * s]), device);
        let tyt = Tensor::<B, 1, Int>::from_data(TensorData::new(flat_types, [b * s]), device);
        // the flex backend runs the attention core in the crate's kernels, over each row's real
        // tokens (see `kernels`); other backends take burn's operations
        let cpu = crate::host::is_flex::<B>();
        // for those, the additive padding mask, built once at the full score shape: adding a
        // broadcast [b, 1, 1, s] mask costs ~15x a same-shape add on burn's CPU backends, in
        // every layer; a batch without padding needs none
        let add_mask = (!cpu && ids.iter().any(|r| r.len() < s)).then(|| {
            let mut mask = vec![0f32; b * s];
            for (r, row) in ids.iter().enumerate() {
                mask[r * s + row.len().min(s)..(r + 1) * s].fill(-1e9);
            }
            Tensor::<B, 1>::from_data(TensorData::new(mask, [b * s]), device)
                .reshape([b, 1, 1, s])
                .repeat_dim(1, nh)
                .repeat_dim(2, s)
        });
        let lengths: Vec<usize> = ids.iter().map(|r| r.len().clamp(1, s)).collect();
        let words = self.word.clone().select(0, idt).reshape([b, s, h]);
        let types = self.types.clone().select(0, tyt).reshape([b, s, h]);
        let pos = self.pos.clone().slice([0..s]).reshape([1, s, h]);
        let mut x = self.ln.forward(words + types + pos);
        for l in &self.layers {
            let (q, k, v) = (
                l.q.forward3(x.clone()),
                l.k.forward3(x.clone()),
                l.v.forward3(x.clone()),
            );
            let ctx = if cpu {
                crate::kernels::attention(q, k, v, &lengths, nh)
            } else {
                let heads = |t: Tensor<B, 3>| t.reshape([b, s, nh, hd]).swap_dims(1, 2);
                let mut scores = heads(q).matmul(heads(k).swap_dims(2, 3));
                if let Some(m) = &add_mask {
                    scores = scores + m.clone();
                }
                softmax(scores, 3)
                    .matmul(heads(v))
                    .swap_dims(1, 2)
                    .reshape([b, s, h])
            };
            x = l.ln1.forward(l.attn_out.forward3(ctx) + x);
            let inter = l.inter.forward3(x.clone());
            let inter = if cpu {
                crate::kernels::gelu(inter)
            } else {
                gelu(inter)
            };
            x = l.ln2.forward(l.out.forward3(inter) + x);
        }
        x
    }

    /// The pooler (dense + tanh on the first token), when the checkpoint has one.
    pub fn pool(&self, hidden: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, _, h] = hidden.dims();
        let cls = hidden.slice([0..b, 0..1, 0..h]).reshape([b, h]);
        match &self.pooler {
            Some(p) => p.forward2(cls).tanh(),
            None => cls,
        }
    }
}
