//! A BM25 inverted index (k1 = 1.2, b = 0.75) over chunk slots.
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

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

/// A term's postings: (slot, term frequency) sorted by slot, a removed slot's frequency set to
/// 0 (skipped, and dropped once they are the majority), with what bounds its contribution to a
/// score: its highest frequency and the shortest chunk it is in. Removals leave both as they
/// were (still bounds, only looser) until the term has no chunk left.
#[derive(Debug, Clone)]
struct Postings {
    list: Vec<(u32, u32)>,
    live: u32,
    max_tf: u32,
    min_len: u32,
}

impl Default for Postings {
    fn default() -> Self {
        Postings {
            list: Vec::new(),
            live: 0,
            max_tf: 0,
            min_len: u32::MAX,
        }
    }
}

impl Postings {
    fn add(&mut self, slot: u32, tf: u32, len: u32) {
        match self.list.last() {
            Some(&(last, _)) if last >= slot => {
                match self.list.binary_search_by_key(&slot, |p| p.0) {
                    Ok(i) => self.list[i].1 = tf,
                    Err(i) => self.list.insert(i, (slot, tf)),
                }
            }
            _ => self.list.push((slot, tf)),
        }
        self.live += 1;
        self.max_tf = self.max_tf.max(tf);
        self.min_len = self.min_len.min(len);
    }

    fn drop_slot(&mut self, slot: u32) {
        if let Ok(i) = self.list.binary_search_by_key(&slot, |p| p.0) {
            self.list[i].1 = 0;
            self.live -= 1;
        }
        if self.list.len() > 32 && self.list.len() > 2 * self.live as usize {
            self.list.retain(|p| p.1 > 0);
        }
    }
}

/// One term's BM25 contribution at frequency `tf` in a chunk of `len` terms.
fn term_score(idf: f32, tf: f32, len: f32, avg: f32) -> f32 {
    idf * tf * (K1 + 1.0) / (tf + K1 * (1.0 - B + B * len / avg))
}

/// Inverted index from terms to (slot, term frequency). Terms are interned and a slot keeps
/// only its length: a chunk costs its postings (8 bytes a distinct term); removing one takes
/// its text again (the chunk has it) to find its postings.
#[derive(Debug, Default, Clone)]
pub struct Bm25 {
    dict: HashMap<String, u32>,
    postings: Vec<Postings>,
    /// Slot -> its length in terms.
    docs: HashMap<u32, u32>,
    total_len: u64,
}

impl Bm25 {
    /// Indexes `text` under a slot that holds nothing (remove what it held first).
    pub fn insert(&mut self, slot: u32, text: &str) {
        self.insert_counts(slot, term_counts(text));
    }

    /// Indexes a chunk given its term counts (from [`term_counts`] or a snapshot) under a slot
    /// that holds nothing; a slot already indexed is left as it is (its old postings could not
    /// be found without its old text).
    pub fn insert_counts(&mut self, slot: u32, counts: Vec<(String, u32)>) {
        let ids = self.intern_counts(counts);
        self.insert_ids(slot, &ids);
    }

    /// Term counts with their terms as ids (added to the dictionary if new).
    pub(crate) fn intern_counts(&mut self, counts: Vec<(String, u32)>) -> Vec<(u32, u32)> {
        counts
            .into_iter()
            .map(|(t, f)| (self.intern(t), f))
            .collect()
    }

    /// The id of a term (added to the dictionary if new).
    pub(crate) fn intern(&mut self, term: String) -> u32 {
        let next = self.postings.len() as u32;
        let id = *self.dict.entry(term).or_insert(next);
        if id == next {
            self.postings.push(Postings::default());
        }
        id
    }

    /// [`Bm25::insert_counts`] with the terms as ids from [`Bm25::intern`].
    pub(crate) fn insert_ids(&mut self, slot: u32, ids: &[(u32, u32)]) {
        if self.docs.contains_key(&slot) {
            debug_assert!(false, "slot {slot} is indexed already");
            return;
        }
        let len: u32 = ids.iter().map(|(_, f)| *f).sum();
        for &(id, f) in ids {
            self.postings[id as usize].add(slot, f, len);
        }
        self.docs.insert(slot, len);
        self.total_len += len as u64;
    }

    /// Removes a slot, given the text it was indexed with.
    pub fn remove(&mut self, slot: u32, text: &str) {
        let Some(len) = self.docs.remove(&slot) else {
            return;
        };
        for (t, _) in term_counts(text) {
            if let Some(&id) = self.dict.get(&t) {
                let p = &mut self.postings[id as usize];
                p.drop_slot(slot);
                if p.live == 0 {
                    *p = Postings::default();
                }
            }
        }
        self.total_len -= len as u64;
    }

