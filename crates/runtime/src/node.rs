//! Starting a node: the ractor_cluster `NodeServer` on the node's address, a connector that
//! keeps a session open to every peer (reconnecting with backoff), the failure detector, and the
//! supervision tree: a root supervisor, one supervisor per role, the role actors under them.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorRef};
use ractor_cluster::NodeServerMessage;
use ragfleet_client::groups;
use ragfleet_config::{ClusterConfig, NodeRole};
use ragfleet_index::hnsw::GraphMemory;
use ragfleet_index::IndexSettings;
use tracing::{debug, error, info, warn};

use crate::agent::NodeAgent;
use crate::coordinator::{CoordinatorActor, CoordinatorArgs};
use crate::embedder::{EmbedderActor, EmbedderArgs};
use crate::generator::{GeneratorActor, GeneratorArgs};
use crate::health::Health;
use crate::models::ModelLoader;
use crate::reranker::{RerankerActor, RerankerArgs};
use crate::shard::{ShardActor, ShardArgs};
use crate::supervisor::{
    ChildSpec, OnIntensity, SpawnFn, Supervisor, SupervisorArgs, SupervisorMsg,
};
use crate::RuntimeError;

/// How to start.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Run the roles of every node of the file in this process (the embedded cluster); the
    /// listener takes the first node's address.
    pub embedded: bool,
}

/// A running node.
pub struct NodeHandle {
    /// Node name (or the cluster name when embedded).
    pub name: String,
    /// The transport.
    pub server: ActorRef<NodeServerMessage>,
    /// The root supervisor.
    pub root: ActorRef<SupervisorMsg>,
    root_join: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The node's failure detector.
    pub health: Arc<Health>,
    /// The HTTP gateway, when the node has an `http_addr`.
    gateway: Option<ragfleet_gateway::Gateway>,
}

impl NodeHandle {
    /// Waits until the root supervisor stops (it fails when a role escalates past its limit).
    pub async fn wait(&mut self) {
        let _ = (&mut self.root_join).await;
    }

    /// Where the HTTP gateway listens, if the node serves one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.gateway.as_ref().map(|g| g.local_addr())
    }

    /// Stops everything (the HTTP gateway first, letting its requests finish).
    pub async fn shutdown(mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await;
        }
        for t in &self.tasks {
            t.abort();
        }
        self.root.stop(Some("shutdown".into()));
        let _ = self.root_join.await;
        self.server.stop(None);
    }
}

fn spawn_fn<A>(actor: A, args: A::Arguments) -> SpawnFn
where
    A: Actor + Clone,
    A::Arguments: Clone + Sync,
{
    Arc::new(move |sup: ActorCell| {
        let (actor, args) = (actor.clone(), args.clone());
        Box::pin(async move {
            Actor::spawn_linked(None, actor, args, sup)
                .await
                .map(|(r, _)| r.get_cell())
                .map_err(|e| e.to_string())
        })
    })
}

fn supervisor_spec(label: String, children: Vec<ChildSpec>, cfg: &ClusterConfig) -> ChildSpec {
    let (max, within) = (
        cfg.supervision.max_restarts,
        Duration::from_secs(cfg.supervision.within_secs),
    );
    ChildSpec {
        name: label.clone(),
        spawn: Arc::new(move |sup: ActorCell| {
            let args = SupervisorArgs {
                label: label.clone(),
                children: children.clone(),
                max_restarts: max,
                within,
                on_intensity: OnIntensity::Escalate,
            };
            Box::pin(async move {
                Actor::spawn_linked(None, Supervisor, args, sup)
                    .await
                    .map(|(r, _)| r.get_cell())
                    .map_err(|e| e.to_string())
            })
        }),
    }
}

