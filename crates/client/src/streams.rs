//! Token streams. The producer appends; the pieces reach the consumer one of two ways:
//!
//! - **pushed**: a stream opened with a [`PushTarget`] sends every piece at once, as an actor
//!   message (`RoleMsg::Push`), to the consumer's inbox ([`crate::inbox`]), where the consumer
//!   reads them from a local stream of the same kind; a consumer whose inbox left the cluster
//!   (its process ended) cancels the stream;
//! - **polled**: a `StreamNext` call takes what arrived (waiting up to its `wait_ms` for news).
//!
//! A pushed stream keeps what it could not send yet (the inbox not yet seen) for the next push
//! or a poll, so nothing is lost or sent twice. Used by generators, coordinators and clients.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::ActorRef;
use ragfleet_proto::{AskSummary, PushTarget, Request, Response, StreamChunk, WireError};
use tokio::sync::Notify;

use crate::{Envelope, RoleMsg};

/// How long a pushed stream waits to see its consumer's inbox before taking the consumer for
/// gone (process-group membership reaches other nodes shortly after an inbox starts).
const INBOX_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Buf {
    text: String,
    tokens: u32,
    done: bool,
    end: Option<String>,
    error: Option<String>,
    summary: Option<AskSummary>,
    touched: Option<Instant>,
    /// The last piece was pushed: nothing is left for anyone to poll.
    delivered: bool,
}

impl Buf {
    /// Takes what is pending as one piece (the end stays marked for later polls).
    fn take(&mut self) -> (StreamChunk, Option<String>) {
        (
            StreamChunk {
                text: std::mem::take(&mut self.text),
                tokens: std::mem::take(&mut self.tokens),
                done: self.done,
                end: self.end.take(),
                summary: self.summary.take(),
            },
            self.error.take(),
        )
    }

    fn pending(&self) -> bool {
        !self.text.is_empty()
            || self.summary.is_some()
            || self.error.is_some()
            || self.end.is_some()
            || (self.done && !self.delivered)
    }
}

/// Where a pushed stream's pieces go.
#[derive(Debug)]
struct Forward {
    target: PushTarget,
    opened: Instant,
    seen: AtomicBool,
}

impl Forward {
    fn inbox(&self) -> Option<ActorRef<RoleMsg>> {
        let m = ractor::pg::get_members(&self.target.group)
            .into_iter()
            .next()
            .map(ActorRef::from);
        if m.is_some() {
            self.seen.store(true, Ordering::Relaxed);
        }
        m
    }

    /// The consumer's inbox left the cluster (it was seen, or never showed up in time).
    fn gone(&self) -> bool {
        self.inbox().is_none()
            && (self.seen.load(Ordering::Relaxed) || self.opened.elapsed() > INBOX_GRACE)
    }

    /// Sends what `b` has pending; keeps it when the inbox cannot be reached.
    fn flush(&self, b: &mut Buf) {
        if !b.pending() {
            return;
        }
        let Some(inbox) = self.inbox() else {
            return;
        };
        let was_done = b.done;
        let (chunk, error) = b.take();
        let msg = Request::Pushed {
            sub: self.target.sub,
            chunk,
            error,
        };
        if inbox.cast(RoleMsg::Push(Envelope::ok(msg))).is_ok() {
            b.delivered = was_done;
        } else {
            tracing::debug!(group = %self.target.group, "a stream piece could not be pushed");
        }
    }
}

/// One stream's producer side.
#[derive(Debug, Clone)]
pub struct StreamWriter {
    buf: Arc<Mutex<Buf>>,
    notify: Arc<Notify>,
    cancelled: Arc<AtomicBool>,
    forward: Option<Arc<Forward>>,
}

impl StreamWriter {
    /// Whether the consumer abandoned the stream (the producer should stop): it cancelled it,
    /// or, for a pushed stream, its inbox left the cluster.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed) || self.forward.as_ref().is_some_and(|f| f.gone())
    }

    /// Whether the pieces are pushed to an inbox.
    pub fn is_pushed(&self) -> bool {
        self.forward.is_some()
    }

    /// Pushes what is pending (pushed streams), then wakes pollers.
    fn changed(&self, mut b: std::sync::MutexGuard<'_, Buf>) {
        if let Some(f) = &self.forward {
            f.flush(&mut b);
        }
        drop(b);
        self.notify.notify_waiters();
    }

    /// How long since the consumer last polled (`None` before its first poll). A consumer
    /// long-polls without pause while it reads, so a long silence means it went away.
    pub fn unpolled_for(&self) -> Option<Duration> {
        self.buf
            .lock()
            .expect("stream")
            .touched
            .map(|t| t.elapsed())
    }

    /// Appends text.
    pub fn push(&self, text: &str, tokens: u32) {
        let mut b = self.buf.lock().expect("stream");
        b.text.push_str(text);
        b.tokens += tokens;
        self.changed(b);
    }

    /// Ends the stream.
    pub fn finish(&self, summary: Option<AskSummary>) {
        let mut b = self.buf.lock().expect("stream");
        b.done = true;
        b.summary = summary;
        self.changed(b);
    }

    /// Ends a generation stream, saying why (`stop`, `length`).
    pub fn finish_end(&self, reason: &str) {
        let mut b = self.buf.lock().expect("stream");
        b.done = true;
        b.end = Some(reason.to_string());
        self.changed(b);
    }

    /// Ends the stream with an error.
    pub fn fail(&self, error: String) {
        let mut b = self.buf.lock().expect("stream");
        b.done = true;
        b.error = Some(error);
        self.changed(b);
    }

    /// Applies a piece pushed by a remote producer (an inbox's local copy of its stream).
    pub fn apply(&self, chunk: StreamChunk, error: Option<String>) {
        let mut b = self.buf.lock().expect("stream");
        b.text.push_str(&chunk.text);
        b.tokens += chunk.tokens;
        if chunk.end.is_some() {
            b.end = chunk.end;
        }
        if chunk.summary.is_some() {
            b.summary = chunk.summary;
        }
        if error.is_some() {
            b.error = error;
        }
        b.done |= chunk.done || b.error.is_some();
        self.changed(b);
    }
}

