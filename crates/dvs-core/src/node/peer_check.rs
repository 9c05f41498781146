//! Checks on frames from peers: a peer is trusted for its identity (the link is
//! authenticated) and for nothing else.
//!
//! Every frame is judged against this node's state before it has any effect
//! ([`NodeCore::check_peer_frame`], and [`NodeCore::on_vcopy_chunk`] for `VcopyData`). A frame
//! gets one of three verdicts:
//! - **accept**: handled as usual (the handlers still refuse what a state change made
//!   impossible, with the errors they always gave);
//! - **ignore**: stale or racing with a state change that an honest peer can cause (a
//!   `Delivered` for a call that timed out here, a chunk of a vcopy that already failed):
//!   dropped quietly;
//! - **refuse**: no honest peer sends it. It is dropped, logged, and reported as
//!   [`PeerAction::Condemn`] so that the daemon closes the link; frames already queued from
//!   that node are dropped until the link comes up again.
//!
//! The ordering arguments below rely on a link delivering frames in order (one TCP stream per
//! node pair).

use std::fmt;

use dvs_wire::peer::{
    Bound, BulkFrame, Cancel, Deliver, Delivered, ImageChunk, IpcFrame, MigrCommit, MigrDone,
    MigrFrame, MigrPrepare, MigrRestore, MigrRestored, MigrRollback, MigrStart, MigrStartAck,
    Notify, Redirect, Reply, Unbound, VcopyData, VcopyDone, VcopyPull,
};
use dvs_wire::peer::{MigrationId, PeerFrame};
use dvs_wire::{DcId, Ep, NodeId};
use tracing::warn;

use super::action::PeerAction;
use super::{Action, NodeCore, Op};
use crate::table::Registration;
use crate::OpId;

/// Why a frame from a peer was refused as one no honest peer sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// A message source, vcopy caller or announced endpoint is bound on this node.
    EndpointIsLocal { dc: DcId, ep: Ep },
    /// The endpoint runs on another node (and is not migrating to or from the sender).
    EndpointElsewhere { dc: DcId, ep: Ep, node: NodeId },
    /// A vcopy caller this node has never heard of (its node announces its endpoints).
    UnknownCaller { dc: DcId, ep: Ep },
    /// A vcopy pull not sent by the caller's node.
    NotCallerNode { caller_node: NodeId },
    /// A reply in a DC the sender is not part of.
    NotInDc { dc: DcId },
    /// An endpoint number outside its DC.
    BadEndpoint { dc: DcId, ep: Ep },
    /// A vcopy chunk for a local caller's operation this node never started.
    NeverIssued { op: OpId },
    /// A redirect that does not match the message it names.
    RedirectMismatch { op: OpId },
    /// A vcopy chunk with impossible offsets or lengths.
    MalformedChunk { op: OpId },
    /// A vcopy chunk that does not match the vcopy it belongs to.
    ChunkMismatch { op: OpId, what: &'static str },
    /// A migration frame whose id was not minted by the node it claims as coordinator.
    ForeignMigrationId { id: MigrationId },
    /// A migration frame from a node that does not coordinate that migration.
    NotCoordinator { id: MigrationId },
    /// A migration frame whose route differs from the one this node recorded.
    RouteMismatch { id: MigrationId },
    /// A migration frame for a node that is not the migration's destination.
    NotDestination { id: MigrationId },
    /// A migration frame sent twice.
    Duplicate { id: MigrationId },
    /// A migration frame out of its phase.
    OutOfPhase { id: MigrationId },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::EndpointIsLocal { dc, ep } => write!(f, "endpoint {dc}/{ep} is bound here"),
            Violation::EndpointElsewhere { dc, ep, node } => {
                write!(f, "endpoint {dc}/{ep} runs on node {node}")
            }
            Violation::UnknownCaller { dc, ep } => {
                write!(
                    f,
                    "vcopy caller {dc}/{ep} is not known to run on the sender"
                )
            }
            Violation::NotCallerNode { caller_node } => {
                write!(f, "pull on behalf of node {caller_node}")
            }
            Violation::NotInDc { dc } => write!(f, "sender is not part of DC {dc}"),
            Violation::BadEndpoint { dc, ep } => write!(f, "endpoint {ep} is outside DC {dc}"),
            Violation::NeverIssued { op } => write!(f, "operation {op} was never issued"),
            Violation::RedirectMismatch { op } => {
                write!(f, "redirect does not match the message of operation {op}")
            }
            Violation::MalformedChunk { op } => write!(f, "vcopy {op}: impossible chunk bounds"),
            Violation::ChunkMismatch { op, what } => write!(f, "vcopy {op}: {what}"),
            Violation::ForeignMigrationId { id } => {
                write!(f, "migration {id:x} was not started by the sender")
            }
            Violation::NotCoordinator { id } => {
                write!(f, "sender does not coordinate migration {id:x}")
            }
            Violation::RouteMismatch { id } => {
                write!(f, "route differs from the recorded one of migration {id:x}")
            }
            Violation::NotDestination { id } => {
                write!(f, "this node is not the destination of migration {id:x}")
            }
            Violation::Duplicate { id } => write!(f, "migration {id:x}: frame sent twice"),
            Violation::OutOfPhase { id } => write!(f, "migration {id:x}: frame out of phase"),
        }
    }
}

