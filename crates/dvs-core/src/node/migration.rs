//! Live migration of an endpoint (docs/ARCHITECTURE.md §3(d), §7.2): MIGR_START, MIGR_COMMIT and MIGR_ROLLBACK.
//!
//! Two roles live here:
//! - the **coordinator**, on the node the endpoint runs on: it records the migration in the
//!   directory, broadcasts START and waits for every node of the DC to hold calls to the
//!   endpoint, waits until the process is quiescent, has it checkpointed, streams the image,
//!   has the destination restore it, then decides COMMIT or ROLLBACK with one compare-and-set
//!   of the migration record and broadcasts the outcome;
//! - the **participant**, on every node: calls, notifies, replies and vcopies aimed at a
//!   migrating endpoint are held (never failed) and replayed, in their original order, to the
//!   new location after COMMIT or to the old one after ROLLBACK.
//!
//! A migrating process's pending IPC call travels with it ([`MigratedEndpoint`]): the source
//! node consumed the request bytes already, so the destination runs the call again on the
//! process's new connection. Messages queued for the endpoint are not carried: their senders
//! are told to hold them (`Redirect`) and send them again after the outcome.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use dvs_wire::local::{LocalRequest, LocalResponse};
use dvs_wire::peer::{
    Backend, DeliverKind, MigratedCall, MigratedEndpoint, MigrationId, PeerFrame, RestoreInfo,
};
use dvs_wire::peer::{
    Deliver, IpcFrame, MigrCommit, MigrDone, MigrFrame, MigrPrepare, MigrRestore, MigrRestored,
    MigrRollback, MigrStart, MigrStartAck, Notify, Redirect, Reply,
};
use dvs_wire::{DcId, Ep, Errno, Message, NodeId, Timeout, PROTOCOL_VERSION};

use super::action::{DirRequest, LocalAction, PeerAction, ProcessAction, Report};
use super::{err, reply_response, Action, Blocked, NodeCore, TimerKey};
use crate::table::Registration;
use crate::ConnId;

/// Phases of a migration, as reported to the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Migration record written, START broadcast, every node holding calls.
    Start,
    /// Waiting for the process to be blocked in IPC with no unanswered sendrec.
    Quiesce,
    /// Checkpointing the process on the source.
    Checkpoint,
    /// Streaming the image to the destination.
    Transfer,
    /// Restoring the process on the destination.
    Restore,
    /// Deciding COMMIT and applying it everywhere.
    Commit,
    /// Deciding ROLLBACK and applying it everywhere.
    Rollback,
}

impl Phase {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Start => "start",
            Phase::Quiesce => "quiesce",
            Phase::Checkpoint => "checkpoint",
            Phase::Transfer => "transfer",
            Phase::Restore => "restore",
            Phase::Commit => "commit",
            Phase::Rollback => "rollback",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub use dvs_wire::peer::FailAt;

/// State of a migration record in the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// Running.
    Started,
    /// Decided: committed.
    Committed,
    /// Decided: rolled back.
    RolledBack,
}

/// The migration record of one endpoint, kept in the directory under `migr/{dc}/{ep}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrRecord {
    /// The migration.
    pub id: MigrationId,
    /// Source node.
    pub from: NodeId,
    /// Destination node.
    pub to: NodeId,
    /// Where it stands.
    pub state: RecordState,
}

impl MigrRecord {
    /// Text form stored in the directory.
    pub fn encode(&self) -> String {
        let st = match self.state {
            RecordState::Started => "started",
            RecordState::Committed => "committed",
            RecordState::RolledBack => "rolled_back",
        };
        format!(
            "id={} from={} to={} state={st}",
            self.id, self.from, self.to
        )
    }

    /// Parses [`MigrRecord::encode`]'s form.
    pub fn parse(s: &str) -> Option<Self> {
        let mut id = None;
        let mut from = None;
        let mut to = None;
        let mut state = None;
        for kv in s.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            match k {
                "id" => id = v.parse().ok(),
                "from" => from = v.parse().ok(),
                "to" => to = v.parse().ok(),
                "state" => {
                    state = match v {
                        "started" => Some(RecordState::Started),
                        "committed" => Some(RecordState::Committed),
                        "rolled_back" => Some(RecordState::RolledBack),
                        _ => None,
                    }
                }
                _ => {}
            }
        }
        Some(MigrRecord {
            id: id?,
            from: from?,
            to: to?,
            state: state?,
        })
    }
}

/// What the current migration record must be for a write to go ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Require {
    /// No migration of the endpoint is running (no record, or a decided one).
    NotRunning,
    /// This migration is still undecided.
    Started(MigrationId),
}

impl Require {
    /// Whether `current` satisfies the requirement.
    pub fn allows(&self, current: Option<&MigrRecord>) -> bool {
        match (self, current) {
            (Require::NotRunning, None) => true,
            (Require::NotRunning, Some(r)) => r.state != RecordState::Started,
            (Require::Started(id), Some(r)) => r.id == *id && r.state == RecordState::Started,
            (Require::Started(_), None) => false,
        }
    }
}

/// What an operator asks for.
#[derive(Clone, Debug)]
pub struct MigrationRequest {
    /// DC of the endpoint.
    pub dc: DcId,
    /// The endpoint (running on this node).
    pub ep: Ep,
    /// Destination node.
    pub to: NodeId,
    /// How the process state moves.
    pub backend: Backend,
    /// Make a phase fail on purpose.
    pub fail_at: Option<FailAt>,
    /// Longest wait for the process to become quiescent.
    pub quiesce_timeout: Duration,
}

/// The outcome of a migration, with the time each phase took.
#[derive(Clone, Debug, PartialEq)]
pub struct MigrationReport {
    /// The migration.
    pub id: MigrationId,
    /// DC of the endpoint.
    pub dc: DcId,
    /// The endpoint.
    pub ep: Ep,
    /// Source node.
    pub from: NodeId,
    /// Destination node.
    pub to: NodeId,
    /// Backend used.
    pub backend: Backend,
    /// Whether it committed (else it rolled back).
    pub committed: bool,
    /// Why it rolled back.
    pub error: Option<String>,
    /// Milliseconds spent in each phase, in order.
    pub phases: Vec<(Phase, f64)>,
    /// Milliseconds from START to the outcome applied on the source node.
    pub migration_ms: f64,
    /// Checkpoint image bytes moved.
    pub image_bytes: u64,
    /// Milliseconds the destination took to receive the image (first to last byte).
    pub transfer_ms: f64,
    /// Milliseconds the restore took on the destination.
    pub restore_ms: f64,
    /// Calls, replies and notifications held during the move and replayed, over all nodes.
    pub held: u32,
}

/// How long a participant holds calls for an undecided migration before it tries to decide a
/// rollback itself (the coordinator may have died).
pub const PARTICIPANT_TIMEOUT: Duration = Duration::from_secs(10);

/// Source and destination node of a migration.
pub(crate) type Route = (NodeId, NodeId);

