//! The HTTP gateway of a real cluster (node processes on loopback), through a real HTTP client:
//! the OpenAI-compatible chat (whole and streamed as server-sent events) and embeddings,
//! retrieval with the same JSON as `retrieve --json`, documents in and out, status, probes,
//! metrics, API keys, request ids, errors with their statuses, a client that goes away
//! mid-answer, and the official `openai` Python package when one is at hand.
mod common;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use base64::Engine;
use common::*;
use reqwest::blocking::Client as Http;
use serde_json::{json, Value};

const KEY: &str = "test-key-0123456789abcdef";

fn http() -> Http {
    Http::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = http()
        .post(format!("{base}{path}"))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn get(base: &str, path: &str) -> (u16, String) {
    let r = http()
        .get(format!("{base}{path}"))
        .bearer_auth(KEY)
        .send()
        .unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

fn docs_json() -> Value {
    let docs: Vec<Value> = corpus()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            json!({"id": v["_id"], "title": v.get("title").cloned().unwrap_or(json!("")), "text": v["text"]})
        })
        .collect();
    json!({ "documents": docs })
}

/// The `data:` payloads of a server-sent event stream, in order.
fn sse_data(resp: reqwest::blocking::Response) -> Vec<String> {
    BufReader::new(resp)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[test]
fn the_gateway_serves_openai_chat_embeddings_retrieval_documents_and_metrics() {
    let _g = serial();
    let c = Cluster::start(
        &[
            &["coordinator", "embedder", "shard", "generator"],
            &["shard"],
        ],
        &format!(
            "query.max_answers_in_flight = 1\n[generator]\nmax_tokens = 16\ncontext_tokens = 320\nmin_grounding = 0.0\n[http]\napi_keys = [\"{KEY}\"]\nmax_body_bytes = 65536\n"
        ),
    );
    let base = c.http_url("n1");

    // probes are open; everything else wants the key
    let r = http().get(format!("{base}/healthz")).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = http().get(format!("{base}/v1/status")).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let e: Value = r.json().unwrap();
    assert_eq!(e["error"]["code"], "unauthorized", "{e}");
    let r = http()
        .get(format!("{base}/v1/status"))
        .bearer_auth("wrong-key-0123456789abcdef")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    wait_for("readyz", Duration::from_secs(30), || {
        let r = http().get(format!("{base}/readyz")).send().ok()?;
        (r.status().as_u16() == 200).then_some(())
    });

    // documents in, acknowledged at the write quorum; a bad one is named
    let (s, r) = post(&base, "/v1/documents", &docs_json());
    assert_eq!(s, 200, "{r}");
    let n = corpus().lines().count() as u64;
    assert_eq!(r["documents"], n, "{r}");
    assert_eq!(r["errors"], false, "{r}");
    let (s, r) = post(
        &base,
        "/v1/documents",
        &json!({"documents": [{"id": "", "text": "no id"}, {"id": "x", "text": " "}]}),
    );
    assert_eq!(s, 400, "{r}");
    assert_eq!(r["failed"].as_array().unwrap().len(), 2, "{r}");

    // retrieval: the same JSON as `retrieve --json`
    let (s, r) = post(
        &base,
        "/v1/retrieve",
        &json!({"query": "What causes ocean tides?", "k": 3}),
    );
    assert_eq!(s, 200, "{r}");
    assert_eq!(top_doc(&r), "tides", "{r}");
    assert_eq!(r["coverage"]["shards_answered"], 4, "{r}");
    assert_eq!(r["hits"].as_array().unwrap().len(), 3, "{r}");
    let cli = c.retrieve("What causes ocean tides?");
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&r), keys(&cli));
    assert_eq!(keys(&r["timings_ms"]), keys(&cli["timings_ms"]));

    // errors: a stable code and a fitting status
    let (s, e) = post(&base, "/v1/retrieve", &json!({"query": "  "}));
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{e}"
    );
    let (s, e) = post(
        &base,
        "/v1/retrieve",
        &json!({"query": "x", "mode": "fuzzy"}),
    );
    assert_eq!(s, 400, "{e}");
    let (s, e) = post(
        &base,
        "/v1/retrieve",
        &json!({"query": "x".repeat(100_000)}),
    );
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (413, Some("too_large")),
        "{e}"
    );
    let r = http()
        .post(format!("{base}/v1/retrieve"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let e: Value = r.json().unwrap();
    assert_eq!(e["error"]["code"], "bad_request", "{e}");
    let (s, e) = get(&base, "/v2/nothing");
    assert_eq!(s, 404, "{e}");

    // embeddings, as floats and as base64 (what the OpenAI SDKs ask for), the same vectors
    let (s, f) = post(
        &base,
        "/v1/embeddings",
        &json!({"input": ["bees make honey", "tides"]}),
    );
    assert_eq!(s, 200, "{f}");
    assert_eq!(f["object"], "list");
    let v0: Vec<f32> = serde_json::from_value(f["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(v0.len(), 384);
    let norm: f32 = v0.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "{norm}");
    let (s, b) = post(
        &base,
        "/v1/embeddings",
        &json!({"input": "bees make honey", "encoding_format": "base64"}),
    );
    assert_eq!(s, 200, "{b}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let vb: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(vb, v0);
    let (s, e) = post(&base, "/v1/embeddings", &json!({"input": [[1, 2, 3]]}));
    assert_eq!(s, 400, "{e}");

    // a whole chat completion, retrieval-augmented, with ragfleet's figures
    let ask = json!({
        "model": "anything",
        "messages": [{"role": "user", "content": "What do honey bees store in their hive?"}],
        "max_tokens": 12,
        "ragfleet": {"answer_mode": "generate"}
    });
    let (s, a) = post(&base, "/v1/chat/completions", &ask);
    assert_eq!(s, 200, "{a}");
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["model"], "anything");
    let text = a["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.trim().is_empty(), "{a}");
    assert!(["stop", "length"].contains(&a["choices"][0]["finish_reason"].as_str().unwrap()));
    let x = &a["ragfleet"];
    assert_eq!(x["coverage"]["shards_answered"], 4, "{a}");
    assert_eq!(x["sources"][0]["doc_id"], "bees", "{a}");
    assert!(x["timings_ms"]["total"].as_f64().unwrap() > 0.0, "{a}");
    assert!(x["grounding"]["score"].as_f64().is_some(), "{a}");
    // (the budget of 12 may run over by two graces of 8 tokens to end a sentence well)
    let completion = a["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=28).contains(&completion), "{a}");
    assert_eq!(a["usage"]["total_tokens"], a["usage"]["completion_tokens"], "{a}");
    // `auto` (the default) holds the answer back until it is checked against its sources and
    // then gives it whole (no grounding bar here: it is always the generated one); its usage
    // still counts the tokens generated
    let mut held = ask.clone();
    held["ragfleet"] = json!({"answer_mode": "auto"});
    let (s, a) = post(&base, "/v1/chat/completions", &held);
    assert_eq!(s, 200, "{a}");
    // (the generated answer kept: it says what answered)
    assert_eq!(a["ragfleet"]["answer_mode"], "generate", "{a}");
    assert!(a["ragfleet"]["fallback"].is_null(), "{a}");
    let completion = a["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=28).contains(&completion), "a held answer counted no tokens: {a}");
    // without retrieval: no sources, no coverage claimed
    let (s, a) = post(
        &base,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6,
                "ragfleet": {"retrieval": false}}),
    );
    assert_eq!(s, 200, "{a}");
    assert_eq!(a["ragfleet"]["sources"].as_array().unwrap().len(), 0, "{a}");
    assert_eq!(a["ragfleet"]["coverage"]["shards_total"], 0, "{a}");
    let (s, e) = post(&base, "/v1/chat/completions", &json!({"messages": []}));
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{e}"
    );

    // streamed: role first, text pieces, a last chunk with the finish reason and ragfleet's
    // figures, then [DONE]
    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    let r = http()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-request-id", "test-req-42")
        .json(&streamed)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["x-request-id"], "test-req-42");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_data(r);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.len() >= 3, "{chunks:?}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!content.trim().is_empty(), "{chunks:?}");
    let last = chunks.last().unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    assert_eq!(last["ragfleet"]["sources"][0]["doc_id"], "bees", "{last}");
    assert!(
        c.log("n1").contains("test-req-42"),
        "the request id is not in the node's log"
    );

    // a client that goes away mid-answer: the answer is cancelled, not generated to the end
    let mut long = streamed.clone();
    long["max_tokens"] = json!(400);
    long["ragfleet"] = json!({"answer_mode": "generate"});
    {
        let r = http()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("x-request-id", "test-cancel-7")
            .json(&long)
            .send()
            .unwrap();
        let mut lines = BufReader::new(r).lines();
        // read until the first piece of text
        for l in lines.by_ref() {
            let l = l.unwrap();
            if l.contains("\"content\":\"") && !l.contains("\"content\":\"\"") {
                break;
            }
        }
        // admission control: with query.max_answers_in_flight = 1 and this answer running,
        // another answer is refused at once (429, Retry-After), not queued; retrieval still
        // answers
        let t = std::time::Instant::now();
        let r = http()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&ask)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
        let e: Value = r.json().unwrap();
        assert_eq!(e["error"]["code"], "overloaded", "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("query.max_answers_in_flight"),
            "{e}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the refusal took {:?}",
            t.elapsed()
        );
        let (ok, _, err) = c.cli(&["ask", "What do honey bees store?"]);
        assert!(!ok && err.contains("overloaded"), "{err}");
        let (s, r) = post(
            &base,
            "/v1/retrieve",
            &json!({"query": "What causes ocean tides?"}),
        );
        assert_eq!(s, 200, "{r}");
        // then hang up
    }
    let line = wait_for("the cancellation", Duration::from_secs(30), || {
        c.log("n1")
            .lines()
            .find(|l| l.contains("the client went away: generation cancelled"))
            .map(str::to_string)
    });
    // the coordinator's log line names the request it served
    assert!(line.contains("test-cancel-7"), "{line}");

    // deleting a document: acknowledged, then gone from answers
    let r = http()
        .delete(format!("{base}/v1/documents/bees"))
        .bearer_auth(KEY)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let d: Value = r.json().unwrap();
    assert_eq!(d["deleted"], true, "{d}");
    let (_, r) = post(
        &base,
        "/v1/retrieve",
        &json!({"query": "What do honey bees store?"}),
    );
    assert!(
        r["hits"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["doc_id"] != "bees"),
        "{r}"
    );

    // status and metrics
    let (s, st) = get(&base, "/v1/status");
    assert_eq!(s, 200, "{st}");
    let st: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["shards"].as_array().unwrap().len(), 4, "{st}");
    let (s, m) = get(&base, "/metrics");
    assert_eq!(s, 200);
    for needle in [
        "ragfleet_http_requests_total{endpoint=\"retrieve\",outcome=\"ok\"}",
        "ragfleet_http_requests_total{endpoint=\"retrieve\",outcome=\"Bad Request\"}",
        "ragfleet_http_requests_total{endpoint=\"status\",outcome=\"unauthorized\"} 2",
        "ragfleet_stage_seconds_bucket{stage=\"search\"",
        "ragfleet_stage_seconds_count{stage=\"first_token\"}",
        "ragfleet_answers_total{answer_mode=\"generate\",end_reason=",
        "ragfleet_ingested_total{kind=\"documents\"}",
        "ragfleet_replicas{state=\"serving\"} 8",
        "ragfleet_nodes_alive 2",
        "ragfleet_coverage_ratio_count",
        // every node process's own metrics, labelled with its instance
        "ragfleet_shard_search_seconds_count{instance=",
        "ragfleet_wal_fsyncs_total{instance=",
        "ragfleet_role_in_flight{instance=",
        "ragfleet_coordinator_ingested_total{instance=",
        "ragfleet_admission_refused_total{instance=",
        "ragfleet_queue_depth{instance=",
        // the tides query was asked twice: its embedding came from the cache the second time
        "cache=\"query_embedding\",outcome=\"hit\"}",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }

    // the official OpenAI Python package streams a chat completion (CI installs it; a
    // machine without it skips this part unless RAGFLEET_REQUIRE_OPENAI is set)
    let python = std::env::var("RAGFLEET_OPENAI_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_openai = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        assert!(
            std::env::var("RAGFLEET_REQUIRE_OPENAI").is_err(),
            "RAGFLEET_REQUIRE_OPENAI is set but {python} cannot import openai"
        );
        eprintln!("skipping the openai-package check: {python} has no openai package");
        return;
    }
    let script = root().join("tests/openai_client.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(format!("{base}/v1"))
        .arg(KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(report["chunks"].as_u64().unwrap() >= 2, "{report}");
    assert!(
        !report["text"].as_str().unwrap().trim().is_empty(),
        "{report}"
    );
    assert_eq!(report["sources"][0], "tides", "{report}");
    assert_eq!(report["embedding_dim"], 384, "{report}");
    assert_eq!(report["unauthorized"], true, "{report}");
}
