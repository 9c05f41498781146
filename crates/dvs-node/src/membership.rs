//! Membership: the node's lease in the directory, and what it does when it loses it.
//!
//! While it runs, a node holds a lease of `[membership] lease_ms` and keeps `nodes/{id}`
//! (a [`MemberRecord`]) attached to it, renewed every quarter of the lease. Every node
//! watches `nodes/`, so `dvs status` shows each node's liveness as the directory sees it;
//! a clean stop or `dvs node leave` revokes the lease, so the others see the node leave at
//! once instead of after the lease.
//!
//! A node that cannot renew its lease within `lease_ms` (counted from the last renewal that
//! succeeded, measured from when it was sent, so the node gives up no later than the
//! directory does) can no longer prove that its endpoints are its own: it **fences** itself.
//! It stops (SIGSTOP) the processes of its endpoints and closes every peer link and refuses
//! new ones, so calls from other nodes fail at once with "node unreachable" instead of
//! reaching a copy that may no longer be the endpoint. Once it holds a new lease it checks
//! every endpoint against the directory: those still recorded on it are resumed, those now
//! recorded elsewhere are killed, and the links come back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dvs_directory::keys::node_key;
use dvs_directory::{CasOutcome, DirError, Directory, LeaseId};
use dvs_wire::{DcId, Ep, NodeId};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::dir::{DirJob, MembersChange};
use crate::event_loop::{blocking, Event, Events, Node};

/// What a node writes under `nodes/{id}` while it holds its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The node's name.
    pub name: String,
    /// Its peer address.
    pub addr: String,
    /// The pid of its node kernel.
    pub pid: u32,
    /// When it took this lease, in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

/// What the lease holder tells the event loop.
#[derive(Debug)]
pub(crate) enum MembershipEvent {
    /// The node holds a lease (at start, or again after losing one).
    Held,
    /// The node lost its lease: fence.
    Lost { reason: String },
}

/// A request to the lease holder.
pub(crate) enum MemberCmd {
    /// Revoke the lease (the node leaves), then stop holding one.
    Leave(oneshot::Sender<Result<(), String>>),
}

