//! The coordinator's caches.
//!
//! - The query-embedding cache: a query asked again (the same words, whatever the spacing)
//!   reuses its embedding instead of a round trip to an embedder. Entries carry the model that
//!   made them; an embedding from another model (the embedders were upgraded) empties the cache.
//! - The retrieval-result cache: a retrieval asked again (same words, mode, k and rerank
//!   setting) reuses its ranked hits, but only after every shard has confirmed, by a cheap
//!   `SearchAt` round trip, that the replica asked still holds the state (digest) the result
//!   was read at. Any write or deletion changes a shard's digest, so a cached result is never
//!   older than an acknowledged write: the check costs a round trip, and saves the embedding,
//!   the searches and the rerank.
//!
//! Both are bounded (`query.embed_cache_entries`, `query.result_cache_entries`), least recently
//! used out first, and count their hits, misses and stale entries for `status` and `/metrics`.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ragfleet_proto::{CacheStatus, ModelIdentity, RetrieveResult, SearchMode};

/// A bounded map, least recently used out first (an eighth at a time).
struct Lru<V> {
    cap: usize,
    map: HashMap<String, (V, u64)>,
    tick: u64,
}

impl<V: Clone> Lru<V> {
    fn new(cap: usize) -> Self {
        Lru {
            cap,
            map: HashMap::new(),
            tick: 0,
        }
    }

    fn get(&mut self, key: &str) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(key).map(|(v, used)| {
            *used = tick;
            v.clone()
        })
    }

    fn put(&mut self, key: String, v: V) {
        if self.map.len() >= self.cap && !self.map.contains_key(&key) {
            let mut ages: Vec<u64> = self.map.values().map(|(_, t)| *t).collect();
            ages.sort_unstable();
            let cut = ages[(ages.len() / 8).min(ages.len() - 1)];
            self.map.retain(|_, (_, t)| *t > cut);
        }
        self.tick += 1;
        let tick = self.tick;
        self.map.insert(key, (v, tick));
    }
}

/// How a lookup went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Hit,
    Miss,
    /// An entry was there but a shard had changed since it was made.
    Stale,
}

/// Lookup counts of one cache, for `status` and `/metrics`.
struct Counts {
    name: &'static str,
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
}

impl Counts {
    fn new(name: &'static str) -> Self {
        Counts {
            name,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            stale: AtomicU64::new(0),
        }
    }

    fn count(&self, o: Outcome) {
        let (n, label) = match o {
            Outcome::Hit => (&self.hits, "hit"),
            Outcome::Miss => (&self.misses, "miss"),
            Outcome::Stale => (&self.stale, "stale"),
        };
        n.fetch_add(1, Ordering::Relaxed);
        crate::metrics::get()
            .cache
            .with_label_values(&[self.name, label])
            .inc();
    }

    fn status(&self, entries: usize, capacity: usize) -> CacheStatus {
        CacheStatus {
            name: self.name.to_string(),
            entries: entries as u64,
            capacity: capacity as u64,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            stale: self.stale.load(Ordering::Relaxed),
        }
    }
}

