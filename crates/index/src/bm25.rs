//! A BM25 inverted index (k1 = 1.2, b = 0.75) over chunk slots.
use std::collections::HashMap;

use crate::postings::{short_len_of, TermList, BLOCK};

mod cursor;
mod plan;

use cursor::{key, Cursor, Ranked, TopK};
use plan::Plan;
#[cfg(test)]
use plan::{WHOLE_SEED, WINDOW};

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
            short: &[],
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
    /// Rows' lengths in terms as bytes, [`crate::postings::SHORT_LEN_MAX`] for that or more
    /// (empty: none); read in place, without a call, on the searches' hottest path.
    pub(crate) short: &'a [u8],
    /// A row's length in terms.
    pub(crate) len_of: Box<dyn Fn(u32) -> u32 + 'a>,
    /// Whether a row may be returned (asked only of rows that would enter the top k).
    pub(crate) live: Box<dyn Fn(u32) -> bool + 'a>,
}

impl Source<'_> {
    /// Row `row`'s length in terms.
    #[inline]
    pub(crate) fn len(&self, row: u32) -> u32 {
        short_len_of(self.short, row).unwrap_or_else(|| (self.len_of)(row))
    }
}

/// The exact `k` best rows of `sources` for the query terms their lists were made for, as
/// (source, row, score), best first (ties: lower source, then lower row), without scoring
/// every matching row: scores use the statistics of all sources together (chunk count,
/// average length, document frequencies), each term bounded by its highest frequency in its
/// shortest chunk, per block of postings and per list. Each source is first seeded with its
/// weightiest term's rows (all of them when they are few and the query is short,
/// [`Plan::seed`]), then searched by block-max MaxScore: a
/// window of rows at a time when many cursors are essential ([`Plan::windows`]), else pivot
/// by pivot ([`Plan::daat`]); the k-th best score carried from one source to the next.
pub(crate) fn search_sources(sources: &[Source<'_>], k: usize) -> Vec<(usize, u32, f32)> {
    search_planned(sources, k, |_| {})
}

/// [`search_sources`] with its plan's settings changed by `set` (the tests' way to walk
/// every path: the seeding's whole lists, pivots and windows).
fn search_planned(
    sources: &[Source<'_>],
    k: usize,
    set: impl FnOnce(&mut Plan),
) -> Vec<(usize, u32, f32)> {
    let Some(mut plan) = Plan::new(sources).filter(|_| k > 0) else {
        return Vec::new();
    };
    set(&mut plan);
    let mut best = TopK::new(k);
    // the seeded rows (offered already), sorted
    let mut seen = Vec::new();
    let done: Vec<Vec<usize>> = sources
        .iter()
        .enumerate()
        .map(|(s, src)| plan.seed(s, src, &mut best, &mut seen))
        .collect();
    // (sorted runs, one a whole list scored: merged in linear time)
    seen.sort();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The search with a weightiest list scored whole in the seeding when it holds at most
    /// `whole` postings, each source then walked both ways (pivot by pivot, and a window at a
    /// time: the shipped window, and one of 64 rows, so that many windows are skipped and few
    /// postings fall in each), which must answer alike.
    fn seeded(sources: &[Source<'_>], k: usize, whole: usize) -> Vec<(usize, u32, f32)> {
        let walk = |windowed_from: usize, window: u32| {
            search_planned(sources, k, |p| {
                p.whole_seed = whole;
                p.windowed_from = windowed_from;
                p.window = window;
            })
        };
        let pivots = walk(usize::MAX, WINDOW);
        for window in [WINDOW, 64] {
            assert_eq!(
                pivots,
                walk(0, window),
                "k={k} whole_seed={whole} window={window}"
            );
        }
        pivots
    }

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
                short: p.short_lens(),
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
                            seeded(&[b.source(&terms)], k, whole),
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
                    let got = seeded(&sources(), k, whole);
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
    fn rows_at_the_end_of_the_numbering_are_searched_by_windows() {
        // slots up to u32::MAX (a window there reaches past the last row there can be)
        use rand::SeedableRng;
        let mut r = rand::rngs::StdRng::seed_from_u64(52);
        let mut b = Bm25::default();
        for slot in (u32::MAX - 999)..=u32::MAX {
            b.insert(slot, &text(&mut r, 3..30));
        }
        let mut found = 0;
        for _ in 0..100 {
            let q = text(&mut r, 4..9);
            let terms = query_terms(&q);
            for k in [1, 10] {
                let want = search_exhaustive(&[b.source(&terms)], k);
                assert_eq!(seeded(&[b.source(&terms)], k, 0), want, "{q} k={k}");
                found += want.iter().filter(|x| x.1 > u32::MAX - 64).count();
            }
        }
        assert!(found > 0, "rows in the last window are found");
    }

    #[test]
    fn a_window_is_bounded_by_every_block_it_spans() {
        // a postings file where `kiwi` is in every other row, once, in rows of 41 terms, but
        // for one short row late in its list that holds it five times (in its eighth block of
        // postings, whose bound is far above the first blocks'); the k-th best is set first by
        // another source's rows, between the two: a window over the whole file must be bound
        // by its every block, not its first, or the short row is passed over
        let dir = tempfile::tempdir().unwrap();
        let strong = 1000u32;
        let long: Vec<String> = (0..40).map(|j| format!("f{j}")).collect();
        let texts: Vec<String> = (0..1200u32)
            .map(|i| match i {
                _ if i == strong => "kiwi kiwi kiwi kiwi kiwi".to_string(),
                _ if i % 2 == 0 => format!("kiwi {}", long.join(" ")),
                _ => format!("zebra {}", long.join(" ")),
            })
            .collect();
        let built = crate::postings::Built::of(texts.iter().map(|t| t.as_str()));
        let path = dir.path().join("0.post");
        let files = [crate::postings::SegPostings::write(&path, &[&built]).unwrap()];
        assert!(
            files[0].find("kiwi").unwrap().blocks.len() > 4,
            "many blocks"
        );
        let dead = [std::collections::HashSet::new()];
        let mut growing = Bm25::default();
        for slot in 0..200u32 {
            growing.insert(slot, if slot < 20 { "kiwi lime" } else { "plum pear" });
        }
        let terms = query_terms("kiwi");
        let sources = || file_sources(&files, &dead, &growing, &terms);
        for k in [1, 10] {
            let want = search_exhaustive(&sources(), k);
            assert_eq!((want[0].0, want[0].1), (0, strong), "{want:?}");
            assert_eq!(seeded(&sources(), k, 0), want, "k={k}");
            assert_eq!(search_sources(&sources(), k), want, "k={k}");
        }
    }

    #[test]
    fn long_rows_score_alike_whether_their_lengths_are_stored_short_or_not() {
        use crate::postings::{Format, SegPostings};
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(53);
        let dir = tempfile::tempdir().unwrap();
        // a third of the rows longer than a byte's lengths (read whole), the rest short
        let (files, dead) = postings_files(dir.path(), &[3000], &mut r, |r| {
            let n = if r.gen_bool(0.33) {
                r.gen_range(255..600)
            } else {
                r.gen_range(1..255)
            };
            text(r, n..n + 1)
        });
        let second = vec![SegPostings::write_format(
            &dir.path().join("second.post"),
            &[files[0].as_ref()],
            Format::Second,
        )
        .unwrap()];
        assert!(files[0].stores_short_lengths() && !second[0].stores_short_lengths());
        let lens: Vec<u32> = (0..3000).map(|row| files[0].len_of(row)).collect();
        assert_eq!(
            lens,
            (0..3000)
                .map(|row| second[0].len_of(row))
                .collect::<Vec<_>>()
        );
        assert!(lens.iter().any(|&l| l >= 255) && lens.iter().any(|&l| l < 255));
        let growing = Bm25::default();
        for _ in 0..60 {
            let q = text(&mut r, 1..6);
            let terms = query_terms(&q);
            let want = search_exhaustive(&file_sources(&second, &dead, &growing, &terms), 10);
            assert!(!want.is_empty(), "{q}");
            assert_eq!(
                search_sources(&file_sources(&files, &dead, &growing, &terms), 10),
                want,
                "{q}"
            );
            assert_eq!(
                search_sources(&file_sources(&second, &dead, &growing, &terms), 10),
                want,
                "{q}"
            );
        }
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
                    let got = seeded(&sources(), k, whole);
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
                        seeded(&[b.source(&terms)], k, whole),
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
