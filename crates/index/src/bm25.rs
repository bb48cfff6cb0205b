//! A BM25 inverted index (k1 = 1.2, b = 0.75) over chunk slots.
use std::collections::HashMap;

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

/// Inverted index from terms to (slot, term frequency).
#[derive(Debug, Default, Clone)]
pub struct Bm25 {
    postings: HashMap<String, HashMap<u32, u32>>,
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
            self.postings.entry(t.clone()).or_default().insert(slot, *f);
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
                    p.remove(&slot);
                    if p.is_empty() {
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

    /// The `k` best slots for `query` with their scores, best first.
    pub fn search(&self, query: &str, k: usize) -> Vec<(u32, f32)> {
        let n = self.doc_len.len() as f32;
        if n == 0.0 || k == 0 {
            return Vec::new();
        }
        let avg = self.total_len as f32 / n;
        let mut q = terms(query);
        q.sort();
        q.dedup();
        let mut scores: HashMap<u32, f32> = HashMap::new();
        for t in &q {
            let Some(p) = self.postings.get(t) else {
                continue;
            };
            let df = p.len() as f32;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for (&slot, &tf) in p {
                let len = self.doc_len.get(&slot).copied().unwrap_or(0) as f32;
                let tf = tf as f32;
                let s = idf * tf * (K1 + 1.0) / (tf + K1 * (1.0 - B + B * len / avg.max(1e-6)));
                *scores.entry(slot).or_default() += s;
            }
        }
        let mut out: Vec<(u32, f32)> = scores.into_iter().collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out.truncate(k);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
