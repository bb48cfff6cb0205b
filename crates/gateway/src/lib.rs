//! ragfleet's HTTP gateway, served by every coordinator node whose `[[node]]` table has an
//! `http_addr`: an OpenAI-compatible API (`/v1/chat/completions`, `/v1/embeddings`,
//! `/v1/models`), retrieval (`/v1/retrieve`), documents (`POST /v1/documents`,
//! `DELETE /v1/documents/{id}`), `/v1/status`, `/healthz`, `/readyz` and `/metrics`
//! (Prometheus). It reaches the cluster through a [`Client`] attached to the node's own
//! transport, so a request fails over between coordinators like any client's.
//!
//! Errors are JSON with a stable code and a fitting status ([`ApiError`]); API keys (bearer
//! tokens from `[http]` or the environment) guard everything but the health probes; every
//! request gets an id (`x-request-id`, taken from the request when it has a sane one) that its
//! log lines carry.
#![warn(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use ragfleet_client::Client;
use ragfleet_config::ClusterConfig;
use ragfleet_proto::{AskSummary, Document, RetrieveOptions, RetrieveResult, SearchMode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{info, warn, Instrument};

mod error;
mod metrics;
mod openai;
mod serve;

pub use error::ApiError;
pub use metrics::Metrics;

/// Errors starting the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The listener could not bind.
    #[error("cannot listen for HTTP on {addr}: {reason}")]
    Listen {
        /// Address.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// What every handler shares.
pub struct AppState {
    client: Arc<Client>,
    cfg: Arc<ClusterConfig>,
    keys: Vec<String>,
    metrics: Metrics,
}

impl AppState {
    fn count(&self, endpoint: &str, outcome: &str) {
        self.metrics
            .requests
            .with_label_values(&[endpoint, outcome])
            .inc();
    }

    fn record_answer(&self, s: &AskSummary, retrieved: bool) {
        if retrieved {
            self.metrics.query(&s.coverage, &s.timings_ms, true);
        }
        self.metrics
            .answers
            .with_label_values(&[s.answer_mode.as_str(), s.end_reason.as_str()])
            .inc();
    }
}

/// Counts a request in flight until dropped (a streamed answer: until its stream ends).
pub(crate) struct InFlight {
    gauge: prometheus::IntGauge,
}

impl InFlight {
    fn new(st: &AppState, endpoint: &str) -> InFlight {
        let gauge = st.metrics.in_flight.with_label_values(&[endpoint]);
        gauge.inc();
        InFlight { gauge }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A JSON body whose rejection (malformed, wrong shape, too large) is an [`ApiError`].
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(r) => Err(ApiError::from_rejection(r)),
        }
    }
}

/// A running gateway.
pub struct Gateway {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in progress finish (up to 5 s), and returns.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let abort = self.task.abort_handle();
        if tokio::time::timeout(std::time::Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

/// Serves the API on `addr` for `client`'s cluster.
pub async fn serve(
    cfg: Arc<ClusterConfig>,
    client: Arc<Client>,
    addr: &str,
) -> Result<Gateway, GatewayError> {
    let listen_err = |e: std::io::Error| GatewayError::Listen {
        addr: addr.to_string(),
        reason: e.to_string(),
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(listen_err)?;
    let local = listener.local_addr().map_err(listen_err)?;
    let keys = cfg.http.keys();
    if keys.is_empty() {
        info!(addr = %local, "HTTP gateway listening (no API keys configured: the API is open)");
    } else {
        info!(addr = %local, keys = keys.len(), "HTTP gateway listening (API keys required)");
    }
    let state = Arc::new(AppState {
        client,
        keys,
        metrics: Metrics::new(),
        cfg,
    });
    let limits = serve::Limits {
        max_connections: state.cfg.http.max_connections,
        header_timeout: std::time::Duration::from_millis(state.cfg.http.header_timeout_ms),
    };
    let app = router(state);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve::accept_loop(listener, app, limits, rx));
    Ok(Gateway {
        addr: local,
        stop: Some(tx),
        task,
    })
}

/// The API's routes, with authentication, request ids and the body limit.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.http.max_body_bytes;
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/v1/status", get(status))
        .route("/v1/models", get(models))
        .route("/v1/retrieve", post(retrieve))
        .route("/v1/documents", post(ingest))
        .route("/v1/documents/{id}", delete(delete_document))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/embeddings", post(openai::embeddings))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Equal-time comparison of a presented key with a configured one.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

async fn authenticate(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let open = matches!(req.uri().path(), "/healthz" | "/readyz");
    if st.keys.is_empty() || open {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(k)
            if st
                .keys
                .iter()
                .any(|key| same_key(key.as_bytes(), k.as_bytes())) =>
        {
            next.run(req).await
        }
        _ => {
            st.count(endpoint_of(req.uri().path()), "unauthorized");
            ApiError::unauthorized().into_response()
        }
    }
}

/// The endpoint label of a path (ids dropped, unknown paths folded).
fn endpoint_of(path: &str) -> &'static str {
    match path {
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        "/v1/status" => "status",
        "/v1/models" => "models",
        "/v1/retrieve" => "retrieve",
        "/v1/documents" => "documents",
        "/v1/chat/completions" => "chat",
        "/v1/embeddings" => "embeddings",
        p if p.starts_with("/v1/documents/") => "delete_document",
        _ => "other",
    }
}

/// A request id from the client's `x-request-id` when it is sane, else a new one.
fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()))
}

