//! `ragfleet bench load`: an open-loop load generator against the HTTP API of a running cluster.
//! Requests arrive as a Poisson process at each offered rate for a set time, whether or not the
//! earlier ones have finished (so queueing shows, unlike a closed loop). Retrieval goes to
//! `/v1/retrieve`, chat to `/v1/chat/completions` streamed (time to first token measured at the
//! client). Per rate: throughput, errors, refusals (429), client-side latency percentiles and the
//! server's per-stage percentiles; a JSON report and an SVG plot of latency against offered load
//! (the table's rows and the plot in [`report`]).
mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::eval_answers::percentile;
use report::{plot, print_row};

/// Arguments of `bench load`.
#[derive(clap::Args, Debug)]
pub struct LoadBench {
    /// The gateway, e.g. http://127.0.0.1:8101 (a coordinator node's http_addr).
    #[arg(long, default_value = "http://127.0.0.1:8101")]
    url: String,
    /// API key (else $RAGFLEET_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// What to load: retrieve, chat, or both (one after the other).
    #[arg(long, default_value = "both")]
    kind: String,
    /// Offered retrieval rates, requests/s.
    #[arg(long, value_delimiter = ',', default_value = "2,5,10,20,40")]
    retrieve_rates: Vec<f64>,
    /// Offered chat rates, requests/s.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.25,0.5,1")]
    chat_rates: Vec<f64>,
    /// Seconds of arrivals at each rate (the requests then in flight are waited for).
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Questions, one a line (default: the demo corpus's sample questions).
    #[arg(long)]
    queries: Option<PathBuf>,
    /// Retrieval mode.
    #[arg(long, default_value = "hybrid")]
    mode: String,
    /// Chat answer length in tokens.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// A request still unanswered after this many seconds counts as an error.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Arrival schedule seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the report (load.json) and the plot (load.svg) go.
    #[arg(long, default_value = "data/bench-load")]
    out: PathBuf,
    /// Share of retrievals that repeat a question of the list (the rest ask a question never
    /// asked before: a list question with a request number appended). 1: every request repeats.
    #[arg(long, default_value_t = 1.0)]
    repeat: f64,
    /// Run every rate twice, with a feature off then on (per request, same build, same
    /// cluster): `cache` (the retrieval-result and query-embedding caches), `hedge` (hedged
    /// shard requests) or, for chat, `push` (tokens pushed rather than long-polled).
    #[arg(long)]
    compare: Option<String>,
    /// Retrieve without the rerank stage (to see the search stage's own latency).
    #[arg(long)]
    no_rerank: bool,
    /// Closed loop instead of the offered rates: this many clients each sending its next
    /// retrieval as soon as the last one answers (the throughput a cluster sustains).
    #[arg(long)]
    closed: Option<usize>,
}

const QUESTIONS: &[&str] = &[
    "When is a value dropped?",
    "What is a dangling reference?",
    "How do I handle errors that can be recovered from?",
    "What is a trait object?",
    "How do closures capture their environment?",
    "What does the borrow checker do?",
    "How are packages and crates organised?",
    "What is a smart pointer?",
    "How do threads share data safely?",
    "What is pattern matching used for?",
    "How does a vector grow?",
    "What is a lifetime annotation?",
];

/// One request's outcome.
#[derive(Debug, Default, Clone)]
struct Outcome {
    status: u16,
    error: Option<String>,
    total_ms: f64,
    first_token_ms: Option<f64>,
    stages: BTreeMap<String, f64>,
    cache_hit: bool,
    hedged: bool,
}

/// What one run of requests is.
#[derive(Clone)]
struct Load {
    kind: String,
    /// Poisson arrivals at this rate, or `closed` clients back to back.
    rate: f64,
    closed: Option<usize>,
    /// The feature compared (`cache`, `hedge`) and whether it is on.
    feature: Option<(String, bool)>,
}

/// A number no other run of this process, and no earlier process, used: questions never asked
/// before are numbered with it, so no cache holds them.
static RUN: std::sync::LazyLock<u32> = std::sync::LazyLock::new(rand::random);
static ASKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A list question, or (past the `repeat` share) one never asked before.
fn question(questions: &[String], repeat: f64, rng: &mut impl Rng) -> String {
    let q = &questions[rng.gen_range(0..questions.len())];
    if repeat >= 1.0 || rng.gen_bool(repeat.max(0.0)) {
        q.clone()
    } else {
        let i = ASKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{q} (request {:x}-{i})", *RUN)
    }
}

async fn one(
    http: &reqwest::Client,
    a: &LoadBench,
    kind: &str,
    question: &str,
    feature: Option<(&str, bool)>,
) -> Outcome {
    let t = Instant::now();
    let mut out = Outcome::default();
    let (path, body) = if kind == "retrieve" {
        let mut body = json!({"query": question, "mode": a.mode, "k": 5});
        if a.no_rerank {
            body["rerank"] = json!(false);
        }
        if let Some((name, on)) = feature {
            body[name] = json!(on);
        }
        ("/v1/retrieve", body)
    } else {
        let mut body = json!({"messages": [{"role": "user", "content": question}], "stream": true,
               "max_tokens": a.max_tokens, "ragfleet": {"mode": a.mode, "answer_mode": "generate"}});
        if a.no_rerank {
            body["ragfleet"]["rerank"] = json!(false);
        }
        if let Some((name, on)) = feature {
            body["ragfleet"][name] = json!(on);
        }
        ("/v1/chat/completions", body)
    };
    let mut req = http
        .post(format!("{}{path}", a.url.trim_end_matches('/')))
        .json(&body);
    if let Some(k) = &a.api_key {
        req = req.bearer_auth(k);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(e.to_string());
            out.total_ms = t.elapsed().as_secs_f64() * 1000.0;
            return out;
        }
    };
    out.status = resp.status().as_u16();
    if !resp.status().is_success() {
        out.error = Some(format!("HTTP {}", out.status));
        out.total_ms = t.elapsed().as_secs_f64() * 1000.0;
        return out;
    }
    let timings = if kind == "retrieve" {
        match resp.json::<Value>().await {
            Ok(v) => {
                out.cache_hit = v["cache"] == "hit";
                out.hedged = v["hedged"].as_array().is_some_and(|h| !h.is_empty());
                v["timings_ms"].clone()
            }
            Err(e) => {
                out.error = Some(e.to_string());
                Value::Null
            }
        }
    } else {
        // server-sent events: the first text piece, then the last chunk's ragfleet timings
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        let mut timings = Value::Null;
        while let Some(piece) = stream.next().await {
            let Ok(piece) = piece else {
                out.error = Some("stream broken".into());
                break;
            };
            buf.push_str(&String::from_utf8_lossy(&piece));
            while let Some(i) = buf.find('\n') {
                let line: String = buf.drain(..=i).collect();
                let Some(data) = line.trim().strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if v.get("error").is_some() {
                    out.error = Some(v["error"]["message"].to_string());
                }
                let text = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
                if !text.is_empty() && out.first_token_ms.is_none() {
                    out.first_token_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
                }
                if v.get("ragfleet").is_some() {
                    timings = v["ragfleet"]["timings_ms"].clone();
                }
            }
        }
        timings
    };
    if let Some(o) = timings.as_object() {
        for (k, v) in o {
            if let Some(ms) = v.as_f64() {
                out.stages.insert(k.clone(), ms);
            }
        }
    }
    out.total_ms = t.elapsed().as_secs_f64() * 1000.0;
    out
}

