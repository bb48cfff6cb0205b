use super::*;

fn model() -> ModelIdentity {
    ModelIdentity {
        name: "m".into(),
        weights_sha256: "ab".repeat(32),
        dim: 3,
        max_len: 256,
        pooling: "mean".into(),
        normalized: true,
    }
}

fn coverage() -> Coverage {
    Coverage {
        shards_total: 4,
        shards_answered: 3,
        left_out: vec![LeftOut {
            shard: 2,
            reason: "deadline".into(),
        }],
    }
}

fn all_requests() -> Vec<Request> {
    let chunk = ChunkRecord {
        doc_id: "d".into(),
        chunk_id: "d#0".into(),
        text: "héllo".into(),
        vector: vec![0.5, -1.0, f32::MIN_POSITIVE],
        sentences: Default::default(),
    };
    vec![
        Request::Ping,
        Request::Embed {
            texts: vec!["a".into(), "".into()],
        },
        Request::Search(SearchQuery {
            vector: vec![1.0; 3],
            text: "q".into(),
            k: 10,
            mode: SearchMode::Hybrid,
            model: Some(model()),
        }),
        Request::Write {
            ops: vec![
                WriteOp::Upsert {
                    version: 0,
                    doc_id: "d".into(),
                    chunks: vec![chunk],
                },
                WriteOp::Delete {
                    doc_id: "e".into(),
                    version: 0,
                },
            ],
            model: model(),
        },
        Request::BucketDigests { buckets: 64 },
        Request::VersionsIn {
            buckets: 64,
            wanted: vec![3, 0, 63],
            max_bytes: 1 << 20,
        },
        Request::Digest,
        Request::Fetch {
            doc_ids: vec!["a".into()],
        },
        Request::Delete {
            doc_ids: vec!["a".into(), "b".into()],
            version: 7,
        },
        Request::ChunkEmbed {
            docs: vec![Document {
                id: "1".into(),
                title: String::new(),
                text: "x".into(),
            }],
            chunk_tokens: 200,
            overlap: 20,
            sentences: true,
        },
        Request::Rerank {
            query: "q".into(),
            passages: vec!["p".into(), "p2".into()],
            known: vec![Some(0.5), None],
            model: None,
        },
        Request::Generate(GenerationRequest {
            system: String::new(),
            user: "u".into(),
            max_tokens: 5,
            sampling: Sampling {
                temperature: 0.7,
                top_p: 0.9,
                seed: 3,
                repetition_penalty: Some(1.2),
                no_repeat_ngram: Some(4),
                ..Sampling::default()
            },
            push_to: None,
        }),
        Request::StreamNext {
            stream: 7,
            wait_ms: 100,
        },
        Request::Retrieve {
            query: "q".into(),
            options: RetrieveOptions {
                k: Some(3),
                mode: Some(SearchMode::Bm25),
                rerank: Some(true),
                deadline_ms: None,
                cache: Some(false),
                hedge: None,
            },
        },
        Request::SearchAt {
            query: SearchQuery {
                vector: vec![0.5],
                text: "q".into(),
                k: 2,
                mode: SearchMode::Hybrid,
                model: None,
            },
            known_digest: Some(7),
        },
        Request::Ask {
            question: "q".into(),
            options: AskOptions::default(),
        },
        Request::Ingest {
            docs: vec![Document {
                id: "1".into(),
                title: "t".into(),
                text: "x".into(),
            }],
        },
        Request::Status,
        Request::Chaos(ChaosAction::Stall(5)),
        Request::Chaos(ChaosAction::Panic),
    ]
}

