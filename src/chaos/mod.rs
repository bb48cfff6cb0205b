//! Chaos: one-off faults on live actors (`ragfleet chaos --group G --action panic|stall:MS`),
//! and seeded experiments against a whole cluster under load (`ragfleet chaos run`).
mod checks;
mod faults;
pub(crate) mod net;
mod nodes;
pub(crate) mod plan;
pub(crate) mod run;
mod workload;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ragfleet_client::typed::{self, call_typed};
use ragfleet_proto::ChaosAction;
use ragfleet_runtime::Client;

/// Makes the actors of a role group panic or stall (on one node, or every node).
pub(crate) async fn actors(
    client: &Client,
    group: &str,
    action: &str,
    node: Option<&str>,
) -> Result<()> {
    let action = match action {
        "panic" => ChaosAction::Panic,
        a if a.starts_with("stall:") => ChaosAction::Stall(a[6..].parse().context("stall:MS")?),
        other => bail!("unknown chaos action {other:?} (panic, stall:MS)"),
    };
    let g = format!("ragfleet.{group}");
    // groups of every node reach this client shortly after it connects: wait for targets
    let deadline = Instant::now() + Duration::from_secs(5);
    let targets = loop {
        let mut found = Vec::new();
        for a in client.members(&g) {
            let info = call_typed(&a, typed::Ping {}, Duration::from_secs(2)).await;
            if let Ok(i) = info {
                if node.is_none_or(|n| n == i.node) {
                    found.push((a, i.node));
                }
            }
        }
        if !found.is_empty() || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut hit = 0;
    for (a, on) in targets {
        // a stall is acknowledged when it begins: once this returns, it is in effect
        let r = call_typed(&a, typed::Chaos { action }, Duration::from_secs(5)).await;
        println!(
            "{g} on {on}: {action:?} -> {}",
            match (r, action) {
                (Ok(_), _) => "done".to_string(),
                // the actor panicked before it could answer: that is the point
                (Err(_), ChaosAction::Panic) => "panicked (its supervisor restarts it)".to_string(),
                (Err(e), _) => e.to_string(),
            }
        );
        hit += 1;
    }
    if hit == 0 {
        bail!(
            "no actor of group {g} found{}",
            node.map(|n| format!(" on node {n}")).unwrap_or_default()
        );
    }
    Ok(())
}
