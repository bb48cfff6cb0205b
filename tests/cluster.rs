//! Multi-process cluster tests: real node processes on free loopback ports, real models, real
//! TCP between them. Each test starts its own cluster.
mod common;

use std::time::{Duration, Instant};

use common::*;

fn ingest(c: &Cluster) {
    let p = c.corpus_path();
    let r = c.json(&["ingest", "--json", p.to_str().unwrap()]);
    assert_eq!(r["documents"], 16, "{r}");
    // where the time went, and the rates
    for k in ["embed", "write"] {
        assert!(r["stages_ms"][k].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(r["chunks_per_s"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn three_nodes_answer_with_full_coverage_and_survive_a_kill_9() {
    let _g = serial();
    let mut c = Cluster::three("");
    ingest(&c);
    let r = c.retrieve("what makes lava flow out of a mountain");
    assert_eq!(top_doc(&r), "volcano", "{r}");
    assert_eq!(answered(&r), 4);
    assert!(r["timings_ms"]["total"].as_f64().unwrap() > 0.0);
    for k in ["embed", "search", "rerank", "total"] {
        assert!(
            r["timings_ms"][k].is_number(),
            "timings_ms.{k} missing: {r}"
        );
    }
    // replica document counts come with the heartbeats: poll until they show the ingest
    wait_for(
        "status to count 16 documents",
        Duration::from_secs(5),
        || {
            let s = c.status()?;
            let docs: u64 = s["shards"]
                .as_array()?
                .iter()
                .map(|sh| sh["replicas"][0]["docs"].as_u64().unwrap_or(0))
                .sum();
            (docs == 16).then_some(())
        },
    );

    // kill -9 the shard-only node: replication 2 keeps every shard answering
    c.kill9("n3");
    for q in ["how do bees make honey", "why are there tides"] {
        let r = c.retrieve(q);
        assert_eq!(answered(&r), 4, "{r}");
    }
    wait_for("n3 reported dead", Duration::from_secs(5), || {
        (c.alive("n3") == Some(false)).then_some(())
    });

    // it comes back and catches up
    c.restart("n3");
    wait_for("n3 alive again", Duration::from_secs(30), || {
        (c.alive("n3") == Some(true)).then_some(())
    });
    c.wait_all_alive();
}

#[test]
fn both_replicas_of_a_shard_down_gives_partial_coverage_naming_it() {
    let _g = serial();
    let mut c = Cluster::three("");
    ingest(&c);
    // shard 1 lives on n2 and n3; n1 keeps the coordinator, an embedder and shards 0, 2, 3
    c.kill9("n2");
    c.kill9("n3");
    let r = wait_for("shard 1 reported left out", Duration::from_secs(10), || {
        let r = c.try_json(&["retrieve", "--json", "glaciers carving valleys"])?;
        (answered(&r) == 3).then_some(r)
    });
    let left = r["coverage"]["left_out"].as_array().unwrap();
    assert_eq!(left.len(), 1, "{r}");
    assert_eq!(left[0]["shard"], 1);
    assert_eq!(r["coverage"]["shards_total"], 4);
    assert!(
        left[0]["reason"]
            .as_str()
            .unwrap()
            .contains("no_live_replica")
            || left[0]["reason"] == "deadline",
        "{r}"
    );
}

#[test]
fn a_frozen_node_is_failed_over_within_the_shard_deadline_and_taken_back() {
    let _g = serial();
    let c = Cluster::three("");
    ingest(&c);
    c.signal("n3", libc::SIGSTOP);
    // the very next queries: the frozen replicas time out inside the shard deadline and the
    // other replica answers; later ones skip the suspected node entirely
    for q in [
        "espresso brewing pressure",
        "castling in chess",
        "how vaccines work",
    ] {
        let t = Instant::now();
        let r = c.retrieve(q);
        let took = t.elapsed();
        assert_eq!(answered(&r), 4, "{r}");
        // 800 ms shard deadline + embedding + process start of the CLI
        assert!(took < Duration::from_millis(800 + 2500), "took {took:?}");
    }
    wait_for("n3 suspected", Duration::from_secs(5), || {
        (c.alive("n3") == Some(false)).then_some(())
    });
    c.signal("n3", libc::SIGCONT);
    wait_for("n3 taken back", Duration::from_secs(10), || {
        (c.alive("n3") == Some(true)).then_some(())
    });
}

#[test]
fn client_fails_over_to_another_coordinator_when_its_node_dies() {
    let _g = serial();
    let mut c = Cluster::three("");
    ingest(&c);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = std::sync::Arc::new(ragfleet_config::ClusterConfig::load(&c.config).unwrap());
        let client = ragfleet_runtime::Client::connect(cfg, Duration::from_secs(10))
            .await
            .unwrap();
        let r = client
            .retrieve("sourdough yeast", Default::default())
            .await
            .unwrap();
        assert_eq!(r.hits[0].doc_id, "sourdough");
        let node = client
            .coordinator_node()
            .await
            .expect("a coordinator is in use");
        c.kill9(&node);
        for q in ["sourdough yeast", "compiler code generation"] {
            let r = client
                .retrieve(q, Default::default())
                .await
                .expect("fails over");
            assert!(!r.hits.is_empty());
        }
        let now = client.coordinator_node().await.unwrap();
        assert_ne!(now, node);
    });
}

#[test]
fn supervision_restarts_a_panicking_actor_and_escalates_a_crash_loop() {
    let _g = serial();
    let c = Cluster::three("[supervision]\nmax_restarts = 2\nwithin_secs = 30\n");
    ingest(&c);
    let (ok, out, err) = c.cli(&["chaos", "--group", "embedder", "--node", "n2"]);
    assert!(ok, "{out}{err}");
    wait_for("embedder on n2 restarted", Duration::from_secs(10), || {
        c.log("n2")
            .contains("child failed: restarting")
            .then_some(())
    });
    assert_eq!(top_doc(&c.retrieve("honey bees")), "bees");
    // a crash loop: more panics than the intensity allows within the window escalates to the
    // root supervisor, which restarts the whole role
    for _ in 0..3 {
        wait_for(
            "an embedder on n2 to panic",
            Duration::from_secs(10),
            || {
                c.cli(&["chaos", "--group", "embedder", "--node", "n2"])
                    .0
                    .then_some(())
            },
        );
    }
    wait_for("escalation", Duration::from_secs(10), || {
        c.log("n2")
            .contains("restart intensity exceeded")
            .then_some(())
    });
    wait_for("embedder role back on n2", Duration::from_secs(20), || {
        c.cli(&[
            "chaos", "--group", "embedder", "--node", "n2", "--action", "stall:1",
        ])
        .0
        .then_some(())
    });
    assert_eq!(top_doc(&c.retrieve("honey bees")), "bees");
}

#[test]
fn bad_input_gets_clear_errors_and_the_nodes_keep_serving() {
    let _g = serial();
    let mut c = Cluster::three("");
    ingest(&c);
    // empty and huge queries
    let (ok, _, err) = c.cli(&["retrieve", "--json", "   "]);
    assert!(!ok && err.contains("empty"), "{err}");
    let huge = "word ".repeat(1 << 18); // 1.3 MB, through standard input
    let (ok, _, err) = c.cli_stdin(&["retrieve", "--json", "-"], &huge);
    assert!(!ok && err.contains("exceeds the limit"), "{err}");
    // garbage on a node's TCP port
    use std::io::Write;
    let addr = std::fs::read_to_string(&c.config).unwrap();
    let port = addr
        .split("127.0.0.1:")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    for garbage in [
        vec![0xffu8; 64],
        b"\x00\x00\x00\x10hello, not a frame".to_vec(),
        vec![0, 0, 0, 0],
    ] {
        let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        let _ = s.write_all(&garbage);
    }
    // a wrong cookie is refused
    let bad = c.dir.path().join("bad-cookie.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&c.config)
            .unwrap()
            .replace("test-cookie-123", "wrong-cookie-456"),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["status", "--json", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cookie"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // a malformed cluster.toml names the field
    let broken = c.dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&c.config)
            .unwrap()
            .replace("replication = 2", "replication = 9"),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["status", "--config"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("index.replication"));
    // still serving
    assert_eq!(top_doc(&c.retrieve("suspension bridge cables")), "bridges");
    c.wait_all_alive();
}

#[test]
fn a_malformed_wire_frame_is_answered_with_an_error_not_a_panic() {
    let _g = serial();
    let c = Cluster::three("");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = std::sync::Arc::new(ragfleet_config::ClusterConfig::load(&c.config).unwrap());
        let client = ragfleet_runtime::Client::connect(cfg, Duration::from_secs(10))
            .await
            .unwrap();
        let coord = client.members(ragfleet_runtime::groups::COORDINATORS)[0].get_cell();
        // the same variant name as RoleMsg::Call, but raw bytes as the payload
        let evil: ractor::ActorRef<EvilMsg> = coord.into();
        let reply = evil
            .call(
                |port| EvilMsg::Call(vec![1, 2, 3, 4, 5], port),
                Some(Duration::from_secs(5)),
            )
            .await
            .expect("sent");
        let ractor::rpc::CallResult::Success(bytes) = reply else {
            panic!("no reply: {reply:?}")
        };
        // the answer is an envelope (request id, then the frame)
        let envelope = <ragfleet_runtime::Envelope<ragfleet_proto::Response> as ractor::BytesConvertable>::from_bytes(bytes);
        match envelope.0 .0 {
            Ok(ragfleet_proto::Response::Error(ragfleet_proto::WireError::Frame(_))) => {}
            other => panic!("expected a frame error, got {other:?}"),
        }
        let r = client.status().await.expect("still serving");
        assert!(r.nodes.iter().all(|n| n.alive));
    });
}

#[derive(ractor_cluster::RactorClusterMessage)]
enum EvilMsg {
    #[rpc]
    Call(Vec<u8>, ractor::RpcReplyPort<Vec<u8>>),
}

#[test]
fn up_runs_every_node_as_a_child_and_stops_them_on_sigterm() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from(
        "version = 1\nname = \"up\"\ncookie = \"test-cookie-123\"\ndata_dir = \"data\"\n",
    );
    for i in 1..=3 {
        text.push_str(&format!("[[node]]\nname = \"n{i}\"\naddr = \"127.0.0.1:{}\"\nroles = [\"coordinator\", \"embedder\", \"shard\"]\n", free_port()));
    }
    text.push_str("[index]\nshards = 2\nreplication = 2\n");
    let cfg = dir.path().join("cluster.toml");
    std::fs::write(&cfg, text).unwrap();
    let logs = dir.path().join("logs");
    let mut up = std::process::Command::new(bin())
        .args(["up", "--config"])
        .arg(&cfg)
        .arg("--models")
        .arg(models_dir())
        .arg("--logs")
        .arg(&logs)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = || {
        let out = std::process::Command::new(bin())
            .args(["status", "--json", "--config"])
            .arg(&cfg)
            .output()
            .ok()?;
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()
    };
    wait_for(
        "three nodes alive under `up`",
        Duration::from_secs(60),
        || {
            let s = status()?;
            (s["nodes"]
                .as_array()?
                .iter()
                .filter(|n| n["alive"] == true)
                .count()
                == 3)
                .then_some(())
        },
    );
    for i in 1..=3 {
        assert!(logs.join(format!("n{i}.log")).is_file());
    }
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    let code = wait_for("`up` to exit", Duration::from_secs(20), || {
        up.try_wait().unwrap()
    });
    assert!(code.success() || code.code().is_some());
    // every node is gone: nothing answers any more
    let out = std::process::Command::new(bin())
        .args(["status", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "nodes still answering after `up` stopped"
    );
}

#[test]
fn rerank_stage_reorders_candidates_by_cross_encoder_scores() {
    let _g = serial();
    // a models dir with a cross-encoder: the tiny fixture model (random weights, real layout)
    let models = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(models_dir().join("minilm"), models.path().join("minilm")).unwrap();
    std::os::unix::fs::symlink(
        root().join("tests/fixtures/tiny-cross-encoder"),
        models.path().join("reranker"),
    )
    .unwrap();
    let c = Cluster::start_with_models(
        &[
            &["coordinator", "embedder", "shard", "reranker"],
            &["shard"],
        ],
        "query.rerank_fusion = \"replace\"",
        models.path().to_path_buf(),
    );
    let p = c.corpus_path();
    c.json(&["ingest", "--json", p.to_str().unwrap()]);
    let q = "how do plants make sugar";
    let plain = c.json(&["retrieve", "--json", "--k", "5", "--no-rerank", q]);
    // a reranker node makes reranking the default
    let reranked = c.json(&["retrieve", "--json", "--k", "5", q]);
    assert!(
        reranked["timings_ms"]["rerank"].as_f64().unwrap() > 0.0,
        "{reranked}"
    );
    assert_eq!(plain["timings_ms"]["rerank"].as_f64().unwrap(), 0.0);
    // the reranked scores are the cross-encoder's logits for (query, passage)
    let hits = reranked["hits"].as_array().unwrap();
    let mut args: Vec<String> = vec!["rerank".into(), "--json".into(), "--model-dir".into()];
    args.push(
        root()
            .join("tests/fixtures/tiny-cross-encoder")
            .display()
            .to_string(),
    );
    args.push(q.into());
    args.extend(hits.iter().map(|h| h["text"].as_str().unwrap().to_string()));
    let out = std::process::Command::new(bin())
        .args(&args)
        .output()
        .unwrap();
    let scores: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (h, s) in hits.iter().zip(scores["scores"].as_array().unwrap()) {
        assert!(
            (h["score"].as_f64().unwrap() - s.as_f64().unwrap()).abs() < 1e-4,
            "{h} vs {s}"
        );
    }
    let sc: Vec<f64> = hits.iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert!(
        sc.windows(2).all(|w| w[0] >= w[1]),
        "not sorted by reranker score: {sc:?}"
    );
}

#[test]
fn default_sentence_reranker_fuses_best_sentence_with_similarity() {
    let _g = serial();
    // no cross-encoder in the models dir: the reranker role runs the sentence reranker on the
    // embedder, fused with equal weight with each hit's query similarity (the default after a
    // dense or an RRF hybrid first stage; after a convex hybrid it is weighed against the
    // fused score instead, unit-tested in `ranking`)
    let c = Cluster::start(
        &[
            &["coordinator", "embedder", "shard", "reranker"],
            &["shard"],
        ],
        "query.hybrid_fusion = \"rrf\"",
    );
    let p = c.corpus_path();
    c.json(&["ingest", "--json", p.to_str().unwrap()]);
    let q = "how do plants make sugar";
    // the corpus is of one-sentence passages: after a dense first stage the reranker has
    // nothing to add to their similarity and abstains, keeping the dense order
    let dense = c.json(&[
        "retrieve", "--json", "--k", "5", "--mode", "dense", "--rerank", q,
    ]);
    let outcome = dense["rerank"].as_str().unwrap();
    assert!(
        outcome.starts_with("abstained: the best sentence of"),
        "{dense}"
    );
    for h in dense["hits"].as_array().unwrap() {
        assert_eq!(h["score"], h["similarity"], "{h}");
    }
    // after a hybrid first stage it reranks: its similarity term repairs the fusion
    let reranked = c.json(&[
        "retrieve", "--json", "--k", "5", "--mode", "hybrid", "--rerank", q,
    ]);
    assert_eq!(reranked["rerank"], "applied", "{reranked}");
    assert!(
        reranked["timings_ms"]["rerank"].as_f64().unwrap() > 0.0,
        "{reranked}"
    );
    let hits = reranked["hits"].as_array().unwrap();
    assert!(hits.len() >= 2, "{reranked}");
    let mut args: Vec<String> = vec!["rerank".into(), "--json".into(), "--models".into()];
    args.push(models_dir().display().to_string());
    args.push(q.into());
    args.extend(hits.iter().map(|h| h["text"].as_str().unwrap().to_string()));
    let out = std::process::Command::new(bin())
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scores: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (h, s) in hits.iter().zip(scores["scores"].as_array().unwrap()) {
        let sim = h["similarity"]
            .as_f64()
            .expect("hits carry their similarity when the query has a vector");
        let best_sentence = s.as_f64().unwrap();
        // a cosine of unit vectors
        assert!(best_sentence > -1.0 && best_sentence <= 1.0001, "{s}");
        // the shard scored the hit's sentences from the vectors stored at ingest (int8):
        // within a hundredth of embedding them now, and that is the score the fusion used
        let stored = h["sentence_score"]
            .as_f64()
            .expect("ingest stored the sentences' vectors (a reranker node: on by default)");
        assert!((stored - best_sentence).abs() < 0.01, "{h} vs {s}");
        let want = 0.5 * stored + 0.5 * sim;
        assert!(
            (h["score"].as_f64().unwrap() - want).abs() < 1e-4,
            "{h} vs {want}"
        );
    }
    let sc: Vec<f64> = hits.iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert!(sc.windows(2).all(|w| w[0] >= w[1]), "not sorted: {sc:?}");
    // the photosynthesis passage is first
    assert!(
        hits[0]["text"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("photosynth"),
        "{}",
        hits[0]
    );
}
