//! What `GET /metrics` exposes (Prometheus text format): requests by endpoint and outcome, HTTP
//! latency, the per-stage latencies every answer reports (embed, search, rerank, first token,
//! generate, total), coverage, answers by mode and end reason, documents and chunks ingested,
//! requests in flight, and, read from the cluster at scrape time, nodes alive and replicas by
//! state.
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use ragfleet_proto::{ClusterStatus, Coverage, Timings};

/// The gateway's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests by endpoint and outcome (`ok` or the error code).
    pub requests: IntCounterVec,
    /// HTTP request latency by endpoint (to the response head; a stream's to its first byte).
    pub http_seconds: HistogramVec,
    /// Per-stage latency of answered queries.
    pub stage_seconds: HistogramVec,
    /// Share of shards that answered each query.
    pub coverage: Histogram,
    /// Queries some shard was left out of, by reason (`deadline`, `no_live_replica`, `error`).
    pub left_out: IntCounterVec,
    /// Answers by how they were made and why they ended.
    pub answers: IntCounterVec,
    /// Documents and chunks acknowledged through the gateway.
    pub ingested: IntCounterVec,
    /// Requests in flight by endpoint.
    pub in_flight: IntGaugeVec,
    /// Nodes answering heartbeats (at the last scrape).
    pub nodes_alive: IntGauge,
    /// Shard replicas by state (at the last scrape).
    pub replicas: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("ragfleet".into()), None).expect("registry");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let o = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let h = HistogramVec::new(o, labels).expect("metric");
            registry.register(Box::new(h.clone())).expect("register");
            h
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric");
            registry.register(Box::new(g.clone())).expect("register");
            g
        };
        let requests = counter(
            "http_requests_total",
            "HTTP requests by endpoint and outcome",
            &["endpoint", "outcome"],
        );
        let http_seconds = histogram(
            "http_request_seconds",
            "HTTP request latency by endpoint (streams: to the response head)",
            &["endpoint"],
        );
        let stage_seconds = histogram(
            "stage_seconds",
            "Per-stage latency of answered queries (embed, search, rerank, first_token, generate, total)",
            &["stage"],
        );
        let coverage = Histogram::with_opts(
            HistogramOpts::new("coverage_ratio", "Share of shards that answered a query")
                .buckets(vec![0.0, 0.25, 0.5, 0.75, 0.99, 1.0]),
        )
        .expect("metric");
        registry
            .register(Box::new(coverage.clone()))
            .expect("register");
        let left_out = counter(
            "shards_left_out_total",
            "Shards left out of a query, by reason",
            &["reason"],
        );
        let answers = counter(
            "answers_total",
            "Answers by answer mode and end reason",
            &["answer_mode", "end_reason"],
        );
        let ingested = counter(
            "ingested_total",
            "Documents and chunks acknowledged through this gateway",
            &["kind"],
        );
        let in_flight = gauges("in_flight", "Requests in flight by endpoint", &["endpoint"]);
        let nodes_alive = IntGauge::new("nodes_alive", "Nodes answering heartbeats").expect("m");
        registry
            .register(Box::new(nodes_alive.clone()))
            .expect("register");
        let replicas = gauges("replicas", "Shard replicas by state", &["state"]);
        Metrics {
            registry,
            requests,
            http_seconds,
            stage_seconds,
            coverage,
            left_out,
            answers,
            ingested,
            in_flight,
            nodes_alive,
            replicas,
        }
    }

    /// Records the coverage and stage timings of an answered query.
    pub fn query(&self, coverage: &Coverage, t: &Timings, answered: bool) {
        if coverage.shards_total > 0 {
            self.coverage.observe(coverage.fraction());
        }
        for l in &coverage.left_out {
            let reason = l.reason.split(':').next().unwrap_or("error");
            self.left_out.with_label_values(&[reason]).inc();
        }
        let mut stages = vec![
            ("embed", t.embed),
            ("search", t.search),
            ("rerank", t.rerank),
            ("total", t.total),
        ];
        if answered {
            stages.extend([("first_token", t.first_token), ("generate", t.generate)]);
        }
        for (stage, ms) in stages {
            if ms > 0.0 || stage == "total" {
                self.stage_seconds
                    .with_label_values(&[stage])
                    .observe(ms / 1000.0);
            }
        }
    }

    /// Takes the cluster's state as the coordinator sees it.
    pub fn cluster(&self, s: &ClusterStatus) {
        self.nodes_alive
            .set(s.nodes.iter().filter(|n| n.alive).count() as i64);
        self.replicas.reset();
        for shard in &s.shards {
            for r in &shard.replicas {
                self.replicas.with_label_values(&[r.state.as_str()]).inc();
            }
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Merges Prometheus text expositions into one: every sample of `labelled` gets an
/// `instance="..."` label, and each metric family is written once (its `# HELP` and `# TYPE`,
/// then its samples from every source), as the format requires.
pub fn merge(own: &str, labelled: &[(String, String)]) -> String {
    // family name -> (help/type lines, samples), in first-seen order
    let mut order: Vec<String> = Vec::new();
    let mut families: std::collections::HashMap<String, (Vec<String>, Vec<String>)> =
        std::collections::HashMap::new();
    let mut take = |text: &str, instance: Option<&str>| {
        let mut current = String::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
            {
                current = rest.split_whitespace().next().unwrap_or("").to_string();
                let f = families.entry(current.clone()).or_insert_with(|| {
                    order.push(current.clone());
                    Default::default()
                });
                if !f.0.iter().any(|l| l == line) {
                    f.0.push(line.to_string());
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let sample = match instance {
                None => line.to_string(),
                Some(i) => {
                    let i = i.replace('\\', "\\\\").replace('"', "\\\"");
                    match line.find('{') {
                        Some(p) if line[..p].find(' ').is_none() => {
                            format!("{}{{instance=\"{i}\",{}", &line[..p], &line[p + 1..])
                        }
                        _ => match line.find(' ') {
                            Some(p) => format!("{}{{instance=\"{i}\"}}{}", &line[..p], &line[p..]),
                            None => continue,
                        },
                    }
                }
            };
            let f = families.entry(current.clone()).or_insert_with(|| {
                order.push(current.clone());
                Default::default()
            });
            f.1.push(sample);
        }
    };
    take(own, None);
    for (instance, text) in labelled {
        take(text, Some(instance));
    }
    let mut out = String::new();
    for name in order {
        if let Some((head, samples)) = families.get(&name) {
            for l in head.iter().chain(samples) {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragfleet_proto::LeftOut;

    #[test]
    fn merged_expositions_label_each_process_and_keep_families_whole() {
        let own = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n";
        let node = "# HELP b B.\n# TYPE b gauge\nb 7\n# HELP c_total C.\n# TYPE c_total counter\nc_total{shard=\"0\"} 1\n";
        let other = "# HELP b B.\n# TYPE b gauge\nb 9\n";
        let m = merge(
            own,
            &[("n1:1".into(), node.into()), ("n2:2".into(), other.into())],
        );
        assert_eq!(
            m,
            "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n\
             # HELP b B.\n# TYPE b gauge\nb{instance=\"n1:1\"} 7\nb{instance=\"n2:2\"} 9\n\
             # HELP c_total C.\n# TYPE c_total counter\nc_total{instance=\"n1:1\",shard=\"0\"} 1\n"
        );
    }

    #[test]
    fn a_query_feeds_stage_histograms_coverage_and_left_out_reasons() {
        let m = Metrics::new();
        let cov = Coverage {
            shards_total: 4,
            shards_answered: 3,
            left_out: vec![LeftOut {
                shard: 2,
                reason: "error: boom".into(),
            }],
        };
        let t = Timings {
            embed: 2.0,
            search: 5.0,
            total: 9.0,
            ..Default::default()
        };
        m.query(&cov, &t, false);
        let text = m.render();
        assert!(
            text.contains("ragfleet_stage_seconds_count{stage=\"embed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ragfleet_stage_seconds_count{stage=\"total\"} 1"),
            "{text}"
        );
        assert!(!text.contains("stage=\"generate\""), "{text}");
        assert!(
            text.contains("ragfleet_shards_left_out_total{reason=\"error\"} 1"),
            "{text}"
        );
        assert!(text.contains("ragfleet_coverage_ratio_sum 0.75"), "{text}");
    }
}
