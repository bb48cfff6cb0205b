//! The OpenAI-compatible endpoints: `POST /v1/chat/completions` (retrieval-augmented by default,
//! streamed as server-sent events in the OpenAI chunk format with `stream: true`) and
//! `POST /v1/embeddings`. ragfleet's own figures (sources, coverage, timings, grounding) travel
//! in an extra `ragfleet` field of the final chunk and of the non-streamed answer; request
//! options of its own go in a `ragfleet` object of the request.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use ragfleet_client::AskStream;
use ragfleet_proto::{AnswerMode, AskOptions, AskSummary, RetrieveOptions, Sampling, SearchMode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{parse_field, ApiError};
use crate::{ApiJson, AppState, InFlight};

/// A chat message; `content` is a string or a list of text parts.
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (others are accepted and ignored).
    pub role: String,
    /// The text.
    #[serde(default)]
    pub content: Option<Content>,
}

/// Message content as the OpenAI API allows it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts; only `text` parts are read.
    Parts(Vec<Part>),
}

/// One part of a message.
#[derive(Debug, Deserialize)]
pub struct Part {
    /// Part type (`text`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Its text.
    #[serde(default)]
    pub text: Option<String>,
}

impl Content {
    fn text(&self) -> String {
        match self {
            Content::Text(t) => t.clone(),
            Content::Parts(p) => p
                .iter()
                .filter(|p| p.kind == "text")
                .filter_map(|p| p.text.clone())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// ragfleet's own options of a chat request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RagOptions {
    /// Retrieve passages for the last user message (default true).
    pub retrieval: Option<bool>,
    /// `dense`, `bm25` or `hybrid`.
    pub mode: Option<String>,
    /// Passages retrieved.
    pub k: Option<u32>,
    /// Rerank on or off.
    pub rerank: Option<bool>,
    /// `generate`, `extractive` or `auto`.
    pub answer_mode: Option<String>,
    /// End-to-end deadline in ms.
    pub deadline_ms: Option<u64>,
    /// Repetition penalty (1: off).
    pub repetition_penalty: Option<f32>,
    /// `false`: the answer's tokens are long-polled instead of pushed (to compare the two).
    pub push: Option<bool>,
    /// `false`: computed afresh, bypassing the retrieval caches.
    pub cache: Option<bool>,
}

/// `POST /v1/chat/completions`. Fields of the OpenAI API this server has no use for (`user`,
/// `logprobs`, ...) are accepted and ignored.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Echoed back; any value is accepted (the cluster serves one generator).
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation; the last user message is the question.
    pub messages: Vec<ChatMessage>,
    /// Answer length limit in tokens.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// The newer name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature (0: greedy).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Sampling seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stream as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// OpenAI's frequency penalty.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// OpenAI's presence penalty.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Choices wanted (only 1).
    #[serde(default)]
    pub n: Option<u32>,
    /// ragfleet's options.
    #[serde(default)]
    pub ragfleet: RagOptions,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The question, the client's system prompt and the options of a chat request.
fn ask_of(req: &ChatRequest) -> Result<(String, AskOptions), ApiError> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported"));
    }
    let question = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .and_then(|m| m.content.as_ref())
        .map(Content::text)
        .ok_or_else(|| ApiError::bad_request("messages hold no user message"))?;
    let system: Vec<String> = req
        .messages
        .iter()
        .filter(|m| m.role == "system" || m.role == "developer")
        .filter_map(|m| m.content.as_ref().map(Content::text))
        .filter(|t| !t.trim().is_empty())
        .collect();
    let r = &req.ragfleet;
    // unset: the cluster's `query.mode`
    let mode = parse_field::<SearchMode>(r.mode.as_deref(), "ragfleet.mode")?;
    let answer_mode = parse_field::<AnswerMode>(r.answer_mode.as_deref(), "ragfleet.answer_mode")?;
    if let Some(t) = req.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::bad_request("temperature must be between 0 and 2"));
        }
    }
    if let Some(p) = req.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::bad_request("top_p must be in (0, 1]"));
        }
    }
    for (name, v) in [
        ("frequency_penalty", req.frequency_penalty),
        ("presence_penalty", req.presence_penalty),
    ] {
        if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            return Err(ApiError::bad_request(format!(
                "{name} must be between -2 and 2"
            )));
        }
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    if max_tokens == Some(0) {
        return Err(ApiError::bad_request("max_tokens must be positive"));
    }
    let options = AskOptions {
        retrieve: RetrieveOptions {
            k: r.k,
            mode,
            rerank: r.rerank,
            deadline_ms: r.deadline_ms,
            cache: r.cache,
            hedge: None,
        },
        max_tokens,
        sampling: Sampling {
            temperature: req.temperature.unwrap_or(0.0),
            top_p: req.top_p.unwrap_or(1.0),
            seed: req.seed.unwrap_or(0),
            repetition_penalty: r.repetition_penalty,
            frequency_penalty: req.frequency_penalty,
            presence_penalty: req.presence_penalty,
            no_repeat_ngram: None,
        },
        answer_mode,
        skip_retrieval: r.retrieval == Some(false),
        system: (!system.is_empty()).then(|| system.join("\n")),
        push: r.push,
        push_to: None,
    };
    Ok((question, options))
}

