//! `ragfleet chaos run`: start the nodes of a cluster file as child processes, drive a steady
//! workload through the client, inject a plan's faults at seeded times, then check the
//! invariants: every acknowledged write on every replica (latest content), no deleted document
//! back, truthful coverage, queries failing only where the plan allows, replicas converged
//! within a bound, no node panicking or exiting unasked, memory bounded.
pub(super) use std::collections::{BTreeMap, HashMap, HashSet};
pub(super) use std::path::{Path, PathBuf};
pub(super) use std::process::{Child, Command, Stdio};
pub(super) use std::sync::{Arc, Mutex};
pub(super) use std::time::{Duration, Instant};

pub(super) use anyhow::{bail, Context, Result};
pub(super) use ragfleet_client::groups;
pub(super) use ragfleet_client::typed::{call_typed, Chaos, Digest};
pub(super) use ragfleet_config::{ClusterConfig, NodeRole};
pub(super) use ragfleet_proto::{ChaosAction, Document, RetrieveOptions, SearchMode, WriteOp};
pub(super) use ragfleet_runtime::Client;
pub(super) use rand::{Rng, SeedableRng};
pub(super) use serde_json::json;

pub(super) use super::checks::{check_writes, converge, node_serving, wait_serving};
pub(super) use super::faults::apply;
pub(super) use super::net::Net;
pub(super) use super::nodes::Nodes;
pub(super) use super::plan::{Action, Plan};
pub(super) use super::workload::{doc, workload};

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

/// A query's outcome, for the coverage check.
pub(super) struct QueryRecord {
    pub(super) start_ms: u64,
    pub(super) end_ms: u64,
    /// The coordinator node that answered (empty when the query failed).
    pub(super) coordinator: String,
    /// Shards left out and why; `None` when the query failed.
    pub(super) left_out: Option<Vec<(u32, String)>>,
    pub(super) error: Option<String>,
}

/// What the writes did: the acknowledged content of each live document, documents whose
/// state is uncertain (a write or delete that was not acknowledged), and acknowledged deletes.
#[derive(Default)]
pub(super) struct Ledger {
    pub(super) live: BTreeMap<String, String>,
    /// Contents a document may hold after unacknowledged writes (any of them is correct).
    pub(super) maybe: HashMap<String, Vec<String>>,
    pub(super) deleted: HashSet<String>,
    pub(super) acked: u64,
    pub(super) failed: u64,
    /// Why writes were refused (the first few distinct reasons).
    pub(super) fail_reasons: Vec<String>,
}

impl Ledger {
    /// Ids of the documents acknowledged live.
    pub(super) fn live_ids(&self) -> Vec<String> {
        self.live.keys().cloned().collect()
    }
}

/// Up/down intervals of each node (down while killed or frozen), from the runner's actions.
#[derive(Default)]
pub(super) struct Timeline {
    pub(super) down_since: HashMap<String, u64>,
    pub(super) intervals: Vec<(String, u64, u64)>,
}

impl Timeline {
    pub(super) fn down(&mut self, node: &str, at: u64) {
        self.down_since.entry(node.to_string()).or_insert(at);
    }
    pub(super) fn up(&mut self, node: &str, at: u64) {
        if let Some(s) = self.down_since.remove(node) {
            self.intervals.push((node.to_string(), s, at));
        }
    }
    /// Whether `node` was down (or within `grace` ms of coming back) at some point of [a, b].
    pub(super) fn faulty(&self, node: &str, a: u64, b: u64, grace: u64) -> bool {
        self.down_since.get(node).is_some_and(|&s| s <= b)
            || self
                .intervals
                .iter()
                .any(|(n, s, e)| n == node && *s <= b && e + grace >= a)
    }
}

pub(super) struct Shared {
    t0: Instant,
    /// The wall clock at `t0` (to place node log lines on the run's time line).
    pub(super) t0_wall: std::time::SystemTime,
    pub(super) queries: Mutex<Vec<QueryRecord>>,
    pub(super) ledger: Mutex<Ledger>,
    pub(super) timeline: Mutex<Timeline>,
    pub(super) log: Mutex<Vec<String>>,
    pub(super) stop: std::sync::atomic::AtomicBool,
    /// The proxies on every link, when the plan has network faults.
    pub(super) net: Option<Arc<Net>>,
    /// Node names of the cluster.
    pub(super) names: Vec<String>,
}

