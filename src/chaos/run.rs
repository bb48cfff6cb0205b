//! `ragfleet chaos run`: start the nodes of a cluster file as child processes, drive a steady
//! workload through the client, inject a plan's faults at seeded times, then check the
//! invariants: every acknowledged write on every replica (latest content), no deleted document
//! back, truthful coverage, queries failing only where the plan allows, replicas converged
//! within a bound, no node panicking or exiting unasked, memory bounded.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ragfleet_client::groups;
use ragfleet_client::typed::{call_typed, Chaos, Digest, Fetch};
use ragfleet_config::{ClusterConfig, NodeRole};
use ragfleet_proto::{ChaosAction, Document, RetrieveOptions, SearchMode, WriteOp};
use ragfleet_runtime::Client;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::plan::{Action, Plan};

/// What `chaos run` was asked.
pub(crate) struct RunArgs {
    pub config: PathBuf,
    pub cfg: ClusterConfig,
    pub data_dir: PathBuf,
    pub models: Option<PathBuf>,
    pub plan: Plan,
    pub plan_path: PathBuf,
    pub seed: u64,
    pub duration_s: f64,
    pub json: bool,
}

/// The node processes of the run.
struct Nodes {
    exe: PathBuf,
    config: PathBuf,
    data_dir: PathBuf,
    models: Option<PathBuf>,
    logs: PathBuf,
    children: Mutex<HashMap<String, Child>>,
    /// Nodes the runner took down on purpose (killed, not yet restarted).
    down: Mutex<HashSet<String>>,
    /// Nodes that exited without being asked.
    unexpected_exits: Mutex<Vec<String>>,
    max_rss_kib: Mutex<BTreeMap<String, u64>>,
}

impl Nodes {
    fn spawn(&self, name: &str) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(["node", "--config"])
            .arg(&self.config)
            .args(["--node", name, "--data-dir"])
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(m) = &self.models {
            cmd.arg("--models").arg(m);
        }
        if std::env::var_os("RAGFLEET_LOG").is_none() {
            cmd.env("RAGFLEET_LOG", "info,ractor_cluster=warn");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start node {name}"))?;
        self.children
            .lock()
            .expect("nodes")
            .insert(name.to_string(), child);
        self.down.lock().expect("nodes").remove(name);
        Ok(())
    }