/// OpenAI's `finish_reason` for a ragfleet end reason (the exact one is in `ragfleet`).
fn finish_reason(s: &AskSummary) -> &'static str {
    if s.end_reason == "stop" && !s.truncated {
        "stop"
    } else {
        "length"
    }
}

/// ragfleet's extra field of a chat answer: the answer's summary without its text (which is
/// the message content).
fn extra(s: &AskSummary) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("answer");
    }
    v
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let (question, options) = ask_of(&req)?;
    let model = req.model.clone().unwrap_or_else(|| "ragfleet".into());
    let answered = !options.skip_retrieval;
    let guard = InFlight::new(&st, "chat");
    let stream = st.client.ask(&question, options).await?;
    let id = format!("chatcmpl-{:024x}", rand::random::<u128>() >> 32);
    let created = unix_now();
    if req.stream == Some(true) {
        Ok(stream_answer(st, stream, id, created, model, answered, guard).into_response())
    } else {
        whole_answer(&st, stream, id, created, model, answered).await
    }
}

async fn whole_answer(
    st: &AppState,
    mut stream: AskStream,
    id: String,
    created: u64,
    model: String,
    answered: bool,
) -> Result<Response, ApiError> {
    let mut tokens = 0u32;
    let mut summary = None;
    while let Some(c) = stream.next().await {
        let c = c?;
        tokens += c.tokens;
        if c.summary.is_some() {
            summary = c.summary;
        }
    }
    let s = summary.ok_or_else(|| {
        ApiError::from(ragfleet_proto::WireError::Internal(
            "the answer ended without a summary".into(),
        ))
    })?;
    st.record_answer(&s, answered);
    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": s.answer},
            "finish_reason": finish_reason(&s),
            "logprobs": null,
        }],
        "usage": {"completion_tokens": tokens, "prompt_tokens": 0, "total_tokens": tokens},
        "ragfleet": extra(&s),
    });
    Ok(Json(body).into_response())
}

fn chunk(id: &str, created: u64, model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
    })
}