fn pcts(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    json!({
        "p50": percentile(&mut v, 0.50),
        "p95": percentile(&mut v, 0.95),
        "p99": percentile(&mut v, 0.99),
    })
}

/// Offers the load for the set duration; returns its report row.
async fn at_rate(
    http: &reqwest::Client,
    a: &Arc<LoadBench>,
    load: &Load,
    questions: &Arc<Vec<String>>,
    rng: &mut rand::rngs::StdRng,
) -> Value {
    let kind = load.kind.as_str();
    let rate = load.rate;
    let start = Instant::now();
    let timeout = Duration::from_secs_f64(a.timeout);
    let send = {
        let (http, a, kind, feature) = (
            http.clone(),
            a.clone(),
            kind.to_string(),
            load.feature.clone(),
        );
        move |q: String| {
            let (http, a2, kind, feature) =
                (http.clone(), a.clone(), kind.clone(), feature.clone());
            async move {
                let f = feature.as_ref().map(|(n, on)| (n.as_str(), *on));
                match tokio::time::timeout(timeout, one(&http, &a2, &kind, &q, f)).await {
                    Ok(o) => o,
                    Err(_) => Outcome {
                        error: Some("timeout".into()),
                        total_ms: timeout.as_secs_f64() * 1000.0,
                        ..Default::default()
                    },
                }
            }
        }
    };
    let mut tasks = Vec::new();
    if let Some(clients) = load.closed {
        // closed loop: each client asks its next question when the last is answered
        let end = start + Duration::from_secs_f64(a.duration);
        for c in 0..clients {
            let (send, questions) = (send.clone(), questions.clone());
            let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed ^ (c as u64 + 1) << 32);
            let repeat = a.repeat;
            tasks.push(tokio::spawn(async move {
                let mut done = Vec::new();
                while Instant::now() < end {
                    let q = question(&questions, repeat, &mut rng);
                    done.push(send(q).await);
                }
                done
            }));
        }
    } else {
        let mut next = 0.0f64;
        while next < a.duration {
            let at = start + Duration::from_secs_f64(next);
            tokio::time::sleep_until(at.into()).await;
            let q = question(questions, a.repeat, rng);
            let f = send(q);
            tasks.push(tokio::spawn(async move { vec![f.await] }));
            // exponential inter-arrival times: a Poisson process at `rate`
            let u: f64 = rng.gen_range(f64::EPSILON..1.0);
            next += -u.ln() / rate;
        }
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        if let Ok(o) = t.await {
            outcomes.extend(o);
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none()).collect();
    let refused = outcomes.iter().filter(|o| o.status == 429).count();
    let errors = outcomes.len() - ok.len() - refused;
    let mut stages: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for o in &ok {
        for (k, v) in &o.stages {
            if *v > 0.0 {
                stages.entry(k.clone()).or_default().push(*v);
            }
        }
    }
    let first_tokens: Vec<f64> = ok.iter().filter_map(|o| o.first_token_ms).collect();
    let mut errors_seen: BTreeMap<String, usize> = BTreeMap::new();
    for o in &outcomes {
        if let Some(e) = &o.error {
            *errors_seen.entry(e.chars().take(80).collect()).or_default() += 1;
        }
    }
    let cache_hits = ok.iter().filter(|o| o.cache_hit).count();
    let hedged = ok.iter().filter(|o| o.hedged).count();
    json!({
        "kind": kind,
        "offered_rps": if load.closed.is_some() { Value::Null } else { json!(rate) },
        "closed_clients": load.closed,
        "feature": load.feature.as_ref().map(|(n, _)| n.clone()),
        "feature_on": load.feature.as_ref().map(|(_, on)| *on),
        "cache_hits": cache_hits,
        "hedged": hedged,
        "sent": outcomes.len(),
        "ok": ok.len(),
        "errors": errors,
        "refused_429": refused,
        "throughput_rps": ok.len() as f64 / wall,
        "wall_s": wall,
        "latency_ms": pcts(ok.iter().map(|o| o.total_ms).collect()),
        "client_first_token_ms": pcts(first_tokens),
        "server_stages_ms": stages.into_iter().map(|(k, v)| (k, pcts(v))).collect::<serde_json::Map<_, _>>(),
        "error_kinds": errors_seen,
    })
}