/// Calls and frames held for a migrating endpoint on this node.
#[derive(Default)]
struct Hold {
    /// `None` until MIGR_START arrives.
    id: Option<MigrationId>,
    /// Source and destination, once MIGR_START arrived.
    route: Option<(NodeId, NodeId)>,
    calls: Vec<ConnId>,
    frames: Vec<PeerFrame>,
    /// On the destination: messages for the endpoint (`Deliver`) and the node that sent each.
    delivers: Vec<(NodeId, PeerFrame)>,
}

/// The coordinator's view of one migration.
struct Coord {
    req: MigrationRequest,
    from: NodeId,
    conn: ConnId,
    pid: i32,
    phase: Phase,
    started: Instant,
    phase_started: Instant,
    phases: Vec<(Phase, f64)>,
    acks: BTreeSet<NodeId>,
    /// Set once the outcome is decided: commit or not.
    commit: Option<bool>,
    decided_at: Option<Instant>,
    error: Option<String>,
    checkpointed: bool,
    image_bytes: u64,
    info: Option<RestoreInfo>,
    held: u32,
}

/// The destination's view of one migration.
struct Arrival {
    dc: DcId,
    ep: Ep,
    coordinator: NodeId,
    backend: Backend,
    state: MigratedEndpoint,
    fail_restore: bool,
    conn: Option<ConnId>,
    pid: i32,
    image_bytes: u64,
    first_chunk: Option<Instant>,
    last_chunk: Option<Instant>,
    restore_started: Option<Instant>,
}

/// Migration state of one node.
#[derive(Default)]
pub(crate) struct MigrationState {
    holds: HashMap<(DcId, Ep), Hold>,
    coords: HashMap<MigrationId, Coord>,
    arrivals: HashMap<MigrationId, Arrival>,
    next: u64,
    /// Outcomes this node applied lately. The directory watch can beat the coordinator's
    /// broadcast: a late COMMIT/ROLLBACK for one of them is acknowledged, not applied twice
    /// and not taken for a forgery. And the node an endpoint moved here from replays the
    /// frames it held for it (see `relayed_by`).
    applied: std::collections::VecDeque<Applied>,
    /// CRIU dumps under way, by migration: the pid of the process being dumped. The outcome
    /// may be decided (a rollback, e.g. the destination died) before the dump ends; the dump
    /// then leaves the process stopped, and it must be resumed when the dump ends.
    dumping: HashMap<MigrationId, i32>,
}

/// An outcome applied on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Applied {
    id: MigrationId,
    dc: DcId,
    ep: Ep,
    /// Committed, from node `from` to node `to`.
    moved: Option<(NodeId, NodeId)>,
}

/// How many applied outcomes [`MigrationState`] remembers.
const APPLIED_MEMORY: usize = 256;

impl MigrationState {
    /// Whether `node` may relay frames for `{dc, ep}` to this node `here`: the endpoint is
    /// migrating from `node`, or moved here from it lately, and `node` replays what it held
    /// for it (a reply or notification whose source runs elsewhere).
    pub fn relayed_by(&self, dc: DcId, ep: Ep, node: NodeId, here: NodeId) -> bool {
        self.holds
            .get(&(dc, ep))
            .and_then(|h| h.route)
            .is_some_and(|(a, b)| a == node && b == here)
            || self
                .applied
                .iter()
                .any(|a| (a.dc, a.ep, a.moved) == (dc, ep, Some((node, here))))
    }

    /// Whether this node applied the outcome of migration `id` of `{dc, ep}` lately.
    pub fn recently_applied(&self, id: MigrationId, dc: DcId, ep: Ep) -> bool {
        self.applied
            .iter()
            .any(|a| (a.id, a.dc, a.ep) == (id, dc, ep))
    }

