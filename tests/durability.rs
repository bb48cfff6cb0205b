//! Durability and replication across real node processes: kill -9 in the middle of an ingest
//! loses no acknowledged document, and a replica that was down catches up before it serves.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ragfleet_proto::{Document, RetrieveOptions, SearchMode};

fn doc(i: usize) -> Document {
    // a unique token per document makes each one findable by BM25
    Document {
        id: format!("doc-{i}"),
        title: String::new(),
        text: format!("Record zq{i}x describes item number {i} of the ledger."),
    }
}

fn bm25(k: u32) -> RetrieveOptions {
    RetrieveOptions {
        k: Some(k),
        mode: Some(SearchMode::Bm25),
        rerank: Some(false),
        deadline_ms: None,
        ..RetrieveOptions::default()
    }
}

#[test]
fn kill_9_mid_ingest_loses_no_acknowledged_document_and_the_replica_catches_up() {
    let _g = serial();
    let mut c = Cluster::three("");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = Arc::new(ragfleet_config::ClusterConfig::load(&c.config).unwrap());
    let client = rt
        .block_on(ragfleet_runtime::Client::connect(
            cfg.clone(),
            Duration::from_secs(10),
        ))
        .unwrap();
    let mut acked: Vec<String> = Vec::new();
    let mut failed = 0;
    for batch in 0..12 {
        let docs: Vec<Document> = (batch * 10..batch * 10 + 10).map(doc).collect();
        let ids: Vec<String> = docs.iter().map(|d| d.id.clone()).collect();
        if batch == 4 {
            // n3 dies between acknowledged writes, mid-ingest
            c.kill9("n3");
        }
        match rt.block_on(client.ingest(docs)) {
            Ok(r) => {
                let bad: Vec<&String> = r.failed.iter().map(|f| &f.0).collect();
                failed += bad.len();
                acked.extend(ids.into_iter().filter(|i| !bad.contains(&i)));
            }
            Err(_) => failed += 10,
        }
        if batch == 8 {
            c.restart("n3");
        }
    }
    assert!(
        acked.len() >= 100,
        "only {} acknowledged, {failed} failed",
        acked.len()
    );
    // every replica serving again (n3 recovered its log and caught up from its peers)
    c.wait_all_alive();
    // replicas agree (counts come with heartbeats, and with write_quorum 1 the second replica
    // may still be applying the last acknowledged batch: poll, with a deadline)
    let mut last = String::new();
    let agreed = (0..200).any(|_| {
        let s = c.status().unwrap();
        let disagree = s["shards"].as_array().unwrap().iter().find(|sh| {
            let counts: Vec<u64> = sh["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["docs"].as_u64().unwrap())
                .collect();
            !counts.windows(2).all(|w| w[0] == w[1])
        });
        match disagree {
            None => true,
            Some(sh) => {
                last = sh.to_string();
                std::thread::sleep(Duration::from_millis(100));
                false
            }
        }
    });
    assert!(agreed, "replicas disagree after catch-up (20 s): {last}");
    // every acknowledged document is found, whichever replica answers
    for round in 0..2 {
        for id in &acked {
            let n: usize = id.trim_start_matches("doc-").parse().unwrap();
            let r = rt
                .block_on(client.retrieve(&format!("zq{n}x"), bm25(3)))
                .unwrap();
            assert_eq!(r.coverage.shards_answered, 4);
            assert_eq!(
                r.hits.first().map(|h| h.doc_id.as_str()),
                Some(id.as_str()),
                "round {round}: lost {id}"
            );
        }
    }
    // and after kill -9 of everything and a restart, still all there (recovery from disk)
    for n in ["n1", "n2", "n3"] {
        c.kill9(n);
    }
    for n in ["n1", "n2", "n3"] {
        c.restart(n);
    }
    c.wait_all_alive();
    let client = rt
        .block_on(ragfleet_runtime::Client::connect(
            cfg,
            Duration::from_secs(10),
        ))
        .unwrap();
    for id in &acked {
        let n: usize = id.trim_start_matches("doc-").parse().unwrap();
        let r = rt
            .block_on(client.retrieve(&format!("zq{n}x"), bm25(3)))
            .unwrap();
        assert_eq!(
            r.hits.first().map(|h| h.doc_id.as_str()),
            Some(id.as_str()),
            "lost {id} after a full restart"
        );
    }
}

/// A client of `c`, after ingesting documents 0..20.
fn connect_and_ingest_20(
    c: &Cluster,
) -> (
    tokio::runtime::Runtime,
    Arc<ragfleet_config::ClusterConfig>,
    ragfleet_runtime::Client,
) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = Arc::new(ragfleet_config::ClusterConfig::load(&c.config).unwrap());
    let client = rt
        .block_on(ragfleet_runtime::Client::connect(
            cfg.clone(),
            Duration::from_secs(10),
        ))
        .unwrap();
    let r = rt
        .block_on(client.ingest((0..20).map(doc).collect()))
        .unwrap();
    assert_eq!(r.documents, 20);
    (rt, cfg, client)
}

