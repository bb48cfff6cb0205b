//! An OTP-style supervisor: restarts a failed child (one-for-one) unless restarts exceed the
//! intensity (`max_restarts` within `within`), in which case it fails itself, escalating to its
//! own supervisor. Clean exits are not restarted.
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
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
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
                state.recent.push_back(now);
                if state.recent.len() as u32 > state.args.max_restarts {
                    error!(supervisor = %state.args.label, child = %name, "restart intensity exceeded: escalating");
                    return Err(format!(
                        "{}: child {name} failed too often ({err})",
                        state.args.label
                    )
                    .into());
                }
                warn!(supervisor = %state.args.label, child = %name, error = %err, "child failed: restarting");
                let cell = start_child(&state.args.children[idx], myself.get_cell()).await?;
                state.running.insert(cell.get_id(), idx);
                state.restarts += 1;
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
