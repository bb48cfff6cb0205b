//! Answers without the generator, and how far to trust a generated one: the extractive answer
//! (the sources' sentences closest to the question, quoted with their labels) and the grounding
//! of an answer's sentences in its context. Both embed sentences on an embedder replica; the
//! scoring itself is `ragfleet_index::ranking`.
use std::time::{Duration, Instant};

use ragfleet_client::groups;
use ragfleet_client::typed::Embed;
use ragfleet_index::chunk::sentences;
use ragfleet_index::ranking::{extract, grounding};
use ragfleet_proto::{Grounding, Hit, Response, Source, WireError};

use super::replicas::{call_replicas, Budget, Failed};
use super::retrieve::validate_text;
use super::Ctx;

/// Sentences of the sources an extractive answer picks from.
const MAX_CANDIDATES: usize = 64;
/// Sentences an extractive answer quotes at most.
const MAX_QUOTED: usize = 4;

/// The sentences of a text worth quoting or checking (with a letter or digit in them).
fn sentences_of(text: &str) -> Vec<String> {
    sentences(text)
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| s.chars().filter(|c| c.is_alphanumeric()).count() >= 3)
        .collect()
}

/// A client's `Embed` request (the HTTP gateway's `/v1/embeddings`): validated, then embedded
/// on an embedder replica within the query deadline, failing over between replicas.
pub(crate) async fn embed_request(ctx: &Ctx, texts: Vec<String>) -> Response {
    let cfg = ctx.cfg();
    if texts.is_empty() {
        return Response::Error(WireError::BadRequest("no texts to embed".into()));
    }
    if texts.len() > MAX_EMBED_TEXTS {
        return Response::Error(WireError::BadRequest(format!(
            "{} texts exceed the limit of {MAX_EMBED_TEXTS} a request",
            texts.len()
        )));
    }
    for t in &texts {
        if let Err(e) = validate_text(t, cfg.query.max_query_bytes, "text") {
            return Response::Error(e);
        }
    }
    let deadline = Instant::now() + Duration::from_millis(cfg.query.deadline_ms);
    let replicas = ctx.candidates(groups::EMBEDDERS);
    match call_replicas(
        &ctx.args.health,
        replicas,
        Embed { texts },
        Budget::Split(deadline),
    )
    .await
    {
        Ok((model, vectors)) => Response::Embeddings { model, vectors },
        Err(Failed::Deadline) => Response::Error(WireError::Deadline),
        Err(f) => Response::Error(WireError::Unavailable(format!(
            "no embedder replica could answer: {}",
            f.reason("no embedder replica is reachable")
        ))),
    }
}

/// Texts one `Embed` request of a client may carry.
pub(crate) const MAX_EMBED_TEXTS: usize = 2048;

async fn embed(ctx: &Ctx, texts: Vec<String>, deadline: Instant) -> Option<Vec<Vec<f32>>> {
    let n = texts.len();
    let replicas = ctx.candidates(groups::EMBEDDERS);
    match call_replicas(
        &ctx.args.health,
        replicas,
        Embed { texts },
        Budget::Split(deadline),
    )
    .await
    {
        Ok((_, v)) if v.len() == n => Some(v),
        _ => None,
    }
}

/// An extractive answer to `question` from `hits` within `budget` tokens: its text (each
/// sentence followed by its `[doc_id]`), sources, and grounding (the quoted sentences against
/// the sources' sentences, from the vectors already computed); `None` when nothing could be
/// quoted.
pub(crate) async fn extractive(
    ctx: &Ctx,
    question: &str,
    hits: &[Hit],
    budget: usize,
    deadline: Instant,
) -> Option<(String, Vec<Source>, Grounding)> {
    let mut cands: Vec<(String, String)> = Vec::new();
    for h in hits {
        for s in sentences_of(&h.text) {
            if cands.len() < MAX_CANDIDATES {
                cands.push((h.doc_id.clone(), s));
            }
        }
    }
    if cands.is_empty() {
        return None;
    }
    let mut texts = vec![question.to_string()];
    texts.extend(cands.iter().map(|c| c.1.clone()));
    let mut vecs = embed(ctx, texts, deadline).await?.into_iter();
    let q = vecs.next()?;
    let cands: Vec<(String, String, Vec<f32>)> = cands
        .into_iter()
        .zip(vecs)
        .map(|((d, s), v)| (d, s, v))
        .collect();
    let count = |t: &str| ctx.count_tokens(t);
    let picked = extract(&q, &cands, budget, MAX_QUOTED, &count);
    if picked.is_empty() {
        return None;
    }
    let quoted: Vec<String> = picked.iter().map(|c| c.1.clone()).collect();
    let quoted_vecs: Vec<Vec<f32>> = picked.iter().map(|c| c.2.clone()).collect();
    let all: Vec<String> = cands.iter().map(|c| c.1.clone()).collect();
    let all_vecs: Vec<Vec<f32>> = cands.iter().map(|c| c.2.clone()).collect();
    let grounded = grounding(&quoted, &quoted_vecs, &all, &all_vecs);
    let mut text = String::new();
    let mut sources: Vec<Source> = Vec::new();
    for (doc, s, _) in picked {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&format!("{s} [{doc}]"));
        if !sources.iter().any(|x| &x.doc_id == doc) {
            let score = hits
                .iter()
                .find(|h| &h.doc_id == doc)
                .map(|h| h.score)
                .unwrap_or(0.0);
            sources.push(Source {
                doc_id: doc.clone(),
                score,
            });
        }
    }
    Some((text, sources, grounded))
}

/// The grounding of `answer` in `context` (the passages it was given, with their `[id]`
/// labels), measured within a few seconds; `None` when there is nothing to measure or no
/// embedder answers.
pub(crate) async fn ground(ctx: &Ctx, answer: &str, context: &str) -> Option<Grounding> {
    // the cut marker and the passage labels are not claims
    let answer = answer
        .replace("[answer cut: end-to-end deadline reached]", "")
        .replace("[answer cut: the generator failed mid-answer]", "");
    let strip_labels = |s: &str| -> String {
        let mut out = String::with_capacity(s.len());
        let mut depth = 0;
        for c in s.chars() {
            match c {
                '[' => depth += 1,
                ']' if depth > 0 => depth -= 1,
                _ if depth == 0 => out.push(c),
                _ => {}
            }
        }
        out
    };
    let claims: Vec<String> = sentences_of(&strip_labels(&answer));
    let support: Vec<String> = context
        .lines()
        .flat_map(|l| sentences_of(&strip_labels(l)))
        .take(MAX_CANDIDATES * 2)
        .collect();
    if claims.is_empty() || support.is_empty() {
        return None;
    }
    let mut texts = claims.clone();
    texts.extend(support.iter().cloned());
    let vecs = embed(ctx, texts, Instant::now() + Duration::from_secs(5)).await?;
    let (av, cv) = vecs.split_at(claims.len());
    Some(grounding(&claims, av, &support, cv))
}
