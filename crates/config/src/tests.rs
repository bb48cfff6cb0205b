use super::*;
use std::path::Path;

const GOOD: &str = r#"
version = 1
name = "t"
cookie = "secret-cookie"

[[node]]
name = "a"
addr = "127.0.0.1:7001"
roles = ["coordinator", "embedder", "shard"]

[[node]]
name = "b"
addr = "127.0.0.1:7002"
roles = ["shard", "reranker"]

[[node]]
name = "c"
addr = "127.0.0.1:7003"
roles = ["shard", "coordinator"]

[index]
shards = 4
replication = 2
"#;

fn err_of(text: &str) -> String {
    ClusterConfig::parse(text).unwrap_err().to_string()
}

#[test]
fn repository_cluster_toml_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster.toml");
    let cfg = ClusterConfig::load(&path).expect("root cluster.toml loads");
    assert_eq!(cfg.nodes.len(), 3);
    assert_eq!(cfg.index.shards, 4);
    assert_eq!(cfg.index.replication, 2);
}

#[test]
fn placement_puts_replicas_on_distinct_nodes() {
    let cfg = ClusterConfig::parse(GOOD).unwrap();
    let p = cfg.placement();
    assert_eq!(p.len(), 4);
    for nodes in &p {
        assert_eq!(nodes.len(), 2);
        assert_ne!(nodes[0], nodes[1]);
    }
    // every node holds some replica, and it is deterministic
    assert_eq!(p, cfg.placement());
    for n in ["a", "b", "c"] {
        assert!(!cfg.shards_of(n).is_empty(), "{n} holds nothing");
    }
}

#[test]
fn shard_hash_is_stable_and_spreads() {
    assert_eq!(shard_for("doc-1", 4), shard_for("doc-1", 4));
    let mut counts = [0; 4];
    for i in 0..1000 {
        counts[shard_for(&format!("doc-{i}"), 4) as usize] += 1;
    }
    assert!(counts.iter().all(|&c| c > 150), "{counts:?}");
}

#[test]
fn errors_name_the_field() {
    let cases = [
        (GOOD.replace("version = 1", "version = 2"), "version"),
        (
            GOOD.replace("replication = 2", "replication = 4"),
            "index.replication",
        ),
        (
            GOOD.replace("127.0.0.1:7002", "127.0.0.1:7001"),
            "node[1].addr",
        ),
        (GOOD.replace("name = \"b\"", "name = \"a\""), "node[1].name"),
        (GOOD.replace("127.0.0.1:7003", "localhost"), "node[2].addr"),
        (GOOD.replace("secret-cookie", "x"), "cookie"),
        (GOOD.replace("shards = 4", "shards = 0"), "index.shards"),
        (
            GOOD.replace("shards = 4", "shards = 4\nanti_entropy_ms = 5"),
            "index.anti_entropy_ms",
        ),
        (
            GOOD.replace("shards = 4", "shards = 4\nmerge_ratio = 1"),
            "index.merge_ratio",
        ),
        (
            GOOD.replace("shards = 4", "shards = 4\nmax_merges = 0"),
            "index.max_merges",
        ),
        (
            GOOD.replace("shards = 4", "shards = 4\nmax_merges = 9"),
            "index.max_merges",
        ),
        (
            GOOD.replace("shards = 4", "shards = 4\nann = \"faiss\""),
            "index.ann",
        ),
        (
            GOOD.replace("shards = 4", "shards = 4\nhnsw_m = 200"),
            "index.hnsw_m",
        ),
        (
            format!("{GOOD}\n[query]\nshard_deadline_ms = 0\n"),
            "query.shard_deadline_ms",
        ),
        (
            format!("{GOOD}\n[query]\nrerank = true\n")
                .replace("\"shard\", \"reranker\"", "\"shard\""),
            "query.rerank",
        ),
        (
            format!("{GOOD}\n[generator]\nmax_tokens = 0\n"),
            "generator.max_tokens",
        ),
        (
            GOOD.replace(
                "\"embedder\", \"shard\"]",
                "\"embedder\", \"shard\"]\nhttp_addr = \"nowhere\"",
            ),
            "node[0].http_addr",
        ),
        (
            GOOD.replace(
                "\"shard\", \"reranker\"]",
                "\"shard\", \"reranker\"]\nhttp_addr = \"127.0.0.1:8101\"",
            ),
            "node[1].http_addr",
        ),
        (
            GOOD.replace(
                "[\"shard\", \"coordinator\"]",
                "[\"shard\", \"coordinator\"]\nhttp_addr = \"127.0.0.1:7001\"",
            ),
            "node[2].http_addr",
        ),
        (
            format!("{GOOD}\n[http]\napi_keys = [\"short\"]\n"),
            "http.api_keys",
        ),
        (
            format!("{GOOD}\n[http]\nmax_body_bytes = 10\n"),
            "http.max_body_bytes",
        ),
        (
            format!("{GOOD}\n[http]\nmax_connections = 0\n"),
            "http.max_connections",
        ),
        (
            format!("{GOOD}\n[http]\nheader_timeout_ms = 5\n"),
            "http.header_timeout_ms",
        ),
        (
            format!("{GOOD}\n[query]\nmax_in_flight = 4\nmax_answers_in_flight = 5\n"),
            "query.max_answers_in_flight",
        ),
        (
            format!("{GOOD}\n[query]\nmax_in_flight = 0\n"),
            "query.max_in_flight",
        ),
        (
            format!("{GOOD}\n[query]\nhybrid_dense_weight = 1.5\n"),
            "query.hybrid_dense_weight",
        ),
        (
            GOOD.replace("[index]", "[index]\nmax_searches = 0"),
            "index.max_searches",
        ),
        (
            format!("{GOOD}\n[embedder]\nmax_queue = 8\n"),
            "embedder.max_queue",
        ),
        (
            format!("{GOOD}\n[query]\nresult_cache_entries = 2000000\n"),
            "query.result_cache_entries",
        ),
        (
            format!("{GOOD}\n[query]\nhedge_max_ratio = 1.5\n"),
            "query.hedge_max_ratio",
        ),
        (
            format!("{GOOD}\n[query]\nshard_deadline_ms = 100\nhedge_min_ms = 100\n"),
            "query.hedge_min_ms",
        ),
        (
            format!("{GOOD}\n[generator]\nmax_queue = 5000\n"),
            "generator.max_queue",
        ),
        (
            format!("{GOOD}\n[generator]\nmin_grounding = 1.5\n"),
            "generator.min_grounding",
        ),
        (
            format!("{GOOD}\n[query]\nrerank_deadline_ms = 0\n"),
            "query.rerank_deadline_ms",
        ),
        (
            format!("{GOOD}\n[reranker]\nmax_queue = 0\n"),
            "reranker.max_queue",
        ),
        (
            GOOD.replace(
                "shards = 4",
                "shards = 2\nplacement = [[\"a\",\"zz\"],[\"a\",\"b\"]]",
            ),
            "index.placement[0]",
        ),
    ];
    for (text, field) in cases {
        let e = err_of(&text);
        assert!(
            e.contains(&format!("`{field}`")),
            "expected field {field} in: {e}"
        );
    }
}

