//! Segments: a sealed segment is immutable and gets an HNSW graph built in the background; until
//! the graph is there (and for the growing segment) search is exact.
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use instant_distance::{Builder, HnswMap, Search};
use serde::{Deserialize, Serialize};

use ragfleet_proto::ChunkRecord;

use crate::datafile::DataFile;
use crate::vector::{dot, UnitVector};

mod entry;

pub(crate) use entry::{Entry, NO_SLOT};

pub(crate) type Graph = HnswMap<UnitVector, u32>;

/// Which HNSW implementation a shard's segments use (`index.ann`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnnKind {
    /// ragfleet's own graph ([`crate::hnsw::Hnsw`]): int8 walk, exact re-scoring, grows by
    /// insertion, so a merge pays for the smaller segments only.
    #[default]
    Hnsw,
    /// instant-distance's graph: built once, every merge rebuilds it.
    InstantDistance,
}

impl std::str::FromStr for AnnKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hnsw" => Ok(AnnKind::Hnsw),
            "instant-distance" => Ok(AnnKind::InstantDistance),
            other => Err(format!(
                "unknown ANN implementation {other:?} (hnsw, instant-distance)"
            )),
        }
    }
}

/// How a segment's graph is built and searched.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GraphSpec {
    pub(crate) ann: AnnKind,
    pub(crate) m: usize,
    pub(crate) ef_construction: usize,
    pub(crate) ef_search: usize,
    pub(crate) threads: usize,
    /// The budget of graph bytes held in memory rather than read from their files.
    pub(crate) memory: &'static crate::hnsw::GraphMemory,
}

/// A segment's HNSW graph, positions = entry indexes.
pub(crate) enum SegGraph {
    Own(crate::hnsw::Hnsw),
    Instant(Graph),
}

impl SegGraph {
    pub(crate) fn len(&self) -> usize {
        match self {
            SegGraph::Own(g) => g.len(),
            SegGraph::Instant(g) => g.values.len(),
        }
    }

    /// Bytes it holds in the process's memory (an instant-distance graph: not known, 0).
    pub(crate) fn memory_bytes(&self) -> usize {
        match self {
            SegGraph::Own(g) => g.memory_bytes(),
            SegGraph::Instant(_) => 0,
        }
    }

    /// The graph's file form: a tag byte, then the graph.
    pub(crate) fn to_bytes(&self) -> Result<Vec<u8>, String> {
        match self {
            SegGraph::Own(g) => {
                let mut out = vec![0u8];
                // the graph starts after the file's header and this tag byte
                out.extend(g.to_bytes_at(crate::files::HEADER + 1));
                Ok(out)
            }
            SegGraph::Instant(g) => {
                let mut out = vec![1u8];
                out.extend(postcard::to_stdvec(g).map_err(|e| e.to_string())?);
                Ok(out)
            }
        }
    }

    /// A graph from a mapped file of [`SegGraph::to_bytes`] (after the checked-file header)
    /// for `entries`, of the kind `spec.ann` asks for; an own graph keeps its codes and
    /// level-0 rows in the map, or copies them into memory backed by huge pages while
    /// `spec.memory` has room for them.
    pub(crate) fn from_map(
        map: Arc<memmap2::Mmap>,
        entries: &[Arc<Entry>],
        spec: &GraphSpec,
    ) -> Result<SegGraph, String> {
        let start = crate::files::HEADER;
        let ann = spec.ann;
        match (map.get(start), ann) {
            (Some(0), AnnKind::Hnsw) => {
                let g = crate::hnsw::Hnsw::from_map(map.clone(), start + 1)?;
                // checked before it is copied: a graph that does not fit is not kept
                let mut g = SegGraph::checked(SegGraph::Own(g), entries)?;
                if let SegGraph::Own(own) = &mut g {
                    if !own.into_memory(spec.memory) {
                        own.walk_from_file();
                    }
                }
                Ok(g)
            }
            _ => SegGraph::from_bytes(&map[start.min(map.len())..], entries, ann),
        }
    }

