//! The coordinator's query-embedding cache: a query asked again (the same words, whatever the
//! spacing) reuses its embedding instead of a round trip to an embedder. Entries carry the
//! model that made them; an embedding from another model (the embedders were upgraded) empties
//! the cache. Bounded by `query.embed_cache_entries`, least recently used out first.
use std::collections::HashMap;
use std::sync::Mutex;

use ragfleet_proto::ModelIdentity;

/// The cache.
pub(crate) struct EmbedCache {
    cap: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, (Vec<f32>, u64)>,
    model: Option<ModelIdentity>,
    tick: u64,
}

fn key(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl EmbedCache {
    /// A cache of at most `cap` embeddings (0: off).
    pub(crate) fn new(cap: usize) -> Self {
        EmbedCache {
            cap,
            inner: Mutex::default(),
        }
    }

    /// The cached embedding of `text`, counted as a hit or a miss.
    pub(crate) fn get(&self, text: &str) -> Option<(Vec<f32>, ModelIdentity)> {
        if self.cap == 0 {
            return None;
        }
        let mut g = self.inner.lock().expect("embed cache");
        g.tick += 1;
        let tick = g.tick;
        let model = g.model.clone();
        let hit = g.map.get_mut(&key(text)).and_then(|(v, used)| {
            *used = tick;
            Some((v.clone(), model?))
        });
        let outcome = if hit.is_some() { "hit" } else { "miss" };
        crate::metrics::get()
            .cache
            .with_label_values(&["query_embedding", outcome])
            .inc();
        hit
    }

    /// Keeps the embedding of `text` made by `model`.
    pub(crate) fn put(&self, text: &str, vector: &[f32], model: &ModelIdentity) {
        if self.cap == 0 {
            return;
        }
        let mut g = self.inner.lock().expect("embed cache");
        if g.model.as_ref() != Some(model) {
            // another model: nothing cached is comparable any more
            g.map.clear();
            g.model = Some(model.clone());
        }
        if g.map.len() >= self.cap {
            // drop the least recently used eighth
            let mut ages: Vec<u64> = g.map.values().map(|(_, t)| *t).collect();
            ages.sort_unstable();
            let cut = ages[(ages.len() / 8).min(ages.len() - 1)];
            g.map.retain(|_, (_, t)| *t > cut);
        }
        g.tick += 1;
        let tick = g.tick;
        g.map.insert(key(text), (vector.to_vec(), tick));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().expect("embed cache").map.len()
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
        assert!(c.get("What is rust").is_none(), "case is the model's business");
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
    }
}
