//! The ragfleet cluster runtime: supervised role actors on ractor, a cluster transport on
//! ractor_cluster, failure detection by heartbeats, a coordinator that scatters and gathers
//! under deadlines and reports coverage. The client library and the actor message the runtime
//! exchanges over the transport come from `ragfleet-client` (re-exported here).
//!
//! Models reach the runtime through the traits of [`models`], so this crate knows no backend.
#![warn(missing_docs, unreachable_pub)]

pub mod agent;
mod bound;
pub mod call;
pub mod coordinator;
pub mod embedder;
pub mod generator;
pub mod health;
pub mod metrics;
pub mod models;
pub mod node;
pub mod reranker;
pub mod shard;
/// Token streams (see [`ragfleet_client::streams`]).
pub use ragfleet_client::streams;
pub mod supervisor;

pub use models::{EmbedModel, GenerateModel, ModelLoader, RerankModel};
pub use node::{start_node, NodeHandle, NodeOptions};
pub use ragfleet_client::{groups, AskStream, Client, ClientError, Envelope, RoleMsg};

/// Errors starting or running a node.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The cluster transport could not start.
    #[error(transparent)]
    Transport(#[from] ragfleet_client::transport::TransportError),
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] ragfleet_config::ConfigError),
    /// An actor could not be spawned.
    #[error("cannot start actor {name}: {reason}")]
    Spawn {
        /// Actor name.
        name: String,
        /// Cause.
        reason: String,
    },
    /// The node's listener could not start.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// Address.
        addr: String,
        /// Cause.
        reason: String,
    },
    /// The HTTP gateway could not start.
    #[error(transparent)]
    Gateway(#[from] ragfleet_gateway::GatewayError),
    /// A model could not be loaded.
    #[error("cannot load model: {0}")]
    Model(String),
}