    /// Whether calls to `{dc, ep}` are held here.
    pub fn holds(&self, dc: DcId, ep: Ep) -> bool {
        !self.holds.is_empty() && self.holds.contains_key(&(dc, ep))
    }
    /// Holds connection `conn`'s call to `{dc, ep}`.
    pub fn hold_call(&mut self, dc: DcId, ep: Ep, conn: ConnId) {
        self.holds.entry((dc, ep)).or_default().calls.push(conn);
    }
    /// Forgets a held call (its caller gave up or died).
    pub fn unhold_call(&mut self, conn: ConnId) {
        for h in self.holds.values_mut() {
            h.calls.retain(|c| *c != conn);
        }
    }
    /// Holds a frame for `{dc, ep}` (reply, notify) until the outcome.
    pub fn hold_frame(&mut self, dc: DcId, ep: Ep, frame: PeerFrame) {
        self.holds.entry((dc, ep)).or_default().frames.push(frame);
    }
    /// Whether `node` is the destination of the migration of `{dc, ep}` held here.
    pub fn is_destination(&self, dc: DcId, ep: Ep, node: NodeId) -> bool {
        self.holds
            .get(&(dc, ep))
            .and_then(|h| h.route)
            .is_some_and(|(_, to)| to == node)
    }
    /// Holds a message for `{dc, ep}` that node `from` sent here, the destination, until the
    /// outcome: taken here after a COMMIT, redirected back to `from` after a ROLLBACK.
    pub fn hold_deliver(&mut self, dc: DcId, ep: Ep, from: NodeId, frame: PeerFrame) {
        self.holds
            .entry((dc, ep))
            .or_default()
            .delivers
            .push((from, frame));
    }
    /// Whether `{dc, ep}` is held for a migration whose START named `node` as its source or
    /// destination.
    pub fn route_involves(&self, dc: DcId, ep: Ep, node: NodeId) -> bool {
        self.holds
            .get(&(dc, ep))
            .and_then(|h| h.route)
            .is_some_and(|(a, b)| a == node || b == node)
    }
    /// The migration id and route of the hold of `{dc, ep}`, if any.
    pub fn hold_of(&self, dc: DcId, ep: Ep) -> Option<(Option<MigrationId>, Option<Route>)> {
        self.holds.get(&(dc, ep)).map(|h| (h.id, h.route))
    }
    /// Whether the coordinator of `id` (this node) waits for an answer from `node`.
    pub fn coord_waits_for(&self, id: MigrationId, node: NodeId) -> Option<bool> {
        self.coords.get(&id).map(|c| c.acks.contains(&node))
    }
    /// The destination of `id`, coordinated here.
    pub fn coord_destination(&self, id: MigrationId) -> Option<NodeId> {
        self.coords.get(&id).map(|c| c.req.to)
    }
    /// Whether the outcome of `id`, coordinated here, was decided and broadcast.
    pub fn coord_decided(&self, id: MigrationId) -> Option<bool> {
        self.coords.get(&id).map(|c| c.decided_at.is_some())
    }
    /// Whether this node is the destination of `id` (it got MIGR_PREPARE).
    pub fn has_arrival(&self, id: MigrationId) -> bool {
        self.arrivals.contains_key(&id)
    }
    /// The coordinator of `id` arriving here, and whether it asked for the restore already.
    pub fn arrival_coordinator(&self, id: MigrationId) -> Option<(NodeId, bool)> {
        self.arrivals
            .get(&id)
            .map(|a| (a.coordinator, a.restore_started.is_some()))
    }
    /// Whether `id` arriving here is endpoint `{dc, ep}`.
    pub fn arrival_is(&self, id: MigrationId, dc: DcId, ep: Ep) -> bool {
        self.arrivals
            .get(&id)
            .is_some_and(|a| (a.dc, a.ep) == (dc, ep))
    }
    /// Forgets a held message (operation `op` of node `from`: its sender gave up).
    pub fn unhold_deliver(&mut self, from: NodeId, op: crate::OpId) {
        for h in self.holds.values_mut() {
            h.delivers.retain(|(n, f)| {
                !(*n == from && matches!(f, PeerFrame::Ipc(IpcFrame::Deliver(Deliver { op: o, .. })) if *o == op))
            });
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn remaining_ms(deadline: Option<Instant>, now: Instant) -> Option<u32> {
    deadline.map(|d| {
        d.saturating_duration_since(now)
            .as_millis()
            .min(u32::MAX as u128) as u32
    })
}

/// The request a blocked sender made, rebuilt to be run again after a migration.
fn send_request(kind: DeliverKind, dst: Ep, msg: Message, timeout: Timeout) -> LocalRequest {
    match kind {
        DeliverKind::Send => LocalRequest::Send { dst, msg, timeout },
        DeliverKind::SendRec => LocalRequest::SendRec { dst, msg, timeout },
    }
}

impl NodeCore {
    /// Seeds migration ids so that a restarted node does not reuse old ones.
    pub(super) fn set_migration_seed(&mut self, seed: u64) {
        self.migr.next = seed & 0xffff_ffff_ffff;
    }

    /// Destination (criu): the pid of `{dc, ep}`'s process restored here and waiting for its
    /// COMMIT. A node that applied the COMMIT before this one may already copy to or from it
    /// (its peer's vcopy, replayed there); the process is blocked in the call it migrated in.
    pub(super) fn installing_pid(&self, dc: DcId, ep: Ep) -> Option<i32> {
        self.migr
            .arrivals
            .values()
            .find(|a| a.dc == dc && a.ep == ep && a.backend == Backend::Criu && a.conn.is_some())
            .map(|a| a.pid)
    }

    /// The endpoint and source node of an incoming migration (destination side).
    pub fn arrival(&self, id: MigrationId) -> Option<(DcId, Ep, NodeId)> {
        self.migr
            .arrivals
            .get(&id)
            .map(|a| (a.dc, a.ep, a.coordinator))
    }

    /// Starts migrating local endpoint `{dc, ep}`. Errors come before anything stops.
    pub(super) fn start_migration(
        &mut self,
        req: MigrationRequest,
        now: Instant,
    ) -> Result<MigrationId, String> {
        let (dc, ep, to) = (req.dc, req.ep, req.to);
        let info = self.dcs.get(&dc).ok_or_else(|| format!("no DC {dc}"))?;
        if !info.nodes.contains(&to) {
            return Err(format!("node {to} is not part of DC {dc}"));
        }
        if to == self.node {
            return Err(format!("endpoint {dc}/{ep} already runs on node {to}"));
        }
        let Some(Registration::Local { conn }) = self.table.get(dc, ep) else {
            return Err(format!(
                "endpoint {dc}/{ep} does not run on node {}",
                self.node
            ));
        };
        if self.migr.holds(dc, ep)
            || self
                .migr
                .coords
                .values()
                .any(|c| c.req.dc == dc && c.req.ep == ep)
        {
            return Err(format!("another migration of {dc}/{ep} is in progress"));
        }
        if !self.links_up.contains(&to) {
            return Err(format!("the link to node {to} is down"));
        }
        let c = self.conns.get(&conn).ok_or("endpoint without connection")?;
        self.migr.next += 1;
        let id = ((self.node as u64) << 48) | (self.migr.next & 0xffff_ffff_ffff);
        let coord = Coord {
            from: self.node,
            conn,
            pid: c.pid,
            phase: Phase::Start,
            started: now,
            phase_started: now,
            phases: Vec::new(),
            acks: BTreeSet::new(),
            commit: None,
            decided_at: None,
            error: None,
            checkpointed: false,
            image_bytes: 0,
            info: None,
            held: 0,
            req,
        };
        self.migr.coords.insert(id, coord);
        self.actions.push_back(Action::Report(Report::MigrProgress {
            id,
            phase: Phase::Start,
        }));
        let record = MigrRecord {
            id,
            from: self.node,
            to,
            state: RecordState::Started,
        };
        self.actions
            .push_back(Action::Directory(DirRequest::WriteMigrRecord {
                id,
                dc,
                ep,
                record,
                require: Require::NotRunning,
            }));
        Ok(id)
    }

    fn enter_phase(&mut self, id: MigrationId, phase: Phase, now: Instant) {
        let Some(c) = self.migr.coords.get_mut(&id) else {
            return;
        };
        let prev = c.phase;
        c.phases.push((prev, ms(now - c.phase_started)));
        c.phase = phase;
        c.phase_started = now;
        self.actions
            .push_back(Action::Report(Report::MigrProgress { id, phase }));
    }

    /// The directory's answer to [`DirRequest::WriteMigrRecord`]: `Err` carries the record that
    /// prevented the write.
    pub(super) fn on_migr_record_result(
        &mut self,
        id: MigrationId,
        result: Result<(), Option<MigrRecord>>,
        now: Instant,
    ) {
        let Some(c) = self.migr.coords.get(&id) else {
            return;
        };
        let (dc, ep, conn) = (c.req.dc, c.req.ep, c.conn);
        match (c.commit, result) {
            (None, Ok(())) => {
                // Recorded: hold calls here and tell every node of the DC to hold them.
                self.migr.holds.entry((dc, ep)).or_default().id = Some(id);
                if let Some(cc) = self.conns.get_mut(&conn) {
                    cc.migrating_out = Some(id);
                }
                let to = c.req.to;
                let nodes: Vec<NodeId> = self.dc_peers(dc);
                for n in &nodes {
                    self.actions.push_back(Action::Peer(PeerAction::Send {
                        node: *n,
                        frame: PeerFrame::Migr(MigrFrame::Start(MigrStart {
                            id,
                            dc,
                            ep,
                            from: self.node,
                            to,
                        })),
                    }));
                }
                let c = self.migr.coords.get_mut(&id).expect("present");
                c.acks = nodes.into_iter().collect();
                if c.acks.is_empty() {
                    self.enter_quiesce(id, now);
                }
            }
            (None, Err(current)) => {
                let why = match current {
                    Some(r) => format!(
                        "another migration of {dc}/{ep} is in progress (id {}, node {} to node {})",
                        r.id, r.from, r.to
                    ),
                    None => format!("cannot record the migration of {dc}/{ep} in the directory"),
                };
                // Nothing was stopped or held yet: just report.
                let c = self.migr.coords.remove(&id).expect("present");
                let report = self.report(id, &c, false, Some(why), now);
                self.actions
                    .push_back(Action::Report(Report::MigrFinished { id, report }));
            }
            (Some(commit), Ok(())) => self.apply_decision(id, commit, now),
            (Some(_), Err(Some(r))) if r.id == id && r.state != RecordState::Started => {
                // Someone else decided (a participant's timeout): follow the record.
                let commit = r.state == RecordState::Committed;
                if let Some(c) = self.migr.coords.get_mut(&id) {
                    c.commit = Some(commit);
                    if !commit && c.error.is_none() {
                        c.error = Some("rolled back by another node".into());
                    }
                }
                self.apply_decision(id, commit, now);
            }
            (Some(commit), Err(_)) => {
                // The record is gone or foreign: the safe outcome is the one that keeps the
                // source, unless the destination already runs it and the record says so.
                let _ = commit;
                if let Some(c) = self.migr.coords.get_mut(&id) {
                    c.commit = Some(false);
                    c.error.get_or_insert_with(|| {
                        "the migration record changed under the coordinator".into()
                    });
                }
                self.apply_decision(id, false, now);
            }
        }
    }

    /// Other nodes of the DC whose links are up.
    fn dc_peers(&self, dc: DcId) -> Vec<NodeId> {
        self.dcs
            .get(&dc)
            .map(|d| {
                d.nodes
                    .iter()
                    .copied()
                    .filter(|n| *n != self.node && self.links_up.contains(n))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn enter_quiesce(&mut self, id: MigrationId, now: Instant) {
        self.enter_phase(id, Phase::Quiesce, now);
        let Some(c) = self.migr.coords.get(&id) else {
            return;
        };
        let deadline = now + c.req.quiesce_timeout;
        self.add_timer(deadline, TimerKey::Migration { id });
        self.check_quiescence(now);
    }

    /// Moves every coordinated migration whose process became quiescent to its checkpoint.
    pub(super) fn check_quiescence(&mut self, now: Instant) {
        if self.migr.coords.is_empty() {
            return;
        }
        let ready: Vec<MigrationId> = self
            .migr
            .coords
            .iter()
            .filter(|(_, c)| c.phase == Phase::Quiesce && c.commit.is_none())
            .filter(|(_, c)| {
                self.conns
                    .get(&c.conn)
                    .is_some_and(|p| quiescent(p.owes_reply.is_empty(), &p.blocked, c.req.backend))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            self.capture(id, now);
        }
    }

    /// The process is quiescent: take its IPC state, send its queued callers away, and have
    /// it checkpointed.
    fn capture(&mut self, id: MigrationId, now: Instant) {
        let c = self.migr.coords.get(&id).expect("ready");
        let (dc, ep, conn, backend, to, pid) =
            (c.req.dc, c.req.ep, c.conn, c.req.backend, c.req.to, c.pid);
        let fail = c.req.fail_at == Some(FailAt::Checkpoint);
        let p = self.conns.get_mut(&conn).expect("quiescent conn exists");
        let call = match (&p.blocked, backend) {
            // The cooperative program restarts its loop from the snapshot on the destination.
            (_, Backend::Cooperative) => None,
            (Blocked::Receiving { src }, _) => Some(MigratedCall::Request(LocalRequest::Receive {
                src: *src,
                timeout: match remaining_ms(p.deadline, now) {
                    None => Timeout::Forever,
                    Some(0) => Timeout::NoWait,
                    Some(m) => Timeout::Millis(m),
                },
            })),
            (Blocked::Held { req }, _) => Some(MigratedCall::Request(req.clone())),
            (Blocked::AwaitingReply { from }, _) => Some(MigratedCall::AwaitingReply {
                from: *from,
                remaining_ms: remaining_ms(p.deadline, now),
            }),
            // Its message is at the server's node, taken or not: either way the reply is routed
            // by where the client runs, so the client just awaits it on its new node.
            (
                Blocked::SendingRemote {
                    dst,
                    kind: DeliverKind::SendRec,
                    ..
                },
                _,
            ) => Some(MigratedCall::AwaitingReply {
                from: *dst,
                remaining_ms: remaining_ms(p.deadline, now),
            }),
            // Not taken yet: withdraw it here, send it again from the new node.
            (
                Blocked::SendingLocal {
                    dst,
                    kind: DeliverKind::SendRec,
                    msg,
                    timeout,
                },
                _,
            ) => Some(MigratedCall::Request(send_request(
                DeliverKind::SendRec,
                *dst,
                *msg,
                *timeout,
            ))),
            _ => None,
        };
        if let Blocked::SendingLocal { dst, .. } = p.blocked {
            if let Some(Registration::Local { conn: q }) = self.table.get(dc, dst) {
                if let Some(qc) = self.conns.get_mut(&q) {
                    qc.queue.retain(|i| i.origin != super::Origin::Local(conn));
                }
            }
        }
        if let Blocked::SendingRemote { node, op, .. } = self.conns[&conn].blocked {
            self.calls.settle(node, op);
        }
        let p = self.conns.get_mut(&conn).expect("quiescent conn exists");
        let state = MigratedEndpoint {
            call,
            notifies: p.notifies.iter().map(|(k, v)| (*k, *v)).collect(),
        };
        let queue: Vec<_> = p.queue.drain(..).collect();
        // Queued callers hold their calls and send them again after the outcome.
        for inc in queue {
            match inc.origin {
                super::Origin::Local(sc) => {
                    if let Some(Blocked::SendingLocal {
                        dst,
                        kind,
                        msg,
                        timeout,
                    }) = self.conns.get(&sc).map(|s| s.blocked.clone())
                    {
                        self.migr.hold_call(dc, ep, sc);
                        self.reblock(
                            sc,
                            Blocked::Held {
                                req: send_request(kind, dst, msg, timeout),
                            },
                        );
                    }
                }
                super::Origin::Remote { node, op } => {
                    self.calls.unqueue(node, op);
                    self.actions.push_back(Action::Peer(PeerAction::Send {
                        node,
                        frame: PeerFrame::Ipc(IpcFrame::Redirect(Redirect { op, dc, dst: ep })),
                    }));
                }
            }
        }
        self.enter_phase(id, Phase::Checkpoint, now);
        self.actions.push_back(Action::Peer(PeerAction::Send {
            node: to,
            frame: PeerFrame::Migr(MigrFrame::Prepare(MigrPrepare {
                id,
                dc,
                ep,
                backend,
                state,
                fail_restore: self.migr.coords[&id].req.fail_at == Some(FailAt::Restore),
            })),
        }));
        match backend {
            Backend::Criu => {
                self.migr.dumping.insert(id, pid);
                self.actions
                    .push_back(Action::Process(ProcessAction::Checkpoint { id, pid, fail }))
            }
            Backend::Cooperative => {
                // Interrupt the call it is blocked in; the library answers with the snapshot.
                self.actions.push_back(Action::Local(LocalAction::Respond {
                    conn,
                    resp: LocalResponse::Checkpoint,
                }));
                if let Some(p) = self.conns.get_mut(&conn) {
                    p.blocked = Blocked::Snapshotting;
                    p.gen += 1;
                }
            }
        }
    }

    /// A cooperative program sent its snapshot.
    pub(super) fn on_snapshot(&mut self, conn: ConnId, data: Option<Vec<u8>>) {
        let Some(p) = self.conns.get(&conn) else {
            return;
        };
        let Some(id) = p.migrating_out else { return };
        let fail = self
            .migr
            .coords
            .get(&id)
            .is_some_and(|c| c.req.fail_at == Some(FailAt::Checkpoint));
        match data {
            Some(data) => self
                .actions
                .push_back(Action::Process(ProcessAction::SaveSnapshot {
                    id,
                    data,
                    fail,
                })),
            None => {
                let now = self.now();
                self.on_checkpoint_done(id, Err("the program registered no snapshot hook (m3ipc::Endpoint::set_snapshot_hook)".into()), now);
            }
        }
    }

    /// The checkpoint is taken (`Ok(image bytes)`) or failed.
    pub(super) fn on_checkpoint_done(
        &mut self,
        id: MigrationId,
        result: Result<u64, String>,
        now: Instant,
    ) {
        let dumped = self.migr.dumping.remove(&id);
        let decided = self.migr.coords.get(&id).map(|c| c.commit.is_some());
        if decided != Some(false) {
            // Rolled back while the dump ran (a commit needs the dump): the dump left the
            // process stopped and wrote an image nobody needs.
            if let Some(pid) = dumped {
                self.actions
                    .push_back(Action::Process(ProcessAction::ResumeTree { pid }));
            }
            self.actions
                .push_back(Action::Process(ProcessAction::DropImage { id }));
            return;
        }
        let Some(c) = self.migr.coords.get_mut(&id) else {
            return;
        };
        match result {
            Ok(bytes) => {
                c.checkpointed = true;
                c.image_bytes = bytes;
                let to = c.req.to;
                self.enter_phase(id, Phase::Transfer, now);
                self.actions
                    .push_back(Action::Process(ProcessAction::SendImage { id, to }));
            }
            Err(e) => {
                c.checkpointed = c.req.backend == Backend::Criu;
                self.decide(id, false, Some(format!("checkpoint failed: {e}")), now)
            }
        }
    }

    /// The image is on its way (all of it queued on the link), or could not be sent.
    pub(super) fn on_image_sent(
        &mut self,
        id: MigrationId,
        result: Result<u64, String>,
        now: Instant,
    ) {
        let Some(c) = self.migr.coords.get_mut(&id) else {
            return;
        };
        if c.commit.is_some() {
            return;
        }
        match result {
            Ok(_) if c.req.fail_at == Some(FailAt::Transfer) => self.decide(
                id,
                false,
                Some("transfer failed: injected failure (--fail-at transfer)".into()),
                now,
            ),
            Ok(bytes) => {
                c.image_bytes = c.image_bytes.max(bytes);
                let to = c.req.to;
                self.enter_phase(id, Phase::Restore, now);
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node: to,
                    frame: PeerFrame::Migr(MigrFrame::Restore(MigrRestore { id })),
                }));
            }
            Err(e) => self.decide(id, false, Some(format!("transfer failed: {e}")), now),
        }
    }

    /// Destination: a chunk of `id`'s image arrived (the daemon stored it).
    pub(super) fn on_image_chunk(&mut self, id: MigrationId, bytes: u64, now: Instant) {
        if let Some(a) = self.migr.arrivals.get_mut(&id) {
            a.first_chunk.get_or_insert(now);
            a.last_chunk = Some(now);
            a.image_bytes += bytes;
        }
    }

    /// Destination (criu): the process was restored with its node connection `conn` (already
    /// announced with [`NodeCore::on_local_connect`]), or restoring failed.
    pub(super) fn on_restored(
        &mut self,
        id: MigrationId,
        result: Result<(ConnId, i32), String>,
        now: Instant,
    ) {
        let Some(a) = self.migr.arrivals.get_mut(&id) else {
            // The outcome (a rollback) came while the restore ran: this copy must not live.
            if let Ok((conn, pid)) = result {
                self.actions
                    .push_back(Action::Process(ProcessAction::KillTree { pid }));
                self.actions.push_back(Action::Local(LocalAction::Close {
                    conn,
                    reason: format!("migration {id:x} was rolled back during the restore"),
                }));
            }
            return;
        };
        let coordinator = a.coordinator;
        let result = match result {
            Ok((conn, pid)) => {
                a.conn = Some(conn);
                a.pid = pid;
                let (dc, ep) = (a.dc, a.ep);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.bound = Some((dc, ep));
                    c.pid = pid;
                    c.blocked = Blocked::Installing { id };
                }
                Ok(self.restore_info(id, now))
            }
            Err(e) => Err(e),
        };
        self.actions.push_back(Action::Peer(PeerAction::Send {
            node: coordinator,
            frame: PeerFrame::Migr(MigrFrame::Restored(MigrRestored { id, result })),
        }));
    }

    fn restore_info(&self, id: MigrationId, now: Instant) -> RestoreInfo {
        let a = &self.migr.arrivals[&id];
        RestoreInfo {
            image_bytes: a.image_bytes,
            transfer_ms: match (a.first_chunk, a.last_chunk) {
                (Some(f), Some(l)) => ms(l - f),
                _ => 0.0,
            },
            restore_ms: a.restore_started.map(|t| ms(now - t)).unwrap_or(0.0),
        }
    }

    /// Destination (cooperative): the restarted program binds as the migrated endpoint.
    pub(super) fn on_bind_restored(
        &mut self,
        conn: ConnId,
        version: u32,
        dc: DcId,
        ep: Ep,
        id: MigrationId,
    ) {
        let now = self.now();
        let ok = version == PROTOCOL_VERSION
            && self
                .migr
                .arrivals
                .get(&id)
                .is_some_and(|a| a.dc == dc && a.ep == ep && a.conn.is_none());
        if !ok {
            return self.respond(conn, err(Errno::Invalid));
        }
        if self.migr.arrivals[&id].fail_restore {
            // The copy is killed by the rollback this failure causes.
            let a = self.migr.arrivals.get_mut(&id).expect("checked");
            a.conn = Some(conn);
            let (coordinator, pid) = (
                a.coordinator,
                self.conns.get(&conn).map(|c| c.pid).unwrap_or(0),
            );
            a.pid = pid;
            self.actions.push_back(Action::Peer(PeerAction::Send {
                node: coordinator,
                frame: PeerFrame::Migr(MigrFrame::Restored(MigrRestored {
                    id,
                    result: Err("injected failure (--fail-at restore)".into()),
                })),
            }));
            return;
        }
        let pid = self.conns.get(&conn).map(|c| c.pid).unwrap_or(0);
        self.on_restored(id, Ok((conn, pid)), now);
    }

    fn decide(&mut self, id: MigrationId, commit: bool, error: Option<String>, now: Instant) {
        let Some(c) = self.migr.coords.get_mut(&id) else {
            return;
        };
        if c.commit.is_some() {
            return;
        }
        c.commit = Some(commit);
        c.error = error;
        let (dc, ep, from, to) = (c.req.dc, c.req.ep, c.from, c.req.to);
        self.enter_phase(
            id,
            if commit {
                Phase::Commit
            } else {
                Phase::Rollback
            },
            now,
        );
        let state = if commit {
            RecordState::Committed
        } else {
            RecordState::RolledBack
        };
        self.actions
            .push_back(Action::Directory(DirRequest::WriteMigrRecord {
                id,
                dc,
                ep,
                record: MigrRecord {
                    id,
                    from,
                    to,
                    state,
                },
                require: Require::Started(id),
            }));
    }

    /// The outcome is recorded: broadcast it and apply it here.
    fn apply_decision(&mut self, id: MigrationId, commit: bool, now: Instant) {
        let Some(c) = self.migr.coords.get_mut(&id) else {
            return;
        };
        c.decided_at = Some(now);
        let (dc, ep, from, to) = (c.req.dc, c.req.ep, c.from, c.req.to);
        // The source's image is of no use once the outcome is recorded: committed, the
        // process runs on the destination; rolled back, the stopped process itself resumes.
        self.actions
            .push_back(Action::Process(ProcessAction::DropImage { id }));
        let nodes = self.dc_peers(dc);
        let frame = if commit {
            PeerFrame::Migr(MigrFrame::Commit(MigrCommit { id, dc, ep, to }))
        } else {
            PeerFrame::Migr(MigrFrame::Rollback(MigrRollback { id, dc, ep, from }))
        };
        for n in &nodes {
            self.actions.push_back(Action::Peer(PeerAction::Send {
                node: *n,
                frame: frame.clone(),
            }));
        }
        if commit {
            self.actions
                .push_back(Action::Directory(DirRequest::Relocate { dc, ep, node: to }));
        }
        let c = self.migr.coords.get_mut(&id).expect("present");
        c.acks = nodes.into_iter().collect();
        let held = self.apply_outcome(id, dc, ep, commit, from, to, now);
        let c = self.migr.coords.get_mut(&id).expect("present");
        c.held += held;
        // Outcome acks are awaited a bounded time only: a node that never answers learns the
        // outcome from the directory.
        self.add_timer(now + Duration::from_secs(5), TimerKey::Migration { id });
        self.maybe_finish(id, now);
    }

    fn maybe_finish(&mut self, id: MigrationId, now: Instant) {
        let done = self
            .migr
            .coords
            .get(&id)
            .is_some_and(|c| c.decided_at.is_some() && c.acks.is_empty());
        if !done {
            return;
        }
        let c = self.migr.coords.remove(&id).expect("present");
        let committed = c.commit == Some(true);
        let report = self.report(id, &c, committed, c.error.clone(), now);
        self.actions
            .push_back(Action::Report(Report::MigrFinished { id, report }));
    }

    fn report(
        &self,
        id: MigrationId,
        c: &Coord,
        committed: bool,
        error: Option<String>,
        now: Instant,
    ) -> MigrationReport {
        let mut phases = c.phases.clone();
        let end = c.decided_at.unwrap_or(now);
        phases.push((c.phase, ms(end.saturating_duration_since(c.phase_started))));
        MigrationReport {
            id,
            dc: c.req.dc,
            ep: c.req.ep,
            from: c.from,
            to: c.req.to,
            backend: c.req.backend,
            committed,
            error,
            phases,
            migration_ms: ms(end - c.started),
            image_bytes: c
                .info
                .as_ref()
                .map(|i| i.image_bytes)
                .unwrap_or(c.image_bytes),
            transfer_ms: c.info.as_ref().map(|i| i.transfer_ms).unwrap_or(0.0),
            restore_ms: c.info.as_ref().map(|i| i.restore_ms).unwrap_or(0.0),
            held: c.held,
        }
    }

    /// Applies MIGR_COMMIT or MIGR_ROLLBACK on this node; returns how many held calls and
    /// frames were replayed.
    #[allow(clippy::too_many_arguments)]
    fn apply_outcome(
        &mut self,
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        commit: bool,
        from: NodeId,
        to: NodeId,
        now: Instant,
    ) -> u32 {
        if !self.migr.recently_applied(id, dc, ep) {
            if self.migr.applied.len() >= APPLIED_MEMORY {
                self.migr.applied.pop_front();
            }
            self.migr.applied.push_back(Applied {
                id,
                dc,
                ep,
                moved: commit.then_some((from, to)),
            });
        }
        let hold = match self.migr.holds.get(&(dc, ep)) {
            Some(h) if h.id.is_none() || h.id == Some(id) => self.migr.holds.remove(&(dc, ep)),
            _ => None,
        }
        .unwrap_or_default();
        let here = self.node;
        // Source side.
        let source_conn = self
            .conns
            .iter()
            .find(|(_, c)| c.migrating_out == Some(id))
            .map(|(k, _)| *k);
        if let Some(conn) = source_conn {
            let backend = self.migr.coords.get(&id).map(|c| c.req.backend);
            let checkpointed = self.migr.coords.get(&id).is_some_and(|c| c.checkpointed);
            let p = self.conns.get_mut(&conn).expect("found");
            p.migrating_out = None;
            if commit {
                // It runs on the destination now; this copy goes away without unbinding.
                p.bound = None;
                p.owes_reply.clear();
                // Its pending call went with it: when this copy dies, abandoning that call
                // here (a `Cancel` to the server's node) would take the request or the reply
                // away from the restored process.
                p.blocked = Blocked::No;
                p.deadline = None;
                p.gen += 1;
                let pid = p.pid;
                self.table.set(dc, ep, Registration::Remote { node: to });
                self.actions
                    .push_back(Action::Process(ProcessAction::MigratedAway { pid, to }));
                match backend {
                    Some(Backend::Cooperative) => self.respond(conn, LocalResponse::Exit),
                    _ => self
                        .actions
                        .push_back(Action::Process(ProcessAction::KillTree { pid: p.pid })),
                }
            } else {
                match p.blocked.clone() {
                    Blocked::Snapshotting => self.respond(conn, LocalResponse::Resume),
                    Blocked::Held { req } => {
                        p.blocked = Blocked::No;
                        self.run_request(conn, req, now);
                    }
                    _ => {
                        // Its deadline was suspended during the move.
                        if let Some(d) = p.deadline {
                            let gen = p.gen;
                            self.add_timer(d, TimerKey::Conn { conn, gen });
                        }
                    }
                }
                if backend == Some(Backend::Criu) && checkpointed {
                    let pid = self.conns[&conn].pid;
                    self.actions
                        .push_back(Action::Process(ProcessAction::ResumeTree { pid }));
                }
            }
        }
        // Destination side.
        if let Some(a) = self.migr.arrivals.remove(&id) {
            if let Some(conn) = a.conn {
                if commit {
                    self.table.set(dc, ep, Registration::Local { conn });
                    if let Some(p) = self.conns.get_mut(&conn) {
                        p.blocked = Blocked::No;
                        p.notifies = a.state.notifies.iter().copied().collect();
                    }
                    match (a.backend, a.state.call.clone()) {
                        (Backend::Cooperative, _) => {
                            self.respond(conn, LocalResponse::Ep { dc, ep, node: here })
                        }
                        (Backend::Criu, Some(MigratedCall::Request(req))) => {
                            self.run_request(conn, req, now)
                        }
                        (
                            Backend::Criu,
                            Some(MigratedCall::AwaitingReply { from, remaining_ms }),
                        ) => {
                            let timeout = remaining_ms
                                .map(Timeout::Millis)
                                .unwrap_or(Timeout::Forever);
                            self.block(
                                conn,
                                Blocked::AwaitingReply { from },
                                timeout,
                                now,
                                Duration::ZERO,
                            );
                        }
                        (Backend::Criu, None) => {}
                    }
                    self.wake_bind_waiters(dc, ep);
                } else {
                    if let Some(p) = self.conns.get_mut(&conn) {
                        p.bound = None;
                    }
                    self.actions
                        .push_back(Action::Process(ProcessAction::KillTree { pid: a.pid }));
                }
            }
            self.actions
                .push_back(Action::Process(ProcessAction::DropImage { id }));
        } else if commit && to != here {
            // Everyone else: the endpoint is remote, on the destination now.
            let known = matches!(
                self.table.get(dc, ep),
                Some(Registration::Remote { .. } | Registration::Backup { .. })
            );
            if known || !hold.calls.is_empty() || !hold.frames.is_empty() {
                self.table.set(dc, ep, Registration::Remote { node: to });
            }
        }
        // Replay, in the order held.
        let target = if commit { to } else { from };
        let held = (hold.calls.len() + hold.frames.len() + hold.delivers.len()) as u32;
        for (origin, frame) in hold.delivers {
            let PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
                op,
                dc,
                src,
                dst,
                kind,
                msg,
                timeout,
            })) = frame
            else {
                continue;
            };
            if target == here {
                self.remote_deliver(origin, op, dc, src, dst, kind, msg, timeout, now);
            } else {
                // Its sender's node holds the call (or, past the outcome, sends it again).
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node: origin,
                    frame: PeerFrame::Ipc(IpcFrame::Redirect(Redirect { op, dc, dst })),
                }));
            }
        }
        for frame in hold.frames {
            if target == here {
                self.apply_held_frame(frame);
            } else if self.links_up.contains(&target) {
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node: target,
                    frame,
                }));
            }
        }
        for conn in hold.calls {
            if let Some(Blocked::Held { req }) = self.conns.get(&conn).map(|c| c.blocked.clone()) {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.blocked = Blocked::No;
                }
                self.run_request(conn, req, now);
            }
        }
        held
    }

    /// A held reply or notification whose endpoint ended up on this node.
    fn apply_held_frame(&mut self, frame: PeerFrame) {
        match frame {
            PeerFrame::Ipc(IpcFrame::Notify(Notify {
                dc,
                src,
                dst,
                value,
            })) => {
                if let Some(Registration::Local { conn }) = self.table.get(dc, dst) {
                    self.notify_local(conn, src, value);
                }
            }
            PeerFrame::Ipc(IpcFrame::Reply(Reply {
                dc,
                src,
                dst,
                result,
            })) => {
                let Some(Registration::Local { conn }) = self.table.get(dc, dst) else {
                    return;
                };
                let waiting = matches!(self.conns.get(&conn).map(|c| &c.blocked), Some(Blocked::AwaitingReply { from }) if *from == src);
                if waiting {
                    self.respond(conn, reply_response(src, result));
                }
            }
            _ => {}
        }
    }

    /// Migration frames from a peer.
    pub(super) fn on_migration_frame(&mut self, from: NodeId, frame: PeerFrame, now: Instant) {
        match frame {
            PeerFrame::Ipc(IpcFrame::Redirect(Redirect { op, dc, dst })) => {
                let Some(conn) = self.calls.settle(from, op) else {
                    return;
                };
                let Some(Blocked::SendingRemote {
                    op: o,
                    kind,
                    msg,
                    timeout,
                    ..
                }) = self.conns.get(&conn).map(|c| c.blocked.clone())
                else {
                    return;
                };
                if o != op {
                    return;
                }
                if !self.migr.holds(dc, dst) {
                    // This node applied the outcome before the redirecting node did: holding
                    // the call would wait for an outcome that already came. Send it again.
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.blocked = Blocked::No;
                    }
                    return self.run_request(conn, send_request(kind, dst, msg, timeout), now);
                }
                self.migr.hold_call(dc, dst, conn);
                self.reblock(
                    conn,
                    Blocked::Held {
                        req: send_request(kind, dst, msg, timeout),
                    },
                );
            }
            PeerFrame::Migr(MigrFrame::Start(MigrStart {
                id,
                dc,
                ep,
                from: src,
                to,
            })) => {
                let h = self.migr.holds.entry((dc, ep)).or_default();
                h.id = Some(id);
                h.route = Some((src, to));
                self.add_timer(now + PARTICIPANT_TIMEOUT, TimerKey::Migration { id });
                // The coordinator records the START before it broadcasts it: check.
                self.actions
                    .push_back(Action::Directory(DirRequest::ReadMigrRecord { id, dc, ep }));
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node: from,
                    frame: PeerFrame::Migr(MigrFrame::StartAck(MigrStartAck { id })),
                }));
            }
            PeerFrame::Migr(MigrFrame::StartAck(MigrStartAck { id })) => {
                let Some(c) = self.migr.coords.get_mut(&id) else {
                    return;
                };
                if c.phase == Phase::Start
                    && c.commit.is_none()
                    && c.acks.remove(&from)
                    && c.acks.is_empty()
                {
                    self.enter_quiesce(id, now);
                }
            }
            PeerFrame::Migr(MigrFrame::Prepare(MigrPrepare {
                id,
                dc,
                ep,
                backend,
                state,
                fail_restore,
            })) => {
                self.migr.arrivals.insert(
                    id,
                    Arrival {
                        dc,
                        ep,
                        coordinator: from,
                        backend,
                        state,
                        fail_restore,
                        conn: None,
                        pid: 0,
                        image_bytes: 0,
                        first_chunk: None,
                        last_chunk: None,
                        restore_started: None,
                    },
                );
            }
            PeerFrame::Migr(MigrFrame::Restore(MigrRestore { id })) => {
                let Some(a) = self.migr.arrivals.get_mut(&id) else {
                    self.actions.push_back(Action::Peer(PeerAction::Send {
                        node: from,
                        frame: PeerFrame::Migr(MigrFrame::Restored(MigrRestored {
                            id,
                            result: Err("destination has no state for this migration".into()),
                        })),
                    }));
                    return;
                };
                a.restore_started = Some(now);
                let (dc, ep, backend, fail) = (a.dc, a.ep, a.backend, a.fail_restore);
                self.actions
                    .push_back(Action::Process(ProcessAction::Restore {
                        id,
                        dc,
                        ep,
                        backend,
                        fail,
                    }));
            }
            PeerFrame::Migr(MigrFrame::Restored(MigrRestored { id, result })) => {
                let Some(c) = self.migr.coords.get_mut(&id) else {
                    return;
                };
                if c.commit.is_some() {
                    return;
                }
                match result {
                    Ok(info) => {
                        c.info = Some(info);
                        self.decide(id, true, None, now);
                    }
                    Err(e) => self.decide(id, false, Some(format!("restore failed: {e}")), now),
                }
            }
            PeerFrame::Migr(MigrFrame::Commit(MigrCommit { id, dc, ep, to })) => {
                let held = self.apply_outcome(id, dc, ep, true, from, to, now);
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node: from,
                    frame: PeerFrame::Migr(MigrFrame::Done(MigrDone { id, held })),
                }));
            }
            PeerFrame::Migr(MigrFrame::Rollback(MigrRollback {
                id,
                dc,
                ep,
                from: src,
            })) => {
                let held = self.apply_outcome(id, dc, ep, false, src, src, now);
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node: from,
                    frame: PeerFrame::Migr(MigrFrame::Done(MigrDone { id, held })),
                }));
            }
            PeerFrame::Migr(MigrFrame::Done(MigrDone { id, held })) => {
                if let Some(c) = self.migr.coords.get_mut(&id) {
                    if c.acks.remove(&from) {
                        c.held += held;
                    }
                }
                self.maybe_finish(id, now);
            }
            _ => {}
        }
    }

    /// The directory's migration record of `{dc, ep}`, read to check migration `id` (see
    /// [`DirRequest::ReadMigrRecord`]). A hold for a migration that the directory does not record
    /// (a forged or stale MIGR_START) is released, and its held calls go where they were going.
    pub(super) fn on_migr_record_read(
        &mut self,
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        record: Option<MigrRecord>,
        now: Instant,
    ) {
        match record {
            Some(r) if r.id == id && r.state == RecordState::Started => {}
            Some(r) if r.id == id => self.on_migr_record(dc, ep, r, now),
            _ => {
                let held = self.migr.holds.get(&(dc, ep)).and_then(|h| h.id) == Some(id);
                if held && !self.migr.arrivals.contains_key(&id) {
                    tracing::warn!(
                        "releasing calls held for migration {id:x} of {dc}/{ep}: the directory \
                         does not record it (a forged or stale MIGR_START)"
                    );
                    let from = self.migr.holds[&(dc, ep)].route.map_or(self.node, |r| r.0);
                    self.apply_outcome(id, dc, ep, false, from, from, now);
                }
            }
        }
    }

    /// The directory shows a migration record (watch): a node that missed the outcome's
    /// broadcast applies it from here.
    pub(super) fn on_migr_record(&mut self, dc: DcId, ep: Ep, record: MigrRecord, now: Instant) {
        if record.state == RecordState::Started {
            return;
        }
        if let Some(c) = self.migr.coords.get_mut(&record.id) {
            // A participant recorded a rollback while this coordinator was still at work
            // (it thought the coordinator gone): follow the record at once, so that the
            // source resumes and no restored copy survives.
            if c.commit.is_none() {
                let commit = record.state == RecordState::Committed;
                c.commit = Some(commit);
                if !commit {
                    c.error = Some("rolled back by another node".into());
                }
                self.apply_decision(record.id, commit, now);
            }
            return;
        }
        if self
            .migr
            .holds
            .get(&(dc, ep))
            .is_some_and(|h| h.id == Some(record.id))
            || self.migr.arrivals.contains_key(&record.id)
        {
            let commit = record.state == RecordState::Committed;
            self.apply_outcome(record.id, dc, ep, commit, record.from, record.to, now);
        }
    }

    pub(super) fn on_migration_timer(&mut self, id: MigrationId, now: Instant) {
        let Some(c) = self.migr.coords.get(&id) else {
            // A participant still holding calls for an undecided migration: the coordinator may
            // be gone. Try to decide a rollback; the directory watch applies what is recorded.
            let held = self
                .migr
                .holds
                .iter()
                .find(|(_, h)| h.id == Some(id))
                .map(|(k, h)| (*k, h.route));
            if let Some(((dc, ep), Some((from, to)))) = held {
                if self.links_up.contains(&from) {
                    // The coordinator (the source) is reachable: it is still at work (a big
                    // image takes a while) and decides itself, as long as the directory
                    // still records the migration as started. Losing its link ends this wait.
                    self.add_timer(now + PARTICIPANT_TIMEOUT, TimerKey::Migration { id });
                    self.actions
                        .push_back(Action::Directory(DirRequest::ReadMigrRecord { id, dc, ep }));
                    return;
                }
                let record = MigrRecord {
                    id,
                    from,
                    to,
                    state: RecordState::RolledBack,
                };
                let require = Require::Started(id);
                self.actions
                    .push_back(Action::Directory(DirRequest::WriteMigrRecord {
                        id,
                        dc,
                        ep,
                        record,
                        require,
                    }));
                self.add_timer(now + PARTICIPANT_TIMEOUT, TimerKey::Migration { id });
            }
            return;
        };
        match (c.phase, c.decided_at) {
            (Phase::Quiesce, None) if c.commit.is_none() => {
                let what = self
                    .conns
                    .get(&c.conn)
                    .map(|p| describe(&p.blocked, !p.owes_reply.is_empty()))
                    .unwrap_or("gone");
                let why = format!(
                    "endpoint {}/{} did not become quiescent within {:?} (it is {what})",
                    c.req.dc, c.req.ep, c.req.quiesce_timeout
                );
                self.decide(id, false, Some(why), now);
            }
            (_, Some(_)) => {
                // Stop waiting for outcome acks.
                if let Some(c) = self.migr.coords.get_mut(&id) {
                    c.acks.clear();
                }
                self.maybe_finish(id, now);
            }
            _ => {}
        }
    }

    /// A link went down: a migration does not wait for that node's acks.
    pub(super) fn migration_link_down(&mut self, node: NodeId) {
        let now = self.now();
        let ids: Vec<MigrationId> = self
            .migr
            .coords
            .iter()
            .filter(|(_, c)| c.acks.contains(&node))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let c = self.migr.coords.get_mut(&id).expect("listed");
            c.acks.remove(&node);
            let (phase, decided, to) = (c.phase, c.decided_at.is_some(), c.req.to);
            if decided {
                self.maybe_finish(id, now);
            } else if phase == Phase::Start && self.migr.coords[&id].acks.is_empty() {
                self.enter_quiesce(id, now);
            }
            let _ = to;
        }
        // Losing the destination before the decision means rolling back.
        let lost: Vec<MigrationId> = self
            .migr
            .coords
            .iter()
            .filter(|(_, c)| c.req.to == node && c.commit.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            self.decide(
                id,
                false,
                Some(format!("lost the link to the destination node {node}")),
                now,
            );
        }
    }
}

