//! Calling a role actor (from `ragfleet-client`), and the handling every role shares on the
//! serving side.
pub use ragfleet_client::call::{call, reply, CallError};
pub use ragfleet_client::traced;
use ragfleet_client::{Envelope, RoleMsg};
use ragfleet_proto::{ActorInfo, ChaosAction, ReplicaState, Request, Response, Role, WireError};

/// Error response for a request the role does not serve.
pub fn unsupported(req: &Request, role: &str) -> Response {
    let name = format!("{req:?}");
    let name = name
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("")
        .to_string();
    Response::Error(WireError::Unsupported(format!("{name} (this is a {role})")))
}

/// What a stateless role says about itself.
pub fn info(node: &str, role: Role) -> ActorInfo {
    ActorInfo {
        node: node.to_string(),
        role,
        shard: None,
        state: ReplicaState::Serving,
        docs: 0,
        chunks: 0,
        last_seq: 0,
    }
}

/// The id of the client request a message serves (see [`ragfleet_client::traced`]).
pub fn request_id_of(msg: &RoleMsg) -> Option<String> {
    match msg {
        RoleMsg::Call(Envelope(_, id), _) | RoleMsg::Push(Envelope(_, id)) => id.clone(),
    }
}

/// The handling every role shares: a malformed frame is answered with an error, a ping with
/// `describe()`, chaos by panicking (the supervisor restarts the actor) or stalling the
/// mailbox (acknowledged when the stall begins). Anything else is returned for the role to handle.
pub async fn common(
    msg: RoleMsg,
    role: &str,
    describe: impl FnOnce() -> ActorInfo,
) -> Option<(Request, ractor::RpcReplyPort<Envelope<Response>>)> {
    let RoleMsg::Call(Envelope(frame, _), port) = msg else {
        tracing::debug!(role, "a pushed stream piece sent to a role actor dropped");
        return None;
    };
    match frame.0 {
        Err(e) => {
            tracing::warn!(role, error = %e, "malformed request frame refused");
            reply(port, Response::Error(WireError::Frame(e)));
            None
        }
        Ok(Request::Ping) => {
            reply(port, Response::Pong(describe()));
            None
        }
        Ok(Request::Chaos(ChaosAction::Panic)) => {
            tracing::warn!(role, "chaos: panicking");
            panic!("chaos: {role} told to panic");
        }
        Ok(Request::Chaos(ChaosAction::Stall(ms))) => {
            // acknowledged at once (the caller learns the stall is in effect, whatever its
            // length), then the mailbox stays blocked for `ms`
            tracing::warn!(role, ms, "chaos: stalling");
            reply(port, Response::Ack);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            None
        }
        Ok(req) => Some((req, port)),
    }
}
