//! Segments: a sealed segment is immutable and gets an HNSW graph built in the background; until
//! the graph is there (and for the growing segment) search is exact.
use std::sync::{Arc, OnceLock};

use instant_distance::{Builder, HnswMap, Search};
use serde::{Deserialize, Serialize};

use crate::vector::{dot, UnitVector};

/// One stored chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) version: u64,
    pub(crate) doc_id: String,
    pub(crate) chunk_id: String,
    pub(crate) text: String,
    pub(crate) vector: Vec<f32>,
}

pub(crate) type Graph = HnswMap<UnitVector, u32>;

/// An immutable segment.
pub(crate) struct Segment {
    pub(crate) id: u64,
    pub(crate) entries: Vec<Arc<Entry>>,
    pub(crate) graph: OnceLock<Graph>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("id", &self.id)
            .field("entries", &self.entries.len())
            .field("graph_built", &self.graph.get().is_some())
            .finish()
    }
}

impl Segment {
    pub(crate) fn new(id: u64, entries: Vec<Arc<Entry>>) -> Self {
        Segment {
            id,
            entries,
            graph: OnceLock::new(),
        }
    }

    pub(crate) fn build_graph(&self, ef_construction: usize, ef_search: usize) -> Graph {
        let points: Vec<UnitVector> = self
            .entries
            .iter()
            .map(|e| UnitVector(e.vector.clone()))
            .collect();
        let values: Vec<u32> = (0..self.entries.len() as u32).collect();
        Builder::default()
            .ef_construction(ef_construction)
            .ef_search(ef_search)
            .seed(self.id)
            .build(points, values)
    }

    /// Best `k` live entries for a unit query vector, as (dot, entry).
    pub(crate) fn search(
        &self,
        q: &[f32],
        k: usize,
        live: &dyn Fn(&Entry) -> bool,
    ) -> Vec<(f32, Arc<Entry>)> {
        if let Some(graph) = self.graph.get() {
            let mut search = Search::default();
            let point = UnitVector(q.to_vec());
            let mut out = Vec::with_capacity(k);
            let mut seen = 0usize;
            for item in graph.search(&point, &mut search) {
                seen += 1;
                let e = &self.entries[*item.value as usize];
                if live(e) {
                    out.push((1.0 - item.distance, e.clone()));
                    if out.len() == k {
                        return out;
                    }
                }
            }
            // the beam held fewer than k live entries: fall back to an exact scan
            if seen >= self.entries.len() {
                return out;
            }
        }
        exact_search(&self.entries, q, k, live)
    }
}

/// Exact top-k by dot product over `entries`.
pub(crate) fn exact_search(
    entries: &[Arc<Entry>],
    q: &[f32],
    k: usize,
    live: &dyn Fn(&Entry) -> bool,
) -> Vec<(f32, Arc<Entry>)> {
    let mut scored: Vec<(f32, &Arc<Entry>)> = entries
        .iter()
        .filter(|e| live(e))
        .map(|e| (dot(q, &e.vector), e))
        .collect();
    if scored.len() > k {
        scored.select_nth_unstable_by(k, |a, b| b.0.total_cmp(&a.0));
        scored.truncate(k);
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().map(|(s, e)| (s, e.clone())).collect()
}

/// The BM25 statistics of a sealed segment, snapshotted beside it (`seg-N.bm25`) so that a
/// restart loads term counts instead of re-tokenising every chunk: a term dictionary and, per
/// entry, (term index, frequency) pairs.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SegmentTerms {
    terms: Vec<String>,
    entries: Vec<Vec<(u32, u32)>>,
}

impl SegmentTerms {
    /// Tokenises the segment's chunks.
    pub(crate) fn of(seg: &Segment) -> Self {
        let mut dict: std::collections::HashMap<String, u32> = Default::default();
        let mut terms = Vec::new();
        let entries = seg
            .entries
            .iter()
            .map(|e| {
                crate::bm25::term_counts(&e.text)
                    .into_iter()
                    .map(|(t, f)| {
                        let id = *dict.entry(t.clone()).or_insert_with(|| {
                            terms.push(t);
                            (terms.len() - 1) as u32
                        });
                        (id, f)
                    })
                    .collect()
            })
            .collect();
        SegmentTerms { terms, entries }
    }

    /// Checks that a decoded snapshot fits a segment of `n` entries.
    pub(crate) fn check(&self, n: usize) -> Result<(), String> {
        if self.entries.len() != n {
            return Err(format!(
                "holds {} chunks, the segment {}",
                self.entries.len(),
                n
            ));
        }
        let dict = self.terms.len() as u32;
        if self.entries.iter().flatten().any(|(t, _)| *t >= dict) {
            return Err("term index out of range".into());
        }
        Ok(())
    }

    /// Term counts of entry `i` (after [`SegmentTerms::check`]).
    pub(crate) fn counts(&self, i: usize) -> Vec<(String, u32)> {
        self.entries[i]
            .iter()
            .map(|(t, f)| (self.terms[*t as usize].clone(), *f))
            .collect()
    }
}