    /// A graph from [`SegGraph::to_bytes`] for `entries`, of the kind `ann` asks for.
    pub(crate) fn from_bytes(
        bytes: &[u8],
        entries: &[Arc<Entry>],
        ann: AnnKind,
    ) -> Result<SegGraph, String> {
        let g = match (bytes.first(), ann) {
            (Some(0), AnnKind::Hnsw) => SegGraph::Own(crate::hnsw::Hnsw::from_bytes(&bytes[1..])?),
            (Some(1), AnnKind::InstantDistance) => {
                SegGraph::Instant(postcard::from_bytes(&bytes[1..]).map_err(|e| e.to_string())?)
            }
            (Some(t), _) => return Err(format!("graph of kind {t}, the index uses {ann:?}")),
            (None, _) => return Err("empty graph file".into()),
        };
        SegGraph::checked(g, entries)
    }

    /// `g` if it fits `entries`.
    fn checked(g: SegGraph, entries: &[Arc<Entry>]) -> Result<SegGraph, String> {
        if let SegGraph::Own(own) = &g {
            let dim = entries.first().map_or(own.dim(), |e| e.vector().len());
            if own.dim() != dim {
                return Err(format!(
                    "graph of {} dimensions, chunks of {dim}",
                    own.dim()
                ));
            }
        }
        if g.len() != entries.len() {
            return Err(format!(
                "graph of {} nodes for a segment of {}",
                g.len(),
                entries.len()
            ));
        }
        Ok(g)
    }
}

/// The vectors of `entries`, end to end: borrowed from the mapped file when the entries are
/// all its rows in order (a freshly written segment), else copied.
pub(crate) fn flat(entries: &[Arc<Entry>]) -> std::borrow::Cow<'_, [f32]> {
    crate::datafile::read_ahead(entries.iter().map(|e| e.as_ref()));
    if let Some((file, 0)) = entries.first().and_then(|e| e.mapped_at()) {
        let whole = file.all_vectors();
        let dim = entries[0].vector().len();
        let in_order = whole.len() == entries.len() * dim
            && entries.iter().enumerate().all(|(i, e)| {
                e.mapped_at()
                    .is_some_and(|(f, r)| Arc::ptr_eq(f, file) && r == i)
            });
        if in_order {
            return std::borrow::Cow::Borrowed(whole);
        }
    }
    let dim = entries.first().map_or(0, |e| e.vector().len());
    let mut out = Vec::with_capacity(entries.len() * dim);
    for e in entries {
        out.extend_from_slice(e.vector());
    }
    std::borrow::Cow::Owned(out)
}

/// A searchable, immutable segment: the chunks of one or more data files (its parts, in
/// position order) and, once built, one graph over all of them.
pub(crate) struct Segment {
    /// The graph's id (its file is `seg-<id>.hnsw`); a freshly sealed segment has one part
    /// with the same id.
    pub(crate) id: u64,
    /// Data files (`seg-<part>.bin`) and how many chunks each holds.
    pub(crate) parts: Vec<(u64, usize)>,
    pub(crate) entries: Vec<Arc<Entry>>,
    pub(crate) graph: OnceLock<SegGraph>,
    /// Until the graph is built: its chunks' int8 codes (those the growing segment kept when
    /// it was sealed), so that searches scan codes rather than every chunk's f32 vector.
    scan: std::sync::Mutex<Option<Arc<crate::codes::RowCodes>>>,
    /// BM25 postings of all its chunks, rows = positions (`seg-<id>.post`).
    pub(crate) postings: Arc<crate::postings::SegPostings>,
    /// How many searches more ask the kernel to read their re-scored vectors ahead: set when
    /// one's re-scoring took as long as reads from disk ([`COLD_RESCORE`]).
    cold: AtomicU32,
}

