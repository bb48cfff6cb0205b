//! The client library: joins a running cluster as a client node (with the cookie) and calls a
//! coordinator actor. When the coordinator's node dies the client switches to another live
//! coordinator and retries: every request ragfleet serves is idempotent (retrievals, status;
//! ingest upserts by document id).
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{ActorId, ActorRef};
use ractor_cluster::NodeServerMessage;
use ragfleet_config::ClusterConfig;
use ragfleet_proto::{
    AskOptions, ClusterStatus, Document, IngestResult, Request, RetrieveOptions, RetrieveResult,
    StreamChunk, WireError,
};
use tracing::debug;

use crate::call::CallError;
use crate::groups;
use crate::transport::{connect, start_server, Tls};
use crate::typed::{self, call_typed, Typed};
use crate::RoleMsg;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No coordinator could be reached.
    #[error("cannot reach the cluster: {0}")]
    Unreachable(String),
    /// The cluster refused the request.
    #[error("{0}")]
    Rejected(WireError),
    /// No answer in time.
    #[error("request timed out")]
    Timeout,
    /// The client's own transport failed to start.
    #[error("client transport: {0}")]
    Transport(String),
    /// The request is larger than a cluster frame may be: refused before it is sent, never
    /// retried.
    #[error("request of {bytes} bytes exceeds the cluster frame limit of {limit} bytes")]
    TooLarge {
        /// Encoded size of the request.
        bytes: usize,
        /// The limit ([`ragfleet_proto::MAX_FRAME_BYTES`]).
        limit: usize,
    },
}

/// Refuses a request whose encoding would not fit one cluster frame (with room for the
/// frame's own header): the receiving node would drop the connection and the client would
/// retry for ever.
fn check_size(req: &Request) -> Result<(), ClientError> {
    let bytes = postcard::to_stdvec(req)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    let limit = ragfleet_proto::MAX_FRAME_BYTES - 4096;
    if bytes > limit {
        return Err(ClientError::TooLarge { bytes, limit });
    }
    Ok(())
}

/// Splits `docs` into requests of at most `max_bytes` of text each (a larger document goes
/// alone), keeping their order.
fn batches_by_size(docs: Vec<Document>, max_bytes: usize) -> Vec<Vec<Document>> {
    let mut out: Vec<Vec<Document>> = Vec::new();
    let mut size = 0;
    for d in docs {
        let n = d.text.len() + d.title.len() + d.id.len();
        if out.is_empty() || (size + n > max_bytes && !out.last().is_some_and(|b| b.is_empty())) {
            out.push(Vec::new());
            size = 0;
        }
        size += n;
        out.last_mut().expect("pushed").push(d);
    }
    out
}

/// A connection to a cluster.
pub struct Client {
    cfg: Arc<ClusterConfig>,
    server: ActorRef<NodeServerMessage>,
    current: Mutex<Option<ActorRef<RoleMsg>>>,
    redial: Option<tokio::task::JoinHandle<()>>,
    watch: Option<tokio::task::JoinHandle<()>>,
    suspects: Suspects,
    /// Inside a node (the HTTP gateway): the node's own transport, which the client must not
    /// stop, and its coordinators first.
    in_node: bool,
    tls: Option<Tls>,
}

/// Coordinators that did not answer a heartbeat within `failure.suspect_after_ms`: a frozen
/// coordinator node keeps its TCP session, so only silence tells.
#[derive(Clone, Default)]
struct Suspects(Arc<Mutex<HashSet<ActorId>>>);

