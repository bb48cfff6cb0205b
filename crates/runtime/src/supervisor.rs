//! An OTP-style supervisor: restarts a failed child (one-for-one) unless restarts exceed the
//! intensity (`max_restarts` within `within`), in which case it fails itself, escalating to its
//! own supervisor. Clean exits are not restarted.
//!
//! The root of a node does not escalate (there is nothing above it but the process): past its
//! intensity it restarts the failed role after a backoff that doubles up to a cap, so a storm of
//! failures slows restarts down instead of taking the node out.
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use ractor_cluster::RactorMessage;
use tracing::{error, info, warn};

/// Spawns a child linked to the given supervisor.
pub type SpawnFn = Arc<
    dyn Fn(ActorCell) -> Pin<Box<dyn Future<Output = Result<ActorCell, String>> + Send>>
        + Send
        + Sync,
>;

/// A child to keep running.
#[derive(Clone)]
pub struct ChildSpec {
    /// Name, for logs.
    pub name: String,
    /// How to (re)start it.
    pub spawn: SpawnFn,
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .finish()
    }
}

/// Supervisor messages (local only).
#[derive(RactorMessage)]
pub enum SupervisorMsg {
    /// Names and ids of the running children.
    Children(RpcReplyPort<Vec<(String, ActorId)>>),
    /// Total restarts performed.
    Restarts(RpcReplyPort<u64>),
    /// Restart child `idx` (a restart that was backed off).
    Restart(usize),
}

/// What a supervisor does past its restart intensity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OnIntensity {
    /// Fail, escalating to its own supervisor.
    Escalate,
    /// Restart the child after a backoff that starts at `first` and doubles up to `max`; the
    /// backoff resets once the intensity window passes without a failure.
    Backoff {
        /// First delay.
        first: Duration,
        /// Longest delay.
        max: Duration,
    },
}

/// Start arguments.
#[derive(Debug)]
pub struct SupervisorArgs {
    /// What it supervises (for logs).
    pub label: String,
    /// Children.
    pub children: Vec<ChildSpec>,
    /// Restart intensity.
    pub max_restarts: u32,
    /// Intensity window.
    pub within: Duration,
    /// Past the intensity: escalate, or back off.
    pub on_intensity: OnIntensity,
}

/// The supervisor actor.
#[derive(Debug, Default)]
pub struct Supervisor;

/// Its state.
#[derive(Debug)]
pub struct SupervisorState {
    args: SupervisorArgs,
    running: HashMap<ActorId, usize>,
    recent: VecDeque<Instant>,
    restarts: u64,
    /// The next backoff delay (when backing off).
    backoff: Option<Duration>,
}

/// The delay of the next backed-off restart (doubling up to the cap).
fn next_backoff(state: &mut SupervisorState) -> Duration {
    let (first, max) = match state.args.on_intensity {
        OnIntensity::Backoff { first, max } => (first, max),
        OnIntensity::Escalate => (Duration::from_millis(250), Duration::from_secs(10)),
    };
    let d = state.backoff.map_or(first, |d| (d * 2).min(max));
    state.backoff = Some(d);
    d
}