impl Shared {
    pub(super) fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }
    pub(super) fn note(&self, what: String, json: bool) {
        let line = format!("{:>8.1} s  {what}", self.t0.elapsed().as_secs_f64());
        if !json {
            println!("{line}");
        }
        self.log.lock().expect("log").push(line);
    }
    pub(super) fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Runs the experiment; returns the exit status (0: no invariant violated).
pub(crate) async fn run(a: RunArgs) -> Result<i32> {
    let mut cfg = a.cfg.clone();
    if let Some(n) = a.plan.segment_size {
        cfg.index.segment_size = n;
        cfg.validate()
            .with_context(|| format!("plan {}: segment_size", a.plan.name))?;
    }
    let cfg = Arc::new(cfg);
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
    // network faults: every link through a proxy of the runner's
    let (net, mut configs, client_cfg) = if a.plan.needs_proxies() {
        let (net, files, client_cfg) =
            super::net::wire(&cfg, &a.data_dir.join("net"), a.seed).await?;
        (Some(net), files, Arc::new(client_cfg))
    } else {
        (None, HashMap::new(), cfg.clone())
    };
    // the plan's segment size: the nodes read it from a copy of the cluster file
    if a.plan.segment_size.is_some() && configs.is_empty() {
        let path = a.data_dir.join("cluster.toml");
        std::fs::write(&path, toml::to_string(&*cfg)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        configs = names.iter().map(|n| (n.clone(), path.clone())).collect();
    }
    let nodes = Arc::new(Nodes {
        exe: std::env::current_exe()?,
        config: a.config.clone(),
        configs,
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
        t0_wall: std::time::SystemTime::now(),
        queries: Mutex::new(Vec::new()),
        ledger: Mutex::new(Ledger::default()),
        timeline: Mutex::new(Timeline::default()),
        log: Mutex::new(Vec::new()),
        stop: std::sync::atomic::AtomicBool::new(false),
        net: net.clone(),
        names: names.clone(),
    });
    if !a.json {
        println!(
            "chaos run: plan {} ({}), seed {}, {} events over {:.0} s; nodes {}; logs in {}{}",
            a.plan.name,
            a.plan.description,
            a.seed,
            events.len(),
            a.duration_s,
            names.join(", "),
            logs.display(),
            if net.is_some() {
                "; network faults through a TCP proxy on every link"
            } else {
                ""
            }
        );
    }
    // disk-full faults: those nodes' data folders are small tmpfs mounts for the run
    let tmpfs: Vec<PathBuf> = a
        .plan
        .tmpfs_nodes(&names)
        .into_iter()
        .map(|(n, mib)| {
            let dir = a.data_dir.join(&n);
            let _ = std::fs::remove_dir_all(&dir);
            super::faults::mount_tmpfs(&dir, mib).map(|_| dir)
        })
        .collect::<Result<_, String>>()
        .map_err(anyhow::Error::msg)?;
    let _unmount = Unmount(tmpfs);
    for n in &names {
        nodes.spawn(n)?;
    }
    let client = Arc::new(Client::connect(client_cfg, Duration::from_secs(120)).await?);
    wait_serving(&client, &cfg, Duration::from_secs(180))
        .await
        .context("the cluster did not come up")?;
    let start_on = a.plan.workload.coordinator.clone().or_else(|| {
        cfg.nodes
            .iter()
            .find(|n| n.has(NodeRole::Coordinator))
            .map(|n| n.name.clone())
    });
    if let Some(c) = start_on {
        client
            .prefer(&c, Duration::from_secs(10))
            .await
            .with_context(|| format!("no coordinator on node {c}"))?;
    }
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
        if let Action::Restart(n) | Action::Thaw(n) | Action::Heal(n) = &e.action {
            let (client, n2, cfg2) = (client.clone(), n.clone(), cfg.clone());
            let since = Instant::now();
            // after a heal the node may see itself serving at once: what counts is that the
            // coordinator asked sees every node and replica again
            let healed = matches!(e.action, Action::Heal(_));
            recovery.push((
                format!("{} at {:.1} s", e.action, e.at_ms as f64 / 1000.0),
                tokio::spawn(async move {
                    let within = Duration::from_secs(120);
                    let back = if healed {
                        wait_serving(&client, &cfg2, within).await.is_ok()
                    } else {
                        node_serving(&client, &n2, within).await
                    };
                    back.then(|| since.elapsed().as_millis() as u64)
                }),
            ));
        }
    }
    let end = t_faults + Duration::from_secs_f64(a.duration_s);
    tokio::time::sleep_until(end.into()).await;
    // everything back: links healed, nodes still down restarted, frozen ones thawed
    if let Some(net) = &net {
        for n in &names {
            net.set_node(n, None, &names);
        }
    }
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
    // the nodes are done with: stopped, and each log read once for the checks below
    nodes.stop_all();
    if let Some(net) = &net {
        net.shutdown();
    }
    let node_logs: Vec<(&String, String)> = names
        .iter()
        .map(|n| {
            let log = std::fs::read_to_string(logs.join(format!("{n}.log")));
            (n, log.unwrap_or_default())
        })
        .collect();
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
    // coverage truthful: a shard is said to have no live replica (or to have failed) only
    // while none of its replicas was up
    let placement = cfg.placement();
    let grace = cfg.failure.suspect_after_ms + 2000;
    // a node's shard supervisor that gave up (too many panics of one replica) restarts every
    // replica of the node: each is down while it restarts and catches up
    let back = 2 * cfg.failure.suspect_after_ms.clamp(1000, 10_000) + 3000;
    for (n, log) in &node_logs {
        let shards = cfg.shards_of(n);
        let mut tl = shared.timeline.lock().expect("t");
        for (at, down_ms) in super::checks::shard_restarts(log, n, shared.t0_wall) {
            for (s, _) in &shards {
                tl.intervals
                    .push((format!("{n}/shard.{s}"), at, at + down_ms + back));
            }
        }
    }
    let timeline = shared.timeline.lock().expect("t");
    let mut untruthful = 0;
    for q in queries.iter() {
        for (s, reason) in q.left_out.iter().flatten() {
            // each replica down: its node killed or frozen, the replica itself panicked
            // (restarting) or stalled, or its node cut off from the coordinator that answered
            let all_down = placement[*s as usize].iter().all(|n| {
                timeline.faulty(n, q.start_ms, q.end_ms, grace)
                    || timeline.faulty(&format!("{n}/shard.{s}"), q.start_ms, q.end_ms, grace)
                    || (!q.coordinator.is_empty()
                        && q.coordinator != *n
                        && timeline.faulty(&link(&q.coordinator, n), q.start_ms, q.end_ms, grace))
            });
            // "deadline" is the truth whatever the replicas' state (the shard did not answer
            // in time: a slow replica on a loaded machine is not a lie); a claim that no
            // replica was live, or an error, while one was up is checked
            if !all_down && reason != "deadline" {
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
    for (n, log) in &node_logs {
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
        "network": if net.is_some() { "tcp-proxy" } else { "direct" },
        "plan_file": a.plan_path,
        "duration_s": a.duration_s,
        "queries": {"total": total, "failed": failed.len(), "partial": partial},
        "writes": {"acked": ledger.acked, "failed": ledger.failed, "failure_reasons": ledger.fail_reasons, "checked_docs": checked,
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

/// The timeline's name of the link between two parties.
pub(super) fn link(a: &str, b: &str) -> String {
    let (x, y) = super::net::key(a, b);
    format!("link {x}|{y}")
}

/// Where a run keeps its data by default.
pub(crate) fn default_data_dir(plan: &Path, seed: u64) -> PathBuf {
    let name = plan
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "plan".into());
    PathBuf::from("data").join(format!("chaos-{name}-{seed}"))
}

/// Unmounts the run's tmpfs data folders when the run ends (after the nodes stop).
struct Unmount(Vec<PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        for d in &self.0 {
            super::faults::unmount(d);
        }
    }
}
