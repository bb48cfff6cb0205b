//! A BM25 inverted index (k1 = 1.2, b = 0.75) over chunk slots.
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::postings::{TermList, BLOCK};

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
/// score as one block: its highest frequency and the shortest chunk it is in. Removals leave
/// the bound as it was (still a bound, only looser) until the term has no chunk left.
#[derive(Debug, Clone)]
struct Postings {
    list: Vec<[u32; 2]>,
    live: u32,
    /// (last slot: any, highest frequency, shortest length).
    bound: [[u32; 3]; 1],
}

impl Default for Postings {
    fn default() -> Self {
        Postings {
            list: Vec::new(),
            live: 0,
            bound: [[u32::MAX, 0, u32::MAX]],
        }
    }
}

impl Postings {
    fn add(&mut self, slot: u32, tf: u32, len: u32) {
        match self.list.last() {
            Some(&[last, _]) if last >= slot => {
                match self.list.binary_search_by_key(&slot, |p| p[0]) {
                    Ok(i) => self.list[i][1] = tf,
                    Err(i) => self.list.insert(i, [slot, tf]),
                }
            }
            _ => self.list.push([slot, tf]),
        }
        self.live += 1;
        let b = &mut self.bound[0];
        b[1] = b[1].max(tf);
        b[2] = b[2].min(len);
    }

    fn drop_slot(&mut self, slot: u32) {
        if let Ok(i) = self.list.binary_search_by_key(&slot, |p| p[0]) {
            self.list[i][1] = 0;
            self.live -= 1;
        }
        if self.list.len() > 32 && self.list.len() > 2 * self.live as usize {
            self.list.retain(|p| p[1] > 0);
        }
    }

    fn as_list(&self) -> TermList<'_> {
        let [_, max_tf, min_len] = self.bound[0];
        TermList {
            pairs: &self.list,
            blocks: &self.bound,
            df: self.live,
            max_tf,
            min_len,
            hi: None,
        }
    }
}

/// One term's BM25 contribution at frequency `tf` in a chunk of `len` terms.
fn term_score(idf: f32, tf: f32, len: f32, avg: f32) -> f32 {
    idf * tf * (K1 + 1.0) / (tf + K1 * (1.0 - B + B * len / avg))
}

/// Inverted index from terms to (slot, term frequency), in memory: the growing segment's (a
/// sealed segment's postings are in its mapped file, [`crate::postings`]). Terms are interned
/// and a slot keeps only its length: a chunk costs its postings (8 bytes a distinct term);
/// removing one takes its text again (the chunk has it) to find its postings.
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

    /// Indexes a chunk given its term counts (from [`term_counts`]) under a slot that holds
    /// nothing; a slot already indexed is left as it is (its old postings could not be found
    /// without its old text).
    pub fn insert_counts(&mut self, slot: u32, counts: Vec<(String, u32)>) {
        let ids: Vec<(u32, u32)> = counts
            .into_iter()
            .map(|(t, f)| (self.intern(t), f))
            .collect();
        self.insert_ids(slot, &ids);
    }

    /// The id of a term (added to the dictionary if new).
    fn intern(&mut self, term: String) -> u32 {
        let next = self.postings.len() as u32;
        let id = *self.dict.entry(term).or_insert(next);
        if id == next {
            self.postings.push(Postings::default());
        }
        id
    }

    /// [`Bm25::insert_counts`] with the terms as ids from [`Bm25::intern`].
    fn insert_ids(&mut self, slot: u32, ids: &[(u32, u32)]) {
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

    /// Removes a slot, given the text it was indexed with (a slot not indexed here: nothing).
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

    /// Slots indexed.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Bytes the index holds (postings, per-slot lengths, dictionary), roughly.
    pub fn memory_bytes(&self) -> usize {
        let postings: usize = self
            .postings
            .iter()
            .map(|p| p.list.capacity() * 8 + 40)
            .sum();
        let docs = self.docs.len() * 16;
        let dict: usize = self.dict.keys().map(|k| k.len() + 40).sum();
        postings + docs + dict
    }

    /// This index as one source of a search for the terms of [`query_terms`].
    pub(crate) fn source(&self, terms: &[String]) -> Source<'_> {
        Source {
            lists: terms
                .iter()
                .map(|t| {
                    self.dict
                        .get(t)
                        .map(|&id| &self.postings[id as usize])
                        .filter(|p| p.live > 0)
                        .map(Postings::as_list)
                })
                .collect(),
            rows: self.docs.len() as u64,
            total_len: self.total_len,
            len_of: Box::new(|slot| self.docs.get(&slot).copied().unwrap_or(0)),
            // removed slots' postings are zeroed, never met
            live: Box::new(|_| true),
        }
    }

    /// The `k` best slots for `query` with their scores, best first (ties: lower slot first),
    /// exact, without scoring every matching chunk (see [`search_sources`]).
    pub fn search(&self, query: &str, k: usize) -> Vec<(u32, f32)> {
        let terms = query_terms(query);
        search_sources(&[self.source(&terms)], k)
            .into_iter()
            .map(|(_, slot, s)| (slot, s))
            .collect()
    }
}

