//! The coordinator's logic without processes: replica choice, failover decisions, coverage
//! accounting, ingest validation, context assembly; and failover across in-process replicas
//! (plain ractor actors standing in for shard replicas).
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ragfleet_client::{groups, Envelope, RoleMsg};
use ragfleet_config::ClusterConfig;
use ragfleet_proto::{
    Document, Hit, Request, Response, RetrieveOptions, Role, SearchAnswer, SearchMode, SearchQuery,
    ShardHits, WireError,
};

use super::ingest::{quorum_met, split_by_size, validate_documents};
use super::prompt::{assemble_context, passage_budget};
use super::replicas::{on_failure, rotate, Budget, Failed, OnFailure};
use super::retrieve::{account, validate_options, validate_text};
use super::{CoordinatorArgs, Ctx};
use crate::call::{common, info, reply, CallError};
use crate::health::Health;

fn hit(doc: &str, text: &str, score: f32) -> Hit {
    Hit {
        doc_id: doc.into(),
        chunk_id: format!("{doc}#0"),
        score,
        similarity: Some(score),
        text: text.into(),
        sentence_score: None,
    }
}

#[test]
fn replicas_rotate_round_robin() {
    let mut v = vec!["a", "b", "c"];
    rotate(&mut v, 1);
    assert_eq!(v, ["b", "c", "a"]);
    let mut v = vec!["a", "b", "c"];
    rotate(&mut v, 3);
    assert_eq!(v, ["a", "b", "c"]);
    let mut empty: Vec<&str> = Vec::new();
    rotate(&mut empty, 7);
    // consecutive positions start at every replica in turn
    let firsts: Vec<&str> = (0..3)
        .map(|n| {
            let mut v = vec!["a", "b", "c"];
            rotate(&mut v, n);
            v[0]
        })
        .collect();
    assert_eq!(firsts, ["a", "b", "c"]);
}

#[test]
fn failover_decisions() {
    // the request itself is wrong: no other replica would do better
    for w in [
        WireError::BadRequest("x".into()),
        WireError::ModelMismatch {
            index: "a".into(),
            request: "b".into(),
        },
    ] {
        assert_eq!(
            on_failure(&CallError::Remote(w.clone())),
            OnFailure::Stop(w)
        );
    }
    // busy: next replica, not suspected
    assert_eq!(
        on_failure(&CallError::Remote(WireError::Overloaded("full".into()))),
        OnFailure::Next {
            suspect: false,
            reason: Some("overloaded".into())
        }
    );
    // slow: suspected, reason deadline
    assert_eq!(
        on_failure(&CallError::Timeout),
        OnFailure::Next {
            suspect: true,
            reason: Some("deadline".into())
        }
    );
    // gone: suspected, keeps the reason reported so far
    assert_eq!(
        on_failure(&CallError::Unreachable("closed".into())),
        OnFailure::Next {
            suspect: true,
            reason: None
        }
    );
    assert!(matches!(
        on_failure(&CallError::Remote(WireError::Internal("disk".into()))),
        OnFailure::Next { suspect: true, reason: Some(r) } if r.contains("disk")
    ));
    // how failures read in coverage
    assert_eq!(
        Failed::NoReplica.reason("no_live_replica"),
        "no_live_replica"
    );
    assert_eq!(
        Failed::Exhausted(None).reason("no_live_replica"),
        "no_live_replica"
    );
    assert_eq!(Failed::Deadline.reason("x"), "deadline");
    assert_eq!(
        Failed::Exhausted(Some("deadline".into())).reason("x"),
        "deadline"
    );
}

#[test]
fn each_attempt_but_the_last_gets_half_the_time_left() {
    let deadline = Instant::now() + Duration::from_secs(10);
    let b = Budget::Split(deadline);
    let first = b.attempt(0, 2).unwrap();
    let last = b.attempt(1, 2).unwrap();
    assert!(first <= Duration::from_secs(5) && first > Duration::from_secs(4));
    assert!(last > Duration::from_secs(9));
    assert!(Budget::Split(Instant::now()).attempt(0, 1).is_none());
    assert_eq!(
        Budget::Each(Duration::from_secs(3)).attempt(5, 6),
        Some(Duration::from_secs(3))
    );
    assert!(Budget::Until(deadline).attempt(0, 2).unwrap() > Duration::from_secs(9));
}

