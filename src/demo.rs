//! The embedded default (`ragfleet demo`) and the client-side helpers it shares with the CLI.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ragfleet_config::ClusterConfig;
use ragfleet_proto::{AskOptions, AskSummary, Sampling};
use ragfleet_runtime::{Client, NodeOptions};

use crate::corpus::Corpus;
use crate::loader::ModelFiles;

/// The bundled corpus: sections of The Rust Programming Language (MIT OR Apache-2.0).
pub const DEMO_CORPUS: &str = include_str!("../examples/corpus/rust-book.jsonl");

const SAMPLE_QUESTIONS: &[&str] = &[
    "What does the borrow checker prevent?",
    "How do I handle errors that can be recovered from?",
    "What is a trait object?",
];

/// Ingest requests a client keeps in flight at once.
const INGEST_IN_FLIGHT: usize = 4;

/// How [`ingest_corpus`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestReport {
    /// A progress bar, then the totals as text.
    Text,
    /// The totals as one JSON object.
    Json,
    /// Nothing (errors still return).
    Silent,
}

/// What an ingest did: acknowledged documents and chunks, wall time, and the requests' summed
/// stage times (requests overlap: shares, not wall time).
#[derive(Debug, Clone, Copy, Default)]
pub struct IngestSummary {
    pub docs: u64,
    pub chunks: u64,
    pub seconds: f64,
    pub embed_ms: f64,
    pub write_ms: f64,
    /// Ingest requests sent.
    pub requests: u64,
}

/// Ingests a corpus in batches (several in flight) with a progress bar; prints the totals.
pub async fn ingest_corpus(
    client: &Client,
    corpus: Corpus,
    batch: usize,
    report: IngestReport,
) -> Result<IngestSummary> {
    let t0 = Instant::now();
    let total = corpus.docs.len() as u64;
    let bar = if report != IngestReport::Text {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} docs  {per_sec}  {msg}  eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut docs, mut chunks) = (0u64, 0u64);
    // the requests' stage times, summed (requests overlap: shares, not wall time)
    let (mut embed_ms, mut write_ms) = (0.0f64, 0.0f64);
    let mut failed = Vec::new();
    // up to `INGEST_IN_FLIGHT` requests at once, so that the embedders work on the next batch
    // while the previous one is written; memory stays bounded by that many batches
    let mut batches = corpus.docs.chunks(batch);
    let mut in_flight = futures::stream::FuturesOrdered::new();
    let mut stopped = false;
    let mut requests = 0u64;
    loop {
        while !stopped && in_flight.len() < INGEST_IN_FLIGHT {
            let Some(b) = batches.next() else { break };
            requests += 1;
            in_flight.push_back(async move { (b, client.ingest(b.to_vec()).await) });
        }
        let Some((b, r)) = futures::StreamExt::next(&mut in_flight).await else {
            break;
        };
        match r {
            Ok(r) => {
                docs += r.documents;
                chunks += r.chunks;
                embed_ms += r.timings_ms.embed;
                write_ms += r.timings_ms.write;
                failed.extend(r.failed);
            }
            Err(e) => {
                // what was acknowledged stays reported; this batch failed, those in flight
                // finish, and the rest are not sent
                let why = e.to_string();
                failed.extend(b.iter().map(|d| (d.id.clone(), why.clone())));
                stopped = true;
            }
        }
        bar.inc(b.len() as u64);
        let (e, w) = shares(embed_ms, write_ms);
        bar.set_message(format!(
            "{:.0} chunks/s  embed {e:.0}% / write {w:.0}%",
            chunks as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        ));
    }
    for b in batches {
        failed.extend(b.iter().map(|d| {
            (
                d.id.clone(),
                "not sent: an earlier batch failed".to_string(),
            )
        }));
    }
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let listed = |v: &[crate::corpus::Skipped]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|s| serde_json::json!({"path": s.path, "line": s.line, "reason": s.reason}))
            .collect()
    };
    if report == IngestReport::Json {
        println!(
            "{}",
            serde_json::json!({"documents": docs, "chunks": chunks, "seconds": secs,
                "docs_per_s": docs as f64 / secs.max(1e-9), "chunks_per_s": chunks as f64 / secs.max(1e-9),
                "stages_ms": {"embed": embed_ms, "write": write_ms},
                "skipped": listed(&corpus.skipped), "ignored": listed(&corpus.ignored),
                "replaced": listed(&corpus.replaced),
                "failed": failed})
        );
    } else if report == IngestReport::Text {
        let (e, w) = shares(embed_ms, write_ms);
        println!(
            "ingested {docs} documents ({chunks} chunks) in {secs:.1} s ({:.1} docs/s, {:.1} chunks/s); requests spent {e:.0}% embedding, {w:.0}% writing",
            docs as f64 / secs.max(1e-9),
            chunks as f64 / secs.max(1e-9),
        );
        for s in &corpus.ignored {
            println!("ignored {}: {}", s.path.display(), s.reason);
        }
        for s in &corpus.replaced {
            println!("replaced {}:{}: {}", s.path.display(), s.line, s.reason);
        }
        for s in &corpus.skipped {
            println!("skipped {}:{}: {}", s.path.display(), s.line, s.reason);
        }
        for (id, e) in &failed {
            println!("failed {id}: {e}");
        }
    }
    // a partial ingest is an error: the caller must not take it for a complete one
    if !failed.is_empty() || !corpus.skipped.is_empty() {
        bail!(
            "{} records not ingested: {} failed, {} skipped ({docs} documents acknowledged)",
            failed.len() + corpus.skipped.len(),
            failed.len(),
            corpus.skipped.len()
        );
    }
    if docs == 0 && total > 0 {
        bail!("no document was acknowledged");
    }
    Ok(IngestSummary {
        docs,
        chunks,
        seconds: secs,
        embed_ms,
        write_ms,
        requests,
    })
}

