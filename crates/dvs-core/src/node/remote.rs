//! Peer links: links coming up and going down, and IPC frames from other nodes.

use std::time::Instant;

use dvs_wire::local::{LocalResponse, Source};
use dvs_wire::peer::{
    Bound, BulkFrame, Cancel, Deliver, DeliverKind, Delivered, ImageChunk, IpcFrame, MigrCommit,
    MigrDone, MigrFrame, MigrPrepare, MigrRestore, MigrRestored, MigrRollback, MigrStart,
    MigrStartAck, Notify, PeerFrame, Redirect, Reply, Unbound, VcopyData, VcopyDone,
};
use dvs_wire::{DcId, Ep, Errno, NodeId, Timeout};

use super::action::PeerAction;
use super::conn::{Blocked, Incoming, Origin, ReplyTo};
use super::ipc::reply_response;
use super::peer_check::Verdict;
use super::timers::TimerKey;
use super::vcopy::Op;
use super::{err, Action, NodeCore, VcopyCompletion};
use crate::table::Registration;
use crate::{ConnId, OpId};

impl NodeCore {
    /// The link to `node` came up.
    pub(super) fn on_link_up(&mut self, node: NodeId) {
        self.links_up.insert(node);
        self.condemned.remove(&node);
        // Tell the peer what runs here, in case it missed it while the link was down.
        let mine: Vec<(DcId, Ep)> = self
            .table
            .entries()
            .into_iter()
            .filter(|(dc, _, r)| {
                matches!(r, Registration::Local { .. })
                    && self.dcs.get(dc).is_some_and(|d| d.nodes.contains(&node))
            })
            .map(|(dc, ep, _)| (dc, ep))
            .collect();
        for (dc, ep) in mine {
            self.actions.push_back(Action::Peer(PeerAction::Send {
                node,
                frame: PeerFrame::Ipc(IpcFrame::Bound(Bound { dc, ep })),
            }));
        }
    }

