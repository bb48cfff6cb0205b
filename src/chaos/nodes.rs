//! The node processes of a run: start, signal, kill, and watch them (unasked exits, memory).
use super::run::*;

/// The node processes of the run.
pub(super) struct Nodes {
    pub(super) exe: PathBuf,
    pub(super) config: PathBuf,
    /// A node's own config file when the run proxies its links (peers at their proxies).
    pub(super) configs: HashMap<String, PathBuf>,
    pub(super) data_dir: PathBuf,
    pub(super) models: Option<PathBuf>,
    pub(super) logs: PathBuf,
    pub(super) children: Mutex<HashMap<String, Child>>,
    /// Nodes the runner took down on purpose (killed, not yet restarted).
    pub(super) down: Mutex<HashSet<String>>,
    /// Nodes that exited without being asked.
    pub(super) unexpected_exits: Mutex<Vec<String>>,
    pub(super) max_rss_kib: Mutex<BTreeMap<String, u64>>,
}

impl Nodes {
    pub(super) fn spawn(&self, name: &str) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(["node", "--config"])
            .arg(self.configs.get(name).unwrap_or(&self.config))
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

    pub(super) fn signal(&self, name: &str, sig: i32) {
        if let Some(c) = self.children.lock().expect("nodes").get(name) {
            // SAFETY: signalling a child process this runner started
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    pub(super) fn kill(&self, name: &str) {
        self.down.lock().expect("nodes").insert(name.to_string());
        if let Some(mut c) = self.children.lock().expect("nodes").remove(name) {
            // a frozen process dies of SIGKILL too
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Notes nodes that exited unasked, and samples every node's resident memory.
    pub(super) fn watch(&self) {
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

    pub(super) fn stop_all(&self) {
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

pub(super) fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
