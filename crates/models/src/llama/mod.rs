//! A Llama-architecture causal LM (SmolLM2 and friends): GGUF or safetensors weights,
//! grouped-query attention, RoPE, RMSNorm, a KV cache, greedy and seeded temperature/top-p
//! sampling, streamed tokens, and continuous batching of several streams.
mod bpe;
mod generator;
pub mod gguf;
mod sampling;

pub use bpe::{pre_tokenize, BpeTokenizer, DEFAULT_SYSTEM};
pub use generator::{Generator, Sink, StreamEvent};
pub use sampling::{ends_sentence, sample, Penalties};

use std::collections::HashMap;

use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Int, TensorData};

use crate::weights::{Linear, Weights};
use crate::ModelError;
use gguf::Gguf;

/// Llama hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Feed-forward size.
    pub ffn: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// Context length.
    pub context: usize,
}

struct Block<B: Backend> {
    attn_norm: Tensor<B, 2>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    o: Linear<B>,
    ffn_norm: Tensor<B, 2>,
    gate: Linear<B>,
    up: Linear<B>,
    down: Linear<B>,
}

/// The model's weights on a device.
pub struct Llama<B: Backend> {
    /// Hyper-parameters.
    pub cfg: LlamaConfig,
    embed: Tensor<B, 2>,
    blocks: Vec<Block<B>>,
    norm: Tensor<B, 2>,
    lm_head: Linear<B>,
}

/// One stream's key/value cache: per layer, [1, kv_heads, t, head_dim].
pub struct KvCache<B: Backend> {
    k: Vec<Option<Tensor<B, 4>>>,
    v: Vec<Option<Tensor<B, 4>>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        KvCache {
            k: vec![None; layers],
            v: vec![None; layers],
            len: 0,
        }
    }
    /// Cached positions.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Undoes llama.cpp's interleaved-RoPE row permutation of q/k weights ([rows, cols]).
fn unpermute(rows: usize, cols: usize, heads: usize, w: &[f32]) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * hd + i * 2 + j;
                let dst = h * hd + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

impl<B: Backend> Llama<B> {
    /// Loads from parsed GGUF (dequantising to f32).
    pub fn from_gguf(g: &Gguf, device: &B::Device) -> Result<Self, ModelError> {
        let cfg = Self::gguf_config(g)?;
        let map = hf_tensors(g, &cfg)?;
        let mut w = Weights::from_map(g.path(), map);
        Self::from_weights(cfg, &mut w, device)
    }

    /// The hyper-parameters in GGUF metadata.
    pub fn gguf_config(g: &Gguf) -> Result<LlamaConfig, ModelError> {
        let arch = g
            .get("general.architecture")
            .and_then(gguf::Value::as_str)
            .unwrap_or("");
        if arch != "llama" {
            return Err(ModelError::format(
                g.path(),
                format!("architecture {arch:?} is not llama"),
            ));
        }
        let hidden = g.req_u64("llama.embedding_length")? as usize;
        let heads = g.req_u64("llama.attention.head_count")? as usize;
        let cfg = LlamaConfig {
            layers: g.req_u64("llama.block_count")? as usize,
            hidden,
            heads,
            kv_heads: g
                .get("llama.attention.head_count_kv")
                .and_then(gguf::Value::as_u64)
                .unwrap_or(heads as u64) as usize,
            ffn: g.req_u64("llama.feed_forward_length")? as usize,
            vocab: g
                .tensors
                .get("token_embd.weight")
                .map(|t| t.shape[0])
                .unwrap_or(0),
            rope_theta: g
                .get("llama.rope.freq_base")
                .and_then(gguf::Value::as_f64)
                .unwrap_or(10000.0),
            eps: g
                .get("llama.attention.layer_norm_rms_epsilon")
                .and_then(gguf::Value::as_f64)
                .unwrap_or(1e-5),
            context: g
                .get("llama.context_length")
                .and_then(gguf::Value::as_u64)
                .unwrap_or(2048) as usize,
        };
        if heads == 0
            || !hidden.is_multiple_of(heads)
            || cfg.kv_heads == 0
            || !heads.is_multiple_of(cfg.kv_heads)
        {
            return Err(ModelError::format(g.path(), "inconsistent head counts"));
        }
        Ok(cfg)
    }