impl Suspects {
    fn has(&self, id: ActorId) -> bool {
        self.0.lock().expect("suspects").contains(&id)
    }
    fn set(&self, id: ActorId, suspected: bool) {
        let mut s = self.0.lock().expect("suspects");
        if suspected {
            s.insert(id);
        } else {
            s.remove(&id);
        }
    }
    /// Resolves once `id` is suspected (polled every 50 ms).
    async fn until(&self, id: ActorId) {
        while !self.has(id) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Pings every coordinator each heartbeat; one that stays silent past `suspect_after` is
/// suspected until it answers again.
async fn watch_coordinators(suspects: Suspects, heartbeat: Duration, suspect_after: Duration) {
    let in_flight: Arc<Mutex<HashSet<ActorId>>> = Arc::default();
    loop {
        for c in coordinators() {
            let id = c.get_id();
            if !in_flight.lock().expect("watch").insert(id) {
                continue;
            }
            let (suspects, in_flight) = (suspects.clone(), in_flight.clone());
            tokio::spawn(async move {
                let ok = call_typed(&c, typed::Ping {}, suspect_after).await.is_ok();
                suspects.set(id, !ok);
                in_flight.lock().expect("watch").remove(&id);
            });
        }
        tokio::time::sleep(heartbeat).await;
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(t) = self.redial.take() {
            t.abort();
        }
        if let Some(t) = self.watch.take() {
            t.abort();
        }
    }
}

/// Opens a session to every node of `cfg` not connected yet.
async fn dial(server: &ActorRef<NodeServerMessage>, cfg: &ClusterConfig, tls: Option<&Tls>) {
    let sessions =
        ractor::call_t!(server, NodeServerMessage::GetSessions, 1_000).unwrap_or_default();
    let connected: Vec<String> = sessions.values().map(|s| s.peer_addr.clone()).collect();
    for n in &cfg.nodes {
        if connected.iter().any(|a| a == &n.addr) {
            continue;
        }
        if let Err(e) = connect(server, n.addr.as_str(), tls).await {
            debug!(node = %n.name, error = %e, "node unreachable");
        }
    }
}

/// Watches the coordinators' heartbeats at the pace of `cfg.failure`.
fn spawn_watch(cfg: &ClusterConfig, suspects: &Suspects) -> tokio::task::JoinHandle<()> {
    tokio::spawn(watch_coordinators(
        suspects.clone(),
        Duration::from_millis(cfg.failure.heartbeat_ms),
        Duration::from_millis(cfg.failure.suspect_after_ms),
    ))
}

fn preferred_is_none(current: &Mutex<Option<ActorRef<RoleMsg>>>) -> bool {
    current.lock().expect("client").is_none()
}

fn coordinators() -> Vec<ActorRef<RoleMsg>> {
    let mut v: Vec<ActorRef<RoleMsg>> = ractor::pg::get_members(&groups::COORDINATORS.to_string())
        .into_iter()
        .map(ActorRef::from)
        .collect();
    v.sort_by_key(|a| a.get_id());
    v
}

impl Client {
    /// Joins the cluster and waits (up to `wait`) for a coordinator to be visible.
    pub async fn connect(cfg: Arc<ClusterConfig>, wait: Duration) -> Result<Client, ClientError> {
        let name = format!(
            "client-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("literal");
        let tls = Tls::of(&cfg).map_err(|e| ClientError::Transport(e.to_string()))?;
        let server = start_server(&name, addr, &cfg.cookie, tls.as_ref())
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let mut client = Client {
            cfg,
            server,
            current: Mutex::new(None),
            redial: None,
            watch: None,
            suspects: Suspects::default(),
            in_node: false,
            tls,
        };
        client.dial().await;
        let start = Instant::now();
        let mut last_dial = Instant::now();
        while coordinators().is_empty() {
            if start.elapsed() > wait {
                let addrs: Vec<&str> = client.cfg.nodes.iter().map(|n| n.addr.as_str()).collect();
                return Err(ClientError::Unreachable(format!(
                    "no coordinator answered at {} within {:?} (are the nodes running, and is the cookie right?)",
                    addrs.join(", "),
                    wait
                )));
            }
            if last_dial.elapsed() > Duration::from_millis(500) {
                client.dial().await;
                last_dial = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // keep sessions to every node: a node that restarts is seen again
        let (server, cfg, tls) = (
            client.server.clone(),
            client.cfg.clone(),
            client.tls.clone(),
        );
        client.redial = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                dial(&server, &cfg, tls.as_ref()).await;
            }
        }));
        client.watch = Some(spawn_watch(&client.cfg, &client.suspects));
        Ok(client)
    }

    /// A client inside a running node (the HTTP gateway): it uses the node's own transport
    /// (whose sessions the node keeps open), prefers the coordinators of this process and fails
    /// over to the others like any client. Coordinators need not be visible yet.
    pub fn attach(cfg: Arc<ClusterConfig>, server: ActorRef<NodeServerMessage>) -> Client {
        let suspects = Suspects::default();
        let watch = spawn_watch(&cfg, &suspects);
        Client {
            cfg,
            server,
            current: Mutex::new(None),
            redial: None,
            watch: Some(watch),
            suspects,
            in_node: true,
            tls: None,
        }
    }

    /// The cluster this client talks to.
    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    async fn dial(&self) {
        if !self.in_node {
            dial(&self.server, &self.cfg, self.tls.as_ref()).await;
        }
    }

    /// Calls a coordinator, failing over to another one while `timeout` allows.
    pub async fn request<R: Typed>(
        &self,
        req: R,
        timeout: Duration,
    ) -> Result<R::Reply, ClientError> {
        check_size(&req.clone().request())?;
        let deadline = Instant::now() + timeout;
        let mut tried: HashSet<ActorId> = HashSet::new();
        let mut last = String::from("no coordinator visible");
        loop {
            let preferred = self.current.lock().expect("client").clone();
            let mut cands = coordinators();
            if let Some(p) = preferred.filter(|p| cands.iter().any(|c| c.get_id() == p.get_id())) {
                cands.retain(|c| c.get_id() != p.get_id());
                cands.insert(0, p);
            }
            cands.retain(|c| !tried.contains(&c.get_id()));
            if self.in_node && preferred_is_none(&self.current) {
                // inside a node: this process's coordinators first
                cands.sort_by_key(|c| !c.get_id().is_local());
            }
            // suspected coordinators last (all may be: then they are tried anyway)
            cands.sort_by_key(|c| self.suspects.has(c.get_id()));
            let Some(c) = cands.into_iter().next() else {
                if Instant::now() >= deadline {
                    return Err(ClientError::Unreachable(last));
                }
                // every known coordinator failed: look for new ones
                tried.clear();
                self.dial().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout);
            }
            // a coordinator that falls silent (its node frozen) is left for another: every
            // request is idempotent
            let suspected_now = self.suspects.has(c.get_id());
            let outcome = tokio::select! {
                r = call_typed(&c, req.clone(), left) => r,
                _ = self.suspects.until(c.get_id()), if !suspected_now => Err(CallError::Unreachable(
                    "coordinator stopped answering heartbeats".into(),
                )),
            };
            match outcome {
                Ok(r) => {
                    *self.current.lock().expect("client") = Some(c);
                    return Ok(r);
                }
                Err(CallError::Remote(e)) => return Err(ClientError::Rejected(e)),
                Err(CallError::Unexpected(e)) => {
                    return Err(ClientError::Rejected(WireError::Internal(format!(
                        "unexpected answer to {e}"
                    ))))
                }
                Err(CallError::Timeout) if Instant::now() >= deadline => {
                    return Err(ClientError::Timeout)
                }
                Err(e) => {
                    debug!(error = %e, "coordinator failed; trying another");
                    last = e.to_string();
                    tried.insert(c.get_id());
                    *self.current.lock().expect("client") = None;
                }
            }
        }
    }

