//! The ragfleet client, and the transport layer every node builds on.
//!
//! A program that queries a cluster depends on this crate alone (with `ragfleet-proto` for the
//! data and `ragfleet-config` for `cluster.toml`): it joins the cluster as a client node and
//! calls a coordinator ([`Client`]). No index, model or role actor is in its dependency tree.
//!
//! The runtime builds its nodes on the same layer: [`RoleMsg`], the one actor message that
//! carries ragfleet [`Frame`](ragfleet_proto::Frame)s between nodes, the process-group names
//! role actors register under ([`groups`]), [`call`](call::call) with a deadline, and the
//! cluster transport ([`transport::start_server`]).
#![warn(missing_docs, unreachable_pub)]

pub mod call;
mod client;
pub mod inbox;
pub mod streams;
pub mod transport;
pub mod typed;

pub use client::{AskStream, Client, ClientError};

/// The longest a client's poll for the next piece of an answer waits: a coordinator that hears
/// no poll for a few times this takes the client for gone and cancels the answer.
pub const ANSWER_POLL: std::time::Duration = std::time::Duration::from_millis(500);

use ractor::RpcReplyPort;
use ractor_cluster::RactorClusterMessage;
use ragfleet_proto::{Frame, Request, Response};
use serde::{de::DeserializeOwned, Serialize};

/// A [`Frame`] as the actor transport carries it, with the id of the client request it serves
/// (if any): encoded as the id's length (one byte, at most [`MAX_REQUEST_ID`]), the id, then the
/// frame with its own header; decoded defensively (a malformed payload becomes an error frame,
/// never a panic).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<T>(pub Frame<T>, pub Option<String>);

/// The longest request id an envelope carries (longer ones are dropped).
pub const MAX_REQUEST_ID: usize = 64;

impl<T> Envelope<T> {
    /// Wraps a value, tagged with the request id of the task that sends it.
    pub fn ok(value: T) -> Self {
        Envelope(Frame::ok(value), request_id())
    }
}

impl<T: Serialize + DeserializeOwned> ractor::BytesConvertable for Envelope<T> {
    fn into_bytes(self) -> Vec<u8> {
        let id = self
            .1
            .filter(|i| i.len() <= MAX_REQUEST_ID)
            .unwrap_or_default();
        let frame = self.0.encode();
        let mut out = Vec::with_capacity(1 + id.len() + frame.len());
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&frame);
        out
    }
    fn from_bytes(bytes: Vec<u8>) -> Self {
        let Some((&n, rest)) = bytes.split_first() else {
            return Envelope(Frame(Err(ragfleet_proto::FrameError::TooShort(0))), None);
        };
        let n = n as usize;
        if n > MAX_REQUEST_ID || rest.len() < n {
            return Envelope(
                Frame(Err(ragfleet_proto::FrameError::Body(
                    "bad request id in the envelope".into(),
                ))),
                None,
            );
        }
        let id = std::str::from_utf8(&rest[..n])
            .ok()
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        Envelope(Frame::decode(&rest[n..]), id)
    }
}

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the client request the current task serves, if it serves one.
pub fn request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

/// Runs `fut` with `id` as its request id (no span: see [`traced`]).
pub async fn with_request_id<F: std::future::Future>(id: String, fut: F) -> F::Output {
    REQUEST_ID.scope(id, fut).await
}

/// Runs `fut` as part of request `id` (when there is one): every call it makes carries the id
/// to the actor it calls, and its log lines (and those of the actors that receive them, which
/// do the same) carry it in a `request` span.
pub async fn traced<F: std::future::Future>(id: Option<String>, fut: F) -> F::Output {
    use tracing::Instrument;
    match id {
        Some(id) => {
            let span = tracing::info_span!("request", id = %id);
            REQUEST_ID.scope(id, fut.instrument(span)).await
        }
        None => fut.await,
    }
}

/// The one message every remotely reachable ragfleet actor accepts.
#[derive(RactorClusterMessage)]
pub enum RoleMsg {
    /// A request that expects one response.
    #[rpc]
    Call(Envelope<Request>, RpcReplyPort<Envelope<Response>>),
    /// A piece of a stream pushed to an inbox (`Request::Pushed`); no response.
    Push(Envelope<Request>),
}