#[test]
fn coverage_counts_answers_and_names_every_shard_left_out() {
    let results = vec![
        (2, Err("deadline".to_string())),
        (0, Ok(ShardHits::One(vec![hit("a", "t", 1.0)]))),
        (3, Err("no_live_replica".to_string())),
    ];
    // shard 1's task never reported (it panicked)
    let (c, answers) = account(4, results);
    assert_eq!(c.shards_total, 4);
    assert_eq!(c.shards_answered, 1);
    assert_eq!(answers.len(), 1);
    let left: Vec<(u32, &str)> = c
        .left_out
        .iter()
        .map(|l| (l.shard, l.reason.as_str()))
        .collect();
    assert_eq!(
        left,
        vec![
            (1, "error: search task failed"),
            (2, "deadline"),
            (3, "no_live_replica")
        ]
    );
}

#[test]
fn ingest_validation_keeps_the_last_copy_and_names_refusals() {
    let d = |id: &str, text: &str| Document {
        id: id.into(),
        title: String::new(),
        text: text.into(),
    };
    let big = "x".repeat(ragfleet_proto::MAX_DOCUMENT_BYTES + 1);
    let (good, failed) = validate_documents(vec![
        d("a", "first"),
        d("", "no id"),
        d("b", "  "),
        d("a", "second"),
        d("c", &big),
        d("e", "fine"),
    ]);
    let kept: Vec<(&str, &str)> = good
        .iter()
        .map(|x| (x.id.as_str(), x.text.as_str()))
        .collect();
    assert_eq!(kept, vec![("a", "second"), ("e", "fine")]);
    let refused: Vec<&str> = failed.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(refused, vec!["", "b", "c"]);
    assert!(failed[2].1.contains("exceeds the limit"));
    assert!(quorum_met(0, 2, 2, &[]).is_ok());
    let e = quorum_met(3, 1, 2, &["timed out".into()]).unwrap_err();
    assert!(
        e.contains("shard 3: 1 of 2") && e.contains("timed out"),
        "{e}"
    );
}

#[test]
fn context_drops_near_duplicates_and_respects_the_budget() {
    let words = |t: &str| t.split_whitespace().count();
    let hits = vec![
        hit(
            "a",
            "the quick brown fox jumps over the lazy dog today",
            3.0,
        ),
        hit(
            "b",
            "the quick brown fox jumps over the lazy dog today!",
            2.5,
        ),
        hit(
            "c",
            "an entirely different passage about shard replicas",
            2.0,
        ),
        hit("d", &"long ".repeat(500), 1.0),
    ];
    let (ctx, sources) = assemble_context(&hits, 40, &words);
    assert!(ctx.starts_with("[a] the quick"));
    assert!(!ctx.contains("[b]"), "near duplicate kept");
    assert!(ctx.contains("[c]"));
    assert!(!ctx.contains("[d]"), "over budget kept");
    assert_eq!(
        sources
            .iter()
            .map(|s| s.doc_id.as_str())
            .collect::<Vec<_>>(),
        vec!["a", "c"]
    );
}

#[test]
fn an_answer_keeps_back_at_most_half_of_the_context_budget() {
    // the default answer of 96 tokens keeps back all of them
    assert_eq!(passage_budget(1024, 96, 100), 828);
    // a long answer keeps back half: the passages still get the rest
    assert_eq!(passage_budget(1024, 1500, 100), 412);
    assert_eq!(passage_budget(320, 300, 100), 60);
    // a question and system prompt past the budget leave none
    assert_eq!(passage_budget(320, 24, 400), 0);
}

#[test]
fn empty_and_huge_queries_are_refused() {
    assert!(matches!(
        validate_text("  ", 10, "query"),
        Err(WireError::BadRequest(_))
    ));
    let e = validate_text(&"x".repeat(11), 10, "query")
        .unwrap_err()
        .to_string();
    assert!(e.contains("11 bytes"), "{e}");
    assert!(validate_text("ok", 10, "query").is_ok());
    // options out of range are refused, not quietly changed
    let opts = |k, deadline_ms| RetrieveOptions {
        k,
        deadline_ms,
        ..Default::default()
    };
    for (o, says) in [
        (opts(Some(0), None), "k must be between 1 and 1000 (got 0)"),
        (
            opts(Some(1001), None),
            "k must be between 1 and 1000 (got 1001)",
        ),
        (opts(None, Some(0)), "deadline_ms must be positive"),
    ] {
        match validate_options(&o) {
            Err(WireError::BadRequest(m)) => assert_eq!(m, says),
            other => panic!("{o:?}: {other:?}"),
        }
    }
    for o in [
        opts(None, None),
        opts(Some(1), Some(1)),
        opts(Some(1000), None),
    ] {
        assert!(validate_options(&o).is_ok(), "{o:?}");
    }
}

/// A shard replica stand-in: answers pings (so the failure detector sees it serving) and either
/// answers searches with one hit, or holds them unanswered (a stalled replica).
struct FakeReplica;

struct FakeState {
    name: String,
    stalled: bool,
    held: Vec<RpcReplyPort<Envelope<Response>>>,
}