/// Request id, a tracing span, latency and outcome counts for every request.
async fn observe(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let id = request_id(&req);
    let endpoint = endpoint_of(req.uri().path());
    let outer = tracing::info_span!("request", id = %id);
    let span = outer
        .in_scope(|| tracing::info_span!("http", method = %req.method(), path = %req.uri().path()));
    let t = Instant::now();
    // the id travels with every call the request makes, to every node
    let mut resp = ragfleet_client::with_request_id(id.clone(), next.run(req))
        .instrument(span.clone())
        .await;
    let status = resp.status();
    st.metrics
        .http_seconds
        .with_label_values(&[endpoint])
        .observe(t.elapsed().as_secs_f64());
    if status != StatusCode::UNAUTHORIZED {
        let outcome = if status.is_success() {
            "ok"
        } else {
            status.canonical_reason().unwrap_or("error")
        };
        st.count(endpoint, outcome);
    }
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            warn!(status = status.as_u16(), ms, "request failed");
        } else {
            info!(status = status.as_u16(), ms, "request");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// `GET /readyz`: 200 when every shard has a serving replica, else 503 naming the shards.
async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    match st.client.status().await {
        Ok(s) => {
            let missing: Vec<u32> = s
                .shards
                .iter()
                .filter(|sh| !sh.replicas.iter().any(|r| r.state == "serving"))
                .map(|sh| sh.id)
                .collect();
            if missing.is_empty() {
                Json(json!({"ready": true})).into_response()
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"ready": false, "shards_without_a_serving_replica": missing})),
                )
                    .into_response()
            }
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "error": e.to_string()})),
        )
            .into_response(),
    }
}

async fn status(State(st): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let s = st.client.status().await?;
    st.metrics.cluster(&s);
    Ok(Json(s).into_response())
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{"id": "ragfleet", "object": "model", "created": 0, "owned_by": st.cfg.name}],
    }))
    .into_response()
}

/// `GET /metrics`: the gateway's metrics, the cluster's state read now, and every node
/// process's own metrics (labelled with its `instance`).
async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    let (status, nodes) = tokio::join!(st.client.status(), st.client.node_metrics());
    if let Ok(s) = status {
        st.metrics.cluster(&s);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::merge(&st.metrics.render(), &nodes),
    )
        .into_response()
}

/// The JSON of a retrieval: what `ragfleet retrieve --json` prints and `/v1/retrieve` answers.
pub fn retrieval_json(r: &RetrieveResult) -> Value {
    json!({
        "hits": r.hits,
        "coverage": r.coverage,
        "timings_ms": {"embed": r.timings_ms.embed, "search": r.timings_ms.search, "rerank": r.timings_ms.rerank, "total": r.timings_ms.total},
        "rerank": r.rerank,
        "degraded": r.degraded,
        "cache": r.cache,
        "hedged": r.hedged,
        "coordinator": r.coordinator,
    })
}

/// `POST /v1/retrieve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetrieveRequest {
    query: String,
    #[serde(default)]
    k: Option<u32>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    rerank: Option<bool>,
    #[serde(default)]
    deadline_ms: Option<u64>,
    /// `false`: computed afresh, bypassing the retrieval-result cache.
    #[serde(default)]
    cache: Option<bool>,
    /// `false`: no hedged shard requests.
    #[serde(default)]
    hedge: Option<bool>,
}

