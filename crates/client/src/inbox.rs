//! A process's inbox for pushed stream pieces: one actor, in a process group of its own
//! (`ragfleet.inbox.<random>`), that producers on any node push to ([`RoleMsg::Push`]); each
//! subscription is a local stream the consumer reads as it would a polled one, without a round
//! trip. Started on first use, once per process (a client, or a node whose coordinator relays
//! answers).
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ragfleet_proto::{PushTarget, Request, Response, StreamChunk, WireError};
use tokio::sync::OnceCell;

use crate::streams::StreamTable;
use crate::{Envelope, RoleMsg};

/// The inbox of this process.
#[derive(Debug)]
pub struct Inbox {
    group: String,
    table: StreamTable,
}

static INBOX: OnceCell<Arc<Inbox>> = OnceCell::const_new();

/// This process's inbox, started on first use; `None` when its actor cannot start.
async fn inbox() -> Option<Arc<Inbox>> {
    INBOX
        .get_or_try_init(|| async {
            let inbox = Arc::new(Inbox {
                group: format!("ragfleet.inbox.{:016x}", rand::random::<u64>()),
                table: StreamTable::default(),
            });
            let (actor, _) = Actor::spawn(None, InboxActor, inbox.clone())
                .await
                .map_err(|e| tracing::warn!(error = %e, "the stream inbox did not start"))?;
            ractor::pg::join(inbox.group.clone(), vec![actor.get_cell()]);
            Ok::<_, ()>(inbox)
        })
        .await
        .ok()
        .cloned()
}

/// A new subscription of this process's inbox (started on first use); `None` when the inbox
/// cannot start.
pub async fn subscribe() -> Option<Subscription> {
    let inbox = inbox().await?;
    let (id, _) = inbox.table.open();
    Some(Subscription { inbox, id })
}

impl Inbox {
    fn deliver(&self, sub: u64, chunk: StreamChunk, error: Option<String>) {
        match self.table.get(sub) {
            Some(w) => w.apply(chunk, error),
            None => tracing::debug!(sub, "a pushed piece for a closed subscription dropped"),
        }
    }
}

/// One stream's pieces as this process receives them; closed when dropped.
#[derive(Debug)]
pub struct Subscription {
    inbox: Arc<Inbox>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.inbox.table.cancel(self.id);
    }
}

impl Subscription {
    /// Where producers push its pieces.
    pub fn target(&self) -> PushTarget {
        PushTarget {
            group: self.inbox.group.clone(),
            sub: self.id,
        }
    }

    /// What it received, waiting up to `wait` for news (an empty piece when nothing came).
    pub async fn next(&self, wait: Duration) -> Result<StreamChunk, WireError> {
        self.inbox.table.next(self.id, wait).await
    }

    /// A piece got by polling the producer while subscribed: when it says the stream ended,
    /// the end was pushed too (with the summary or end reason the poll no longer has), so that
    /// pushed piece is waited for (a little) and merged in.
    pub async fn settle(&self, polled: StreamChunk) -> StreamChunk {
        if !polled.done {
            return polled;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut merged = polled;
        while std::time::Instant::now() < deadline {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.next(left).await {
                Ok(p) => {
                    merged.text.push_str(&p.text);
                    merged.tokens += p.tokens;
                    merged.end = p.end.or(merged.end);
                    merged.summary = p.summary.or(merged.summary);
                    if p.done {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        merged
    }
}

/// The inbox's actor.
struct InboxActor;

impl Actor for InboxActor {
    type Msg = RoleMsg;
    type State = Arc<Inbox>;
    type Arguments = Arc<Inbox>;

    async fn pre_start(
        &self,
        _me: ActorRef<RoleMsg>,
        inbox: Arc<Inbox>,
    ) -> Result<Arc<Inbox>, ActorProcessingErr> {
        Ok(inbox)
    }

    async fn handle(
        &self,
        _me: ActorRef<RoleMsg>,
        msg: RoleMsg,
        inbox: &mut Arc<Inbox>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RoleMsg::Push(Envelope(frame, _)) => match frame.0 {
                Ok(Request::Pushed { sub, chunk, error }) => inbox.deliver(sub, chunk, error),
                Ok(_) => tracing::debug!("an inbox takes pushed stream pieces only"),
                Err(e) => tracing::warn!(error = %e, "a malformed pushed piece dropped"),
            },
            RoleMsg::Call(_, port) => {
                let _ = port.send(Envelope::ok(Response::Error(WireError::Unsupported(
                    "calls (this is a stream inbox)".into(),
                ))));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pushed_pieces_reach_the_subscription_in_order_and_unpushable_ones_wait_for_a_poll() {
        let sub = subscribe().await.expect("inbox");
        let target = sub.target();
        // the producer side: a stream that pushes to the inbox
        let producers = StreamTable::default();
        let (_, w) = producers.open_to(Some(target));
        assert!(w.is_pushed());
        w.push("Hello", 1);
        w.push(", world", 2);
        let mut text = String::new();
        let mut tokens = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while text.len() < "Hello, world".len() {
            assert!(std::time::Instant::now() < deadline, "got {text:?}");
            let c = sub.next(Duration::from_millis(200)).await.unwrap();
            text.push_str(&c.text);
            tokens += c.tokens;
        }
        assert_eq!((text.as_str(), tokens), ("Hello, world", 3));
        w.finish_end("stop");
        let c = sub.next(Duration::from_secs(5)).await.unwrap();
        assert!(c.done);
        assert_eq!(c.end.as_deref(), Some("stop"));
        // nothing is left for a poll of the producer: it was all pushed
        assert!(!w.is_cancelled());

        // an error reaches the consumer as one
        let sub = subscribe().await.expect("inbox");
        let (_, w) = producers.open_to(Some(sub.target()));
        w.fail("boom".into());
        let e = sub.next(Duration::from_secs(5)).await.unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");

        // a consumer whose inbox group is gone cancels its producer
        let gone = PushTarget {
            group: "ragfleet.inbox.nobody".into(),
            sub: 1,
        };
        let (id, w) = producers.open_to(Some(gone));
        w.push("kept", 1);
        assert!(
            !w.is_cancelled(),
            "within the grace period the inbox may still appear"
        );
        // what could not be pushed stays for a poll: nothing is lost
        let c = producers.next(id, Duration::ZERO).await.unwrap();
        assert_eq!(c.text, "kept");
    }
}
