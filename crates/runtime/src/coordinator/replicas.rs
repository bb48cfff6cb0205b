//! Replica choice and failover: which replicas of a group to try, in which order, and the one
//! helper that calls them in turn within a deadline, failing over on transient errors.
use std::future::Future;
use std::time::{Duration, Instant};

use ractor::ActorRef;
use ragfleet_client::typed::{call_typed, Typed};
use ragfleet_client::RoleMsg;
use ragfleet_proto::WireError;

use super::Ctx;
use crate::call::CallError;
use crate::health::{Health, Member};

impl Ctx {
    /// Serving members of a group, rotated for load balance; members never pinged yet come
    /// last (a fresh cluster answers before the first heartbeat round).
    pub(crate) fn candidates(&self, group: &str) -> Vec<Member> {
        let h = &self.args.health;
        let mut serving = h.serving(group);
        if !serving.is_empty() {
            let mut rr = self.rr.lock().expect("rr");
            let n = rr
                .entry(group.to_string())
                .or_insert_with(|| rand::random::<u64>() % 1024);
            *n += 1;
            rotate(&mut serving, *n);
        }
        serving.extend(
            h.unproven(group)
                .into_iter()
                .map(|actor| Member::unproven(actor, group)),
        );
        serving
    }
}

/// Rotates `serving` by the group's round-robin position `n`.
pub(crate) fn rotate<T>(serving: &mut [T], n: u64) {
    if !serving.is_empty() {
        let r = (n % serving.len() as u64) as usize;
        serving.rotate_left(r);
    }
}

/// How long each attempt may take.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Budget {
    /// All attempts share this deadline; each attempt but the last gets half the time left, to
    /// leave room to fail over inside the same deadline.
    Split(Instant),
    /// Each attempt gets this long (ingest: no end-to-end deadline).
    Each(Duration),
    /// Each attempt gets all the time left until this deadline (an answer stream: a replica
    /// that starts answering keeps the rest of the deadline).
    Until(Instant),
}

impl Budget {
    /// The time attempt `i` of `n` may take; `None` when the deadline has passed.
    pub(crate) fn attempt(&self, i: usize, n: usize) -> Option<Duration> {
        match *self {
            Budget::Each(d) => Some(d),
            Budget::Until(deadline) => {
                Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero())
            }
            Budget::Split(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    None
                } else if i + 1 < n {
                    Some(left / 2)
                } else {
                    Some(left)
                }
            }
        }
    }
}

/// What a failed attempt on one replica means.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum OnFailure {
    /// Try the next replica. `suspect`: the replica gets no more requests until it answers a
    /// heartbeat (for a timeout, only when the attempt was allowed a heartbeat period or more:
    /// [`Health::timeout_tells`]). `reason`: why, when it should replace the reason reported
    /// so far (a replica that is simply gone does not hide that another one timed out).
    Next {
        suspect: bool,
        reason: Option<String>,
    },
    /// The request itself is refused (bad input, another model): no replica would do better.
    Stop(WireError),
}

/// The failover decision for a failed call.
pub(crate) fn on_failure(e: &CallError) -> OnFailure {
    match e {
        CallError::Remote(
            w @ (WireError::BadRequest(_)
            | WireError::ModelMismatch { .. }
            | WireError::Unsupported(_)
            | WireError::Frame(_)),
        ) => OnFailure::Stop(w.clone()),
        // busy, not broken: another replica may have room
        CallError::Remote(WireError::Overloaded(_)) => OnFailure::Next {
            suspect: false,
            reason: Some("overloaded".into()),
        },
        CallError::Timeout | CallError::Remote(WireError::Deadline) => OnFailure::Next {
            suspect: true,
            reason: Some("deadline".into()),
        },
        // gone (its node died, the actor stopped)
        CallError::Unreachable(_) => OnFailure::Next {
            suspect: true,
            reason: None,
        },
        other => OnFailure::Next {
            suspect: true,
            reason: Some(format!("error: {other}")),
        },
    }
}

/// Why no replica answered.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Failed {
    /// The group has no replica to try.
    NoReplica,
    /// The deadline passed before an attempt could start.
    Deadline,
    /// A replica refused the request itself.
    Refused(WireError),
    /// Every replica failed; the reason of the last that said one (`None`: all were gone).
    Exhausted(Option<String>),
}

impl Failed {
    /// The reason as coverage and stage reports spell it.
    pub(crate) fn reason(&self, no_replica: &str) -> String {
        match self {
            Failed::NoReplica | Failed::Exhausted(None) => no_replica.to_string(),
            Failed::Deadline => "deadline".into(),
            Failed::Refused(e) => format!("error: {e}"),
            Failed::Exhausted(Some(r)) => r.clone(),
        }
    }
}

/// Tries `replicas` in order with `attempt(actor, time allowed)` until one succeeds, failing
/// over on transient errors (see [`on_failure`]) within `budget`, and suspecting the replicas
/// that failed in a way that tells against them. The one failover loop of the coordinator.
pub(crate) async fn with_failover<T, F, Fut>(
    health: &Health,
    replicas: Vec<Member>,
    budget: Budget,
    mut attempt: F,
) -> Result<T, Failed>
where
    F: FnMut(ActorRef<RoleMsg>, Duration) -> Fut,
    Fut: Future<Output = Result<T, CallError>>,
{
    if replicas.is_empty() {
        return Err(Failed::NoReplica);
    }
    let n = replicas.len();
    let mut reason = None;
    for (i, m) in replicas.into_iter().enumerate() {
        let Some(time) = budget.attempt(i, n) else {
            return Err(Failed::Deadline);
        };
        match attempt(m.actor.clone(), time).await {
            Ok(v) => return Ok(v),
            Err(e) => match on_failure(&e) {
                OnFailure::Stop(w) => return Err(Failed::Refused(w)),
                OnFailure::Next { suspect, reason: r } => {
                    tracing::debug!(actor = %m.actor.get_id(), error = %e, "replica failed; trying the next");
                    // a timeout counts against the replica only when it had time to answer
                    let timed_out = matches!(
                        e,
                        CallError::Timeout | CallError::Remote(WireError::Deadline)
                    );
                    if suspect && (!timed_out || health.timeout_tells(time)) {
                        health.mark_failed(m.actor.get_id());
                    }
                    if r.is_some() {
                        reason = r;
                    }
                }
            },
        }
    }
    Err(Failed::Exhausted(reason))
}

/// [`with_failover`] for one typed request. An attempt whose replica falls silent meanwhile
/// (its node frozen: the failure detector suspects it) is abandoned as timed out at once.
pub(crate) async fn call_replicas<R: Typed>(
    health: &Health,
    replicas: Vec<Member>,
    req: R,
    budget: Budget,
) -> Result<R::Reply, Failed> {
    with_failover(health, replicas, budget, |actor, time| {
        let req = req.clone();
        async move { call_unless_suspected(health, &actor, req, time).await }
    })
    .await
}

/// Calls `actor`, giving up (as a timeout) when the failure detector suspects it meanwhile.
pub(crate) async fn call_unless_suspected<R: Typed>(
    health: &Health,
    actor: &ActorRef<RoleMsg>,
    req: R,
    time: Duration,
) -> Result<R::Reply, CallError> {
    tokio::select! {
        r = call_typed(actor, req, time) => r,
        _ = health.until_suspected(actor.get_id()) => Err(CallError::Timeout),
    }
}