async fn retrieve(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<RetrieveRequest>,
) -> Result<Response, ApiError> {
    // unset: the cluster's `query.mode`
    let mode = error::parse_field::<SearchMode>(req.mode.as_deref(), "mode")?;
    let _guard = InFlight::new(&st, "retrieve");
    let options = RetrieveOptions {
        k: req.k,
        mode,
        rerank: req.rerank,
        deadline_ms: req.deadline_ms,
        cache: req.cache,
        hedge: req.hedge,
    };
    let r = st.client.retrieve(&req.query, options).await?;
    st.metrics.query(&r.coverage, &r.timings_ms, false);
    if r.coverage.shards_total > 0 && r.coverage.shards_answered == 0 {
        // nothing of the corpus could be searched: not an empty answer but an outage
        return Err(ApiError {
            retry_after: Some(1),
            detail: Some(json!({"coverage": r.coverage})),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_coverage",
                "no shard could answer the query",
            )
        });
    }
    Ok(Json(retrieval_json(&r)).into_response())
}

/// `POST /v1/documents`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestRequest {
    documents: Vec<DocumentIn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentIn {
    id: String,
    #[serde(default)]
    title: String,
    text: String,
}

/// Ingests documents; answered once every accepted one is durable on a write quorum. A
/// document that failed is named with its reason (`errors: true`); when none went in, the
/// status is 400 (all refused as bad) or 503.
async fn ingest(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<IngestRequest>,
) -> Result<Response, ApiError> {
    let max = st.cfg.http.max_documents;
    if req.documents.is_empty() {
        return Err(ApiError::bad_request("documents is empty"));
    }
    if req.documents.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "{} documents exceed the limit of {max} a request (http.max_documents)",
                req.documents.len()
            ),
        ));
    }
    let mut refused = Vec::new();
    let mut docs = Vec::new();
    for d in req.documents {
        let d = Document {
            id: d.id,
            title: d.title,
            text: d.text,
        };
        match d.check() {
            Ok(()) => docs.push(d),
            Err(e) => refused.push((d.id, e)),
        }
    }
    let _guard = InFlight::new(&st, "documents");
    let mut r = if docs.is_empty() {
        ragfleet_proto::IngestResult::default()
    } else {
        st.client.ingest(docs).await?
    };
    let bad = refused.len();
    r.failed.extend(refused);
    st.metrics
        .ingested
        .with_label_values(&["documents"])
        .inc_by(r.documents);
    st.metrics
        .ingested
        .with_label_values(&["chunks"])
        .inc_by(r.chunks);
    let failed: Vec<Value> = r
        .failed
        .iter()
        .map(|(id, e)| json!({"id": id, "error": e}))
        .collect();
    let body = json!({
        "documents": r.documents,
        "chunks": r.chunks,
        "errors": !failed.is_empty(),
        "failed": failed,
    });
    let status = if r.documents > 0 || r.failed.is_empty() {
        StatusCode::OK
    } else if bad == r.failed.len() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, Json(body)).into_response())
}

/// `DELETE /v1/documents/{id}`: acknowledged once durable on a write quorum.
async fn delete_document(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if id.trim().is_empty() {
        return Err(ApiError::bad_request("empty document id"));
    }
    let r = st.client.delete(vec![id.clone()]).await?;
    if let Some((_, e)) = r.failed.first() {
        return Err(ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.clone())
        });
    }
    Ok(Json(json!({"id": id, "deleted": r.documents > 0})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole_and_exact() {
        assert!(same_key(b"abcdefghijklmnop", b"abcdefghijklmnop"));
        assert!(!same_key(b"abcdefghijklmnop", b"abcdefghijklmnoq"));
        assert!(!same_key(b"abcdefghijklmnop", b"abcdefghijklmno"));
        assert!(!same_key(b"", b"x"));
    }

    #[test]
    fn endpoints_are_labelled_without_ids() {
        assert_eq!(endpoint_of("/v1/documents/doc-42"), "delete_document");
        assert_eq!(endpoint_of("/v1/chat/completions"), "chat");
        assert_eq!(endpoint_of("/nope"), "other");
    }
}
