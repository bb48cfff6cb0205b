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

/// A [`Frame`] as the actor transport carries it: encoded with the frame's own header, decoded
/// defensively (a malformed payload becomes an error frame, never a panic).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<T>(pub Frame<T>);

impl<T> Envelope<T> {
    /// Wraps a value.
    pub fn ok(value: T) -> Self {
        Envelope(Frame::ok(value))
    }
}

impl<T: Serialize + DeserializeOwned> ractor::BytesConvertable for Envelope<T> {
    fn into_bytes(self) -> Vec<u8> {
        self.0.encode()
    }
    fn from_bytes(bytes: Vec<u8>) -> Self {
        Envelope(Frame::decode(&bytes))
    }
}

/// The one message every remotely reachable ragfleet actor accepts.
#[derive(RactorClusterMessage)]
pub enum RoleMsg {
    /// A request that expects one response.
    #[rpc]
    Call(Envelope<Request>, RpcReplyPort<Envelope<Response>>),
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
