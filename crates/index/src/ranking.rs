//! Ranking, in one place: reciprocal rank fusion (one constant), merging per-shard lists,
//! fusing a hybrid search's two rankings, fusing reranker scores with the retrieval ranking,
//! and the sentence reranker's scoring (a passage scored by its sentence closest to the query).
//!
//! Everything here is pure computation on hits and vectors: the shard index, the coordinator
//! and the binary's reranker adapter call it, and its tests need no cluster.
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

pub use ragfleet_proto::ShardHits;
use ragfleet_proto::{Hit, HybridFusion, RerankFusion};

/// The reciprocal rank fusion constant: a list's hit at 0-based rank `r` adds
/// `1 / (RRF_K + r + 1)`.
pub const RRF_K: f32 = 60.0;

/// How deep each ranking of a hybrid search goes to return `k` fused hits.
pub fn hybrid_depth(k: usize) -> usize {
    (k * 2).max(20)
}

/// The reciprocal-rank contribution of 0-based rank `rank`.
fn rrf_term(rank: usize) -> f32 {
    1.0 / (RRF_K + rank as f32 + 1.0)
}

/// Reciprocal rank fusion of several ranked lists, keyed by chunk id. Returns at most `limit`
/// hits with the fused score.
pub fn rrf(lists: &[Vec<Hit>], limit: usize) -> Vec<Hit> {
    let mut fused: HashMap<&str, (f32, &Hit)> = HashMap::new();
    for list in lists {
        for (rank, hit) in list.iter().enumerate() {
            let e = fused.entry(hit.chunk_id.as_str()).or_insert((0.0, hit));
            e.0 += rrf_term(rank);
        }
    }
    let mut out: Vec<Hit> = fused
        .into_values()
        .map(|(score, h)| Hit { score, ..h.clone() })
        .collect();
    sort_hits(&mut out);
    out.truncate(limit);
    out
}

/// Sorts hits best first, ties broken by chunk id so results are deterministic.
pub fn sort_hits(hits: &mut [Hit]) {
    hits.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.chunk_id.cmp(&b.chunk_id))
    });
}

/// Merges per-shard top-k lists by score.
pub fn merge_top_k(lists: Vec<Vec<Hit>>, k: usize) -> Vec<Hit> {
    let mut all: Vec<Hit> = lists.into_iter().flatten().collect();
    sort_hits(&mut all);
    all.truncate(k);
    all
}

/// Merges the shards' answers: single rankings by score; for hybrid, each ranking across shards
/// by score, then the two global rankings fused as `fusion` says (`dense_weight`: the
/// similarity's share in a convex fusion). Fusing the shards' own fused lists would rank every
/// shard's first hit alike.
pub fn merge_shard_answers(
    answers: Vec<ShardHits>,
    depth: usize,
    fusion: HybridFusion,
    dense_weight: f32,
) -> Vec<Hit> {
    let (mut lists, mut dense, mut bm25) = (Vec::new(), Vec::new(), Vec::new());
    for a in answers {
        match a {
            ShardHits::One(h) => lists.push(h),
            ShardHits::Two(d, b) => {
                dense.push(d);
                bm25.push(b);
            }
        }
    }
    if dense.is_empty() {
        return merge_top_k(lists, depth);
    }
    let deep = hybrid_depth(depth);
    let (dense, bm25) = (merge_top_k(dense, deep), merge_top_k(bm25, deep));
    match fusion {
        HybridFusion::Rrf => rrf(&[dense, bm25], depth),
        HybridFusion::Convex => convex(&dense, &bm25, dense_weight, depth),
        HybridFusion::Adaptive => {
            let w = adaptive_weight(&dense, &bm25, dense_weight);
            convex(&dense, &bm25, w, depth)
        }
    }
}

/// Hits of a list that its confidence is read from.
const CONFIDENCE_DEPTH: usize = 20;
/// How far one unit of confidence difference moves the dense weight.
const ADAPT_STEP: f32 = 0.05;

/// How clearly a ranking's first score stands above the rest of its first
/// [`CONFIDENCE_DEPTH`] (standard deviations above their mean, as query performance
/// predictors read a score list); 0 for fewer than three hits or a flat list.
pub fn list_confidence(scores: &[f32]) -> f32 {
    let v = &scores[..scores.len().min(CONFIDENCE_DEPTH)];
    if v.len() < 3 {
        return 0.0;
    }
    let n = v.len() as f32;
    let mean = v.iter().sum::<f32>() / n;
    let sd = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n).sqrt();
    if sd <= f32::EPSILON {
        0.0
    } else {
        (v[0] - mean) / sd
    }
}