/// The role supervisors of one node.
async fn role_specs(
    cfg: &Arc<ClusterConfig>,
    node: &str,
    instance: &str,
    loader: &Arc<dyn ModelLoader>,
    health: &Arc<Health>,
) -> Result<Vec<ChildSpec>, RuntimeError> {
    let n = cfg.node(node)?.clone();
    let mut roles = vec![supervisor_spec(
        format!("{node}/agent"),
        vec![ChildSpec {
            name: format!("{node}/agent"),
            spawn: spawn_fn(NodeAgent, (node.to_string(), instance.to_string())),
        }],
        cfg,
    )];
    if n.has(NodeRole::Shard) {
        if cfg.index.merge_below.is_some() {
            warn!("index.merge_below is ignored: tiered merging (index.merge_ratio) replaced it");
        }
        let settings = IndexSettings {
            segment_size: cfg.index.segment_size,
            merge_ratio: cfg.index.merge_ratio,
            max_merges: cfg.index.max_merges,
            ann: cfg.index.ann.parse().unwrap_or_default(),
            hnsw_m: cfg.index.hnsw_m,
            build_threads: cfg.index.build_threads,
            ef_construction: cfg.index.ef_construction,
            ef_search: cfg.index.ef_search,
            background: true,
            deletion_grace: (cfg.index.deletion_grace_secs > 0)
                .then(|| Duration::from_secs(cfg.index.deletion_grace_secs)),
            seal_idle: (cfg.index.seal_idle_secs > 0)
                .then(|| Duration::from_secs(cfg.index.seal_idle_secs)),
            graph_memory: None,
        };
        if let Some(mb) = cfg.index.graph_memory_mb {
            // one budget for the process: every shard replica of the node draws on it
            GraphMemory::global().set_limit_mb(mb);
        }
        let children = cfg
            .shards_of(node)
            .into_iter()
            .map(|(s, _)| ChildSpec {
                name: format!("{node}/shard-{s}"),
                spawn: spawn_fn(
                    ShardActor,
                    ShardArgs {
                        node: node.to_string(),
                        shard: s,
                        dir: cfg.replica_dir(node, s),
                        settings: settings.clone(),
                        // long enough to hear from peers after (re)connecting, bounded
                        peer_wait: Duration::from_millis(
                            (cfg.failure.suspect_after_ms * 2).clamp(1_000, 10_000),
                        ),
                        anti_entropy: (cfg.index.anti_entropy_ms > 0)
                            .then(|| Duration::from_millis(cfg.index.anti_entropy_ms)),
                        max_searches: cfg.index.max_searches,
                    },
                ),
            })
            .collect();
        roles.push(supervisor_spec(format!("{node}/shards"), children, cfg));
    }
    if n.has(NodeRole::Embedder) {
        let l = loader.clone();
        let model = tokio::task::spawn_blocking(move || l.embedder())
            .await
            .map_err(|e| RuntimeError::Model(e.to_string()))?
            .map_err(RuntimeError::Model)?;
        let args = EmbedderArgs {
            node: node.to_string(),
            model,
            max_batch: cfg.embedder.max_batch,
            max_wait: Duration::from_millis(cfg.embedder.max_wait_ms),
            max_text_bytes: cfg.query.max_query_bytes.max(1 << 20),
            max_queue: cfg.embedder.max_queue,
        };
        let children = (0..n.embedder_replicas)
            .map(|i| ChildSpec {
                name: format!("{node}/embedder-{i}"),
                spawn: spawn_fn(EmbedderActor, args.clone()),
            })
            .collect();
        roles.push(supervisor_spec(format!("{node}/embedders"), children, cfg));
    }
    if n.has(NodeRole::Reranker) {
        let l = loader.clone();
        match tokio::task::spawn_blocking(move || l.reranker())
            .await
            .map_err(|e| RuntimeError::Model(e.to_string()))?
        {
            Ok(model) => {
                let args = RerankerArgs {
                    node: node.to_string(),
                    model,
                    max_queue: cfg.reranker.max_queue,
                };
                let c = vec![ChildSpec {
                    name: format!("{node}/reranker"),
                    spawn: spawn_fn(RerankerActor, args),
                }];
                roles.push(supervisor_spec(format!("{node}/rerankers"), c, cfg));
            }
            Err(e) => warn!(node, error = %e, "reranker role not started: no cross-encoder"),
        }
    }
    if n.has(NodeRole::Generator) {
        let l = loader.clone();
        match tokio::task::spawn_blocking(move || l.generator())
            .await
            .map_err(|e| RuntimeError::Model(e.to_string()))?
        {
            Ok(model) => {
                let args = GeneratorArgs {
                    node: node.to_string(),
                    model,
                    max_streams: cfg.generator.max_streams,
                    max_queue: cfg.generator.max_queue,
                    max_tokens: 2048,
                };
                let c = vec![ChildSpec {
                    name: format!("{node}/generator"),
                    spawn: spawn_fn(GeneratorActor, args),
                }];
                roles.push(supervisor_spec(format!("{node}/generators"), c, cfg));
            }
            Err(e) => warn!(node, error = %e, "generator role not started"),
        }
    }
    if n.has(NodeRole::Coordinator) {
        let l = loader.clone();
        let gen_tokens = tokio::task::spawn_blocking(move || l.generator_tokens())
            .await
            .ok()
            .and_then(|r| {
                r.map_err(
                    |e| warn!(error = %e, "no generator tokenizer; estimating context tokens"),
                )
                .ok()
            });
        let args = CoordinatorArgs {
            node: node.to_string(),
            cfg: cfg.clone(),
            health: health.clone(),
            gen_tokens,
        };
        let c = vec![ChildSpec {
            name: format!("{node}/coordinator"),
            spawn: spawn_fn(CoordinatorActor, args),
        }];
        roles.push(supervisor_spec(format!("{node}/coordinators"), c, cfg));
    }
    Ok(roles)
}

