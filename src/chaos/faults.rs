//! Carrying out a plan's actions on the nodes and actors of a run.
use super::net::LinkState;
use super::plan::NetFault;
use super::run::*;

/// Carries out one action; returns what happened, in words.
pub(super) async fn apply(
    action: &Action,
    nodes: &Nodes,
    client: &Client,
    cfg: &ClusterConfig,
    shared: &Shared,
    now: u64,
) -> String {
    match action {
        Action::Kill(n) => {
            shared.timeline.lock().expect("t").down(n, now);
            nodes.kill(n);
            "done".into()
        }
        Action::Freeze(n) => {
            shared.timeline.lock().expect("t").down(n, now);
            nodes.signal(n, libc::SIGSTOP);
            "done".into()
        }
        Action::Thaw(n) => {
            nodes.signal(n, libc::SIGCONT);
            shared.timeline.lock().expect("t").up(n, now);
            "done".into()
        }
        Action::Restart(n) => {
            let r = nodes.spawn(n);
            shared.timeline.lock().expect("t").up(n, now);
            match r {
                Ok(()) => "done".into(),
                Err(e) => format!("failed: {e}"),
            }
        }
        Action::Panic { node, group } => {
            // a panicked shard replica restarts, recovers and catches up (or waits for a
            // peer) before it serves again
            if group.starts_with("shard.") {
                let back = 2 * cfg.failure.suspect_after_ms.clamp(1000, 10_000) + 3000;
                let mut tl = shared.timeline.lock().expect("t");
                tl.intervals
                    .push((format!("{node}/{group}"), now, now + back));
            }
            chaos_call(client, node, group, ChaosAction::Panic).await
        }
        Action::Stall { node, group, ms } => {
            if group.starts_with("shard.") {
                let mut tl = shared.timeline.lock().expect("t");
                tl.intervals
                    .push((format!("{node}/{group}"), now, now + ms));
            }
            chaos_call(client, node, group, ChaosAction::Stall(*ms)).await
        }
        // file work off the async runtime's threads
        Action::Corrupt { node, target, pick } => {
            let (cfg, node, target, pick) = (cfg.clone(), node.clone(), target.clone(), *pick);
            tokio::task::spawn_blocking(move || corrupt(&cfg, &node, &target, pick))
                .await
                .unwrap_or_else(|e| format!("failed: {e}"))
        }
        Action::Fill(node) => {
            let dir = cfg.data_dir.join(node);
            tokio::task::spawn_blocking(move || fill(&dir))
                .await
                .unwrap_or_else(|e| format!("failed: {e}"))
        }
        Action::Net { node, net, client } => {
            let Some(proxies) = &shared.net else {
                return "no proxies on this run's links".into();
            };
            let state = match *net {
                NetFault::Cut => {
                    let mut tl = shared.timeline.lock().expect("t");
                    for o in shared.names.iter().filter(|o| *o != node) {
                        tl.down(&link(node, o), now);
                    }
                    LinkState {
                        cut: true,
                        ..LinkState::default()
                    }
                }
                NetFault::Delay { ms, jitter_ms } => LinkState {
                    delay_ms: ms,
                    jitter_ms,
                    ..LinkState::default()
                },
                NetFault::Loss { pct } => LinkState {
                    loss: pct / 100.0,
                    ..LinkState::default()
                },
            };
            proxies.set_node(node, Some((state, *client)), &shared.names);
            "done".into()
        }
        Action::Heal(node) => {
            let Some(proxies) = &shared.net else {
                return "no proxies on this run's links".into();
            };
            proxies.set_node(node, None, &shared.names);
            let mut tl = shared.timeline.lock().expect("t");
            for o in shared.names.iter().filter(|o| *o != node) {
                // a link stays cut while its other end is partitioned off
                if !proxies.state(node, o).cut {
                    tl.up(&link(node, o), now);
                }
            }
            "done".into()
        }
        Action::Free(node) => {
            let p = cfg.data_dir.join(node).join(FILLER);
            match std::fs::remove_file(&p) {
                Ok(()) => "space back".into(),
                Err(e) => format!("could not remove {}: {e}", p.display()),
            }
        }
    }
}

pub(super) async fn chaos_call(
    client: &Client,
    node: &str,
    group: &str,
    action: ChaosAction,
) -> String {
    let g = format!("ragfleet.{group}");
    let mut hit = 0;
    for a in client.members(&g) {
        let info = call_typed(
            &a,
            ragfleet_client::typed::Ping {},
            Duration::from_millis(500),
        )
        .await;
        if info.is_ok_and(|i| i.node == node) {
            let _ = call_typed(&a, Chaos { action }, Duration::from_millis(500)).await;
            hit += 1;
        }
    }
    if hit == 0 {
        "no such actor up".into()
    } else {
        format!("{hit} actors")
    }
}

