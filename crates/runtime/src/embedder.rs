//! An embedder replica: requests are batched dynamically (up to `max_batch` texts, waiting at
//! most `max_wait` for a batch to fill) and run on a dedicated thread. At most `max_queue` texts
//! wait or are embedded at once; past it a request is refused at once as overloaded (the
//! coordinator tries another replica). A query whose caller stopped waiting before its batch
//! ran (the call's timeout, carried with the request) is dropped unembedded: under load the
//! batches are spent on queries someone still waits for.
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ragfleet_client::{groups, RoleMsg};
use ragfleet_index::chunk::chunk_document;
use ragfleet_index::ranking::sentence_units;
use ragfleet_proto::{
    ChunkRecord, Document, Request, Response, Role, SentenceVectors, WireError, WriteOp,
};
use tokio::sync::oneshot;
use tracing::debug;

use crate::call::{common, info, reply, unsupported};
use crate::models::EmbedModel;

/// Sentence-vector bytes one document may store (beyond it, none: a document's op must fit a
/// cluster frame with its text and chunk vectors).
const MAX_DOC_SENTENCE_BYTES: usize = 2 << 20;

/// How long bulk (ingest) work waits for room in a full queue before it is refused.
const BULK_PATIENCE: Duration = Duration::from_secs(60);

/// Texts to embed in one batch, where the answer goes, and when its caller stops waiting
/// (`None`: bulk work, no deadline).
struct Job {
    texts: Vec<String>,
    tx: oneshot::Sender<Result<Vec<Vec<f32>>, WireError>>,
    deadline: Option<Instant>,
}

impl Job {
    fn abandoned(&self, now: Instant) -> bool {
        self.tx.is_closed() || self.deadline.is_some_and(|d| now >= d)
    }
}

/// Start arguments of an embedder replica.
#[derive(Clone)]
pub struct EmbedderArgs {
    /// Node name.
    pub node: String,
    /// The model.
    pub model: Arc<dyn EmbedModel>,
    /// Largest dynamic batch (texts).
    pub max_batch: usize,
    /// Longest wait for a batch to fill.
    pub max_wait: Duration,
    /// Longest accepted text in bytes.
    pub max_text_bytes: usize,
    /// Texts that may wait or be embedded at once; past it a request is refused as overloaded.
    pub max_queue: usize,
}

/// The embedder actor.
#[derive(Debug, Default, Clone)]
pub struct EmbedderActor;

/// Its state.
pub struct EmbedderState {
    args: EmbedderArgs,
    jobs: Queue,
}

fn batch_loop(
    model: Arc<dyn EmbedModel>,
    rx: mpsc::Receiver<Job>,
    max_batch: usize,
    max_wait: Duration,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut n = jobs[0].texts.len();
        let until = Instant::now() + max_wait;
        while n < max_batch {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) => {
                    n += j.texts.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        crate::metrics::get()
            .queued
            .with_label_values(&["embedder"])
            .sub(n as i64);
        // queries whose callers stopped waiting are answered as late, unembedded
        let now = Instant::now();
        let (jobs, late): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| !j.abandoned(now));
        if !late.is_empty() {
            debug!(
                requests = late.len(),
                "queries abandoned by their callers; not embedded"
            );
        }
        for j in late {
            let _ = j.tx.send(Err(WireError::Deadline));
        }
        if jobs.is_empty() {
            continue;
        }
        let texts: Vec<String> = jobs.iter().flat_map(|j| j.texts.iter().cloned()).collect();
        debug!(
            requests = jobs.len(),
            texts = texts.len(),
            "embedding batch"
        );
        match model.embed(&texts) {
            Ok(vecs) => {
                let mut it = vecs.into_iter();
                for j in jobs {
                    let part: Vec<Vec<f32>> = it.by_ref().take(j.texts.len()).collect();
                    let _ = j.tx.send(Ok(part));
                }
            }
            Err(e) => {
                for j in jobs {
                    let _ = j.tx.send(Err(WireError::Internal(e.clone())));
                }
            }
        }
    }
}