/// A graph search's re-scoring that takes this long read its vectors from disk (in memory,
/// ~13 vectors take 5-20 us; a read from an SSD ~100 us).
const COLD_RESCORE: std::time::Duration = std::time::Duration::from_micros(200);
/// The searches of a segment that read their re-scored vectors ahead after a slow one.
const COLD_SEARCHES: u32 = 1024;

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("id", &self.id)
            .field("parts", &self.parts)
            .field("entries", &self.entries.len())
            .field("graph_built", &self.graph.get().is_some())
            .finish()
    }
}

impl Segment {
    /// A segment of one data file with the same id.
    pub(crate) fn new(
        id: u64,
        entries: Vec<Arc<Entry>>,
        postings: Arc<crate::postings::SegPostings>,
    ) -> Self {
        Segment::with_parts(id, vec![(id, entries.len())], entries, postings)
    }

    /// A segment over several data files.
    pub(crate) fn with_parts(
        id: u64,
        parts: Vec<(u64, usize)>,
        entries: Vec<Arc<Entry>>,
        postings: Arc<crate::postings::SegPostings>,
    ) -> Self {
        Segment {
            id,
            parts,
            entries,
            graph: OnceLock::new(),
            scan: std::sync::Mutex::new(None),
            postings,
            cold: AtomicU32::new(0),
        }
    }

