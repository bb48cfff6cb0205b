//! A BM25 inverted index (k1 = 1.2, b = 0.75) over chunk slots.
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

const K1: f32 = 1.2;
const B: f32 = 0.75;

const STOPWORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has", "he", "in", "is", "it",
    "its", "of", "on", "that", "the", "to", "was", "were", "will", "with", "this", "or", "which",
];

/// Lower-cased alphanumeric terms of `text`, stop words removed.
pub(crate) fn terms(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(|t| t.to_lowercase())
        .filter(|t| !STOPWORDS.contains(&t.as_str()))
        .collect()
}

/// Each term of `text` with its frequency, sorted by term (what a snapshot stores per chunk).
pub(crate) fn term_counts(text: &str) -> Vec<(String, u32)> {
    let mut tf: HashMap<String, u32> = HashMap::new();
    for t in terms(text) {
        *tf.entry(t).or_default() += 1;
    }
    let mut v: Vec<(String, u32)> = tf.into_iter().collect();
    v.sort_unstable();
    v
}

/// A term's postings (slot -> term frequency) with what bounds its contribution to a score:
/// its highest frequency and the shortest chunk it is in. Removals leave both as they were
/// (still bounds, only looser) until the term has no chunk left.
#[derive(Debug, Clone)]
struct Postings {
    docs: HashMap<u32, u32>,
    max_tf: u32,
    min_len: u32,
}

impl Default for Postings {
    fn default() -> Self {
        Postings {
            docs: HashMap::new(),
            max_tf: 0,
            min_len: u32::MAX,
        }
    }
}

/// One term's BM25 contribution at frequency `tf` in a chunk of `len` terms.
fn term_score(idf: f32, tf: f32, len: f32, avg: f32) -> f32 {
    idf * tf * (K1 + 1.0) / (tf + K1 * (1.0 - B + B * len / avg))
}

/// Inverted index from terms to (slot, term frequency).
#[derive(Debug, Default, Clone)]
pub struct Bm25 {
    postings: HashMap<String, Postings>,
    doc_terms: HashMap<u32, Vec<(String, u32)>>,
    doc_len: HashMap<u32, u32>,
    total_len: u64,
}

impl Bm25 {
    /// Indexes `text` under `slot` (replacing what the slot had).
    pub fn insert(&mut self, slot: u32, text: &str) {
        self.insert_counts(slot, term_counts(text));
    }

    /// Indexes a chunk given its term counts (from [`term_counts`] or a snapshot).
    pub fn insert_counts(&mut self, slot: u32, counts: Vec<(String, u32)>) {
        self.remove(slot);
        let len: u32 = counts.iter().map(|(_, f)| *f).sum();
        for (t, f) in &counts {
            let p = self.postings.entry(t.clone()).or_default();
            p.docs.insert(slot, *f);
            p.max_tf = p.max_tf.max(*f);
            p.min_len = p.min_len.min(len);
        }
        self.doc_len.insert(slot, len);
        self.total_len += len as u64;
        self.doc_terms.insert(slot, counts);
    }

    /// Removes a slot.
    pub fn remove(&mut self, slot: u32) {
        if let Some(ts) = self.doc_terms.remove(&slot) {
            for (t, _) in ts {
                if let Some(p) = self.postings.get_mut(&t) {
                    p.docs.remove(&slot);
                    if p.docs.is_empty() {
                        self.postings.remove(&t);
                    }
                }
            }
            self.total_len -= self.doc_len.remove(&slot).unwrap_or(0) as u64;
        }
    }

    /// Slots indexed.
    pub fn len(&self) -> usize {
        self.doc_len.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.doc_len.is_empty()
    }

    /// The distinct terms of `query` the index holds, as (postings, idf), rarest first.
    fn query_terms(&self, query: &str) -> Vec<(&Postings, f32)> {
        let n = self.doc_len.len() as f32;
        let mut q = terms(query);
        q.sort();
        q.dedup();
        let mut qt: Vec<(&Postings, f32)> = q
            .iter()
            .filter_map(|t| self.postings.get(t))
            .map(|p| {
                let df = p.docs.len() as f32;
                (p, (1.0 + (n - df + 0.5) / (df + 0.5)).ln())
            })
            .collect();
        qt.sort_by(|a, b| {
            b.1.total_cmp(&a.1)
                .then(a.0.docs.len().cmp(&b.0.docs.len()))
        });
        qt
    }