impl Actor for FakeReplica {
    type Msg = RoleMsg;
    type State = FakeState;
    type Arguments = (u32, String, bool);

    async fn pre_start(
        &self,
        me: ActorRef<RoleMsg>,
        (shard, name, stalled): (u32, String, bool),
    ) -> Result<FakeState, ActorProcessingErr> {
        ractor::pg::join(groups::shard(shard), vec![me.get_cell()]);
        Ok(FakeState {
            name,
            stalled,
            held: Vec::new(),
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<RoleMsg>,
        msg: RoleMsg,
        st: &mut FakeState,
    ) -> Result<(), ActorProcessingErr> {
        let name = st.name.clone();
        let Some((req, port)) = common(msg, "shard", || info(&name, Role::Shard)).await else {
            return Ok(());
        };
        match req {
            Request::Search(_) | Request::SearchAt { .. } if st.stalled => st.held.push(port),
            Request::Search(_) => reply(port, Response::Hits(vec![hit(&st.name, "t", 0.9)])),
            Request::SearchAt { .. } => reply(
                port,
                Response::Searched {
                    digest: 1,
                    answer: ragfleet_proto::SearchAnswer::One(vec![hit(&st.name, "t", 0.9)]),
                },
            ),
            _ => reply(port, Response::Error(WireError::Unsupported("fake".into()))),
        }
        Ok(())
    }
}

fn dense_query() -> SearchQuery {
    SearchQuery {
        vector: vec![1.0],
        text: "q".into(),
        k: 3,
        mode: SearchMode::Dense,
        model: None,
    }
}

/// A slow (stalled) and a fast fake replica of `shard`, both seen serving, and a coordinator
/// context over them.
async fn two_replicas(shard: u32) -> (Arc<Ctx>, Arc<Health>, Vec<String>, [ActorRef<RoleMsg>; 2]) {
    let (slow, _) = Actor::spawn(None, FakeReplica, (shard, "slow".to_string(), true))
        .await
        .unwrap();
    let (fast, _) = Actor::spawn(None, FakeReplica, (shard, "fast".to_string(), false))
        .await
        .unwrap();
    let cfg = ClusterConfig::parse(
        "version = 1\nname = \"t\"\ncookie = \"secret-cookie\"\n[[node]]\nname = \"a\"\naddr = \"127.0.0.1:7001\"\nroles = [\"coordinator\", \"embedder\", \"shard\"]\n[index]\nreplication = 1\nwrite_quorum = 1\n",
    )
    .unwrap();
    let health = Health::new(Duration::from_secs(30), Duration::from_millis(200));
    let group = vec![groups::shard(shard)];
    health.tick(&group, Duration::from_secs(1));
    let start = Instant::now();
    while health.serving(&group[0]).len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "pings unanswered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ctx = Arc::new(Ctx::new(CoordinatorArgs {
        node: "a".into(),
        cfg: Arc::new(cfg),
        health: health.clone(),
        gen_tokens: None,
    }));
    (ctx, health, group, [slow, fast])
}

/// One search of `shard` within `within`, answered by the replica named "fast"; how long it took.
async fn search_answered_by_fast(
    ctx: &Arc<Ctx>,
    shard: u32,
    q: &SearchQuery,
    within: Duration,
) -> Duration {
    let t = Instant::now();
    let r = super::retrieve::shard_search(ctx.clone(), shard, q.clone(), None, t + within, false)
        .await
        .map(|a| a.answer);
    match r {
        Ok(SearchAnswer::One(h)) => assert_eq!(h[0].doc_id, "fast"),
        other => panic!("{other:?}"),
    }
    t.elapsed()
}

#[tokio::test]
async fn a_stalled_replica_is_failed_over_inside_the_shard_deadline_and_suspected() {
    // a shard id no other test uses: process groups are process-wide
    let shard = 901;
    let (ctx, health, group, [slow, fast]) = two_replicas(shard).await;
    let q = dense_query();
    // whichever replica round robin puts first, the answer comes from the live one inside the
    // deadline; the first time the slow one is tried first, it is suspected after
    let mut slow_suspected = false;
    for _ in 0..4 {
        let took = search_answered_by_fast(&ctx, shard, &q, Duration::from_millis(600)).await;
        assert!(took < Duration::from_millis(700), "{took:?}");
        let serving: Vec<String> = health
            .serving(&group[0])
            .iter()
            .filter_map(|m| m.info.as_ref().map(|i| i.node.clone()))
            .collect();
        if !serving.contains(&"slow".to_string()) {
            slow_suspected = true;
            // suspected: no longer tried, so the next search answers at once
            let t = Instant::now();
            let r = super::retrieve::shard_search(
                ctx.clone(),
                shard,
                q.clone(),
                None,
                t + Duration::from_millis(600),
                false,
            )
            .await;
            assert!(r.is_ok());
            assert!(
                t.elapsed() < Duration::from_millis(200),
                "{:?}",
                t.elapsed()
            );
            break;
        }
    }
    assert!(slow_suspected, "the stalled replica was never tried first");
    // every replica gone: the shard is left out as having no live replica
    slow.stop(None);
    fast.stop(None);
    let start = Instant::now();
    while !ractor::pg::get_members(&group[0]).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deadline = Instant::now() + Duration::from_millis(300);
    let r = super::retrieve::shard_search(ctx, shard, q, None, deadline, false).await;
    assert_eq!(r.unwrap_err(), "no_live_replica");
}

