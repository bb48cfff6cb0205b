//! Validation of a parsed `cluster.toml`: every rule, section by section, each error naming
//! the field it is about.
use std::collections::HashSet;
use std::net::SocketAddr;

use super::{invalid, ClusterConfig, ConfigError, NodeRole};

impl ClusterConfig {
    /// Checks every rule; the error names the field (the first one broken, section by section
    /// in the file's order: the cluster, nodes, index, query, the services, transport).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.version != 1 {
            return Err(invalid(
                "version",
                format!("unsupported version {} (expected 1)", self.version),
            ));
        }
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.cookie.len() < 8 {
            return Err(invalid("cookie", "must be at least 8 characters"));
        }
        if self.nodes.is_empty() {
            return Err(invalid("node", "at least one [[node]] is required"));
        }
        self.validate_nodes()?;
        self.validate_index()?;
        self.validate_query()?;
        self.validate_services()?;
        self.validate_transport()
    }

    /// Names, addresses and roles of the nodes; every role the cluster needs held somewhere.
    fn validate_nodes(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let f = |k: &str| format!("node[{i}].{k}");
            if n.name.is_empty()
                || !n
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(
                    f("name"),
                    format!("{:?} must be non-empty letters, digits, '-' or '_'", n.name),
                ));
            }
            if !names.insert(n.name.clone()) {
                return Err(invalid(
                    f("name"),
                    format!("duplicate node name {:?}", n.name),
                ));
            }
            let addr: SocketAddr = n.addr.parse().map_err(|_| {
                invalid(
                    f("addr"),
                    format!("{:?} is not host:port (an IP address and a port)", n.addr),
                )
            })?;
            if addr.port() == 0 {
                return Err(invalid(f("addr"), "port must not be 0"));
            }
            if !addrs.insert(addr) {
                return Err(invalid(f("addr"), format!("duplicate address {}", n.addr)));
            }
            if n.roles.is_empty() {
                return Err(invalid(f("roles"), "at least one role is required"));
            }
            if n.has(NodeRole::Embedder) && (n.embedder_replicas == 0 || n.embedder_replicas > 16) {
                return Err(invalid(f("embedder_replicas"), "must be between 1 and 16"));
            }
            if let Some(h) = &n.http_addr {
                let http: SocketAddr = h.parse().map_err(|_| {
                    invalid(
                        f("http_addr"),
                        format!("{h:?} is not host:port (an IP address and a port)"),
                    )
                })?;
                if !n.has(NodeRole::Coordinator) {
                    return Err(invalid(
                        f("http_addr"),
                        "only a node with the coordinator role serves HTTP",
                    ));
                }
                if !addrs.insert(http) {
                    return Err(invalid(f("http_addr"), format!("duplicate address {h}")));
                }
            }
        }
        for role in [NodeRole::Coordinator, NodeRole::Embedder, NodeRole::Shard] {
            if !self.nodes.iter().any(|n| n.has(role)) {
                return Err(invalid(
                    "node.roles",
                    format!("no node has the {role:?} role").to_lowercase(),
                ));
            }
        }
        Ok(())
    }

    /// `[index]`: shards, replication and quorum, segments and graphs, chunking, placement.
    fn validate_index(&self) -> Result<(), ConfigError> {
        let ix = &self.index;
        if ix.shards == 0 || ix.shards > 1024 {
            return Err(invalid("index.shards", "must be between 1 and 1024"));
        }
        let shard_nodes = self.shard_nodes().len() as u32;
        if ix.replication == 0 {
            return Err(invalid("index.replication", "must be at least 1"));
        }
        if ix.replication > shard_nodes {
            return Err(invalid(
                "index.replication",
                format!(
                    "{} is larger than the {} nodes with the shard role",
                    ix.replication, shard_nodes
                ),
            ));
        }
        if ix.write_quorum == 0 || ix.write_quorum > ix.replication {
            return Err(invalid(
                "index.write_quorum",
                format!("must be between 1 and replication ({})", ix.replication),
            ));
        }
        if ix.segment_size < 16 {
            return Err(invalid("index.segment_size", "must be at least 16"));
        }
        if !(2..=64).contains(&ix.merge_ratio) {
            return Err(invalid("index.merge_ratio", "must be between 2 and 64"));
        }
        if !(1..=8).contains(&ix.max_merges) {
            return Err(invalid("index.max_merges", "must be between 1 and 8"));
        }
        if !["hnsw", "instant-distance"].contains(&ix.ann.as_str()) {
            return Err(invalid(
                "index.ann",
                format!("{:?} is not one of \"hnsw\", \"instant-distance\"", ix.ann),
            ));
        }
        if !(4..=64).contains(&ix.hnsw_m) {
            return Err(invalid("index.hnsw_m", "must be between 4 and 64"));
        }
        if ix.anti_entropy_ms != 0 && ix.anti_entropy_ms < 100 {
            return Err(invalid(
                "index.anti_entropy_ms",
                "must be 0 (off) or at least 100",
            ));
        }
        if ix.chunk_tokens < 16 || ix.chunk_tokens > 512 {
            return Err(invalid("index.chunk_tokens", "must be between 16 and 512"));
        }
        if ix.chunk_overlap >= ix.chunk_tokens / 2 {
            return Err(invalid(
                "index.chunk_overlap",
                "must be less than half of chunk_tokens",
            ));
        }
        if ix.ef_search == 0 || ix.ef_construction == 0 {
            return Err(invalid(
                "index.ef_search",
                "ef_search and ef_construction must be positive",
            ));
        }
        if let Some(p) = &ix.placement {
            if p.len() != ix.shards as usize {
                return Err(invalid(
                    "index.placement",
                    format!("has {} entries for {} shards", p.len(), ix.shards),
                ));
            }
            for (s, nodes) in p.iter().enumerate() {
                let field = format!("index.placement[{s}]");
                if nodes.len() != ix.replication as usize {
                    return Err(invalid(
                        field,
                        format!(
                            "lists {} nodes, replication is {}",
                            nodes.len(),
                            ix.replication
                        ),
                    ));
                }
                let mut seen = HashSet::new();
                for n in nodes {
                    let node = self
                        .node(n)
                        .map_err(|_| invalid(field.clone(), format!("unknown node {n:?}")))?;
                    if !node.has(NodeRole::Shard) {
                        return Err(invalid(
                            field.clone(),
                            format!("node {n:?} has no shard role"),
                        ));
                    }
                    if !seen.insert(n) {
                        return Err(invalid(field.clone(), format!("node {n:?} listed twice")));
                    }
                }
            }
        }
        if self.index.max_searches == 0 || self.index.max_searches > 4096 {
            return Err(invalid("index.max_searches", "must be between 1 and 4096"));
        }
        Ok(())
    }

    /// `[query]`: result sizes, deadlines, weights, caches, hedging and admission.
    fn validate_query(&self) -> Result<(), ConfigError> {
        let q = &self.query;
        if q.top_k == 0 || q.top_k > 1000 {
            return Err(invalid("query.top_k", "must be between 1 and 1000"));
        }
        if q.shard_deadline_ms == 0 {
            return Err(invalid("query.shard_deadline_ms", "must be positive"));
        }
        if q.deadline_ms < q.shard_deadline_ms {
            return Err(invalid(
                "query.deadline_ms",
                "must be at least shard_deadline_ms",
            ));
        }
        if !(0.0..=1.0).contains(&q.hybrid_dense_weight) {
            return Err(invalid(
                "query.hybrid_dense_weight",
                "must be between 0 and 1",
            ));
        }
        if !(0.0..=1.0).contains(&q.rerank_weight) {
            return Err(invalid("query.rerank_weight", "must be between 0 and 1"));
        }
        if q.rerank_deadline_ms == 0 {
            return Err(invalid("query.rerank_deadline_ms", "must be positive"));
        }
        if q.rerank_depth == 0 {
            return Err(invalid("query.rerank_depth", "must be positive"));
        }
        if q.rerank == Some(true) && !self.nodes.iter().any(|n| n.has(NodeRole::Reranker)) {
            return Err(invalid(
                "query.rerank",
                "is true but no node has the reranker role",
            ));
        }
        if q.embed_cache_entries > 1_000_000 {
            return Err(invalid(
                "query.embed_cache_entries",
                "must be at most 1000000 (0 turns the cache off)",
            ));
        }
        if q.result_cache_entries > 1_000_000 {
            return Err(invalid(
                "query.result_cache_entries",
                "must be at most 1000000 (0 turns the cache off)",
            ));
        }
        if !(0.0..=1.0).contains(&q.hedge_max_ratio) {
            return Err(invalid("query.hedge_max_ratio", "must be between 0 and 1"));
        }
        if q.hedge_min_ms >= q.shard_deadline_ms {
            return Err(invalid(
                "query.hedge_min_ms",
                "must be below query.shard_deadline_ms",
            ));
        }
        if q.max_in_flight == 0 {
            return Err(invalid("query.max_in_flight", "must be positive"));
        }
        if q.max_answers_in_flight == 0 || q.max_answers_in_flight > q.max_in_flight {
            return Err(invalid(
                "query.max_answers_in_flight",
                "must be between 1 and query.max_in_flight",
            ));
        }
        if q.max_query_bytes == 0 {
            return Err(invalid("query.max_query_bytes", "must be positive"));
        }
        Ok(())
    }

    /// `[embedder]`, `[reranker]` and `[generator]`: batches, queues and sampling.
    fn validate_services(&self) -> Result<(), ConfigError> {
        let e = &self.embedder;
        if e.max_queue < e.ingest_batch.max(e.max_batch) || e.max_queue > 1 << 20 {
            return Err(invalid(
                "embedder.max_queue",
                "must be at least embedder.ingest_batch and max_batch, and at most 1048576",
            ));
        }
        if self.embedder.max_batch == 0 || self.embedder.ingest_batch == 0 {
            return Err(invalid(
                "embedder.max_batch",
                "batch sizes must be positive",
            ));
        }
        if self.reranker.max_queue == 0 || self.reranker.max_queue > 4096 {
            return Err(invalid("reranker.max_queue", "must be between 1 and 4096"));
        }
        if self.generator.max_tokens == 0 || self.generator.max_tokens > 2048 {
            return Err(invalid(
                "generator.max_tokens",
                "must be between 1 and 2048",
            ));
        }
        let g = &self.generator;
        if !(1.0..=3.0).contains(&g.repetition_penalty) {
            return Err(invalid(
                "generator.repetition_penalty",
                "must be between 1 and 3",
            ));
        }
        if !(-2.0..=2.0).contains(&g.frequency_penalty) {
            return Err(invalid(
                "generator.frequency_penalty",
                "must be between -2 and 2",
            ));
        }
        if !(-2.0..=2.0).contains(&g.presence_penalty) {
            return Err(invalid(
                "generator.presence_penalty",
                "must be between -2 and 2",
            ));
        }
        if g.no_repeat_ngram == 1 || g.no_repeat_ngram > 16 {
            return Err(invalid(
                "generator.no_repeat_ngram",
                "must be 0 (off) or 2 to 16",
            ));
        }
        if !(0.0..=1.0).contains(&g.min_grounding) {
            return Err(invalid(
                "generator.min_grounding",
                "must be between 0 and 1",
            ));
        }
        if self.generator.max_queue > 1024 {
            return Err(invalid("generator.max_queue", "must be at most 1024"));
        }
        if self.generator.max_streams == 0 {
            return Err(invalid("generator.max_streams", "must be positive"));
        }
        if self.generator.context_tokens < 64 {
            return Err(invalid("generator.context_tokens", "must be at least 64"));
        }
        Ok(())
    }

    /// `[tls]`, `[http]`, `[failure]` and `[supervision]`.
    fn validate_transport(&self) -> Result<(), ConfigError> {
        if let Some(t) = &self.tls {
            if t.server_name.trim().is_empty() {
                return Err(invalid("tls.server_name", "must not be empty"));
            }
            for (k, p) in [
                ("tls.ca", &t.ca),
                ("tls.cert", &t.cert),
                ("tls.key", &t.key),
            ] {
                if p.as_os_str().is_empty() {
                    return Err(invalid(k, "must name a PEM file"));
                }
            }
        }
        let h = &self.http;
        if h.max_body_bytes < 1024 || h.max_body_bytes > 256 << 20 {
            return Err(invalid(
                "http.max_body_bytes",
                "must be between 1 KiB and 256 MiB",
            ));
        }
        if h.max_documents == 0 {
            return Err(invalid("http.max_documents", "must be positive"));
        }
        if h.max_connections == 0 || h.max_connections > 65_536 {
            return Err(invalid(
                "http.max_connections",
                "must be between 1 and 65536",
            ));
        }
        if h.header_timeout_ms < 100 || h.header_timeout_ms > 600_000 {
            return Err(invalid(
                "http.header_timeout_ms",
                "must be between 100 and 600000",
            ));
        }
        if h.api_keys.iter().any(|k| k.len() < 16) {
            return Err(invalid(
                "http.api_keys",
                "every key must be at least 16 characters",
            ));
        }
        let fl = &self.failure;
        if fl.heartbeat_ms == 0 || fl.suspect_after_ms <= fl.heartbeat_ms {
            return Err(invalid(
                "failure.suspect_after_ms",
                "must be larger than heartbeat_ms (> 0)",
            ));
        }
        if self.supervision.within_secs == 0 {
            return Err(invalid("supervision.within_secs", "must be positive"));
        }
        Ok(())
    }
}
