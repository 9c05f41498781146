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

use std::time::{Duration, Instant};

use dvs_wire::local::LocalRequest;
use dvs_wire::peer::{Backend, DeliverKind, MigrationId, PeerFrame};
use dvs_wire::peer::{Deliver, IpcFrame, MigrFrame};
use dvs_wire::{DcId, Ep, Message, NodeId, Timeout};

use super::NodeCore;

mod arrival;
mod coordinator;
mod participant;
pub mod record;

use crate::ConnId;
use crate::Map;
use arrival::Arrival;
use coordinator::Coord;
pub use record::{MigrRecord, RecordState, Require};

pub use dvs_wire::peer::FailAt;
pub use dvs_wire::report::{MigrationError, MigrationReport, Phase, PhaseTime};

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

/// How long a participant holds calls for an undecided migration before it tries to decide a
/// rollback itself (the coordinator may have died).
pub const PARTICIPANT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a participant other than the destination waits, once its link to the
/// coordinator is down, before it records a rollback: the destination, which decides at once
/// (a commit if its copy is restored), goes first.
pub const COORDINATOR_LOST_GRACE: Duration = Duration::from_millis(1000);

/// Source and destination node of a migration.
pub(crate) type Route = (NodeId, NodeId);

/// Calls and frames held for a migrating endpoint on this node.
#[derive(Default)]
struct Hold {
    /// `None` until MIGR_START arrives.
    id: Option<MigrationId>,
    /// Source and destination, once MIGR_START arrived.
    route: Option<(NodeId, NodeId)>,
    /// How it moves, once MIGR_START arrived.
    backend: Option<Backend>,
    calls: Vec<ConnId>,
    frames: Vec<PeerFrame>,
    /// On the destination: messages for the endpoint (`Deliver`) and the node that sent each.
    delivers: Vec<(NodeId, PeerFrame)>,
    /// The link to the coordinator went down since MIGR_START. A link up again later may
    /// lead to a restarted coordinator, a fresh core that knows nothing of this migration
    /// and will never decide it.
    coordinator_lost: bool,
    /// On the source: how many of `frames` were there when the endpoint was captured. Their
    /// notifications travel in the captured state, so a commit does not replay them.
    packaged: usize,
    /// When the first of the calls and frames was held: the one that waits longest, since
    /// all are replayed together.
    first_held: Option<Instant>,
}

/// Migration state of one node.
#[derive(Default)]
pub(crate) struct MigrationState {
    holds: Map<(DcId, Ep), Hold>,
    coords: Map<MigrationId, Coord>,
    arrivals: Map<MigrationId, Arrival>,
    next: u64,
    /// Outcomes this node applied lately. The directory watch can beat the coordinator's
    /// broadcast: a late COMMIT/ROLLBACK for one of them is acknowledged, not applied twice
    /// and not taken for a forgery. And the node an endpoint moved here from replays the
    /// frames it held for it (see `relayed_by`).
    applied: std::collections::VecDeque<Applied>,
    /// CRIU dumps under way, by migration: the pid of the process being dumped. The outcome
    /// may be decided (a rollback, e.g. the destination died) before the dump ends; the dump
    /// then leaves the process stopped, and it must be resumed when the dump ends.
    dumping: Map<MigrationId, i32>,
}

/// An outcome applied on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::node) struct Applied {
    id: MigrationId,
    dc: DcId,
    ep: Ep,
    /// Committed, from node `from` to node `to`.
    moved: Option<(NodeId, NodeId)>,
    /// What this node held and replayed then, and how long the first of it waited (µs):
    /// told to the coordinator again when its broadcast comes after the directory's news.
    held: u32,
    longest_hold_us: u64,
}

/// How many applied outcomes [`MigrationState`] remembers.
pub(in crate::node) const APPLIED_MEMORY: usize = 256;

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

    /// What this node held and replayed when it applied the outcome of `id` (calls and
    /// frames, and how long the first waited in µs); zeros if it does not remember.
    pub fn applied_holds(&self, id: MigrationId) -> (u32, u64) {
        self.applied
            .iter()
            .rev()
            .find(|a| a.id == id)
            .map_or((0, 0), |a| (a.held, a.longest_hold_us))
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
    pub fn hold_call(&mut self, dc: DcId, ep: Ep, conn: ConnId, now: Instant) {
        let h = self.holds.entry((dc, ep)).or_default();
        h.first_held.get_or_insert(now);
        h.calls.push(conn);
    }
    /// Forgets a held call (its caller gave up or died).
    pub fn unhold_call(&mut self, conn: ConnId) {
        for h in self.holds.values_mut() {
            h.calls.retain(|c| *c != conn);
        }
    }
    /// Holds a frame for `{dc, ep}` (reply, notify) until the outcome.
    pub fn hold_frame(&mut self, dc: DcId, ep: Ep, frame: PeerFrame, now: Instant) {
        let h = self.holds.entry((dc, ep)).or_default();
        h.first_held.get_or_insert(now);
        h.frames.push(frame);
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
    pub fn hold_deliver(&mut self, dc: DcId, ep: Ep, from: NodeId, frame: PeerFrame, now: Instant) {
        let h = self.holds.entry((dc, ep)).or_default();
        h.first_held.get_or_insert(now);
        h.delivers.push((from, frame));
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
        self.coords
            .get(&id)
            .map(|c| c.outcome.decided_at().is_some())
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

pub(in crate::node) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(in crate::node) fn remaining_ms(deadline: Option<Instant>, now: Instant) -> Option<u32> {
    deadline.map(|d| {
        d.saturating_duration_since(now)
            .as_millis()
            .min(u32::MAX as u128) as u32
    })
}

/// The request a blocked sender made, rebuilt to be run again after a migration.
pub(in crate::node) fn send_request(
    kind: DeliverKind,
    dst: Ep,
    msg: Message,
    timeout: Timeout,
) -> LocalRequest {
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

    /// The endpoint that migration `id`, coordinated here, moves (source side).
    pub fn coordinated(&self, id: MigrationId) -> Option<(DcId, Ep)> {
        self.migr.coords.get(&id).map(|c| (c.req.dc, c.req.ep))
    }

    /// The endpoint and source node of an incoming migration (destination side).
    pub fn arrival(&self, id: MigrationId) -> Option<(DcId, Ep, NodeId)> {
        self.migr
            .arrivals
            .get(&id)
            .map(|a| (a.dc, a.ep, a.coordinator))
    }

    /// Migration frames from a peer (and `Redirect`, which is about a migrating endpoint).
    pub(super) fn on_migration_frame(&mut self, from: NodeId, frame: PeerFrame, now: Instant) {
        match frame {
            PeerFrame::Ipc(IpcFrame::Redirect(f)) => self.on_redirect(from, f, now),
            PeerFrame::Migr(MigrFrame::Start(f)) => self.on_migr_start(from, f, now),
            PeerFrame::Migr(MigrFrame::StartAck(f)) => self.on_start_ack(from, f, now),
            PeerFrame::Migr(MigrFrame::Prepare(f)) => self.on_prepare(from, f, now),
            PeerFrame::Migr(MigrFrame::Restore(f)) => self.on_restore(from, f, now),
            PeerFrame::Migr(MigrFrame::Restored(f)) => self.on_restore_report(from, f, now),
            PeerFrame::Migr(MigrFrame::Commit(f)) => self.on_migr_commit(from, f, now),
            PeerFrame::Migr(MigrFrame::Rollback(f)) => self.on_migr_rollback(from, f, now),
            PeerFrame::Migr(MigrFrame::Done(f)) => self.on_outcome_applied(from, f, now),
            _ => {}
        }
    }
}
