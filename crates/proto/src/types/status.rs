//! What actors, replicas, shards, nodes and coordinators say of themselves.
use super::*;

/// Role of an actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Node agent (heartbeats).
    Node,
    /// Query orchestrator.
    Coordinator,
    /// Query / document encoder.
    Embedder,
    /// Index shard replica.
    Shard,
    /// Cross-encoder.
    Reranker,
    /// Answer generator.
    Generator,
}

/// Serving state of a shard replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaState {
    /// Copying missed writes from a peer; not searched.
    CatchingUp,
    /// Serving queries.
    Serving,
}

impl ReplicaState {
    /// Name used in status output.
    pub fn as_str(&self) -> &'static str {
        match self {
            ReplicaState::CatchingUp => "catching-up",
            ReplicaState::Serving => "serving",
        }
    }
}

/// What an actor says about itself in answer to a ping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActorInfo {
    /// Node the actor runs on.
    pub node: String,
    /// Its role.
    pub role: Role,
    /// Shard id (shard replicas).
    pub shard: Option<u32>,
    /// Replica state (shard replicas).
    pub state: ReplicaState,
    /// Live documents (shard replicas).
    pub docs: u64,
    /// Live chunks (shard replicas).
    pub chunks: u64,
    /// Last applied write sequence number (shard replicas).
    pub last_seq: u64,
}

/// Status of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// host:port.
    pub addr: String,
    /// Whether it answers heartbeats.
    pub alive: bool,
}

/// Status of a replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Node hosting it.
    pub node: String,
    /// `serving`, `catching-up`, `suspected` or `down`.
    pub state: String,
    /// Documents it holds.
    pub docs: u64,
}

/// Status of a shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardStatus {
    /// Shard id.
    pub id: u32,
    /// Its replicas as placed by cluster.toml.
    pub replicas: Vec<ReplicaStatus>,
}

/// Cluster status as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Nodes of cluster.toml.
    pub nodes: Vec<NodeStatus>,
    /// Shards and their replicas.
    pub shards: Vec<ShardStatus>,
    /// Embedding model the cluster runs.
    pub model: Option<ModelIdentity>,
    /// The answering coordinator's caches.
    #[serde(default)]
    pub caches: Vec<CacheStatus>,
    /// The answering coordinator's hedged shard requests.
    #[serde(default)]
    pub hedges: HedgeStatus,
}

/// One cache of a coordinator, counted since it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheStatus {
    /// `query_embedding` or `retrieval`.
    pub name: String,
    /// Entries held.
    pub entries: u64,
    /// Most entries it holds.
    pub capacity: u64,
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Lookups that found an entry made stale by a write since (retrieval only).
    pub stale: u64,
}

impl CacheStatus {
    /// Hits over all lookups (0 before the first).
    pub fn hit_rate(&self) -> f64 {
        let all = self.hits + self.misses + self.stale;
        if all == 0 {
            0.0
        } else {
            self.hits as f64 / all as f64
        }
    }
}

/// Hedged shard requests of a coordinator, counted since it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HedgeStatus {
    /// Shard requests sent (first attempts).
    pub requests: u64,
    /// Hedges sent: the same request to a second replica.
    pub sent: u64,
    /// Hedges whose answer came first.
    pub won: u64,
    /// Hedges not sent because the cap (`query.hedge_max_ratio`) was reached.
    pub capped: u64,
}