/// A query's words, whatever the spacing.
fn normalise(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The query-embedding cache.
pub(crate) struct EmbedCache {
    cap: usize,
    inner: Mutex<(Lru<Vec<f32>>, Option<ModelIdentity>)>,
    counts: Counts,
}

impl EmbedCache {
    /// A cache of at most `cap` embeddings (0: off).
    pub(crate) fn new(cap: usize) -> Self {
        EmbedCache {
            cap,
            inner: Mutex::new((Lru::new(cap), None)),
            counts: Counts::new("query_embedding"),
        }
    }

    /// The cached embedding of `text`, counted as a hit or a miss.
    pub(crate) fn get(&self, text: &str) -> Option<(Vec<f32>, ModelIdentity)> {
        if self.cap == 0 {
            return None;
        }
        let mut g = self.inner.lock().expect("embed cache");
        let hit = g.0.get(&normalise(text)).zip(g.1.clone());
        drop(g);
        self.counts.count(if hit.is_some() {
            Outcome::Hit
        } else {
            Outcome::Miss
        });
        hit
    }

    /// Keeps the embedding of `text` made by `model`.
    pub(crate) fn put(&self, text: &str, vector: &[f32], model: &ModelIdentity) {
        if self.cap == 0 {
            return;
        }
        let mut g = self.inner.lock().expect("embed cache");
        if g.1.as_ref() != Some(model) {
            // another model: nothing cached is comparable any more
            g.0 = Lru::new(self.cap);
            g.1 = Some(model.clone());
        }
        g.0.put(normalise(text), vector.to_vec());
    }

    pub(crate) fn status(&self) -> CacheStatus {
        let n = self.inner.lock().expect("embed cache").0.map.len();
        self.counts.status(n, self.cap)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().expect("embed cache").0.map.len()
    }
}

/// A retrieval result as it was computed, and what it was read from.
#[derive(Debug)]
pub(crate) struct CachedResult {
    /// The query embedding (sent again when a shard changed).
    pub vector: Vec<f32>,
    pub model: Option<ModelIdentity>,
    /// The digest of the replica of every shard that answered, by shard.
    pub digests: Vec<u64>,
    pub result: RetrieveResult,
}

/// The retrieval-result cache.
pub(crate) struct ResultCache {
    cap: usize,
    inner: Mutex<Lru<Arc<CachedResult>>>,
    counts: Counts,
}

impl ResultCache {
    /// A cache of at most `cap` results (0: off).
    pub(crate) fn new(cap: usize) -> Self {
        ResultCache {
            cap,
            inner: Mutex::new(Lru::new(cap)),
            counts: Counts::new("retrieval"),
        }
    }

    /// The key of a retrieval: its words, mode, k and whether it is reranked; `None` when the
    /// cache is off.
    pub(crate) fn key(&self, text: &str, mode: SearchMode, k: u32, rerank: bool) -> Option<String> {
        (self.cap > 0).then(|| format!("{mode:?}\u{1f}{k}\u{1f}{rerank}\u{1f}{}", normalise(text)))
    }

    /// The entry under `key`, uncounted: whether it still holds is for the shards to say.
    pub(crate) fn get(&self, key: &str) -> Option<Arc<CachedResult>> {
        self.inner.lock().expect("result cache").get(key)
    }

    pub(crate) fn put(&self, key: String, entry: CachedResult) {
        self.inner
            .lock()
            .expect("result cache")
            .put(key, Arc::new(entry));
    }

    /// Counts a lookup.
    pub(crate) fn count(&self, o: Outcome) {
        self.counts.count(o);
    }

    pub(crate) fn status(&self) -> CacheStatus {
        let n = self.inner.lock().expect("result cache").map.len();
        self.counts.status(n, self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> ModelIdentity {
        ModelIdentity {
            name: name.into(),
            weights_sha256: "x".into(),
            dim: 2,
            max_len: 8,
            pooling: "mean".into(),
            normalized: true,
        }
    }

    #[test]
    fn a_query_asked_again_hits_whatever_its_spacing() {
        let c = EmbedCache::new(4);
        assert!(c.get("what is rust").is_none());
        c.put("what is rust", &[1.0, 0.0], &model("m"));
        let (v, m) = c.get("  what   is\trust ").unwrap();
        assert_eq!(v, vec![1.0, 0.0]);
        assert_eq!(m.name, "m");
        assert!(
            c.get("What is rust").is_none(),
            "case is the model's business"
        );
    }

    #[test]
    fn the_least_recently_used_go_first_and_another_model_empties_it() {
        let c = EmbedCache::new(8);
        for i in 0..8 {
            c.put(&format!("q{i}"), &[i as f32, 0.0], &model("m"));
        }
        assert!(c.get("q0").is_some()); // q0 is now the most recent
        c.put("q8", &[8.0, 0.0], &model("m"));
        assert!(c.len() <= 8);
        assert!(c.get("q0").is_some());
        assert!(c.get("q1").is_none(), "the oldest went");
        c.put("q9", &[9.0, 0.0], &model("other"));
        assert_eq!(c.len(), 1);
        assert!(c.get("q0").is_none());
        assert_eq!(c.get("q9").unwrap().1.name, "other");
        let off = EmbedCache::new(0);
        off.put("q", &[1.0, 0.0], &model("m"));
        assert!(off.get("q").is_none());
        let s = c.status();
        assert_eq!((s.entries, s.capacity), (1, 8));
        assert_eq!((s.hits, s.misses), (3, 2));
    }

    fn result(id: &str) -> CachedResult {
        CachedResult {
            vector: vec![1.0],
            model: None,
            digests: vec![7, 9],
            result: RetrieveResult {
                hits: Vec::new(),
                coverage: Default::default(),
                timings_ms: Default::default(),
                rerank: Some(id.to_string()),
                degraded: None,
                cache: None,
                hedged: Vec::new(),
                coordinator: "n1".into(),
            },
        }
    }

    #[test]
    fn retrieval_keys_tell_mode_k_and_rerank_apart_and_the_cache_is_bounded() {
        let c = ResultCache::new(4);
        let k = c
            .key(" what  is rust", SearchMode::Hybrid, 10, true)
            .unwrap();
        assert_eq!(
            Some(k.clone()),
            c.key("what is rust ", SearchMode::Hybrid, 10, true)
        );
        for other in [
            c.key("what is rust", SearchMode::Dense, 10, true),
            c.key("what is rust", SearchMode::Hybrid, 5, true),
            c.key("what is rust", SearchMode::Hybrid, 10, false),
            c.key("what is Rust", SearchMode::Hybrid, 10, true),
        ] {
            assert_ne!(other.unwrap(), k);
        }
        c.put(k.clone(), result("a"));
        assert_eq!(c.get(&k).unwrap().digests, vec![7, 9]);
        for i in 0..10 {
            c.put(format!("q{i}"), result("b"));
        }
        assert!(c.status().entries <= 4);
        c.count(Outcome::Hit);
        c.count(Outcome::Stale);
        c.count(Outcome::Miss);
        c.count(Outcome::Hit);
        let s = c.status();
        assert_eq!((s.hits, s.misses, s.stale), (2, 1, 1));
        assert!((s.hit_rate() - 0.5).abs() < 1e-9);
        assert!(ResultCache::new(0)
            .key("q", SearchMode::Dense, 1, false)
            .is_none());
    }
}
