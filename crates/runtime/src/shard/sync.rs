//! A replica's convergence with its peers: catch-up before it serves, anti-entropy after.
//!
//! Both are the same pull. The puller hashes document ids into buckets
//! ([`ragfleet_proto::doc_bucket`], ~256 documents a bucket for the larger replica) and asks
//! the peer for each bucket's digest ([`Request::BucketDigests`]); it then asks the versions of
//! the buckets whose digests differ from its own, a page of whole buckets at a time (at most
//! [`ragfleet_proto::VERSIONS_PAGE_BYTES`], [`Request::VersionsIn`]), fetches the documents
//! the peer holds at a newer version in batches ([`Request::Fetch`]) and applies the peer's
//! newer deletions. So a replica that lacks a few documents moves a few buckets' versions, not
//! the shard's, and no answer outgrows a cluster frame whatever the shard's size (a shard of a
//! million documents holds 20-50 MB of (id, version) pairs; a frame 16 MiB). Write versions
//! (last writer wins) make the pull safe beside concurrent writes. Anti-entropy first compares
//! whole digests ([`Request::Digest`]), so replicas that agree exchange two numbers.
use super::*;

/// Documents a `Fetch` may ask for (the pull fetches in batches of this size).
pub(super) const MAX_FETCH: usize = 256;
/// About how many bytes one `Fetch` answer carries at most (a frame holds 16 MiB): the rest of
/// the ids asked for are asked again.
pub(super) const FETCH_BYTES: usize = 4 << 20;
/// About how many bytes of versions the pull asks a page to carry (tests ask small pages so that
/// a small shard spans several).
const PAGE_BYTES: u32 = if cfg!(test) {
    2 << 10
} else {
    ragfleet_proto::VERSIONS_PAGE_BYTES
};

