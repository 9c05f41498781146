//! The narrow interface through which migration touches IPC state: is an endpoint
//! quiescent, capture it (its pending call and notifications, its queued callers sent away),
//! hand it over or resume it at the source, install it at the destination, and replay what
//! other nodes held for it. Migration code (node/migration/) reaches connections only
//! through these.

use std::time::{Duration, Instant};

use dvs_wire::local::{LocalRequest, LocalResponse};
use dvs_wire::peer::{
    Backend, Deliver, DeliverKind, IpcFrame, MigratedCall, MigratedEndpoint, MigrationId, Notify,
    PeerFrame, Redirect, Reply,
};
use dvs_wire::{DcId, Ep, NodeId, Timeout};

use super::action::{LocalAction, PeerAction, ProcessAction};
use super::conn::{Blocked, Origin};
use super::ipc::reply_response;
use super::migration::{remaining_ms, send_request};
use super::timers::TimerKey;
use super::{Action, NodeCore};
use crate::table::Registration;
use crate::ConnId;

impl NodeCore {
    /// The pid of the process on connection `conn`.
    pub(super) fn endpoint_pid(&self, conn: ConnId) -> Option<i32> {
        self.conns.get(&conn).map(|c| c.pid)
    }

    /// From now on nothing enters or leaves `conn`'s endpoint: it migrates away (`id`).
    pub(super) fn mark_migrating_out(&mut self, conn: ConnId, id: MigrationId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.migrating_out = Some(id);
        }
    }

    /// The migration `conn`'s endpoint is leaving with, if any.
    pub(super) fn migrating_out(&self, conn: ConnId) -> Option<MigrationId> {
        self.conns.get(&conn).and_then(|c| c.migrating_out)
    }

    /// The connection whose endpoint leaves with migration `id`.
    pub(super) fn migrating_out_conn(&self, id: MigrationId) -> Option<ConnId> {
        self.conns
            .iter()
            .find(|(_, c)| c.migrating_out == Some(id))
            .map(|(k, _)| *k)
    }

    /// Whether `conn`'s process may be checkpointed with `backend` now: blocked in IPC and
    /// owing no sendrec reply.
    pub(super) fn endpoint_quiescent(&self, conn: ConnId, backend: Backend) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|p| quiescent(p.owes_reply.is_empty(), &p.blocked, backend))
    }

    /// What `conn`'s process is doing, in words (why it is not quiescent).
    pub(super) fn endpoint_state(&self, conn: ConnId) -> &'static str {
        self.conns
            .get(&conn)
            .map(|p| describe(&p.blocked, !p.owes_reply.is_empty()))
            .unwrap_or("gone")
    }

    /// Takes the IPC state of quiescent endpoint `{dc, ep}` (connection `conn`) for the
    /// destination: the call it is blocked in and its pending notifications. Its own message
    /// not taken yet is withdrawn (it is sent again from the destination), and the callers
    /// queued for it are sent away: local ones hold their calls, remote ones are told to.
    pub(super) fn capture_endpoint(
        &mut self,
        conn: ConnId,
        dc: DcId,
        ep: Ep,
        backend: Backend,
        now: Instant,
    ) -> MigratedEndpoint {
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
                    qc.queue.retain(|i| i.origin != Origin::Local(conn));
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
                Origin::Local(sc) => {
                    if let Some(Blocked::SendingLocal {
                        dst,
                        kind,
                        msg,
                        timeout,
                    }) = self.conns.get(&sc).map(|s| s.blocked.clone())
                    {
                        self.migr.hold_call(dc, ep, sc, self.now());
                        self.reblock(
                            sc,
                            Blocked::Held {
                                req: send_request(kind, dst, msg, timeout),
                            },
                        );
                    }
                }
                Origin::Remote { node, op } => {
                    self.calls.unqueue(node, op);
                    self.actions.push_back(Action::Peer(PeerAction::Send {
                        node,
                        frame: PeerFrame::Ipc(IpcFrame::Redirect(Redirect { op, dc, dst: ep })),
                    }));
                }
            }
        }
        state
    }

    /// Cooperative migration: interrupts the call `conn`'s process is blocked in; the
    /// library answers with the program's snapshot.
    pub(super) fn interrupt_for_snapshot(&mut self, conn: ConnId) {
        self.actions.push_back(Action::Local(LocalAction::Respond {
            conn,
            resp: LocalResponse::Checkpoint,
        }));
        if let Some(p) = self.conns.get_mut(&conn) {
            p.blocked = Blocked::Snapshotting;
            p.gen += 1;
        }
    }

    /// Destination: the restored process (connection `conn`, pid `pid`) is endpoint
    /// `{dc, ep}`, held until the outcome of `id`.
    pub(super) fn bind_arrival(
        &mut self,
        conn: ConnId,
        dc: DcId,
        ep: Ep,
        pid: i32,
        id: MigrationId,
    ) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.bound = Some((dc, ep));
            c.pid = pid;
            c.blocked = Blocked::Installing { id };
        }
    }

    /// Committed, source side: `conn`'s endpoint runs on `to` now; this copy goes away
    /// without unbinding (a cooperative program is told to exit, a criu copy is killed).
    pub(super) fn hand_over_source(&mut self, conn: ConnId, to: NodeId, cooperative: bool) {
        let Some(p) = self.conns.get_mut(&conn) else {
            return;
        };
        p.migrating_out = None;
        p.bound = None;
        p.owes_reply.clear();
        // Its pending call went with it: when this copy dies, abandoning that call here (a
        // `Cancel` to the server's node) would take the request or the reply away from the
        // restored process.
        p.blocked = Blocked::No;
        p.deadline = None;
        p.gen += 1;
        let pid = p.pid;
        self.actions
            .push_back(Action::Process(ProcessAction::MigratedAway { pid, to }));
        if cooperative {
            self.respond(conn, LocalResponse::Exit);
        } else {
            self.actions
                .push_back(Action::Process(ProcessAction::KillTree { pid }));
        }
    }

    /// Rolled back, source side: `conn`'s endpoint stays; its held call runs, its suspended
    /// deadline counts again, and a process stopped by the dump resumes (`stopped`).
    pub(super) fn resume_source(&mut self, conn: ConnId, stopped: bool, now: Instant) {
        let Some(p) = self.conns.get_mut(&conn) else {
            return;
        };
        p.migrating_out = None;
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
        if stopped {
            if let Some(pid) = self.endpoint_pid(conn) {
                self.actions
                    .push_back(Action::Process(ProcessAction::ResumeTree { pid }));
            }
        }
    }

    /// Committed, destination side: the restored process on `conn` is endpoint `{dc, ep}`
    /// with the IPC `state` it left with; its migrated call continues here.
    pub(super) fn install_arrival(
        &mut self,
        conn: ConnId,
        dc: DcId,
        ep: Ep,
        backend: Backend,
        state: &MigratedEndpoint,
        now: Instant,
    ) {
        if let Some(p) = self.conns.get_mut(&conn) {
            p.blocked = Blocked::No;
            p.notifies = state.notifies.iter().copied().collect();
        }
        match (backend, state.call.clone()) {
            (Backend::Cooperative, _) => {
                let node = self.node;
                self.respond(conn, LocalResponse::Ep { dc, ep, node })
            }
            (Backend::Criu, Some(MigratedCall::Request(req))) => self.run_request(conn, req, now),
            (Backend::Criu, Some(MigratedCall::AwaitingReply { from, remaining_ms })) => {
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
    }

    /// Rolled back, destination side: the restored copy (`conn`, `pid`) must not live.
    pub(super) fn discard_arrival(&mut self, conn: ConnId, pid: i32) {
        if let Some(p) = self.conns.get_mut(&conn) {
            p.bound = None;
        }
        self.actions
            .push_back(Action::Process(ProcessAction::KillTree { pid }));
    }

    /// Replays a message node `origin` sent to the migrating endpoint while this node, the
    /// destination, held it: taken here if the endpoint ended up here (`target`), else its
    /// sender is told to send it again.
    pub(super) fn replay_deliver(
        &mut self,
        origin: NodeId,
        frame: PeerFrame,
        target: NodeId,
        now: Instant,
    ) {
        let PeerFrame::Ipc(IpcFrame::Deliver(deliver)) = frame else {
            return;
        };
        if target == self.node {
            self.remote_deliver(origin, deliver, now);
        } else {
            let Deliver { op, dc, dst, .. } = deliver;
            // Its sender's node holds the call (or, past the outcome, sends it again).
            self.actions.push_back(Action::Peer(PeerAction::Send {
                node: origin,
                frame: PeerFrame::Ipc(IpcFrame::Redirect(Redirect { op, dc, dst })),
            }));
        }
    }

    /// Replays a held reply or notification where the endpoint ended up (`target`).
    pub(super) fn replay_frame(&mut self, frame: PeerFrame, target: NodeId) {
        if target == self.node {
            self.apply_held_frame(frame);
        } else if self.links_up.contains(&target) {
            self.actions.push_back(Action::Peer(PeerAction::Send {
                node: target,
                frame,
            }));
        }
    }

    /// Runs the call local connection `conn` held for the migration again.
    pub(super) fn replay_call(&mut self, conn: ConnId, now: Instant) {
        if let Some(Blocked::Held { req }) = self.conns.get(&conn).map(|c| c.blocked.clone()) {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.blocked = Blocked::No;
            }
            self.run_request(conn, req, now);
        }
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

    /// A node that got our message for a migrating endpoint tells us to hold it.
    pub(super) fn on_redirect(&mut self, from: NodeId, frame: Redirect, now: Instant) {
        let Redirect { op, dc, dst } = frame;
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
        self.migr.hold_call(dc, dst, conn, self.now());
        self.reblock(
            conn,
            Blocked::Held {
                req: send_request(kind, dst, msg, timeout),
            },
        );
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
