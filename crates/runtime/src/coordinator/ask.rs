//! The answer path: retrieve, assemble the context under the token budget, and relay a
//! generator replica's stream to the client. A generator that refuses, fails or stalls before
//! its first token is failed over to another replica; an answer that ends for any reason but
//! its natural end says so (`truncated`, the reason, and a marker in the text).
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ragfleet_client::groups;
use ragfleet_client::inbox::Subscription;
use ragfleet_client::typed::{call_typed, Cancel, Generate, StreamNext};
use ragfleet_config::NoCoverage;
use ragfleet_proto::{
    AnswerMode, AskOptions, AskSummary, Coverage, GenerationRequest, LeftOut, Timings, WireError,
};
use tracing::warn;

use super::answer::{extractive, ground};
use super::prompt::{assemble_context, passage_budget, SYSTEM_PROMPT};
use super::replicas::{with_failover, Budget, Failed};
use super::retrieve::retrieve;
use super::{ms, Ctx};
use crate::call::CallError;
use crate::streams::StreamWriter;

/// How a replica's stream ended, once it had started answering.
#[derive(Debug)]
enum End {
    /// Its natural end: `stop` (end of sequence, a sentence end near the budget) or `length`.
    Complete(String),
    /// The end-to-end deadline passed; the stream was cancelled.
    Deadline,
    /// The replica failed mid-answer.
    Failed(String),
    /// The client abandoned the answer; the generator's stream was cancelled.
    Cancelled,
}

/// A client reading a polled answer polls at least every [`ragfleet_client::ANSWER_POLL`];
/// silence this long means it is gone and the answer is cancelled. (A client of a pushed answer
/// is gone when its inbox leaves the cluster.)
const CLIENT_SILENCE: Duration = Duration::from_millis(1500);

/// What the relay has produced so far (shared by the attempts, which run one after another).
#[derive(Default)]
struct Relayed {
    answer: String,
    first_token: Option<Duration>,
    /// Tokens the generator produced for it.
    tokens: u32,
}

