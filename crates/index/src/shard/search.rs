//! Search: dense (exact over the growing segment, HNSW over sealed ones), BM25, and the two
//! rankings of a hybrid search.
use super::*;

impl ShardIndex {
    /// Top hits for a query.
    pub fn search(&self, q: &SearchQuery) -> Result<Vec<Hit>, IndexError> {
        let k = q.k.clamp(1, 1000) as usize;
        match q.mode {
            SearchMode::Dense => self.dense(q, k),
            SearchMode::Bm25 => Ok(self.bm25_hits(q, k)),
            SearchMode::Hybrid => {
                let (d, b) = self.hybrid_parts(q)?;
                Ok(rrf(&[d, b], k))
            }
        }
    }

    /// The two rankings a hybrid search fuses (dense, BM25), each [`hybrid_depth`](crate::ranking::hybrid_depth) deep.
    pub fn hybrid_parts(&self, q: &SearchQuery) -> Result<(Vec<Hit>, Vec<Hit>), IndexError> {
        let depth = crate::ranking::hybrid_depth(q.k.clamp(1, 1000) as usize);
        Ok((self.dense(q, depth)?, self.bm25_hits(q, depth)))
    }

    pub(super) fn dense(&self, q: &SearchQuery, k: usize) -> Result<Vec<Hit>, IndexError> {
        if let Some(m) = &q.model {
            self.check_model(m)?;
        }
        if self.slots.is_empty() {
            return Ok(Vec::new());
        }
        let v = self.query_unit(q)?;
        let live = |e: &Entry| self.is_live(e);
        // the largest segment first, the growing segment last, each with the k-th best score
        // found before it as a floor: a chunk below it cannot be in the answer, so a scan by
        // codes (the growing segment, a sealed one whose graph is being built) scores exactly
        // only chunks whose bound reaches it (~12% of a search at 100k chunks)
        let mut order: Vec<&Segment> = self.sealed.iter().map(|s| &**s).collect();
        order.sort_by_key(|s| std::cmp::Reverse(s.entries.len()));
        let mut all: Vec<(f32, Arc<Entry>)> = Vec::new();
        for seg in order {
            let floor = kth_best(&all, k);
            all.extend(seg.search_above(&v, k, self.settings.ef_search, floor, &live));
        }
        let floor = kth_best(&all, k);
        all.extend(self.growing.search_above(&v, k, floor, &live));
        // the order of `crate::sort_hits`, so that hits (their texts read, their sentences scored)
        // are made of the k kept only
        all.sort_unstable_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then_with(|| a.1.chunk_id().cmp(b.1.chunk_id()))
        });
        all.truncate(k);
        let entries: Vec<&Entry> = all.iter().map(|(_, e)| &**e).collect();
        Ok(self.read_hits(&entries, false, || {
            all.iter()
                .map(|(s, e)| hit(e, *s, Some(*s), Some(&v)))
                .collect()
        }))
    }

    /// `make` reads the hits' ids and texts from `entries` (a search's k best, at random places
    /// in their data files). After a search whose hits waited for reads from disk
    /// ([`HITS_COLD_FAULTS`] major page faults or more), the next [`crate::files::READ_AHEAD_SEARCHES`] ask the
    /// kernel for all of them first, so that their reads overlap (a system call or three a hit,
    /// ~5 us, too dear while they are in memory); `vectors`: the hits' vectors are read too.
    pub(super) fn read_hits<T>(
        &self,
        entries: &[&Entry],
        vectors: bool,
        make: impl FnOnce() -> T,
    ) -> T {
        let watch = self.hits_cold.start();
        if watch.ahead() {
            // the records first (a text's place is in its record), then the texts
            for e in entries {
                e.read_ids_ahead(vectors);
            }
            for e in entries {
                e.read_text_ahead();
            }
        }
        let out = make();
        self.hits_cold.finish(watch, HITS_COLD_FAULTS);
        out
    }

    /// The query vector at unit length, checked against the index's dimension.
    pub(super) fn query_unit(&self, q: &SearchQuery) -> Result<Vec<f32>, IndexError> {
        let mut v = q.vector.clone();
        if let Some(m) = &self.model {
            if v.len() != m.dim as usize {
                return Err(IndexError::BadInput(format!(
                    "query vector has {} dimensions, index has {}",
                    v.len(),
                    m.dim
                )));
            }
        }
        if !normalize(&mut v) {
            return Err(IndexError::BadInput(
                "query vector is zero or not finite".into(),
            ));
        }
        Ok(v)
    }

    /// BM25 hits, with their cosine similarity to the query vector when it has a usable one.
    pub(super) fn bm25_hits(&self, q: &SearchQuery, k: usize) -> Vec<Hit> {
        let model_ok = q.model.as_ref().is_none_or(|m| self.check_model(m).is_ok());
        let v = self
            .query_unit(q)
            .ok()
            .filter(|_| model_ok && self.model.is_some());
        let ranked = self.bm25_ranked(&q.text, k);
        let entries: Vec<&Entry> = ranked.iter().map(|(e, _)| &**e).collect();
        self.read_hits(&entries, v.is_some(), || {
            ranked
                .iter()
                .map(|(e, s)| {
                    let sim = v.as_ref().map(|v| crate::vector::dot(v, e.vector()));
                    hit(e, *s, sim, v.as_deref())
                })
                .collect()
        })
    }

    /// The exact BM25 top `k`: every sealed segment's postings file and the growing segment's
    /// in-memory index searched as one corpus (statistics summed over them; a sealed segment's
    /// dead chunks count in them until a compaction drops them, as in Lucene).
    pub(super) fn bm25_ranked(&self, text: &str, k: usize) -> Vec<(Arc<Entry>, f32)> {
        let terms = crate::bm25::query_terms(text);
        let mut sources = Vec::with_capacity(self.sealed.len() + 1);
        for seg in &self.sealed {
            let p = &seg.postings;
            sources.push(crate::bm25::Source {
                lists: terms.iter().map(|t| p.find(t)).collect(),
                rows: p.rows() as u64,
                total_len: p.total_len(),
                short: p.short_lens(),
                len_of: Box::new(|row| p.len_of(row)),
                live: Box::new(|row| self.is_live(&seg.entries[row as usize])),
            });
        }
        sources.push(self.bm25.source(&terms));
        crate::bm25::search_sources(&sources, k)
            .into_iter()
            .filter_map(|(s, row, score)| {
                let e = match self.sealed.get(s) {
                    Some(seg) => seg.entries.get(row as usize).cloned(),
                    None => self.slots.get(&row).cloned(),
                }?;
                Some((e, score))
            })
            .collect()
    }

    /// Whether a chunk is its document's live copy: a chunk of a mapped data file by its dead
    /// mark (kept as chunks die, see [`Entry::mark_dead`]), one in memory by its document's
    /// sequence number.
    pub(super) fn is_live(&self, e: &Entry) -> bool {
        match e.marked_dead() {
            Some(dead) => !dead,
            None => self.live_by_seq(e),
        }
    }

    /// Whether a chunk is its document's live copy, by its document's sequence number.
    pub(super) fn live_by_seq(&self, e: &Entry) -> bool {
        self.docs.get(e.doc_id()).is_some_and(|d| d.seq == e.seq)
    }
}