/// The way to the batch thread, bounded: texts waiting or being embedded are counted, and a
/// request that would take them past `max` is refused at once as overloaded.
#[derive(Clone)]
struct Queue {
    jobs: mpsc::Sender<Job>,
    pending: Arc<AtomicUsize>,
    max: usize,
}

impl Queue {
    /// Bulk work (ingest): embeds `texts` in pieces of at most a quarter of the bound, each
    /// waiting for room rather than being refused (queries keep their share of the queue);
    /// overloaded only when no room came within `patience`.
    async fn embed_bulk(
        &self,
        texts: Vec<String>,
        patience: Duration,
    ) -> Result<Vec<Vec<f32>>, WireError> {
        let piece = (self.max / 4).max(1);
        let mut out = Vec::with_capacity(texts.len());
        for part in texts.chunks(piece) {
            let give_up = tokio::time::Instant::now() + patience;
            let mut wait = Duration::from_millis(5);
            loop {
                match self.embed(part.to_vec(), None).await {
                    Err(WireError::Overloaded(_)) if tokio::time::Instant::now() < give_up => {
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_millis(200));
                    }
                    r => {
                        out.extend(r?);
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Embeds `texts` in the next batches; `deadline`: when the caller stops waiting (the
    /// texts are then dropped unembedded if their batch has not started).
    async fn embed(
        &self,
        texts: Vec<String>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Vec<f32>>, WireError> {
        let n = texts.len();
        // one request larger than the bound alone is still taken when nothing waits
        let _pending = crate::bound::take(&self.pending, n, self.max).map_err(|before| {
            WireError::Overloaded(format!(
                "embedder busy: {before} texts waiting or embedding (embedder.max_queue {})",
                self.max
            ))
        })?;
        let (tx, rx) = oneshot::channel();
        let queued = crate::metrics::get()
            .queued
            .with_label_values(&["embedder"]);
        queued.add(n as i64);
        if self
            .jobs
            .send(Job {
                texts,
                tx,
                deadline,
            })
            .is_err()
        {
            queued.sub(n as i64);
            return Err(WireError::Unavailable("embedding thread stopped".into()));
        }
        rx.await
            .map_err(|_| WireError::Unavailable("embedding thread stopped".into()))?
    }
}

/// Chunks and embeds documents (the same code for bulk and incremental ingest); with
/// `sentences`, each chunk's sentences too, in the same batches (their vectors are stored with
/// the chunk for the sentence reranker).
async fn chunk_embed(
    model: Arc<dyn EmbedModel>,
    jobs: Queue,
    docs: Vec<Document>,
    chunk_tokens: usize,
    overlap: usize,
    sentences: bool,
) -> Response {
    let m = model.clone();
    // bytes one stored sentence vector takes (int8 codes and a scale)
    let sentence_bytes = model.identity().dim as usize + 4;
    let chunked = tokio::task::spawn_blocking(move || {
        let mut ok = Vec::new();
        // each chunk's sentence units (as the sentence reranker scores them); none for a
        // document whose sentence vectors would pass MAX_DOC_SENTENCE_BYTES (its op must fit
        // a frame; its sentences are then embedded at query time)
        let mut units: Vec<Vec<String>> = Vec::new();
        let mut failed = Vec::new();
        for d in docs {
            if let Err(e) = d.check() {
                failed.push((d.id, e));
                continue;
            }
            let body = d.body();
            let chunks =
                chunk_document(&d.id, &body, &|t| m.count_tokens(t), chunk_tokens, overlap);
            if chunks.is_empty() {
                failed.push((d.id, "document has no words to embed".to_string()));
                continue;
            }
            if sentences {
                let per: Vec<Vec<String>> =
                    chunks.iter().map(|c| sentence_units(&c.text)).collect();
                let bytes: usize = per.iter().map(|u| u.len() * sentence_bytes).sum();
                if bytes <= MAX_DOC_SENTENCE_BYTES {
                    units.extend(per);
                } else {
                    units.extend(chunks.iter().map(|_| Vec::new()));
                }
            }
            ok.push((d.id, chunks));
        }
        (ok, units, failed)
    })
    .await;
    let Ok((docs, units, failed)) = chunked else {
        return Response::Error(WireError::Internal("chunking failed".into()));
    };
    let mut texts: Vec<String> = docs
        .iter()
        .flat_map(|(_, cs)| cs.iter().map(|c| c.text.clone()))
        .collect();
    let n_chunks = texts.len();
    // the sentences after the chunks, in the same batches
    texts.extend(units.iter().flatten().cloned());
    let vecs = match jobs.embed_bulk(texts, BULK_PATIENCE).await {
        Ok(v) => v,
        Err(e) => return Response::Error(e),
    };
    let mut it = vecs.into_iter();
    let chunk_vecs: Vec<Vec<f32>> = it.by_ref().take(n_chunks).collect();
    let mut sentence_vecs = units.iter().map(|u| {
        let vs: Vec<Vec<f32>> = it.by_ref().take(u.len()).collect();
        SentenceVectors::quantize(&vs)
    });
    let mut it = chunk_vecs.into_iter();
    let ops = docs
        .into_iter()
        .map(|(doc_id, chunks)| WriteOp::Upsert {
            version: 0, // stamped by the coordinator
            chunks: chunks
                .into_iter()
                .map(|c| ChunkRecord {
                    doc_id: doc_id.clone(),
                    chunk_id: c.chunk_id,
                    text: c.text,
                    vector: it.next().unwrap_or_default(),
                    sentences: sentence_vecs.next().unwrap_or_default(),
                })
                .collect(),
            doc_id,
        })
        .collect();
    Response::Chunked {
        model: model.identity(),
        ops,
        failed,
    }
}

impl Actor for EmbedderActor {
    type Msg = RoleMsg;
    type State = EmbedderState;
    type Arguments = EmbedderArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RoleMsg>,
        args: EmbedderArgs,
    ) -> Result<EmbedderState, ActorProcessingErr> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (model, mb, mw) = (args.model.clone(), args.max_batch, args.max_wait);
        std::thread::Builder::new()
            .name("embedder".into())
            .spawn(move || {
                // model compute runs in batches and keeps the kernel's default slice: a short
                // one (the runtime's threads') would hand its core over at every wakeup
                ragfleet_index::priority::default_slice();
                batch_loop(model, rx, mb, mw)
            })?;
        ractor::pg::join(groups::EMBEDDERS.to_string(), vec![myself.get_cell()]);
        let jobs = Queue {
            jobs: tx,
            pending: Arc::default(),
            max: args.max_queue.max(1),
        };
        Ok(EmbedderState { args, jobs })
    }

    async fn handle(
        &self,
        _me: ActorRef<RoleMsg>,
        msg: RoleMsg,
        state: &mut EmbedderState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((req, port)) =
            common(msg, "embedder", || info(&state.args.node, Role::Embedder)).await
        else {
            return Ok(());
        };
        match req {
            Request::Embed { texts } => {
                if let Some(t) = texts.iter().find(|t| t.len() > state.args.max_text_bytes) {
                    let e = format!(
                        "text of {} bytes exceeds the limit of {}",
                        t.len(),
                        state.args.max_text_bytes
                    );
                    reply(port, Response::Error(WireError::BadRequest(e)));
                    return Ok(());
                }
                let jobs = state.jobs.clone();
                let identity = state.args.model.identity();
                let serving = crate::metrics::get().serving("embedder");
                // the call's timeout: past it the caller has moved on
                let deadline = port.get_timeout().map(|t| Instant::now() + t);
                tokio::spawn(async move {
                    let _serving = serving;
                    let r = match jobs.embed(texts, deadline).await {
                        Ok(vectors) => Response::Embeddings {
                            model: identity,
                            vectors,
                        },
                        Err(e) => Response::Error(e),
                    };
                    reply(port, r);
                });
            }
            Request::ChunkEmbed {
                docs,
                chunk_tokens,
                overlap,
                sentences,
            } => {
                let (model, jobs) = (state.args.model.clone(), state.jobs.clone());
                let serving = crate::metrics::get().serving("embedder");
                tokio::spawn(async move {
                    let _serving = serving;
                    let r = chunk_embed(
                        model,
                        jobs,
                        docs,
                        chunk_tokens as usize,
                        overlap as usize,
                        sentences,
                    )
                    .await;
                    reply(port, r);
                });
            }
            other => reply(port, unsupported(&other, "embedder")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod queue_tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[tokio::test]
    async fn texts_past_the_bound_are_refused_at_once_and_uncounted_when_done() {
        let (tx, rx) = mpsc::channel::<Job>();
        let q = Queue {
            jobs: tx,
            pending: Arc::default(),
            max: 4,
        };
        // a batch thread that holds the first job until told
        let (release, held) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            while let Ok(job) = rx.recv() {
                let _ = held.recv();
                let _ = job
                    .tx
                    .send(Ok(job.texts.iter().map(|_| vec![1.0]).collect()));
            }
        });
        let q1 = q.clone();
        let first = tokio::spawn(async move { q1.embed(vec!["a".into(); 3], None).await });
        let start = Instant::now();
        while q.pending.load(Ordering::SeqCst) < 3 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "first request not counted"
            );
            tokio::task::yield_now().await;
        }
        match q.embed(vec!["b".into(); 2], None).await {
            Err(WireError::Overloaded(m)) => assert!(m.contains("embedder.max_queue"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            q.pending.load(Ordering::SeqCst),
            3,
            "a refused request is uncounted"
        );
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap().len(), 3);
        assert_eq!(q.pending.load(Ordering::SeqCst), 0);
        // one request larger than the bound is taken when nothing waits
        release.send(()).unwrap();
        assert_eq!(q.embed(vec!["c".into(); 6], None).await.unwrap().len(), 6);
    }

    /// A model that holds its first batch until told, and records every text it embeds.
    struct Held {
        entered: std::sync::Mutex<Vec<String>>,
        release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl EmbedModel for Held {
        fn identity(&self) -> ragfleet_proto::ModelIdentity {
            ragfleet_proto::ModelIdentity {
                name: "held".into(),
                weights_sha256: String::new(),
                dim: 1,
                max_len: 8,
                pooling: "mean".into(),
                normalized: true,
            }
        }
        fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
            let first = {
                let mut e = self.entered.lock().unwrap();
                let first = e.is_empty();
                e.extend(texts.iter().cloned());
                first
            };
            if first {
                let _ = self.release.lock().unwrap().recv();
            }
            Ok(texts.iter().map(|_| vec![1.0]).collect())
        }
        fn count_tokens(&self, text: &str) -> usize {
            text.len()
        }
    }

    #[tokio::test]
    async fn a_query_whose_caller_stopped_waiting_is_not_embedded() {
        let (tx, rx) = mpsc::channel::<Job>();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let model = Arc::new(Held {
            entered: Default::default(),
            release: std::sync::Mutex::new(held),
        });
        let m: Arc<dyn EmbedModel> = model.clone();
        std::thread::spawn(move || batch_loop(m, rx, 8, Duration::from_millis(1)));
        let q = Queue {
            jobs: tx,
            pending: Arc::default(),
            max: 64,
        };
        // the first batch holds the model; a query with 50 ms to live waits behind it
        let q1 = q.clone();
        let first = tokio::spawn(async move { q1.embed(vec!["bulk".into()], None).await });
        let start = Instant::now();
        while model.entered.lock().unwrap().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(5), "no first batch");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let q2 = q.clone();
        let deadline = Instant::now() + Duration::from_millis(50);
        let hurried =
            tokio::spawn(async move { q2.embed(vec!["hurried".into()], Some(deadline)).await });
        // once it is queued (the pending count says so) and its deadline has passed, the model
        // goes on
        while q.pending.load(std::sync::atomic::Ordering::SeqCst) < 2 || Instant::now() <= deadline
        {
            assert!(start.elapsed() < Duration::from_secs(5), "not queued");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap().len(), 1);
        assert_eq!(hurried.await.unwrap(), Err(WireError::Deadline));
        // a query with time left is embedded as before
        let ok = q
            .embed(
                vec!["patient".into()],
                Some(Instant::now() + Duration::from_secs(5)),
            )
            .await;
        assert_eq!(ok.unwrap().len(), 1);
        assert_eq!(
            *model.entered.lock().unwrap(),
            vec!["bulk".to_string(), "patient".to_string()],
            "an abandoned query was embedded"
        );
    }
}
