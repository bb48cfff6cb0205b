//! A loaded generator serving token streams: requests admitted into one batch, each decode
//! step a single forward pass for every live stream, text handed to each stream's sink as it
//! decodes, streams ended at their budget (at a sentence end when one comes near it) or when
//! their sink is gone.
use std::path::Path;
use std::sync::mpsc::{Receiver, TryRecvError};

use burn::prelude::*;
use rand::SeedableRng;

use super::gguf::Gguf;
use super::sampling::{ends_sentence, sample, Penalties};
use super::{BpeTokenizer, GenerationRequest, KvCache, Llama, LlamaConfig};
use crate::weights::Weights;
use crate::ModelError;

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