impl std::error::Error for Violation {}

/// The verdict on a frame.
#[derive(Debug)]
pub(super) enum Verdict {
    Accept,
    Ignore(&'static str),
    Refuse(Violation),
    /// A COMMIT/ROLLBACK whose outcome this node applied already (from the directory):
    /// acknowledged to its coordinator, not applied again.
    AlreadyApplied(MigrationId),
}

use Verdict::{Accept, Ignore, Refuse};

/// The node that minted migration id `id` (its top 16 bits).
fn minted_by(id: MigrationId) -> NodeId {
    (id >> 48) as NodeId
}

impl NodeCore {
    /// Reports a refused frame: logged here, the daemon closes the link.
    pub(super) fn peer_violation(&mut self, node: NodeId, frame: &'static str, reason: Violation) {
        warn!(node, frame, %reason, "refused a forged frame from a peer; closing the link");
        self.condemned.insert(node);
        self.actions.push_back(Action::Peer(PeerAction::Condemn {
            node,
            frame,
            reason,
        }));
    }

    /// Whether frames from `node` are dropped (it sent a forged frame; the link is closing).
    pub(super) fn is_condemned(&self, node: NodeId) -> bool {
        !self.condemned.is_empty() && self.condemned.contains(&node)
    }

    /// Whether node `from` may speak for endpoint `{dc, ep}` (as the source of a message, the
    /// caller of a vcopy): the endpoint is not bound here, and not recorded at another node
    /// unless it is migrating to or from `from`. An unknown endpoint passes; the caller decides
    /// whether that is enough.
    ///
    /// A registration at another node can be stale only while that node's `Unbound` is in
    /// flight; it leaves before the endpoint can bind elsewhere (an unbind answers after the
    /// directory forgot it, a bind then needs a directory write), so the race is not worth
    /// keeping a door open for.
    fn speaks_for(&self, from: NodeId, dc: DcId, ep: Ep) -> Result<(), Violation> {
        match self.table.get(dc, ep) {
            Some(Registration::Local { .. }) => Err(Violation::EndpointIsLocal { dc, ep }),
            Some(Registration::Remote { node } | Registration::Backup { node })
                if node != from && !self.migr.route_involves(dc, ep, from) =>
            {
                Err(Violation::EndpointElsewhere { dc, ep, node })
            }
            _ => Ok(()),
        }
    }

    /// The source of a message from `from`. One the sending node may not speak for is not
    /// delivered. It is not taken for a forgery either: a message sent just before its
    /// source unbound can still be on the link when the endpoint binds again here or on a
    /// third node (the randomised IPC simulation produced exactly that), and an unbound
    /// source's node waits for no answer. Nothing reaches a process, so a forged source
    /// gains nothing.
    fn message_source(&self, from: NodeId, dc: DcId, src: Ep) -> Verdict {
        match self.speaks_for(from, dc, src) {
            Ok(()) => Accept,
            Err(v) => {
                tracing::warn!(
                    node = from,
                    "dropped a message whose source the sending node does not hold: {v}"
                );
                Ignore("message from a source the sending node does not hold")
            }
        }
    }

    /// A vcopy caller on node `node`: it must be known to run there (every node announces its
    /// endpoints with `Bound`, on bind and when a link comes up, ahead of any call).
    pub(super) fn caller_on(&self, node: NodeId, dc: DcId, ep: Ep) -> Result<(), Violation> {
        self.speaks_for(node, dc, ep)?;
        if self.table.get(dc, ep).is_none() && !self.migr.route_involves(dc, ep, node) {
            return Err(Violation::UnknownCaller { dc, ep });
        }
        Ok(())
    }