/// The distinct terms of a query, sorted: the order of [`Source::lists`].
pub(crate) fn query_terms(query: &str) -> Vec<String> {
    let mut q = terms(query);
    q.sort();
    q.dedup();
    q
}

/// Where a search reads postings: the growing segment's in-memory index, or a sealed segment's
/// postings file. Rows are slots or the segment's positions.
pub(crate) struct Source<'a> {
    /// Each query term's postings here (in the order of [`query_terms`]).
    pub(crate) lists: Vec<Option<TermList<'a>>>,
    /// Rows its statistics count (a sealed segment: dead ones too, until a compaction).
    pub(crate) rows: u64,
    /// Their lengths in terms, summed.
    pub(crate) total_len: u64,
    /// A row's length in terms.
    pub(crate) len_of: Box<dyn Fn(u32) -> u32 + 'a>,
    /// Whether a row may be returned (asked only of rows that would enter the top k).
    pub(crate) live: Box<dyn Fn(u32) -> bool + 'a>,
}

/// The longest list of a source's weightiest term that [`Plan::seed`] scores whole.
const WHOLE_SEED: usize = 1 << 14;

/// What every source of one search shares: the query's terms with a document frequency (in
/// the order their scores are summed: highest idf first), their idf and the average length.
struct Plan {
    /// (index into `Source::lists`, idf).
    terms: Vec<(usize, f32)>,
    avg: f32,
}