pub(crate) async fn ask_task(ctx: Arc<Ctx>, question: String, opts: AskOptions, w: StreamWriter) {
    let t0 = Instant::now();
    let cfg = ctx.cfg().clone();
    let deadline =
        t0 + Duration::from_millis(opts.retrieve.deadline_ms.unwrap_or(cfg.query.deadline_ms));
    let max_tokens = opts
        .max_tokens
        .unwrap_or(cfg.generator.max_tokens)
        .clamp(1, 2048);
    if let Some(s) = &opts.system {
        if s.len() > cfg.query.max_query_bytes {
            return w.fail(format!(
                "system prompt of {} bytes exceeds the limit of {} bytes (query.max_query_bytes)",
                s.len(),
                cfg.query.max_query_bytes
            ));
        }
    }
    let skip = opts.skip_retrieval;
    let retrieved = if skip {
        Ok(ragfleet_proto::RetrieveResult {
            hits: Vec::new(),
            coverage: Coverage::default(),
            timings_ms: Timings::default(),
            rerank: None,
            degraded: None,
            cache: None,
            hedged: Vec::new(),
            coordinator: ctx.args.node.clone(),
        })
    } else {
        retrieve(ctx.clone(), question.clone(), opts.retrieve.clone()).await
    };
    let (hits, coverage, timings, rerank, degraded) = match retrieved {
        Ok(r) => (r.hits, r.coverage, r.timings_ms, r.rerank, r.degraded),
        Err(e @ WireError::BadRequest(_)) => return w.fail(e.to_string()),
        Err(e) => {
            warn!(error = %e, "retrieval failed; answering without sources");
            let cov = Coverage {
                shards_total: cfg.index.shards,
                shards_answered: 0,
                left_out: (0..cfg.index.shards)
                    .map(|s| LeftOut {
                        shard: s,
                        reason: format!("error: {e}"),
                    })
                    .collect(),
            };
            (Vec::new(), cov, Timings::default(), None, None)
        }
    };
    let unsourced = coverage.shards_answered == 0 || hits.is_empty();
    let mode = opts.answer_mode.unwrap_or(cfg.generator.answer_mode);
    let hits = Arc::new(hits);
    if unsourced && !skip && cfg.generator.on_no_coverage == NoCoverage::Refuse {
        return w.fail("no shard answered and generator.on_no_coverage = \"refuse\"".into());
    }
    // tokenising the passages is CPU work: off the async runtime's threads
    let (c2, q2, h2, context_tokens, s2) = (
        ctx.clone(),
        question.clone(),
        hits.clone(),
        cfg.generator.context_tokens as usize,
        opts.system.clone().unwrap_or_default(),
    );
    let assembled = tokio::task::spawn_blocking(move || {
        let count = |t: &str| c2.count_tokens(t);
        let fixed = count(&q2) + count(SYSTEM_PROMPT) + count(&s2) + 48;
        let budget = passage_budget(context_tokens, max_tokens as usize, fixed);
        assemble_context(&h2, budget, &count)
    })
    .await;
    let Ok((context, sources)) = assembled else {
        return w.fail("context assembly failed".into());
    };
    // nothing to answer from, nor to check the answer against
    let no_passages = unsourced || context.is_empty();
    let user = if skip {
        question.clone()
    } else if no_passages {
        format!("No passages are available. Answer from general knowledge, briefly.\n\nQuestion: {question}")
    } else {
        format!("Passages:\n\n{context}Question: {question}")
    };
    // penalties the request leaves unset take the cluster's defaults
    let mut sampling = opts.sampling.clone();
    let g = &cfg.generator;
    sampling.repetition_penalty = sampling.repetition_penalty.or(Some(g.repetition_penalty));
    sampling.frequency_penalty = sampling.frequency_penalty.or(Some(g.frequency_penalty));
    sampling.presence_penalty = sampling.presence_penalty.or(Some(g.presence_penalty));
    sampling.no_repeat_ngram = sampling.no_repeat_ngram.or(Some(g.no_repeat_ngram));
    let system = match (&opts.system, skip) {
        (Some(s), true) => s.clone(),
        (Some(s), false) => format!("{SYSTEM_PROMPT}\n{s}"),
        (None, _) => SYSTEM_PROMPT.into(),
    };
    let req = Generate {
        request: GenerationRequest {
            system,
            user,
            max_tokens,
            sampling,
            push_to: None,
        },
    };
    let t_gen = Instant::now();
    let mut summary = AskSummary {
        answer: String::new(),
        sources,
        coverage,
        timings_ms: timings,
        unsourced,
        end_reason: "stop".into(),
        truncated: false,
        truncated_reason: None,
        rerank,
        degraded,
        answer_mode: "generate".into(),
        fallback: None,
        grounding: None,
    };
    if mode == AnswerMode::Extractive && !unsourced {
        return finish_extractive(
            &ctx, &question, &hits, max_tokens, deadline, summary, t0, &w,
        )
        .await;
    }
    let first_token_timeout = Duration::from_millis(cfg.generator.first_token_timeout_ms);
    let push = opts.push != Some(false);
    // `auto` holds the generated text back until its grounding is checked; `generate` streams,
    // and so does an answer with no passage in its prompt
    let live = mode != AnswerMode::Auto || no_passages;
    let relayed = Mutex::new(Relayed::default());
    let replicas = ctx.candidates(groups::GENERATORS);
    let outcome = with_failover(
        &ctx.args.health,
        replicas,
        Budget::Until(deadline),
        |actor, _left| {
            let (req, relayed, w) = (req.clone(), &relayed, &w);
            async move {
                let sink = live.then_some(w);
                relay(
                    &actor,
                    req,
                    deadline,
                    first_token_timeout,
                    t0,
                    relayed,
                    sink,
                    w,
                    push,
                )
                .await
            }
        },
    )
    .await;
    let Relayed {
        mut answer,
        first_token,
        tokens,
    } = relayed.into_inner().unwrap_or_else(|e| e.into_inner());
    if matches!(outcome, Ok(End::Cancelled)) {
        // nobody is listening (should a client still be, it learns why its answer stopped)
        return w.fail("the answer was cancelled: its client went away".into());
    }
    let end_reason = match &outcome {
        Ok(End::Complete(r)) => r.clone(),
        Ok(End::Failed(_)) => "error".into(),
        _ => "deadline".into(),
    };
    let cut = match outcome {
        Ok(End::Complete(_)) => None,
        Ok(End::Deadline | End::Cancelled) | Err(Failed::Deadline) => {
            Some(("deadline".to_string(), None))
        }
        Ok(End::Failed(e)) => Some((format!("error: {e}"), Some(e))),
        Err(f) => {
            // no replica produced a token: nothing to relay
            let e = format!(
                "no generator replica could answer: {}",
                f.reason("no generator replica is reachable")
            );
            if mode == AnswerMode::Auto && !unsourced {
                warn!(error = %e, "answering extractively");
                summary.fallback = Some(e);
                return finish_extractive(
                    &ctx, &question, &hits, max_tokens, deadline, summary, t0, &w,
                )
                .await;
            }
            return w.fail(e);
        }
    };
    let (truncated, truncated_reason) = match cut {
        None => (false, None),
        Some((reason, failure)) => {
            let marker = match &failure {
                None => " [answer cut: end-to-end deadline reached]",
                Some(e) => {
                    warn!(error = %e, "answer incomplete");
                    " [answer cut: the generator failed mid-answer]"
                }
            };
            answer.push_str(marker);
            if live {
                w.push(marker, 0);
            }
            (true, Some(reason))
        }
    };
    summary.timings_ms.first_token = first_token.map(ms).unwrap_or(0.0);
    summary.timings_ms.generate = ms(t_gen.elapsed());
    if !live && !truncated {
        // a held-back answer the model ended mid-sentence ends at its last full sentence
        if let Some(t) = ragfleet_index::ranking::drop_trailing_fragment(&answer) {
            answer = t;
        }
    }
    if !unsourced {
        summary.grounding = ground(&ctx, &answer, &context).await;
    }
    if !live {
        // auto: a weakly grounded answer gives way to the sources' own sentences
        let weak = summary
            .grounding
            .as_ref()
            .map(|g| g.score)
            .filter(|s| *s < cfg.generator.min_grounding);
        if let Some(score) = weak {
            summary.fallback = Some(format!(
                "the generated answer's grounding {score:.2} is below generator.min_grounding {:.2}",
                cfg.generator.min_grounding
            ));
            let generated = summary.clone();
            if finish_extractive_or_not(
                &ctx, &question, &hits, max_tokens, deadline, summary, t0, &w,
            )
            .await
            {
                return;
            }
            summary = generated;
            summary.fallback = None;
        }
        // (held back until checked: released whole, with the tokens generated for it)
        w.push(&answer, tokens);
        summary.timings_ms.first_token = ms(t0.elapsed());
    }
    summary.timings_ms.total = ms(t0.elapsed());
    summary.answer = answer;
    summary.end_reason = end_reason;
    summary.truncated = truncated;
    summary.truncated_reason = truncated_reason;
    w.finish(Some(summary));
}