    /// The link to `node` went down: every call depending on it fails.
    pub(super) fn on_link_down(&mut self, node: NodeId) {
        self.condemned.remove(&node);
        self.forget_incoming_vcopies(node);
        if !self.links_up.remove(&node) {
            return;
        }
        self.migration_link_down(node);
        let victims: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| match c.blocked {
                Blocked::SendingRemote { node: n, .. } => n == node,
                Blocked::AwaitingReply { from } => c
                    .bound
                    .is_some_and(|(dc, _)| matches!(self.table.get(dc, from), Some(Registration::Remote { node: n } | Registration::Backup { node: n }) if n == node)),
                _ => false,
            })
            .map(|(id, _)| *id)
            .collect();
        for v in victims {
            self.respond(v, err(Errno::NodeUnreachable));
        }
        // Receivers waiting for an endpoint of that node only would wait in vain.
        let receivers: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| match (c.blocked.clone(), c.bound) {
                (Blocked::Receiving { src: Source::Ep(x) }, Some((dc, _))) if c.migrating_out.is_none() => {
                    matches!(self.table.get(dc, x), Some(Registration::Remote { node: n } | Registration::Backup { node: n }) if n == node)
                }
                _ => false,
            })
            .map(|(id, _)| *id)
            .collect();
        for v in receivers {
            self.respond(v, err(Errno::NodeUnreachable));
        }
        self.calls.node_gone(node);
        // Messages queued here by processes of that node: their senders are unreachable.
        for key in self.calls.queued_from(node) {
            if let Some((dc, dst)) = self.calls.unqueue(key.0, key.1) {
                self.drop_remote_incoming(dc, dst, key);
            }
        }
        for c in self.conns.values_mut() {
            c.owes_reply.retain(|_, to| *to != ReplyTo::Remote(node));
        }
        // A vcopy of a local caller whose source or destination runs there would hang (its
        // data or its verdict crosses that link): fail it. Vcopies not involving that node
        // (local ones, or between other nodes) go on.
        let vcopies: Vec<ConnId> = self
            .vcopies
            .local
            .values()
            .filter(|Op::Vcopy { nodes, .. }| nodes.contains(&Some(node)))
            .map(|Op::Vcopy { conn, .. }| *conn)
            .collect();
        for conn in vcopies {
            if let Some(Blocked::Vcopy { op }) = self.conns.get(&conn).map(|c| c.blocked.clone()) {
                self.vcopies.local.remove(&op);
                self.forget_local_vcopy(op);
                self.respond(conn, err(Errno::NodeUnreachable));
            }
        }
    }

    pub(super) fn drop_remote_incoming(
        &mut self,
        dc: DcId,
        dst: Ep,
        (node, op): (NodeId, OpId),
    ) -> bool {
        if let Some(Registration::Local { conn }) = self.table.get(dc, dst) {
            if let Some(c) = self.conns.get_mut(&conn) {
                let before = c.queue.len();
                c.queue.retain(|i| i.origin != Origin::Remote { node, op });
                return c.queue.len() != before;
            }
        }
        false
    }

    /// A frame from the peer `from` (after the handshake).
    /// Frames that fail the checks of [`peer_check`] have no effect.
    pub(super) fn on_peer_frame(&mut self, from: NodeId, frame: PeerFrame, now: Instant) {
        if self.is_condemned(from) {
            return;
        }
        match self.check_peer_frame(from, &frame) {
            Verdict::Accept => {
                self.peer_frame(from, frame, now);
                self.check_quiescence(now);
            }
            Verdict::Ignore(why) => {
                tracing::debug!(node = from, frame = frame.kind(), "dropped: {why}");
            }
            Verdict::Refuse(v) => self.peer_violation(from, frame.kind(), v),
            Verdict::AlreadyApplied(id) => {
                // The directory's news came first: tell what was held when it was applied.
                let (held, longest_hold_us) = self.migr.applied_holds(id);
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node: from,
                    frame: PeerFrame::Migr(MigrFrame::Done(MigrDone {
                        id,
                        held,
                        longest_hold_us,
                    })),
                }))
            }
        }
    }

    pub(super) fn peer_frame(&mut self, from: NodeId, frame: PeerFrame, now: Instant) {
        match frame {
            PeerFrame::Ipc(IpcFrame::Deliver(d)) => self.remote_deliver(from, d, now),
            PeerFrame::Ipc(IpcFrame::Delivered(Delivered { op, result })) => {
                self.remote_delivered(from, op, result)
            }
            PeerFrame::Ipc(IpcFrame::Cancel(Cancel { op })) => {
                if let Some((dc, dst)) = self.calls.unqueue(from, op) {
                    self.drop_remote_incoming(dc, dst, (from, op));
                }
                self.migr.unhold_deliver(from, op);
                // A caller that gave up after its sendrec was taken is not owed a reply any
                // more (as a local caller that timed out); acknowledge, so that any reply to
                // `op` is on the link ahead of the ack (see `RemoteCalls::abandon`).
                for (dc, server, client) in self.calls.cancel_taken(from, op) {
                    if let Some(Registration::Local { conn }) = self.table.get(dc, server) {
                        if let Some(c) = self.conns.get_mut(&conn) {
                            if c.owes_reply.get(&client) == Some(&ReplyTo::Remote(from)) {
                                c.owes_reply.remove(&client);
                            }
                        }
                    }
                }
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node: from,
                    frame: PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                        op,
                        result: Err(Errno::TimedOut),
                    })),
                }));
            }
            PeerFrame::Ipc(IpcFrame::Reply(Reply {
                dc,
                src,
                dst,
                result,
            })) => {
                if self.calls.answers_abandoned(from, dc, dst, src) {
                    return;
                }
                if self.migr.holds(dc, dst) {
                    return self.migr.hold_frame(
                        dc,
                        dst,
                        PeerFrame::Ipc(IpcFrame::Reply(Reply {
                            dc,
                            src,
                            dst,
                            result,
                        })),
                        self.now(),
                    );
                }
                let Some(Registration::Local { conn }) = self.table.get(dc, dst) else {
                    return;
                };
                let Some(c) = self.conns.get(&conn) else {
                    return;
                };
                let waiting = match c.blocked {
                    Blocked::SendingRemote {
                        dst: d,
                        kind: DeliverKind::SendRec,
                        node,
                        op,
                        ..
                    } if d == src => {
                        self.calls.settle(node, op);
                        true
                    }
                    Blocked::AwaitingReply { from } => from == src,
                    _ => false,
                };
                if waiting {
                    self.respond(conn, reply_response(src, result));
                }
            }
            PeerFrame::Ipc(IpcFrame::Notify(Notify {
                dc,
                src,
                dst,
                value,
            })) => {
                if !self.peer_in_dc(from, dc) {
                    return;
                }
                // A notification relayed by the node its destination migrated from says
                // nothing of where its source runs: learning `from` as that place would make
                // this node drop every later message from the source's real node.
                if !self.migr.relayed_by(dc, dst, from, self.node) {
                    self.absorb_remote(dc, src, from);
                }
                if self.migr.holds(dc, dst) {
                    return self.migr.hold_frame(
                        dc,
                        dst,
                        PeerFrame::Ipc(IpcFrame::Notify(Notify {
                            dc,
                            src,
                            dst,
                            value,
                        })),
                        self.now(),
                    );
                }
                if let Some(conn) = self.local_or_binding(dc, dst) {
                    self.notify_local(conn, src, value);
                }
            }
            PeerFrame::Ipc(IpcFrame::VcopyPull(pull)) => self.remote_vcopy_pull(from, pull),
            PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone { op, result })) => {
                self.complete_vcopy(VcopyCompletion::Local { op }, result)
            }
            PeerFrame::Ipc(IpcFrame::Bound(Bound { dc, ep })) => {
                if self.peer_in_dc(from, dc)
                    && !matches!(self.table.get(dc, ep), Some(Registration::Local { .. }))
                {
                    self.table.set(dc, ep, Registration::Remote { node: from });
                    self.wake_bind_waiters(dc, ep);
                }
            }
            PeerFrame::Ipc(IpcFrame::Unbound(Unbound { dc, ep })) => {
                if matches!(self.table.get(dc, ep), Some(Registration::Remote { node } | Registration::Backup { node }) if node == from)
                {
                    self.table.remove(dc, ep);
                    self.fail_local_receivers_from(dc, ep, Errno::SrcDied);
                }
            }
            // Handshake, liveness and operator frames are the daemon's business.
            PeerFrame::Link(_) | PeerFrame::Ctl(_) => {}
            PeerFrame::Bulk(BulkFrame::VcopyData(VcopyData { .. })) => {}
            f @ (PeerFrame::Ipc(IpcFrame::Redirect(Redirect { .. }))
            | PeerFrame::Migr(MigrFrame::Start(MigrStart { .. }))
            | PeerFrame::Migr(MigrFrame::StartAck(MigrStartAck { .. }))
            | PeerFrame::Migr(MigrFrame::Prepare(MigrPrepare { .. }))
            | PeerFrame::Bulk(BulkFrame::ImageChunk(ImageChunk { .. }))
            | PeerFrame::Migr(MigrFrame::Restore(MigrRestore { .. }))
            | PeerFrame::Migr(MigrFrame::Restored(MigrRestored { .. }))
            | PeerFrame::Migr(MigrFrame::Commit(MigrCommit { .. }))
            | PeerFrame::Migr(MigrFrame::Rollback(MigrRollback { .. }))
            | PeerFrame::Migr(MigrFrame::Done(MigrDone { .. }))) => {
                self.on_migration_frame(from, f, now)
            }
        }
    }

    pub(super) fn peer_in_dc(&self, peer: NodeId, dc: DcId) -> bool {
        self.dcs
            .get(&dc)
            .is_some_and(|d| d.nodes.contains(&peer) && d.nodes.contains(&self.node))
    }

    /// A message from an endpoint we did not know registers it as REMOTE at its node
    /// (docs/ARCHITECTURE.md §7.1), so that a migrated client is absorbed without commands.
    pub(super) fn absorb_remote(&mut self, dc: DcId, src: Ep, node: NodeId) {
        match self.table.get(dc, src) {
            Some(Registration::Local { .. }) => {}
            Some(Registration::Remote { node: n } | Registration::Backup { node: n })
                if n == node => {}
            _ => {
                self.table.set(dc, src, Registration::Remote { node });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn remote_deliver(&mut self, from: NodeId, deliver: Deliver, now: Instant) {
        let Deliver {
            op,
            dc,
            src,
            dst,
            kind,
            mut msg,
            timeout,
        } = deliver;
        let fail = |core: &mut Self, e: Errno| {
            core.actions.push_back(Action::Peer(PeerAction::Send {
                node: from,
                frame: PeerFrame::Ipc(IpcFrame::Delivered(Delivered { op, result: Err(e) })),
            }));
        };
        if !self.peer_in_dc(from, dc) {
            return fail(self, Errno::NodeNotInDc);
        }
        if let Err(e) = self.dc_check(dc, dst).and_then(|_| self.dc_check(dc, src)) {
            return fail(self, e);
        }
        self.absorb_remote(dc, src, from);
        if self.migr.holds(dc, dst) {
            // On the destination, the sender's node may have applied a COMMIT that has not
            // reached this node yet, and would not hold a redirected call any more: the
            // message waits here for the outcome instead.
            if self.migr.is_destination(dc, dst, self.node) {
                let frame = PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
                    op,
                    dc,
                    src,
                    dst,
                    kind,
                    msg,
                    timeout,
                }));
                return self.migr.hold_deliver(dc, dst, from, frame, self.now());
            }
            // Not taken: the sender's node holds the call and sends it again after the outcome.
            self.actions.push_back(Action::Peer(PeerAction::Send {
                node: from,
                frame: PeerFrame::Ipc(IpcFrame::Redirect(Redirect { op, dc, dst })),
            }));
            return;
        }
        let Some(q) = self.local_or_binding(dc, dst) else {
            return fail(self, Errno::DstDied);
        };
        msg.source = src;
        let inc = Incoming {
            src,
            msg,
            kind,
            origin: Origin::Remote { node: from, op },
        };
        if self.try_hand_over(q, dc, dst, &inc) {
            self.after_taken(dc, dst, q, inc);
            return;
        }
        if timeout == Timeout::NoWait {
            return fail(self, Errno::TimedOut);
        }
        if let Err(e) = self.enqueue(dc, q, inc) {
            return fail(self, e);
        }
        self.calls.queued(from, op, dc, dst);
        if let Some(d) = timeout.as_duration() {
            self.add_timer(now + d, TimerKey::Incoming { node: from, op });
        }
    }

    pub(super) fn remote_delivered(&mut self, from: NodeId, op: OpId, result: Result<(), Errno>) {
        let Some(conn) = self.calls.settle(from, op) else {
            return;
        };
        let still = self.conns.get(&conn).is_some_and(|c| matches!(c.blocked, Blocked::SendingRemote { node, op: o, .. } if node == from && o == op));
        if !still {
            return;
        }
        match result {
            Ok(()) => self.respond(conn, LocalResponse::Done),
            Err(e) => self.respond(conn, err(e)),
        }
    }
}