/// Major page faults while a search's hits were read that make the next searches ask for their
/// hits ahead: a hit is ~3 reads (its record, ids and text), so a few hits from disk.
const HITS_COLD_FAULTS: u64 = 4;

/// The `k`-th best score of `hits` (None: fewer than `k`).
fn kth_best(hits: &[(f32, Arc<Entry>)], k: usize) -> Option<f32> {
    if hits.len() < k || k == 0 {
        return None;
    }
    let mut scores: Vec<f32> = hits.iter().map(|h| h.0).collect();
    let (_, kth, _) = scores.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    Some(*kth)
}

/// A hit of `e`; with the query's unit vector, the score of its best stored sentence too.
pub(super) fn hit(e: &Entry, score: f32, similarity: Option<f32>, query: Option<&[f32]>) -> Hit {
    Hit {
        doc_id: e.doc_id().to_string(),
        chunk_id: e.chunk_id().to_string(),
        score,
        similarity,
        text: e.text().to_string(),
        sentence_score: query.and_then(|q| e.best_sentence_dot(q)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    use super::super::test_model as model;

    fn upsert(r: &mut rand::rngs::StdRng, doc: usize) -> WriteOp {
        let words: Vec<String> = (0..r.gen_range(1..25))
            .map(|_| format!("w{}", (r.gen::<f64>().powi(3) * 150.0) as u32))
            .collect();
        WriteOp::Upsert {
            version: 0,
            doc_id: format!("d{doc}"),
            chunks: vec![ragfleet_proto::ChunkRecord {
                doc_id: format!("d{doc}"),
                chunk_id: format!("d{doc}#0"),
                text: words.join(" "),
                vector: vec![1.0, doc as f32, 0.5, 1.0],
                sentences: Default::default(),
            }],
        }
    }

    /// Segments of 64 chunks, sealed and indexed in the foreground.
    fn small_segments() -> IndexSettings {
        IndexSettings {
            segment_size: 64,
            background: false,
            ..IndexSettings::default()
        }
    }

    /// BM25 by brute force over what the shard stores: statistics over every sealed row (dead
    /// ones too) and the growing segment's live chunks; every live chunk scored; (chunk, score)
    /// best first.
    fn brute_force(ix: &ShardIndex, query: &str, k: usize) -> Vec<(String, f32)> {
        let sealed: Vec<&Arc<Entry>> = ix.sealed.iter().flat_map(|s| s.entries.iter()).collect();
        let growing: Vec<&Arc<Entry>> = ix.growing.iter().filter(|e| ix.live_by_seq(e)).collect();
        let counted: Vec<HashMap<String, u32>> = sealed
            .iter()
            .chain(&growing)
            .map(|e| crate::bm25::term_counts(e.text()).into_iter().collect())
            .collect();
        let n = counted.len() as f32;
        let avg = counted
            .iter()
            .map(|c| c.values().sum::<u32>() as f32)
            .sum::<f32>()
            / n;
        let q = crate::bm25::query_terms(query);
        let idf = |t: &String| {
            let df = counted.iter().filter(|c| c.contains_key(t)).count() as f32;
            (df > 0.0).then(|| (1.0 + (n - df + 0.5) / (df + 0.5)).ln())
        };
        let mut out: Vec<(String, f32)> = sealed
            .iter()
            .chain(&growing)
            .zip(&counted)
            .filter(|(e, _)| ix.live_by_seq(e))
            .filter_map(|(e, c)| {
                let len = c.values().sum::<u32>() as f32;
                let s: f32 = q
                    .iter()
                    .filter_map(|t| {
                        let tf = *c.get(t)? as f32;
                        Some(idf(t)? * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len / avg)))
                    })
                    .sum();
                (s > 0.0).then(|| (e.chunk_id().to_string(), s))
            })
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out.truncate(k);
        out
    }

    #[test]
    fn bm25_over_sealed_and_growing_segments_with_dead_rows_scores_like_brute_force() {
        let mut r = rand::rngs::StdRng::seed_from_u64(21);
        let dir = tempfile::tempdir().unwrap();
        let settings = small_segments();
        let (mut ix, _) = ShardIndex::open(dir.path(), settings.clone()).unwrap();
        for round in 0..12 {
            let ops: Vec<WriteOp> = (0..40)
                .map(|_| {
                    let d = r.gen_range(0..300);
                    upsert(&mut r, d)
                })
                .collect();
            ix.write(ops, &model()).unwrap();
            let gone: Vec<String> = (0..8)
                .map(|_| format!("d{}", r.gen_range(0..300)))
                .collect();
            ix.delete(&gone, 0).unwrap();
            if round == 7 {
                // and again from the files
                drop(ix);
                ix = ShardIndex::open(dir.path(), settings.clone()).unwrap().0;
            }
        }
        // a growing segment with replaced and deleted chunks of its own
        ix.seal().unwrap();
        let ops: Vec<WriteOp> = (0..30).map(|i| upsert(&mut r, 280 + i % 20)).collect();
        ix.write(ops, &model()).unwrap();
        ix.delete(&["d281".into(), "d10".into()], 0).unwrap();
        assert!(
            !ix.sealed.is_empty() && !ix.growing.is_empty(),
            "both kinds searched"
        );
        let stored: usize = ix.sealed.iter().map(|s| s.entries.len()).sum();
        assert!(
            stored
                > ix.sealed
                    .iter()
                    .map(|s| s.live_count(&|e| ix.is_live(e)))
                    .sum::<usize>(),
            "dead rows stored"
        );
        for _ in 0..200 {
            let words: Vec<String> = (0..r.gen_range(1..5))
                .map(|_| format!("w{}", (r.gen::<f64>().powi(3) * 150.0) as u32))
                .collect();
            let query = words.join(" ");
            let got: Vec<(String, f32)> = ix
                .bm25_ranked(&query, 10)
                .into_iter()
                .map(|(e, s)| (e.chunk_id().to_string(), s))
                .collect();
            let want = brute_force(&ix, &query, 10);
            assert_eq!(got.len(), want.len(), "{query}");
            for (g, w) in got.iter().zip(&want) {
                // the same scores in order (ties may name other chunks)
                assert!(
                    (g.1 - w.1).abs() < 1e-4 * w.1.max(1.0),
                    "{query}: {got:?} vs {want:?}"
                );
            }
            let live: Vec<bool> = got
                .iter()
                .map(|(c, _)| {
                    let d = c.trim_end_matches("#0");
                    ix.docs.contains_key(d)
                })
                .collect();
            assert!(live.iter().all(|&l| l), "{query}: a dead chunk returned");
        }
    }

    #[test]
    fn hits_read_ahead_from_their_data_files_answer_the_same() {
        use crate::files::READ_AHEAD_SEARCHES;
        use std::sync::atomic::Ordering::Relaxed;
        let mut r = rand::rngs::StdRng::seed_from_u64(5);
        let dir = tempfile::tempdir().unwrap();
        let (mut ix, _) = ShardIndex::open(dir.path(), small_segments()).unwrap();
        let ops: Vec<WriteOp> = (0..300).map(|d| upsert(&mut r, d)).collect();
        ix.write(ops, &model()).unwrap();
        ix.seal().unwrap();
        assert!(
            ix.sealed
                .iter()
                .any(|s| s.entries.iter().any(|e| e.is_mapped())),
            "hits in mapped data files"
        );
        let queries: Vec<SearchQuery> = (0..30)
            .map(|i| SearchQuery {
                vector: vec![1.0, (i * 10) as f32, 0.5, 1.0],
                text: format!("w{} w{}", i % 7, i * 3 % 40),
                k: 5,
                mode: [SearchMode::Dense, SearchMode::Bm25, SearchMode::Hybrid][i % 3],
                model: None,
            })
            .collect();
        let plain: Vec<Vec<Hit>> = queries.iter().map(|q| ix.search(q).unwrap()).collect();
        assert!(plain.iter().all(|h| !h.is_empty()));
        // as after a search whose hits waited on disk: every hit asked for ahead, the same
        // answers, and searches that waited for no reads count it down
        ix.hits_cold.0.store(READ_AHEAD_SEARCHES, Relaxed);
        let ahead: Vec<Vec<Hit>> = queries.iter().map(|q| ix.search(q).unwrap()).collect();
        assert_eq!(ahead, plain);
        let left = ix.hits_cold.0.load(Relaxed);
        assert!(
            (READ_AHEAD_SEARCHES - 40..READ_AHEAD_SEARCHES).contains(&left),
            "{left}"
        );
    }
}
