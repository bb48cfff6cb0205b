//! The node agent: one per node, in the `ragfleet.node` group; its answers are the node's
//! heartbeat.
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ragfleet_proto::{groups, ActorInfo, ChaosAction, ReplicaState, Request, Response, Role, RoleMsg};

use crate::call::{refuse, reply, unsupported};

/// The agent actor.
#[derive(Debug, Default, Clone)]
pub struct NodeAgent;

/// Agent state.
#[derive(Debug)]
pub struct AgentState {
    node: String,
}

impl Actor for NodeAgent {
    type Msg = RoleMsg;
    type State = AgentState;
    type Arguments = String;

    async fn pre_start(&self, myself: ActorRef<RoleMsg>, node: String) -> Result<AgentState, ActorProcessingErr> {
        ractor::pg::join(groups::NODES.to_string(), vec![myself.get_cell()]);
        Ok(AgentState { node })
    }

    async fn handle(&self, _me: ActorRef<RoleMsg>, msg: RoleMsg, state: &mut AgentState) -> Result<(), ActorProcessingErr> {
        let RoleMsg::Call(frame, port) = msg;
        if let Some(r) = refuse(&frame, "node agent") {
            reply(port, r);
            return Ok(());
        }
        let Ok(req) = frame.0 else { return Ok(()) };
        let resp = match req {
            Request::Ping => Response::Pong(ActorInfo {
                node: state.node.clone(),
                role: Role::Node,
                shard: None,
                state: ReplicaState::Serving,
                docs: 0,
                chunks: 0,
                last_seq: 0,
            }),
            Request::Chaos(ChaosAction::Panic) => panic!("chaos: node agent told to panic"),
            Request::Chaos(ChaosAction::Stall(ms)) => {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                Response::Ack
            }
            other => unsupported(&other, "node agent"),
        };
        reply(port, resp);
        Ok(())
    }
}
