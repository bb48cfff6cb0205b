//! Serving under load, on a real 3-node cluster through its HTTP gateways: the retrieval-result
//! cache never answers with a result older than an acknowledged write (written through the
//! other coordinator), and a stalled shard replica is hedged on the other replica of its shard.
mod common;

use std::time::Duration;

use common::*;
use reqwest::blocking::Client as Http;
use serde_json::{json, Value};

fn http() -> Http {
    Http::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn post(base: &str, path: &str, body: &Value) -> Value {
    let r = http()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().unwrap()
}

fn retrieve(base: &str, q: &str, extra: Value) -> Value {
    let mut body = json!({"query": q, "k": 5, "mode": "hybrid"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    post(base, "/v1/retrieve", &body)
}

fn ids(r: &Value) -> Vec<String> {
    r["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["doc_id"].as_str().unwrap().to_string())
        .collect()
}

fn docs(lines: &str) -> Value {
    let docs: Vec<Value> = lines
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            json!({"id": v["_id"], "text": v["text"]})
        })
        .collect();
    json!({ "documents": docs })
}

fn status(base: &str) -> Value {
    http()
        .get(format!("{base}/v1/status"))
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn cache<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["caches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} cache in {s}"))
}

#[test]
fn a_cached_retrieval_is_never_older_than_an_acknowledged_write() {
    let _g = serial();
    // every replica acknowledges a write, as in the shipped cluster.toml
    let c = Cluster::three("index.write_quorum = 2");
    let (n1, n2) = (c.http_url("n1"), c.http_url("n2"));
    post(&n1, "/v1/documents", &docs(&corpus()));
    let q = "What causes ocean tides?";

    let first = retrieve(&n1, q, json!({}));
    assert_eq!(first["cache"], "miss", "{first}");
    assert_eq!(ids(&first)[0], "tides", "{first}");
    let again = retrieve(&n1, q, json!({}));
    assert_eq!(again["cache"], "hit", "{again}");
    assert_eq!(ids(&again), ids(&first));
    assert_eq!(again["coverage"], first["coverage"]);
    // a hit needs no embedding: the cached result carries its own
    assert_eq!(again["timings_ms"]["embed"], 0.0, "{again}");
    // the same words, spaced otherwise, are the same question
    let spaced = retrieve(&n1, "  What causes   ocean tides? ", json!({}));
    assert_eq!(spaced["cache"], "hit", "{spaced}");
    // asked to, the coordinator computes afresh
    let fresh = retrieve(&n1, q, json!({"cache": false}));
    assert!(fresh["cache"].is_null(), "{fresh}");
    assert_eq!(ids(&fresh), ids(&first));

    // a write acknowledged by the *other* coordinator: n1's cached result must not survive it
    let ack = post(
        &n2,
        "/v1/documents",
        &json!({"documents": [{"id": "tides-moon", "text": "Ocean tides rise and fall twice a day because the moon's gravity pulls the seas toward it."}]}),
    );
    assert_eq!(ack["documents"], 1, "{ack}");
    let after = retrieve(&n1, q, json!({}));
    assert_eq!(after["cache"], "stale", "{after}");
    assert!(
        ids(&after).contains(&"tides-moon".to_string()),
        "a result from before the acknowledged write: {after}"
    );
    let cached_again = retrieve(&n1, q, json!({}));
    assert_eq!(cached_again["cache"], "hit", "{cached_again}");
    assert_eq!(ids(&cached_again), ids(&after));

    // a deletion acknowledged by the other coordinator: the deleted document is gone at once
    let r = http()
        .delete(format!("{n2}/v1/documents/tides"))
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let gone = retrieve(&n1, q, json!({}));
    assert_eq!(gone["cache"], "stale", "{gone}");
    assert!(
        !ids(&gone).contains(&"tides".to_string()),
        "a deleted document came back from the cache: {gone}"
    );

    // hit rates in status and metrics
    let s = status(&n1);
    let rc = cache(&s, "retrieval");
    assert_eq!(rc["hits"], 3, "{s}");
    assert_eq!(rc["stale"], 2, "{s}");
    assert_eq!(rc["misses"], 1, "{s}");
    assert!(rc["entries"].as_u64().unwrap() >= 1, "{s}");
    assert!(cache(&s, "query_embedding")["misses"].as_u64().unwrap() >= 1);
    let m = http()
        .get(format!("{n1}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        m.lines()
            .any(|l| l.starts_with("ragfleet_cache_lookups_total")
                && l.contains("cache=\"retrieval\"")
                && l.contains("outcome=\"hit\"")),
        "no retrieval cache hits in /metrics"
    );
}

#[test]
fn a_stalled_shard_replica_is_hedged_on_the_other_replica() {
    let _g = serial();
    let c = Cluster::three("");
    let n1 = c.http_url("n1");
    post(&n1, "/v1/documents", &docs(&corpus()));
    // enough answers on record for every replica's p95
    for q in [
        "volcano lava",
        "bees honey",
        "glaciers valleys",
        "espresso pressure",
        "chess castling",
        "vaccines immune",
        "jazz improvisation",
        "bridges cables",
    ] {
        let r = retrieve(&n1, q, json!({"cache": false}));
        assert_eq!(answered(&r), 4, "{r}");
    }
    // shard 1 lives on n2 and n3: n3's replica stops answering for 3 s
    let (ok, _, err) = c.cli(&[
        "chaos",
        "--group",
        "shard.1",
        "--node",
        "n3",
        "--action",
        "stall:3000",
    ]);
    assert!(ok, "{err}");
    // replicas are taken in turn: within a few queries one goes to the stalled replica first,
    // and its hedge on n2 answers
    let mut hedged = None;
    for i in 0..12 {
        let r = retrieve(&n1, &format!("ocean tides {i}"), json!({"cache": false}));
        assert_eq!(answered(&r), 4, "a stalled replica cost coverage: {r}");
        if r["hedged"].as_array().unwrap().iter().any(|s| s == 1) {
            hedged = Some(r);
            break;
        }
    }
    let r = hedged.expect("no query was hedged while a replica of shard 1 stalled");
    assert_eq!(top_doc(&r), "tides", "{r}");
    let h = &status(&n1)["hedges"];
    assert!(h["sent"].as_u64().unwrap() >= 1, "{h}");
    assert!(h["won"].as_u64().unwrap() >= 1, "{h}");
    assert!(
        h["requests"].as_u64().unwrap() > h["sent"].as_u64().unwrap(),
        "{h}"
    );
}
