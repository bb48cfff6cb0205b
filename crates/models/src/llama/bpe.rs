//! The byte-level BPE tokenizer of GGUF Llama models (GPT-2 style), read from the GGUF metadata:
//! digits split individually, GPT-2 pre-tokenisation, byte-to-unicode mapping, merges by rank.
use std::collections::HashMap;
use std::path::Path;

use super::gguf::{Gguf, Value};
use crate::ModelError;

/// GPT-2's reversible byte-to-character table.
fn byte_table() -> ([char; 256], HashMap<char, u8>) {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            n += 1;
            255 + n
        };
        table[b as usize] = char::from_u32(c).expect("valid");
    }
    let inv = table
        .iter()
        .enumerate()
        .map(|(b, c)| (*c, b as u8))
        .collect();
    (table, inv)
}

/// A byte-level BPE tokenizer.
#[derive(Debug, Clone)]
pub struct BpeTokenizer {
    vocab: HashMap<String, u32>,
    tokens: Vec<String>,
    special: Vec<bool>,
    merges: HashMap<(String, String), usize>,
    byte_char: [char; 256],
    char_byte: HashMap<char, u8>,
    split_digits: bool,
    /// Beginning-of-sequence id.
    pub bos: u32,
    /// End-of-sequence id.
    pub eos: u32,
}

fn string_array(g: &Gguf, key: &str) -> Result<Vec<String>, ModelError> {
    match g.get(key) {
        Some(Value::Array(v)) => v
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| {
                    ModelError::format(g.path(), format!("{key} holds a non-string"))
                })
            })
            .collect(),
        _ => Err(ModelError::format(
            g.path(),
            format!("metadata {key} missing"),
        )),
    }
}

impl BpeTokenizer {
    /// Reads the tokenizer from a GGUF file (metadata only is used).
    pub fn from_gguf(path: &Path) -> Result<Self, ModelError> {
        Self::from_parsed(&Gguf::open(path)?)
    }