/// Answers from the sources' sentences (no generator): streams the quoted sentences, then the
/// summary.
#[allow(clippy::too_many_arguments)]
async fn finish_extractive(
    ctx: &Ctx,
    question: &str,
    hits: &[ragfleet_proto::Hit],
    max_tokens: u32,
    deadline: Instant,
    summary: AskSummary,
    t0: Instant,
    w: &StreamWriter,
) {
    if !finish_extractive_or_not(ctx, question, hits, max_tokens, deadline, summary, t0, w).await {
        w.fail("no sentence of the sources could be quoted (no embedder answered)".into());
    }
}

/// [`finish_extractive`], or `false` (nothing sent) when nothing could be quoted.
#[allow(clippy::too_many_arguments)]
async fn finish_extractive_or_not(
    ctx: &Ctx,
    question: &str,
    hits: &[ragfleet_proto::Hit],
    max_tokens: u32,
    deadline: Instant,
    mut summary: AskSummary,
    t0: Instant,
    w: &StreamWriter,
) -> bool {
    let t_gen = Instant::now();
    let Some((text, sources, grounded)) =
        extractive(ctx, question, hits, max_tokens as usize, deadline).await
    else {
        return false;
    };
    w.push(&text, 0);
    let t = &mut summary.timings_ms;
    t.first_token = ms(t0.elapsed());
    t.generate = ms(t_gen.elapsed());
    t.total = ms(t0.elapsed());
    summary.grounding = Some(grounded);
    summary.answer = text;
    summary.sources = sources;
    summary.answer_mode = "extractive".into();
    w.finish(Some(summary));
    true
}