#[tokio::test]
async fn a_replica_timed_out_by_a_short_deadline_is_failed_over_but_not_suspected() {
    let shard = 905;
    let (ctx, health, group, [slow, fast]) = two_replicas(shard).await;
    let q = dense_query();
    // 100 ms in all: the first replica asked gets half, 50 ms, less than the heartbeat period
    // (200 ms) below which a timeout says nothing of its replica; the stalled one times out
    // whenever it is asked first, the other answers, and both stay in service
    let mut slow_first = 0;
    for _ in 0..6 {
        let took = search_answered_by_fast(&ctx, shard, &q, Duration::from_millis(100)).await;
        if took >= Duration::from_millis(45) {
            slow_first += 1;
        }
        assert_eq!(
            health.serving(&group[0]).len(),
            2,
            "a replica was suspected for a timeout shorter than a heartbeat"
        );
    }
    assert!(slow_first > 0, "the stalled replica was never asked first");
    // given a heartbeat's time or more, the same silence suspects it
    let mut suspected = false;
    for _ in 0..6 {
        let deadline = Instant::now() + Duration::from_millis(500);
        let r = super::retrieve::shard_search(ctx.clone(), shard, q.clone(), None, deadline, false)
            .await;
        assert!(r.is_ok());
        if health.serving(&group[0]).len() == 1 {
            suspected = true;
            break;
        }
    }
    assert!(
        suspected,
        "a 250 ms timeout did not suspect the stalled replica"
    );
    slow.stop(None);
    fast.stop(None);
}

#[tokio::test]
async fn a_stalled_replica_is_hedged_on_the_other_and_then_asked_last() {
    let shard = 902;
    let (ctx, _health, _group, _replicas) = two_replicas(shard).await;
    // recent search times on record: the hedge waits their p95 (5 ms)
    for _ in 0..20 {
        ctx.hedging
            .record(ractor::ActorId::Local(u64::MAX), Duration::from_millis(5));
    }
    let q = dense_query();
    let mut hedged = 0;
    for _ in 0..4 {
        let deadline = Instant::now() + Duration::from_secs(5);
        let a = super::retrieve::shard_search(ctx.clone(), shard, q.clone(), None, deadline, true)
            .await
            .unwrap();
        match &a.answer {
            SearchAnswer::One(h) => assert_eq!(h[0].doc_id, "fast"),
            other => panic!("{other:?}"),
        }
        hedged += a.hedged as u32;
    }
    // round robin put the stalled replica first within two searches; its hedge answered, and
    // then it went last (demoted), so it was hedged once only
    assert_eq!(hedged, 1);
    let s = ctx.hedging.status();
    assert_eq!((s.requests, s.sent, s.won, s.capped), (4, 1, 1, 0));
}

#[test]
fn writes_are_split_into_requests_that_fit_a_frame_without_splitting_a_document() {
    let op = |id: &str, text_bytes: usize| ragfleet_proto::WriteOp::Upsert {
        doc_id: id.into(),
        version: 1,
        chunks: vec![ragfleet_proto::ChunkRecord {
            doc_id: id.into(),
            chunk_id: format!("{id}#0"),
            text: "x".repeat(text_bytes),
            vector: vec![0.0; 4],
            sentences: Default::default(),
        }],
    };
    let ops = vec![
        op("a", 400),
        op("b", 400),
        op("c", 400),
        op("huge", 5000),
        op("d", 10),
    ];
    let groups = split_by_size(ops, 1000);
    let ids: Vec<Vec<&str>> = groups
        .iter()
        .map(|g| g.iter().map(|o| o.doc_id()).collect())
        .collect();
    // in order; each group within the bound except a lone op larger than it
    assert_eq!(
        ids,
        vec![vec!["a", "b"], vec!["c"], vec!["huge"], vec!["d"]]
    );
    for g in &groups {
        let bytes: usize = g.iter().map(|o| o.approx_bytes()).sum();
        assert!(bytes <= 1000 || g.len() == 1, "{bytes}");
    }
    assert!(split_by_size(Vec::new(), 1000).is_empty());
}
