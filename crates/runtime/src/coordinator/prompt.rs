//! Prompt assembly: the system prompt, and the context passages chosen under a token budget.
use std::collections::HashSet;

use ragfleet_proto::{Hit, Source};

/// Default system prompt of answers.
pub const SYSTEM_PROMPT: &str = "You are a helpful assistant. Answer the question using the passages given. \
Cite the passage ids you used in square brackets, like [doc-1]. If the passages do not contain the answer, say so.";

/// The tokens the passages may fill out of `context_tokens` (`[generator]`): what the question,
/// the system prompt and a margin (`fixed`) leave, less the answer's `max_tokens`, of which at
/// most half the budget is kept back. A long answer asked for (`max_tokens` past half the
/// budget) still gets passages to answer from; it runs on to the model's own window.
pub fn passage_budget(context_tokens: usize, max_tokens: usize, fixed: usize) -> usize {
    context_tokens.saturating_sub(max_tokens.min(context_tokens / 2) + fixed)
}

/// 3-word shingles of a passage (lower-cased, punctuation dropped), for near-duplicate detection.
fn shingles(text: &str) -> HashSet<String> {
    let w: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|x| !x.is_empty())
        .map(|x| x.to_lowercase())
        .collect();
    if w.len() < 3 {
        return std::iter::once(w.join(" ")).collect();
    }
    w.windows(3).map(|x| x.join(" ")).collect()
}

/// Picks passages for the prompt: most relevant first, duplicates and near-duplicates
/// (3-word-shingle Jaccard >= 0.8) dropped, within `budget` tokens; each labelled by doc id.
pub fn assemble_context(
    hits: &[Hit],
    budget: usize,
    count: &dyn Fn(&str) -> usize,
) -> (String, Vec<Source>) {
    let mut used: Vec<HashSet<String>> = Vec::new();
    let mut out = String::new();
    let mut sources: Vec<Source> = Vec::new();
    let mut spent = 0;
    for h in hits {
        let sh = shingles(&h.text);
        let dup = used.iter().any(|u| {
            let inter = u.intersection(&sh).count() as f64;
            let union = u.union(&sh).count().max(1) as f64;
            inter / union >= 0.8
        });
        if dup {
            continue;
        }
        let block = format!("[{}] {}\n\n", h.doc_id, h.text.trim());
        let n = count(&block);
        if spent + n > budget {
            continue;
        }
        spent += n;
        out.push_str(&block);
        used.push(sh);
        if !sources.iter().any(|s| s.doc_id == h.doc_id) {
            sources.push(Source {
                doc_id: h.doc_id.clone(),
                score: h.score,
            });
        }
    }
    (out, sources)
}