    /// Loads from Hugging Face-named weights (`model.layers.N...`).
    pub fn from_weights(
        cfg: LlamaConfig,
        w: &mut Weights,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let (h, hd) = (cfg.hidden, cfg.hidden / cfg.heads);
        let embed: Tensor<B, 2> = w.take("model.embed_tokens.weight", [cfg.vocab, h], device)?;
        let lm_head = Linear {
            weight_t: if w.has("lm_head.weight") {
                w.take::<B, 2>("lm_head.weight", [cfg.vocab, h], device)?
                    .transpose()
            } else {
                embed.clone().transpose()
            },
            bias: None,
        };
        let norm = w
            .take::<B, 1>("model.norm.weight", [h], device)?
            .reshape([1, h]);
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            blocks.push(Block {
                attn_norm: w
                    .take::<B, 1>(&p("input_layernorm.weight"), [h], device)?
                    .reshape([1, h]),
                q: w.linear(&p("self_attn.q_proj"), h, cfg.heads * hd, false, device)?,
                k: w.linear(&p("self_attn.k_proj"), h, cfg.kv_heads * hd, false, device)?,
                v: w.linear(&p("self_attn.v_proj"), h, cfg.kv_heads * hd, false, device)?,
                o: w.linear(&p("self_attn.o_proj"), cfg.heads * hd, h, false, device)?,
                ffn_norm: w
                    .take::<B, 1>(&p("post_attention_layernorm.weight"), [h], device)?
                    .reshape([1, h]),
                gate: w.linear(&p("mlp.gate_proj"), h, cfg.ffn, false, device)?,
                up: w.linear(&p("mlp.up_proj"), h, cfg.ffn, false, device)?,
                down: w.linear(&p("mlp.down_proj"), cfg.ffn, h, false, device)?,
            });
        }
        Ok(Llama {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
        })
    }

    fn rms(&self, x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
        let ms = x.clone().powf_scalar(2.0).mean_dim(1);
        x / (ms + self.cfg.eps).sqrt() * w.clone()
    }

    /// cos and sin tables ([1, 1, s, head_dim]) for positions `start..start + s`.
    fn rope_tables(
        &self,
        start: usize,
        s: usize,
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let hd = self.cfg.hidden / self.cfg.heads;
        let half = hd / 2;
        let mut cos = vec![0f32; s * hd];
        let mut sin = vec![0f32; s * hd];
        for i in 0..half {
            let freq = self.cfg.rope_theta.powf(-(2.0 * i as f64) / hd as f64);
            for p in 0..s {
                let (sn, cs) = ((start + p) as f64 * freq).sin_cos();
                cos[p * hd + i] = cs as f32;
                cos[p * hd + i + half] = cs as f32;
                sin[p * hd + i] = sn as f32;
                sin[p * hd + i + half] = sn as f32;
            }
        }
        let t = |v: Vec<f32>| {
            Tensor::<B, 2>::from_data(TensorData::new(v, [s, hd]), device).reshape([1, 1, s, hd])
        };
        (t(cos), t(sin))
    }

    /// Rotate-half RoPE with precomputed tables.
    fn rope(x: Tensor<B, 4>, (cos, sin): &(Tensor<B, 4>, Tensor<B, 4>)) -> Tensor<B, 4> {
        let [b, nh, s, hd] = x.dims();
        let half = hd / 2;
        let x1 = x.clone().slice([0..b, 0..nh, 0..s, 0..half]);
        let x2 = x.clone().slice([0..b, 0..nh, 0..s, half..hd]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.clone() + rotated * sin.clone()
    }

    /// Runs `tokens[i]` (one new token each, or a whole prompt when there is one stream) for
    /// every stream; appends to the caches; returns the last position's logits per stream.
    pub fn forward(
        &self,
        tokens: &[Vec<u32>],
        caches: &mut [&mut KvCache<B>],
        device: &B::Device,
    ) -> Vec<Vec<f32>> {
        let cfg = &self.cfg;
        let hd = cfg.hidden / cfg.heads;
        let lens: Vec<usize> = tokens.iter().map(Vec::len).collect();
        let total: usize = lens.iter().sum();
        let flat: Vec<i32> = tokens
            .iter()
            .flatten()
            .map(|&t| (t as usize).min(cfg.vocab - 1) as i32)
            .collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [total]), device);
        let mut x = self.embed.clone().select(0, ids); // [total, h]
        let group = cfg.heads / cfg.kv_heads;
        // position tables of each stream, shared by every layer
        let tables: Vec<_> = caches
            .iter()
            .zip(&lens)
            .map(|(c, &s)| self.rope_tables(c.len, s, device))
            .collect();
        // causal masks of prefilling streams (true = hidden), built once and shared by every
        // layer and kv head
        let masks: Vec<Option<Tensor<B, 4, Bool>>> = caches
            .iter()
            .zip(&lens)
            .map(|(c, &s)| {
                (s > 1).then(|| {
                    let (start, t, rows) = (c.len, c.len + s, group * s);
                    let mut m = vec![false; rows * t];
                    for r in 0..rows {
                        m[r * t + start + r % s + 1..(r + 1) * t].fill(true);
                    }
                    Tensor::<B, 2, Bool>::from_data(TensorData::new(m, [rows, t]), device)
                        .reshape([1, 1, rows, t])
                })
            })
            .collect();
        let attn_opts = AttentionModuleOptions {
            scale: Some(1.0 / (hd as f64).sqrt()),
            softcap: None,
            is_causal: false,
        };
        for (l, blk) in self.blocks.iter().enumerate() {
            let hn = self.rms(x.clone(), &blk.attn_norm);
            let q = blk.q.forward2(hn.clone());
            let k = blk.k.forward2(hn.clone());
            let v = blk.v.forward2(hn);
            let mut outs = Vec::with_capacity(tokens.len());
            let mut off = 0;
            for (si, cache) in caches.iter_mut().enumerate() {
                let s = lens[si];
                let qs = q
                    .clone()
                    .slice([off..off + s, 0..cfg.heads * hd])
                    .reshape([1, s, cfg.heads, hd])
                    .swap_dims(1, 2);
                let ks = k
                    .clone()
                    .slice([off..off + s, 0..cfg.kv_heads * hd])
                    .reshape([1, s, cfg.kv_heads, hd])
                    .swap_dims(1, 2);
                let vs = v
                    .clone()
                    .slice([off..off + s, 0..cfg.kv_heads * hd])
                    .reshape([1, s, cfg.kv_heads, hd])
                    .swap_dims(1, 2);
                let qs = Self::rope(qs, &tables[si]);
                let ks = Self::rope(ks, &tables[si]);
                let kc = match cache.k[l].take() {
                    Some(prev) => Tensor::cat(vec![prev, ks], 2),
                    None => ks,
                };
                let vc = match cache.v[l].take() {
                    Some(prev) => Tensor::cat(vec![prev, vs], 2),
                    None => vs,
                };
                cache.k[l] = Some(kc.clone());
                cache.v[l] = Some(vc.clone());
                // query heads grouped by the key/value head they share (q head = kv * group + g):
                // attention runs per kv head on [group * s] query rows, with no copy of the cache
                let qg = qs.reshape([1, cfg.kv_heads, group * s, hd]);
                // burn's fused attention: 1.8x the separate matmul/softmax/matmul on a
                // 527-token prefill (flex)
                let ctx = attention(qg, kc, vc, masks[si].clone(), None, attn_opts)
                    .reshape([1, cfg.heads, s, hd])
                    .swap_dims(1, 2)
                    .reshape([s, cfg.heads * hd]);
                outs.push(ctx);
                off += s;
            }
            let attn = if outs.len() == 1 {
                outs.pop().expect("one")
            } else {
                Tensor::cat(outs, 0)
            };
            x = x + blk.o.forward2(attn);
            let hn = self.rms(x.clone(), &blk.ffn_norm);
            let ff = silu(blk.gate.forward2(hn.clone())) * blk.up.forward2(hn);
            x = x + blk.down.forward2(ff);
        }
        for (si, c) in caches.iter_mut().enumerate() {
            c.len += lens[si];
        }
        // logits of each stream's last position only
        let mut last = Vec::with_capacity(lens.len());
        let mut off = 0;
        for &s in &lens {
            last.push((off + s - 1) as i32);
            off += s;
        }
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(last, [lens.len()]), device);
        let xl = self.rms(x.select(0, idx), &self.norm);
        let logits = self.lm_head.forward2(xl);
        let data: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        data.chunks(cfg.vocab).map(<[f32]>::to_vec).collect()
    }
}

