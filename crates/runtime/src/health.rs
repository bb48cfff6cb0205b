//! Failure detection: every member of the watched process groups is pinged each heartbeat; a
//! member that has not answered within `suspect_after` is suspected and gets no queries until it
//! answers again. ractor_cluster alone notices only a broken socket, never a frozen peer.
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ractor::{ActorId, ActorRef};
use ragfleet_client::RoleMsg;
use ragfleet_proto::{ActorInfo, ReplicaState, Request, Response};

use crate::call::call;

/// What the detector knows of a member.
#[derive(Debug, Clone)]
pub struct Member {
    /// The actor.
    pub actor: ActorRef<RoleMsg>,
    /// Its group.
    pub group: String,
    /// Its last self-description.
    pub info: Option<ActorInfo>,
    /// When it last answered.
    pub last_ok: Option<Instant>,
    /// Set by callers that saw it fail; cleared by its next answer.
    pub failed: bool,
    ping_in_flight: bool,
}

impl Member {
    /// A member the detector has not heard from.
    pub fn unproven(actor: ActorRef<RoleMsg>, group: &str) -> Self {
        Member {
            actor,
            group: group.to_string(),
            info: None,
            last_ok: None,
            failed: false,
            ping_in_flight: false,
        }
    }

    /// Healthy: answered within `suspect_after` and not seen failing since.
    pub fn healthy(&self, suspect_after: Duration) -> bool {
        !self.failed && self.last_ok.is_some_and(|t| t.elapsed() <= suspect_after)
    }

    /// Healthy and serving (shard replicas catching up are not).
    pub fn serving(&self, suspect_after: Duration) -> bool {
        self.healthy(suspect_after)
            && self
                .info
                .as_ref()
                .is_some_and(|i| i.state == ReplicaState::Serving)
    }
}

/// The failure detector's table.
#[derive(Debug)]
pub struct Health {
    members: RwLock<HashMap<ActorId, Member>>,
    /// Silence after which a member is suspected.
    pub suspect_after: Duration,
    /// The shortest call whose timeout counts against its member (see
    /// [`Health::timeout_tells`]): one heartbeat period.
    pub timeout_floor: Duration,
}

impl Health {
    /// An empty table: members are suspected after `suspect_after` of silence, and a call's
    /// timeout counts against its member only when the call was allowed `timeout_floor` or more.
    pub fn new(suspect_after: Duration, timeout_floor: Duration) -> Arc<Self> {
        Arc::new(Health {
            members: RwLock::new(HashMap::new()),
            suspect_after,
            timeout_floor,
        })
    }

    /// Whether a call that timed out after being allowed `time` says anything of its member.
    /// A call cut short by its caller's own deadline (a client asking for an answer within a
    /// few milliseconds) times out on a healthy replica: suspecting it for that would take it
    /// out of service for every other request until its next heartbeat, and a stream of such
    /// requests would keep it out. Shorter than one heartbeat period, a timeout is failed over
    /// and nothing more; the pings settle whether the member is well.
    pub fn timeout_tells(&self, time: Duration) -> bool {
        time >= self.timeout_floor
    }

    /// Members of `group`, healthy or not, that are still in the process group: a member whose
    /// node's session ended (kill -9 closes its socket) is gone at once, not at the next tick.
    pub fn members(&self, group: &str) -> Vec<Member> {
        let present: std::collections::HashSet<ActorId> =
            ractor::pg::get_members(&group.to_string())
                .into_iter()
                .map(|c| c.get_id())
                .collect();
        let m = self.members.read().expect("health lock");
        let mut v: Vec<Member> = m
            .values()
            .filter(|x| x.group == group && present.contains(&x.actor.get_id()))
            .cloned()
            .collect();
        v.sort_by_key(|x| x.actor.get_id());
        v
    }

    /// Healthy, serving members of `group`.
    pub fn serving(&self, group: &str) -> Vec<Member> {
        self.members(group)
            .into_iter()
            .filter(|m| m.serving(self.suspect_after))
            .collect()
    }

    /// Process-group members the detector has not heard from yet (just joined, or not yet
    /// pinged): usable as a last resort, before the first heartbeat round completes.
    pub fn unproven(&self, group: &str) -> Vec<ActorRef<RoleMsg>> {
        let m = self.members.read().expect("health lock");
        let mut v: Vec<ActorRef<RoleMsg>> = ractor::pg::get_members(&group.to_string())
            .into_iter()
            .filter(|c| {
                m.get(&c.get_id())
                    .is_none_or(|e| e.last_ok.is_none() && !e.failed)
            })
            .map(ActorRef::from)
            .collect();
        v.sort_by_key(|a| a.get_id());
        v
    }