    /// Retrieves the best chunks for `query`.
    pub async fn retrieve(
        &self,
        query: &str,
        options: RetrieveOptions,
    ) -> Result<RetrieveResult, ClientError> {
        let t = Duration::from_millis(options.deadline_ms.unwrap_or(self.cfg.query.deadline_ms))
            + Duration::from_secs(5);
        let query = query.to_string();
        self.request(typed::Retrieve { query, options }, t).await
    }

    /// Ingests documents (acknowledged once durable on a write quorum). A document larger than
    /// [`ragfleet_proto::MAX_DOCUMENT_BYTES`] is reported failed without being sent; the rest
    /// go in requests of at most [`ragfleet_proto::MAX_INGEST_REQUEST_BYTES`] of text.
    pub async fn ingest(&self, docs: Vec<Document>) -> Result<IngestResult, ClientError> {
        let mut result = IngestResult::default();
        let mut sendable = Vec::with_capacity(docs.len());
        for d in docs {
            let size = d.text.len() + d.title.len();
            if size > ragfleet_proto::MAX_DOCUMENT_BYTES {
                // refused here, not sent: the cluster would refuse it (Document::check)
                let e = d.check().err().unwrap_or_default();
                result.failed.push((d.id, format!("{e} (not sent)")));
            } else {
                sendable.push(d);
            }
        }
        for docs in batches_by_size(sendable, ragfleet_proto::MAX_INGEST_REQUEST_BYTES) {
            let r = self
                .request(typed::Ingest { docs }, Duration::from_secs(900))
                .await?;
            result.documents += r.documents;
            result.chunks += r.chunks;
            result.failed.extend(r.failed);
            result.timings_ms.embed += r.timings_ms.embed;
            result.timings_ms.write += r.timings_ms.write;
        }
        Ok(result)
    }