/// Tensors by name: each one's shape and its values in f32, row-major.
pub type NamedTensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Every tensor of a GGUF Llama, dequantised to f32, under its Hugging Face name, with q/k rows
/// back in the rotate-half layout.
pub fn hf_tensors(g: &Gguf, cfg: &LlamaConfig) -> Result<NamedTensors, ModelError> {
    let mut map = HashMap::new();
    for name in g.tensors.keys() {
        let (shape, mut data) = g.dequantize(name)?;
        if name.ends_with("attn_q.weight") {
            data = unpermute(shape[0], shape[1], cfg.heads, &data);
        } else if name.ends_with("attn_k.weight") {
            data = unpermute(shape[0], shape[1], cfg.kv_heads, &data);
        }
        map.insert(gguf_to_hf(name), (shape, data));
    }
    Ok(map)
}

fn gguf_to_hf(name: &str) -> String {
    let map = [
        ("attn_norm.weight", "input_layernorm.weight"),
        ("attn_q.weight", "self_attn.q_proj.weight"),
        ("attn_k.weight", "self_attn.k_proj.weight"),
        ("attn_v.weight", "self_attn.v_proj.weight"),
        ("attn_output.weight", "self_attn.o_proj.weight"),
        ("ffn_norm.weight", "post_attention_layernorm.weight"),
        ("ffn_gate.weight", "mlp.gate_proj.weight"),
        ("ffn_up.weight", "mlp.up_proj.weight"),
        ("ffn_down.weight", "mlp.down_proj.weight"),
    ];
    match name {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("blk.") {
        if let Some((n, t)) = rest.split_once('.') {
            for (g, h) in map {
                if t == g {
                    return format!("model.layers.{n}.{h}");
                }
            }
        }
    }
    name.to_string()
}

/// A chat generation request (the wire's own type: one shape from the client to the model).
pub use ragfleet_proto::GenerationRequest;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: rows (heads, 2, hd/2) -> (heads, hd/2, 2)
        let (heads, hd, cols) = (2, 4, 1);
        let hf: Vec<f32> = (0..(heads * hd) as i32).map(|x| x as f32).collect();
        let mut permuted = vec![0f32; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    permuted[h * hd + i * 2 + j] = hf[h * hd + j * (hd / 2) + i];
                }
            }
        }
        assert_eq!(unpermute(heads * hd, cols, heads, &permuted), hf);
    }
}