#[test]
fn a_replica_that_was_down_catches_up_replaced_new_and_deleted_documents() {
    use ragfleet_proto::{Request, Response, SearchQuery};
    use ragfleet_runtime::groups;
    let _g = serial();
    let mut c = Cluster::three("");
    let (rt, cfg, client) = connect_and_ingest_20(&c);
    // documents whose shard has a replica on n2
    let placement = cfg.placement();
    let on_n2 = |i: &usize| {
        placement[cfg.shard_of(&format!("doc-{i}")) as usize].contains(&"n2".to_string())
    };
    let replaced = (0..20).find(on_n2).unwrap();
    let deleted = (0..20).filter(on_n2).nth(1).unwrap();
    let added = (100..200).find(on_n2).unwrap();
    c.kill9("n2");
    let mut d = doc(replaced);
    d.text = format!("Record zq{replaced}x was rewritten: now about penguins.");
    let r = rt.block_on(client.ingest(vec![d, doc(added)])).unwrap();
    assert_eq!(r.documents, 2, "{r:?}");
    let r = rt
        .block_on(client.delete(vec![format!("doc-{deleted}")]))
        .unwrap();
    assert_eq!(r.documents, 1, "{r:?}");
    let shard = cfg.shard_of(&format!("doc-{deleted}"));
    c.restart("n2");
    c.wait_all_alive();
    // ask n2's replicas directly
    let search = |shard: u32, token: String| -> Vec<ragfleet_proto::Hit> {
        wait_for(
            "n2's replica visible to the client",
            Duration::from_secs(10),
            || {
                rt.block_on(async {
                    for m in client.members(&groups::shard(shard)) {
                        if let Ok(Response::Pong(info)) =
                            ragfleet_runtime::call::call(&m, Request::Ping, Duration::from_secs(2))
                                .await
                        {
                            if info.node == "n2" {
                                let q = SearchQuery {
                                    vector: vec![],
                                    text: token.clone(),
                                    k: 3,
                                    mode: SearchMode::Bm25,
                                    model: None,
                                };
                                match ragfleet_runtime::call::call(
                                    &m,
                                    Request::Search(q),
                                    Duration::from_secs(5),
                                )
                                .await
                                {
                                    Ok(Response::Hits(h)) => return Some(h),
                                    other => panic!("{other:?}"),
                                }
                            }
                        }
                    }
                    None
                })
            },
        )
    };
    let h = search(
        cfg.shard_of(&format!("doc-{replaced}")),
        format!("zq{replaced}x"),
    );
    assert!(
        h[0].text.contains("penguins"),
        "n2 serves a stale copy: {h:?}"
    );
    let h = search(cfg.shard_of(&format!("doc-{added}")), format!("zq{added}x"));
    assert_eq!(
        h[0].doc_id,
        format!("doc-{added}"),
        "n2 missed a new document"
    );
    let h = search(shard, format!("zq{deleted}x"));
    assert!(
        h.iter().all(|x| x.doc_id != format!("doc-{deleted}")),
        "n2 still serves a deleted document"
    );
}

/// The replica of `shard` on `node`, asked through the client's view of the cluster.
fn replica_on(
    rt: &tokio::runtime::Runtime,
    client: &ragfleet_runtime::Client,
    shard: u32,
    node: &str,
) -> Option<ractor::ActorRef<ragfleet_runtime::RoleMsg>> {
    use ragfleet_proto::{Request, Response};
    use ragfleet_runtime::groups;
    rt.block_on(async {
        for m in client.members(&groups::shard(shard)) {
            if let Ok(Response::Pong(info)) =
                ragfleet_runtime::call::call(&m, Request::Ping, Duration::from_secs(2)).await
            {
                if info.node == node {
                    return Some(m);
                }
            }
        }
        None
    })
}