/// Damages a file of a stopped node: `wal` cuts the write-ahead log in its last record (a torn
/// tail), `wal-middle` flips a byte of its first record when later records follow (damage no
/// crash leaves), `segment` flips a byte of a sealed segment's data file, `manifest` one of the
/// shard's manifest. The shard is the one `pick` chooses or, when it has no such file, the next
/// of the node's shards that has; when none has, the chosen shard's log is cut (or a segment
/// damaged) instead, and the answer names the file.
pub(super) fn corrupt(cfg: &ClusterConfig, node: &str, target: &str, pick: u64) -> String {
    let shards = cfg.shards_of(node);
    if shards.is_empty() {
        return "no shard on this node".into();
    }
    // the picked shard first, then the others in turn: the first holding the target's file
    let order: Vec<u32> = (0..shards.len())
        .map(|i| shards[(pick as usize + i) % shards.len()].0)
        .collect();
    let found = order
        .iter()
        .find_map(|&s| target_file(&cfg.replica_dir(node, s), target))
        .or_else(|| {
            // none has it yet: the picked shard's log, or a segment
            let dir = cfg.replica_dir(node, order[0]);
            target_file(&dir, "wal").or_else(|| target_file(&dir, "segment"))
        });
    let Some((path, len, first_record)) = found else {
        return format!("shard {}: no file to damage yet", order[0]);
    };
    let torn = path.extension().is_some_and(|x| x == "log") && first_record.is_none();
    let r = if torn {
        // a torn tail: cut inside the last bytes
        let cut = len - 1 - pick % len.min(16);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(cut))
            .map(|_| format!("{} cut from {len} to {cut} bytes", path.display()))
    } else {
        std::fs::read(&path).and_then(|mut b| {
            let i = match first_record {
                // inside the first record's body, past its format marker
                Some(end) => 18 + (pick % end.saturating_sub(18).max(1)) as usize,
                None => (pick as usize) % b.len(),
            };
            b[i] ^= 0x5a;
            std::fs::write(&path, b).map(|_| format!("{} byte {i} flipped", path.display()))
        })
    };
    r.unwrap_or_else(|e| format!("could not damage {}: {e}", path.display()))
}

/// The file of a shard folder a `target` damages, with its length, and for `wal-middle` the
/// end of the log's first record (present only when another record follows it).
fn target_file(dir: &std::path::Path, target: &str) -> Option<(PathBuf, u64, Option<u64>)> {
    let file = |p: PathBuf| -> Option<(PathBuf, u64)> {
        let len = std::fs::metadata(&p).ok()?.len();
        (len > 0).then_some((p, len))
    };
    match target {
        "segment" => std::fs::read_dir(dir).ok().and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension().is_some_and(|x| x == "bin")
                        && p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("seg-"))
                })
                .find_map(file)
                .map(|(p, l)| (p, l, None))
        }),
        "manifest" => file(dir.join("manifest3.bin")).map(|(p, l)| (p, l, None)),
        "wal-middle" => {
            let (p, len) = file(dir.join("wal.log"))?;
            let b = std::fs::read(&p).ok()?;
            let body = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as u64;
            (8 + body < len).then_some((p, len, Some(8 + body)))
        }
        _ => file(dir.join("wal.log")).map(|(p, l)| (p, l, None)),
    }
}

/// The file that fills a node's data folder.
const FILLER: &str = "chaos-filler.bin";

/// Writes a file into `dir` until the disk refuses more.
fn fill(dir: &std::path::Path) -> String {
    use std::io::Write;
    let p = dir.join(FILLER);
    let mut f = match std::fs::File::create(&p) {
        Ok(f) => f,
        Err(e) => return format!("could not create {}: {e}", p.display()),
    };
    let block = vec![0u8; 64 << 10];
    let mut written: u64 = 0;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(_) => break,
        }
        if written > (64u64 << 30) {
            break; // not a small tmpfs: do not fill a real disk
        }
    }
    let _ = f.sync_all();
    format!("{} MiB written, the disk is full", written >> 20)
}

/// Mounts a tmpfs of `mib` MiB at `dir` (the data folder of a node under a disk-full fault).
pub(super) fn mount_tmpfs(dir: &std::path::Path, mib: u64) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(dir)
        .output()
        .map_err(|e| format!("mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mount -t tmpfs at {} failed (disk-full faults need root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Unmounts what [`mount_tmpfs`] mounted.
pub(super) fn unmount(dir: &std::path::Path) {
    let _ = std::process::Command::new("umount").arg(dir).output();
}
