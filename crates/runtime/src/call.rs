//! Calling a role actor with a timeout, mapping every failure to one error type.
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::ActorRef;
use ragfleet_proto::{
    ActorInfo, ChaosAction, Frame, ReplicaState, Request, Response, Role, RoleMsg, WireError,
};

/// Why a call produced no response.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// The actor is gone (stopped, crashed, its node disconnected).
    #[error("actor unreachable: {0}")]
    Unreachable(String),
    /// The actor answered with an error.
    #[error("{0}")]
    Remote(WireError),
}

/// Calls `actor` with `req`, waiting at most `timeout`.
pub async fn call(
    actor: &ActorRef<RoleMsg>,
    req: Request,
    timeout: Duration,
) -> Result<Response, CallError> {
    let timeout = timeout.max(Duration::from_millis(1));
    let fut = actor.call(|port| RoleMsg::Call(Frame::ok(req), port), Some(timeout));
    // the reply port's own timeout covers the answer; this one covers a stuck send
    match tokio::time::timeout(timeout + Duration::from_millis(50), fut).await {
        Err(_) => Err(CallError::Timeout),
        Ok(Err(e)) => Err(CallError::Unreachable(e.to_string())),
        Ok(Ok(CallResult::Timeout)) => Err(CallError::Timeout),
        Ok(Ok(CallResult::SenderError)) => {
            Err(CallError::Unreachable("reply channel closed".into()))
        }
        Ok(Ok(CallResult::Success(Frame(Ok(Response::Error(e)))))) => Err(CallError::Remote(e)),
        Ok(Ok(CallResult::Success(Frame(Ok(r))))) => Ok(r),
        Ok(Ok(CallResult::Success(Frame(Err(e))))) => Err(CallError::Remote(WireError::Frame(e))),
    }
}

/// Replies to a request, logging a failed send (the caller gave up or is gone).
pub fn reply(port: ractor::RpcReplyPort<Frame<Response>>, resp: Response) {
    if port.send(Frame::ok(resp)).is_err() {
        tracing::debug!("caller went away before the reply");
    }
}

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

/// The handling every role shares: a malformed frame is answered with an error, a ping with
/// `describe()`, chaos by panicking (the supervisor restarts the actor) or stalling the
/// mailbox (acknowledged when the stall begins). Anything else is returned for the role to handle.
pub async fn common(
    msg: RoleMsg,
    role: &str,
    describe: impl FnOnce() -> ActorInfo,
) -> Option<(Request, ractor::RpcReplyPort<Frame<Response>>)> {
    let RoleMsg::Call(frame, port) = msg;
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