    /// An answer about operation `op`, which this node numbered: it must match an operation
    /// outstanding with the sender. An answer that matches nothing changes nothing, so it is
    /// dropped without judging whether it is stale or invented (op numbers are shared by all
    /// peers; a test harness or a restarted node can legitimately be behind).
    fn own_op(&self, matched: bool, stale: &'static str) -> Verdict {
        if matched {
            Accept
        } else {
            Ignore(stale)
        }
    }

    /// The verdict on `frame` from `from` (every frame but `VcopyData`).
    pub(super) fn check_peer_frame(&self, from: NodeId, frame: &PeerFrame) -> Verdict {
        match *frame {
            // A node outside the DC gets the error it always got from the handler.
            PeerFrame::Ipc(IpcFrame::Deliver(Deliver { dc, src, .. }))
            | PeerFrame::Ipc(IpcFrame::Notify(Notify { dc, src, .. })) => {
                if !self.peer_in_dc(from, dc) || self.dc_check(dc, src).is_err() {
                    return Accept;
                }
                if let PeerFrame::Ipc(IpcFrame::Notify(Notify { dst, .. })) = *frame {
                    if self.migr.relayed_by(dc, dst, from, self.node) {
                        return Accept;
                    }
                }
                self.message_source(from, dc, src)
            }
            PeerFrame::Ipc(IpcFrame::Reply(Reply { dc, src, dst, .. })) => {
                if !self.peer_in_dc(from, dc) {
                    return Refuse(Violation::NotInDc { dc });
                }
                // The node an endpoint moved from replays the replies it held for it.
                if self.migr.relayed_by(dc, dst, from, self.node) {
                    return Accept;
                }
                self.message_source(from, dc, src)
            }
            PeerFrame::Ipc(IpcFrame::Delivered(Delivered { op, .. })) => {
                let known = self.calls.is_outgoing(from, op);
                self.own_op(known, "Delivered for a call that ended here")
            }
            // Keyed by the sender's own operations: it can only cancel its own messages.
            PeerFrame::Ipc(IpcFrame::Cancel(Cancel { .. })) => Accept,
            PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull {
                caller_node,
                dc,
                caller,
                ..
            })) => {
                if caller_node != from {
                    return Refuse(Violation::NotCallerNode { caller_node });
                }
                // Whether the caller runs on `from` is checked by the handler, which answers
                // the caller with an error (a stale registration here is possible).
                let _ = (dc, caller);
                Accept
            }
            PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone { op, .. })) => {
                match self.vcopies.local.get(&op) {
                    Some(Op::Vcopy { nodes, .. }) if nodes.contains(&Some(from)) => Accept,
                    // The source node may know the destination at another node than this one did
                    // (a stale registration); its verdict is not this node's to take.
                    Some(_) => Ignore("VcopyDone from a node the vcopy does not involve"),
                    None => self.own_op(false, "VcopyDone for a vcopy that ended here"),
                }
            }
            PeerFrame::Ipc(IpcFrame::Bound(Bound { dc, ep })) => {
                if !self.peer_in_dc(from, dc) {
                    return Ignore("Bound in a DC the sender is not part of");
                }
                if self.dc_check(dc, ep).is_err() {
                    return Refuse(Violation::BadEndpoint { dc, ep });
                }
                match self.table.get(dc, ep) {
                    // The node the endpoint moved here from announced it before the move
                    // (when a link came up); the frame arrives after the outcome that made
                    // it local here. An honest race, not a claim.
                    Some(Registration::Local { .. })
                        if self.migr.relayed_by(dc, ep, from, self.node) =>
                    {
                        Ignore("Bound sent by the node the endpoint moved here from")
                    }
                    Some(Registration::Local { .. }) => {
                        Refuse(Violation::EndpointIsLocal { dc, ep })
                    }
                    // The directory decides between two claims (its watch updates us). A
                    // `Bound` is only a fast path and carries no order: one sent before a
                    // migration moved the endpoint away can arrive after the directory's
                    // newer word, also while the link to the new node is down.
                    Some(Registration::Remote { node } | Registration::Backup { node })
                        if node != from && !self.migr.route_involves(dc, ep, from) =>
                    {
                        Ignore("Bound for an endpoint of another node")
                    }
                    _ => Accept,
                }
            }
            // Only removes an entry naming the sender; an endpoint unbound there and bound
            // here since is an honest race.
            PeerFrame::Ipc(IpcFrame::Unbound(Unbound { .. })) => Accept,
            PeerFrame::Ipc(IpcFrame::Redirect(Redirect { op, dc, dst })) => {
                match self.calls.waiting(from, op).as_ref() {
                    Some(conn) => {
                        let c = self.conns.get(conn);
                        let same = c.is_some_and(|c| {
                        c.bound.map(|b| b.0) == Some(dc)
                            && matches!(c.blocked, super::Blocked::SendingRemote { dst: d, op: o, node, .. }
                                if d == dst && o == op && node == from)
                    });
                        if same {
                            Accept
                        } else {
                            Refuse(Violation::RedirectMismatch { op })
                        }
                    }
                    None => self.own_op(false, "Redirect for a call that ended here"),
                }
            }
            PeerFrame::Migr(MigrFrame::Start(MigrStart { .. }))
            | PeerFrame::Migr(MigrFrame::StartAck(MigrStartAck { .. }))
            | PeerFrame::Migr(MigrFrame::Prepare(MigrPrepare { .. }))
            | PeerFrame::Migr(MigrFrame::Restore(MigrRestore { .. }))
            | PeerFrame::Migr(MigrFrame::Restored(MigrRestored { .. }))
            | PeerFrame::Migr(MigrFrame::Commit(MigrCommit { .. }))
            | PeerFrame::Migr(MigrFrame::Rollback(MigrRollback { .. }))
            | PeerFrame::Migr(MigrFrame::Done(MigrDone { .. })) => {
                self.check_migration_frame(from, frame)
            }
            // Image chunks are stored by the daemon, which checks them against the arrival.
            PeerFrame::Bulk(BulkFrame::ImageChunk(ImageChunk { .. })) => Accept,
            PeerFrame::Bulk(BulkFrame::VcopyData(VcopyData { .. })) => {
                Ignore("VcopyData outside on_vcopy_chunk")
            }
            PeerFrame::Link(_) => Accept,
            // The daemon answers these itself and never hands them over.
            PeerFrame::Ctl(_) => Ignore("control frame outside the daemon"),
        }
    }

    fn check_migration_frame(&self, from: NodeId, frame: &PeerFrame) -> Verdict {
        let here = self.node;
        match *frame {
            // From the node running the endpoint, which coordinates (and minted the id).
            PeerFrame::Migr(MigrFrame::Start(MigrStart {
                id,
                dc,
                ep,
                from: src,
                to,
                ..
            })) => {
                if src != from {
                    return Refuse(Violation::NotCoordinator { id });
                }
                if minted_by(id) != from {
                    return Refuse(Violation::ForeignMigrationId { id });
                }
                if !self.peer_in_dc(from, dc) || self.dc_check(dc, ep).is_err() {
                    return Refuse(Violation::BadEndpoint { dc, ep });
                }
                if to == from || !self.peer_in_dc(to, dc) {
                    return Refuse(Violation::RouteMismatch { id });
                }
                if let Some((hid, route)) = self.migr.hold_of(dc, ep) {
                    if hid == Some(id) {
                        return Refuse(Violation::Duplicate { id });
                    }
                    // The destination of a migration whose COMMIT has not reached this node
                    // yet may already move the endpoint on.
                    if let Some((a, b)) = route {
                        if from != a && from != b {
                            return Refuse(Violation::NotCoordinator { id });
                        }
                        return Accept;
                    }
                }
                match self.table.get(dc, ep) {
                    // The node the endpoint moved here from announced it before the move
                    // (when a link came up); the frame arrives after the outcome that made
                    // it local here. An honest race, not a claim.
                    Some(Registration::Local { .. })
                        if self.migr.relayed_by(dc, ep, from, self.node) =>
                    {
                        Ignore("Bound sent by the node the endpoint moved here from")
                    }
                    Some(Registration::Local { .. }) => {
                        Refuse(Violation::EndpointIsLocal { dc, ep })
                    }
                    Some(Registration::Remote { node } | Registration::Backup { node })
                        if node != from =>
                    {
                        Refuse(Violation::EndpointElsewhere { dc, ep, node })
                    }
                    _ => Accept,
                }
            }
            PeerFrame::Migr(MigrFrame::StartAck(MigrStartAck { id })) => {
                if minted_by(id) != here {
                    return Refuse(Violation::ForeignMigrationId { id });
                }
                match self.migr.coord_waits_for(id, from) {
                    Some(true) => Accept,
                    _ => Ignore("MigrStartAck not awaited"),
                }
            }
            // Only the coordinator, to the destination its START named.
            PeerFrame::Migr(MigrFrame::Prepare(MigrPrepare { id, dc, ep, .. })) => {
                if minted_by(id) != from {
                    return Refuse(Violation::ForeignMigrationId { id });
                }
                if self.migr.has_arrival(id) {
                    return Refuse(Violation::Duplicate { id });
                }
                match self.migr.hold_of(dc, ep) {
                    Some((Some(hid), Some(route))) if hid == id => {
                        if route == (from, here) {
                            Accept
                        } else {
                            Refuse(Violation::NotDestination { id })
                        }
                    }
                    // A participant may have rolled the migration back on its own already.
                    _ => Ignore("MigrPrepare for a migration not held here"),
                }
            }
            PeerFrame::Migr(MigrFrame::Restore(MigrRestore { id })) => {
                if minted_by(id) != from {
                    return Refuse(Violation::ForeignMigrationId { id });
                }
                match self.migr.arrival_coordinator(id) {
                    Some((c, _)) if c != from => Refuse(Violation::NotCoordinator { id }),
                    Some((_, true)) => Refuse(Violation::Duplicate { id }),
                    // Without an arrival the handler answers that there is no state.
                    _ => Accept,
                }
            }
            PeerFrame::Migr(MigrFrame::Restored(MigrRestored { id, .. })) => {
                if minted_by(id) != here {
                    return Refuse(Violation::ForeignMigrationId { id });
                }
                match self.migr.coord_destination(id) {
                    Some(to) if to != from => Refuse(Violation::NotDestination { id }),
                    Some(_) => Accept,
                    None => Ignore("MigrRestored for a migration that ended"),
                }
            }
            PeerFrame::Migr(MigrFrame::Commit(MigrCommit { id, dc, ep, to })) => {
                self.check_outcome(from, id, dc, ep, |(src, dst)| src == from && dst == to)
            }
            PeerFrame::Migr(MigrFrame::Rollback(MigrRollback {
                id,
                dc,
                ep,
                from: src,
            })) => {
                if src != from {
                    return Refuse(Violation::NotCoordinator { id });
                }
                self.check_outcome(from, id, dc, ep, |(s, _)| s == from)
            }
            PeerFrame::Migr(MigrFrame::Done(MigrDone { id, .. })) => {
                if minted_by(id) != here {
                    return Refuse(Violation::ForeignMigrationId { id });
                }
                match self.migr.coord_decided(id) {
                    Some(false) => Refuse(Violation::OutOfPhase { id }),
                    Some(true) if self.migr.coord_waits_for(id, from) == Some(true) => Accept,
                    _ => Ignore("MigrDone not awaited"),
                }
            }
            _ => Accept,
        }
    }

    /// COMMIT or ROLLBACK: from the coordinator recorded for that migration, for the route
    /// recorded (`route_ok`). Without a record here (the link came up after START) the outcome
    /// is left to the directory watch.
    fn check_outcome(
        &self,
        from: NodeId,
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        route_ok: impl Fn((NodeId, NodeId)) -> bool,
    ) -> Verdict {
        if minted_by(id) != from {
            return Refuse(Violation::ForeignMigrationId { id });
        }
        if self.migr.recently_applied(id, dc, ep)
            && self.migr.arrival_coordinator(id).is_none()
            && self
                .migr
                .hold_of(dc, ep)
                .is_none_or(|(hid, _)| hid != Some(id))
        {
            return Verdict::AlreadyApplied(id);
        }
        if let Some((c, _)) = self.migr.arrival_coordinator(id) {
            return if c == from && self.migr.arrival_is(id, dc, ep) {
                Accept
            } else {
                Refuse(Violation::NotCoordinator { id })
            };
        }
        match self.migr.hold_of(dc, ep) {
            Some((Some(hid), route)) if hid == id => match route {
                Some(r) if route_ok(r) => Accept,
                _ => Refuse(Violation::RouteMismatch { id }),
            },
            _ if matches!(self.table.get(dc, ep), Some(Registration::Local { .. })) => {
                Refuse(Violation::EndpointIsLocal { dc, ep })
            }
            _ => Ignore("outcome of a migration not held here"),
        }
    }

    // ----- vcopy chunks --------------------------------------------------------------------
}