/// The adaptive fusion's dense weight for one query: `w` moved by [`ADAPT_STEP`] per unit of
/// the dense list's confidence over the BM25 list's, kept within 0.5..1.
pub fn adaptive_weight(dense: &[Hit], bm25: &[Hit], w: f32) -> f32 {
    let sims: Vec<f32> = dense
        .iter()
        .take(CONFIDENCE_DEPTH)
        .map(|h| h.similarity.unwrap_or(h.score))
        .collect();
    let scores: Vec<f32> = bm25
        .iter()
        .take(CONFIDENCE_DEPTH)
        .map(|h| h.score)
        .collect();
    let shift = ADAPT_STEP * (list_confidence(&sims) - list_confidence(&scores));
    (w + shift).clamp(0.5, 1.0)
}

/// Convex fusion of a dense and a BM25 ranking: each candidate scores `w` x its query
/// similarity + `1 - w` x its BM25 score, each min-max normalised over the candidates (a
/// candidate the BM25 ranking lacks gets its lowest score; one without a similarity, the
/// lowest similarity).
pub fn convex(dense: &[Hit], bm25: &[Hit], w: f32, limit: usize) -> Vec<Hit> {
    let mut cand: HashMap<&str, (Option<f32>, Option<f32>, &Hit)> = HashMap::new();
    for h in dense {
        let e = cand.entry(h.chunk_id.as_str()).or_insert((None, None, h));
        e.0 = h.similarity.or(Some(h.score));
    }
    for h in bm25 {
        let e = cand.entry(h.chunk_id.as_str()).or_insert((None, None, h));
        e.1 = Some(h.score);
        if e.0.is_none() {
            e.0 = h.similarity;
        }
    }
    let range = |v: &mut dyn Iterator<Item = f32>| {
        v.fold((f32::MAX, f32::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)))
    };
    let (slo, shi) = range(&mut cand.values().filter_map(|c| c.0));
    let (blo, bhi) = range(&mut cand.values().filter_map(|c| c.1));
    let norm = |x: Option<f32>, lo: f32, hi: f32| match x {
        Some(x) if hi > lo => (x - lo) / (hi - lo),
        Some(_) => 1.0,
        None => 0.0,
    };
    let mut out: Vec<Hit> = cand
        .into_values()
        .map(|(s, b, h)| Hit {
            score: w * norm(s, slo, shi) + (1.0 - w) * norm(b, blo, bhi),
            ..h.clone()
        })
        .collect();
    sort_hits(&mut out);
    out.truncate(limit);
    out
}

/// Passages whose best sentence scores within this of the whole passage's similarity count as
/// one-sentence passages (int8 sentence vectors round by a few thousandths).
const SAME_AS_PASSAGE: f32 = 0.02;
/// Scores spread less than this (cosines) do not separate the candidates.
const NO_SPREAD: f32 = 0.02;

/// Why the sentence reranker should keep the first-stage order for these candidates, if it
/// should, when `scores` are best-sentence cosines (the shards' stored-sentence scores): when
/// they barely differ, it cannot separate the candidates; after a dense first stage, when the
/// candidates' best sentences are (nearly all) the passages themselves, it has nothing to add
/// to the similarity they were ranked by. (After a hybrid or BM25 first stage it does not
/// abstain on one-sentence passages: its fusion with the similarity brings the dense signal
/// back, worth +0.040 nDCG@10 over the hybrid order on SciFact's titles.)
pub fn sentence_rerank_abstains(
    hits: &[Hit],
    scores: &[f32],
    dense_first_stage: bool,
) -> Option<String> {
    if hits.len() < 2 || scores.len() != hits.len() {
        return None;
    }
    // only scores that are the shards' best-sentence cosines
    let sentence_scores = hits
        .iter()
        .zip(scores)
        .all(|(h, s)| h.sentence_score == Some(*s));
    if !sentence_scores {
        return None;
    }
    let same = hits
        .iter()
        .zip(scores)
        .filter(|(h, s)| {
            h.similarity
                .is_some_and(|sim| (*s - sim).abs() < SAME_AS_PASSAGE)
        })
        .count();
    if dense_first_stage && same * 10 >= hits.len() * 9 {
        return Some(format!(
            "abstained: the best sentence of {same} of {} candidates is the passage itself",
            hits.len()
        ));
    }
    let (lo, hi) = scores
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), s| (l.min(*s), h.max(*s)));
    if hi - lo < NO_SPREAD {
        return Some(format!(
            "abstained: its scores differ by {:.3} at most",
            hi - lo
        ));
    }
    None
}