/// Process-group names under which role actors register.
pub mod groups {
    /// Every node agent (one per node process that runs roles).
    pub const NODES: &str = "ragfleet.node";
    /// Coordinator actors.
    pub const COORDINATORS: &str = "ragfleet.coordinator";
    /// Embedder replicas.
    pub const EMBEDDERS: &str = "ragfleet.embedder";
    /// Reranker replicas.
    pub const RERANKERS: &str = "ragfleet.reranker";
    /// Generator replicas.
    pub const GENERATORS: &str = "ragfleet.generator";
    /// Replicas of shard `id`.
    pub fn shard(id: u32) -> String {
        format!("ragfleet.shard.{id}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::Message;

    #[tokio::test]
    async fn role_message_round_trips_through_ractor_serialization() {
        let (tx, _rx) = ractor::concurrency::oneshot();
        let msg = RoleMsg::Call(Envelope::ok(Request::Ping), ractor::RpcReplyPort::from(tx));
        let ser = msg.serialize().expect("serializes");
        let back = RoleMsg::deserialize(ser).expect("deserializes");
        match back {
            RoleMsg::Call(frame, _) => assert_eq!(frame, Envelope::ok(Request::Ping)),
            RoleMsg::Push(_) => panic!("a call came back as a push"),
        }
        let push = RoleMsg::Push(Envelope::ok(Request::Status));
        match RoleMsg::deserialize(push.serialize().expect("serializes")).expect("deserializes") {
            RoleMsg::Push(frame) => assert_eq!(frame, Envelope::ok(Request::Status)),
            RoleMsg::Call(..) => panic!("a push came back as a call"),
        }
    }

    #[tokio::test]
    async fn role_message_with_garbage_args_gives_error_frame() {
        let (tx, _rx) = ractor::concurrency::oneshot::<Vec<u8>>();
        // one argument of 3 garbage bytes, length-prefixed as the derive macro expects
        let mut args = 3u64.to_be_bytes().to_vec();
        args.extend_from_slice(&[1, 2, 3]);
        let ser = ractor::message::SerializedMessage::Call {
            variant: "Call".into(),
            args,
            reply: ractor::RpcReplyPort::from(tx),
            metadata: None,
        };
        match RoleMsg::deserialize(ser) {
            Ok(RoleMsg::Call(frame, _)) => assert!(frame.0 .0.is_err()),
            Ok(RoleMsg::Push(_)) => panic!("a call came back as a push"),
            Err(_) => {} // rejected outright is fine too
        }
        // a truncated length prefix is rejected
        let (tx, _rx) = ractor::concurrency::oneshot::<Vec<u8>>();
        let ser = ractor::message::SerializedMessage::Call {
            variant: "Call".into(),
            args: vec![0, 0, 0],
            reply: ractor::RpcReplyPort::from(tx),
            metadata: None,
        };
        assert!(RoleMsg::deserialize(ser).is_err());
    }
}

#[cfg(test)]
mod envelope_tests {
    use super::*;
    use ractor::BytesConvertable;
    use ragfleet_proto::{Request, WireError};

    #[test]
    fn an_envelope_carries_its_request_id_across_the_wire() {
        let e = Envelope(Frame::ok(Request::Status), Some("req-42".to_string()));
        let back = Envelope::<Request>::from_bytes(e.clone().into_bytes());
        assert_eq!(back, e);
        let none = Envelope(Frame::ok(Request::Status), None);
        assert_eq!(
            Envelope::<Request>::from_bytes(none.clone().into_bytes()),
            none
        );
        // an id too long is not sent
        let long = Envelope(
            Frame::ok(Request::Status),
            Some("x".repeat(MAX_REQUEST_ID + 1)),
        );
        assert_eq!(Envelope::<Request>::from_bytes(long.into_bytes()).1, None);
    }

    #[test]
    fn malformed_envelopes_decode_to_errors_not_panics() {
        for bytes in [
            vec![],
            vec![200],
            vec![5, b'a'],
            vec![3, 0xff, 0xfe, 0xfd, b'R', b'F'],
        ] {
            let e = Envelope::<Request>::from_bytes(bytes.clone());
            assert!(e.0 .0.is_err(), "{bytes:?} decoded to {e:?}");
        }
        let r = Envelope::<Response>::from_bytes(
            Envelope(Frame::ok(Response::Error(WireError::Deadline)), None).into_bytes(),
        );
        assert_eq!(r.0 .0, Ok(Response::Error(WireError::Deadline)));
    }

    #[tokio::test]
    async fn calls_made_inside_a_request_carry_its_id() {
        assert_eq!(request_id(), None);
        let inside = traced(Some("abc".into()), async {
            (request_id(), Envelope::ok(Request::Status).1)
        })
        .await;
        assert_eq!(inside, (Some("abc".into()), Some("abc".into())));
        assert_eq!(Envelope::ok(Request::Status).1, None);
    }
}