/// The answer as server-sent events: a first chunk with the role, a chunk per piece of text,
/// a last chunk with the finish reason and the `ragfleet` field, then `data: [DONE]`. An error
/// mid-answer is an event `{"error": ...}` before `[DONE]`. A client that goes away drops the
/// stream, and with it the answer (the coordinator cancels its generation).
fn stream_answer(
    st: Arc<AppState>,
    mut stream: AskStream,
    id: String,
    created: u64,
    model: String,
    answered: bool,
    guard: InFlight,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(256);
    let rid = ragfleet_client::request_id();
    tokio::spawn(ragfleet_client::traced(rid, async move {
        let _guard = guard;
        let send = |v: Value| Event::default().data(v.to_string());
        let first = chunk(
            &id,
            created,
            &model,
            json!({"role": "assistant", "content": ""}),
            None,
        );
        if tx.send(send(first)).await.is_err() {
            return;
        }
        while let Some(c) = stream.next().await {
            let c = match c {
                Ok(c) => c,
                Err(e) => {
                    let e = ApiError::from(e);
                    st.count("chat", e.code);
                    let _ = tx.send(Event::default().data(e.event_data())).await;
                    break;
                }
            };
            if !c.text.is_empty() {
                let piece = chunk(&id, created, &model, json!({"content": c.text}), None);
                if tx.send(send(piece)).await.is_err() {
                    return; // the client went away: dropping the stream cancels the answer
                }
            }
            if let Some(s) = c.summary {
                st.record_answer(&s, answered);
                let mut last = chunk(&id, created, &model, json!({}), Some(finish_reason(&s)));
                last["ragfleet"] = extra(&s);
                if tx.send(send(last)).await.is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    }));
    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

/// `input` of an embeddings request.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Input {
    /// One text.
    One(String),
    /// Several texts.
    Many(Vec<String>),
    /// Anything else (token arrays: the tokenizer is the server's).
    Other(serde::de::IgnoredAny),
}

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    /// Texts.
    pub input: Input,
    /// Echoed back.
    #[serde(default)]
    pub model: Option<String>,
    /// `float` (default) or `base64` (little-endian f32).
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Must be the model's dimension when given (no truncation).
    #[serde(default)]
    pub dimensions: Option<usize>,
}

/// `POST /v1/embeddings`: the cluster's embedding model, through a coordinator.
pub async fn embeddings(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<EmbeddingsRequest>,
) -> Result<Response, ApiError> {
    let texts = match req.input {
        Input::One(t) => vec![t],
        Input::Many(v) => v,
        Input::Other(_) => {
            return Err(ApiError::bad_request(
                "input must be a string or a list of strings (token arrays are not accepted)",
            ))
        }
    };
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "encoding_format {other:?}: float or base64"
            )))
        }
    };
    let _guard = InFlight::new(&st, "embeddings");
    let t = Instant::now();
    let (model, vectors) = st.client.embed(texts).await?;
    st.metrics
        .stage_seconds
        .with_label_values(&["embed"])
        .observe(t.elapsed().as_secs_f64());
    if let Some(d) = req.dimensions {
        if vectors.first().is_some_and(|v| v.len() != d) {
            return Err(ApiError::bad_request(format!(
                "dimensions {d}: the model {} gives {} (no truncation)",
                model.name, model.dim
            )));
        }
    }
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": req.model.unwrap_or_else(|| model.name.clone()),
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<(String, AskOptions), ApiError> {
        let req: ChatRequest = serde_json::from_value(v).unwrap();
        ask_of(&req)
    }

    #[test]
    fn the_last_user_message_is_the_question_and_options_map() {
        let (q, o) = parse(json!({
            "model": "x",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": [{"type": "text", "text": "What is Rust?"}]}
            ],
            "max_tokens": 40, "temperature": 0.5, "top_p": 0.9, "seed": 7,
            "frequency_penalty": 0.3, "user": "someone", "logprobs": false,
            "ragfleet": {"mode": "hybrid", "k": 3, "rerank": false, "answer_mode": "extractive"}
        }))
        .unwrap();
        assert_eq!(q, "What is Rust?");
        assert_eq!(o.max_tokens, Some(40));
        assert_eq!(o.sampling.temperature, 0.5);
        assert_eq!(o.sampling.seed, 7);
        assert_eq!(o.sampling.frequency_penalty, Some(0.3));
        assert_eq!(o.retrieve.mode, Some(SearchMode::Hybrid));
        assert_eq!(o.retrieve.k, Some(3));
        assert_eq!(o.retrieve.rerank, Some(false));
        assert_eq!(o.answer_mode, Some(AnswerMode::Extractive));
        assert_eq!(o.system.as_deref(), Some("Be brief."));
        assert!(!o.skip_retrieval);
        let (_, o) = parse(json!({"messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 9, "ragfleet": {"retrieval": false}}))
        .unwrap();
        assert!(o.skip_retrieval);
        assert_eq!(o.max_tokens, Some(9));
    }

    #[test]
    fn bad_chat_requests_are_refused_with_the_reason() {
        for (v, needle) in [
            (json!({"messages": []}), "no user message"),
            (
                json!({"messages": [{"role": "system", "content": "x"}]}),
                "no user message",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}], "n": 2}),
                "n = 1",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}], "temperature": 9}),
                "temperature",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}], "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}], "ragfleet": {"mode": "fuzzy"}}),
                "ragfleet.mode",
            ),
        ] {
            let e = parse(v).unwrap_err();
            assert_eq!(e.code, "bad_request");
            assert!(e.message.contains(needle), "{} lacks {needle}", e.message);
        }
        let bad: Result<ChatRequest, _> =
            serde_json::from_value(json!({"messages": [], "ragfleet": {"typo": 1}}));
        assert!(bad.is_err());
    }
}
