//! A multi-process cluster on free loopback ports, for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Cluster tests share two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ragfleet")
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn models_dir() -> PathBuf {
    std::env::var_os("RAGFLEET_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models"))
}

/// A loopback port free now, outside the range the kernel draws outgoing connections' ports
/// from, and never handed out before in this test process. A config names its nodes' ports
/// before any node binds them: a port from `bind(0)` could meanwhile become the local port of
/// some connection (a starting node dialling its peers, a `status` call), and the OS may give
/// a port it just released to the next `bind(0)`.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let (lo, hi) = ephemeral_range();
    // below the ephemeral range when there is room, else above it
    let (from, to) = if lo > 12_000 {
        (10_000u32, lo.min(30_000))
    } else {
        (hi + 1, 65_535)
    };
    let mut x = (std::process::id() as u64) << 32;
    x ^= std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    for _ in 0..10_000 {
        let port = if from < to {
            // xorshift: a different start in each test process
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (from + (x % u64::from(to - from)) as u32) as u16
        } else {
            // no room outside the ephemeral range: any free port
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_or(0, |a| a.port())
        };
        if port == 0 || given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free loopback port in {from}..{to}");
}

/// The kernel's range for outgoing connections' local ports (Linux's default if unreadable).
fn ephemeral_range() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|x| x.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `f` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, f)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls `f` until it returns Some (that value) or the deadline passes (None).
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub models: PathBuf,
    pub nodes: Vec<(String, Option<Child>)>,
    /// (node, HTTP gateway address) of every coordinator node.
    pub http: Vec<(String, String)>,
}

pub struct Spec {
    pub roles: Vec<&'static str>,
}

impl Cluster {
    /// Three nodes: n1 coordinator+embedder+shard, n2 coordinator+embedder+shard, n3 shard;
    /// 4 shards, replication 2 (placement: shard s on nodes s%3 and (s+1)%3).
    pub fn three(extra: &str) -> Cluster {
        Self::start(
            &[
                &["coordinator", "embedder", "shard"],
                &["coordinator", "embedder", "shard"],
                &["shard"],
            ],
            extra,
        )
    }

    pub fn start(roles: &[&[&str]], extra: &str) -> Cluster {
        Self::start_with_models(roles, extra, models_dir())
    }

