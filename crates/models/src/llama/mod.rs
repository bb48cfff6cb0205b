//! A Llama-architecture causal LM (SmolLM2 and friends): GGUF or safetensors weights,
//! grouped-query attention, RoPE, RMSNorm, a KV cache, greedy and seeded temperature/top-p
//! sampling, streamed tokens, and continuous batching of several streams.
mod bpe;
pub mod gguf;

pub use bpe::{pre_tokenize, BpeTokenizer, DEFAULT_SYSTEM};

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::{Receiver, TryRecvError};

use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Int, TensorData};
use rand::{Rng, SeedableRng};

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

/// Every tensor of a GGUF Llama, dequantised to f32, under its Hugging Face name, with q/k rows
/// back in the rotate-half layout.
pub fn hf_tensors(
    g: &Gguf,
    cfg: &LlamaConfig,
) -> Result<HashMap<String, (Vec<usize>, Vec<f32>)>, ModelError> {
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

/// An event of a token stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// Newly decoded text.
    Text(String),
    /// End: `"stop"` (end of sequence, or a sentence end near the budget) or `"length"` (the
    /// budget ran out).
    Done(&'static str),
    /// Failure.
    Error(String),
}

/// Picks the next token: argmax when `temperature <= 0`, else top-p sampling.
pub fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut rand::rngs::StdRng) -> u32 {
    if temperature <= 0.0 {
        return logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap_or(0);
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / temperature).exp()))
        .collect();
    let sum: f32 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = Vec::new();
    let mut acc = 0.0;
    for (i, p) in probs {
        let p = p / sum;
        kept.push((i, p));
        acc += p;
        if acc >= top_p.clamp(0.01, 1.0) {
            break;
        }
    }
    let total: f32 = kept.iter().map(|p| p.1).sum();
    let mut r = rng.gen::<f32>() * total;
    for (i, p) in &kept {
        r -= p;
        if r <= 0.0 {
            return *i;
        }
    }
    kept.last().map(|p| p.0).unwrap_or(0)
}

/// Penalties on repeating what a stream already generated, applied to its logits before
/// sampling. They read the stream's own tokens only: batching never changes another stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Penalties {
    /// CTRL-style repetition penalty (1: off).
    pub repetition: f32,
    /// Subtracted per earlier occurrence.
    pub frequency: f32,
    /// Subtracted once for any earlier occurrence.
    pub presence: f32,
    /// Size of n-grams that may not repeat (0: off).
    pub no_repeat_ngram: usize,
}

impl Penalties {
    /// From a request's sampling settings (unset: off).
    pub fn of(s: &ragfleet_proto::Sampling) -> Self {
        Penalties {
            repetition: s.repetition_penalty.unwrap_or(1.0),
            frequency: s.frequency_penalty.unwrap_or(0.0),
            presence: s.presence_penalty.unwrap_or(0.0),
            no_repeat_ngram: s.no_repeat_ngram.unwrap_or(0) as usize,
        }
    }

    fn off(&self) -> bool {
        self.repetition == 1.0
            && self.frequency == 0.0
            && self.presence == 0.0
            && self.no_repeat_ngram == 0
    }