impl Plan {
    fn new(sources: &[Source<'_>]) -> Option<Plan> {
        let n: u64 = sources.iter().map(|s| s.rows).sum();
        if n == 0 {
            return None;
        }
        let total: u64 = sources.iter().map(|s| s.total_len).sum();
        let avg = (total as f32 / n as f32).max(1e-6);
        let width = sources.first().map_or(0, |s| s.lists.len());
        let mut terms: Vec<(usize, f32, u64)> = (0..width)
            .filter_map(|t| {
                let df: u64 = sources
                    .iter()
                    .filter_map(|s| s.lists[t].as_ref())
                    .map(|l| l.df as u64)
                    .sum();
                let (n, df) = (n as f32, df as f32);
                (df > 0.0).then(|| (t, (1.0 + (n - df + 0.5) / (df + 0.5)).ln(), df as u64))
            })
            .collect();
        terms.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)).then(a.0.cmp(&b.0)));
        (!terms.is_empty()).then(|| Plan {
            terms: terms.into_iter().map(|(t, idf, _)| (t, idf)).collect(),
            avg,
        })
    }

    /// The most a term of `idf` adds at frequency `tf` in a chunk of `len` terms or more, a
    /// hair above, so that rounding in another order of summation cannot cross it.
    fn bound(&self, idf: f32, tf: u32, len: u32) -> f32 {
        term_score(idf, tf as f32, len as f32, self.avg) * (1.0 + 1e-5)
    }

    /// A row's score in `src` from each term's frequency there, summed in the plan's order.
    fn score(&self, src: &Source<'_>, row: u32, tf: impl Fn(usize) -> u32) -> f32 {
        let len = (src.len_of)(row) as f32;
        self.terms
            .iter()
            .enumerate()
            .map(|(pos, &(_, idf))| match tf(pos) {
                0 => 0.0,
                f => term_score(idf, f as f32, len, self.avg),
            })
            .sum()
    }

    /// Offers rows of the source's weightiest terms before the document-at-a-time pass, so
    /// that it starts with a threshold. When the weightiest term's list holds at most
    /// `whole_seed` postings, every chunk in it is scored ([`Plan::whole`]) and the term is
    /// done in this source (its rows are in `seen`); so is the next weightiest term's while
    /// its list is that short too and the terms not yet done can together still lift a chunk
    /// past the k-th best. The pass then goes on without the terms done: a chunk it can still
    /// find lacks them, so its score is bounded by the other terms alone, and when they cannot
    /// reach the k-th best together the source is done. When the weightiest list is longer,
    /// its first k chunks are offered (scored by lookups) and no term is done. The terms done.
    fn seed(
        &self,
        s: usize,
        src: &Source<'_>,
        best: &mut TopK,
        seen: &mut Vec<u64>,
        whole_seed: usize,
    ) -> Vec<usize> {
        let lists: Vec<Option<TermList<'_>>> =
            self.terms.iter().map(|&(t, _)| src.lists[t]).collect();
        // (bound, position), weightiest first
        let mut order: Vec<(f32, usize)> = lists
            .iter()
            .enumerate()
            .filter_map(|(pos, l)| {
                let l = l.as_ref()?;
                let (tf, len) = l.bound();
                Some((self.bound(self.terms[pos].1, tf, len), pos))
            })
            .collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let Some(&(_, first)) = order.first() else {
            return Vec::new();
        };
        let list = lists[first].expect("a list");
        if list.pairs.len() > whole_seed {
            // its rows of high frequency first, when the list has them apart
            let mut offered = 0;
            let top = list.hi.and_then(|h| h.tiers().last());
            for &[row, tf] in top.map_or(list.pairs, |t| t.pairs) {
                if offered == best.k {
                    break;
                }
                if tf == 0 {
                    continue;
                }
                let r = Ranked {
                    score: self.score(src, row, |p| lists[p].map_or(0, |l| l.tf_at(row))),
                    key: key(s, row),
                };
                offered += 1;
                seen.push(r.key);
                if best.accepts(&r) && (src.live)(row) {
                    best.offer(r);
                }
            }
            return Vec::new();
        }
        let mut done = Vec::new();
        let mut left: f32 = order.iter().map(|o| o.0).sum();
        for &(bound, pos) in &order {
            let list = lists[pos].expect("a list");
            if list.pairs.len() > whole_seed || best.kth().is_some_and(|t| left <= t) {
                break;
            }
            self.whole(s, src, best, seen, &lists, pos, &done);
            done.push(pos);
            left -= bound;
        }
        done
    }

    /// Scores every chunk of the term at `pos` in this source that holds none of the terms
    /// `done` (those were scored whole before), the other terms looked up weightiest first
    /// while the chunk can still make the top k; each goes into `seen`.
    #[allow(clippy::too_many_arguments)]
    fn whole(
        &self,
        s: usize,
        src: &Source<'_>,
        best: &mut TopK,
        seen: &mut Vec<u64>,
        lists: &[Option<TermList<'_>>],
        pos: usize,
        done: &[usize],
    ) {
        let cursors = |keep: &dyn Fn(usize) -> bool| -> Vec<Cursor<'_>> {
            lists
                .iter()
                .enumerate()
                .filter(|&(p, _)| keep(p))
                .filter_map(|(p, l)| {
                    let list = l.filter(|l| !l.pairs.is_empty())?;
                    Some(Cursor::new(list, self.terms[p].1, p, self))
                })
                .collect()
        };
        let mut before = cursors(&|p| done.contains(&p));
        // the other terms, each as its list's tiers of higher frequencies (when split) and the
        // rest of it, highest bound first (a row is in one of them); the terms in order of
        // their highest bounds
        let mut others: Vec<Cursor<'_>> = Vec::with_capacity(lists.len() * 4);
        let mut split = false;
        for (p, l) in lists.iter().enumerate() {
            let Some(list) = l.filter(|l| !l.pairs.is_empty() && p != pos && !done.contains(&p))
            else {
                continue;
            };
            let idf = self.terms[p].1;
            let cap = list.hi.map_or(u32::MAX, |h| h.cut());
            others.push(Cursor::capped(list, idf, p, self, cap));
            if let Some(h) = list.hi {
                split = true;
                others.extend(h.tiers().map(|l| Cursor::new(l, idf, p, self)));
            }
        }
        let mut lead = Vec::new();
        let mut next: Vec<Option<f32>> = Vec::new();
        let rest: f32 = if split {
            lead = vec![0.0f32; self.terms.len()];
            for c in &others {
                lead[c.pos] = lead[c.pos].max(c.bound);
            }
            others.sort_by(|a, b| {
                (lead[b.pos].total_cmp(&lead[a.pos]).then(a.pos.cmp(&b.pos)))
                    .then(b.bound.total_cmp(&a.bound))
            });
            // (the bound of the next cursor of the same term, when there is one)
            next = (0..others.len())
                .map(|i| {
                    others
                        .get(i + 1)
                        .filter(|n| n.pos == others[i].pos)
                        .map(|n| n.bound)
                })
                .collect();
            lead.iter().sum()
        } else {
            others.sort_by(|a, b| b.bound.total_cmp(&a.bound).then(a.pos.cmp(&b.pos)));
            others.iter().map(|c| c.bound).sum()
        };
        let list = lists[pos].expect("a list");
        let idf = self.terms[pos].1;
        let mut contrib = vec![0u32; self.terms.len()];
        'rows: for &[row, tf] in list.pairs {
            if tf == 0 || before.iter_mut().any(|c| c.seek(row)) {
                continue;
            }
            seen.push(key(s, row));
            // bounded by the list's shortest length (a row's own length is a read at a random
            // place), then the other terms looked up weightiest first while the row can still
            // make it
            let threshold = best.kth();
            let mut most = self.bound(idf, tf, list.min_len) + rest;
            if threshold.is_some_and(|t| most <= t) {
                continue;
            }
            contrib.iter_mut().for_each(|c| *c = 0);
            contrib[pos] = tf;
            if !split {
                // (no list split: one cursor a term, the loop kept lean)
                for c in &mut others {
                    most -= c.bound;
                    if c.seek(row) {
                        contrib[c.pos] = c.tf();
                        c.block_bound(self);
                        most += c.row_bound();
                    }
                    if threshold.is_some_and(|t| most <= t) {
                        continue 'rows;
                    }
                }
            } else {
                let mut found = usize::MAX;
                let mut term = usize::MAX;
                for (c, next) in others.iter_mut().zip(&next) {
                    if c.pos != term {
                        // a term's first (highest) cursor: the term's bound out of the sum
                        term = c.pos;
                        most -= lead[term];
                    } else if found == term {
                        // found in a tier of it already
                        continue;
                    }
                    if c.seek(row) {
                        found = term;
                        contrib[term] = c.tf();
                        c.block_bound(self);
                        most += c.row_bound();
                    } else if let Some(n) = next {
                        // not in this tier: the term's bound is the next one's
                        if threshold.is_some_and(|t| most + n <= t) {
                            continue 'rows;
                        }
                        continue;
                    }
                    if threshold.is_some_and(|t| most <= t) {
                        continue 'rows;
                    }
                }
            }
            let r = Ranked {
                score: self.score(src, row, |p| contrib[p]),
                key: key(s, row),
            };
            if best.accepts(&r) && (src.live)(row) {
                best.offer(r);
            }
        }
    }

    /// Block-max MaxScore over one source, document at a time. Terms go in order of their
    /// bounds here; those whose bounds together cannot lift a row past the k-th best so far are
    /// non-essential: rows come only from the other terms' postings, and the non-essential
    /// ones are looked up only while the row can still make the top k. Before a row is scored,
    /// the essential terms' block summaries bound every row up to the nearest block end: when
    /// that cannot reach the k-th best, the whole window is skipped. `done`: the terms the
    /// seeding scored whole in this source, left out.
    fn daat(&self, s: usize, src: &Source<'_>, best: &mut TopK, seen: &[u64], done: &[usize]) {
        // a split list: the rest of it, and its tiers of higher frequencies
        let mut cur: Vec<Cursor<'_>> = Vec::with_capacity(self.terms.len() * 4);
        for (pos, &(t, idf)) in self.terms.iter().enumerate() {
            let Some(list) = src.lists[t].filter(|l| !l.pairs.is_empty() && !done.contains(&pos))
            else {
                continue;
            };
            let cap = list.hi.map_or(u32::MAX, |h| h.cut());
            cur.push(Cursor::capped(list, idf, pos, self, cap));
            if let Some(h) = list.hi {
                cur.extend(h.tiers().map(|l| Cursor::new(l, idf, pos, self)));
            }
        }
        cur.iter_mut().for_each(Cursor::skip_dead);
        cur.sort_by(|a, b| a.bound.total_cmp(&b.bound).then(a.pos.cmp(&b.pos)));
        // below[i]: the sum of the bounds of cursors 0..i
        // (a term's cursors hold disjoint rows: it counts once, at its highest bound so far)
        let mut below = vec![0.0f32; cur.len() + 1];
        let mut most = vec![0.0f32; self.terms.len()];
        for i in 0..cur.len() {
            let c = &cur[i];
            below[i + 1] = below[i] + (c.bound - most[c.pos]).max(0.0);
            most[c.pos] = most[c.pos].max(c.bound);
        }
        let raise = |essential: &mut usize, t: f32| {
            while *essential < below.len() - 1 && below[*essential + 1] <= t {
                *essential += 1;
            }
        };
        // cursors 0..essential are non-essential
        let mut essential = 0;
        if let Some(t) = best.kth() {
            raise(&mut essential, t);
        }
        let mut contrib = vec![0u32; self.terms.len()];
        while essential < cur.len() {
            let Some(pivot) = cur[essential..].iter().filter_map(Cursor::row).min() else {
                break;
            };
            if let Some(t) = best.kth() {
                let mut window = below[essential];
                let mut upto = u32::MAX;
                for c in cur[essential..].iter_mut().filter(|c| c.row().is_some()) {
                    window += c.block_bound(self);
                    upto = upto.min(c.block()[0]);
                }
                if window <= t {
                    if upto == u32::MAX {
                        break;
                    }
                    for c in &mut cur[essential..] {
                        c.seek(upto + 1);
                    }
                    continue;
                }
            }
            let threshold = best.kth();
            // the essential terms' frequencies here, bounded by their blocks' shortest lengths
            // first: when even that cannot lift the row past the k-th best, its length (a read
            // at a random place) is not needed
            if let Some(t) = threshold {
                let mut most = below[essential];
                for c in &mut cur[essential..] {
                    if c.row() == Some(pivot) {
                        c.block_bound(self);
                        most += c.row_bound();
                    }
                }
                if most <= t {
                    for c in &mut cur[essential..] {
                        if c.row() == Some(pivot) {
                            c.advance();
                        }
                    }
                    continue;
                }
            }
            let len = (src.len_of)(pivot);
            contrib.iter_mut().for_each(|c| *c = 0);
            let mut partial = 0.0f32;
            for c in &mut cur[essential..] {
                if c.row() == Some(pivot) {
                    contrib[c.pos] = c.tf();
                    partial += term_score(c.idf, c.tf() as f32, len as f32, self.avg);
                    c.advance();
                }
            }
            let mut alive = true;
            for i in (0..essential).rev() {
                if threshold.is_some_and(|t| partial + below[i + 1] <= t) {
                    alive = false;
                    break;
                }
                // a term found already is not looked up again (its tiers and the rest of its
                // list hold disjoint rows); its tiers are looked up before the rest (their
                // bounds are higher), each only while the row can still make it
                let c = &mut cur[i];
                if contrib[c.pos] != 0 {
                    continue;
                }
                if c.seek(pivot) {
                    contrib[c.pos] = c.tf();
                    partial += term_score(c.idf, c.tf() as f32, len as f32, self.avg);
                }
            }
            if !alive {
                continue;
            }
            let r = Ranked {
                score: self.score(src, pivot, |p| contrib[p]),
                key: key(s, pivot),
            };
            // liveness (a lookup by document id) only for rows that would enter
            if best.accepts(&r) && seen.binary_search(&r.key).is_err() && (src.live)(pivot) {
                best.offer(r);
                if let Some(t) = best.kth() {
                    raise(&mut essential, t);
                }
            }
        }
    }
}