/// BM25 search of one replica.
fn bm25_on(
    rt: &tokio::runtime::Runtime,
    replica: &ractor::ActorRef<ragfleet_runtime::RoleMsg>,
    text: &str,
) -> Vec<ragfleet_proto::Hit> {
    use ragfleet_proto::{Request, Response, SearchQuery};
    let q = SearchQuery {
        vector: vec![],
        text: text.into(),
        k: 5,
        mode: SearchMode::Bm25,
        model: None,
    };
    match rt.block_on(ragfleet_runtime::call::call(
        replica,
        Request::Search(q),
        Duration::from_secs(5),
    )) {
        Ok(Response::Hits(h)) => h,
        other => panic!("{other:?}"),
    }
}

#[test]
fn anti_entropy_repairs_a_live_replica_that_missed_a_write_and_a_delete() {
    use ragfleet_proto::{next_write_version, ChunkRecord, Request, Response, WriteOp};
    let _g = serial();
    let c = Cluster::three("index.anti_entropy_ms = 300");
    let (rt, cfg, client) = connect_and_ingest_20(&c);
    // a shard with a replica on n2, and a document of it
    let placement = cfg.placement();
    let victim = (0..20)
        .find(|i| placement[cfg.shard_of(&format!("doc-{i}")) as usize].contains(&"n2".to_string()))
        .unwrap();
    let shard = cfg.shard_of(&format!("doc-{victim}"));
    let other = placement[shard as usize]
        .iter()
        .find(|n| *n != "n2")
        .unwrap()
        .clone();
    let on_n2 = wait_for("n2's replica", Duration::from_secs(10), || {
        replica_on(&rt, &client, shard, "n2")
    });
    let on_other = wait_for("the other replica", Duration::from_secs(10), || {
        replica_on(&rt, &client, shard, &other)
    });
    // a write and a delete that reach only the other replica (as if n2 had dropped them),
    // while both replicas stay up and serving
    let (model, vector) = match rt.block_on(ragfleet_runtime::call::call(
        &on_other,
        Request::Fetch {
            doc_ids: vec![format!("doc-{victim}")],
        },
        Duration::from_secs(5),
    )) {
        Ok(Response::Fetched {
            ops,
            model: Some(model),
            ..
        }) => match &ops[0] {
            WriteOp::Upsert { chunks, .. } => (model, chunks[0].vector.clone()),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    let upsert = WriteOp::Upsert {
        doc_id: "ae-1".into(),
        version: next_write_version(),
        chunks: vec![ChunkRecord {
            doc_id: "ae-1".into(),
            chunk_id: "ae-1#0".into(),
            text: "Record zqaex was written to one replica only.".into(),
            vector,
            sentences: Default::default(),
        }],
    };
    for req in [
        Request::Write {
            ops: vec![upsert],
            model,
        },
        Request::Delete {
            doc_ids: vec![format!("doc-{victim}")],
            version: next_write_version(),
        },
    ] {
        match rt.block_on(ragfleet_runtime::call::call(
            &on_other,
            req,
            Duration::from_secs(10),
        )) {
            Ok(Response::Written { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(
        bm25_on(&rt, &on_n2, "zqaex").is_empty(),
        "n2 got the write directly"
    );
    // anti-entropy brings both to n2
    wait_for(
        "n2 to pull the write and the delete",
        Duration::from_secs(20),
        || {
            let added = bm25_on(&rt, &on_n2, "zqaex")
                .iter()
                .any(|h| h.doc_id == "ae-1");
            let gone = bm25_on(&rt, &on_n2, &format!("zq{victim}x"))
                .iter()
                .all(|h| h.doc_id != format!("doc-{victim}"));
            (added && gone).then_some(())
        },
    );
    // and the two replicas now agree exactly
    let digest = |r: &ractor::ActorRef<ragfleet_runtime::RoleMsg>| match rt.block_on(
        ragfleet_runtime::call::call(r, Request::Digest, Duration::from_secs(5)),
    ) {
        Ok(Response::Digest { digest, .. }) => digest,
        other => panic!("{other:?}"),
    };
    wait_for("equal digests", Duration::from_secs(10), || {
        (digest(&on_n2) == digest(&on_other)).then_some(())
    });
    assert!(
        c.log("n2").contains("anti-entropy pulled"),
        "{}",
        c.log("n2")
    );
}
