//! Chaos plans: a TOML file of faults and a workload, expanded with a seed into a schedule of
//! timed events. The same plan and seed give the same schedule and the same workload.
use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

/// A plan file (`chaos/plans/NAME.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Plan {
    /// Plan name.
    pub name: String,
    /// What it shows.
    #[serde(default)]
    pub description: String,
    /// Length of the faulty part of the run, in seconds (`--duration` overrides).
    pub duration_s: f64,
    /// Time replicas have to converge once the last fault ended, in seconds.
    #[serde(default = "default_converge")]
    pub converge_within_s: f64,
    /// Resident memory a node may reach, in MiB.
    #[serde(default = "default_rss")]
    pub max_rss_mib: u64,
    /// Whether queries may fail (e.g. every coordinator or every replica down at once).
    #[serde(default)]
    pub allow_query_failures: bool,
    /// The nodes' `index.segment_size` for this run instead of the cluster file's (at least 16):
    /// a short run's shards then seal segments and merge them, so that faults find them.
    #[serde(default)]
    pub segment_size: Option<usize>,
    /// The steady workload.
    #[serde(default)]
    pub workload: Workload,
    /// The faults.
    #[serde(default, rename = "fault")]
    pub faults: Vec<Fault>,
}

fn default_converge() -> f64 {
    60.0
}
fn default_rss() -> u64 {
    4096
}

/// The workload driven through the client while faults happen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Workload {
    /// Retrievals a second (BM25 for a written document's marker, or dense for a corpus
    /// question).
    pub retrieve_per_s: f64,
    /// An ingest of new documents this often, in ms.
    pub ingest_every_ms: u64,
    /// Documents per ingest.
    pub ingest_batch: usize,
    /// Every Nth ingest also rewrites an acknowledged document (0: never).
    pub update_every: usize,
    /// Every Nth ingest also deletes an acknowledged document (0: never).
    pub delete_every: usize,
    /// Answers asked a second (0: none).
    pub ask_per_s: f64,
    /// The coordinator node the client starts on (default: the first coordinator of the
    /// cluster file); it moves only when that one fails.
    pub coordinator: Option<String>,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            retrieve_per_s: 4.0,
            ingest_every_ms: 1000,
            ingest_batch: 3,
            update_every: 4,
            delete_every: 5,
            ask_per_s: 0.0,
            coordinator: None,
        }
    }
}

/// One fault entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Fault {
    /// kill (kill -9, restart after `down_s`), freeze (SIGSTOP, SIGCONT after `down_s`),
    /// panic or stall (actors of `groups`), corrupt (kill -9, damage a file, restart).
    pub kind: FaultKind,
    /// Nodes it hits, in turn (empty: every node of the cluster).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Seconds after the start of the run of the first hit.
    #[serde(default)]
    pub at_s: f64,
    /// Seconds between hits (a node each, in turn; for panic/stall, a random node and group).
    #[serde(default)]
    pub every_s: Option<f64>,
    /// Last second a repeating fault may hit (default: the end of the faulty part).
    #[serde(default)]
    pub until_s: Option<f64>,
    /// Each hit's time moves by up to this many seconds, drawn from the seed.
    #[serde(default)]
    pub jitter_s: f64,
    /// How long a killed or frozen node stays down.
    #[serde(default = "default_down")]
    pub down_s: f64,
    /// Role groups for panic/stall (`embedder`, `shard.0`, ...; empty: every role group).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Stall length in ms.
    #[serde(default = "default_stall")]
    pub stall_ms: u64,
    /// disk-full: size of the tmpfs mounted as each hit node's data folder, in MiB.
    #[serde(default = "default_disk")]
    pub size_mib: u64,
    /// corrupt: `wal` (its last record cut: a torn tail), `wal-middle` (a byte flipped in its
    /// first record while later ones follow), `segment` (a byte of a sealed segment's data
    /// file) or `manifest` (a byte of the shard's manifest).
    #[serde(default)]
    pub target: Option<String>,
    /// Whether nodes are hit in an order drawn from the seed (default: as listed).
    #[serde(default)]
    pub shuffle: bool,
    /// delay: ms every chunk of the node's links is held (each way).
    #[serde(default = "default_delay")]
    pub delay_ms: u64,
    /// delay: the hold varies by up to this many ms either way.
    #[serde(default)]
    pub jitter_ms: u64,
    /// loss: percent of the chunks lost (each costs a retransmission timeout).
    #[serde(default = "default_loss")]
    pub loss_pct: f64,
    /// partition, delay, loss: the link between the runner's client and the node is hit too
    /// (default: only the links between nodes).
    #[serde(default)]
    pub client: bool,
}

