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
    groups, AskOptions, ClusterStatus, Document, IngestResult, Request, Response, RetrieveOptions,
    RetrieveResult, RoleMsg, StreamChunk, WireError,
};
use tracing::debug;

use crate::call::{call, CallError};
use crate::node::start_server;

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
}

/// A connection to a cluster.
pub struct Client {
    cfg: Arc<ClusterConfig>,
    server: ActorRef<NodeServerMessage>,
    current: Mutex<Option<ActorRef<RoleMsg>>>,
    redial: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(t) = self.redial.take() {
            t.abort();
        }
    }
}

/// Opens a session to every node of `cfg` not connected yet.
async fn dial(server: &ActorRef<NodeServerMessage>, cfg: &ClusterConfig) {
    let sessions =
        ractor::call_t!(server, NodeServerMessage::GetSessions, 1_000).unwrap_or_default();
    let connected: Vec<String> = sessions.values().map(|s| s.peer_addr.clone()).collect();
    for n in &cfg.nodes {
        if connected.iter().any(|a| a == &n.addr) {
            continue;
        }
        if let Err(e) = ractor_cluster::client_connect(server, n.addr.as_str()).await {
            debug!(node = %n.name, error = %e, "node unreachable");
        }
    }
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
        let server = start_server(&name, addr, &cfg.cookie)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let mut client = Client {
            cfg,
            server,
            current: Mutex::new(None),
            redial: None,
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
        let (server, cfg) = (client.server.clone(), client.cfg.clone());
        client.redial = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                dial(&server, &cfg).await;
            }
        }));
        Ok(client)
    }

    async fn dial(&self) {
        dial(&self.server, &self.cfg).await;
    }

    /// Calls a coordinator, failing over to another one while `timeout` allows.
    pub async fn request(&self, req: Request, timeout: Duration) -> Result<Response, ClientError> {
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
            match call(&c, req.clone(), left).await {
                Ok(r) => {
                    *self.current.lock().expect("client") = Some(c);
                    return Ok(r);
                }
                Err(CallError::Remote(e)) => return Err(ClientError::Rejected(e)),
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
        match self
            .request(
                Request::Retrieve {
                    query: query.to_string(),
                    options,
                },
                t,
            )
            .await?
        {
            Response::Retrieved(r) => Ok(r),
            other => Err(ClientError::Rejected(WireError::Internal(format!(
                "unexpected answer {other:?}"
            )))),
        }
    }

    /// Ingests documents (acknowledged once durable on a write quorum).
    pub async fn ingest(&self, docs: Vec<Document>) -> Result<IngestResult, ClientError> {
        match self
            .request(Request::Ingest { docs }, Duration::from_secs(900))
            .await?
        {
            Response::Ingested(r) => Ok(r),
            other => Err(ClientError::Rejected(WireError::Internal(format!(
                "unexpected answer {other:?}"
            )))),
        }
    }

    /// Deletes documents (acknowledged once durable on a write quorum); `documents` counts them.
    pub async fn delete(&self, doc_ids: Vec<String>) -> Result<IngestResult, ClientError> {
        match self
            .request(
                Request::Delete {
                    doc_ids,
                    version: 0,
                },
                Duration::from_secs(120),
            )
            .await?
        {
            Response::Ingested(r) => Ok(r),
            other => Err(ClientError::Rejected(WireError::Internal(format!(
                "unexpected answer {other:?}"
            )))),
        }
    }

    /// Cluster status.
    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        match self
            .request(Request::Status, Duration::from_secs(10))
            .await?
        {
            Response::Status(s) => Ok(s),
            other => Err(ClientError::Rejected(WireError::Internal(format!(
                "unexpected answer {other:?}"
            )))),
        }
    }

    /// Asks a question; the answer streams through the returned [`AskStream`].
    pub async fn ask(&self, question: &str, options: AskOptions) -> Result<AskStream, ClientError> {
        let req = Request::Ask {
            question: question.to_string(),
            options,
        };
        match self.request(req, Duration::from_secs(10)).await? {
            Response::StreamStarted { stream } => {
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
                })
            }
            other => Err(ClientError::Rejected(WireError::Internal(format!(
                "unexpected answer {other:?}"
            )))),
        }
    }

    /// Node of the coordinator this client currently uses (after a first request).
    pub async fn coordinator_node(&self) -> Option<String> {
        let c = self.current.lock().expect("client").clone()?;
        match call(&c, Request::Ping, Duration::from_secs(2)).await {
            Ok(Response::Pong(info)) => Some(info.node),
            _ => None,
        }
    }

    /// Actors of a process group as this client sees them (chaos experiments, tests).
    pub fn members(&self, group: &str) -> Vec<ActorRef<RoleMsg>> {
        ractor::pg::get_members(&group.to_string())
            .into_iter()
            .map(ActorRef::from)
            .collect()
    }

    /// Leaves the cluster.
    pub fn close(mut self) {
        if let Some(t) = self.redial.take() {
            t.abort();
        }
        self.server.stop(None);
    }
}

/// The token stream of an answer.
pub struct AskStream {
    coordinator: ActorRef<RoleMsg>,
    stream: u64,
    done: bool,
}

impl AskStream {
    /// The next piece (waiting up to a few seconds for it); `None` after the last.
    pub async fn next(&mut self) -> Option<Result<StreamChunk, ClientError>> {
        if self.done {
            return None;
        }
        let req = Request::StreamNext {
            stream: self.stream,
            wait_ms: 2_000,
        };
        match call(&self.coordinator, req, Duration::from_secs(30)).await {
            Ok(Response::Stream(c)) => {
                self.done = c.done;
                Some(Ok(c))
            }
            Ok(other) => {
                self.done = true;
                Some(Err(ClientError::Rejected(WireError::Internal(format!(
                    "unexpected answer {other:?}"
                )))))
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