/// Orders `hits` (in retrieval order) by the reranker's `scores`: alone, weighted with each
/// hit's query similarity, or fused with the retrieval rank by reciprocal rank fusion. With
/// `on_score`, `weighted` fusion weighs the reranker score against each hit's first-stage
/// score instead (a convex hybrid's, in 0..1, which holds the BM25 evidence the similarity
/// alone lacks).
pub fn fuse_rerank(
    hits: &mut [Hit],
    scores: &[f32],
    fusion: RerankFusion,
    weight: f32,
    on_score: bool,
) {
    let fusion = match fusion {
        RerankFusion::Weighted if !on_score && hits.iter().any(|h| h.similarity.is_none()) => {
            RerankFusion::Rrf
        }
        f => f,
    };
    match fusion {
        RerankFusion::Weighted => {
            for (h, s) in hits.iter_mut().zip(scores) {
                let base = if on_score {
                    h.score
                } else {
                    h.similarity.unwrap_or(0.0)
                };
                h.score = weight * s + (1.0 - weight) * base;
            }
        }
        RerankFusion::Replace => {
            for (h, s) in hits.iter_mut().zip(scores) {
                h.score = *s;
            }
        }
        RerankFusion::Rrf => {
            let mut order: Vec<usize> = (0..hits.len()).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let mut rerank_rank = vec![0usize; hits.len()];
            for (r, &i) in order.iter().enumerate() {
                rerank_rank[i] = r;
            }
            for (i, h) in hits.iter_mut().enumerate() {
                h.score = rrf_term(i) + rrf_term(rerank_rank[i]);
            }
        }
    }
    sort_hits(hits);
}

/// Passages whose sentence vectors a [`SentenceScorer`] keeps.
const SENTENCE_CACHE: usize = 20_000;
/// Sentences of one passage that are scored (the rest are dropped).
const MAX_SENTENCES: usize = 48;

/// Sentence vectors by passage-text hash, dropped oldest first past a capacity.
#[derive(Default)]
struct SentenceCache {
    map: HashMap<u64, Arc<Vec<Vec<f32>>>>,
    order: VecDeque<u64>,
}

/// The sentence reranker's scoring: a passage scores the cosine of its sentence closest to the
/// query, each sentence embedded on its own (late interaction at sentence granularity). A
/// passage's best sentence often carries the answer that its single whole-passage vector
/// blurs. Sentence vectors are cached per passage text, so passages that come back for many
/// queries are embedded once.
#[derive(Default)]
pub struct SentenceScorer {
    cache: Mutex<SentenceCache>,
}

/// The sentences of a passage that are scored (at most [`MAX_SENTENCES`]; the whole passage
/// when it has none).
pub fn sentence_units(passage: &str) -> Vec<String> {
    let mut u: Vec<String> = crate::chunk::sentences(passage)
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| s.chars().any(|c| c.is_alphanumeric()))
        .take(MAX_SENTENCES)
        .collect();
    if u.is_empty() {
        u.push(passage.to_string());
    }
    u
}

fn text_key(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl std::fmt::Debug for SentenceScorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.cache.lock().map(|c| c.map.len()).unwrap_or(0);
        f.debug_struct("SentenceScorer")
            .field("cached_passages", &n)
            .finish()
    }
}

impl SentenceScorer {
    /// Scores `passages` for `query`; `embed` turns texts into unit vectors (one batch: the
    /// query and every sentence of the passages not cached).
    pub fn score(
        &self,
        query: &str,
        passages: &[String],
        embed: &dyn Fn(&[String]) -> Result<Vec<Vec<f32>>, String>,
    ) -> Result<Vec<f32>, String> {
        let keys: Vec<u64> = passages.iter().map(|p| text_key(p)).collect();
        let mut have: Vec<Option<Arc<Vec<Vec<f32>>>>> = {
            let c = self.cache.lock().expect("cache");
            keys.iter().map(|k| c.map.get(k).cloned()).collect()
        };
        let mut texts = vec![query.to_string()];
        let mut owners = Vec::new();
        for (i, p) in passages.iter().enumerate() {
            if have[i].is_none() {
                for u in sentence_units(p) {
                    texts.push(u);
                    owners.push(i);
                }
            }
        }
        let vecs = embed(&texts)?;
        if vecs.len() != texts.len() {
            return Err(format!(
                "the embedder returned {} vectors for {} texts",
                vecs.len(),
                texts.len()
            ));
        }
        let mut vecs = vecs.into_iter();
        let q = vecs.next().ok_or("the embedder returned nothing")?;
        let mut fresh: HashMap<usize, Vec<Vec<f32>>> = HashMap::new();
        for (i, v) in owners.into_iter().zip(vecs) {
            fresh.entry(i).or_default().push(v);
        }
        {
            let mut c = self.cache.lock().expect("cache");
            for (i, vs) in fresh {
                let vs = Arc::new(vs);
                if c.map.insert(keys[i], vs.clone()).is_none() {
                    c.order.push_back(keys[i]);
                }
                have[i] = Some(vs);
            }
            while c.order.len() > SENTENCE_CACHE {
                if let Some(k) = c.order.pop_front() {
                    c.map.remove(&k);
                }
            }
        }
        Ok(have
            .into_iter()
            .map(|vs| {
                vs.map_or(f32::MIN, |vs| {
                    vs.iter()
                        .map(|v| crate::vector::dot(&q, v))
                        .fold(f32::MIN, f32::max)
                })
            })
            .collect())
    }
}

/// Support under which an answer sentence is marked weakly supported.
pub const WEAK_SUPPORT: f32 = 0.5;

