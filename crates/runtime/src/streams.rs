//! Token streams served by long polling: the producer appends, a `StreamNext` call takes what
//! arrived (waiting up to its `wait_ms` for news). Used by generators and coordinators.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ragfleet_proto::{AskSummary, Response, StreamChunk, WireError};
use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Buf {
    text: String,
    tokens: u32,
    done: bool,
    end: Option<String>,
    error: Option<String>,
    summary: Option<AskSummary>,
    touched: Option<Instant>,
}

/// One stream's producer side.
#[derive(Debug, Clone)]
pub struct StreamWriter {
    buf: Arc<Mutex<Buf>>,
    notify: Arc<Notify>,
    cancelled: Arc<std::sync::atomic::AtomicBool>,
}

impl StreamWriter {
    /// Whether the consumer abandoned the stream (the producer should stop).
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::Relaxed)
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
        drop(b);
        self.notify.notify_waiters();
    }

    /// Ends the stream.
    pub fn finish(&self, summary: Option<AskSummary>) {
        let mut b = self.buf.lock().expect("stream");
        b.done = true;
        b.summary = summary;
        drop(b);
        self.notify.notify_waiters();
    }

    /// Ends a generation stream, saying why (`stop`, `length`).
    pub fn finish_end(&self, reason: &str) {
        let mut b = self.buf.lock().expect("stream");
        b.done = true;
        b.end = Some(reason.to_string());
        drop(b);
        self.notify.notify_waiters();
    }

    /// Ends the stream with an error.
    pub fn fail(&self, error: String) {
        let mut b = self.buf.lock().expect("stream");
        b.done = true;
        b.error = Some(error);
        drop(b);
        self.notify.notify_waiters();
    }
}

/// The streams of one actor.
#[derive(Debug, Default)]
pub struct StreamTable {
    next: Mutex<u64>,
    streams: Mutex<HashMap<u64, StreamWriter>>,
}

impl StreamTable {
    /// Opens a stream; returns its id and writer.
    pub fn open(&self) -> (u64, StreamWriter) {
        let id = {
            let mut n = self.next.lock().expect("ids");
            *n += 1;
            // ids unique across restarts of the actor too
            (*n) ^ (rand::random::<u64>() << 20)
        };
        let w = StreamWriter {
            buf: Arc::new(Mutex::new(Buf::default())),
            notify: Arc::new(Notify::new()),
            cancelled: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        self.gc();
        self.streams.lock().expect("streams").insert(id, w.clone());
        (id, w)
    }

    /// Drops (and cancels) streams nobody polled for five minutes.
    fn gc(&self) {
        let mut s = self.streams.lock().expect("streams");
        s.retain(|_, w| {
            let keep = w
                .buf
                .lock()
                .expect("stream")
                .touched
                .is_none_or(|t| t.elapsed() < Duration::from_secs(300));
            if !keep {
                w.cancelled
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            keep
        });
    }

    /// Cancels a stream: its producer sees `is_cancelled` and stops.
    pub fn cancel(&self, id: u64) -> bool {
        match self.streams.lock().expect("streams").remove(&id) {
            Some(w) => {
                w.cancelled
                    .store(true, std::sync::atomic::Ordering::Relaxed);
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
            {
                let mut b = w.buf.lock().expect("stream");
                b.touched = Some(Instant::now());
                if !b.text.is_empty() || b.done || Instant::now() >= deadline {
                    if let Some(e) = b.error.take() {
                        self.streams.lock().expect("streams").remove(&id);
                        return Err(WireError::Unavailable(e));
                    }
                    let chunk = StreamChunk {
                        text: std::mem::take(&mut b.text),
                        tokens: std::mem::take(&mut b.tokens),
                        done: b.done,
                        end: b.end.take(),
                        summary: b.summary.take(),
                    };
                    if chunk.done {
                        self.streams.lock().expect("streams").remove(&id);
                    }
                    return Ok(chunk);
                }
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
