//! The cluster as this coordinator's failure detector sees it.
use ragfleet_client::groups;
use ragfleet_proto::{ClusterStatus, NodeStatus, ReplicaStatus, ShardStatus};

use super::Ctx;

/// The cluster as this coordinator's failure detector sees it.
pub fn status(ctx: &Ctx) -> ClusterStatus {
    let cfg = ctx.cfg();
    let h = &ctx.args.health;
    let agents = h.members(groups::NODES);
    let nodes = cfg
        .nodes
        .iter()
        .map(|n| NodeStatus {
            name: n.name.clone(),
            addr: n.addr.clone(),
            alive: agents.iter().any(|a| {
                a.info.as_ref().is_some_and(|i| i.node == n.name) && a.healthy(h.suspect_after)
            }),
        })
        .collect();
    let placement = cfg.placement();
    let shards = (0..cfg.index.shards)
        .map(|s| {
            let members = h.members(&groups::shard(s));
            let replicas = placement[s as usize]
                .iter()
                .map(|node| {
                    let m = members
                        .iter()
                        .find(|m| m.info.as_ref().is_some_and(|i| &i.node == node));
                    match m {
                        Some(m) if m.healthy(h.suspect_after) => {
                            let info = m.info.as_ref().expect("checked");
                            ReplicaStatus {
                                node: node.clone(),
                                state: info.state.as_str().into(),
                                docs: info.docs,
                            }
                        }
                        Some(m) => ReplicaStatus {
                            node: node.clone(),
                            state: "suspected".into(),
                            docs: m.info.as_ref().map(|i| i.docs).unwrap_or(0),
                        },
                        None => ReplicaStatus {
                            node: node.clone(),
                            state: "down".into(),
                            docs: 0,
                        },
                    }
                })
                .collect();
            ShardStatus { id: s, replicas }
        })
        .collect();
    ClusterStatus {
        nodes,
        shards,
        model: None,
        caches: vec![ctx.embed_cache.status(), ctx.results.status()],
        hedges: ctx.hedging.status(),
    }
}