const STOPWORDS: [&str; 40] = [
    "about", "above", "after", "again", "also", "because", "been", "before", "being", "between",
    "both", "can", "could", "does", "doing", "each", "from", "have", "having", "here", "into",
    "more", "most", "other", "same", "should", "some", "such", "than", "that", "their", "them",
    "then", "there", "these", "they", "this", "those", "what", "when",
];

/// Content words of a text: lower-cased words of four or more letters, stop words dropped.
pub fn content_words(text: &str) -> std::collections::HashSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 4)
        .map(|w| w.to_lowercase())
        .filter(|w| !STOPWORDS.contains(&w.as_str()))
        .collect()
}

/// How well each answer sentence is supported by the context sentences: half its best cosine
/// to a context sentence (vectors at unit length), half the share of its content words that
/// appear in the context. The score is the mean support.
pub fn grounding(
    answer: &[String],
    answer_vecs: &[Vec<f32>],
    context: &[String],
    context_vecs: &[Vec<f32>],
) -> ragfleet_proto::Grounding {
    let ctx_words: std::collections::HashSet<String> =
        context.iter().flat_map(|c| content_words(c)).collect();
    let sentences: Vec<ragfleet_proto::SentenceSupport> = answer
        .iter()
        .zip(answer_vecs)
        .map(|(s, v)| {
            let cos = context_vecs
                .iter()
                .map(|c| crate::vector::dot(v, c))
                .fold(0.0f32, f32::max)
                .clamp(0.0, 1.0);
            let words = content_words(s);
            let overlap = if words.is_empty() {
                cos
            } else {
                words.iter().filter(|w| ctx_words.contains(*w)).count() as f32 / words.len() as f32
            };
            let support = 0.5 * cos + 0.5 * overlap;
            ragfleet_proto::SentenceSupport {
                text: s.clone(),
                support,
                weak: support < WEAK_SUPPORT,
            }
        })
        .collect();
    let score = if sentences.is_empty() {
        0.0
    } else {
        sentences.iter().map(|s| s.support).sum::<f32>() / sentences.len() as f32
    };
    ragfleet_proto::Grounding { score, sentences }
}

/// The share of the best sentence's similarity to the question another sentence needs to be
/// quoted beside it.
pub const EXTRACT_RELEVANCE: f32 = 0.6;

/// Picks the sentences of an extractive answer: the candidates (label, sentence, unit vector)
/// closest to the question, best first, dropping near-duplicates (cosine >= 0.95 to one
/// already picked) and sentences far less related to the question than the best one (below
/// [`EXTRACT_RELEVANCE`] of its similarity), while their token count stays within `budget`; at
/// most `max` of them.
pub fn extract<'a>(
    question: &[f32],
    candidates: &'a [(String, String, Vec<f32>)],
    budget: usize,
    max: usize,
    count: &dyn Fn(&str) -> usize,
) -> Vec<&'a (String, String, Vec<f32>)> {
    let mut order: Vec<(f32, usize)> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (crate::vector::dot(question, &c.2), i))
        .collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let order_first = order.first().copied();
    let floor = order_first.map_or(0.0, |(best, _)| best * EXTRACT_RELEVANCE);
    let mut picked: Vec<&(String, String, Vec<f32>)> = Vec::new();
    let mut spent = 0;
    for (sim, i) in order {
        if picked.len() >= max || sim < floor {
            break;
        }
        let c = &candidates[i];
        if picked
            .iter()
            .any(|p| crate::vector::dot(&p.2, &c.2) >= 0.95 || p.1 == c.1)
        {
            continue;
        }
        let n = count(&c.1);
        if spent + n > budget {
            continue;
        }
        spent += n;
        picked.push(c);
    }
    // a budget smaller than the best sentence still quotes it whole (a cut quote says less)
    if picked.is_empty() {
        if let Some(&(_, i)) = order_first.as_ref() {
            picked.push(&candidates[i]);
        }
    }
    picked
}