/// The embedding and writing shares (percent) of the requests' summed stage times.
fn shares(embed_ms: f64, write_ms: f64) -> (f64, f64) {
    let busy = (embed_ms + write_ms).max(1e-9);
    (100.0 * embed_ms / busy, 100.0 * write_ms / busy)
}

/// Asks a question and prints the streamed answer, then sources, coverage and timings. `held`:
/// the answer mode is `auto`, whose generated answers arrive whole once checked against their
/// sources: a line on standard error says so rather than leave the wait silent.
pub async fn ask_and_print(
    client: &Client,
    question: &str,
    options: AskOptions,
    json: bool,
    held: bool,
) -> Result<()> {
    let mut stream = client.ask(question, options).await?;
    if held && !json {
        eprintln!(
            "(answer mode auto: a generated answer is shown once checked against its sources)"
        );
    }
    let mut summary: Option<AskSummary> = None;
    while let Some(chunk) = stream.next().await {
        let c = chunk?;
        if !json && !c.text.is_empty() {
            print!("{}", c.text);
            std::io::stdout().flush().ok();
        }
        if c.summary.is_some() {
            summary = c.summary;
        }
    }
    let s = summary.context("the answer stream ended without a summary")?;
    if json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    println!();
    if s.unsourced {
        println!("(unsourced: no shard answered, the model answered alone)");
    }
    let src: Vec<String> = s
        .sources
        .iter()
        .map(|x| format!("{} ({:.3})", x.doc_id, x.score))
        .collect();
    println!(
        "sources: {}",
        if src.is_empty() {
            "none".into()
        } else {
            src.join(", ")
        }
    );
    if s.answer_mode != "generate" {
        match &s.fallback {
            Some(why) => println!(
                "(answer mode: {}: quoted from the sources, since {why})",
                s.answer_mode
            ),
            None => println!("(answer mode: {}: quoted from the sources)", s.answer_mode),
        }
    }
    if let Some(g) = &s.grounding {
        let weak: Vec<&str> = g
            .sentences
            .iter()
            .filter(|x| x.weak)
            .map(|x| x.text.as_str())
            .collect();
        print!(
            "grounding: {:.2} ({} of {} sentences weakly supported",
            g.score,
            weak.len(),
            g.sentences.len()
        );
        if weak.is_empty() {
            println!(")");
        } else {
            println!(
                ": {})",
                weak.iter()
                    .map(|w| format!("{w:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    crate::output::print_coverage(&s.coverage);
    if let Some(r) = s.rerank.as_deref().filter(|r| *r != "applied") {
        println!("rerank: {r}");
    }
    if let Some(d) = &s.degraded {
        println!("degraded: {d}");
    }
    if s.truncated {
        println!(
            "(answer incomplete: {})",
            s.truncated_reason.as_deref().unwrap_or("cut short")
        );
    }
    let t = &s.timings_ms;
    println!(
        "timings: embed {:.0} ms, search {:.0} ms, rerank {:.0} ms, first token {:.0} ms, generate {:.0} ms, total {:.0} ms",
        t.embed, t.search, t.rerank, t.first_token, t.generate, t.total
    );
    Ok(())
}

/// Starts every node of `cfg` in this process (the embedded cluster, `node` first), connects a
/// client and waits until every shard replica serves (its recovered data, or none), so that
/// nothing is written or asked before; the node handle to shut down and the client.
pub async fn start_embedded(
    cfg: Arc<ClusterConfig>,
    node: &str,
    models: &Path,
) -> Result<(ragfleet_runtime::NodeHandle, Client)> {
    let loader = Arc::new(ModelFiles::new(models.to_path_buf()));
    let handle =
        ragfleet_runtime::start_node(cfg.clone(), node, loader, NodeOptions { embedded: true })
            .await
            .context("the embedded cluster did not start")?;
    let ready = async {
        let client = Client::connect(cfg, Duration::from_secs(30)).await?;
        if !wait_all_serving(&client, Duration::from_secs(120)).await? {
            bail!("the shards did not all serve within 120 s");
        }
        anyhow::Ok(client)
    }
    .await;
    match ready {
        Ok(client) => Ok((handle, client)),
        Err(e) => {
            handle.shutdown().await;
            Err(e)
        }
    }
}

/// Waits (polling, up to `limit`) until every shard replica serves its recovered data;
/// whether they all do.
pub async fn wait_all_serving(client: &Client, limit: Duration) -> Result<bool> {
    let start = Instant::now();
    loop {
        let s = client.status().await?;
        if s.shards
            .iter()
            .all(|sh| sh.replicas.iter().all(|r| r.state == "serving"))
        {
            return Ok(true);
        }
        if start.elapsed() >= limit {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// How the demo serves HTTP.
pub struct Serve {
    /// Keep running after the answers, until Ctrl-C.
    pub keep: bool,
    /// The gateway's address, when free (else a free port).
    pub http: String,
}

/// `addr` when it can be bound now, else a free loopback port.
fn free_or_any(addr: &str) -> Result<String> {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(addr.to_string()),
        Err(_) => Ok(format!("127.0.0.1:{}", free_port()?)),
    }
}

/// The embedded cluster's configuration: two logical nodes in one process, the first serving
/// the HTTP API on `http`.
pub fn demo_config(data_dir: &Path, models: &Path, http: &str) -> Result<ClusterConfig> {
    let (p1, p2) = (free_port()?, free_port()?);
    let text = format!(
        r#"
version = 1
name = "ragfleet-demo"
cookie = "ragfleet-demo-cookie-{}"
[[node]]
name = "a"
addr = "127.0.0.1:{p1}"
roles = ["coordinator", "embedder", "shard", "generator"]
http_addr = "{http}"
[[node]]
name = "b"
addr = "127.0.0.1:{p2}"
roles = ["embedder", "shard", "reranker"]
[index]
shards = 4
replication = 2
write_quorum = 2
segment_size = 1024
[query]
shard_deadline_ms = 2000
deadline_ms = 120000
[generator]
max_tokens = 96
context_tokens = 768
"#,
        std::process::id()
    );
    let mut cfg = ClusterConfig::parse(&text)?;
    cfg.data_dir = data_dir.to_path_buf();
    cfg.models_dir = models.to_path_buf();
    Ok(cfg)
}

/// Bumped when the shards' on-disk format changes (2: write versions; 3: sentence vectors).
pub const INDEX_FORMAT: u32 = 3;

/// `ragfleet demo`.
pub async fn run(
    data_dir: PathBuf,
    models: PathBuf,
    question: String,
    max_tokens: u32,
    serve: Serve,
) -> Result<()> {
    if !ragfleet_models::fetch::models_present(&models) {
        println!("fetching models into {} ...", models.display());
        let m = models.clone();
        tokio::task::spawn_blocking(move || ragfleet_models::fetch::fetch_models(&m)).await??;
    }
    let corpus = Corpus::read_str(DEMO_CORPUS, "rust-book.jsonl");
    let marker = data_dir.join("ingested.txt");
    let stamp = format!(
        "{} documents, corpus {}, index format {INDEX_FORMAT}",
        corpus.docs.len(),
        DEMO_CORPUS.len()
    );
    let built = std::fs::read_to_string(&marker).ok();
    if built.as_ref().is_some_and(|b| *b != stamp) {
        // another corpus or an older on-disk format: start this demo's index afresh
        println!(
            "rebuilding the demo index in {} ({stamp})",
            data_dir.display()
        );
        std::fs::remove_dir_all(&data_dir)
            .with_context(|| format!("cannot clear {}", data_dir.display()))?;
    }
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let cfg = Arc::new(demo_config(&data_dir, &models, &free_or_any(&serve.http)?)?);
    let t0 = Instant::now();
    println!("starting an embedded cluster: 2 embedder replicas, 4 shards x 2 replicas, a reranker, a generator, a coordinator");
    let loader = Arc::new(ModelFiles::new(models.clone()));
    let node =
        ragfleet_runtime::start_node(cfg.clone(), "a", loader, NodeOptions { embedded: true })
            .await?;
    let client = Client::connect(cfg.clone(), Duration::from_secs(30)).await?;
    println!("cluster up in {:.1} s", t0.elapsed().as_secs_f64());
    if let Some(http) = node.http_addr() {
        println!(
            "HTTP API (OpenAI-compatible) on http://{http}{}:",
            if serve.keep {
                ""
            } else {
                " while the demo runs (--serve keeps it up)"
            }
        );
        println!(
            "  curl -N http://{http}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"What is a crate?\"}}], \"stream\": true}}'"
        );
    }

    if built.as_deref() == Some(stamp.as_str()) {
        // past the wait, queries report the coverage they get
        wait_all_serving(&client, Duration::from_secs(30)).await?;
        println!("index already built in {} ({stamp})", data_dir.display());
    } else {
        println!(
            "ingesting the bundled corpus ({} sections of The Rust Programming Language) ...",
            corpus.docs.len()
        );
        ingest_corpus(&client, corpus, 32, IngestReport::Text).await?;
        std::fs::write(&marker, &stamp)?;
    }
    let questions: Vec<String> = if question.trim().is_empty() {
        SAMPLE_QUESTIONS.iter().map(|s| s.to_string()).collect()
    } else {
        vec![question]
    };
    for q in questions {
        println!("\nQ: {q}\nA: ");
        let opts = AskOptions {
            max_tokens: Some(max_tokens),
            sampling: Sampling::default(),
            ..Default::default()
        };
        ask_and_print(&client, &q, opts, false, false).await?;
    }
    if serve.keep {
        if let Some(http) = node.http_addr() {
            println!("\nserving the HTTP API on http://{http} (Ctrl-C stops)");
        }
        tokio::signal::ctrl_c().await?;
    }
    client.close();
    node.shutdown().await;
    Ok(())
}