fn default_down() -> f64 {
    3.0
}
fn default_stall() -> u64 {
    2000
}
fn default_disk() -> u64 {
    16
}
fn default_delay() -> u64 {
    100
}
fn default_loss() -> f64 {
    5.0
}

/// Kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum FaultKind {
    /// kill -9, then a restart.
    Kill,
    /// SIGSTOP, then SIGCONT.
    Freeze,
    /// Actors of a role group panic (their supervisors restart them).
    Panic,
    /// Actors of a role group stall their mailbox.
    Stall,
    /// kill -9, a data file damaged, then a restart.
    Corrupt,
    /// The node's data folder (a small tmpfs mounted for the run) fills up; after `down_s`
    /// the space returns.
    DiskFull,
    /// The node is cut off from every other node (and the client, with `client`) for
    /// `down_s`: its links go silent, then heal.
    Partition,
    /// The node's links hold every chunk `delay_ms` (± `jitter_ms`) for `down_s`.
    Delay,
    /// The node's links lose `loss_pct` percent of their chunks for `down_s`.
    Loss,
}

impl FaultKind {
    /// Whether the fault acts on the network (the run then puts proxies on every link).
    pub(crate) fn is_network(self) -> bool {
        matches!(
            self,
            FaultKind::Partition | FaultKind::Delay | FaultKind::Loss
        )
    }
}

/// One scheduled action.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    Kill(String),
    Restart(String),
    Freeze(String),
    Thaw(String),
    Panic {
        node: String,
        group: String,
    },
    Stall {
        node: String,
        group: String,
        ms: u64,
    },
    /// Damage a file of a stopped node: `target` as [`Fault::target`]; `pick` chooses the shard and
    /// the byte deterministically.
    Corrupt {
        node: String,
        target: String,
        pick: u64,
    },
    /// Fill the node's data folder (its tmpfs) to the last byte.
    Fill(String),
    /// Give the space back.
    Free(String),
    /// Set every link of `node` (to the other nodes; to the client too with `client`).
    Net {
        node: String,
        net: NetFault,
        client: bool,
    },
    /// Every link of `node` back to normal.
    Heal(String),
}

/// What a network fault does to a node's links.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum NetFault {
    Cut,
    Delay { ms: u64, jitter_ms: u64 },
    Loss { pct: f64 },
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Kill(n) => write!(f, "kill -9 {n}"),
            Action::Restart(n) => write!(f, "restart {n}"),
            Action::Freeze(n) => write!(f, "SIGSTOP {n}"),
            Action::Thaw(n) => write!(f, "SIGCONT {n}"),
            Action::Panic { node, group } => write!(f, "panic {group} on {node}"),
            Action::Stall { node, group, ms } => write!(f, "stall {group} on {node} for {ms} ms"),
            Action::Corrupt { node, target, .. } => write!(f, "damage a {target} file of {node}"),
            Action::Fill(n) => write!(f, "fill the data folder of {n}"),
            Action::Free(n) => write!(f, "free the data folder of {n}"),
            Action::Net { node, net, client } => {
                let to = if *client { ", client too" } else { "" };
                match net {
                    NetFault::Cut => write!(f, "partition {node} off{to}"),
                    NetFault::Delay { ms, jitter_ms } => {
                        write!(f, "delay {node}'s links {ms}±{jitter_ms} ms{to}")
                    }
                    NetFault::Loss { pct } => write!(f, "lose {pct}% on {node}'s links{to}"),
                }
            }
            Action::Heal(n) => write!(f, "heal {n}'s links"),
        }
    }
}

/// A timed action; `fault` is the index of the plan entry it comes from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Event {
    pub at_ms: u64,
    pub fault: usize,
    pub action: Action,
}

impl Plan {
    /// Reads and checks a plan file.
    pub(crate) fn load(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read plan {}", path.display()))?;
        let p: Plan =
            toml::from_str(&text).with_context(|| format!("invalid plan {}", path.display()))?;
        p.check()?;
        Ok(p)
    }