/// Milliseconds since the Unix epoch, for [`MemberRecord::since_ms`].
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Takes a lease and writes `nodes/{me}` attached to it (replacing what a previous run
/// left).
async fn acquire(
    dir: &dyn Directory,
    me: NodeId,
    record: &MemberRecord,
    ttl: Duration,
) -> Result<LeaseId, DirError> {
    let lease = dir.grant_lease(ttl).await?;
    let key = node_key(me);
    let value = serde_json::to_string(record).expect("records serialize");
    loop {
        let current = dir.get(&key).await?.map(|v| v.version);
        match dir.cas_leased(&key, current, value.clone(), lease).await? {
            CasOutcome::Done { .. } => return Ok(lease),
            // Changed between the read and the write (an old lease expiring): read again.
            CasOutcome::Conflict { .. } => continue,
        }
    }
}

/// Holds the node's lease until the node leaves (or the event loop is gone), taking a new
/// one whenever it is lost; see the module documentation.
pub(crate) async fn hold(
    dir: Arc<dyn Directory>,
    me: NodeId,
    mut record: MemberRecord,
    ttl: Duration,
    events: Events,
    mut cmds: mpsc::UnboundedReceiver<MemberCmd>,
) {
    let renew_every = ttl / 4;
    let mut pause = Duration::from_millis(100);
    loop {
        // Take a lease, retrying while the directory is away.
        record.since_ms = now_ms();
        let lease = loop {
            let attempt = tokio::select! {
                r = acquire(dir.as_ref(), me, &record, ttl) => r,
                cmd = cmds.recv() => return leave(dir.as_ref(), None, cmd).await,
            };
            match attempt {
                Ok(lease) => break lease,
                Err(e) => {
                    warn!("cannot take a membership lease: {e}; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        };
        pause = Duration::from_millis(100);
        info!("membership lease {lease} held ({} ms)", ttl.as_millis());
        if events
            .send(Event::Membership(MembershipEvent::Held))
            .await
            .is_err()
        {
            return leave(dir.as_ref(), Some(lease), None).await;
        }
        // Renew it until it is lost.
        let mut valid_until = Instant::now() + ttl;
        let reason = loop {
            tokio::select! {
                () = tokio::time::sleep(renew_every) => {}
                cmd = cmds.recv() => return leave(dir.as_ref(), Some(lease), cmd).await,
            }
            let sent = Instant::now();
            let left = valid_until.saturating_duration_since(sent);
            match tokio::time::timeout(left, dir.keep_alive(lease)).await {
                Ok(Ok(())) => valid_until = sent + ttl,
                Ok(Err(DirError::LeaseExpired { .. })) => {
                    break "the directory says it expired".to_string()
                }
                Ok(Err(e)) if Instant::now() < valid_until => {
                    warn!("cannot renew the membership lease yet: {e}");
                }
                Ok(Err(e)) => break format!("not renewed within {} ms: {e}", ttl.as_millis()),
                Err(_) => break format!("not renewed within {} ms", ttl.as_millis()),
            }
        };
        error!("membership lease {lease} lost: {reason}");
        if events
            .send(Event::Membership(MembershipEvent::Lost { reason }))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Revokes `lease` (if any) for a leaving node and answers the request.
async fn leave(dir: &dyn Directory, lease: Option<LeaseId>, cmd: Option<MemberCmd>) {
    let result = match lease {
        Some(l) => dir.revoke_lease(l).await.map_err(|e| e.to_string()),
        None => Ok(()),
    };
    match &result {
        Ok(()) => info!("left the cluster: membership lease revoked"),
        Err(e) => warn!("cannot revoke the membership lease: {e} (it ends with its time to live)"),
    }
    if let Some(MemberCmd::Leave(reply)) = cmd {
        let _ = reply.send(result);
    }
}

/// A node as the directory's `nodes/` shows it.
pub(crate) struct Member {
    /// Its record while it holds a lease; `None` once the lease ended.
    pub record: Option<MemberRecord>,
    /// When this node saw that state begin.
    pub since: Instant,
}

impl Node {
    /// The lease holder took or lost the lease.
    pub(crate) fn membership_event(&mut self, ev: MembershipEvent) {
        match ev {
            MembershipEvent::Held => {
                self.lease_held = true;
                if self.fenced {
                    self.reconcile();
                }
            }
            MembershipEvent::Lost { reason } => {
                self.lease_held = false;
                self.fence(&reason);
            }
        }
    }

    /// What `nodes/` says changed.
    pub(crate) fn members_changed(&mut self, change: MembersChange) {
        let now = Instant::now();
        let known: Vec<NodeId> = self.members.keys().copied().collect();
        let members = &mut self.members;
        let mut set = |node: NodeId, record: Option<MemberRecord>| {
            let m = members.entry(node).or_insert(Member {
                record: None,
                since: now,
            });
            if m.record.is_some() != record.is_some() {
                m.since = now;
            }
            if record.is_none() && m.record.is_some() {
                warn!("node {node} no longer holds its membership lease");
            }
            m.record = record;
        };
        match change {
            MembersChange::All(all) => {
                let alive: BTreeMap<NodeId, MemberRecord> = all.into_iter().collect();
                for node in known {
                    if !alive.contains_key(&node) {
                        set(node, None);
                    }
                }
                for (node, r) in alive {
                    set(node, Some(r));
                }
            }
            MembersChange::Alive(node, r) => set(node, Some(r)),
            MembersChange::Gone(node) => set(node, None),
        }
        let joined: Vec<(NodeId, String)> = self
            .members
            .iter()
            .filter_map(|(n, m)| m.record.as_ref().map(|r| (*n, r.addr.clone())))
            .filter(|(n, _)| !self.links.contains_key(n) && *n != self.ctx.me.id)
            .collect();
        for (node, addr) in joined {
            self.peer_joined(node, &addr);
        }
        let gone: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, m)| m.record.is_none())
            .map(|(n, _)| *n)
            .collect();
        for node in gone {
            self.forget_if_left(node);
        }
    }

    /// Forgets node `node` if it is not in the config, holds no lease and has no link: a
    /// node that joined and left (its dialer stops too).
    pub(crate) fn forget_if_left(&mut self, node: NodeId) {
        let alive = self.members.get(&node).is_some_and(|m| m.record.is_some());
        if alive || self.ctx.cfg.node_by_id(node).is_some() || self.peers.contains_key(&node) {
            return;
        }
        if self.ctx.joined.borrow_mut().remove(&node) {
            info!("node {node} left the cluster");
        }
        self.links.remove(&node);
    }

    /// The name of node `id`: from the config, else from its membership record, else its
    /// number.
    pub(crate) fn node_name(&self, id: NodeId) -> String {
        self.ctx
            .cfg
            .node_by_id(id)
            .map(|n| n.name.clone())
            .or_else(|| {
                self.members
                    .get(&id)
                    .and_then(|m| m.record.as_ref().map(|r| r.name.clone()))
            })
            .unwrap_or_else(|| id.to_string())
    }

    /// The process trees of this node's endpoints (launched or restored here), with the
    /// endpoint each holds.
    pub(crate) fn endpoint_trees(&self) -> Vec<(i32, DcId, Ep)> {
        let launched = self
            .procs
            .launchers()
            .into_iter()
            .filter_map(|pid| self.procs.endpoint_of(pid).map(|(dc, ep)| (pid, dc, ep)));
        let restored = self
            .migrations
            .restored
            .iter()
            .map(|(pid, r)| (*pid, r.dc, r.ep));
        launched.chain(restored).collect()
    }

    /// Lost the lease: stop the endpoints' processes and every link (see the module
    /// documentation).
    fn fence(&mut self, reason: &str) {
        if self.fenced {
            return;
        }
        self.fenced = true;
        self.ctx.fenced.set(true);
        let trees = self.endpoint_trees();
        error!(
            "fenced: the membership lease is lost ({reason}); stopping {} endpoint process trees and every peer link until it is back",
            trees.len()
        );
        tokio::task::spawn_local(async move {
            let _ = blocking(move || {
                for (root, dc, ep) in trees {
                    if let Err(e) = dvs_checkpoint::stop_tree(root) {
                        warn!("cannot stop the process tree of {dc}/{ep} (pid {root}): {e}");
                    }
                }
            })
            .await;
        });
        for p in self.peers.values() {
            p.wire.close();
        }
    }

    /// Holds a lease again after a fence: asks the directory who owns this node's endpoints.
    fn reconcile(&mut self) {
        let endpoints: Vec<(DcId, Ep)> = self
            .endpoint_trees()
            .into_iter()
            .map(|(_, dc, ep)| (dc, ep))
            .collect();
        let (reply, answer) = oneshot::channel();
        if self.dir.send(DirJob::Owners { endpoints, reply }).is_err() {
            return;
        }
        let events = self.ctx.events.clone();
        tokio::task::spawn_local(async move {
            if let Ok(owners) = answer.await {
                let _ = events.send(Event::Reconciled(owners)).await;
            }
        });
    }

    /// The directory's answer to [`Node::reconcile`]: resume what is still this node's,
    /// kill what is recorded elsewhere now, and take links again.
    pub(crate) fn reconciled(&mut self, owners: crate::dir::Owners) {
        if !self.fenced || !self.lease_held {
            return;
        }
        let me = self.ctx.me.id;
        let owners: BTreeMap<(DcId, Ep), Option<NodeId>> = owners.into_iter().collect();
        let mut resume = Vec::new();
        let mut kill = Vec::new();
        for (root, dc, ep) in self.endpoint_trees() {
            match owners.get(&(dc, ep)) {
                Some(Some(n)) if *n != me => {
                    warn!(
                        "{dc}/{ep} is recorded on node {n} now: killing its copy here (pid {root})"
                    );
                    kill.push(root);
                }
                _ => resume.push(root),
            }
        }
        info!(
            "holding the membership lease again: resuming {} endpoint process trees, killing {}",
            resume.len(),
            kill.len()
        );
        tokio::task::spawn_local(async move {
            let _ = blocking(move || {
                for root in kill {
                    let _ = dvs_checkpoint::kill_tree(root);
                }
                for root in resume {
                    if let Err(e) = dvs_checkpoint::resume_tree(root) {
                        warn!("cannot resume the process tree of pid {root}: {e}");
                    }
                }
            })
            .await;
        });
        self.fenced = false;
        self.ctx.fenced.set(false);
    }

    /// `dvs node leave`: refused while endpoints run here (unless `force`); otherwise the
    /// lease is revoked and the node stops.
    pub(crate) fn leave_request(
        &mut self,
        force: bool,
        reply: oneshot::Sender<Result<String, String>>,
    ) {
        let running: Vec<String> = self
            .core
            .registrations()
            .into_iter()
            .filter(|(dc, ep, _)| self.core.local_pid(*dc, *ep).is_some())
            .map(|(dc, ep, _)| format!("{dc}/{ep}"))
            .collect();
        if !running.is_empty() && !force {
            let _ = reply.send(Err(format!(
                "node {} still runs endpoints {}: migrate them to other nodes first (dvs migrate DC/EP --to NODE), or leave with --force to stop them with the node",
                self.ctx.me.name,
                running.join(", ")
            )));
            return;
        }
        let (done, revoked) = oneshot::channel();
        let _ = self.membership.send(MemberCmd::Leave(done));
        let events = self.ctx.events.clone();
        let name = self.ctx.me.name.clone();
        tokio::task::spawn_local(async move {
            let r = tokio::time::timeout(Duration::from_secs(5), revoked).await;
            let message = match r {
                Ok(Ok(Ok(()))) => format!("node {name} left the cluster (membership lease revoked) and stops"),
                Ok(Ok(Err(e))) => format!("node {name} stops; its membership lease could not be revoked ({e}) and ends with its time to live"),
                _ => format!("node {name} stops; the directory did not answer, so its membership lease ends with its time to live"),
            };
            let _ = reply.send(Ok(message));
            let _ = events.send(Event::Shutdown).await;
        });
    }

    /// Revokes the membership lease (a clean stop or `dvs node leave`), waiting at most 2 s.
    pub(crate) async fn leave_cluster(&mut self) {
        let (reply, answer) = oneshot::channel();
        if self.membership.send(MemberCmd::Leave(reply)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), answer).await;
        }
    }
}