    /// Gives back the postings' spare capacity (after a bulk load).
    pub fn shrink(&mut self) {
        for p in &mut self.postings {
            p.list.shrink_to_fit();
        }
    }

    /// Slots indexed.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Bytes the index holds (postings, per-slot term lists, dictionary), roughly.
    pub fn memory_bytes(&self) -> usize {
        let postings: usize = self
            .postings
            .iter()
            .map(|p| p.list.capacity() * 8 + 32)
            .sum();
        let docs = self.docs.len() * 16;
        let dict: usize = self.dict.keys().map(|k| k.len() + 40).sum();
        postings + docs + dict
    }

    /// The distinct terms of `query` the index holds, as (postings, idf), rarest first.
    fn query_terms(&self, query: &str) -> Vec<(&Postings, f32)> {
        let n = self.docs.len() as f32;
        let mut q = terms(query);
        q.sort();
        q.dedup();
        let mut qt: Vec<(&Postings, f32)> = q
            .iter()
            .filter_map(|t| self.dict.get(t))
            .map(|&id| &self.postings[id as usize])
            .filter(|p| p.live > 0)
            .map(|p| {
                let df = p.live as f32;
                (p, (1.0 + (n - df + 0.5) / (df + 0.5)).ln())
            })
            .collect();
        qt.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.live.cmp(&b.0.live)));
        qt
    }

    /// The `k` best slots for `query` with their scores, best first (ties: lower slot first).
    ///
    /// Exact top-k without scoring every matching chunk. Each term is bounded by its
    /// contribution at its highest frequency in its shortest chunk, and one of two strategies
    /// runs, by an estimate of the postings each reads:
    /// - *rarest term first* (term at a time), when the rarest term's postings are short next
    ///   to the others: a chunk is scored when first met, its other terms looked up in their
    ///   sorted postings, unless its bound cannot reach the k-th best; once the k-th best passes
    ///   the bound of the terms left, the commoner terms' postings are never read;
    /// - *MaxScore* (document at a time), when every term is common: terms go in order of their
    ///   bounds, and those whose bounds together cannot lift a chunk past the k-th best so far
    ///   are non-essential: candidates come only from the other terms' postings and the
    ///   non-essential ones are looked up only while the chunk can still make the top k.
    pub fn search(&self, query: &str, k: usize) -> Vec<(u32, f32)> {
        self.search_by(query, k, None)
    }

    /// [`Bm25::search`] with the strategy forced (`Some(true)`: rarest term first) or chosen.
    fn search_by(&self, query: &str, k: usize, rare_first: Option<bool>) -> Vec<(u32, f32)> {
        let n = self.docs.len() as f32;
        if n == 0.0 || k == 0 {
            return Vec::new();
        }
        let avg = (self.total_len as f32 / n).max(1e-6);
        let qt = self.query_terms(query);
        if qt.is_empty() {
            return Vec::new();
        }
        // a hair above each bound, so that rounding in another order of summation cannot
        // cross it
        let bounds: Vec<f32> = qt
            .iter()
            .map(|(p, idf)| term_score(*idf, p.max_tf as f32, p.min_len as f32, avg) * (1.0 + 1e-5))
            .collect();
        let total: usize = qt.iter().map(|(p, _)| p.list.len()).sum();
        let rare_first = rare_first.unwrap_or(qt[0].0.list.len() * qt.len() * 8 < total);
        let best = if rare_first {
            self.rarest_first(&qt, &bounds, avg, k)
        } else {
            self.max_score(&qt, &bounds, avg, k)
        };
        best.into_sorted()
    }

    /// Term at a time, rarest first (see [`Bm25::search`]).
    fn rarest_first(&self, qt: &[(&Postings, f32)], bounds: &[f32], avg: f32, k: usize) -> TopK {
        // rest[i]: the most a chunk holding only terms i.. can score
        let mut rest = vec![0.0f32; qt.len() + 1];
        for i in (0..qt.len()).rev() {
            rest[i] = rest[i + 1] + bounds[i];
        }
        let holds = |p: &Postings, slot: u32| -> Option<u32> {
            p.list
                .binary_search_by_key(&slot, |x| x.0)
                .ok()
                .map(|at| p.list[at].1)
                .filter(|&tf| tf > 0)
        };
        let mut best = TopK::new(k);
        let mut contrib = vec![0.0f32; qt.len()];
        for i in 0..qt.len() {
            if best.kth().is_some_and(|t| t > rest[i]) {
                break;
            }
            let (p, idf) = qt[i];
            for &(slot, tf) in &p.list {
                // removed, or met in a rarer term's postings (scored then)
                if tf == 0 || qt[..i].iter().any(|(q, _)| holds(q, slot).is_some()) {
                    continue;
                }
                let len = self.docs.get(&slot).copied().unwrap_or(0) as f32;
                let own = term_score(idf, tf as f32, len, avg);
                if best.kth().is_some_and(|t| own + rest[i + 1] < t) {
                    continue;
                }
                contrib.iter_mut().for_each(|c| *c = 0.0);
                contrib[i] = own;
                for (j, (q, idf)) in qt.iter().enumerate().skip(i + 1) {
                    if let Some(tf) = holds(q, slot) {
                        contrib[j] = term_score(*idf, tf as f32, len, avg);
                    }
                }
                best.offer(Ranked {
                    score: contrib.iter().sum(),
                    slot,
                });
            }
        }
        best
    }

    /// Document at a time, MaxScore (see [`Bm25::search`]).
    fn max_score(&self, qt: &[(&Postings, f32)], bounds: &[f32], avg: f32, k: usize) -> TopK {
        // cursors ordered by bound, smallest first; each remembers its term's place in `qt`
        // (scores are summed in that order, as the exhaustive reference does)
        let mut cur: Vec<Cursor> = qt
            .iter()
            .enumerate()
            .map(|(i, (p, idf))| Cursor {
                list: &p.list,
                at: 0,
                idf: *idf,
                bound: bounds[i],
                term: i,
            })
            .collect();
        cur.sort_by(|a, b| a.bound.total_cmp(&b.bound).then(a.term.cmp(&b.term)));
        for c in &mut cur {
            c.skip_dead();
        }
        // below[i]: the sum of the bounds of cursors 0..i
        let mut below = vec![0.0f32; cur.len() + 1];
        for i in 0..cur.len() {
            below[i + 1] = below[i] + cur[i].bound;
        }
        let mut best = TopK::new(k);
        // cursors 0..essential are non-essential: together they cannot reach the threshold
        let mut essential = 0;
        let mut contrib = vec![0.0f32; qt.len()];
        while let Some(slot) = cur[essential..].iter().filter_map(Cursor::slot).min() {
            let len = self.docs.get(&slot).copied().unwrap_or(0) as f32;
            contrib.iter_mut().for_each(|c| *c = 0.0);
            let mut partial = 0.0f32;
            for c in &mut cur[essential..] {
                if c.slot() == Some(slot) {
                    let s = term_score(c.idf, c.tf() as f32, len, avg);
                    contrib[c.term] = s;
                    partial += s;
                    c.advance();
                }
            }
            let threshold = best.kth();
            let mut alive = true;
            for i in (0..essential).rev() {
                if threshold.is_some_and(|t| partial + below[i + 1] <= t) {
                    alive = false;
                    break;
                }
                let c = &mut cur[i];
                if c.seek(slot) {
                    let s = term_score(c.idf, c.tf() as f32, len, avg);
                    contrib[c.term] = s;
                    partial += s;
                }
            }
            if !alive {
                continue;
            }
            let r = Ranked {
                score: contrib.iter().sum(),
                slot,
            };
            if !best.offer(r) {
                continue;
            }
            if let Some(t) = best.kth() {
                while essential < cur.len() && below[essential + 1] <= t {
                    essential += 1;
                }
                if essential == cur.len() {
                    break;
                }
            }
        }
        best
    }

    /// Every matching slot scored (the reference the tests hold [`Bm25::search`] to).
    #[cfg(test)]
    fn search_exhaustive(&self, query: &str, k: usize) -> Vec<(u32, f32)> {
        let n = self.docs.len() as f32;
        let avg = (self.total_len as f32 / n).max(1e-6);
        let qt = self.query_terms(query);
        let mut scores: HashMap<u32, Vec<f32>> = HashMap::new();
        for (i, (p, idf)) in qt.iter().enumerate() {
            for &(slot, tf) in p.list.iter().filter(|p| p.1 > 0) {
                let len = self.docs[&slot] as f32;
                scores.entry(slot).or_insert_with(|| vec![0.0; qt.len()])[i] =
                    term_score(*idf, tf as f32, len, avg);
            }
        }
        // summed in the terms' order, as the search sums them
        let mut out: Vec<(u32, f32)> = scores
            .into_iter()
            .map(|(slot, c)| (slot, c.iter().sum()))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out.truncate(k);
        out
    }
}