    fn signal(&self, name: &str, sig: i32) {
        if let Some(c) = self.children.lock().expect("nodes").get(name) {
            // SAFETY: signalling a child process this runner started
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    fn kill(&self, name: &str) {
        self.down.lock().expect("nodes").insert(name.to_string());
        if let Some(mut c) = self.children.lock().expect("nodes").remove(name) {
            // a frozen process dies of SIGKILL too
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Notes nodes that exited unasked, and samples every node's resident memory.
    fn watch(&self) {
        let mut children = self.children.lock().expect("nodes");
        let mut gone = Vec::new();
        for (name, c) in children.iter_mut() {
            match c.try_wait() {
                Ok(Some(status)) => gone.push((name.clone(), status)),
                _ => {
                    if let Some(kib) = rss_kib(c.id()) {
                        let mut m = self.max_rss_kib.lock().expect("nodes");
                        let e = m.entry(name.clone()).or_insert(0);
                        *e = (*e).max(kib);
                    }
                }
            }
        }
        for (name, status) in gone {
            children.remove(&name);
            self.unexpected_exits
                .lock()
                .expect("nodes")
                .push(format!("node {name} exited unasked ({status})"));
        }
    }

    fn stop_all(&self) {
        let names: Vec<String> = self
            .children
            .lock()
            .expect("nodes")
            .keys()
            .cloned()
            .collect();
        for n in names {
            self.signal(&n, libc::SIGCONT);
            self.kill(&n);
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A query's outcome, for the coverage check.
struct QueryRecord {
    start_ms: u64,
    end_ms: u64,
    /// Shards left out and why; `None` when the query failed.
    left_out: Option<Vec<(u32, String)>>,
    error: Option<String>,
}

/// What the writes did: the acknowledged content of each live document, documents whose
/// state is uncertain (a write or delete that was not acknowledged), and acknowledged deletes.
#[derive(Default)]
struct Ledger {
    live: BTreeMap<String, String>,
    /// Contents a document may hold after unacknowledged writes (any of them is correct).
    maybe: HashMap<String, Vec<String>>,
    deleted: HashSet<String>,
    acked: u64,
    failed: u64,
}

/// Up/down intervals of each node (down while killed or frozen), from the runner's actions.
#[derive(Default)]
struct Timeline {
    down_since: HashMap<String, u64>,
    intervals: Vec<(String, u64, u64)>,
}

impl Timeline {
    fn down(&mut self, node: &str, at: u64) {
        self.down_since.entry(node.to_string()).or_insert(at);
    }
    fn up(&mut self, node: &str, at: u64) {
        if let Some(s) = self.down_since.remove(node) {
            self.intervals.push((node.to_string(), s, at));
        }
    }
    /// Whether `node` was down (or within `grace` ms of coming back) at some point of [a, b].
    fn faulty(&self, node: &str, a: u64, b: u64, grace: u64) -> bool {
        self.down_since.get(node).is_some_and(|&s| s <= b)
            || self
                .intervals
                .iter()
                .any(|(n, s, e)| n == node && *s <= b && e + grace >= a)
    }
}

struct Shared {
    t0: Instant,
    queries: Mutex<Vec<QueryRecord>>,
    ledger: Mutex<Ledger>,
    timeline: Mutex<Timeline>,
    log: Mutex<Vec<String>>,
    stop: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }
    fn note(&self, what: String, json: bool) {
        let line = format!("{:>8.1} s  {what}", self.t0.elapsed().as_secs_f64());
        if !json {
            println!("{line}");
        }
        self.log.lock().expect("log").push(line);
    }
    fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Runs the experiment; returns the exit status (0: no invariant violated).
pub(crate) async fn run(a: RunArgs) -> Result<i32> {
    let cfg = Arc::new(a.cfg.clone());
    let names: Vec<String> = cfg.nodes.iter().map(|n| n.name.clone()).collect();
    let mut role_groups: Vec<(String, String)> = Vec::new();
    for n in &cfg.nodes {
        for (role, g) in [
            (NodeRole::Embedder, "embedder"),
            (NodeRole::Coordinator, "coordinator"),
            (NodeRole::Reranker, "reranker"),
            (NodeRole::Generator, "generator"),
        ] {
            if n.has(role) {
                role_groups.push((n.name.clone(), g.to_string()));
            }
        }
        for (s, _) in cfg.shards_of(&n.name) {
            role_groups.push((n.name.clone(), format!("shard.{s}")));
        }
    }
    let events = a
        .plan
        .schedule(a.seed, a.duration_s, &names, &role_groups)?;
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("cannot create {}", a.data_dir.display()))?;
    let logs = a.data_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let nodes = Arc::new(Nodes {
        exe: std::env::current_exe()?,
        config: a.config.clone(),
        data_dir: a.data_dir.clone(),
        models: a.models.clone(),
        logs: logs.clone(),
        children: Mutex::new(HashMap::new()),
        down: Mutex::new(HashSet::new()),
        unexpected_exits: Mutex::new(Vec::new()),
        max_rss_kib: Mutex::new(BTreeMap::new()),
    });
    let shared = Arc::new(Shared {
        t0: Instant::now(),
        queries: Mutex::new(Vec::new()),
        ledger: Mutex::new(Ledger::default()),
        timeline: Mutex::new(Timeline::default()),
        log: Mutex::new(Vec::new()),
        stop: std::sync::atomic::AtomicBool::new(false),
    });
    if !a.json {
        println!(
            "chaos run: plan {} ({}), seed {}, {} events over {:.0} s; nodes {}; logs in {}",
            a.plan.name,
            a.plan.description,
            a.seed,
            events.len(),
            a.duration_s,
            names.join(", "),
            logs.display()
        );
    }
    for n in &names {
        nodes.spawn(n)?;
    }
    let client = Arc::new(Client::connect(cfg.clone(), Duration::from_secs(120)).await?);
    wait_serving(&client, &cfg, Duration::from_secs(180))
        .await
        .context("the cluster did not come up")?;
    // a seed corpus so that the first queries have something to find
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed ^ 0x5eed);
    let seed_docs: Vec<Document> = (0..8).map(|i| doc(a.seed, i, 0, &mut rng)).collect();
    let r = client.ingest(seed_docs.clone()).await?;
    {
        let failed: HashSet<&String> = r.failed.iter().map(|f| &f.0).collect();
        let mut l = shared.ledger.lock().expect("ledger");
        for d in seed_docs.iter().filter(|d| !failed.contains(&d.id)) {
            l.live.insert(d.id.clone(), d.text.clone());
            l.acked += 1;
        }
    }
    let t_faults = Instant::now();
    shared.note("faults begin".into(), a.json);

    // the watcher: unexpected exits and memory, every 500 ms
    let watcher = {
        let (nodes, shared) = (nodes.clone(), shared.clone());
        tokio::spawn(async move {
            while !shared.stopped() {
                nodes.watch();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let workload = tokio::spawn(workload(
        client.clone(),
        shared.clone(),
        a.plan.workload.clone(),
        a.seed,
        a.json,
    ));
    // the faults, at their times
    let mut recovery: Vec<(String, tokio::task::JoinHandle<Option<u64>>)> = Vec::new();
    let mut fault_rows: Vec<serde_json::Value> = Vec::new();
    for e in &events {
        let at = t_faults + Duration::from_millis(e.at_ms);
        tokio::time::sleep_until(at.into()).await;
        let now = shared.now_ms();
        let outcome = apply(&e.action, &nodes, &client, &cfg, &shared, now).await;
        shared.note(format!("{} ({outcome})", e.action), a.json);
        fault_rows.push(json!({"at_ms": e.at_ms, "fault": e.fault, "action": e.action.to_string(), "outcome": outcome}));
        if let Action::Restart(n) | Action::Thaw(n) = &e.action {
            let (client, n2) = (client.clone(), n.clone());
            let since = Instant::now();
            recovery.push((
                format!("{} at {:.1} s", e.action, e.at_ms as f64 / 1000.0),
                tokio::spawn(async move {
                    node_serving(&client, &n2, Duration::from_secs(120))
                        .await
                        .then(|| since.elapsed().as_millis() as u64)
                }),
            ));
        }
    }
    let end = t_faults + Duration::from_secs_f64(a.duration_s);
    tokio::time::sleep_until(end.into()).await;
    // everything back: nodes still down are restarted, frozen ones thawed
    for n in &names {
        nodes.signal(n, libc::SIGCONT);
        shared.timeline.lock().expect("t").up(n, shared.now_ms());
        if !nodes.children.lock().expect("nodes").contains_key(n) {
            nodes.spawn(n)?;
        }
    }
    shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = workload.await;
    shared.note(
        "faults and workload end; waiting for convergence".into(),
        a.json,
    );
    let mut violations: Vec<String> = Vec::new();
    let mut recovery_ms = serde_json::Map::new();
    for (what, h) in recovery {
        match h.await.ok().flatten() {
            Some(ms) => {
                recovery_ms.insert(what, json!(ms));
            }
            None => violations.push(format!(
                "{what}: its replicas did not serve again within 120 s"
            )),
        }
    }
    let t_conv = Instant::now();
    let converged = converge(
        &client,
        &cfg,
        Duration::from_secs_f64(a.plan.converge_within_s),
    )
    .await;
    match converged {
        Ok(()) => {
            recovery_ms.insert(
                "convergence".into(),
                json!(t_conv.elapsed().as_millis() as u64),
            );
        }
        Err(e) => violations.push(format!(
            "replicas did not converge within {} s: {e}",
            a.plan.converge_within_s
        )),
    }
    nodes.watch();
    shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    watcher.abort();

    // invariants
    let (lost, resurrected, checked) = check_writes(&client, &cfg, &shared).await;
    for l in &lost {
        violations.push(format!("acknowledged write lost: {l}"));
    }
    for r in &resurrected {
        violations.push(format!("deleted document came back: {r}"));
    }
    let queries = shared.queries.lock().expect("q");
    let total = queries.len();
    let failed: Vec<&QueryRecord> = queries.iter().filter(|q| q.error.is_some()).collect();
    let partial = queries
        .iter()
        .filter(|q| q.left_out.as_ref().is_some_and(|l| !l.is_empty()))
        .count();
    if !a.plan.allow_query_failures {
        for q in failed.iter().take(5) {
            violations.push(format!(
                "query failed at {:.1} s: {}",
                q.start_ms as f64 / 1000.0,
                q.error.as_deref().unwrap_or("")
            ));
        }
        if failed.len() > 5 {
            violations.push(format!("... {} more failed queries", failed.len() - 5));
        }
    }
    // coverage truthful: a shard is left out only while none of its replicas was up
    let placement = cfg.placement();
    let grace = cfg.failure.suspect_after_ms + 2000;
    let timeline = shared.timeline.lock().expect("t");
    let mut untruthful = 0;
    for q in queries.iter() {
        for (s, reason) in q.left_out.iter().flatten() {
            // each replica down: its node killed or frozen, or the replica itself panicked
            // (restarting) or stalled
            let all_down = placement[*s as usize].iter().all(|n| {
                timeline.faulty(n, q.start_ms, q.end_ms, grace)
                    || timeline.faulty(&format!("{n}/shard.{s}"), q.start_ms, q.end_ms, grace)
            });
            if !all_down {
                untruthful += 1;
                if untruthful <= 5 {
                    violations.push(format!(
                        "shard {s} left out ({reason}) at {:.1} s while a replica's node was up",
                        q.start_ms as f64 / 1000.0
                    ));
                }
            }
        }
    }
    drop(timeline);
    violations.extend(
        nodes
            .unexpected_exits
            .lock()
            .expect("nodes")
            .iter()
            .cloned(),
    );
    let max_rss: BTreeMap<String, u64> = nodes
        .max_rss_kib
        .lock()
        .expect("nodes")
        .iter()
        .map(|(n, k)| (n.clone(), k / 1024))
        .collect();
    for (n, mib) in &max_rss {
        if *mib > a.plan.max_rss_mib {
            violations.push(format!(
                "node {n} reached {mib} MiB resident (bound {} MiB)",
                a.plan.max_rss_mib
            ));
        }
    }
    nodes.stop_all();
    for n in &names {
        let log = std::fs::read_to_string(logs.join(format!("{n}.log"))).unwrap_or_default();
        // a panic the runner asked for names itself ("chaos: ... told to panic") on the line
        // after the panic's location
        let lines: Vec<&str> = log.lines().collect();
        let real = lines.iter().enumerate().find(|(i, l)| {
            l.contains("panicked at")
                && !l.contains("chaos:")
                && !lines.get(i + 1).is_some_and(|n| n.contains("chaos:"))
        });
        if let Some((_, p)) = real {
            violations.push(format!("node {n} panicked: {}", p.trim()));
        }
    }
    // each event's effect: the queries that started in the 5 s after it
    let offset = t_faults.duration_since(shared.t0).as_millis() as u64;
    for row in fault_rows.iter_mut() {
        let at = offset + row["at_ms"].as_u64().unwrap_or(0);
        let window: Vec<&QueryRecord> = queries
            .iter()
            .filter(|q| q.start_ms >= at && q.start_ms < at + 5000)
            .collect();
        let mut lat: Vec<u64> = window.iter().map(|q| q.end_ms - q.start_ms).collect();
        lat.sort_unstable();
        row["queries_next_5s"] = json!({
            "total": window.len(),
            "failed": window.iter().filter(|q| q.error.is_some()).count(),
            "partial": window.iter().filter(|q| q.left_out.as_ref().is_some_and(|l| !l.is_empty())).count(),
            "max_ms": lat.last().copied().unwrap_or(0),
        });
    }
    let ledger = shared.ledger.lock().expect("ledger");
    let report = json!({
        "seed": a.seed,
        "plan": a.plan.name,
        "plan_file": a.plan_path,
        "duration_s": a.duration_s,
        "queries": {"total": total, "failed": failed.len(), "partial": partial},
        "writes": {"acked": ledger.acked, "failed": ledger.failed, "checked_docs": checked,
                   "lost": lost.len(), "resurrected": resurrected.len()},
        "faults": fault_rows,
        "violations": violations,
        "recovery_ms": recovery_ms,
        "max_rss_mib": max_rss,
    });
    if a.json {
        println!("{report}");
    } else {
        println!();
        println!(
            "{:>9}  {:<34} {:>7} {:>6} {:>7} {:>7}",
            "at", "fault", "queries", "failed", "partial", "max ms"
        );
        for row in &fault_rows {
            let q = &row["queries_next_5s"];
            println!(
                "{:>8.1}s  {:<34} {:>7} {:>6} {:>7} {:>7}",
                row["at_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
                row["action"].as_str().unwrap_or(""),
                q["total"],
                q["failed"],
                q["partial"],
                q["max_ms"]
            );
        }
        println!(
            "queries: {total} ({} failed, {partial} partial)   writes: {} acknowledged, {} not, {} documents checked on every replica: {} lost, {} resurrected",
            failed.len(),
            ledger.acked,
            ledger.failed,
            checked,
            lost.len(),
            resurrected.len()
        );
        for (k, v) in &recovery_ms {
            println!("recovery: {k}: {v} ms");
        }
        println!(
            "max resident memory: {}",
            max_rss
                .iter()
                .map(|(n, m)| format!("{n} {m} MiB"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if violations.is_empty() {
            println!(
                "no invariant violated (plan {}, seed {})",
                a.plan.name, a.seed
            );
        }
    }
    if !violations.is_empty() {
        for v in &violations {
            eprintln!("violation: {v}");
        }
        eprintln!(
            "{} invariant violations; replay with: ragfleet chaos run --config {} --plan {} --seed {}",
            violations.len(),
            a.config.display(),
            a.plan_path.display(),
            a.seed
        );
        return Ok(1);
    }
    Ok(0)
}

/// A document of this run: a unique marker token (`zq<seed>x<n>v<version>`), so BM25 finds it
/// and its content shows which write it came from.
fn doc(seed: u64, n: u64, version: u64, rng: &mut rand::rngs::StdRng) -> Document {
    const WORDS: [&str; 12] = [
        "replica", "shard", "ledger", "harbour", "lantern", "orchard", "granite", "meadow",
        "signal", "quarry", "beacon", "thicket",
    ];
    let filler: Vec<&str> = (0..8)
        .map(|_| WORDS[rng.gen_range(0..WORDS.len())])
        .collect();
    Document {
        id: format!("chaos-{seed}-{n}"),
        title: String::new(),
        text: format!(
            "Record zq{seed}x{n} version v{version}: {}.",
            filler.join(" ")
        ),
    }
}

/// The steady workload: retrievals at a rate, ingests of new documents, rewrites and deletes of
/// acknowledged ones, until the run stops.
async fn workload(
    client: Arc<Client>,
    shared: Arc<Shared>,
    w: super::plan::Workload,
    seed: u64,
    json: bool,
) {
    let querier = {
        let (client, shared) = (client.clone(), shared.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x9e37);
            let every = Duration::from_secs_f64(1.0 / w.retrieve_per_s.max(0.01));
            let mut next = Instant::now();
            while !shared.stopped() {
                next += every;
                let known: Vec<String> = shared
                    .ledger
                    .lock()
                    .expect("ledger")
                    .live
                    .keys()
                    .cloned()
                    .collect();
                let (q, mode) = if !known.is_empty() && rng.gen_bool(0.7) {
                    let id = &known[rng.gen_range(0..known.len())];
                    let n = id.rsplit('-').next().unwrap_or("0");
                    (format!("zq{seed}x{n}"), SearchMode::Bm25)
                } else {
                    (
                        "which replica holds the ledger".to_string(),
                        SearchMode::Dense,
                    )
                };
                let opts = RetrieveOptions {
                    k: Some(5),
                    mode,
                    rerank: None,
                    deadline_ms: None,
                };
                let start_ms = shared.now_ms();
                let r = client.retrieve(&q, opts).await;
                let end_ms = shared.now_ms();
                let rec = match r {
                    Ok(r) => QueryRecord {
                        start_ms,
                        end_ms,
                        left_out: Some(
                            r.coverage
                                .left_out
                                .iter()
                                .map(|l| (l.shard, l.reason.clone()))
                                .collect(),
                        ),
                        error: None,
                    },
                    Err(e) => {
                        shared.note(format!("query failed: {e}"), json);
                        QueryRecord {
                            start_ms,
                            end_ms,
                            left_out: None,
                            error: Some(e.to_string()),
                        }
                    }
                };
                shared.queries.lock().expect("q").push(rec);
                tokio::time::sleep_until(next.into()).await;
            }
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x1b9e57);
    let mut n: u64 = 8; // the seed corpus took 0..8
    let mut tick: usize = 0;
    let every = Duration::from_millis(w.ingest_every_ms);
    let mut next = Instant::now();
    while !shared.stopped() {
        next += every;
        tick += 1;
        let mut docs: Vec<Document> = (0..w.ingest_batch as u64)
            .map(|i| doc(seed, n + i, 0, &mut rng))
            .collect();
        n += w.ingest_batch as u64;
        let known: Vec<String> = shared
            .ledger
            .lock()
            .expect("ledger")
            .live
            .keys()
            .cloned()
            .collect();
        if w.update_every > 0 && tick % w.update_every == 0 && !known.is_empty() {
            let id = &known[rng.gen_range(0..known.len())];
            let k: u64 = id
                .rsplit('-')
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            docs.push(doc(seed, k, tick as u64, &mut rng));
        }
        let r = client.ingest(docs.clone()).await;
        {
            let mut l = shared.ledger.lock().expect("ledger");
            let failed: HashSet<String> = match &r {
                Ok(r) => r.failed.iter().map(|f| f.0.clone()).collect(),
                Err(_) => docs.iter().map(|d| d.id.clone()).collect(),
            };
            for d in &docs {
                if failed.contains(&d.id) {
                    // not acknowledged: it may or may not have landed
                    l.failed += 1;
                    l.maybe
                        .entry(d.id.clone())
                        .or_default()
                        .push(d.text.clone());
                } else {
                    l.acked += 1;
                    l.deleted.remove(&d.id);
                    l.maybe.remove(&d.id);
                    l.live.insert(d.id.clone(), d.text.clone());
                }
            }
        }
        if w.delete_every > 0 && tick % w.delete_every == 0 && !known.is_empty() {
            let id = known[rng.gen_range(0..known.len())].clone();
            let r = client.delete(vec![id.clone()]).await;
            let mut l = shared.ledger.lock().expect("ledger");
            match r {
                Ok(r) if r.failed.is_empty() => {
                    l.acked += 1;
                    l.live.remove(&id);
                    l.maybe.remove(&id);
                    l.deleted.insert(id);
                }
                _ => {
                    // uncertain: deleted or not
                    l.failed += 1;
                    if let Some(text) = l.live.remove(&id) {
                        l.maybe.entry(id.clone()).or_default().push(text);
                    }
                    l.maybe.entry(id).or_default().push(String::new());
                }
            }
        }
        tokio::time::sleep_until(next.into()).await;
    }
    let _ = querier.await;
}

/// Carries out one action; returns what happened, in words.
async fn apply(
    action: &Action,
    nodes: &Nodes,
    client: &Client,
    cfg: &ClusterConfig,
    shared: &Shared,
    now: u64,
) -> String {
    match action {
        Action::Kill(n) => {
            shared.timeline.lock().expect("t").down(n, now);
            nodes.kill(n);
            "done".into()
        }
        Action::Freeze(n) => {
            shared.timeline.lock().expect("t").down(n, now);
            nodes.signal(n, libc::SIGSTOP);
            "done".into()
        }
        Action::Thaw(n) => {
            nodes.signal(n, libc::SIGCONT);
            shared.timeline.lock().expect("t").up(n, now);
            "done".into()
        }
        Action::Restart(n) => {
            let r = nodes.spawn(n);
            shared.timeline.lock().expect("t").up(n, now);
            match r {
                Ok(()) => "done".into(),
                Err(e) => format!("failed: {e}"),
            }
        }
        Action::Panic { node, group } => {
            // a panicked shard replica restarts, recovers and catches up (or waits for a
            // peer) before it serves again
            if group.starts_with("shard.") {
                let back = 2 * cfg.failure.suspect_after_ms.clamp(1000, 10_000) + 3000;
                let mut tl = shared.timeline.lock().expect("t");
                tl.intervals
                    .push((format!("{node}/{group}"), now, now + back));
            }
            chaos_call(client, node, group, ChaosAction::Panic).await
        }
        Action::Stall { node, group, ms } => {
            if group.starts_with("shard.") {
                let mut tl = shared.timeline.lock().expect("t");
                tl.intervals
                    .push((format!("{node}/{group}"), now, now + ms));
            }
            chaos_call(client, node, group, ChaosAction::Stall(*ms)).await
        }
        Action::Corrupt { node, target, pick } => corrupt(cfg, node, target, *pick),
    }
}

async fn chaos_call(client: &Client, node: &str, group: &str, action: ChaosAction) -> String {
    let g = format!("ragfleet.{group}");
    let mut hit = 0;
    for a in client.members(&g) {
        let info = call_typed(
            &a,
            ragfleet_client::typed::Ping {},
            Duration::from_millis(500),
        )
        .await;
        if info.is_ok_and(|i| i.node == node) {
            let _ = call_typed(&a, Chaos { action }, Duration::from_millis(500)).await;
            hit += 1;
        }
    }
    if hit == 0 {
        "no such actor up".into()
    } else {
        format!("{hit} actors")
    }
}

/// Damages a file of a stopped node: the write-ahead log cut in the middle of its last record
/// (or, when empty, a sealed segment with a flipped byte) of a shard chosen by `pick`.
fn corrupt(cfg: &ClusterConfig, node: &str, target: &str, pick: u64) -> String {
    let shards = cfg.shards_of(node);
    if shards.is_empty() {
        return "no shard on this node".into();
    }
    let (s, _) = shards[(pick % shards.len() as u64) as usize];
    let dir = cfg.replica_dir(node, s);
    let file = |p: PathBuf| -> Option<(PathBuf, u64)> {
        let len = std::fs::metadata(&p).ok()?.len();
        (len > 0).then_some((p, len))
    };
    let wal = file(dir.join("wal.log"));
    let seg = std::fs::read_dir(&dir).ok().and_then(|d| {
        d.filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|x| x == "bin")
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("seg-"))
            })
            .find_map(file)
    });
    let chosen = match target {
        "segment" => seg.or(wal),
        _ => wal.or(seg),
    };
    let Some((path, len)) = chosen else {
        return format!("shard {s}: no file to damage yet");
    };
    let r = if path.extension().is_some_and(|x| x == "log") {
        // a torn tail: cut inside the last bytes
        let cut = len - 1 - pick % len.min(16);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(cut))
            .map(|_| format!("{} cut from {len} to {cut} bytes", path.display()))
    } else {
        std::fs::read(&path).and_then(|mut b| {
            let i = (pick as usize) % b.len();
            b[i] ^= 0x5a;
            std::fs::write(&path, b).map(|_| format!("{} byte {i} flipped", path.display()))
        })
    };
    r.unwrap_or_else(|e| format!("could not damage {}: {e}", path.display()))
}

/// Waits until every node is alive and every replica serving.
async fn wait_serving(client: &Client, cfg: &ClusterConfig, within: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(s) = client.status().await {
            let alive = s.nodes.iter().all(|n| n.alive);
            let serving = s
                .shards
                .iter()
                .all(|sh| sh.replicas.iter().all(|r| r.state == "serving"));
            if alive && serving && s.nodes.len() == cfg.nodes.len() {
                return Ok(());
            }
        }
        if start.elapsed() > within {
            bail!("not every node alive and replica serving within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `node` is alive with all its replicas serving, within `within`.
async fn node_serving(client: &Client, node: &str, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Ok(s) = client.status().await {
            let alive = s.nodes.iter().any(|n| n.name == node && n.alive);
            let serving = s.shards.iter().all(|sh| {
                sh.replicas
                    .iter()
                    .filter(|r| r.node == node)
                    .all(|r| r.state == "serving")
            });
            if alive && serving {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Waits until every node serves and every shard's replicas hold equal digests.
async fn converge(client: &Client, cfg: &ClusterConfig, within: Duration) -> Result<()> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < within {
        if wait_serving(client, cfg, Duration::from_millis(1))
            .await
            .is_ok()
        {
            let mut all_equal = true;
            for s in 0..cfg.index.shards {
                let members = client.members(&groups::shard(s));
                let mut digests = Vec::new();
                for m in &members {
                    if let Ok((d, _)) = call_typed(m, Digest {}, Duration::from_secs(2)).await {
                        digests.push(d);
                    }
                }
                let expected = cfg.placement()[s as usize].len();
                if digests.len() < expected || digests.windows(2).any(|w| w[0] != w[1]) {
                    all_equal = false;
                    last = format!(
                        "shard {s}: {} of {expected} replicas answered, digests {digests:?}",
                        digests.len()
                    );
                    break;
                }
            }
            if all_equal {
                return Ok(());
            }
        } else {
            last = "not every replica serving".into();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("{last}")
}

/// Checks every document the run wrote on every replica of its shard: acknowledged content
/// present (or one of the contents of later unacknowledged writes), deleted documents absent.
/// Returns (lost, resurrected, documents checked).
async fn check_writes(
    client: &Client,
    cfg: &ClusterConfig,
    shared: &Shared,
) -> (Vec<String>, Vec<String>, usize) {
    let (live, maybe, deleted) = {
        let l = shared.ledger.lock().expect("ledger");
        (l.live.clone(), l.maybe.clone(), l.deleted.clone())
    };
    let mut by_shard: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for id in live.keys().chain(deleted.iter()) {
        by_shard
            .entry(cfg.shard_of(id))
            .or_default()
            .push(id.clone());
    }
    let (mut lost, mut resurrected) = (Vec::new(), Vec::new());
    for (s, ids) in by_shard {
        for m in client.members(&groups::shard(s)) {
            let replica = call_typed(&m, ragfleet_client::typed::Ping {}, Duration::from_secs(2))
                .await
                .map(|i| i.node)
                .unwrap_or_else(|_| "?".into());
            for batch in ids.chunks(200) {
                let got = match call_typed(
                    &m,
                    Fetch {
                        doc_ids: batch.to_vec(),
                    },
                    Duration::from_secs(30),
                )
                .await
                {
                    Ok((ops, _)) => ops,
                    Err(e) => {
                        lost.push(format!("shard {s} on {replica}: fetch failed: {e}"));
                        continue;
                    }
                };
                let held: HashMap<String, String> = got
                    .into_iter()
                    .filter_map(|op| match op {
                        WriteOp::Upsert { doc_id, chunks, .. } => Some((
                            doc_id,
                            chunks
                                .iter()
                                .map(|c| c.text.clone())
                                .collect::<Vec<_>>()
                                .join(" "),
                        )),
                        WriteOp::Delete { .. } => None,
                    })
                    .collect();
                for id in batch {
                    if deleted.contains(id) {
                        if held.contains_key(id) {
                            resurrected.push(format!("{id} on {replica} (shard {s})"));
                        }
                        continue;
                    }
                    let want = &live[id];
                    let ok = held.get(id).is_some_and(|t| {
                        t.contains(want.as_str())
                            || maybe.get(id).is_some_and(|m| {
                                m.iter().any(|x| !x.is_empty() && t.contains(x.as_str()))
                            })
                    });
                    if !ok {
                        lost.push(format!(
                            "{id} on {replica} (shard {s}): {}",
                            match held.get(id) {
                                None => "missing".to_string(),
                                Some(t) => format!("holds {t:?}, acknowledged {want:?}"),
                            }
                        ));
                    }
                }
            }
        }
    }
    let checked = live.len() + deleted.len();
    (lost, resurrected, checked)
}

/// Where a run keeps its data by default.
pub(crate) fn default_data_dir(plan: &Path, seed: u64) -> PathBuf {
    let name = plan
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "plan".into());
    PathBuf::from("data").join(format!("chaos-{name}-{seed}"))
}