    pub fn start_with_models(roles: &[&[&str]], extra: &str, models: PathBuf) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::from(
            "version = 1\nname = \"test\"\ncookie = \"test-cookie-123\"\ndata_dir = \"data\"\n",
        );
        let mut http = Vec::new();
        for (i, r) in roles.iter().enumerate() {
            let roles: Vec<String> = r.iter().map(|x| format!("\"{x}\"")).collect();
            text.push_str(&format!(
                "[[node]]\nname = \"n{}\"\naddr = \"127.0.0.1:{}\"\nroles = [{}]\n",
                i + 1,
                free_port(),
                roles.join(", ")
            ));
            if r.contains(&"coordinator") {
                // every coordinator node serves the HTTP gateway
                let addr = format!("127.0.0.1:{}", free_port());
                text.push_str(&format!("http_addr = \"{addr}\"\n"));
                http.push((format!("n{}", i + 1), addr));
            }
        }
        // `index.KEY = VALUE` and `query.KEY = VALUE` lines of `extra` go into [index] and
        // [query]; the rest is appended
        let section = |name: &str| -> String {
            let prefix = format!("{name}.");
            extra
                .lines()
                .filter_map(|l| l.strip_prefix(prefix.as_str()))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        // a default the extra lines set again is left out (a key twice is a TOML error)
        let defaults = |name: &str, lines: &[&str]| -> String {
            let own = section(name);
            lines
                .iter()
                .filter(|l| {
                    let key = l.split('=').next().unwrap_or("").trim();
                    !own.lines()
                        .any(|o| o.split('=').next().unwrap_or("").trim() == key)
                })
                .map(|l| format!("{l}\n"))
                .collect::<String>()
                + &own
        };
        text.push_str("[index]\n");
        text.push_str(&defaults(
            "index",
            &["shards = 4", "replication = 2", "write_quorum = 1"],
        ));
        text.push_str("[query]\n");
        text.push_str(&defaults(
            "query",
            &["shard_deadline_ms = 800", "deadline_ms = 20000"],
        ));
        let extra: Vec<&str> = extra
            .lines()
            .filter(|l| !l.starts_with("query.") && !l.starts_with("index."))
            .collect();
        let extra = extra.join("\n");
        if !extra.contains("[failure]") {
            text.push_str("[failure]\nheartbeat_ms = 100\nsuspect_after_ms = 600\n");
        }
        text.push_str(&extra);
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, text).unwrap();
        let mut c = Cluster {
            dir,
            config,
            models,
            nodes: Vec::new(),
            http,
        };
        for i in 0..roles.len() {
            let name = format!("n{}", i + 1);
            let child = c.spawn_node(&name);
            c.nodes.push((name, Some(child)));
        }
        c.wait_all_alive();
        c
    }

    /// `http://ADDR` of a node's HTTP gateway.
    pub fn http_url(&self, node: &str) -> String {
        let addr = &self
            .http
            .iter()
            .find(|(n, _)| n == node)
            .expect("a coordinator node")
            .1;
        format!("http://{addr}")
    }

    pub fn spawn_node(&self, name: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .unwrap();
        Command::new(bin())
            .args(["node", "--config"])
            .arg(&self.config)
            .args(["--node", name, "--models"])
            .arg(&self.models)
            .env("RAGFLEET_LOG", "info,ractor_cluster=warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    pub fn restart(&mut self, name: &str) {
        let child = self.spawn_node(name);
        let slot = self.nodes.iter_mut().find(|n| n.0 == name).unwrap();
        slot.1 = Some(child);
    }

    pub fn pid(&self, name: &str) -> i32 {
        self.nodes
            .iter()
            .find(|n| n.0 == name)
            .unwrap()
            .1
            .as_ref()
            .unwrap()
            .id() as i32
    }

    pub fn kill9(&mut self, name: &str) {
        let slot = self.nodes.iter_mut().find(|n| n.0 == name).unwrap();
        if let Some(mut c) = slot.1.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn signal(&self, name: &str, sig: i32) {
        unsafe { libc::kill(self.pid(name), sig) };
    }

    /// Runs the CLI against this cluster; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .arg("--models")
            .arg(models_dir())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    /// Runs the CLI with `input` on standard input.
    pub fn cli_stdin(&self, args: &[&str], input: &str) -> (bool, String, String) {
        use std::io::Write;
        let mut child = Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let (ok, out, err) = self.cli(args);
        assert!(ok, "{args:?} failed: {err}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: bad JSON {e}: {out}"))
    }

    pub fn try_json(&self, args: &[&str]) -> Option<Value> {
        let (ok, out, _) = self.cli(args);
        if !ok {
            return None;
        }
        serde_json::from_str(out.trim()).ok()
    }

    pub fn status(&self) -> Option<Value> {
        self.try_json(&["status", "--json"])
    }

    pub fn alive(&self, node: &str) -> Option<bool> {
        let s = self.status()?;
        s["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == node)
            .map(|n| n["alive"].as_bool().unwrap_or(false))
    }

    pub fn wait_all_alive(&mut self) {
        let names: Vec<String> = self.nodes.iter().map(|n| n.0.clone()).collect();
        // debug-built nodes loading their models on a 2-core machine beside another test's
        // cluster: a loaded machine took over 60 s (a deadline, not a wait)
        let timeout = Duration::from_secs(180);
        let mut last = None;
        let up = poll_until(timeout, || {
            // a node that exited will not come up: say why now, not after the deadline
            let exited = self.nodes.iter_mut().find_map(|(name, child)| {
                let code = child.as_mut()?.try_wait().ok()??;
                Some((name.clone(), code))
            });
            if let Some((name, code)) = exited {
                panic!(
                    "node {name} exited ({code}) before the cluster came up; its log:\n{}",
                    tail(&self.log(&name), 60)
                );
            }
            let s = self.status()?;
            let serving = Self::all_serving(&s, &names);
            last = Some(s);
            serving.then_some(())
        });
        if up.is_none() {
            let logs: String = names
                .iter()
                .map(|n| format!("--- {n}.log, last lines:\n{}\n", tail(&self.log(n), 40)))
                .collect();
            panic!(
                "timed out after {timeout:?} waiting for every node alive and every replica \
                 serving; last status: {}\n{logs}",
                last.map(|v| v.to_string())
                    .unwrap_or_else(|| "none answered".into())
            );
        }
    }

    fn all_serving(s: &Value, names: &[String]) -> bool {
        let alive = |n: &String| {
            s["nodes"].as_array().is_some_and(|nodes| {
                nodes
                    .iter()
                    .any(|x| x["name"] == n.as_str() && x["alive"] == true)
            })
        };
        let serving = s["shards"].as_array().is_some_and(|shards| {
            shards.iter().all(|sh| {
                sh["replicas"]
                    .as_array()
                    .is_some_and(|r| r.iter().all(|x| x["state"] == "serving"))
            })
        });
        names.iter().all(alive) && serving
    }

    pub fn corpus_path(&self) -> PathBuf {
        let p = self.dir.path().join("corpus.jsonl");
        std::fs::write(&p, corpus()).unwrap();
        p
    }

    pub fn retrieve(&self, q: &str) -> Value {
        self.json(&["retrieve", "--json", q])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in self.nodes.iter_mut() {
            if let Some(mut c) = c.take() {
                unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A small corpus of distinct topics (one obvious answer per test query).
pub fn corpus() -> String {
    let docs = [
        ("volcano", "Volcanoes erupt when magma rises through the crust and lava flows down their slopes."),
        ("photosynthesis", "Plants turn sunlight, water and carbon dioxide into sugar and oxygen by photosynthesis."),
        ("tides", "Ocean tides are caused mainly by the gravitational pull of the moon on the seas."),
        ("bees", "Honey bees collect nectar from flowers and store honey in wax combs inside the hive."),
        ("glaciers", "Glaciers are slow rivers of ice that carve valleys as they move down mountains."),
        ("rust-ownership", "In Rust every value has a single owner and is dropped when the owner goes out of scope."),
        ("tcp", "TCP provides reliable, ordered delivery of a byte stream between two hosts on a network."),
        ("espresso", "Espresso is brewed by forcing hot water under pressure through finely ground coffee."),
        ("chess", "In chess the king may castle with a rook if neither piece has moved and no square is attacked."),
        ("vaccines", "Vaccines train the immune system to recognise a pathogen without causing the disease."),
        ("bridges", "Suspension bridges hang their deck from cables slung between tall towers."),
        ("jazz", "Jazz musicians improvise melodies over chord progressions, swinging the rhythm."),
        ("mitochondria", "Mitochondria produce most of the chemical energy that powers a cell, as ATP."),
        ("compilers", "A compiler translates source code into machine code through parsing, analysis and code generation."),
        ("sourdough", "Sourdough bread rises with a culture of wild yeast and lactic acid bacteria."),
        ("satellites", "Geostationary satellites orbit at the speed of the earth's rotation, staying above one spot."),
    ];
    docs.iter()
        .map(|(id, t)| format!("{{\"_id\": \"{id}\", \"title\": \"\", \"text\": \"{t}\"}}\n"))
        .collect()
}

pub fn top_doc(r: &Value) -> String {
    r["hits"][0]["doc_id"].as_str().unwrap_or("").to_string()
}

pub fn answered(r: &Value) -> u64 {
    r["coverage"]["shards_answered"].as_u64().unwrap()
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
