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
        let mut all: Vec<(f32, Arc<Entry>)> = exact_search(&self.growing, &v, k, &live);
        for seg in &self.sealed {
            all.extend(seg.search(&v, k, self.settings.ef_search, &live));
        }
        let mut hits: Vec<Hit> = all
            .into_iter()
            .map(|(s, e)| hit(&e, s, Some(s), Some(&v)))
            .collect();
        sort_hits(&mut hits);
        hits.truncate(k);
        Ok(hits)
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
        self.bm25_ranked(&q.text, k)
            .into_iter()
            .map(|(e, s)| {
                let sim = v.as_ref().map(|v| crate::vector::dot(v, e.vector()));
                hit(&e, s, sim, v.as_deref())
            })
            .collect()
    }

    /// The exact BM25 top `k`: every sealed segment's postings file and the growing segment's
    /// in-memory index searched as one corpus (statistics summed over them; a sealed segment's
    /// dead chunks count in them until a compaction drops them, as in Lucene).
    pub(super) fn bm25_ranked(&self, text: &str, k: usize) -> Vec<(Arc<Entry>, f32)> {
        let terms = crate::bm25::query_terms(text);
        let mut segs: Vec<&Segment> = Vec::with_capacity(self.sealed.len());
        let mut sources = Vec::with_capacity(self.sealed.len() + 1);
        for seg in &self.sealed {
            let Some(p) = seg.postings.get() else {
                continue;
            };
            segs.push(seg);
            sources.push(crate::bm25::Source {
                lists: terms.iter().map(|t| p.find(t)).collect(),
                rows: p.rows() as u64,
                total_len: p.total_len(),
                len_of: Box::new(|row| p.len_of(row)),
                live: Box::new(|row| self.is_live(&seg.entries[row as usize])),
            });
        }
        sources.push(self.bm25.source(&terms));
        crate::bm25::search_sources(&sources, k)
            .into_iter()
            .filter_map(|(s, row, score)| {
                let e = match segs.get(s) {
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
        self.docs.get(&e.doc_id).is_some_and(|d| d.seq == e.seq)
    }
}

/// A hit of `e`; with the query's unit vector, the score of its best stored sentence too.
pub(super) fn hit(e: &Entry, score: f32, similarity: Option<f32>, query: Option<&[f32]>) -> Hit {
    Hit {
        doc_id: e.doc_id.clone(),
        chunk_id: e.chunk_id.clone(),
        score,
        similarity,
        text: e.text().to_string(),
        sentence_score: query.and_then(|q| e.best_sentence_dot(q)),
    }
}
