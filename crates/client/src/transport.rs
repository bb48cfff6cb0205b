//! The cluster transport: a ractor_cluster node server on a TCP address, with the cookie.
use std::net::SocketAddr;

use ractor::{Actor, ActorRef};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{NodeServer, NodeServerMessage};

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The address cannot be listened on (taken, not local).
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// Address.
        addr: String,
        /// Cause.
        reason: String,
    },
    /// The node server actor could not start.
    #[error("cannot start the node server {name}: {reason}")]
    Spawn {
        /// Node name.
        name: String,
        /// Cause.
        reason: String,
    },
}

/// Starts the transport of node `name` on `addr`.
pub async fn start_server(
    name: &str,
    addr: SocketAddr,
    cookie: &str,
) -> Result<ActorRef<NodeServerMessage>, TransportError> {
    // bind once ourselves so that a taken port is a clear error, not a dead listener actor
    std::net::TcpListener::bind(addr).map_err(|e| TransportError::Listen {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    let server = NodeServer::new(
        addr.port(),
        cookie.to_string(),
        name.to_string(),
        addr.ip().to_string(),
        None,
        Some(NodeConnectionMode::Isolated),
    )
    .with_listen_addr(addr.ip());
    let (r, _) = Actor::spawn(None, server, ())
        .await
        .map_err(|e| TransportError::Spawn {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
    Ok(r)
}