    /// Deletes documents (acknowledged once durable on a write quorum); `documents` counts them.
    pub async fn delete(&self, doc_ids: Vec<String>) -> Result<IngestResult, ClientError> {
        self.request(typed::DeleteDocuments { doc_ids }, Duration::from_secs(120))
            .await
    }

    /// Cluster status.
    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        self.request(typed::Status {}, Duration::from_secs(10))
            .await
    }

    /// Asks a question; the answer streams through the returned [`AskStream`].
    pub async fn ask(
        &self,
        question: &str,
        mut options: AskOptions,
    ) -> Result<AskStream, ClientError> {
        // the answer's pieces are pushed to this process's inbox, unless asked otherwise
        let inbox = match options.push {
            Some(false) => None,
            _ => crate::inbox::subscribe().await,
        };
        options.push_to = inbox.as_ref().map(|s| s.target());
        let req = typed::Ask {
            question: question.to_string(),
            options,
        };
        let stream = self.request(req, Duration::from_secs(10)).await?;
        let coordinator = self
            .current
            .lock()
            .expect("client")
            .clone()
            .ok_or(ClientError::Timeout)?;
        Ok(AskStream {
            coordinator,
            stream,
            done: false,
            suspects: self.suspects.clone(),
            inbox,
        })
    }

    /// Node of the coordinator this client currently uses (after a first request).
    pub async fn coordinator_node(&self) -> Option<String> {
        let c = self.current.lock().expect("client").clone()?;
        call_typed(&c, typed::Ping {}, Duration::from_secs(2))
            .await
            .ok()
            .map(|info| info.node)
    }

    /// Makes the coordinator on `node` the one this client asks first (waiting up to `wait`
    /// for it to be visible); like any, it is left for another when it fails.
    pub async fn prefer(&self, node: &str, wait: Duration) -> Result<(), ClientError> {
        let start = Instant::now();
        loop {
            for c in coordinators() {
                if let Ok(info) = call_typed(&c, typed::Ping {}, Duration::from_secs(2)).await {
                    if info.node == node {
                        *self.current.lock().expect("client") = Some(c);
                        return Ok(());
                    }
                }
            }
            if start.elapsed() > wait {
                return Err(ClientError::Unreachable(format!(
                    "no coordinator on node {node} answered within {wait:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every reachable node process's metrics (Prometheus text), once per process:
    /// `(instance, text)` where `instance` is the process's transport address.
    pub async fn node_metrics(&self) -> Vec<(String, String)> {
        let agents = self.members(groups::NODES);
        let calls = agents.into_iter().map(|a| async move {
            call_typed(&a, typed::Metrics {}, Duration::from_secs(2)).await
        });
        let mut seen = HashSet::new();
        futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .filter(|(instance, _)| seen.insert(instance.clone()))
            .collect()
    }

    /// Actors of a process group as this client sees them (chaos experiments, tests).
    pub fn members(&self, group: &str) -> Vec<ActorRef<RoleMsg>> {
        ractor::pg::get_members(&group.to_string())
            .into_iter()
            .map(ActorRef::from)
            .collect()
    }

    /// Leaves the cluster (a client inside a node leaves the node's transport running).
    pub fn close(mut self) {
        if let Some(t) = self.redial.take() {
            t.abort();
        }
        if !self.in_node {
            self.server.stop(None);
        }
    }

    /// Embeds texts with the cluster's embedding model (through a coordinator, which fails
    /// over between embedder replicas).
    pub async fn embed(
        &self,
        texts: Vec<String>,
    ) -> Result<(ragfleet_proto::ModelIdentity, Vec<Vec<f32>>), ClientError> {
        let t = Duration::from_millis(self.cfg.query.deadline_ms) + Duration::from_secs(5);
        self.request(typed::Embed { texts }, t).await
    }
}

/// The token stream of an answer: pieces pushed to this process's inbox as the coordinator
/// relays them (the coordinator is polled, without waiting, only when they stop coming for
/// [`crate::ANSWER_POLL`], to tell that it is still there and that this client is); or, for a
/// client without an inbox or asked not to, long-polled.
pub struct AskStream {
    coordinator: ActorRef<RoleMsg>,
    stream: u64,
    done: bool,
    suspects: Suspects,
    inbox: Option<crate::inbox::Subscription>,
}

impl Drop for AskStream {
    /// An answer abandoned before its end (a client that went away) is cancelled: the
    /// coordinator stops relaying it and cancels the generator's stream.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (c, stream) = (self.coordinator.clone(), self.stream);
            rt.spawn(async move {
                let _ = call_typed(&c, typed::Cancel { stream }, Duration::from_secs(2)).await;
            });
        }
    }
}

impl AskStream {
    /// The next piece (waiting up to a few seconds for it); `None` after the last.
    pub async fn next(&mut self) -> Option<Result<StreamChunk, ClientError>> {
        if self.done {
            return None;
        }
        let mut wait = crate::ANSWER_POLL;
        if let Some(sub) = &self.inbox {
            match sub.next(crate::ANSWER_POLL).await {
                Ok(c) if !c.text.is_empty() || c.done || c.summary.is_some() => {
                    self.done = c.done;
                    return Some(Ok(c));
                }
                // silence: ask the coordinator, without waiting
                Ok(_) => wait = Duration::ZERO,
                Err(e) => {
                    self.done = true;
                    return Some(Err(ClientError::Rejected(e)));
                }
            }
        }
        let req = typed::StreamNext {
            stream: self.stream,
            wait_ms: wait.as_millis() as u64,
        };
        let id = self.coordinator.get_id();
        let outcome = tokio::select! {
            r = call_typed(&self.coordinator, req, Duration::from_secs(30)) => r,
            _ = self.suspects.until(id) => Err(CallError::Unreachable(
                "it stopped answering heartbeats".into(),
            )),
        };
        match outcome {
            Ok(c) => {
                let c = match &self.inbox {
                    Some(sub) => sub.settle(c).await,
                    None => c,
                };
                self.done = c.done;
                Some(Ok(c))
            }
            Err(CallError::Remote(e)) => {
                self.done = true;
                Some(Err(ClientError::Rejected(e)))
            }
            Err(e) => {
                self.done = true;
                Some(Err(ClientError::Unreachable(format!(
                    "coordinator lost mid-answer: {e}"
                ))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, bytes: usize) -> Document {
        Document {
            id: id.into(),
            title: String::new(),
            text: "x".repeat(bytes),
        }
    }

    #[test]
    fn oversized_requests_are_refused_before_sending() {
        let big = Request::Ingest {
            docs: vec![doc("big", 20 << 20)],
        };
        match check_size(&big) {
            Err(ClientError::TooLarge { bytes, limit }) => {
                assert!(bytes > 20 << 20);
                assert!(limit < ragfleet_proto::MAX_FRAME_BYTES);
            }
            other => panic!("{other:?}"),
        }
        let e = check_size(&big).unwrap_err().to_string();
        assert!(e.contains("exceeds the cluster frame limit"), "{e}");
        assert!(check_size(&Request::Ingest {
            docs: vec![doc("small", 1000)]
        })
        .is_ok());
    }

    #[test]
    fn ingest_batches_split_by_size_in_order() {
        let docs = vec![doc("a", 600), doc("b", 600), doc("c", 2000), doc("d", 10)];
        let b = batches_by_size(docs, 1300);
        let ids: Vec<Vec<&str>> = b
            .iter()
            .map(|x| x.iter().map(|d| d.id.as_str()).collect())
            .collect();
        assert_eq!(ids, vec![vec!["a", "b"], vec!["c"], vec!["d"]]);
        assert!(batches_by_size(Vec::new(), 10).is_empty());
    }
}