/// Whether a process may be checkpointed now: blocked in IPC, not owing a sendrec reply.
fn quiescent(owes_nothing: bool, b: &Blocked, backend: Backend) -> bool {
    owes_nothing
        && match backend {
            Backend::Criu => matches!(
                b,
                Blocked::Receiving { .. }
                    | Blocked::AwaitingReply { .. }
                    | Blocked::Held { .. }
                    | Blocked::SendingRemote {
                        kind: DeliverKind::SendRec,
                        ..
                    }
                    | Blocked::SendingLocal {
                        kind: DeliverKind::SendRec,
                        ..
                    }
            ),
            // The snapshot interrupts the call; a reply in flight would be lost with it.
            Backend::Cooperative => matches!(b, Blocked::Receiving { .. } | Blocked::Held { .. }),
        }
}

fn describe(b: &Blocked, owes: bool) -> &'static str {
    if owes {
        return "holding a sendrec request it has not replied to";
    }
    match b {
        Blocked::No => "running, not in an IPC call",
        Blocked::SendingLocal { .. } | Blocked::SendingRemote { .. } => "blocked sending",
        Blocked::Vcopy { .. } => "in a vcopy",
        Blocked::AwaitingReply { .. } => "waiting for a reply",
        _ => "busy",
    }
}