    /// Resolves once member `id`, having answered before, stops being healthy (silent past
    /// `suspect_after`, or seen failing); never for a member not heard from yet. Polled every
    /// 50 ms: a call in flight to a replica whose node froze is abandoned by racing this.
    pub async fn until_suspected(&self, id: ActorId) {
        loop {
            let suspected = self
                .members
                .read()
                .expect("health lock")
                .get(&id)
                .is_some_and(|m| m.last_ok.is_some() && !m.healthy(self.suspect_after));
            if suspected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Records a failed call so the member is skipped until it answers a heartbeat.
    pub fn mark_failed(&self, id: ActorId) {
        if let Some(m) = self.members.write().expect("health lock").get_mut(&id) {
            m.failed = true;
        }
    }

    /// One round: sync membership with the process groups, ping everyone not already pinged.
    pub fn tick(self: &Arc<Self>, groups: &[String], ping_timeout: Duration) {
        let mut current: HashMap<ActorId, (ActorRef<RoleMsg>, String)> = HashMap::new();
        for g in groups {
            for cell in ractor::pg::get_members(g) {
                current.insert(cell.get_id(), (ActorRef::from(cell), g.clone()));
            }
        }
        let mut to_ping = Vec::new();
        {
            let mut m = self.members.write().expect("health lock");
            m.retain(|id, _| current.contains_key(id));
            for (id, (actor, group)) in current {
                let e = m.entry(id).or_insert_with(|| Member {
                    actor: actor.clone(),
                    group,
                    info: None,
                    last_ok: None,
                    failed: false,
                    ping_in_flight: false,
                });
                if !e.ping_in_flight {
                    e.ping_in_flight = true;
                    to_ping.push((id, actor));
                }
            }
        }
        for (id, actor) in to_ping {
            let me = self.clone();
            tokio::spawn(async move {
                let res = call(&actor, Request::Ping, ping_timeout).await;
                let mut m = me.members.write().expect("health lock");
                if let Some(e) = m.get_mut(&id) {
                    e.ping_in_flight = false;
                    match res {
                        Ok(Response::Pong(info)) => {
                            e.info = Some(info);
                            e.last_ok = Some(Instant::now());
                            e.failed = false;
                        }
                        // gone (its node's session ended, the actor stopped): no need to
                        // wait for the silence to pass suspect_after
                        Err(crate::call::CallError::Unreachable(_)) => e.failed = true,
                        _ => {}
                    }
                }
            });
        }
    }

    /// Runs `tick` every `period` until the returned handle is aborted.
    pub fn spawn_loop(
        self: &Arc<Self>,
        groups: Vec<String>,
        period: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let ping_timeout = self.suspect_after;
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(period);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                iv.tick().await;
                me.tick(&groups, ping_timeout);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::{Actor, ActorProcessingErr};

    struct Pinged;

    impl Actor for Pinged {
        type Msg = RoleMsg;
        type State = ();
        type Arguments = String;
        async fn pre_start(
            &self,
            me: ActorRef<RoleMsg>,
            group: String,
        ) -> Result<(), ActorProcessingErr> {
            ractor::pg::join(group, vec![me.get_cell()]);
            Ok(())
        }
        async fn handle(
            &self,
            _me: ActorRef<RoleMsg>,
            msg: RoleMsg,
            _st: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            crate::call::common(msg, "node", || {
                crate::call::info("n", ragfleet_proto::Role::Coordinator)
            })
            .await;
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_member_that_left_its_group_is_gone_at_once_not_at_the_next_tick() {
        let group = "ragfleet.test.health".to_string();
        let (a, _) = Actor::spawn(None, Pinged, group.clone()).await.unwrap();
        let h = Health::new(Duration::from_secs(30), Duration::from_millis(200));
        h.tick(std::slice::from_ref(&group), Duration::from_secs(1));
        let start = Instant::now();
        while h.serving(&group).is_empty() {
            assert!(start.elapsed() < Duration::from_secs(5), "no pong");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // its node's session ended (here: the actor stopped): the process group drops it
        a.stop(None);
        while !ractor::pg::get_members(&group).is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "still in the group"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // no tick since, yet it is neither a member nor serving (it answered 30 s ago at most)
        assert!(h.members(&group).is_empty());
        assert!(h.serving(&group).is_empty());
    }
}