    /// From parsed GGUF metadata.
    pub fn from_parsed(g: &Gguf) -> Result<Self, ModelError> {
        if g.get("tokenizer.ggml.model").and_then(Value::as_str) != Some("gpt2") {
            return Err(ModelError::format(
                g.path(),
                "tokenizer is not byte-level BPE (tokenizer.ggml.model != gpt2)",
            ));
        }
        let tokens = string_array(g, "tokenizer.ggml.tokens")?;
        let merges_raw = string_array(g, "tokenizer.ggml.merges")?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
            Some(Value::Array(v)) => v.iter().map(|x| x.as_u64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let mut merges = HashMap::with_capacity(merges_raw.len());
        for (rank, m) in merges_raw.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| ModelError::format(g.path(), format!("bad merge {m:?}")))?;
            merges.insert((a.to_string(), b.to_string()), rank);
        }
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("");
        let special = (0..tokens.len())
            .map(|i| types.get(i).copied().unwrap_or(1) == 3)
            .collect();
        let bos = g
            .get("tokenizer.ggml.bos_token_id")
            .and_then(Value::as_u64)
            .unwrap_or(1) as u32;
        let eos = g
            .get("tokenizer.ggml.eos_token_id")
            .and_then(Value::as_u64)
            .unwrap_or(2) as u32;
        Ok(Self::build(
            tokens,
            special,
            merges,
            pre != "gpt2",
            bos,
            eos,
        ))
    }

    /// Assembles a tokenizer from its parts (both file formats end here).
    fn build(
        tokens: Vec<String>,
        special: Vec<bool>,
        merges: HashMap<(String, String), usize>,
        split_digits: bool,
        bos: u32,
        eos: u32,
    ) -> Self {
        let vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let (byte_char, char_byte) = byte_table();
        BpeTokenizer {
            vocab,
            tokens,
            special,
            merges,
            byte_char,
            char_byte,
            split_digits,
            bos,
            eos,
        }
    }

    /// Reads a Hugging Face `tokenizer.json` of a byte-level BPE model (`model.vocab`,
    /// `model.merges`, `added_tokens`).
    pub fn from_hf_json(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::format(path, e))?;
        let model = &v["model"];
        if model["type"].as_str() != Some("BPE") {
            return Err(ModelError::format(path, "tokenizer model is not BPE"));
        }
        let vocab_obj = model["vocab"]
            .as_object()
            .ok_or_else(|| ModelError::format(path, "no model.vocab"))?;
        let mut tokens = vec![String::new(); vocab_obj.len()];
        for (t, id) in vocab_obj {
            let id = id
                .as_u64()
                .ok_or_else(|| ModelError::format(path, "vocab id is not a number"))?
                as usize;
            if id >= tokens.len() {
                tokens.resize(id + 1, String::new());
            }
            tokens[id] = t.clone();
        }
        let mut special = vec![false; tokens.len()];
        for a in v["added_tokens"].as_array().into_iter().flatten() {
            if let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) {
                let id = id as usize;
                if id >= tokens.len() {
                    tokens.resize(id + 1, String::new());
                    special.resize(id + 1, false);
                }
                tokens[id] = content.to_string();
                special[id] = a["special"].as_bool().unwrap_or(true);
            }
        }
        let mut merges = HashMap::new();
        for (rank, m) in model["merges"].as_array().into_iter().flatten().enumerate() {
            let pair = match m {
                serde_json::Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                serde_json::Value::Array(p) if p.len() == 2 => Some((
                    p[0].as_str().unwrap_or("").to_string(),
                    p[1].as_str().unwrap_or("").to_string(),
                )),
                _ => None,
            };
            let pair = pair.ok_or_else(|| ModelError::format(path, format!("bad merge {m}")))?;
            merges.insert(pair, rank);
        }
        let split_digits = v["pre_tokenizer"]
            .to_string()
            .contains("\"individual_digits\":true");
        let id_of = |name: &str, default: u32| {
            tokens
                .iter()
                .position(|t| t == name)
                .map(|i| i as u32)
                .unwrap_or(default)
        };
        let (bos, eos) = (id_of("<|im_start|>", 1), id_of("<|im_end|>", 2));
        Ok(Self::build(tokens, special, merges, split_digits, bos, eos))
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Id of a token string (special tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// Encodes plain text (special-token strings in it are not special).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        for piece in pre_tokenize(text, self.split_digits) {
            let mapped: String = piece.bytes().map(|b| self.byte_char[b as usize]).collect();
            self.bpe(&mapped, &mut out);
        }
        out
    }

    fn bpe(&self, word: &str, out: &mut Vec<u32>) {
        if let Some(&id) = self.vocab.get(word) {
            out.push(id);
            return;
        }
        let mut parts: Vec<String> = word.chars().map(|c| c.to_string()).collect();
        loop {
            let mut best: Option<(usize, usize)> = None;
            for i in 0..parts.len().saturating_sub(1) {
                if let Some(&r) = self.merges.get(&(parts[i].clone(), parts[i + 1].clone())) {
                    if best.is_none_or(|(br, _)| r < br) {
                        best = Some((r, i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let merged = format!("{}{}", parts[i], parts[i + 1]);
            parts[i] = merged;
            parts.remove(i + 1);
        }
        for p in parts {
            match self.vocab.get(&p) {
                Some(&id) => out.push(id),
                None => {
                    // unknown piece: fall back to its single characters
                    for c in p.chars() {
                        if let Some(&id) = self.vocab.get(&c.to_string()) {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }

    /// Raw bytes of a token (special tokens give their text).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(t) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        if self.special.get(id as usize).copied().unwrap_or(false) {
            return t.as_bytes().to_vec();
        }
        t.chars()
            .map(|c| self.char_byte.get(&c).copied().unwrap_or(b'?'))
            .collect()
    }

    /// Whether an id is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Decodes ids to text (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.token_bytes(i)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Prompt ids of the ChatML template (SmolLM2's): a system turn, a user turn, and the start
    /// of the assistant's turn.
    pub fn chat_prompt(&self, system: &str, user: &str) -> Vec<u32> {
        let start = self.token_id("<|im_start|>").unwrap_or(self.bos);
        let end = self.token_id("<|im_end|>").unwrap_or(self.eos);
        let system = if system.is_empty() {
            DEFAULT_SYSTEM
        } else {
            system
        };
        let mut ids = vec![start];
        ids.extend(self.encode(&format!("system\n{system}")));
        ids.push(end);
        ids.extend(self.encode("\n"));
        ids.push(start);
        ids.extend(self.encode(&format!("user\n{user}")));
        ids.push(end);
        ids.extend(self.encode("\n"));
        ids.push(start);
        ids.extend(self.encode("assistant\n"));
        ids
    }
}

/// SmolLM2's default system line.
pub const DEFAULT_SYSTEM: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

#[derive(PartialEq, Clone, Copy)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn class(c: char) -> Class {
    if c.is_whitespace() {
        Class::Space
    } else if c.is_alphabetic() {
        Class::Letter
    } else if c.is_numeric() {
        Class::Number
    } else {
        Class::Other
    }
}

/// Splits text the way GPT-2's pre-tokeniser regex does
/// (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`), after
/// isolating every digit when `split_digits`.
pub fn pre_tokenize(text: &str, split_digits: bool) -> Vec<&str> {
    let mut out = Vec::new();
    if split_digits {
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_ascii_digit() || (c.is_numeric() && !c.is_alphabetic()) {
                if start < i {
                    gpt2_split(&text[start..i], &mut out);
                }
                out.push(&text[i..i + c.len_utf8()]);
                start = i + c.len_utf8();
            }
        }
        if start < text.len() {
            gpt2_split(&text[start..], &mut out);
        }
    } else {
        gpt2_split(text, &mut out);
    }
    out
}

fn gpt2_split<'a>(s: &'a str, out: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let n = chars.len();
    let at = |i: usize| if i < n { chars[i].0 } else { s.len() };
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        // contractions
        if c == '\'' && i + 1 < n {
            let rest = &s[at(i + 1)..];
            let mut matched = 0;
            for suf in ["re", "ve", "ll", "s", "t", "m", "d"] {
                if rest.starts_with(suf) {
                    matched = suf.len();
                    break;
                }
            }
            if matched > 0 {
                let end = at(i + 1) + matched;
                out.push(&s[at(i)..end]);
                while i < n && chars[i].0 < end {
                    i += 1;
                }
                continue;
            }
        }
        // optional space then a run of one class
        let (run_start, cls) = if c == ' ' && i + 1 < n && class(chars[i + 1].1) != Class::Space {
            (i + 1, class(chars[i + 1].1))
        } else {
            (i, class(c))
        };
        if cls != Class::Space {
            let mut j = run_start + 1;
            while j < n && class(chars[j].1) == cls {
                j += 1;
            }
            out.push(&s[at(i)..at(j)]);
            i = j;
            continue;
        }
        // whitespace run: \s+(?!\S) leaves the last space for the next word
        let mut j = i;
        while j < n && class(chars[j].1) == Class::Space {
            j += 1;
        }
        let end = if j < n && j - i > 1 { j - 1 } else { j };
        out.push(&s[at(i)..at(end)]);
        i = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenizer_matches_gpt2_regex_behaviour() {
        assert_eq!(pre_tokenize("Hello world", false), vec!["Hello", " world"]);
        assert_eq!(
            pre_tokenize("it's  ok!\n\nyes", false),
            vec!["it", "'s", " ", " ok", "!", "\n", "\n", "yes"]
        );
        assert_eq!(pre_tokenize("a   b", false), vec!["a", "  ", " b"]);
        assert_eq!(pre_tokenize("end  ", false), vec!["end", "  "]);
        assert_eq!(
            pre_tokenize("in 1889.", true),
            vec!["in", " ", "1", "8", "8", "9", "."]
        );
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let (t, inv) = byte_table();
        assert_eq!(inv.len(), 256);
        for b in 0..=255u8 {
            assert_eq!(inv[&t[b as usize]], b);
        }
        assert_eq!(t[b' ' as usize], 'Ġ');
    }
}