/// Runs the bench.
pub async fn run(a: LoadBench) -> Result<()> {
    let kinds: Vec<&str> = match a.kind.as_str() {
        "retrieve" => vec!["retrieve"],
        "chat" => vec!["chat"],
        "both" => vec!["retrieve", "chat"],
        other => bail!("--kind {other:?}: retrieve, chat or both"),
    };
    if a.duration <= 0.0 {
        bail!("--duration must be positive");
    }
    if a.retrieve_rates
        .iter()
        .chain(&a.chat_rates)
        .any(|r| *r <= 0.0)
    {
        bail!("rates must be positive");
    }
    if !(0.0..=1.0).contains(&a.repeat) {
        bail!("--repeat must be between 0 and 1");
    }
    match (a.compare.as_deref(), a.kind.as_str()) {
        (None, _) | (Some("cache" | "hedge"), "retrieve") | (Some("push" | "cache"), "chat") => {}
        (Some(f), k) => bail!(
            "--compare {f:?} with --kind {k}: cache or hedge for retrieve, push or cache for chat"
        ),
    }
    if a.closed == Some(0) {
        bail!("--closed needs at least one client");
    }
    let mut a = a;
    a.api_key = a.api_key.or_else(|| std::env::var("RAGFLEET_API_KEY").ok());
    let questions: Vec<String> = match &a.queries {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        None => QUESTIONS.iter().map(|s| s.to_string()).collect(),
    };
    if questions.is_empty() {
        bail!("no questions");
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    // the API must answer before the load starts
    let mut probe = http.get(format!("{}/v1/status", a.url.trim_end_matches('/')));
    if let Some(k) = &a.api_key {
        probe = probe.bearer_auth(k);
    }
    let st = probe
        .send()
        .await
        .with_context(|| format!("no HTTP API at {}", a.url))?;
    if !st.status().is_success() {
        bail!("{}/v1/status answered {}", a.url, st.status());
    }
    let questions = Arc::new(questions);
    let a = Arc::new(a);
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    println!(
        "open-loop Poisson load on {} for {} s a rate ({} questions)",
        a.url,
        a.duration,
        questions.len()
    );
    println!(
        "{:<8} {:<9} {:>7} {:>6} {:>6} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8} {:>5} {:>6}  server stages p50/p99 ms",
        "kind", "variant", "offered", "sent", "ok", "errors", "refused", "done/s", "p50 ms", "p95 ms",
        "p99 ms", "hits", "hedged"
    );
    let features: Vec<Option<(String, bool)>> = match &a.compare {
        Some(f) => vec![Some((f.clone(), false)), Some((f.clone(), true))],
        None => vec![None],
    };
    let mut rows = Vec::new();
    for kind in kinds {
        let rates = match (kind, a.closed) {
            (_, Some(_)) => vec![0.0],
            ("retrieve", _) => a.retrieve_rates.clone(),
            _ => a.chat_rates.clone(),
        };
        for &rate in &rates {
            for feature in &features {
                let load = Load {
                    kind: kind.to_string(),
                    rate,
                    closed: a.closed,
                    feature: feature.clone(),
                };
                let row = at_rate(&http, &a, &load, &questions, &mut rng).await;
                print_row(&row);
                rows.push(row);
            }
        }
    }
    if let (Some(f), Some(_)) = (&a.compare, a.closed) {
        let tp = |on: bool| {
            rows.iter()
                .find(|r| r["feature_on"] == on)
                .and_then(|r| r["throughput_rps"].as_f64())
                .unwrap_or(0.0)
        };
        println!(
            "{f} on / off throughput: {:.2} / {:.2} = {:.2}x",
            tp(true),
            tp(false),
            tp(true) / tp(false).max(1e-9)
        );
    }
    std::fs::create_dir_all(&a.out)?;
    let report = json!({"url": a.url, "duration_s": a.duration, "seed": a.seed, "mode": a.mode,
                        "max_tokens": a.max_tokens, "repeat": a.repeat, "compare": a.compare,
                        "closed": a.closed, "rows": rows});
    let json_path = a.out.join("load.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let svg = a.out.join("load.svg");
    plot(&rows, &svg)?;
    println!("report: {}\nplot: {}", json_path.display(), svg.display());
    Ok(())
}