/// A row's place in the ranking: its source, then the row.
fn key(source: usize, row: u32) -> u64 {
    ((source as u64) << 32) | row as u64
}

/// The exact `k` best rows of `sources` for the query terms their lists were made for, as
/// (source, row, score), best first (ties: lower source, then lower row), without scoring
/// every matching row: scores use the statistics of all sources together (chunk count,
/// average length, document frequencies), each term bounded by its highest frequency in its
/// shortest chunk, per block of postings and per list. Each source is first seeded with its
/// weightiest term's rows (all of them when they are few, [`Plan::seed`]), then searched by
/// block-max MaxScore ([`Plan::daat`]), the k-th best score carried from one source to the
/// next.
pub(crate) fn search_sources(sources: &[Source<'_>], k: usize) -> Vec<(usize, u32, f32)> {
    search_seeded(sources, k, WHOLE_SEED)
}

/// [`search_sources`], a weightiest term's list scored whole in the seeding when it holds at
/// most `whole_seed` postings.
fn search_seeded(sources: &[Source<'_>], k: usize, whole_seed: usize) -> Vec<(usize, u32, f32)> {
    let Some(plan) = Plan::new(sources).filter(|_| k > 0) else {
        return Vec::new();
    };
    let mut best = TopK::new(k);
    // the seeded rows (offered already), sorted
    let mut seen = Vec::new();
    let done: Vec<Vec<usize>> = sources
        .iter()
        .enumerate()
        .map(|(s, src)| plan.seed(s, src, &mut best, &mut seen, whole_seed))
        .collect();
    seen.sort_unstable();
    for (s, src) in sources.iter().enumerate() {
        plan.daat(s, src, &mut best, &seen, &done[s]);
    }
    best.into_sorted()
        .into_iter()
        .map(|(key, score)| ((key >> 32) as usize, key as u32, score))
        .collect()
}

/// Every matching live row scored (the reference the tests hold [`search_sources`] to).
#[cfg(test)]
pub(crate) fn search_exhaustive(sources: &[Source<'_>], k: usize) -> Vec<(usize, u32, f32)> {
    let Some(plan) = Plan::new(sources) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (s, src) in sources.iter().enumerate() {
        let mut tfs: HashMap<u32, Vec<u32>> = HashMap::new();
        for (pos, &(t, _)) in plan.terms.iter().enumerate() {
            for &[row, tf] in src.lists[t].map_or(&[][..], |l| l.pairs) {
                if tf > 0 {
                    tfs.entry(row).or_insert_with(|| vec![0; plan.terms.len()])[pos] = tf;
                }
            }
        }
        for (row, tf) in tfs {
            if (src.live)(row) {
                out.push((s, row, plan.score(src, row, |p| tf[p])));
            }
        }
    }
    out.sort_by(|a, b| b.2.total_cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
    out.truncate(k);
    out
}

/// A query term's place in its postings during a search.
struct Cursor<'a> {
    list: TermList<'a>,
    at: usize,
    idf: f32,
    /// Its bound over the whole list.
    bound: f32,
    /// Its position in the plan's terms.
    pos: usize,
    /// The block [`Cursor::block_bound`] last summed up (`usize::MAX`: none yet), its bound
    /// and the length part of term_score's denominator at its shortest length.
    blk: usize,
    blk_bound: f32,
    blk_norm: f32,
    /// Postings of this frequency or more are passed over (another cursor walks them, see
    /// [`crate::postings::Split`]).
    cap: u32,
}

impl<'a> Cursor<'a> {
    fn new(list: TermList<'a>, idf: f32, pos: usize, plan: &Plan) -> Cursor<'a> {
        Cursor::capped(list, idf, pos, plan, u32::MAX)
    }

    /// A cursor over the postings of `list` whose frequency is below `cap` (above 1).
    fn capped(list: TermList<'a>, idf: f32, pos: usize, plan: &Plan, cap: u32) -> Cursor<'a> {
        let (tf, len) = list.bound();
        Cursor {
            list,
            at: 0,
            idf,
            bound: plan.bound(idf, tf.min(cap - 1), len),
            pos,
            blk: usize::MAX,
            blk_bound: 0.0,
            blk_norm: 0.0,
            cap,
        }
    }

    /// The bound of the cursor's block (its highest frequency at its shortest length),
    /// summed up once a block rather than at every row.
    fn block_bound(&mut self, plan: &Plan) -> f32 {
        let b = (self.at / BLOCK).min(self.list.blocks.len() - 1);
        if b != self.blk {
            let [_, tf, len] = self.list.blocks[b];
            self.blk = b;
            self.blk_bound = plan.bound(self.idf, tf.min(self.cap - 1), len);
            self.blk_norm = K1 * (1.0 - B + B * len as f32 / plan.avg);
        }
        self.blk_bound
    }

    /// The most the term adds at the current posting's frequency in a row of its block's
    /// shortest length or longer (after [`Cursor::block_bound`] for this block), a hair above
    /// as [`Plan::bound`].
    fn row_bound(&self) -> f32 {
        let tf = self.tf() as f32;
        self.idf * tf * (K1 + 1.0) / (tf + self.blk_norm) * (1.0 + 2e-5)
    }

    fn row(&self) -> Option<u32> {
        self.list.pairs.get(self.at).map(|p| p[0])
    }

    fn tf(&self) -> u32 {
        self.list.pairs[self.at][1]
    }

    /// The summary of the block the cursor is in: (last row, highest frequency, shortest
    /// length).
    fn block(&self) -> [u32; 3] {
        let b = &self.list.blocks;
        b[(self.at / BLOCK).min(b.len() - 1)]
    }

    /// Past removed slots (and postings at or above the cap).
    fn skip_dead(&mut self) {
        // (tf == 0 or tf >= cap, in one comparison: cap is above 1)
        let above = self.cap - 1;
        while self
            .list
            .pairs
            .get(self.at)
            .is_some_and(|p| p[1].wrapping_sub(1) >= above)
        {
            self.at += 1;
        }
    }

    fn advance(&mut self) {
        self.at += 1;
        self.skip_dead();
    }

    /// Moves to the first live posting at or after `row`; whether it is at `row`. A list
    /// with block summaries first finds the block by their last rows when `row` is past the
    /// cursor's block (galloping over the summaries: a few cache lines for a whole list);
    /// then the posting is found by galloping from the cursor (or the block's start) within
    /// the block (or the list), then binary search.
    fn seek(&mut self, row: u32) -> bool {
        let list = self.list.pairs;
        if self.row().is_none_or(|r| r >= row) {
            return self.row() == Some(row);
        }
        let blocks = self.list.blocks;
        let (mut lo, end) = if blocks.len() > 1 && blocks.len() == list.len().div_ceil(BLOCK) {
            let mut b = self.at / BLOCK;
            if blocks[b][0] < row {
                let mut step = 1;
                while b + step < blocks.len() && blocks[b + step][0] < row {
                    b += step;
                    step *= 2;
                }
                let end = (b + step + 1).min(blocks.len());
                b += blocks[b..end].partition_point(|x| x[0] < row);
                if b == blocks.len() {
                    self.at = list.len();
                    return false;
                }
            }
            (self.at.max(b * BLOCK), ((b + 1) * BLOCK).min(list.len()))
        } else {
            (self.at, list.len())
        };
        // galloping from `lo` (the cursor, below `row`; or its block's first posting, which
        // may be at or past it: then the search ends there), then binary search
        let mut step = 1;
        while lo + step < end && list[lo + step][0] < row {
            lo += step;
            step *= 2;
        }
        let hi = (lo + step + 1).min(end);
        self.at = lo + list[lo..hi].partition_point(|p| p[0] < row);
        self.skip_dead();
        self.row() == Some(row)
    }
}

/// The best `k` scored rows so far: a min-heap with the worst (lower score, higher key) on top.
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

    /// Whether `r` would be kept.
    fn accepts(&self, r: &Ranked) -> bool {
        self.heap.len() < self.k || self.heap.peek().is_some_and(|w| *r > w.0)
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

    /// (key, score), best first (ties: lower key first).
    fn into_sorted(self) -> Vec<(u64, f32)> {
        let mut out: Vec<(u64, f32)> = self
            .heap
            .into_iter()
            .map(|r| (r.0.key, r.0.score))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }
}

/// A scored row: ordered by score, then the lower key ranks higher.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ranked {
    score: f32,
    key: u64,
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Ranked {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&o.score).then(o.key.cmp(&self.key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zipf-like words: w0 is in most chunks, w300 in few.
    fn word(r: &mut rand::rngs::StdRng) -> String {
        use rand::Rng;
        let u: f64 = r.gen_range(0.0..1.0);
        format!("w{}", (u.powi(3) * 400.0) as u32)
    }

    fn text(r: &mut rand::rngs::StdRng, words: std::ops::Range<usize>) -> String {
        use rand::Rng;
        let n = r.gen_range(words);
        (0..n).map(|_| word(r)).collect::<Vec<_>>().join(" ")
    }

    /// A postings file in `dir` per entry of `rows`, of that many texts from `text`, each with
    /// a fifth of its rows drawn dead.
    #[allow(clippy::type_complexity)]
    fn postings_files(
        dir: &std::path::Path,
        rows: &[usize],
        r: &mut rand::rngs::StdRng,
        text: impl Fn(&mut rand::rngs::StdRng) -> String,
    ) -> (
        Vec<std::sync::Arc<crate::postings::SegPostings>>,
        Vec<std::collections::HashSet<u32>>,
    ) {
        use rand::Rng;
        let (mut files, mut dead) = (Vec::new(), Vec::new());
        for (i, &n) in rows.iter().enumerate() {
            let texts: Vec<String> = (0..n).map(|_| text(r)).collect();
            let built = crate::postings::Built::of(texts.iter().map(|t| t.as_str()));
            let path = dir.join(format!("{i}.post"));
            files.push(crate::postings::SegPostings::write(&path, &[&built]).unwrap());
            dead.push((0..n as u32).filter(|_| r.gen_bool(0.2)).collect());
        }
        (files, dead)
    }

    /// Sources over postings files (rows in `dead` not live) and an in-memory index, for the
    /// query `terms`.
    fn file_sources<'a>(
        files: &'a [std::sync::Arc<crate::postings::SegPostings>],
        dead: &'a [std::collections::HashSet<u32>],
        growing: &'a Bm25,
        terms: &[String],
    ) -> Vec<Source<'a>> {
        let mut v: Vec<Source<'a>> = files
            .iter()
            .zip(dead)
            .map(|(p, d)| Source {
                lists: terms.iter().map(|t| p.find(t)).collect(),
                rows: p.rows() as u64,
                total_len: p.total_len(),
                len_of: Box::new(|row| p.len_of(row)),
                live: Box::new(move |row| !d.contains(&row)),
            })
            .collect();
        v.push(growing.source(terms));
        v
    }

    #[test]
    fn block_max_search_returns_exactly_what_scoring_everything_does() {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(3);
        let mut b = Bm25::default();
        let mut texts: HashMap<u32, String> = HashMap::new();
        for slot in 0..3000u32 {
            let t = text(&mut r, 3..30);
            b.insert(slot, &t);
            texts.insert(slot, t);
        }
        let check = |b: &Bm25, r: &mut rand::rngs::StdRng| {
            for _ in 0..300 {
                let q = text(r, 1..6);
                let terms = query_terms(&q);
                for k in [1, 10, 100] {
                    let want = search_exhaustive(&[b.source(&terms)], k);
                    // seeded with the weightiest term's first k rows, with its whole list
                    // when short, and with it always
                    for whole in [0, 60, usize::MAX] {
                        assert_eq!(
                            search_seeded(&[b.source(&terms)], k, whole),
                            want,
                            "{q} k={k} whole_seed={whole}"
                        );
                    }
                    let want: Vec<(u32, f32)> = want.into_iter().map(|x| (x.1, x.2)).collect();
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
                let t = text(&mut r, 1..60);
                b.insert(slot, &t);
                texts.insert(slot, t);
            }
        }
        check(&b, &mut r);
    }

    #[test]
    fn a_search_over_postings_files_and_memory_with_dead_rows_is_exact() {
        use rand::SeedableRng;
        let mut r = rand::rngs::StdRng::seed_from_u64(11);
        let dir = tempfile::tempdir().unwrap();
        // three sealed segments (blocks of 128 postings, many blocks a common term) and a
        // growing one; a fifth of the sealed rows dead
        let (files, dead) =
            postings_files(dir.path(), &[2500, 700, 90], &mut r, |r| text(r, 0..40));
        let mut growing = Bm25::default();
        for slot in 0..300u32 {
            growing.insert(slot, &text(&mut r, 0..40));
        }
        let mut bounded = 0;
        for _ in 0..400 {
            let q = text(&mut r, 1..7);
            let terms = query_terms(&q);
            let sources = || file_sources(&files, &dead, &growing, &terms);
            for k in [1, 10, 50] {
                let got = search_sources(&sources(), k);
                let want = search_exhaustive(&sources(), k);
                assert_eq!(got, want, "{q} k={k}");
                for whole in [0, 60] {
                    let got = search_seeded(&sources(), k, whole);
                    assert_eq!(got, want, "{q} k={k} whole_seed={whole}");
                }
                for (s, row, _) in &got {
                    assert!(*s == 3 || !dead[*s].contains(row), "a dead row returned");
                }
                bounded += usize::from(got.len() == k);
            }
        }
        assert!(bounded > 600, "most searches fill their top k: {bounded}");
    }

    #[test]
    fn long_lists_split_by_frequency_rank_exactly() {
        use crate::postings::SPLIT_MIN;
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(29);
        let dir = tempfile::tempdir().unwrap();
        // two sealed segments whose common terms' lists are split, a fifth of their rows dead,
        // and a growing one; `s` is in nine rows of ten, more than once in a tenth of those
        // (up to frequencies past the last tier)
        let with_s = |r: &mut rand::rngs::StdRng| {
            let mut t = text(r, 1..30);
            if r.gen_bool(0.9) {
                let n = if r.gen_bool(0.1) {
                    r.gen_range(2..7)
                } else {
                    1
                };
                (0..n).for_each(|_| t.push_str(" s"));
            }
            t
        };
        let (mut files, dead) = postings_files(dir.path(), &[9000, 5000], &mut r, with_s);
        // the second file in the first format, as written before the tiers were stored: its
        // tiers made in memory (a shard opened after an upgrade holds both kinds)
        files[1] = crate::postings::SegPostings::write_first_format(
            &dir.path().join("1.first.post"),
            &[files[1].as_ref()],
        )
        .unwrap();
        assert!(files[0].stores_tiers() && !files[1].stores_tiers());
        // a long list is split when at most a quarter of its postings hold the term more than
        // once; the tiers and the rest of the list then hold every posting once
        let mut split_lists = 0;
        for w in ["s", "w0", "w1", "w2"] {
            let list = files[0].find(w).unwrap();
            let apart = list.pairs.iter().filter(|p| p[1] >= 2).count();
            let due = list.pairs.len() >= SPLIT_MIN && apart > 0 && apart * 4 <= list.pairs.len();
            assert_eq!(
                list.hi.is_some(),
                due,
                "{w}: {apart} of {}",
                list.pairs.len()
            );
            let Some(split) = list.hi else { continue };
            split_lists += 1;
            let tiers: Vec<_> = split.tiers().collect();
            assert!(tiers.len() >= 2, "{w} has tiers");
            let kept: usize = tiers.iter().map(|t| t.pairs.len()).sum();
            let below = list.pairs.iter().filter(|p| p[1] < split.cut()).count();
            assert_eq!(kept + below, list.pairs.len());
            assert!(tiers
                .iter()
                .flat_map(|t| t.pairs)
                .all(|p| p[1] >= split.cut()));
        }
        assert!(split_lists >= 1, "a list is split");
        // made ahead of the searches (as a merge or an open does): every list the share rule
        // splits, and no other
        {
            use crate::postings::PostingsInput;
            let p = &files[1];
            let due = (0..p.term_count())
                .filter(|&i| {
                    let pairs = p.pairs(i);
                    let apart = pairs.iter().filter(|x| x[1] >= 2).count();
                    pairs.len() >= SPLIT_MIN && apart > 0 && apart * 4 <= pairs.len()
                })
                .count();
            assert!(due >= 1);
            assert_eq!(p.split_long_lists(), due);
        }
        let mut growing = Bm25::default();
        for slot in 0..300u32 {
            growing.insert(slot, &with_s(&mut r));
        }
        for n in 0..160 {
            // every other query of common words only, where the splits matter most
            let q = if n % 2 == 0 {
                let len = r.gen_range(1..5);
                (0..len)
                    .map(|_| match r.gen_range(0..9) {
                        0 | 1 => "s".to_string(),
                        w => format!("w{}", w - 2),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                text(&mut r, 1..6)
            };
            let terms = query_terms(&q);
            let sources = || file_sources(&files, &dead, &growing, &terms);
            for k in [1, 10, 50] {
                let want = search_exhaustive(&sources(), k);
                for whole in [0, 60, WHOLE_SEED] {
                    let got = search_seeded(&sources(), k, whole);
                    assert_eq!(got, want, "{q} k={k} whole_seed={whole}");
                }
            }
        }
    }

    #[test]
    fn equal_length_chunks_whose_bounds_are_tight_rank_exactly() {
        // twelve Zipf words a chunk (as `bench shard` writes them): every length the same, so a
        // term's bound is its score at the highest frequency, and a bound that is too low by
        // a little shows
        use rand::SeedableRng;
        let zipf = crate::eval::Zipf::new(400);
        let mut r = rand::rngs::StdRng::seed_from_u64(5);
        let mut b = Bm25::default();
        for slot in 0..4000u32 {
            b.insert(slot, &zipf.text(&mut r));
        }
        for _ in 0..300 {
            let q: Vec<String> = (0..3).map(|_| zipf.word(&mut r)).collect();
            let terms = query_terms(&q.join(" "));
            for k in [1, 10, 40] {
                let want = search_exhaustive(&[b.source(&terms)], k);
                for whole in [0, 60, usize::MAX] {
                    assert_eq!(
                        search_seeded(&[b.source(&terms)], k, whole),
                        want,
                        "{q:?} k={k} whole_seed={whole}"
                    );
                }
            }
        }
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
