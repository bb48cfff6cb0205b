//! A node process's own metrics (Prometheus): per-shard search latency, requests in flight per
//! role, actor restarts per supervisor, WAL fsyncs, documents and chunks acknowledged by its
//! coordinators. The node agent answers `Request::Metrics` with their text exposition, and the
//! HTTP gateway's `/metrics` merges every node's (each sample labelled with its `instance`).
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The process's metrics.
pub struct RuntimeMetrics {
    registry: Registry,
    search_seconds: HistogramVec,
    /// Requests a role is serving now.
    pub in_flight: IntGaugeVec,
    /// Children restarted, by supervisor.
    pub restarts: IntCounterVec,
    /// Documents and chunks acknowledged by this process's coordinators.
    pub ingested: IntCounterVec,
    /// Requests refused at once by admission control, by kind (`request`, `answer`).
    pub refused: IntCounterVec,
    /// Cache lookups by cache and outcome (`hit`, `miss`, `stale`).
    pub cache: IntCounterVec,
    /// Hedged shard requests by outcome (`sent`, `won`, `capped`).
    pub hedges: IntCounterVec,
    /// Work waiting for a role's model thread: texts for the embedders, requests for the
    /// rerankers.
    pub queued: IntGaugeVec,
    wal_fsyncs: IntCounter,
    wal_seen: AtomicU64,
}

static METRICS: LazyLock<RuntimeMetrics> = LazyLock::new(RuntimeMetrics::new);

/// This process's metrics.
pub fn get() -> &'static RuntimeMetrics {
    &METRICS
}

impl RuntimeMetrics {
    fn new() -> Self {
        let registry = Registry::new_custom(Some("ragfleet".into()), None).expect("registry");
        let search_seconds = HistogramVec::new(
            HistogramOpts::new("shard_search_seconds", "Search time of a shard replica").buckets(
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    1.0,
                ],
            ),
            &["shard"],
        )
        .expect("metric");
        let in_flight = IntGaugeVec::new(
            Opts::new("role_in_flight", "Requests a role is serving now"),
            &["role"],
        )
        .expect("metric");
        let restarts = IntCounterVec::new(
            Opts::new("actor_restarts_total", "Children restarted, by supervisor"),
            &["supervisor"],
        )
        .expect("metric");
        let ingested = IntCounterVec::new(
            Opts::new(
                "coordinator_ingested_total",
                "Documents and chunks acknowledged by this process's coordinators",
            ),
            &["kind"],
        )
        .expect("metric");
        let refused = IntCounterVec::new(
            Opts::new(
                "admission_refused_total",
                "Requests a coordinator refused at once (overloaded), by kind",
            ),
            &["kind"],
        )
        .expect("metric");
        let cache = IntCounterVec::new(
            Opts::new("cache_lookups_total", "Cache lookups by cache and outcome"),
            &["cache", "outcome"],
        )
        .expect("metric");
        let hedges = IntCounterVec::new(
            Opts::new(
                "hedges_total",
                "Hedged shard requests: sent, won (answered first), capped (not sent)",
            ),
            &["outcome"],
        )
        .expect("metric");
        let queued = IntGaugeVec::new(
            Opts::new(
                "queue_depth",
                "Work waiting for a role's model thread (embedder: texts, reranker: requests)",
            ),
            &["role"],
        )
        .expect("metric");
        let wal_fsyncs =
            IntCounter::new("wal_fsyncs_total", "WAL fsyncs of this process").expect("metric");
        for m in [
            Box::new(search_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(in_flight.clone()),
            Box::new(restarts.clone()),
            Box::new(ingested.clone()),
            Box::new(refused.clone()),
            Box::new(queued.clone()),
            Box::new(cache.clone()),
            Box::new(hedges.clone()),
            Box::new(wal_fsyncs.clone()),
        ] {
            registry.register(m).expect("register");
        }
        RuntimeMetrics {
            registry,
            search_seconds,
            in_flight,
            restarts,
            ingested,
            refused,
            queued,
            cache,
            hedges,
            wal_fsyncs,
            wal_seen: AtomicU64::new(0),
        }
    }

    /// Records one search of a shard replica.
    pub fn shard_search(&self, shard: u32, took: Duration) {
        self.search_seconds
            .with_label_values(&[&shard.to_string()])
            .observe(took.as_secs_f64());
    }

    /// Counts a request of `role` in flight until the guard drops.
    pub fn serving(&self, role: &str) -> InFlight {
        let g = self.in_flight.with_label_values(&[role]);
        g.inc();
        InFlight(g)
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let now = ragfleet_index::wal_fsyncs();
        let before = self.wal_seen.swap(now, Ordering::Relaxed);
        self.wal_fsyncs.inc_by(now.saturating_sub(before));
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// A request in flight (see [`RuntimeMetrics::serving`]).
pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