fn all_responses() -> Vec<Response> {
    let hit = Hit {
        doc_id: "d".into(),
        chunk_id: "d#0".into(),
        score: 0.25,
        similarity: Some(0.5),
        text: "t".into(),
        sentence_score: Some(0.75),
    };
    vec![
        Response::Pong(ActorInfo {
            node: "n1".into(),
            role: Role::Shard,
            shard: Some(1),
            state: ReplicaState::CatchingUp,
            docs: 3,
            chunks: 4,
            last_seq: 9,
        }),
        Response::Embeddings {
            model: model(),
            vectors: vec![vec![0.1, 0.2, 0.3]],
        },
        Response::Hits(vec![hit.clone()]),
        Response::HybridHits {
            dense: vec![hit.clone()],
            bm25: vec![],
        },
        Response::Written { seq: 42 },
        Response::Chunked {
            model: model(),
            ops: vec![WriteOp::Delete {
                doc_id: "x".into(),
                version: 0,
            }],
            failed: vec![("y".into(), "empty".into())],
        },
        Response::BucketDigests(vec![1, 0, u64::MAX]),
        Response::Versions {
            versions: ShardVersions {
                model: Some(model()),
                live: vec![("a".into(), 3)],
                deleted: vec![("b".into(), 4)],
            },
            covered: 2,
        },
        Response::Digest { digest: 9, docs: 1 },
        Response::Fetched {
            ops: vec![WriteOp::Delete {
                doc_id: "x".into(),
                version: 0,
            }],
            model: Some(model()),
            covered: 1,
        },
        Response::Scores(vec![1.0, -2.0]),
        Response::StreamStarted { stream: 1 },
        Response::Stream(StreamChunk {
            text: "to".into(),
            tokens: 1,
            done: true,
            end: Some("stop".into()),
            summary: Some(AskSummary {
                answer: "a".into(),
                sources: vec![Source {
                    doc_id: "d".into(),
                    score: 1.0,
                }],
                coverage: coverage(),
                timings_ms: Timings {
                    embed: 1.0,
                    ..Default::default()
                },
                unsourced: false,
                end_reason: "deadline".into(),
                truncated: true,
                truncated_reason: Some("deadline".into()),
                rerank: Some("skipped: deadline".into()),
                degraded: None,
                answer_mode: "generate".into(),
                fallback: Some("a reason".into()),
                grounding: Some(Grounding {
                    score: 0.7,
                    sentences: vec![SentenceSupport {
                        text: "a".into(),
                        support: 0.7,
                        weak: false,
                    }],
                }),
            }),
        }),
        Response::Retrieved(RetrieveResult {
            hits: vec![hit],
            coverage: coverage(),
            timings_ms: Timings::default(),
            rerank: Some("applied".into()),
            degraded: None,
            cache: Some("hit".into()),
            hedged: vec![1],
            coordinator: "n2".into(),
        }),
        Response::Searched {
            digest: 3,
            answer: SearchAnswer::Two(vec![], vec![]),
        },
        Response::Searched {
            digest: 4,
            answer: SearchAnswer::Unchanged,
        },
        Response::Ingested(IngestResult {
            documents: 1,
            chunks: 2,
            failed: vec![("x".into(), "bad".into())],
            timings_ms: IngestTimings {
                embed: 1.5,
                write: 0.25,
            },
        }),
        Response::Status(ClusterStatus {
            nodes: vec![NodeStatus {
                name: "n".into(),
                addr: "127.0.0.1:1".into(),
                alive: true,
            }],
            shards: vec![ShardStatus {
                id: 0,
                replicas: vec![ReplicaStatus {
                    node: "n".into(),
                    state: "serving".into(),
                    docs: 1,
                }],
            }],
            model: None,
            caches: vec![CacheStatus {
                name: "retrieval".into(),
                entries: 1,
                capacity: 2,
                hits: 3,
                misses: 4,
                stale: 5,
            }],
            hedges: HedgeStatus {
                requests: 9,
                sent: 1,
                won: 1,
                capped: 0,
            },
        }),
        Response::Ack,
        Response::Error(WireError::ModelMismatch {
            index: "a".into(),
            request: "b".into(),
        }),
        Response::Error(WireError::Frame(FrameError::BadMagic)),
    ]
}

#[test]
fn every_request_round_trips() {
    for r in all_requests() {
        let bytes = Frame::ok(r.clone()).encode();
        assert_eq!(Frame::<Request>::decode(&bytes), Frame::ok(r));
    }
}

#[test]
fn every_response_round_trips() {
    for r in all_responses() {
        let bytes = Frame::ok(r.clone()).encode();
        assert_eq!(Frame::<Response>::decode(&bytes), Frame::ok(r));
    }
}

#[test]
fn malformed_frames_are_errors_not_panics() {
    assert_eq!(
        Frame::<Request>::decode(b"").0,
        Err(FrameError::TooShort(0))
    );
    assert_eq!(
        Frame::<Request>::decode(b"XX\0\x01\0").0,
        Err(FrameError::BadMagic)
    );
    assert_eq!(
        Frame::<Request>::decode(b"RF\0\x08\0").0,
        Err(FrameError::Version { got: 8 }),
        "the version before this one"
    );
    assert_eq!(
        Frame::<Request>::decode(b"RF\0\x0a\0").0,
        Err(FrameError::Version { got: 10 })
    );
    // every truncation of every valid request is an error or (for a prefix that happens to be
    // a valid shorter value) a value, never a panic
    for r in all_requests() {
        let bytes = Frame::ok(r).encode();
        for cut in 0..bytes.len() {
            let _ = Frame::<Request>::decode(&bytes[..cut]);
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            Frame::<Request>::decode(&longer).0,
            Err(FrameError::Body(_))
        ));
    }
    // random garbage behind a valid header
    let mut state = 0x9e3779b97f4a7c15u64;
    for len in 0..2000usize {
        let mut bytes = vec![b'R', b'F', 0, 1];
        for _ in 0..(len % 97) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.push(state as u8);
        }
        let _ = Frame::<Request>::decode(&bytes);
        let _ = Frame::<Response>::decode(&bytes);
    }
    // a huge declared length must not allocate or panic
    let bytes = [b'R', b'F', 0, 1, 1, 0xff, 0xff, 0xff, 0xff, 0x0f];
    assert!(Frame::<Request>::decode(&bytes).0.is_err());
}