/// A query term's place in its postings during a search.
struct Cursor<'a> {
    list: &'a [(u32, u32)],
    at: usize,
    idf: f32,
    bound: f32,
    /// Its index among the query's terms.
    term: usize,
}

impl Cursor<'_> {
    fn slot(&self) -> Option<u32> {
        self.list.get(self.at).map(|p| p.0)
    }

    fn tf(&self) -> u32 {
        self.list[self.at].1
    }

    /// Past removed slots.
    fn skip_dead(&mut self) {
        while self.list.get(self.at).is_some_and(|p| p.1 == 0) {
            self.at += 1;
        }
    }

    fn advance(&mut self) {
        self.at += 1;
        self.skip_dead();
    }

    /// Moves to the first live posting at or after `slot` (galloping, then binary search);
    /// whether it is at `slot`.
    fn seek(&mut self, slot: u32) -> bool {
        if self.slot().is_none_or(|s| s >= slot) {
            return self.slot() == Some(slot);
        }
        let mut step = 1;
        let mut lo = self.at;
        while lo + step < self.list.len() && self.list[lo + step].0 < slot {
            lo += step;
            step *= 2;
        }
        let hi = (lo + step + 1).min(self.list.len());
        self.at = lo + self.list[lo..hi].partition_point(|p| p.0 < slot);
        self.skip_dead();
        self.slot() == Some(slot)
    }
}