    fn check(&self) -> Result<()> {
        if !(self.duration_s > 0.0) {
            bail!("plan {}: duration_s must be positive", self.name);
        }
        if self.workload.ingest_batch == 0 || self.workload.ingest_every_ms == 0 {
            bail!(
                "plan {}: workload.ingest_batch and ingest_every_ms must be positive",
                self.name
            );
        }
        if self.segment_size.is_some_and(|n| n < 16) {
            bail!("plan {}: segment_size must be at least 16", self.name);
        }
        for (i, f) in self.faults.iter().enumerate() {
            if f.every_s.is_some_and(|e| e <= 0.0) {
                bail!("plan {}: fault[{i}].every_s must be positive", self.name);
            }
            if f.kind == FaultKind::Loss && !(f.loss_pct > 0.0 && f.loss_pct <= 100.0) {
                bail!(
                    "plan {}: fault[{i}].loss_pct must be in (0, 100]",
                    self.name
                );
            }
            if f.kind == FaultKind::Delay && f.jitter_ms > f.delay_ms {
                bail!(
                    "plan {}: fault[{i}].jitter_ms must not exceed delay_ms",
                    self.name
                );
            }
            if f.kind == FaultKind::Corrupt
                && !matches!(
                    f.target.as_deref(),
                    Some("wal" | "wal-middle" | "segment" | "manifest")
                )
            {
                bail!(
                    "plan {}: fault[{i}].target must be \"wal\", \"wal-middle\", \"segment\" or \"manifest\"",
                    self.name
                );
            }
        }
        Ok(())
    }

    /// Whether the run needs proxies on its links (a network fault is planned).
    pub(crate) fn needs_proxies(&self) -> bool {
        self.faults.iter().any(|f| f.kind.is_network())
    }