/// Keeps a session to every peer, reconnecting with exponential backoff.
async fn connector(
    server: ActorRef<NodeServerMessage>,
    peers: Vec<(String, String)>,
    tls: Option<ragfleet_client::transport::Tls>,
    max_backoff: Duration,
) {
    let mut next_try: HashMap<String, (Instant, Duration)> = HashMap::new();
    loop {
        let sessions =
            ractor::call_t!(server, NodeServerMessage::GetSessions, 2_000).unwrap_or_default();
        let connected: Vec<String> = sessions
            .values()
            .filter_map(|s| {
                s.peer_name
                    .as_ref()
                    .map(|p| p.name.split('@').next().unwrap_or("").to_string())
            })
            .collect();
        for (name, addr) in &peers {
            if connected.contains(name) {
                next_try.remove(name);
                continue;
            }
            let (at, backoff) = next_try
                .get(name)
                .copied()
                .unwrap_or((Instant::now(), Duration::from_millis(100)));
            if Instant::now() < at {
                continue;
            }
            match ragfleet_client::transport::connect(&server, addr.as_str(), tls.as_ref()).await {
                Ok(()) => debug!(peer = %name, "connecting"),
                Err(e) => debug!(peer = %name, error = %e, "peer unreachable"),
            }
            let nb = (backoff * 2).min(max_backoff);
            next_try.insert(name.clone(), (Instant::now() + backoff, nb));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts node `name` of `cfg` (or, with `opts.embedded`, every node in this process).
pub async fn start_node(
    cfg: Arc<ClusterConfig>,
    name: &str,
    loader: Arc<dyn ModelLoader>,
    opts: NodeOptions,
) -> Result<NodeHandle, RuntimeError> {
    let me = cfg.node(name)?.clone();
    let addr: SocketAddr = me.addr.parse().map_err(|_| RuntimeError::Listen {
        addr: me.addr.clone(),
        reason: "bad address".into(),
    })?;
    let tls = ragfleet_client::transport::Tls::of(&cfg)?;
    let server =
        ragfleet_client::transport::start_server(name, addr, &cfg.cookie, tls.as_ref()).await?;
    let mut tasks = Vec::new();
    let local: Vec<String> = if opts.embedded {
        cfg.nodes.iter().map(|n| n.name.clone()).collect()
    } else {
        vec![name.to_string()]
    };
    if !opts.embedded {
        let peers: Vec<(String, String)> = cfg
            .nodes
            .iter()
            .filter(|n| n.name != name)
            .map(|n| (n.name.clone(), n.addr.clone()))
            .collect();
        tasks.push(tokio::spawn(connector(
            server.clone(),
            peers,
            tls.clone(),
            Duration::from_millis(cfg.failure.reconnect_max_ms),
        )));
    }
    let health = Health::new(
        Duration::from_millis(cfg.failure.suspect_after_ms),
        Duration::from_millis(cfg.failure.heartbeat_ms),
    );
    let mut watched: Vec<String> = [
        groups::NODES,
        groups::EMBEDDERS,
        groups::RERANKERS,
        groups::GENERATORS,
        groups::COORDINATORS,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    watched.extend((0..cfg.index.shards).map(groups::shard));
    tasks.push(health.spawn_loop(watched, Duration::from_millis(cfg.failure.heartbeat_ms)));
    let mut roles = Vec::new();
    for n in &local {
        roles.extend(role_specs(&cfg, n, &me.addr, &loader, &health).await?);
    }
    let root_args = SupervisorArgs {
        label: format!("{name}/root"),
        children: roles,
        max_restarts: cfg.supervision.max_restarts,
        within: Duration::from_secs(cfg.supervision.within_secs),
        // nothing above the root but the process: back off rather than exit
        on_intensity: OnIntensity::Backoff {
            first: Duration::from_millis(250),
            max: Duration::from_secs(10),
        },
    };
    let (root, root_join) = Actor::spawn(None, Supervisor, root_args)
        .await
        .map_err(|e| RuntimeError::Spawn {
            name: format!("{name}/root"),
            reason: e.to_string(),
        })?;
    info!(node = name, addr = %addr, roles = ?me.roles, embedded = opts.embedded, "node started");
    let gateway = match &me.http_addr {
        Some(http) => {
            let client = Arc::new(ragfleet_client::Client::attach(cfg.clone(), server.clone()));
            Some(ragfleet_gateway::serve(cfg.clone(), client, http).await?)
        }
        None => None,
    };
    let root_join = tokio::spawn(async move {
        if root_join.await.is_err() {
            error!("root supervisor task failed");
        }
    });
    Ok(NodeHandle {
        name: name.to_string(),
        server,
        root,
        root_join,
        tasks,
        health,
        gateway,
    })
}
