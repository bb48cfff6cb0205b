//! The node agent: one per node, in the `ragfleet.node` group; its answers are the node's
//! heartbeat.
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ragfleet_client::{groups, RoleMsg};
use ragfleet_proto::{Request, Response, Role};

use crate::call::{common, info, reply, unsupported};

/// The agent actor.
#[derive(Debug, Default, Clone)]
pub struct NodeAgent;

/// Agent state.
#[derive(Debug)]
pub struct AgentState {
    node: String,
    instance: String,
}

impl Actor for NodeAgent {
    type Msg = RoleMsg;
    type State = AgentState;
    /// The node's name and its process's transport address.
    type Arguments = (String, String);

    async fn pre_start(
        &self,
        myself: ActorRef<RoleMsg>,
        (node, instance): (String, String),
    ) -> Result<AgentState, ActorProcessingErr> {
        ractor::pg::join(groups::NODES.to_string(), vec![myself.get_cell()]);
        Ok(AgentState { node, instance })
    }

    async fn handle(
        &self,
        _me: ActorRef<RoleMsg>,
        msg: RoleMsg,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some((req, port)) = common(msg, "node agent", || info(&state.node, Role::Node)).await
        {
            match req {
                Request::Metrics => {
                    let text = crate::metrics::get().render();
                    let instance = state.instance.clone();
                    reply(port, Response::Metrics { instance, text });
                }
                other => reply(port, unsupported(&other, "node agent")),
            }
        }
        Ok(())
    }
}