#[test]
fn shard_digest_ignores_order_and_sees_every_version_and_deletion() {
    let a = ShardVersions {
        model: None,
        live: vec![("a".into(), 1), ("b".into(), 2)],
        deleted: vec![("c".into(), 3)],
    };
    let mut b = a.clone();
    b.live.reverse();
    assert_eq!(a.digest(), b.digest());
    b.live[0].1 = 5;
    assert_ne!(a.digest(), b.digest(), "a newer version changes the digest");
    let mut c = a.clone();
    let moved = c.deleted.pop().unwrap();
    c.live.push(moved);
    assert_ne!(a.digest(), c.digest(), "live and deleted differ");
    // the id/version boundary is unambiguous
    assert_ne!(entry_hash("a1", 2, true), entry_hash("a", 12, true));
    assert_eq!(ShardVersions::default().digest(), 0);
}

#[test]
fn document_buckets_are_stable_spread_and_sized_to_the_shard() {
    // the same id, whatever its version, is always in the same bucket, within range
    for buckets in [1, 2, 7, 256, MAX_DIGEST_BUCKETS] {
        for i in 0..200 {
            let id = format!("doc-{i}");
            let b = doc_bucket(&id, buckets);
            assert!(b < buckets, "{id} -> {b} of {buckets}");
            assert_eq!(b, doc_bucket(&id, buckets));
        }
    }
    assert_eq!(doc_bucket("x", 0), 0, "no buckets counts as one");
    // for a power of two, the bucket of the most buckets modulo the count (what a shard folds)
    for i in 0..500 {
        let id = format!("id-{i}");
        let fine = doc_bucket(&id, MAX_DIGEST_BUCKETS);
        for b in [1, 2, 64, 4096] {
            assert_eq!(doc_bucket(&id, b), fine % b, "{id} in {b}");
        }
    }
    // sequential ids spread over the buckets: each within a fifth of its share
    for (name, buckets, n) in [("d", 64u32, 64_000), ("doc-", 16, 3_200)] {
        let mut counts = vec![0usize; buckets as usize];
        for i in 0..n {
            counts[doc_bucket(&format!("{name}{i:05}"), buckets) as usize] += 1;
        }
        let share = n / buckets as usize;
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(
            *lo > share * 4 / 5 && *hi < share * 6 / 5,
            "{name}: bucket sizes {lo}..{hi} of {share} each"
        );
    }
    // ~256 documents a bucket, a power of two, capped
    assert_eq!(bucket_count(0), 1);
    assert_eq!(bucket_count(1_000), 4);
    assert_eq!(bucket_count(1_000_000), 4096);
    assert_eq!(bucket_count(u64::MAX), MAX_DIGEST_BUCKETS);
    for docs in [0, 5, 300, 70_000, 10_000_000] {
        assert!(bucket_count(docs).is_power_of_two());
    }
}

#[test]
fn document_ids_longer_than_the_limit_are_refused() {
    let doc = |id: String| Document {
        id,
        title: String::new(),
        text: "x".into(),
    };
    assert!(doc("a".repeat(MAX_DOC_ID_BYTES)).check().is_ok());
    let e = doc("a".repeat(MAX_DOC_ID_BYTES + 1)).check().unwrap_err();
    assert!(e.contains("document id of 513 bytes"), "{e}");
}

#[test]
fn quantised_sentence_vectors_score_within_a_hundredth_of_the_exact_cosine() {
    let unit = |v: Vec<f32>| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    // deterministic pseudo-random unit vectors of 384 dimensions
    let mut x = 12345u64;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    let sentences: Vec<Vec<f32>> = (0..6)
        .map(|_| unit((0..384).map(|_| next()).collect()))
        .collect();
    let q = unit(sentences[2].iter().map(|s| s + 0.05 * next()).collect());
    let exact = sentences
        .iter()
        .map(|s| s.iter().zip(&q).map(|(a, b)| a * b).sum::<f32>())
        .fold(f32::MIN, f32::max);
    let sv = SentenceVectors::quantize(&sentences);
    assert_eq!(sv.len(), 6);
    assert_eq!(sv.codes.len(), 6 * 384);
    let got = sv.best_dot(&q).unwrap();
    assert!((got - exact).abs() < 0.01, "{got} vs {exact}");
    // nothing stored, no query, or another dimension: no score
    assert_eq!(SentenceVectors::default().best_dot(&q), None);
    assert_eq!(sv.best_dot(&[]), None);
    assert_eq!(sv.best_dot(&q[..100]), None);
    // vectors of unequal length are not stored
    assert!(SentenceVectors::quantize(&[vec![1.0, 0.0], vec![1.0]]).is_empty());
}
