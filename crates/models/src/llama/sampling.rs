//! Picking a token: argmax or top-p sampling, the repetition, frequency and presence
//! penalties a stream asks for, and where a sentence ends (so a stream nearing its budget can
//! stop there).
use rand::Rng;

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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

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