    /// Nodes whose data folder must be a small tmpfs (disk-full faults), with its size in MiB.
    pub(crate) fn tmpfs_nodes(&self, nodes: &[String]) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = Vec::new();
        for f in self.faults.iter().filter(|f| f.kind == FaultKind::DiskFull) {
            let targets = if f.nodes.is_empty() {
                nodes.to_vec()
            } else {
                f.nodes.clone()
            };
            for n in targets {
                if !out.iter().any(|(m, _)| m == &n) {
                    out.push((n, f.size_mib.max(1)));
                }
            }
        }
        out
    }

    /// The events of the faulty part (`duration_s` long), from `seed`, in time order; the
    /// nodes and role groups the cluster has.
    pub(crate) fn schedule(
        &self,
        seed: u64,
        duration_s: f64,
        nodes: &[String],
        groups: &[(String, String)],
    ) -> Result<Vec<Event>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut events = Vec::new();
        let ms = |s: f64| (s.max(0.0) * 1000.0) as u64;
        for (i, f) in self.faults.iter().enumerate() {
            let mut targets: Vec<String> = if f.nodes.is_empty() {
                nodes.to_vec()
            } else {
                f.nodes.clone()
            };
            if let Some(bad) = targets.iter().find(|n| !nodes.contains(n)) {
                bail!(
                    "plan {}: fault[{i}] names node {bad:?}, not in the cluster",
                    self.name
                );
            }
            if f.shuffle {
                targets.shuffle(&mut rng);
            }
            let until = f.until_s.unwrap_or(duration_s).min(duration_s);
            let jitter = |rng: &mut rand::rngs::StdRng| {
                if f.jitter_s > 0.0 {
                    rng.gen_range(-f.jitter_s..f.jitter_s)
                } else {
                    0.0
                }
            };
            match f.kind {
                FaultKind::DiskFull | FaultKind::Partition | FaultKind::Delay | FaultKind::Loss => {
                    let every = f.every_s.unwrap_or(f.down_s + 5.0);
                    let net = match f.kind {
                        FaultKind::Delay => NetFault::Delay {
                            ms: f.delay_ms,
                            jitter_ms: f.jitter_ms,
                        },
                        FaultKind::Loss => NetFault::Loss { pct: f.loss_pct },
                        _ => NetFault::Cut,
                    };
                    for (k, node) in targets.iter().enumerate() {
                        let t = f.at_s + k as f64 * every + jitter(&mut rng);
                        if t > until {
                            break;
                        }
                        // the fault, then its end down_s later
                        let (down, up) = if f.kind == FaultKind::DiskFull {
                            (Action::Fill(node.clone()), Action::Free(node.clone()))
                        } else {
                            let down = Action::Net {
                                node: node.clone(),
                                net,
                                client: f.client,
                            };
                            (down, Action::Heal(node.clone()))
                        };
                        events.push(Event {
                            at_ms: ms(t),
                            fault: i,
                            action: down,
                        });
                        events.push(Event {
                            at_ms: ms(t + f.down_s),
                            fault: i,
                            action: up,
                        });
                    }
                }
                FaultKind::Kill | FaultKind::Freeze | FaultKind::Corrupt => {
                    let every = f.every_s.unwrap_or(f.down_s + 5.0);
                    for (k, node) in targets.iter().enumerate() {
                        let t = f.at_s + k as f64 * every + jitter(&mut rng);
                        if t > until {
                            break;
                        }
                        let back = t + f.down_s;
                        let (down, up) = match f.kind {
                            FaultKind::Freeze => {
                                (Action::Freeze(node.clone()), Action::Thaw(node.clone()))
                            }
                            _ => (Action::Kill(node.clone()), Action::Restart(node.clone())),
                        };
                        events.push(Event {
                            at_ms: ms(t),
                            fault: i,
                            action: down,
                        });
                        if f.kind == FaultKind::Corrupt {
                            events.push(Event {
                                at_ms: ms(t) + 200,
                                fault: i,
                                action: Action::Corrupt {
                                    node: node.clone(),
                                    target: f.target.clone().unwrap_or_default(),
                                    pick: rng.gen(),
                                },
                            });
                        }
                        events.push(Event {
                            at_ms: ms(back),
                            fault: i,
                            action: up,
                        });
                    }
                }
                FaultKind::Panic | FaultKind::Stall => {
                    let every = f.every_s.unwrap_or(1.0);
                    let pool: Vec<&(String, String)> = groups
                        .iter()
                        .filter(|(n, g)| {
                            targets.contains(n) && (f.groups.is_empty() || f.groups.contains(g))
                        })
                        .collect();
                    if pool.is_empty() {
                        bail!(
                            "plan {}: fault[{i}] hits no role group of the cluster",
                            self.name
                        );
                    }
                    let mut t = f.at_s;
                    while t <= until {
                        let (node, group) = pool[rng.gen_range(0..pool.len())].clone();
                        let action = if f.kind == FaultKind::Panic {
                            Action::Panic { node, group }
                        } else {
                            Action::Stall {
                                node,
                                group,
                                ms: f.stall_ms,
                            }
                        };
                        events.push(Event {
                            at_ms: ms(t + jitter(&mut rng)),
                            fault: i,
                            action,
                        });
                        t += every;
                    }
                }
            }
        }
        events.sort_by_key(|e| e.at_ms);
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> Plan {
        let p: Plan = toml::from_str(text).unwrap();
        p.check().unwrap();
        p
    }

    fn nodes() -> Vec<String> {
        vec!["n1".into(), "n2".into(), "n3".into()]
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let p = plan(
            "name = \"t\"\nduration_s = 60\n[[fault]]\nkind = \"kill\"\nat_s = 5\nevery_s = 10\ndown_s = 3\njitter_s = 2\nshuffle = true\n[[fault]]\nkind = \"panic\"\nat_s = 1\nevery_s = 0.5\nuntil_s = 10\n",
        );
        let groups: Vec<(String, String)> = nodes()
            .into_iter()
            .flat_map(|n| {
                [
                    (n.clone(), "embedder".to_string()),
                    (n, "shard.0".to_string()),
                ]
            })
            .collect();
        let a = p.schedule(7, 60.0, &nodes(), &groups).unwrap();
        let b = p.schedule(7, 60.0, &nodes(), &groups).unwrap();
        let c = p.schedule(8, 60.0, &nodes(), &groups).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        // every node killed once and restarted down_s later, in time order
        let kills: Vec<&Event> = a
            .iter()
            .filter(|e| matches!(e.action, Action::Kill(_)))
            .collect();
        assert_eq!(kills.len(), 3);
        for k in &kills {
            let Action::Kill(n) = &k.action else {
                unreachable!()
            };
            let r = a
                .iter()
                .find(|e| e.action == Action::Restart(n.clone()))
                .unwrap();
            assert_eq!(r.at_ms - k.at_ms, 3000);
        }
        assert!(a.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        // panics every 0.5 s from 1 s to 10 s
        assert_eq!(
            a.iter()
                .filter(|e| matches!(e.action, Action::Panic { .. }))
                .count(),
            19
        );
    }

    #[test]
    fn bad_plans_are_refused_naming_the_field() {
        let bad: Result<Plan, _> = toml::from_str("name = \"t\"\nduration_s = 5\nbogus = 1\n");
        assert!(bad.is_err());
        let p: Plan =
            toml::from_str("name = \"t\"\nduration_s = 5\n[[fault]]\nkind = \"corrupt\"\n")
                .unwrap();
        assert!(p.check().unwrap_err().to_string().contains("target"));
        let p: Plan = toml::from_str(
            "name = \"t\"\nduration_s = 5\nsegment_size = 8\n[[fault]]\nkind = \"corrupt\"\ntarget = \"manifest\"\n",
        )
        .unwrap();
        assert!(p.check().unwrap_err().to_string().contains("segment_size"));
        let p: Plan = toml::from_str(
            "name = \"t\"\nduration_s = 5\n[[fault]]\nkind = \"corrupt\"\ntarget = \"log\"\n",
        )
        .unwrap();
        assert!(p.check().unwrap_err().to_string().contains("wal-middle"));
        let p =
            plan("name = \"t\"\nduration_s = 5\n[[fault]]\nkind = \"kill\"\nnodes = [\"n9\"]\n");
        let e = p.schedule(1, 5.0, &nodes(), &[]).unwrap_err().to_string();
        assert!(e.contains("n9"), "{e}");
    }

    #[test]
    fn network_faults_cut_slow_or_lose_and_then_heal_each_node_in_turn() {
        let p = plan(
            "name = \"t\"\nduration_s = 60\n[[fault]]\nkind = \"partition\"\nnodes = [\"n1\", \"n3\"]\nclient = true\nat_s = 4\nevery_s = 20\ndown_s = 8\n[[fault]]\nkind = \"delay\"\nnodes = [\"n2\"]\ndelay_ms = 80\njitter_ms = 40\nat_s = 50\n[[fault]]\nkind = \"loss\"\nnodes = [\"n2\"]\nat_s = 55\n",
        );
        assert!(p.needs_proxies());
        let e = p.schedule(1, 60.0, &nodes(), &[]).unwrap();
        let acts: Vec<(u64, Action)> = e.into_iter().map(|e| (e.at_ms, e.action)).collect();
        let cut = |n: &str| Action::Net {
            node: n.into(),
            net: NetFault::Cut,
            client: true,
        };
        assert_eq!(acts[0], (4000, cut("n1")));
        assert_eq!(acts[1], (12000, Action::Heal("n1".into())));
        assert_eq!(acts[2], (24000, cut("n3")));
        assert_eq!(acts[3], (32000, Action::Heal("n3".into())));
        assert_eq!(
            acts[4].1,
            Action::Net {
                node: "n2".into(),
                net: NetFault::Delay {
                    ms: 80,
                    jitter_ms: 40
                },
                client: false
            }
        );
        // defaults: 5% loss, healed down_s (3 s) later
        assert_eq!(
            acts.iter()
                .find(|(_, a)| matches!(
                    a,
                    Action::Net {
                        net: NetFault::Loss { .. },
                        ..
                    }
                ))
                .unwrap()
                .1,
            Action::Net {
                node: "n2".into(),
                net: NetFault::Loss { pct: 5.0 },
                client: false
            }
        );
        assert_eq!(acts.last().unwrap(), &(58000, Action::Heal("n2".into())));
        // a plan without network faults runs without proxies
        assert!(
            !plan("name = \"t\"\nduration_s = 5\n[[fault]]\nkind = \"kill\"\n").needs_proxies()
        );
        // nonsense is refused naming the field
        for (bad, field) in [
            ("kind = \"loss\"\nloss_pct = 0", "loss_pct"),
            ("kind = \"loss\"\nloss_pct = 101", "loss_pct"),
            (
                "kind = \"delay\"\ndelay_ms = 10\njitter_ms = 20",
                "jitter_ms",
            ),
        ] {
            let p: Plan =
                toml::from_str(&format!("name = \"t\"\nduration_s = 5\n[[fault]]\n{bad}\n"))
                    .unwrap();
            let e = p.check().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn every_shipped_plan_is_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("chaos/plans");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = Plan::load(&e.unwrap().path()).unwrap();
            let groups = vec![("n1".to_string(), "embedder".to_string())];
            p.schedule(7, p.duration_s, &nodes(), &groups).unwrap();
            n += 1;
        }
        assert!(n >= 8, "{n} plans");
    }
}