async fn start_child(spec: &ChildSpec, me: ActorCell) -> Result<ActorCell, ActorProcessingErr> {
    (spec.spawn)(me)
        .await
        .map_err(|e| -> ActorProcessingErr { format!("cannot start {}: {e}", spec.name).into() })
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut running = HashMap::new();
        for (i, spec) in args.children.iter().enumerate() {
            let cell = start_child(spec, myself.get_cell()).await?;
            running.insert(cell.get_id(), i);
        }
        info!(supervisor = %args.label, children = args.children.len(), "supervisor started");
        Ok(SupervisorState {
            args,
            running,
            recent: VecDeque::new(),
            restarts: 0,
            backoff: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Children(port) => {
                let mut v: Vec<(String, ActorId)> = state
                    .running
                    .iter()
                    .map(|(id, i)| (state.args.children[*i].name.clone(), *id))
                    .collect();
                v.sort();
                let _ = port.send(v);
            }
            SupervisorMsg::Restarts(port) => {
                let _ = port.send(state.restarts);
            }
            SupervisorMsg::Restart(idx) => {
                let name = state.args.children[idx].name.clone();
                match start_child(&state.args.children[idx], myself.get_cell()).await {
                    Ok(cell) => {
                        info!(supervisor = %state.args.label, child = %name, "restarted after backoff");
                        state.running.insert(cell.get_id(), idx);
                        state.restarts += 1;
                        crate::metrics::get()
                            .restarts
                            .with_label_values(&[&state.args.label])
                            .inc();
                    }
                    Err(e) => {
                        // could not even start: try again later, longer
                        let delay = next_backoff(state);
                        error!(supervisor = %state.args.label, child = %name, error = %e, ?delay, "restart failed; trying again");
                        myself.send_after(delay, move || SupervisorMsg::Restart(idx));
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(idx) = state.running.remove(&cell.get_id()) else {
                    return Ok(());
                };
                let name = state.args.children[idx].name.clone();
                let now = Instant::now();
                while state
                    .recent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > state.args.within)
                {
                    state.recent.pop_front();
                }
                if state.recent.is_empty() {
                    state.backoff = None; // a quiet window: start over
                }
                state.recent.push_back(now);
                if state.recent.len() as u32 > state.args.max_restarts {
                    if state.args.on_intensity == OnIntensity::Escalate {
                        error!(supervisor = %state.args.label, child = %name, "restart intensity exceeded: escalating");
                        return Err(format!(
                            "{}: child {name} failed too often ({err})",
                            state.args.label
                        )
                        .into());
                    }
                    let delay = next_backoff(state);
                    error!(supervisor = %state.args.label, child = %name, error = %err, ?delay, "restart intensity exceeded: restarting after a backoff");
                    myself.send_after(delay, move || SupervisorMsg::Restart(idx));
                    return Ok(());
                }
                warn!(supervisor = %state.args.label, child = %name, error = %err, "child failed: restarting");
                let cell = start_child(&state.args.children[idx], myself.get_cell()).await?;
                state.running.insert(cell.get_id(), idx);
                state.restarts += 1;
                crate::metrics::get()
                    .restarts
                    .with_label_values(&[&state.args.label])
                    .inc();
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(idx) = state.running.remove(&cell.get_id()) {
                    info!(supervisor = %state.args.label, child = %state.args.children[idx].name, ?reason, "child stopped");
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that panics on any message.
    struct Fragile;

    impl Actor for Fragile {
        type Msg = ();
        type State = ();
        type Arguments = ();
        async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
        async fn handle(
            &self,
            _: ActorRef<()>,
            _: (),
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            panic!("told to fail");
        }
    }

    fn spec() -> ChildSpec {
        ChildSpec {
            name: "fragile".into(),
            spawn: Arc::new(|sup: ActorCell| {
                Box::pin(async move {
                    Actor::spawn_linked(None, Fragile, (), sup)
                        .await
                        .map(|(r, _)| r.get_cell())
                        .map_err(|e| e.to_string())
                })
            }),
        }
    }

    async fn child(sup: &ActorRef<SupervisorMsg>) -> Option<ActorCell> {
        let kids = ractor::call_t!(sup, SupervisorMsg::Children, 1000).ok()?;
        kids.first()
            .and_then(|(_, id)| ractor::registry::where_is_pid(*id))
    }

    async fn storm(on_intensity: OnIntensity) -> (bool, u64) {
        let args = SupervisorArgs {
            label: "test".into(),
            children: vec![spec()],
            max_restarts: 2,
            within: Duration::from_secs(10),
            on_intensity,
        };
        let (sup, handle) = Actor::spawn(None, Supervisor, args).await.unwrap();
        // ten failures in a row, each as soon as the child is back
        for _ in 0..10 {
            let start = Instant::now();
            let c = loop {
                if matches!(
                    sup.get_status(),
                    ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped
                ) {
                    let _ = handle.await;
                    return (false, 0);
                }
                if let Some(c) = child(&sup).await {
                    break c;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "child never came back"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let _ = c.send_message::<()>(());
            let start = Instant::now();
            while child(&sup).await.is_some_and(|x| x.get_id() == c.get_id()) {
                assert!(start.elapsed() < Duration::from_secs(5));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let restarts = ractor::call!(sup, SupervisorMsg::Restarts).unwrap_or(0);
        sup.stop(None);
        (true, restarts)
    }

    #[tokio::test]
    async fn past_its_intensity_a_supervisor_escalates_or_backs_off() {
        // an ordinary supervisor gives up and fails (escalating)
        let (alive, _) = storm(OnIntensity::Escalate).await;
        assert!(!alive, "an escalating supervisor survived a crash loop");
        // the root backs off and keeps restarting
        let (alive, restarts) = storm(OnIntensity::Backoff {
            first: Duration::from_millis(20),
            max: Duration::from_millis(80),
        })
        .await;
        assert!(alive);
        assert!(restarts >= 9, "{restarts} restarts");
    }
}