    /// Gives the segment its chunks' codes (row `i` is `entries[i]`'s) to scan until its graph
    /// is built; ignored when the rows do not match the chunks or the graph is there.
    pub(crate) fn scan_codes_until_graph(&self, codes: crate::codes::RowCodes) {
        if codes.len() == self.entries.len() && self.graph.get().is_none() {
            *self.scan.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(codes));
        }
    }

    /// Sets the built graph (searches use it from now on) and lets the codes scanned until
    /// then go.
    pub(crate) fn set_graph(&self, g: SegGraph) {
        let _ = self.graph.set(g);
        self.scan.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// The codes scanned until the graph is built, if the segment has them.
    fn scan(&self) -> Option<Arc<crate::codes::RowCodes>> {
        self.scan.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn build_graph(&self, spec: GraphSpec) -> SegGraph {
        match spec.ann {
            AnnKind::Hnsw => {
                let dim = self.entries.first().map_or(1, |e| e.vector().len());
                let params = crate::hnsw::HnswParams {
                    m: spec.m,
                    ef_construction: spec.ef_construction,
                    seed: self.id,
                };
                SegGraph::Own(crate::hnsw::Hnsw::build(
                    dim,
                    &flat(&self.entries),
                    params,
                    spec.threads,
                ))
            }
            AnnKind::InstantDistance => {
                let points: Vec<UnitVector> = self
                    .entries
                    .iter()
                    .map(|e| UnitVector(e.vector().to_vec()))
                    .collect();
                let values: Vec<u32> = (0..self.entries.len() as u32).collect();
                SegGraph::Instant(
                    Builder::default()
                        .ef_construction(spec.ef_construction)
                        .ef_search(spec.ef_search)
                        .seed(self.id)
                        .build(points, values),
                )
            }
        }
    }

    /// Each part's entries, with its data file when the part is that whole mapped file in row
    /// order (then the file's dead marks are the part's; a part of an earlier format is not).
    pub(crate) fn file_parts(&self) -> Vec<(&[Arc<Entry>], Option<&Arc<DataFile>>)> {
        let mut at = 0;
        self.parts
            .iter()
            .map(|&(_, len)| {
                let part = &self.entries[at..at + len];
                at += len;
                let file = match part.first().and_then(|e| e.mapped_at()) {
                    Some((file, 0))
                        if file.len() == len
                            && part
                                .last()
                                .and_then(|e| e.mapped_at())
                                .is_some_and(|(f, r)| Arc::ptr_eq(f, file) && r == len - 1) =>
                    {
                        Some(file)
                    }
                    _ => None,
                };
                (part, file)
            })
            .collect()
    }

    /// Which of its positions are live: a part that is a whole mapped data file from the
    /// file's marks (without visiting its chunks), any other part by `live`.
    pub(crate) fn live_positions(&self, live: &dyn Fn(&Entry) -> bool) -> Vec<bool> {
        let mut out = Vec::with_capacity(self.entries.len());
        for (part, file) in self.file_parts() {
            match file {
                Some(file) => out.extend((0..part.len()).map(|row| !file.is_dead(row))),
                None => out.extend(part.iter().map(|e| live(e))),
            }
        }
        out
    }

    /// Live entries out of this segment's positions: a part that is a whole mapped data file
    /// reads its count of dead rows (kept by the shard as chunks die); any other part is
    /// visited.
    pub(crate) fn live_count(&self, live: &dyn Fn(&Entry) -> bool) -> usize {
        self.file_parts()
            .into_iter()
            .map(|(part, file)| match file {
                Some(file) => file.live_rows(),
                None => part.iter().filter(|e| live(e)).count(),
            })
            .sum()
    }

    /// Best `k` live entries for a unit query vector, as (dot, entry).
    #[cfg(test)]
    pub(crate) fn search(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        live: &dyn Fn(&Entry) -> bool,
    ) -> Vec<(f32, Arc<Entry>)> {
        self.search_above(q, k, ef, None, live)
    }

    /// [`Segment::search`] for a segment searched beside others whose hits already hold a
    /// k-th best dot of `floor`: entries that score below it are not wanted. A segment
    /// scanned by its codes (its graph not built yet) scores none of them exactly; a graph's
    /// walk ignores the floor (stopping it short of the floor lost the nearest chunks of
    /// small graphs, where the walk must pass through worse ones to reach them).
    pub(crate) fn search_above(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        floor: Option<f32>,
        live: &dyn Fn(&Entry) -> bool,
    ) -> Vec<(f32, Arc<Entry>)> {
        match self.graph.get() {
            Some(SegGraph::Own(g)) => {
                let accept = |i: u32| live(&self.entries[i as usize]);
                let cold = self.cold.load(Ordering::Relaxed);
                let exact = Exact {
                    q,
                    entries: &self.entries,
                    read_ahead: cold > 0,
                    began: std::cell::Cell::new(None),
                };
                let found = g.search_with(q, k, ef, &accept, Some(&exact));
                // re-scoring that took as long as reads from disk: the next searches ask for
                // their vectors ahead, all at once (a system call each, ~5% of a search whose
                // vectors are in memory, so only for a while after one that found them out)
                let slow = exact
                    .began
                    .get()
                    .is_some_and(|t| t.elapsed() >= COLD_RESCORE);
                if slow {
                    self.cold.store(COLD_SEARCHES, Ordering::Relaxed);
                } else if cold > 0 {
                    self.cold.store(cold - 1, Ordering::Relaxed);
                }
                return found
                    .into_iter()
                    .map(|(s, i)| (s, self.entries[i as usize].clone()))
                    .collect();
            }
            Some(SegGraph::Instant(graph)) => {
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
            None => {
                if let Some(codes) = self.scan().filter(|_| q.iter().all(|x| x.is_finite())) {
                    let exact = |i: usize| dot(q, self.entries[i].vector());
                    return codes.top_k(q, k, floor, &self.entries, exact, live);
                }
            }
        }
        exact_search(&self.entries, q, k, live)
    }
}

/// A graph search's re-scoring: the chunks' own vectors.
struct Exact<'a> {
    q: &'a [f32],
    entries: &'a [Arc<Entry>],
    /// Whether to ask the kernel to read the mapped vectors ahead (the segment's re-scoring
    /// found them on disk lately).
    read_ahead: bool,
    /// When the re-scoring began (its prefetch).
    began: std::cell::Cell<Option<std::time::Instant>>,
}

impl crate::hnsw::Rescore for Exact<'_> {
    fn score(&self, i: u32) -> f32 {
        dot(self.q, self.entries[i as usize].vector())
    }

    fn prefetch(&self, ids: &[u32]) {
        // the chunks first (each a miss), then their vectors, which the chunks say where
        for &i in ids {
            if let Some(e) = self.entries.get(i as usize) {
                crate::vector::prefetch_bytes(Arc::as_ptr(e).cast(), 64);
            }
        }
        self.began.set(Some(std::time::Instant::now()));
        for &i in ids {
            if let Some(e) = self.entries.get(i as usize) {
                if self.read_ahead {
                    if let Some((file, row)) = e.mapped_at() {
                        file.read_vector_ahead(row);
                    }
                }
                let v = e.vector();
                crate::vector::prefetch_bytes(v.as_ptr().cast(), std::mem::size_of_val(v));
            }
        }
    }
}