/// The streams of one actor.
#[derive(Debug, Default)]
pub struct StreamTable {
    next: Mutex<u64>,
    streams: Mutex<HashMap<u64, StreamWriter>>,
}

impl StreamTable {
    /// Opens a stream whose pieces are polled; returns its id and writer.
    pub fn open(&self) -> (u64, StreamWriter) {
        self.open_to(None)
    }

    /// Opens a stream whose pieces are pushed to `target` when given (else polled).
    pub fn open_to(&self, target: Option<PushTarget>) -> (u64, StreamWriter) {
        let id = {
            let mut n = self.next.lock().expect("ids");
            *n += 1;
            // ids unique across restarts of the actor too
            (*n) ^ (rand::random::<u64>() << 20)
        };
        let w = StreamWriter {
            buf: Arc::new(Mutex::new(Buf::default())),
            notify: Arc::new(Notify::new()),
            cancelled: Arc::new(AtomicBool::new(false)),
            forward: target.map(|target| {
                Arc::new(Forward {
                    target,
                    opened: Instant::now(),
                    seen: AtomicBool::new(false),
                })
            }),
        };
        self.gc();
        self.streams.lock().expect("streams").insert(id, w.clone());
        (id, w)
    }

    /// The writer of stream `id`, if it is open.
    pub fn get(&self, id: u64) -> Option<StreamWriter> {
        self.streams.lock().expect("streams").get(&id).cloned()
    }

    /// Drops (and cancels) streams nobody polled for five minutes, and pushed streams whose
    /// last piece was delivered.
    fn gc(&self) {
        let mut s = self.streams.lock().expect("streams");
        s.retain(|_, w| {
            let b = w.buf.lock().expect("stream");
            let keep = !b.delivered
                && b.touched
                    .is_none_or(|t| t.elapsed() < Duration::from_secs(300));
            drop(b);
            if !keep {
                w.cancelled.store(true, Ordering::Relaxed);
            }
            keep
        });
    }

    /// Cancels a stream: its producer sees `is_cancelled` and stops.
    pub fn cancel(&self, id: u64) -> bool {
        match self.streams.lock().expect("streams").remove(&id) {
            Some(w) => {
                w.cancelled.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Takes what the stream has, waiting up to `wait` for news.
    pub async fn next(&self, id: u64, wait: Duration) -> Result<StreamChunk, WireError> {
        let w = self
            .streams
            .lock()
            .expect("streams")
            .get(&id)
            .cloned()
            .ok_or_else(|| WireError::BadRequest(format!("unknown stream {id}")))?;
        let deadline = Instant::now() + wait;
        loop {
            let notified = w.notify.notified();
            let outcome = {
                let mut b = w.buf.lock().expect("stream");
                b.touched = Some(Instant::now());
                (!b.text.is_empty() || b.done || Instant::now() >= deadline).then(|| {
                    match b.error.take() {
                        Some(e) => Err(WireError::Unavailable(e)),
                        None => Ok(b.take().0),
                    }
                })
            };
            // the stream's lock is let go first: `gc` takes the table's lock, then a stream's
            if let Some(r) = outcome {
                if r.as_ref().map_or(true, |c| c.done) {
                    self.streams.lock().expect("streams").remove(&id);
                }
                return r;
            }
            let _ = tokio::time::timeout_at(deadline.into(), notified).await;
        }
    }
}

/// Answers a `StreamNext` request (waiting at most 30 s) as a response.
pub async fn next_response(table: &StreamTable, stream: u64, wait_ms: u64) -> Response {
    match table
        .next(stream, Duration::from_millis(wait_ms.min(30_000)))
        .await
    {
        Ok(c) => Response::Stream(c),
        Err(e) => Response::Error(e),
    }
}