    /// Applies the penalties for `history` (the tokens generated so far) to `logits`.
    pub fn apply(&self, logits: &mut [f32], history: &[u32]) {
        if self.off() || history.is_empty() {
            return;
        }
        let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        for &t in history {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &n) in &counts {
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            if self.repetition != 1.0 && self.repetition > 0.0 {
                *l = if *l > 0.0 {
                    *l / self.repetition
                } else {
                    *l * self.repetition
                };
            }
            *l -= self.frequency * n as f32 + self.presence;
        }
        let n = self.no_repeat_ngram;
        if n > 0 && history.len() >= n {
            // the last n-1 tokens: any token that followed them before would repeat an n-gram
            let tail = &history[history.len() - (n - 1)..];
            for w in history.windows(n) {
                if &w[..n - 1] == tail {
                    if let Some(l) = logits.get_mut(w[n - 1] as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

/// Whether decoded text ends a sentence (punctuation, maybe closed by a quote or bracket).
pub fn ends_sentence(text: &str) -> bool {
    let t = text.trim_end();
    let t = t.trim_end_matches(['"', '\'', ')', ']', '*', '`']);
    t.ends_with(['.', '!', '?'])
}

/// A sink for stream events; returning false cancels the stream.
pub type Sink = Box<dyn FnMut(StreamEvent) -> bool + Send>;

struct Active<B: Backend> {
    cache: KvCache<B>,
    next: u32,
    produced: usize,
    max: usize,
    temperature: f32,
    top_p: f32,
    rng: rand::rngs::StdRng,
    pending: Vec<u8>,
    sink: Sink,
    penalties: Penalties,
    /// Tokens generated so far (what the penalties read).
    history: Vec<u32>,
    /// The text emitted so far ends a sentence.
    at_sentence_end: bool,
}

impl<B: Backend> Active<B> {
    /// Samples the next token from `logits` with the stream's penalties and settings.
    fn pick(&mut self, logits: &mut [f32]) -> u32 {
        self.penalties.apply(logits, &self.history);
        sample(logits, self.temperature, self.top_p, &mut self.rng)
    }
}

/// Once this share of the budget is spent, a stream ends at the next sentence end.
const WIND_DOWN: f32 = 0.75;

/// Tokens a stream may run past its budget to finish a sentence (then it ends at the next word
/// boundary, never mid-word).
fn grace(max: usize) -> usize {
    (max / 4).clamp(8, 48)
}

/// A loaded generator: model + tokenizer.
pub struct Generator<B: Backend> {
    model: Llama<B>,
    tokenizer: BpeTokenizer,
    device: B::Device,
}

impl<B: Backend> Generator<B> {
    /// Loads a GGUF file.
    pub fn load_gguf(path: &Path, device: &B::Device) -> Result<Self, ModelError> {
        let g = Gguf::open(path)?;
        let tokenizer = BpeTokenizer::from_parsed(&g)?;
        let model = Llama::from_gguf(&g, device)?;
        Ok(Generator {
            model,
            tokenizer,
            device: device.clone(),
        })
    }

    /// Loads a Hugging Face Llama checkpoint folder: `config.json`, `model.safetensors`
    /// (`model.layers.N...`, q/k in the rotate-half layout) and a byte-level BPE `tokenizer.json`.
    pub fn load_safetensors(dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let c: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::format(&cfg_path, e))?;
        let get = |k: &str| {
            c[k].as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::format(&cfg_path, format!("{k} missing")))
        };
        let heads = get("num_attention_heads")?;
        let cfg = LlamaConfig {
            layers: get("num_hidden_layers")?,
            hidden: get("hidden_size")?,
            heads,
            kv_heads: c["num_key_value_heads"]
                .as_u64()
                .map(|v| v as usize)
                .unwrap_or(heads),
            ffn: get("intermediate_size")?,
            vocab: get("vocab_size")?,
            rope_theta: c["rope_theta"].as_f64().unwrap_or(10000.0),
            eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-5),
            context: c["max_position_embeddings"].as_u64().unwrap_or(2048) as usize,
        };
        if !cfg.hidden.is_multiple_of(cfg.heads)
            || cfg.kv_heads == 0
            || !cfg.heads.is_multiple_of(cfg.kv_heads)
        {
            return Err(ModelError::format(&cfg_path, "inconsistent head counts"));
        }
        let mut w = Weights::load(&dir.join("model.safetensors"))?;
        let model = Llama::from_weights(cfg, &mut w, device)?;
        let tokenizer = BpeTokenizer::from_hf_json(&dir.join("tokenizer.json"))?;
        Ok(Generator {
            model,
            tokenizer,
            device: device.clone(),
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &BpeTokenizer {
        &self.tokenizer
    }

    /// The model.
    pub fn model(&self) -> &Llama<B> {
        &self.model
    }

    /// Logits after a prompt (one forward pass).
    pub fn prompt_logits(&self, ids: &[u32]) -> Vec<f32> {
        let mut cache = KvCache::new(self.model.cfg.layers);
        self.model
            .forward(&[ids.to_vec()], &mut [&mut cache], &self.device)
            .pop()
            .unwrap_or_default()
    }

    /// Greedy or sampled ids after a prompt (EOS included when reached).
    pub fn generate_ids(
        &self,
        prompt: &[u32],
        max_tokens: usize,
        temperature: f32,
        top_p: f32,
        seed: u64,
    ) -> Vec<u32> {
        let mut cache = KvCache::new(self.model.cfg.layers);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut logits = self
            .model
            .forward(&[prompt.to_vec()], &mut [&mut cache], &self.device)
            .pop()
            .unwrap_or_default();
        let mut out = Vec::new();
        for _ in 0..max_tokens {
            let t = sample(&logits, temperature, top_p, &mut rng);
            out.push(t);
            if t == self.tokenizer.eos || cache.len() + 1 >= self.model.cfg.context {
                break;
            }
            logits = self
                .model
                .forward(&[vec![t]], &mut [&mut cache], &self.device)
                .pop()
                .unwrap_or_default();
        }
        out
    }

    fn admit(&self, req: GenerationRequest, mut sink: Sink) -> Option<Active<B>> {
        let ids = self.tokenizer.chat_prompt(&req.system, &req.user);
        let limit = self
            .model
            .cfg
            .context
            .saturating_sub(req.max_tokens as usize + 1);
        if ids.len() > limit {
            sink(StreamEvent::Error(format!(
                "prompt of {} tokens exceeds the context of {}",
                ids.len(),
                limit
            )));
            return None;
        }
        let mut cache = KvCache::new(self.model.cfg.layers);
        let mut logits = self
            .model
            .forward(&[ids], &mut [&mut cache], &self.device)
            .pop()
            .unwrap_or_default();
        let mut a = Active {
            cache,
            next: 0,
            produced: 0,
            max: (req.max_tokens as usize).max(1),
            temperature: req.sampling.temperature,
            top_p: req.sampling.top_p,
            rng: rand::rngs::StdRng::seed_from_u64(req.sampling.seed),
            pending: Vec::new(),
            sink,
            penalties: Penalties::of(&req.sampling),
            history: Vec::new(),
            at_sentence_end: false,
        };
        a.next = a.pick(&mut logits);
        Some(a)
    }

    /// Ends a stream: flushes a split character, then `Done(reason)`.
    fn end(&self, a: &mut Active<B>, reason: &'static str) -> bool {
        if !a.pending.is_empty() {
            let t = String::from_utf8_lossy(&a.pending).into_owned();
            a.pending.clear();
            (a.sink)(StreamEvent::Text(t));
        }
        (a.sink)(StreamEvent::Done(reason));
        false
    }

    /// Emits `a.next`; returns false when the stream ended. Near its budget a stream ends at a
    /// sentence end; past the budget it may finish its sentence within a grace, and ends at a
    /// word boundary at the latest.
    fn emit(&self, a: &mut Active<B>) -> bool {
        if a.next == self.tokenizer.eos || self.tokenizer.is_special(a.next) {
            return self.end(a, "stop");
        }
        let bytes = self.tokenizer.token_bytes(a.next);
        let starts_word = bytes.first().is_some_and(|b| b.is_ascii_whitespace());
        if a.produced >= a.max {
            if a.at_sentence_end {
                return self.end(a, "stop");
            }
            if a.produced >= a.max + grace(a.max) && starts_word {
                return self.end(a, "length");
            }
        }
        if a.produced as f32 >= a.max as f32 * WIND_DOWN && a.at_sentence_end && starts_word {
            return self.end(a, "stop");
        }
        a.history.push(a.next);
        a.pending.extend(bytes);
        a.produced += 1;
        // emit the longest valid UTF-8 prefix; keep a split character for the next token
        let valid = match std::str::from_utf8(&a.pending) {
            Ok(_) => a.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => a.pending.len(),
        };
        if valid > 0 {
            let text = String::from_utf8_lossy(&a.pending[..valid]).into_owned();
            a.pending.drain(..valid);
            if !text.trim().is_empty() {
                a.at_sentence_end = ends_sentence(&text);
            }
            if !(a.sink)(StreamEvent::Text(text)) {
                return false;
            }
        }
        if a.produced >= a.max + 2 * grace(a.max) || a.cache.len() + 1 >= self.model.cfg.context {
            return self.end(a, "length");
        }
        true
    }

    /// The decode loop with continuous batching: new requests are admitted (prefilled) between
    /// decode steps; every step decodes one token for all active streams in one batch.
    pub fn serve<J>(
        &self,
        rx: Receiver<J>,
        max_streams: usize,
        adapt: impl Fn(J) -> (GenerationRequest, Sink),
    ) {
        let mut active: Vec<Active<B>> = Vec::new();
        let mut closed = false;
        loop {
            // admit
            while !closed && active.len() < max_streams.max(1) {
                let job = if active.is_empty() {
                    match rx.recv() {
                        Ok(j) => j,
                        Err(_) => {
                            closed = true;
                            break;
                        }
                    }
                } else {
                    match rx.try_recv() {
                        Ok(j) => j,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                };
                let (req, sink) = adapt(job);
                if let Some(mut a) = self.admit(req, sink) {
                    if self.emit(&mut a) {
                        active.push(a);
                    }
                }
            }
            if active.is_empty() {
                if closed {
                    return;
                }
                continue;
            }
            // one decode step for every active stream
            let tokens: Vec<Vec<u32>> = active.iter().map(|a| vec![a.next]).collect();
            let logits = {
                let mut caches: Vec<&mut KvCache<B>> =
                    active.iter_mut().map(|a| &mut a.cache).collect();
                self.model.forward(&tokens, &mut caches, &self.device)
            };
            let mut keep = Vec::with_capacity(active.len());
            for (mut a, mut l) in active.drain(..).zip(logits) {
                a.next = a.pick(&mut l);
                if self.emit(&mut a) {
                    keep.push(a);
                }
            }
            active = keep;
        }
    }
}

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

    #[test]
    fn penalties_read_the_streams_own_history() {
        let base = vec![2.0f32, -1.0, 1.0, 0.5];
        // off: nothing changes
        let mut l = base.clone();
        Penalties::of(&ragfleet_proto::Sampling::default()).apply(&mut l, &[0, 1, 0]);
        assert_eq!(l, base);
        // repetition: positive logits divided, negative multiplied; frequency per occurrence;
        // presence once
        let p = Penalties {
            repetition: 2.0,
            frequency: 0.1,
            presence: 0.5,
            no_repeat_ngram: 0,
        };
        let mut l = base.clone();
        p.apply(&mut l, &[0, 1, 0]);
        assert!((l[0] - (1.0 - 0.2 - 0.5)).abs() < 1e-6, "{l:?}");
        assert!((l[1] - (-2.0 - 0.1 - 0.5)).abs() < 1e-6, "{l:?}");
        assert_eq!(&l[2..], &base[2..]);
        // greedy would pick token 0 again; penalised it does not
        let mut r = rand::rngs::StdRng::seed_from_u64(0);
        assert_eq!(sample(&l, 0.0, 1.0, &mut r), 2);
        // no-repeat 3-grams: after (1, 2), token 3 followed before and is banned
        let p = Penalties {
            repetition: 1.0,
            no_repeat_ngram: 3,
            ..Default::default()
        };
        let mut l = vec![0.0f32; 5];
        l[3] = 9.0;
        p.apply(&mut l, &[1, 2, 3, 4, 1, 2]);
        assert_eq!(l[3], f32::NEG_INFINITY);
        assert_eq!(l[4], 0.0);
    }

    #[test]
    fn sentence_ends_are_recognised() {
        for t in [
            "It is.",
            "Really?",
            "Go! ",
            "He said \"yes.\"",
            "(see above.)",
        ] {
            assert!(ends_sentence(t), "{t}");
        }
        for t in ["It is", "e.g", "a, b", ""] {
            assert!(!ends_sentence(t), "{t}");
        }
    }

    #[test]
    fn sampling_is_seeded_and_greedy_is_argmax() {
        let logits = vec![0.1, 3.0, 2.9, -1.0];
        let mut r = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(sample(&logits, 0.0, 1.0, &mut r), 1);
        let draw = |seed| {
            let mut r = rand::rngs::StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| sample(&logits, 1.0, 0.9, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert!(
            draw(7).iter().all(|&t| t == 1 || t == 2),
            "top-p kept a low token"
        );
    }
}
