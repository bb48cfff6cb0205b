//! Wire protocol of ragfleet: every message that crosses a node boundary.
//!
//! All cross-node traffic goes through one actor message type, [`RoleMsg`], whose payloads are
//! [`Frame`]s: a magic, a protocol version and a postcard body. Decoding never panics: a
//! malformed or foreign frame decodes to `Frame(Err(..))`, which the receiving actor answers with
//! an error instead of crashing the node.
#![warn(missing_docs, unreachable_pub)]

mod frame;
mod types;

pub use frame::{Frame, FrameError, FRAME_MAGIC, PROTOCOL_VERSION};
pub use types::*;

use ractor::RpcReplyPort;
use ractor_cluster::RactorClusterMessage;

/// The one message every remotely reachable ragfleet actor accepts.
#[derive(RactorClusterMessage)]
pub enum RoleMsg {
    /// A request that expects one response.
    #[rpc]
    Call(Frame<Request>, RpcReplyPort<Frame<Response>>),
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
mod tests;
