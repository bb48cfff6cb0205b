//! Where things are: nodes by name, shards' replicas on the shard nodes, a document's shard,
//! a replica's data folder.
use std::path::PathBuf;

use super::{ClusterConfig, ConfigError, NodeConfig, NodeRole};

impl ClusterConfig {
    /// A node by name.
    pub fn node(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ConfigError::UnknownNode(name.to_string()))
    }

    /// Nodes with the shard role, in file order.
    pub fn shard_nodes(&self) -> Vec<&NodeConfig> {
        self.nodes
            .iter()
            .filter(|n| n.has(NodeRole::Shard))
            .collect()
    }

    /// `placement()[s]` = the nodes holding replicas of shard `s`, replica 0 first.
    ///
    /// Deterministic from the node list: replica `r` of shard `s` goes to shard node
    /// `(s + r) mod n`, which keeps replicas of one shard on distinct nodes.
    pub fn placement(&self) -> Vec<Vec<String>> {
        if let Some(p) = &self.index.placement {
            return p.clone();
        }
        let nodes = self.shard_nodes();
        let n = nodes.len();
        (0..self.index.shards as usize)
            .map(|s| {
                (0..self.index.replication as usize)
                    .map(|r| nodes[(s + r) % n].name.clone())
                    .collect()
            })
            .collect()
    }

    /// Shards (and replica index) hosted by `node`.
    pub fn shards_of(&self, node: &str) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        for (s, nodes) in self.placement().iter().enumerate() {
            for (r, n) in nodes.iter().enumerate() {
                if n == node {
                    out.push((s as u32, r as u32));
                }
            }
        }
        out
    }

    /// Shard of a document id: a stable FNV-1a hash, independent of the Rust version.
    pub fn shard_of(&self, doc_id: &str) -> u32 {
        shard_for(doc_id, self.index.shards)
    }

    /// Data folder of a shard replica.
    pub fn replica_dir(&self, node: &str, shard: u32) -> PathBuf {
        self.data_dir.join(node).join(format!("shard-{shard}"))
    }
}

/// Stable shard of a document id (FNV-1a 64).
pub fn shard_for(doc_id: &str, shards: u32) -> u32 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in doc_id.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % shards.max(1) as u64) as u32
}