    /// The `k` best slots for `query` with their scores, best first (ties: lower slot first).
    ///
    /// Exact top-k without scoring every matching chunk (MaxScore, term at a time): terms go
    /// rarest first; a chunk first met in term i's postings holds none of the rarer terms, so
    /// its score is bounded by the sum of the upper bounds of terms i and after (each term's
    /// contribution at its highest frequency in its shortest chunk); once the k-th best score
    /// passes that bound, the commoner terms' long postings are never read.
    pub fn search(&self, query: &str, k: usize) -> Vec<(u32, f32)> {
        let n = self.doc_len.len() as f32;
        if n == 0.0 || k == 0 {
            return Vec::new();
        }
        let avg = (self.total_len as f32 / n).max(1e-6);
        let qt = self.query_terms(query);
        // bound[i]: the most a chunk holding only terms i.. can score (a contribution grows
        // with the frequency and shrinks with the chunk's length), a hair above it so that
        // rounding in the other order of summation cannot cross it
        let mut bound = vec![0.0f32; qt.len() + 1];
        for i in (0..qt.len()).rev() {
            let (p, idf) = qt[i];
            let top = term_score(idf, p.max_tf as f32, p.min_len as f32, avg);
            bound[i] = bound[i + 1] + top * (1.0 + 1e-5);
        }
        let score = |slot: u32, from: usize| -> f32 {
            let len = self.doc_len.get(&slot).copied().unwrap_or(0) as f32;
            qt[from..]
                .iter()
                .filter_map(|(p, idf)| p.docs.get(&slot).map(|&tf| (tf as f32, *idf)))
                .map(|(tf, idf)| term_score(idf, tf, len, avg))
                .sum()
        };
        // min-heap of the best k: (score, slot) with the worse (lower score, higher slot) on top
        let mut best: BinaryHeap<Reverse<Ranked>> = BinaryHeap::with_capacity(k + 1);
        let mut seen: HashSet<u32> = HashSet::new();
        for i in 0..qt.len() {
            if best.len() == k && best.peek().is_some_and(|w| w.0.score > bound[i]) {
                break;
            }
            for &slot in qt[i].0.docs.keys() {
                if !seen.insert(slot) {
                    continue;
                }
                let r = Ranked {
                    score: score(slot, i),
                    slot,
                };
                if best.len() < k {
                    best.push(Reverse(r));
                } else if best.peek().is_some_and(|w| r > w.0) {
                    best.pop();
                    best.push(Reverse(r));
                }
            }
        }
        let mut out: Vec<(u32, f32)> = best.into_iter().map(|r| (r.0.slot, r.0.score)).collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }

    /// Every matching slot scored (the reference the tests hold [`Bm25::search`] to).
    #[cfg(test)]
    fn search_exhaustive(&self, query: &str, k: usize) -> Vec<(u32, f32)> {
        let n = self.doc_len.len() as f32;
        let avg = (self.total_len as f32 / n).max(1e-6);
        let mut scores: HashMap<u32, f32> = HashMap::new();
        // the same term order as the search, so that the sums round the same way
        for (p, idf) in self.query_terms(query) {
            for (&slot, &tf) in &p.docs {
                let len = self.doc_len.get(&slot).copied().unwrap_or(0) as f32;
                *scores.entry(slot).or_default() += term_score(idf, tf as f32, len, avg);
            }
        }
        let mut out: Vec<(u32, f32)> = scores.into_iter().collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out.truncate(k);
        out
    }
}

/// A scored slot: ordered by score, then the lower slot ranks higher.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ranked {
    score: f32,
    slot: u32,
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Ranked {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&o.score).then(o.slot.cmp(&self.slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maxscore_returns_exactly_what_scoring_everything_does() {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(3);
        let mut b = Bm25::default();
        // Zipf-like words: w0 is in most chunks, w300 in few
        let word = |r: &mut rand::rngs::StdRng| {
            let u: f64 = r.gen_range(0.0..1.0);
            format!("w{}", (u.powi(3) * 400.0) as u32)
        };
        for slot in 0..3000u32 {
            let text: Vec<String> = (0..r.gen_range(3..30)).map(|_| word(&mut r)).collect();
            b.insert(slot, &text.join(" "));
        }
        let check = |b: &Bm25, r: &mut rand::rngs::StdRng| {
            for _ in 0..300 {
                let q: Vec<String> = (0..r.gen_range(1..6)).map(|_| word(r)).collect();
                let q = q.join(" ");
                for k in [1, 10, 100] {
                    assert_eq!(b.search(&q, k), b.search_exhaustive(&q, k), "{q} k={k}");
                }
            }
        };
        check(&b, &mut r);
        // removals leave the terms' bounds loose, never wrong; replaced chunks move them
        for _ in 0..1500 {
            let slot = r.gen_range(0..3000u32);
            if r.gen_bool(0.5) {
                b.remove(slot);
            } else {
                let text: Vec<String> = (0..r.gen_range(1..60)).map(|_| word(&mut r)).collect();
                b.insert(slot, &text.join(" "));
            }
        }
        check(&b, &mut r);
    }

    #[test]
    fn ranks_matching_documents_first_and_forgets_removed() {
        let mut b = Bm25::default();
        b.insert(1, "The cat sat on the mat");
        b.insert(2, "Dogs chase cats; the dog barks");
        b.insert(3, "Quantum chromodynamics of gluons");
        let r = b.search("gluons quantum", 2);
        assert_eq!(r[0].0, 3);
        assert_eq!(r.len(), 1);
        let r = b.search("dog", 3);
        assert_eq!(r[0].0, 2);
        b.remove(3);
        assert!(b.search("gluons", 3).is_empty());
        assert_eq!(b.len(), 2);
        b.insert(2, "replaced text about gluons");
        assert!(b.search("dog", 3).is_empty());
        assert_eq!(b.search("gluons", 3)[0].0, 2);
    }
}
