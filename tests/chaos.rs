//! `ragfleet chaos run` end to end: it starts the nodes of a cluster file itself, injects a
//! seeded plan's faults under load and checks the invariants; a violation exits non-zero with
//! the seed to replay.
mod common;

use std::process::Command;

use common::*;

/// A three-node cluster file on free ports (the runner starts the nodes).
fn cluster_file(dir: &std::path::Path) -> std::path::PathBuf {
    let mut text = String::from(
        "version = 1\nname = \"chaos-test\"\ncookie = \"chaos-test-cookie\"\ndata_dir = \"data\"\n",
    );
    for (i, roles) in [
        "\"coordinator\", \"embedder\", \"shard\"",
        "\"coordinator\", \"embedder\", \"shard\"",
        "\"shard\"",
    ]
    .iter()
    .enumerate()
    {
        text.push_str(&format!(
            "[[node]]\nname = \"n{}\"\naddr = \"127.0.0.1:{}\"\nroles = [{roles}]\n",
            i + 1,
            free_port()
        ));
    }
    text.push_str(
        "[index]\nshards = 4\nreplication = 2\nwrite_quorum = 2\nanti_entropy_ms = 1000\n",
    );
    // generous timings: the test checks the runner, on a loaded 2-core machine
    text.push_str("[query]\nshard_deadline_ms = 2000\n");
    text.push_str("[failure]\nheartbeat_ms = 200\nsuspect_after_ms = 1500\n");
    let p = dir.join("cluster.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn run(dir: &std::path::Path, plan: &str, seed: &str) -> (bool, serde_json::Value, String) {
    let cfg = cluster_file(dir);
    let plan_path = dir.join("plan.toml");
    std::fs::write(&plan_path, plan).unwrap();
    let out = Command::new(bin())
        .args(["chaos", "run", "--json", "--seed", seed, "--config"])
        .arg(&cfg)
        .arg("--plan")
        .arg(&plan_path)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--models")
        .arg(models_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let last = stdout.lines().last().unwrap_or("").to_string();
    let report = serde_json::from_str(&last).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        out.status.success(),
        report,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn a_kill_and_a_freeze_under_load_lose_nothing_and_every_query_answers() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let plan =
        "name = \"t\"\nduration_s = 14\n[workload]\nretrieve_per_s = 4\ningest_every_ms = 700\n\
        [[fault]]\nkind = \"kill\"\nnodes = [\"n1\"]\nat_s = 2\ndown_s = 3\n\
        [[fault]]\nkind = \"freeze\"\nnodes = [\"n3\"]\nat_s = 8\ndown_s = 3\n\
        [[fault]]\nkind = \"panic\"\ngroups = [\"embedder\"]\nat_s = 1\nevery_s = 5\n";
    let (ok, r, err) = run(dir.path(), plan, "11");
    assert!(ok, "{r}\n{err}");
    assert_eq!(r["seed"], 11);
    assert_eq!(r["violations"].as_array().unwrap().len(), 0, "{r}");
    assert!(r["queries"]["total"].as_u64().unwrap() > 20, "{r}");
    assert_eq!(r["queries"]["failed"], 0, "{r}");
    assert!(r["writes"]["acked"].as_u64().unwrap() > 10, "{r}");
    assert_eq!(r["writes"]["lost"], 0);
    assert_eq!(r["writes"]["resurrected"], 0);
    // the kill and the freeze happened, and n1 came back to serve
    let actions: Vec<&str> = r["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["action"].as_str().unwrap())
        .collect();
    for a in ["kill -9 n1", "restart n1", "SIGSTOP n3", "SIGCONT n3"] {
        assert!(actions.contains(&a), "{a} missing: {actions:?}");
    }
    assert!(r["recovery_ms"]
        .as_object()
        .unwrap()
        .keys()
        .any(|k| k.starts_with("restart n1")));
}

#[test]
fn a_violated_invariant_exits_non_zero_naming_it_and_the_seed() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    // no node can stay under 1 MiB of resident memory
    let plan = "name = \"tiny\"\nduration_s = 2\nmax_rss_mib = 1\n";
    let (ok, r, err) = run(dir.path(), plan, "5");
    assert!(!ok, "{r}");
    let v = r["violations"].as_array().unwrap();
    assert!(
        !v.is_empty() && v[0].as_str().unwrap().contains("MiB resident"),
        "{r}"
    );
    assert!(err.contains("--seed 5"), "{err}");
}

#[test]
fn a_partitioned_coordinator_answers_truthfully_and_acknowledges_nothing_alone() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    // the client starts on n1; n1 is cut off from its peers (the client still reaches it),
    // then from everyone (the client must move to n2), then n3's links slow down
    let plan = "name = \"p\"\nduration_s = 22\n[workload]\nretrieve_per_s = 4\ningest_every_ms = 700\ncoordinator = \"n1\"\n\
        [[fault]]\nkind = \"partition\"\nnodes = [\"n1\"]\nat_s = 2\ndown_s = 6\n\
        [[fault]]\nkind = \"partition\"\nnodes = [\"n1\"]\nclient = true\nat_s = 10\ndown_s = 5\n\
        [[fault]]\nkind = \"delay\"\nnodes = [\"n3\"]\ndelay_ms = 60\njitter_ms = 20\nat_s = 16\ndown_s = 4\n";
    let (ok, r, err) = run(dir.path(), plan, "13");
    assert!(ok, "{r}\n{err}");
    assert_eq!(r["network"], "tcp-proxy", "{r}");
    assert_eq!(r["violations"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["queries"]["failed"], 0, "{r}");
    // n1 alone answered with partial coverage (checked truthful by the runner) ...
    assert!(r["queries"]["partial"].as_u64().unwrap() > 0, "{r}");
    // ... and could acknowledge no write: it cannot reach a write quorum
    assert!(r["writes"]["failed"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["writes"]["lost"], 0, "{r}");
    assert_eq!(r["writes"]["resurrected"], 0, "{r}");
    let recovered: Vec<&String> = r["recovery_ms"].as_object().unwrap().keys().collect();
    assert!(
        recovered
            .iter()
            .filter(|k| k.starts_with("heal n1"))
            .count()
            == 2,
        "{recovered:?}"
    );
}
