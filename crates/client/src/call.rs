//! Calling a ragfleet actor with a timeout, mapping every failure to one error type.
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::ActorRef;
use ragfleet_proto::{Frame, Request, Response, WireError};

use crate::{Envelope, RoleMsg};

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
    /// The actor answered with a reply of another shape than the request expects.
    #[error("unexpected answer to {0}")]
    Unexpected(String),
}

/// Calls `actor` with `req`, waiting at most `timeout`.
pub async fn call(
    actor: &ActorRef<RoleMsg>,
    req: Request,
    timeout: Duration,
) -> Result<Response, CallError> {
    let timeout = timeout.max(Duration::from_millis(1));
    let started = std::time::Instant::now();
    // a remote call's reply port is bridged by a task with the same timeout: when that task
    // gives up first, the port closes at the timeout instead of timing out. A port that
    // closes at (about) the timeout is a timeout; one that closes early is a peer gone.
    let timed_out = || started.elapsed() + Duration::from_millis(25) >= timeout;
    let fut = actor.call(|port| RoleMsg::Call(Envelope::ok(req), port), Some(timeout));
    // the reply port's own timeout covers the answer; this one covers a stuck send
    match tokio::time::timeout(timeout + Duration::from_millis(50), fut).await {
        Err(_) => Err(CallError::Timeout),
        Ok(Err(_)) | Ok(Ok(CallResult::SenderError)) if timed_out() => Err(CallError::Timeout),
        Ok(Err(e)) => Err(CallError::Unreachable(e.to_string())),
        Ok(Ok(CallResult::Timeout)) => Err(CallError::Timeout),
        Ok(Ok(CallResult::SenderError)) => {
            Err(CallError::Unreachable("reply channel closed".into()))
        }
        Ok(Ok(CallResult::Success(Envelope(Frame(Ok(Response::Error(e))), _)))) => {
            Err(CallError::Remote(e))
        }
        Ok(Ok(CallResult::Success(Envelope(Frame(Ok(r)), _)))) => Ok(r),
        Ok(Ok(CallResult::Success(Envelope(Frame(Err(e)), _)))) => {
            Err(CallError::Remote(WireError::Frame(e)))
        }
    }
}

/// Replies to a request, logging a failed send (the caller gave up or is gone).
pub fn reply(port: ractor::RpcReplyPort<Envelope<Response>>, resp: Response) {
    if port.send(Envelope::ok(resp)).is_err() {
        tracing::debug!("caller went away before the reply");
    }
}
