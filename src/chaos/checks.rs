//! Waiting for the cluster to serve and converge, and checking what the writes left on every
//! replica.
use super::run::*;

/// Whether every node is alive and every replica serving, as the cluster's status says now.
async fn serving_now(client: &Client, cfg: &ClusterConfig) -> bool {
    let Ok(s) = client.status().await else {
        return false;
    };
    let alive = s.nodes.iter().all(|n| n.alive);
    let serving = s
        .shards
        .iter()
        .all(|sh| sh.replicas.iter().all(|r| r.state == "serving"));
    alive && serving && s.nodes.len() == cfg.nodes.len()
}

/// Waits until every node is alive and every replica serving.
pub(super) async fn wait_serving(
    client: &Client,
    cfg: &ClusterConfig,
    within: Duration,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if serving_now(client, cfg).await {
            return Ok(());
        }
        if start.elapsed() > within {
            bail!("not every node alive and replica serving within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `node` is alive with all its replicas serving, within `within`.
pub(super) async fn node_serving(client: &Client, node: &str, within: Duration) -> bool {
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
pub(super) async fn converge(client: &Client, cfg: &ClusterConfig, within: Duration) -> Result<()> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < within {
        if serving_now(client, cfg).await {
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
pub(super) async fn check_writes(
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
