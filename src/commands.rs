//! What each command does.
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ragfleet_config::ClusterConfig;
use ragfleet_config::NodeRole;
use ragfleet_proto::{AskOptions, Sampling};
use ragfleet_runtime::{Client, NodeOptions};

use crate::cli::{init_logs, joined, models_dir, ChaosCmd, Cli, ClusterArgs, Cmd, ModelsCmd};
use crate::loader::ModelFiles;
use crate::output::{print_retrieval, retrieval_json};
use crate::{bench, corpus, demo, eval};

async fn connect(cfg: ClusterConfig) -> Result<Client> {
    Ok(Client::connect(Arc::new(cfg), Duration::from_secs(10)).await?)
}

pub(crate) async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Node { cluster, node } => {
            init_logs("info");
            let cfg = Arc::new(cluster.load()?);
            let me = cfg.node(&node)?;
            if [NodeRole::Embedder, NodeRole::Reranker, NodeRole::Generator]
                .iter()
                .any(|r| me.has(*r))
            {
                crate::loader::require_backend().map_err(anyhow::Error::msg)?;
            }
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
            serve,
            http,
        } => {
            init_logs("warn,ractor_cluster=error");
            crate::loader::require_backend().map_err(anyhow::Error::msg)?;
            demo::run(
                data_dir,
                models_dir(&models),
                question.join(" "),
                max_tokens,
                demo::Serve { keep: serve, http },
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
            answer_mode,
            json,
            question,
        } => {
            init_logs("warn,ractor_cluster=error");
            let q = joined(&question, "question")?;
            let answer_mode = answer_mode
                .map(|m| m.parse::<ragfleet_proto::AnswerMode>())
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let cfg = cluster.load()?;
            let held = answer_mode.unwrap_or(cfg.generator.answer_mode)
                == ragfleet_proto::AnswerMode::Auto;
            let client = connect(cfg).await?;
            let options = AskOptions {
                retrieve: opts.options()?,
                max_tokens,
                sampling: Sampling {
                    temperature,
                    top_p: 0.9,
                    seed,
                    ..Default::default()
                },
                answer_mode,
                ..Default::default()
            };
            demo::ask_and_print(&client, &q, options, json, held).await
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
            let report = if json {
                demo::IngestReport::Json
            } else {
                demo::IngestReport::Text
            };
            demo::ingest_corpus(&client, corpus, batch.max(1), report).await?;
            Ok(())
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
            suite,
            work_dir,
            mode,
            rerank,
            modes,
            limit,
            json,
            answers,
            max_tokens,
            answer_modes,
        } => {
            init_logs("warn,ractor_cluster=error");
            let mode = crate::cli::parse_mode(mode.as_deref())?;
            let answer_modes = answer_modes
                .iter()
                .map(|m| m.parse::<ragfleet_proto::AnswerMode>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            let modes = if modes.is_empty() {
                vec![match mode {
                    None if !rerank => eval::EvalMode {
                        mode: None,
                        rerank: None,
                    },
                    m => eval::EvalMode {
                        mode: Some(m.unwrap_or_default()),
                        rerank: Some(rerank),
                    },
                }]
            } else {
                modes
                    .iter()
                    .map(|m| m.parse::<eval::EvalMode>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(anyhow::Error::msg)?
            };
            let cfg = cluster.load()?;
            if let Some(suite) = suite {
                let work = work_dir.unwrap_or_else(|| cfg.data_dir.join("eval"));
                let models = cfg.models_dir.clone();
                return crate::eval_suite::run(&suite, cfg, &work, &models, &modes, limit, json)
                    .await;
            }
            let queries = queries.context("--queries is required")?;
            let client = connect(cfg).await?;
            if answers {
                let run = crate::eval_answers::Run {
                    mode,
                    max_tokens,
                    limit,
                    answer_modes,
                    json,
                };
                return crate::eval_answers::run(&client, &queries, run).await;
            }
            let qrels = qrels.context("--qrels is required")?;
            eval::run(&client, &queries, &qrels, &modes, limit, json).await
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
            input,
            fvecs,
            mut texts,
        } => {
            crate::loader::require_backend().map_err(anyhow::Error::msg)?;
            let loader = ModelFiles::new(models_dir(&models));
            if let Some(path) = input {
                // a file or standard input read off the runtime's threads
                texts.extend(tokio::task::spawn_blocking(move || read_lines(&path)).await??);
            }
            if texts.is_empty() {
                bail!("no text to embed");
            }
            if let Some(out) = fvecs {
                return tokio::task::spawn_blocking(move || embed_to_fvecs(&loader, &texts, &out))
                    .await?;
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
                let req = ragfleet_proto::GenerationRequest {
                    system: String::new(),
                    user: p,
                    max_tokens: max_tokens as u32,
                    sampling: ragfleet_proto::Sampling {
                        temperature,
                        top_p,
                        seed,
                        ..Default::default()
                    },
                    push_to: None,
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
                            ragfleet_models::llama::StreamEvent::Done(_) => println!(),
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
            cmd:
                Some(ChaosCmd::Run {
                    cluster,
                    plan,
                    seed,
                    duration,
                    json,
                }),
            ..
        } => {
            init_logs("warn,ractor_cluster=off");
            let plan_path = plan;
            let plan = crate::chaos::plan::Plan::load(&plan_path)?;
            let mut cfg = cluster.load()?;
            let data_dir = cluster
                .data_dir
                .clone()
                .unwrap_or_else(|| crate::chaos::run::default_data_dir(&plan_path, seed));
            cfg.data_dir = data_dir.clone();
            let duration_s = duration.unwrap_or(plan.duration_s);
            let code = crate::chaos::run::run(crate::chaos::run::RunArgs {
                config: cluster.config.clone(),
                cfg,
                data_dir,
                models: cluster.models.clone(),
                plan,
                plan_path,
                seed,
                duration_s,
                json,
            })
            .await?;
            if code != 0 {
                bail!("chaos run found invariant violations");
            }
            Ok(())
        }
        Cmd::Chaos {
            cmd: None,
            cluster,
            group,
            action,
            node,
        } => {
            init_logs("warn,ractor_cluster=error");
            let Some(group) = group else {
                bail!("chaos needs --group G (or the subcommand `run`)");
            };
            let client = connect(cluster.load()?).await?;
            crate::chaos::actors(&client, &group, &action, node.as_deref()).await
        }
        Cmd::Bench { cmd } => {
            init_logs("warn,ractor_cluster=error");
            crate::loader::require_backend().map_err(anyhow::Error::msg)?;
            bench::run(cmd).await
        }
    }
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

/// The non-empty lines of a file (`-`: standard input), without their line ends.
fn read_lines(path: &std::path::Path) -> Result<Vec<String>> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect())
}

/// `embed --fvecs`: the texts embedded in batches (the embedder groups each batch by length)
/// and appended to `out` in their order, with progress on standard error.
fn embed_to_fvecs(loader: &ModelFiles, texts: &[String], out: &std::path::Path) -> Result<()> {
    const BATCH: usize = 2048;
    let e = loader.load_embedder().map_err(anyhow::Error::msg)?;
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut file = std::io::BufWriter::new(file);
    let t = Instant::now();
    for (i, batch) in texts.chunks(BATCH).enumerate() {
        let v = e.embed(batch)?;
        ragfleet_index::fvecs::append(&mut file, &v)?;
        let done = (i * BATCH + batch.len()) as f64;
        eprintln!(
            "{done} of {} texts embedded, {:.0} a second",
            texts.len(),
            done / t.elapsed().as_secs_f64()
        );
    }
    file.flush()?;
    println!(
        "{} embeddings of {} dimensions ({}) written to {} in {:.1} s",
        texts.len(),
        e.identity().dim,
        e.identity().name,
        out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
