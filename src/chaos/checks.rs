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
                let got =
                    match ragfleet_client::typed::fetch_all(&m, batch, Duration::from_secs(30))
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

/// When (ms into the run) `node`'s shard supervisor restarted all its replicas, as its log
/// says (restart intensity exceeded: escalated, or restarted after a backoff), each with the
/// backoff it waited (ms).
pub(super) fn shard_restarts(log: &str, node: &str, t0: std::time::SystemTime) -> Vec<(u64, u64)> {
    let day_ms = 86_400_000u64;
    let t0_ms = t0
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64 % day_ms)
        .unwrap_or(0);
    let shards = format!("{node}/shards");
    log.lines()
        .filter(|l| l.contains("restart intensity exceeded") && l.contains(&shards))
        .filter_map(|l| {
            // 2026-12-01T05:39:15.674673Z: the time of day, UTC
            let t = l.get(11..23)?;
            let h: u64 = t.get(0..2)?.parse().ok()?;
            let m: u64 = t.get(3..5)?.parse().ok()?;
            let s: f64 = t.get(6..12)?.parse().ok()?;
            let at = h * 3_600_000 + m * 60_000 + (s * 1000.0) as u64;
            let since = (at + day_ms - t0_ms) % day_ms;
            Some((since, backoff_ms(l)))
        })
        .collect()
}

/// The `delay=...` of a supervisor's log line (Rust's Duration debug form), in ms; 0 if none.
fn backoff_ms(line: &str) -> u64 {
    let Some(v) = line.split("delay=").nth(1) else {
        return 0;
    };
    let v = v.split_whitespace().next().unwrap_or("");
    let num: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let x: f64 = num.parse().unwrap_or(0.0);
    let unit = &v[num.len()..];
    let ms = match unit {
        "s" => x * 1000.0,
        "ms" => x,
        "µs" | "us" => x / 1000.0,
        _ => 0.0,
    };
    ms.ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_supervisors_escalation_is_placed_on_the_runs_time_line_with_its_backoff() {
        // the run started at 05:39:00.000 UTC on some day
        let t0 = std::time::UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 5 * 3600 + 39 * 60);
        let log = "2026-12-01T05:39:15.674673Z ERROR Actor{id=\"0.14\"}: restart intensity exceeded: escalating supervisor=n2/shards child=n2/shard-1\n\
            2026-12-01T05:39:16.000000Z ERROR Actor{id=\"0.11\"}: restart intensity exceeded: restarting after a backoff supervisor=n2/root child=n2/shards error=x delay=2.5s\n\
            2026-12-01T05:39:17.000000Z ERROR x: restart intensity exceeded: escalating supervisor=n2/embedders child=n2/embedder\n\
            2026-12-01T05:39:18.000000Z INFO shard index opened dir=/tmp/n2/shard-0";
        assert_eq!(
            shard_restarts(log, "n2", t0),
            vec![(15_674, 0), (16_000, 2_500)]
        );
        assert!(shard_restarts(log, "n1", t0).is_empty());
        assert_eq!(backoff_ms("x delay=250ms y"), 250);
    }
}