/// Finds a serving peer replica and pulls what it lacks; serves alone if none shows up. Then runs
/// anti-entropy for the life of the replica.
pub(super) async fn catch_up(me: ActorRef<RoleMsg>, args: ShardArgs, shared: Arc<Shared>) {
    let start = Instant::now();
    let group = groups::shard(args.shard);
    let mut source = None;
    while start.elapsed() < args.peer_wait {
        let (mut peers, mut all_catching_up_after_me) = (0, true);
        for cell in ractor::pg::get_members(&group) {
            if cell.get_id() == me.get_id() {
                continue;
            }
            let peer: ActorRef<RoleMsg> = cell.into();
            if let Ok(info) = call_typed(&peer, typed::Ping {}, Duration::from_millis(500)).await {
                if info.state == ReplicaState::Serving {
                    source = Some((peer, info.node));
                    break;
                }
                peers += 1;
                all_catching_up_after_me &= info.node > args.node;
            }
        }
        if source.is_some() {
            break;
        }
        // a fresh cluster: every replica is catching up; the one on the lowest-named node
        // serves first and the others copy from it
        if peers > 0 && all_catching_up_after_me {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match source {
        Some((peer, node)) => match pull(&peer, None, &shared).await {
            Ok(p) => info!(
                shard = args.shard,
                from = %node,
                fetched = p.fetched,
                deleted = p.deleted,
                peer_docs = p.peer_docs,
                buckets = p.buckets,
                differing = p.differing,
                pages = p.pages,
                "caught up from peer"
            ),
            Err(e) => error!(shard = args.shard, from = %node, error = %e,
                "catch-up failed; serving local data"),
        },
        None => info!(shard = args.shard, "no serving peer; serving local data"),
    }
    *shared.state.lock().expect("state") = ReplicaState::Serving;
    if let Some(every) = args.anti_entropy {
        anti_entropy(&me, &args, &shared, every).await;
    }
}

/// Every `every`, compares this replica's digest with each serving peer's and pulls from a peer
/// whose digest differs. Every replica does the same, so changes flow both ways.
async fn anti_entropy(
    me: &ActorRef<RoleMsg>,
    args: &ShardArgs,
    shared: &Arc<Shared>,
    every: Duration,
) {
    let group = groups::shard(args.shard);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: catch-up has just run
    let digest = || {
        let s = shared.clone();
        tokio::task::spawn_blocking(move || s.index.read().digest())
    };
    loop {
        tick.tick().await;
        // this replica's digest, computed once a round and again only after a pull changed it
        let Ok(mut mine) = digest().await else {
            continue;
        };
        for cell in ractor::pg::get_members(&group) {
            if cell.get_id() == me.get_id() {
                continue;
            }
            let peer: ActorRef<RoleMsg> = cell.into();
            let (theirs, peer_docs) =
                match call_typed(&peer, typed::Digest {}, Duration::from_secs(5)).await {
                    Ok(d) => d,
                    _ => continue, // down or busy: the next round tries again
                };
            if mine == theirs {
                continue;
            }
            match pull(&peer, Some(peer_docs), shared).await {
                Ok(p) if p.fetched + p.deleted > 0 => {
                    info!(
                    shard = args.shard,
                    peer = %peer.get_id(),
                    fetched = p.fetched,
                    deleted = p.deleted,
                    differing = p.differing,
                    buckets = p.buckets,
                    "anti-entropy pulled what this replica lacked"
                    );
                    if let Ok(d) = digest().await {
                        mine = d;
                    }
                }
                Ok(_) => {} // the difference is on the peer's side: it pulls from here
                Err(e) => warn!(shard = args.shard, error = %e, "anti-entropy pull failed"),
            }
        }
    }
}

/// What one pull moved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Pulled {
    pub fetched: usize,
    pub deleted: usize,
    pub peer_docs: usize,
    /// Buckets compared.
    pub buckets: u32,
    /// Buckets whose digests differed.
    pub differing: usize,
    /// Pages of versions asked for.
    pub pages: usize,
}

/// Pulls from `peer` the documents it holds at a newer version than this replica and its newer
/// deletions, bucket by differing bucket, in pages; applies them durably. `peer_docs`: the
/// peer's document count when its digest was just asked (else it is asked here).
pub(super) async fn pull(
    peer: &ActorRef<RoleMsg>,
    peer_docs: Option<u64>,
    shared: &Arc<Shared>,
) -> Result<Pulled, String> {
    let peer_docs = match peer_docs {
        Some(n) => n,
        None => {
            call_typed(peer, typed::Digest {}, Duration::from_secs(10))
                .await
                .map_err(|e| format!("digest: {e}"))?
                .1
        }
    };
    let s = shared.clone();
    let own_docs = tokio::task::spawn_blocking(move || s.index.read().doc_count())
        .await
        .map_err(|e| e.to_string())?;
    let buckets = ragfleet_proto::bucket_count(peer_docs.max(own_docs));
    let theirs = call_typed(
        peer,
        typed::BucketDigests { buckets },
        Duration::from_secs(60),
    )
    .await
    .map_err(|e| format!("bucket digests: {e}"))?;
    if theirs.len() != buckets as usize {
        return Err(format!(
            "bucket digests: {} answered for {buckets} asked",
            theirs.len()
        ));
    }
    let s = shared.clone();
    let mine = tokio::task::spawn_blocking(move || s.index.read().bucket_digests(buckets))
        .await
        .map_err(|e| e.to_string())?;
    let mut wanted: Vec<u32> = (0..buckets)
        .filter(|&b| mine[b as usize] != theirs[b as usize])
        .collect();
    let mut done = Pulled {
        peer_docs: peer_docs as usize,
        buckets,
        differing: wanted.len(),
        ..Pulled::default()
    };
    while !wanted.is_empty() {
        let ask = typed::VersionsIn {
            buckets,
            wanted: wanted.clone(),
            max_bytes: PAGE_BYTES,
        };
        let (versions, covered) = call_typed(peer, ask, Duration::from_secs(60))
            .await
            .map_err(|e| format!("versions: {e}"))?;
        let covered = covered as usize;
        if covered == 0 || covered > wanted.len() {
            return Err(format!(
                "versions: {covered} buckets covered of {} asked",
                wanted.len()
            ));
        }
        wanted.drain(..covered);
        done.pages += 1;
        let Some(model) = versions.model.clone() else {
            return Ok(done); // the peer never had a write
        };
        let s = shared.clone();
        let plan = tokio::task::spawn_blocking(move || s.index.read().plan_pull(&versions))
            .await
            .map_err(|e| e.to_string())?;
        for batch in plan.fetch.chunks(MAX_FETCH) {
            let (ops, _) = typed::fetch_all(peer, batch, Duration::from_secs(60))
                .await
                .map_err(|e| format!("fetch: {e}"))?;
            done.fetched += ops.len();
            apply(shared, ops, &model).await?;
        }
        done.deleted += plan.deletes.len();
        apply(shared, plan.deletes, &model).await?;
    }
    Ok(done)
}

/// Why a `BucketDigests` or `VersionsIn` request cannot be answered (bucket counts out of range,
/// a bucket past the count, more buckets wanted than there are).
pub(super) fn check_buckets(buckets: u32, wanted: &[u32]) -> Result<(), WireError> {
    let max = ragfleet_proto::MAX_DIGEST_BUCKETS;
    if buckets == 0 || buckets > max {
        return Err(WireError::BadRequest(format!(
            "{buckets} buckets (1 to {max})"
        )));
    }
    if wanted.len() > buckets as usize {
        return Err(WireError::BadRequest(format!(
            "{} buckets wanted of {buckets}",
            wanted.len()
        )));
    }
    if let Some(b) = wanted.iter().find(|&&b| b >= buckets) {
        return Err(WireError::BadRequest(format!("bucket {b} of {buckets}")));
    }
    Ok(())
}

/// Applies a peer's ops durably (blocking thread); the index skips any op older than what it
/// holds, so writes that landed meanwhile win.
async fn apply(
    shared: &Arc<Shared>,
    ops: Vec<WriteOp>,
    model: &ragfleet_proto::ModelIdentity,
) -> Result<(), String> {
    if ops.is_empty() {
        return Ok(());
    }
    let (s, model) = (shared.clone(), model.clone());
    tokio::task::spawn_blocking(move || {
        let r = s
            .index
            .write(ops, &model)
            .map(|_| ())
            .map_err(|e| e.to_string());
        s.refresh_counts(&s.index.read());
        r
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragfleet_proto::{ChunkRecord, ModelIdentity};

    fn model() -> ModelIdentity {
        ModelIdentity {
            name: "sync-test".into(),
            weights_sha256: "00".repeat(32),
            dim: 4,
            max_len: 256,
            pooling: "mean".into(),
            normalized: true,
        }
    }

    fn doc(id: &str, version: u64) -> WriteOp {
        WriteOp::Upsert {
            doc_id: id.into(),
            version,
            chunks: vec![ChunkRecord {
                doc_id: id.into(),
                chunk_id: format!("{id}#0"),
                text: format!("text of {id}"),
                vector: vec![1.0, (version % 7) as f32, 0.5, -1.0],
                sentences: Default::default(),
            }],
        }
    }

    fn args(node: &str, shard: u32, dir: &std::path::Path, anti_entropy: bool) -> ShardArgs {
        ShardArgs {
            node: node.into(),
            shard,
            dir: dir.to_path_buf(),
            settings: IndexSettings {
                segment_size: 4096,
                background: false,
                ..IndexSettings::default()
            },
            peer_wait: Duration::from_secs(10),
            anti_entropy: anti_entropy.then_some(Duration::from_millis(50)),
            max_searches: 8,
        }
    }

    async fn digest(a: &ActorRef<RoleMsg>) -> (u64, u64) {
        call_typed(a, typed::Digest {}, Duration::from_secs(10))
            .await
            .expect("digest")
    }

    /// Polls until the two replicas' digests agree (30 s at most).
    async fn converge(a: &ActorRef<RoleMsg>, b: &ActorRef<RoleMsg>) -> (u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (da, db) = (digest(a).await, digest(b).await);
            if da == db {
                return da;
            }
            assert!(
                Instant::now() < deadline,
                "no convergence: {da:?} against {db:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_catches_up_and_repairs_by_buckets_in_pages_and_refuses_bad_bucket_requests()
    {
        const SHARD: u32 = 9_101;
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, _) = Actor::spawn(None, ShardActor, args("a", SHARD, da.path(), false))
            .await
            .unwrap();
        // 2,100 documents: 8 buckets, each of ~260 (id, version) pairs, several of the tests'
        // 2 KiB pages apiece
        let ops: Vec<WriteOp> = (0..2100)
            .map(|i| doc(&format!("d{i:05}"), 10 + i))
            .collect();
        for batch in ops.chunks(500) {
            call_typed(
                &a,
                typed::Write {
                    ops: batch.to_vec(),
                    model: model(),
                },
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        }
        let gone: Vec<String> = (0..40).map(|i| format!("d{:05}", i * 7)).collect();
        call_typed(
            &a,
            typed::Delete {
                doc_ids: gone.clone(),
                version: 5_000,
            },
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert_eq!(digest(&a).await.1, 2060);

        // the shard's own answers: every bucket's digest, the digests summing to the whole
        let buckets = ragfleet_proto::bucket_count(2060);
        assert_eq!(buckets, 8);
        let d = call_typed(
            &a,
            typed::BucketDigests { buckets },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(d.len(), 8);
        assert_eq!(
            d.iter().fold(0u64, |s, x| s.wrapping_add(*x)),
            digest(&a).await.0
        );
        // a page of whole buckets within its bytes (at least one), in the order asked
        let ask = typed::VersionsIn {
            buckets,
            wanted: vec![5, 2, 7],
            max_bytes: 1,
        };
        let (v, covered) = call_typed(&a, ask, Duration::from_secs(10)).await.unwrap();
        assert_eq!(covered, 1);
        assert!(!v.live.is_empty());
        assert!(v
            .live
            .iter()
            .chain(&v.deleted)
            .all(|(d, _)| ragfleet_proto::doc_bucket(d, buckets) == 5));
        let ask = typed::VersionsIn {
            buckets,
            wanted: vec![5, 2, 7],
            max_bytes: u32::MAX,
        };
        let (v, covered) = call_typed(&a, ask, Duration::from_secs(10)).await.unwrap();
        assert_eq!(covered, 3);
        assert_eq!(v.model, Some(model()));
        // bad bucket requests are refused, not answered or panicked on
        for (buckets, wanted) in [
            (0, vec![]),
            (ragfleet_proto::MAX_DIGEST_BUCKETS + 1, vec![]),
            (8, vec![8]),
            (2, vec![0, 1, 0]),
        ] {
            let e = call_typed(
                &a,
                typed::VersionsIn {
                    buckets,
                    wanted: wanted.clone(),
                    max_bytes: 1 << 20,
                },
                Duration::from_secs(10),
            )
            .await
            .unwrap_err();
            assert!(
                e.to_string().contains("bucket"),
                "{buckets} {wanted:?}: {e}"
            );
        }
        let e = call_typed(
            &a,
            typed::BucketDigests { buckets: 0 },
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("buckets"), "{e}");

        // an empty replica catches up from it, page after page, before it serves (no
        // anti-entropy here: the one pull of its catch-up must bring all of it)
        let (b, _) = Actor::spawn(None, ShardActor, args("b", SHARD, db.path(), false))
            .await
            .unwrap();
        let s = b.clone();
        let serving = async move {
            loop {
                let info = call_typed(&s, typed::Ping {}, Duration::from_secs(5))
                    .await
                    .unwrap();
                if info.state == ReplicaState::Serving {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), serving)
            .await
            .expect("b serving");
        assert_eq!(digest(&b).await, digest(&a).await);

        // a third replica with anti-entropy: caught up, then a writes and deletes behind its
        // back and it comes along
        let dc = tempfile::tempdir().unwrap();
        let (c, _) = Actor::spawn(None, ShardActor, args("c", SHARD, dc.path(), true))
            .await
            .unwrap();
        converge(&a, &c).await;
        call_typed(
            &a,
            typed::Write {
                ops: vec![doc("d00001", 9_000), doc("late", 9_001)],
                model: model(),
            },
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        call_typed(
            &a,
            typed::Delete {
                doc_ids: vec!["d00002".into()],
                version: 9_002,
            },
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        let (_, docs) = converge(&a, &c).await;
        assert_eq!(docs, 2060);
        let fetched = typed::fetch_all(
            &c,
            &[
                "late".to_string(),
                "d00001".into(),
                "d00002".into(),
                "d00007".into(),
            ],
            Duration::from_secs(10),
        )
        .await
        .unwrap()
        .0;
        let mut got: Vec<(String, u64)> = fetched
            .iter()
            .map(|op| match op {
                WriteOp::Upsert {
                    doc_id, version, ..
                } => (doc_id.clone(), *version),
                WriteOp::Delete { doc_id, .. } => (doc_id.clone(), 0),
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![("d00001".to_string(), 9_000), ("late".to_string(), 9_001)]
        );
        // b, without anti-entropy, still lacks them
        assert_ne!(digest(&b).await, digest(&a).await);
        for r in [a, b, c] {
            r.stop(None);
        }
    }
}