#[test]
fn unknown_keys_and_roles_are_named() {
    let e = err_of(&GOOD.replace("[index]", "[index]\nshardz = 3"));
    assert!(e.contains("shardz"), "{e}");
    let e = err_of(&GOOD.replace("\"reranker\"", "\"rerankr\""));
    assert!(e.contains("rerankr"), "{e}");
    let e = err_of("version = 1\nname=");
    assert!(e.contains("line"), "{e}");
}

#[test]
fn unknown_node_is_an_error() {
    let cfg = ClusterConfig::parse(GOOD).unwrap();
    assert!(matches!(cfg.node("zz"), Err(ConfigError::UnknownNode(_))));
}

#[test]
fn reranking_defaults_to_on_when_a_node_has_the_reranker_role() {
    let cfg = ClusterConfig::parse(GOOD).unwrap();
    assert!(cfg.nodes.iter().any(|n| n.has(NodeRole::Reranker)));
    assert!(cfg.rerank_by_default());
    let off = ClusterConfig::parse(&format!("{GOOD}\n[query]\nrerank = false\n")).unwrap();
    assert!(!off.rerank_by_default());
    let none = ClusterConfig::parse(&GOOD.replace("\"shard\", \"reranker\"", "\"shard\"")).unwrap();
    assert!(!none.rerank_by_default());
}

#[test]
fn the_retired_merge_below_key_still_parses_and_the_ann_defaults_to_ragfleets_own() {
    let c = ClusterConfig::parse(&GOOD.replace("shards = 4", "shards = 4\nmerge_below = 1024"))
        .unwrap();
    assert_eq!(c.index.merge_below, Some(1024));
    assert_eq!(c.index.ann, "hnsw");
    assert_eq!(c.index.merge_ratio, 16);
    assert_eq!(c.index.max_merges, 4);
    let one =
        ClusterConfig::parse(&GOOD.replace("shards = 4", "shards = 4\nmax_merges = 1")).unwrap();
    assert_eq!(one.index.max_merges, 1);
}

#[test]
fn a_written_config_reads_back_equal() {
    // chaos run writes a config per node (its peers at proxy addresses) from a loaded one
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster.toml");
    let c = ClusterConfig::load(&path).unwrap();
    let back = ClusterConfig::parse(&toml::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn the_query_mode_defaults_to_hybrid_and_a_bad_one_is_named() {
    use ragfleet_proto::SearchMode;
    assert_eq!(
        ClusterConfig::parse(GOOD).unwrap().query.mode,
        SearchMode::Hybrid
    );
    let dense = ClusterConfig::parse(&format!("{GOOD}\n[query]\nmode = \"dense\"\n")).unwrap();
    assert_eq!(dense.query.mode, SearchMode::Dense);
    let e = err_of(&format!("{GOOD}\n[query]\nmode = \"sparse\"\n"));
    assert!(e.contains("mode") && e.contains("sparse"), "{e}");
}