/// One replica's attempt: start a stream and relay it until it ends. `Err` (fail over to the
/// next replica) only while no token has been relayed; after that the outcome is an [`End`].
/// Tokens go to `sink` (none while an `auto` answer is held back); `client` tells whether the
/// client abandoned the answer. With `push`, the generator pushes its tokens to this process's
/// inbox as it decodes them (a silent stream is checked on the generator every
/// [`PUSH_PROBE`]); else they are long-polled.
#[allow(clippy::too_many_arguments)]
async fn relay(
    actor: &ractor::ActorRef<ragfleet_client::RoleMsg>,
    mut req: Generate,
    deadline: Instant,
    first_token_timeout: Duration,
    t0: Instant,
    relayed: &Mutex<Relayed>,
    sink: Option<&StreamWriter>,
    client: &StreamWriter,
    push: bool,
) -> Result<End, CallError> {
    let sub = match push {
        true => ragfleet_client::inbox::subscribe().await,
        false => None,
    };
    req.request.push_to = sub.as_ref().map(|s| s.target());
    let left = deadline.saturating_duration_since(Instant::now());
    let stream = match call_typed(actor, req, left.min(first_token_timeout)).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "generator refused; trying another replica");
            return Err(e);
        }
    };
    let started = Instant::now();
    let mut news = Instant::now();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // a client that cancelled, or stopped polling (its process died: nobody will cancel)
        // (a pushed answer's client is gone when its inbox left the cluster: is_cancelled)
        let client_gone = client.is_cancelled()
            || (!client.is_pushed() && client.unpolled_for().is_some_and(|d| d > CLIENT_SILENCE));
        if left.is_zero() || client_gone {
            let _ = call_typed(actor, Cancel { stream }, Duration::from_millis(500)).await;
            if client_gone {
                tracing::info!("the client went away: generation cancelled");
                return Ok(End::Cancelled);
            }
            return Ok(End::Deadline);
        }
        let wait = left.min(Duration::from_millis(250));
        let started_answering = relayed.lock().expect("relay").first_token.is_some();
        let polled = match &sub {
            Some(s) => next_pushed(s, actor, stream, wait, &mut news).await,
            None => {
                let next = StreamNext {
                    stream,
                    wait_ms: wait.as_millis() as u64,
                };
                call_typed(actor, next, wait + Duration::from_secs(2)).await
            }
        };
        match polled {
            Ok(c) => {
                if !c.text.is_empty() {
                    let mut r = relayed.lock().expect("relay");
                    r.first_token.get_or_insert_with(|| t0.elapsed());
                    r.answer.push_str(&c.text);
                    r.tokens += c.tokens;
                    if let Some(w) = sink {
                        w.push(&c.text, c.tokens);
                    }
                }
                if c.done {
                    return Ok(End::Complete(c.end.unwrap_or_else(|| "stop".into())));
                }
                if !started_answering
                    && c.text.is_empty()
                    && started.elapsed() > first_token_timeout
                {
                    warn!("generator stalled before its first token; trying another replica");
                    return Err(CallError::Timeout);
                }
            }
            Err(e) if !started_answering => {
                warn!(error = %e, "generator failed before its first token; trying another replica");
                return Err(e);
            }
            Err(e) => return Ok(End::Failed(format!("generator failed mid-answer: {e}"))),
        }
    }
}

/// How long a pushed stream may stay silent before the generator is asked about it (is it
/// still there; did it keep pieces it could not push).
const PUSH_PROBE: Duration = Duration::from_secs(1);

/// The next piece pushed to `sub` (empty after `wait` without one); after [`PUSH_PROBE`] of
/// silence, what the generator says of the stream instead (a failed call: it is gone).
async fn next_pushed(
    sub: &Subscription,
    actor: &ractor::ActorRef<ragfleet_client::RoleMsg>,
    stream: u64,
    wait: Duration,
    news: &mut Instant,
) -> Result<ragfleet_proto::StreamChunk, CallError> {
    let c = sub.next(wait).await.map_err(CallError::Remote)?;
    if !c.text.is_empty() || c.done {
        *news = Instant::now();
        return Ok(c);
    }
    if news.elapsed() < PUSH_PROBE {
        return Ok(c);
    }
    *news = Instant::now();
    let probe = StreamNext { stream, wait_ms: 0 };
    let c = call_typed(actor, probe, Duration::from_secs(2)).await?;
    Ok(sub.settle(c).await)
}