/// The best `k` scored slots so far: a min-heap with the worst (lower score, higher slot) on top.
struct TopK {
    heap: BinaryHeap<Reverse<Ranked>>,
    k: usize,
}

impl TopK {
    fn new(k: usize) -> TopK {
        TopK {
            heap: BinaryHeap::with_capacity(k + 1),
            k,
        }
    }

    /// The k-th best score, once there are k.
    fn kth(&self) -> Option<f32> {
        (self.heap.len() == self.k).then(|| self.heap.peek().map_or(f32::MIN, |w| w.0.score))
    }

    /// Keeps `r` if it is among the best k so far; whether it was kept.
    fn offer(&mut self, r: Ranked) -> bool {
        if self.heap.len() < self.k {
            self.heap.push(Reverse(r));
        } else if self.heap.peek().is_some_and(|w| r > w.0) {
            self.heap.pop();
            self.heap.push(Reverse(r));
        } else {
            return false;
        }
        true
    }

    /// (slot, score), best first (ties: lower slot first).
    fn into_sorted(self) -> Vec<(u32, f32)> {
        let mut out: Vec<(u32, f32)> = self
            .heap
            .into_iter()
            .map(|r| (r.0.slot, r.0.score))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
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
        let mut texts: HashMap<u32, String> = HashMap::new();
        // Zipf-like words: w0 is in most chunks, w300 in few
        let word = |r: &mut rand::rngs::StdRng| {
            let u: f64 = r.gen_range(0.0..1.0);
            format!("w{}", (u.powi(3) * 400.0) as u32)
        };
        for slot in 0..3000u32 {
            let text: Vec<String> = (0..r.gen_range(3..30)).map(|_| word(&mut r)).collect();
            b.insert(slot, &text.join(" "));
            texts.insert(slot, text.join(" "));
        }
        let check = |b: &Bm25, r: &mut rand::rngs::StdRng| {
            for _ in 0..300 {
                let q: Vec<String> = (0..r.gen_range(1..6)).map(|_| word(r)).collect();
                let q = q.join(" ");
                for k in [1, 10, 100] {
                    let want = b.search_exhaustive(&q, k);
                    assert_eq!(
                        b.search_by(&q, k, Some(true)),
                        want,
                        "rarest first: {q} k={k}"
                    );
                    assert_eq!(b.search_by(&q, k, Some(false)), want, "MaxScore: {q} k={k}");
                    assert_eq!(b.search(&q, k), want, "{q} k={k}");
                }
            }
        };
        check(&b, &mut r);
        // removals leave the terms' bounds loose, never wrong; replaced chunks move them
        for _ in 0..1500 {
            let slot = r.gen_range(0..3000u32);
            if let Some(old) = texts.remove(&slot) {
                b.remove(slot, &old);
            }
            if r.gen_bool(0.5) {
                let text: Vec<String> = (0..r.gen_range(1..60)).map(|_| word(&mut r)).collect();
                b.insert(slot, &text.join(" "));
                texts.insert(slot, text.join(" "));
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
        b.remove(3, "Quantum chromodynamics of gluons");
        assert!(b.search("gluons", 3).is_empty());
        assert_eq!(b.len(), 2);
        b.remove(2, "Dogs chase cats; the dog barks");
        b.insert(2, "replaced text about gluons");
        assert!(b.search("dog", 3).is_empty());
        assert_eq!(b.search("gluons", 3)[0].0, 2);
    }
}
