//! Wire protocol of ragfleet: every message that crosses a node boundary, as plain data.
//!
//! Requests and responses travel as [`Frame`]s: a magic, a protocol version and a postcard
//! body. Decoding never panics: a malformed or foreign frame decodes to `Frame(Err(..))`, which
//! the receiving actor answers with an error instead of crashing the node.
//!
//! This crate knows no actor runtime and no model: the actor message that carries frames
//! between nodes, and the process-group names, live in `ragfleet-client` (the transport layer
//! the runtime builds on), so the index and models crates depend on plain data only.
#![warn(missing_docs, unreachable_pub)]

mod frame;
mod types;

pub use frame::{Frame, FrameError, FRAME_MAGIC, PROTOCOL_VERSION};
pub use types::*;

#[cfg(test)]
mod tests;