/// An answer that stopped after its last full sentence, mid-way through another (the model
/// ended it there): the text up to that last sentence end, when one exists with at least three
/// words before it; `None` when the text already ends a sentence or has no earlier end. A list
/// marker (`1.`, `a)`, `-`) opening a line is not a sentence end, and a trailing one is a
/// fragment.
pub fn drop_trailing_fragment(text: &str) -> Option<String> {
    let closers = ['"', '\'', ')', ']', '*', '`'];
    let is_marker = |w: &str| {
        let w = w.trim();
        let core = w.trim_end_matches(['.', ')']);
        !w.is_empty()
            && w.len() <= 4
            && (core.chars().all(|c| c.is_ascii_digit())
                || (core.len() == 1 && core.chars().all(|c| c.is_ascii_alphabetic()))
                || matches!(w, "-" | "*" | "•"))
    };
    let mut t = text.trim_end();
    // a last line that is only a list marker opens an item that never came
    while let Some(nl) = t.rfind('\n') {
        if is_marker(&t[nl + 1..]) {
            t = t[..nl].trim_end();
        } else {
            break;
        }
    }
    let ends = t.trim_end_matches(closers).ends_with(['.', '!', '?']);
    if ends && t.len() == text.trim_end().len() {
        return None;
    }
    let bytes = t.as_bytes();
    // where the line holding byte `i` starts, and whether the word ending at `i` opens it
    let opens_line_as_marker = |i: usize| {
        let start = t[..i].rfind(char::is_whitespace).map_or(0, |p| p + 1);
        let line_start = start == 0 || bytes[start - 1] == b'\n';
        line_start && is_marker(&t[start..=i])
    };
    let mut cut = None;
    for (i, &c) in bytes.iter().enumerate() {
        if matches!(c, b'.' | b'!' | b'?') {
            // a sentence end is followed by white space (after any closing marks), or ends
            // the (marker-stripped) text
            let mut j = i + 1;
            while j < bytes.len() && closers.contains(&(bytes[j] as char)) {
                j += 1;
            }
            let boundary = j == bytes.len() || bytes[j].is_ascii_whitespace();
            // ... and the next sentence does not start in lower case (`panic! macro`)
            let next_lower = t[j..]
                .trim_start()
                .chars()
                .next()
                .is_some_and(char::is_lowercase);
            if boundary && !next_lower && !opens_line_as_marker(i) {
                cut = Some(j);
            }
        }
    }
    let kept = t[..cut?].trim_end();
    if kept.len() == text.trim_end().len() {
        return None;
    }
    (kept.split_whitespace().count() >= 3).then(|| kept.to_string())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_trailing_fragment_is_dropped_after_the_last_full_sentence() {
        assert_eq!(
            drop_trailing_fragment("Tides follow the moon. They rise twice a day. The sun also"),
            Some("Tides follow the moon. They rise twice a day.".to_string())
        );
        assert_eq!(
            drop_trailing_fragment("It said \"stop.\" Then the"),
            Some("It said \"stop.\"".to_string())
        );
        // whole sentences, nothing to drop; no earlier end, or too little before it: kept
        assert_eq!(drop_trailing_fragment("Tides follow the moon."), None);
        assert_eq!(drop_trailing_fragment("Tides follow (the moon.)"), None);
        assert_eq!(drop_trailing_fragment("No sentence end at all"), None);
        assert_eq!(drop_trailing_fragment("Yes. and then"), None);
        // a decimal point is not a sentence end, nor a macro's bang before a lower-case word
        assert_eq!(drop_trailing_fragment("It is 3.5 metres high and"), None);
        assert_eq!(
            drop_trailing_fragment("Use the panic! macro. Besides the panic! function, use"),
            Some("Use the panic! macro.".to_string())
        );
        // a list that never came: the marker and the sentence announcing it go
        assert_eq!(
            drop_trailing_fragment(
                "Use the Result type. It can be matched.\n\nThere are other ways such as:\n\n1."
            ),
            Some("Use the Result type. It can be matched.".to_string())
        );
        // an item marker is not a sentence end to cut back to
        assert_eq!(
            drop_trailing_fragment("Use these tools:\n1. Result for errors.\n2. Option for"),
            Some("Use these tools:\n1. Result for errors.".to_string())
        );
    }
    use super::*;
    use std::cell::RefCell;

    fn hit(doc: &str, text: &str, score: f32) -> Hit {
        Hit {
            doc_id: doc.into(),
            chunk_id: format!("{doc}#0"),
            score,
            similarity: Some(score),
            text: text.into(),
            sentence_score: None,
        }
    }

    fn ids(h: &[Hit]) -> Vec<&str> {
        h.iter().map(|x| x.doc_id.as_str()).collect()
    }

    #[test]
    fn rrf_uses_one_constant_and_sums_over_lists() {
        let a = vec![hit("x", "", 9.0), hit("y", "", 8.0)];
        let b = vec![hit("y", "", 1.0), hit("z", "", 0.5)];
        let fused = rrf(&[a, b], 10);
        assert_eq!(ids(&fused), ["y", "x", "z"]);
        let y = 1.0 / (RRF_K + 2.0) + 1.0 / (RRF_K + 1.0);
        assert!((fused[0].score - y).abs() < 1e-7);
        assert!((fused[1].score - 1.0 / (RRF_K + 1.0)).abs() < 1e-7);
        assert_eq!(rrf(&[vec![hit("x", "", 1.0)]], 0).len(), 0);
        assert_eq!(hybrid_depth(3), 20);
        assert_eq!(hybrid_depth(15), 30);
    }

    #[test]
    fn rerank_fusion_replaces_or_fuses_ranks() {
        let base: Vec<Hit> = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, d)| hit(d, d, 1.0 - i as f32 * 0.1))
            .collect();
        // the reranker loves d, then c
        let scores = [0.1, 0.2, 0.8, 0.9];
        let mut h = base.clone();
        fuse_rerank(&mut h, &scores, RerankFusion::Replace, 0.5, false);
        assert_eq!(ids(&h), ["d", "c", "b", "a"]);
        // fused: a (ranks 0 and 3) ties d (3 and 0) and beats the tie of b (1 and 2) and
        // c (2 and 1), reciprocal ranks being convex; the chunk id breaks ties
        let mut h = base.clone();
        fuse_rerank(&mut h, &scores, RerankFusion::Rrf, 0.5, false);
        assert_eq!(ids(&h), ["a", "d", "b", "c"]);
        assert_eq!(h[0].score, h[1].score);
        // a reranker that agrees with retrieval changes nothing
        let mut h = base.clone();
        fuse_rerank(&mut h, &[0.9, 0.8, 0.7, 0.6], RerankFusion::Rrf, 0.5, false);
        assert_eq!(ids(&h), ["a", "b", "c", "d"]);
        // weighted: 0.5 x score + 0.5 x similarity (1.0, 0.9, 0.8, 0.7)
        let mut h = base.clone();
        fuse_rerank(
            &mut h,
            &[0.0, 0.3, 0.8, 0.95],
            RerankFusion::Weighted,
            0.5,
            false,
        );
        assert_eq!(ids(&h), ["d", "c", "b", "a"]);
        assert!((h[0].score - 0.825).abs() < 1e-6);
        // weighed against the first-stage score instead (a convex hybrid's): hits whose
        // similarity is low but first-stage score high keep their lead
        let mut h: Vec<Hit> = base
            .iter()
            .map(|x| Hit {
                similarity: Some(0.1),
                ..x.clone()
            })
            .collect();
        fuse_rerank(
            &mut h,
            &[0.5, 0.5, 0.5, 0.9],
            RerankFusion::Weighted,
            0.5,
            true,
        );
        // a: 0.25 + 0.5, b: 0.25 + 0.45, c: 0.25 + 0.4, d: 0.45 + 0.35
        assert_eq!(ids(&h), ["d", "a", "b", "c"]);
        assert!((h[0].score - 0.8).abs() < 1e-6);
        // without similarities (bm25 mode) weighted falls back to rank fusion
        let mut h = base.clone();
        h.iter_mut().for_each(|x| x.similarity = None);
        fuse_rerank(&mut h, &scores, RerankFusion::Weighted, 0.5, false);
        assert_eq!(ids(&h), ["a", "d", "b", "c"]);
    }

    #[test]
    fn hybrid_merge_fuses_global_rankings_not_shard_lists() {
        // shard 0 holds the two best documents; shard 1 only weak ones
        let a = ShardHits::Two(
            vec![hit("a1", "x", 0.9), hit("a2", "x", 0.8)],
            vec![hit("a1", "x", 9.0), hit("a2", "x", 8.0)],
        );
        let b = ShardHits::Two(vec![hit("b1", "x", 0.1)], vec![hit("b1", "x", 0.5)]);
        let merged = merge_shard_answers(vec![b, a], 3, HybridFusion::Rrf, 0.0);
        assert_eq!(ids(&merged), vec!["a1", "a2", "b1"]);
        // single rankings merge by score
        let merged = merge_shard_answers(
            vec![
                ShardHits::One(vec![hit("x", "t", 0.2)]),
                ShardHits::One(vec![hit("y", "t", 0.7)]),
            ],
            2,
            HybridFusion::Rrf,
            0.0,
        );
        assert_eq!(merged[0].doc_id, "y");
        assert!(merge_shard_answers(Vec::new(), 5, HybridFusion::Rrf, 0.0).is_empty());
    }

    /// A deterministic stand-in for the embedder: hashed bags of lower-cased words, at unit
    /// length, so texts sharing words are close.
    fn bag_of_words(texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        Ok(texts
            .iter()
            .map(|t| {
                let mut v = vec![0f32; 64];
                for w in t
                    .split(|c: char| !c.is_alphanumeric())
                    .filter(|w| !w.is_empty())
                {
                    v[(text_key(&w.to_lowercase()) % 64) as usize] += 1.0;
                }
                let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-9);
                v.iter().map(|x| x / n).collect()
            })
            .collect())
    }

    #[test]
    fn a_passage_scores_its_best_sentence_and_sentences_are_embedded_once() {
        let scorer = SentenceScorer::default();
        let passages = vec![
            "Rivers flow to the sea. Glaciers carve valleys slowly.".to_string(),
            "Honey bees store honey in wax combs.".to_string(),
        ];
        let calls = RefCell::new(Vec::new());
        let embed = |t: &[String]| {
            calls.borrow_mut().push(t.len());
            bag_of_words(t)
        };
        let s = scorer
            .score("how do glaciers carve valleys", &passages, &embed)
            .unwrap();
        assert!(s[0] > s[1], "{s:?}");
        // the first passage scores its second sentence, not the whole passage
        let best = bag_of_words(&[
            "how do glaciers carve valleys".into(),
            "Glaciers carve valleys slowly.".into(),
        ])
        .unwrap();
        assert!((s[0] - crate::vector::dot(&best[0], &best[1])).abs() < 1e-6);
        // query + 2 + 1 sentences; then only the query (cached sentence vectors)
        let s2 = scorer
            .score("where do bees keep honey", &passages, &embed)
            .unwrap();
        assert!(s2[1] > s2[0], "{s2:?}");
        assert_eq!(*calls.borrow(), vec![4, 1]);
        // an embedder that returns too few vectors is an error, not a panic
        let short = |_: &[String]| Ok(vec![vec![1.0f32]]);
        assert!(scorer.score("q", &["new passage".into()], &short).is_err());
        assert_eq!(sentence_units("  ").len(), 1);
    }

    #[test]
    fn grounding_scores_supported_sentences_above_unsupported_ones() {
        let context = vec![
            "Glaciers carve valleys slowly.".to_string(),
            "Honey bees store honey in wax combs.".to_string(),
        ];
        let answer = vec![
            "Glaciers carve valleys.".to_string(),
            "Volcanoes erupt lava on Jupiter.".to_string(),
        ];
        let cv = bag_of_words(&context).unwrap();
        let av = bag_of_words(&answer).unwrap();
        let g = grounding(&answer, &av, &context, &cv);
        assert_eq!(g.sentences.len(), 2);
        assert!(g.sentences[0].support > 0.8, "{g:?}");
        assert!(!g.sentences[0].weak);
        assert!(g.sentences[1].support < WEAK_SUPPORT, "{g:?}");
        assert!(g.sentences[1].weak);
        assert!((g.score - (g.sentences[0].support + g.sentences[1].support) / 2.0).abs() < 1e-6);
        assert_eq!(grounding(&[], &[], &context, &cv).score, 0.0);
    }

    #[test]
    fn extraction_takes_the_closest_distinct_sentences_within_the_budget() {
        let texts = [
            ("a", "Glaciers carve valleys slowly."),
            ("b", "Glaciers carve valleys slowly."),
            ("c", "Glaciers carve deep valleys in mountains."),
            ("d", "Honey bees store honey."),
        ];
        let strings: Vec<String> = texts.iter().map(|t| t.1.to_string()).collect();
        let vecs = bag_of_words(&strings).unwrap();
        let cands: Vec<(String, String, Vec<f32>)> = texts
            .iter()
            .zip(vecs)
            .map(|((l, s), v)| (l.to_string(), s.to_string(), v))
            .collect();
        let q = bag_of_words(&["how do glaciers carve valleys".to_string()]).unwrap();
        let words = |s: &str| s.split_whitespace().count();
        let got = extract(&q[0], &cands, 100, 3, &words);
        let labels: Vec<&str> = got.iter().map(|c| c.0.as_str()).collect();
        // the duplicate of a is dropped, and bees, unrelated to the question, are not quoted
        assert_eq!(labels, vec!["c", "a"]);
        // a budget of 8 words keeps the best sentence (6 words) and what else fits (not a's 4)
        let got = extract(&q[0], &cands, 8, 3, &words);
        let labels: Vec<&str> = got.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(labels, vec!["c"]);
        // a budget below any sentence still quotes the best one, whole
        let got = extract(&q[0], &cands, 1, 3, &words);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "c");
        assert!(extract(&q[0], &[], 10, 3, &words).is_empty());
    }
    #[test]
    fn the_sentence_reranker_abstains_on_one_sentence_passages_and_flat_scores_only() {
        let with = |sim: f32, sent: f32| Hit {
            similarity: Some(sim),
            sentence_score: Some(sent),
            ..hit("d", "t", sim)
        };
        // multi-sentence passages: a best sentence well above the passage's similarity
        let hits: Vec<Hit> = (0..10)
            .map(|i| with(0.5 - 0.01 * i as f32, 0.7 - 0.03 * i as f32))
            .collect();
        let scores: Vec<f32> = hits.iter().map(|h| h.sentence_score.unwrap()).collect();
        assert_eq!(sentence_rerank_abstains(&hits, &scores, true), None);
        // one-sentence passages: best sentence = passage (within int8 rounding)
        let single: Vec<Hit> = (0..10)
            .map(|i| with(0.6 - 0.02 * i as f32, 0.603 - 0.02 * i as f32))
            .collect();
        let s1: Vec<f32> = single.iter().map(|h| h.sentence_score.unwrap()).collect();
        let why = sentence_rerank_abstains(&single, &s1, true).unwrap();
        assert!(why.contains("10 of 10"), "{why}");
        // ... after a dense first stage only: after hybrid, the fusion with similarity helps
        assert_eq!(sentence_rerank_abstains(&single, &s1, false), None);
        // flat scores
        let flat: Vec<Hit> = (0..10)
            .map(|i| with(0.2 + 0.05 * i as f32, 0.611 + 0.001 * i as f32))
            .collect();
        let s2: Vec<f32> = flat.iter().map(|h| h.sentence_score.unwrap()).collect();
        for dense in [true, false] {
            assert!(sentence_rerank_abstains(&flat, &s2, dense)
                .unwrap()
                .contains("differ by"));
        }
        // scores that are not the stored sentence scores (a cross-encoder's): never
        let logits: Vec<f32> = s1.iter().map(|s| s * 10.0).collect();
        assert_eq!(sentence_rerank_abstains(&single, &logits, true), None);
    }
    #[test]
    fn convex_fusion_weighs_normalised_similarity_and_bm25() {
        let h = |id: &str, score: f32, sim: Option<f32>| Hit {
            similarity: sim,
            ..hit(id, "t", score)
        };
        // dense ranking: a (0.9) > b (0.5); BM25 ranking: c (12) > b (6); c's similarity 0.7
        let dense = vec![h("a", 0.9, Some(0.9)), h("b", 0.5, Some(0.5))];
        let bm25 = vec![h("c", 12.0, Some(0.7)), h("b", 6.0, Some(0.5))];
        // similarity normalised over {0.9, 0.5, 0.7}: a 1, c 0.5, b 0; BM25 over {12, 6}: c 1, b 0
        let all_dense = convex(&dense, &bm25, 1.0, 10);
        assert_eq!(ids(&all_dense), vec!["a", "c", "b"]);
        let all_bm25 = convex(&dense, &bm25, 0.0, 10);
        assert_eq!(ids(&all_bm25)[0], "c");
        let mixed = convex(&dense, &bm25, 0.7, 10);
        // a: 0.7; c: 0.7 x 0.5 + 0.3 = 0.65; b: 0
        assert_eq!(ids(&mixed), vec!["a", "c", "b"]);
        assert!((mixed[0].score - 0.7).abs() < 1e-6 && (mixed[1].score - 0.65).abs() < 1e-6);
        assert_eq!(convex(&dense, &bm25, 0.7, 2).len(), 2);
        // through the shards' merge
        let merged = merge_shard_answers(
            vec![ShardHits::Two(dense.clone(), bm25.clone())],
            3,
            HybridFusion::Convex,
            0.7,
        );
        assert_eq!(ids(&merged), vec!["a", "c", "b"]);
    }

    #[test]
    fn adaptive_fusion_leans_on_the_more_confident_ranking() {
        let h = |id: String, score: f32, sim: f32| Hit {
            similarity: Some(sim),
            ..hit(&id, "t", score)
        };
        // 20 hits: `first`, then `rest` falling by `step` a rank (sim: scores are similarities)
        let list = |prefix: &str, first: f32, rest: f32, step: f32, sim: bool| -> Vec<Hit> {
            (0..20)
                .map(|i| {
                    let s = if i == 0 {
                        first
                    } else {
                        rest - i as f32 * step
                    };
                    h(format!("{prefix}{i}"), s, if sim { s } else { 0.3 })
                })
                .collect()
        };
        // a peaked list (one clear first) and a flat one (all alike)
        let peaked =
            |prefix: &str, top: f32, rest: f32, sim: bool| list(prefix, top, rest, 0.001, sim);
        let flat = |prefix: &str, v: f32, sim: bool| list(prefix, v, v, 1e-4, sim);
        assert!(list_confidence(&[1.0, 0.2, 0.2, 0.2]) > 1.5);
        assert_eq!(list_confidence(&[0.5, 0.5, 0.5]), 0.0);
        assert_eq!(list_confidence(&[0.9, 0.1]), 0.0, "too few hits to tell");
        // BM25 flat (weak term matches), dense peaked: towards dense
        let w = adaptive_weight(&peaked("d", 0.9, 0.4, true), &flat("b", 3.0, false), 0.8);
        assert!(w > 0.9, "{w}");
        // dense flat, BM25 peaked: towards BM25, never below half
        let w = adaptive_weight(&flat("d", 0.5, true), &peaked("b", 20.0, 5.0, false), 0.8);
        assert!((0.5..0.7).contains(&w), "{w}");
        // alike confidence: the configured weight
        let w = adaptive_weight(
            &peaked("d", 0.9, 0.4, true),
            &peaked("b", 20.0, 5.0, false),
            0.8,
        );
        assert!((w - 0.8).abs() < 0.05, "{w}");
        // no BM25 hit at all: as confident as dense allows, and dense order
        let dense = peaked("d", 0.9, 0.4, true);
        let w = adaptive_weight(&dense, &[], 0.8);
        assert!(w > 0.8, "{w}");
        let merged = merge_shard_answers(
            vec![ShardHits::Two(dense.clone(), Vec::new())],
            5,
            HybridFusion::Adaptive,
            0.8,
        );
        assert_eq!(ids(&merged), ids(&dense[..5]));
    }
}