/// Exact top-k by dot product over `entries`.
pub(crate) fn exact_search(
    entries: &[Arc<Entry>],
    q: &[f32],
    k: usize,
    live: &dyn Fn(&Entry) -> bool,
) -> Vec<(f32, Arc<Entry>)> {
    top_live(entries, entries.iter().map(|e| dot(q, e.vector())), k, live)
}

/// The `k` best live of `entries` by `scores` (one a chunk, in order), best first: every chunk
/// scored first; liveness (for a chunk in memory, a lookup by its document's id) asked only of
/// the best, in rounds of a doubling size, until k are live.
pub(crate) fn top_live(
    entries: &[Arc<Entry>],
    scores: impl Iterator<Item = f32>,
    k: usize,
    live: &dyn Fn(&Entry) -> bool,
) -> Vec<(f32, Arc<Entry>)> {
    let mut scored: Vec<(f32, u32)> = scores
        .take(entries.len())
        .enumerate()
        .map(|(i, s)| (s, i as u32))
        .collect();
    let better = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let mut out = Vec::with_capacity(k.min(entries.len()));
    let (mut from, mut round) = (0, k.max(1));
    while out.len() < k && from < scored.len() {
        let rest = &mut scored[from..];
        let n = round.min(rest.len());
        if n < rest.len() {
            rest.select_nth_unstable_by(n - 1, better);
        }
        rest[..n].sort_unstable_by(better);
        for &(s, i) in &rest[..n] {
            let e = &entries[i as usize];
            if out.len() < k && live(e) {
                out.push((s, e.clone()));
            }
        }
        from += n;
        round *= 2;
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A chunk in memory of document `d<seq>` with this vector.
    pub(crate) fn entry(seq: u64, vector: Vec<f32>) -> Arc<Entry> {
        Arc::new(Entry::owned(
            seq,
            0,
            ChunkRecord {
                doc_id: format!("d{seq}"),
                chunk_id: format!("d{seq}#0"),
                text: String::new(),
                vector,
                sentences: Default::default(),
            },
        ))
    }

    /// A sealed segment without its graph yet scans the codes it was given, and finds exactly
    /// what a scan of every chunk's vector finds; once the graph is set the codes are let go
    /// and the graph answers.
    #[test]
    fn a_segment_scans_its_codes_until_its_graph_is_built() {
        let mut r = rand::rngs::StdRng::seed_from_u64(8);
        let entries: Vec<Arc<Entry>> = (0..600)
            .map(|i| {
                let mut v: Vec<f32> = (0..48).map(|_| r.gen_range(-1.0..1.0)).collect();
                crate::vector::normalize(&mut v);
                entry(i, v)
            })
            .collect();
        let built = crate::postings::Built::of(entries.iter().map(|e| e.text()));
        let postings = crate::postings::SegPostings::in_memory(&[&built]).unwrap();
        let seg = Segment::new(1, entries.clone(), postings);
        let mut codes = crate::codes::RowCodes::default();
        for e in &entries {
            codes.push(e.vector());
        }
        seg.scan_codes_until_graph(codes);
        assert!(seg.scan().is_some(), "the codes are taken");
        let live = |e: &Entry| e.seq % 7 != 3;
        let seqs =
            |v: Vec<(f32, Arc<Entry>)>| -> Vec<u64> { v.iter().map(|(_, e)| e.seq).collect() };
        for qi in 0..20 {
            let q = entries[qi * 13].vector().to_vec();
            for k in [1, 10, 50] {
                assert_eq!(
                    seqs(seg.search(&q, k, 64, &live)),
                    seqs(exact_search(&entries, &q, k, &live)),
                    "query {qi} k {k}"
                );
            }
        }
        // the search really reads the codes: codes of other vectors (negated) lead it astray
        let astray = Segment::new(3, entries.clone(), seg.postings.clone());
        let mut wrong = crate::codes::RowCodes::default();
        for e in &entries {
            wrong.push(&e.vector().iter().map(|x| -x).collect::<Vec<f32>>());
        }
        astray.scan_codes_until_graph(wrong);
        let q = entries[0].vector().to_vec();
        assert_ne!(
            seqs(astray.search(&q, 10, 64, &live)),
            seqs(exact_search(&entries, &q, 10, &live))
        );
        // codes of other rows than the chunks' are refused
        let other = Segment::new(2, entries[..10].to_vec(), seg.postings.clone());
        let mut few = crate::codes::RowCodes::default();
        few.push(entries[0].vector());
        other.scan_codes_until_graph(few);
        assert!(other.scan().is_none(), "one row for ten chunks");
        let spec = GraphSpec {
            ann: AnnKind::Hnsw,
            m: 16,
            ef_construction: 100,
            ef_search: 64,
            threads: 1,
            memory: crate::hnsw::GraphMemory::global(),
        };
        seg.set_graph(seg.build_graph(spec));
        assert!(seg.scan().is_none(), "the codes go with the graph built");
        assert_eq!(seg.search(entries[5].vector(), 1, 64, &live)[0].1.seq, 5);
    }

    /// The exact scan asks liveness only of its best chunks, in rounds: with most of the best
    /// dead, it still returns the k best live ones, best first, as a scan of every live chunk.
    #[test]
    fn exact_search_skips_dead_chunks_among_the_best() {
        let mut r = rand::rngs::StdRng::seed_from_u64(5);
        let entries: Vec<Arc<Entry>> = (0..500)
            .map(|i| {
                let mut v: Vec<f32> = (0..8).map(|_| r.gen_range(-1.0..1.0)).collect();
                crate::vector::normalize(&mut v);
                entry(i, v)
            })
            .collect();
        let q = entries[0].vector().to_vec();
        // dead: the 40 nearest but one in three of them, and every chunk with an odd seq
        let mut by_score: Vec<(f32, u64)> = entries
            .iter()
            .map(|e| (dot(&q, e.vector()), e.seq))
            .collect();
        by_score.sort_by(|a, b| b.0.total_cmp(&a.0));
        let dead: std::collections::HashSet<u64> = by_score[..40]
            .iter()
            .enumerate()
            .filter(|(j, _)| j % 3 != 0)
            .map(|(_, s)| s.1)
            .chain((0..500).filter(|s| s % 2 == 1))
            .collect();
        let live = |e: &Entry| !dead.contains(&e.seq);
        for k in [1, 10, 100, 300] {
            let got: Vec<u64> = exact_search(&entries, &q, k, &live)
                .iter()
                .map(|(_, e)| e.seq)
                .collect();
            let want: Vec<u64> = by_score
                .iter()
                .filter(|s| !dead.contains(&s.1))
                .take(k)
                .map(|s| s.1)
                .collect();
            assert_eq!(got, want, "k {k}");
        }
    }
}
