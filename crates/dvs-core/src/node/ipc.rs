//! M3-IPC calls of local processes: send, sendrec, receive, reply and notify, locally and to
//! endpoints on other nodes.

use std::time::{Duration, Instant};

use dvs_wire::local::{LocalRequest, LocalResponse, Source};
use dvs_wire::message::NOTIFY_MTYPE;
use dvs_wire::peer::{Deliver, DeliverKind, Delivered, IpcFrame, Notify, PeerFrame, Reply};
use dvs_wire::{DcId, Ep, Errno, Message, Timeout};

use super::action::{DirRequest, LocalAction, PeerAction};
use super::conn::{Blocked, Incoming, Origin, ReplyTo};
use super::timers::TimerKey;
use super::vcopy::req_vcopy;
use super::{err, Action, NodeCore, REMOTE_GRACE};
use crate::table::Registration;
use crate::{ConnId, OpId};

/// What a client waiting in sendrec gets for a reply (or its failure) from `src`.
pub(super) fn reply_response(src: Ep, result: Result<Message, Errno>) -> LocalResponse {
    match result {
        Ok(mut m) => {
            m.source = src;
            LocalResponse::Msg(m)
        }
        Err(e) => err(e),
    }
}

pub(super) fn notify_message(from: Ep, value: u64) -> Message {
    let mut m = Message::new(NOTIFY_MTYPE);
    m.source = from;
    m.set_word(0, value);
    m
}

impl NodeCore {
    pub(super) fn local_request(&mut self, conn: ConnId, req: LocalRequest, now: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        match (&c.blocked, &req) {
            (Blocked::Snapshotting, LocalRequest::Snapshot { data }) => {
                let data = data.clone();
                return self.on_snapshot(conn, data);
            }
            (
                Blocked::No,
                LocalRequest::BindRestored {
                    version,
                    dc,
                    ep,
                    migration,
                },
            ) => {
                let (version, dc, ep, migration) = (*version, *dc, *ep, *migration);
                // The same rule as `bind`: only the restarted program may take the endpoint.
                if self.bind_refused(conn, dc, ep) {
                    return self.respond(conn, err(Errno::Permission));
                }
                return self.on_bind_restored(conn, version, dc, ep, migration);
            }
            // Its endpoint is migrating away and owes no reply: the call waits for the outcome,
            // and the process is now quiescent (blocked in IPC). While it owes a reply its calls
            // run, so that it can finish serving (vcopy, reply) and get there.
            (Blocked::No, _) if c.migrating_out.is_some() && c.owes_reply.is_empty() => {
                self.reblock(conn, Blocked::Held { req });
                return;
            }
            _ => {}
        }
        if c.blocked != Blocked::No {
            self.actions.push_back(Action::Local(LocalAction::Close {
                conn,
                reason: "request while a previous call is still in progress".into(),
            }));
            return;
        }
        self.run_request(conn, req, now);
    }

    pub(super) fn run_request(&mut self, conn: ConnId, req: LocalRequest, now: Instant) {
        match req {
            LocalRequest::Bind { version, dc, ep } => self.bind(conn, version, dc, ep),
            LocalRequest::Unbind => {
                if self.bound(conn).is_none() {
                    return self.respond(conn, err(Errno::NotBound));
                }
                self.release_endpoint(conn, Errno::DstDied);
                self.reblock(conn, Blocked::Unbinding);
                self.actions
                    .push_back(Action::Directory(DirRequest::Sync { conn }));
            }
            LocalRequest::GetEp => match self.bound(conn) {
                Some((dc, ep)) => self.respond(
                    conn,
                    LocalResponse::Ep {
                        dc,
                        ep,
                        node: self.node,
                    },
                ),
                None => self.respond(conn, err(Errno::NotBound)),
            },
            LocalRequest::Send { dst, msg, timeout } => self.send(
                conn,
                dst,
                msg,
                DeliverKind::Send,
                timeout,
                now,
                LocalRequest::Send { dst, msg, timeout },
            ),
            LocalRequest::SendRec { dst, msg, timeout } => self.send(
                conn,
                dst,
                msg,
                DeliverKind::SendRec,
                timeout,
                now,
                LocalRequest::SendRec { dst, msg, timeout },
            ),
            LocalRequest::Receive { src, timeout } => self.receive(conn, src, timeout, now),
            LocalRequest::Reply { dst, msg } => self.reply(conn, dst, msg),
            LocalRequest::Notify { dst, value } => self.notify(conn, dst, value, now),
            LocalRequest::Vcopy {
                src,
                src_addr,
                dst,
                dst_addr,
                len,
                timeout,
            } => self.vcopy(
                conn,
                req_vcopy(src, src_addr, dst, dst_addr, len, timeout),
                now,
            ),
            LocalRequest::WaitForBind { ep, timeout } => self.wait_for_bind(conn, ep, timeout, now),
            LocalRequest::BindRestored { .. } | LocalRequest::Snapshot { .. } => {
                self.respond(conn, err(Errno::Invalid))
            }
        }
    }

    pub(super) fn bound(&self, conn: ConnId) -> Option<(DcId, Ep)> {
        self.conns.get(&conn).and_then(|c| c.bound)
    }

    pub(super) fn respond(&mut self, conn: ConnId, resp: LocalResponse) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.blocked = Blocked::No;
            c.deadline = None;
            c.gen += 1;
        }
        self.actions
            .push_back(Action::Local(LocalAction::Respond { conn, resp }));
    }

    /// Blocks `conn` in `state` until `timeout` (from `now`).
    pub(super) fn block(
        &mut self,
        conn: ConnId,
        state: Blocked,
        timeout: Timeout,
        now: Instant,
        grace: Duration,
    ) {
        let deadline = timeout.as_duration().map(|d| now + d + grace);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.blocked = state;
        c.gen += 1;
        c.deadline = deadline;
        let gen = c.gen;
        if let Some(d) = deadline {
            self.add_timer(d, TimerKey::Conn { conn, gen });
        }
    }

    /// Re-blocks keeping the call's deadline (a call moving from one wait to the next).
    pub(super) fn reblock(&mut self, conn: ConnId, state: Blocked) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.blocked = state;
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn send(
        &mut self,
        conn: ConnId,
        dst: Ep,
        mut msg: Message,
        kind: DeliverKind,
        timeout: Timeout,
        now: Instant,
        req: LocalRequest,
    ) {
        let Some((dc, me)) = self.bound(conn) else {
            return self.respond(conn, err(Errno::NotBound));
        };
        if let Err(e) = self.dc_check(dc, dst) {
            return self.respond(conn, err(e));
        }
        if dst == me {
            return self.respond(conn, err(Errno::SelfSend));
        }
        msg.source = me;
        let Some(reg) = self.resolve(conn, dc, dst, &req) else {
            return;
        };
        match reg {
            Registration::Local { conn: q } => {
                let inc = Incoming {
                    src: me,
                    msg,
                    kind,
                    origin: Origin::Local(conn),
                };
                if self.try_hand_over(q, dc, dst, &inc) {
                    self.after_taken(dc, dst, q, inc);
                    if kind == DeliverKind::SendRec {
                        // Taken at once: the call's timeout still bounds the wait for the reply
                        // (after_taken only re-blocks, which keeps a deadline this call never set).
                        self.block(
                            conn,
                            Blocked::AwaitingReply { from: dst },
                            timeout,
                            now,
                            Duration::ZERO,
                        );
                    }
                    return;
                }
                // Deadlock: the destination is itself blocked sending to us.
                if let Some(qc) = self.conns.get(&q) {
                    if matches!(qc.blocked, Blocked::SendingLocal { dst: d, .. } if d == me) {
                        return self.respond(conn, err(Errno::Deadlock));
                    }
                }
                if timeout == Timeout::NoWait {
                    return self.respond(conn, err(Errno::TimedOut));
                }
                if let Err(e) = self.enqueue(dc, q, inc) {
                    return self.respond(conn, err(e));
                }
                self.block(
                    conn,
                    Blocked::SendingLocal {
                        dst,
                        kind,
                        msg,
                        timeout,
                    },
                    timeout,
                    now,
                    Duration::ZERO,
                );
            }
            Registration::Remote { node } | Registration::Backup { node } => {
                if !self.links_up.contains(&node) {
                    return self.respond(conn, err(Errno::NodeUnreachable));
                }
                let op = self.new_op();
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node,
                    frame: PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
                        op,
                        dc,
                        src: me,
                        dst,
                        kind,
                        msg,
                        timeout,
                    })),
                }));
                self.calls.sent(node, op, conn);
                self.block(
                    conn,
                    Blocked::SendingRemote {
                        dst,
                        node,
                        op,
                        kind,
                        msg,
                        timeout,
                    },
                    timeout,
                    now,
                    REMOTE_GRACE,
                );
            }
        }
    }

    pub(super) fn new_op(&mut self) -> OpId {
        let op = self.next_op;
        self.next_op += 1;
        op
    }

    /// Queues `inc` for local endpoint `q` of `dc`, within the DC's queue limit.
    pub(super) fn enqueue(&mut self, dc: DcId, q: ConnId, inc: Incoming) -> Result<(), Errno> {
        let max = self
            .dcs
            .get(&dc)
            .map(|d| d.max_queue as usize)
            .unwrap_or(usize::MAX);
        let qc = self
            .conns
            .get_mut(&q)
            .expect("local registrations point at live conns");
        if qc.queue.len() >= max {
            return Err(Errno::QueueFull);
        }
        qc.queue.push_back(inc);
        Ok(())
    }

    /// If local endpoint `q` is receiving and accepts `inc`, hands the message over.
    pub(super) fn try_hand_over(&mut self, q: ConnId, _dc: DcId, _dst: Ep, inc: &Incoming) -> bool {
        let Some(qc) = self.conns.get(&q) else {
            return false;
        };
        match qc.blocked {
            Blocked::Receiving { src } if src.accepts(inc.src) => {
                self.respond(q, LocalResponse::Msg(inc.msg));
                true
            }
            _ => false,
        }
    }

    /// `inc` was taken by local endpoint `{dc, dst}` (connection `q`): complete its sender.
    pub(super) fn after_taken(&mut self, dc: DcId, dst: Ep, q: ConnId, inc: Incoming) {
        match (inc.kind, inc.origin) {
            (DeliverKind::Send, Origin::Local(s)) => self.respond(s, LocalResponse::Done),
            (DeliverKind::Send, Origin::Remote { node, op }) => {
                self.calls.unqueue(node, op);
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node,
                    frame: PeerFrame::Ipc(IpcFrame::Delivered(Delivered { op, result: Ok(()) })),
                }));
            }
            (DeliverKind::SendRec, origin) => {
                let to = match origin {
                    Origin::Local(s) => {
                        self.reblock(s, Blocked::AwaitingReply { from: dst });
                        ReplyTo::Local(s)
                    }
                    Origin::Remote { node, op } => {
                        self.calls.taken(node, op, dc, dst, inc.src);
                        ReplyTo::Remote(node)
                    }
                };
                if let Some(qc) = self.conns.get_mut(&q) {
                    qc.owes_reply.insert(inc.src, to);
                }
            }
        }
        let _ = dc;
    }

    pub(super) fn receive(&mut self, conn: ConnId, src: Source, timeout: Timeout, now: Instant) {
        let Some((dc, me)) = self.bound(conn) else {
            return self.respond(conn, err(Errno::NotBound));
        };
        let c = self.conns.get_mut(&conn).expect("caller exists");
        // A migrating endpoint takes nothing new: what waits for it travels or is replayed.
        if c.migrating_out.is_some() {
            self.block(
                conn,
                Blocked::Receiving { src },
                timeout,
                now,
                Duration::ZERO,
            );
            return;
        }
        // Pending notifications first.
        let pending = match src {
            Source::Any => c.notifies.keys().next().copied(),
            Source::Ep(e) => c.notifies.contains_key(&e).then_some(e),
        };
        if let Some(from) = pending {
            let value = c.notifies.remove(&from).expect("present");
            return self.respond(conn, LocalResponse::Msg(notify_message(from, value)));
        }
        if let Some(pos) = c.queue.iter().position(|i| src.accepts(i.src)) {
            let inc = c.queue.remove(pos).expect("position is valid");
            self.respond(conn, LocalResponse::Msg(inc.msg));
            self.after_taken(dc, me, conn, inc);
            return;
        }
        if timeout == Timeout::NoWait {
            return self.respond(conn, err(Errno::TimedOut));
        }
        self.block(
            conn,
            Blocked::Receiving { src },
            timeout,
            now,
            Duration::ZERO,
        );
    }

    pub(super) fn reply(&mut self, conn: ConnId, dst: Ep, mut msg: Message) {
        let Some((dc, me)) = self.bound(conn) else {
            return self.respond(conn, err(Errno::NotBound));
        };
        msg.source = me;
        let c = self.conns.get_mut(&conn).expect("caller exists");
        let Some(to) = c.owes_reply.remove(&dst) else {
            return self.respond(conn, err(Errno::NotWaiting));
        };
        self.calls.replied(dc, me, dst);
        let frame = PeerFrame::Ipc(IpcFrame::Reply(Reply {
            dc,
            src: me,
            dst,
            result: Ok(msg),
        }));
        // The client may be migrating: the reply waits for the outcome and follows it.
        if self.migr.holds(dc, dst) {
            self.migr.hold_frame(dc, dst, frame, self.now());
            return self.respond(conn, LocalResponse::Done);
        }
        // Route by where the client is now (it may have migrated since it called).
        let target = match (self.table.get(dc, dst), to) {
            (Some(Registration::Local { conn: cc }), _) | (None, ReplyTo::Local(cc)) => {
                ReplyTo::Local(cc)
            }
            (Some(Registration::Remote { node } | Registration::Backup { node }), _)
            | (None, ReplyTo::Remote(node)) => ReplyTo::Remote(node),
        };
        match target {
            ReplyTo::Local(cc) => {
                if !matches!(self.conns.get(&cc).map(|c| &c.blocked), Some(Blocked::AwaitingReply { from }) if *from == me)
                {
                    return self.respond(conn, err(Errno::NotWaiting));
                }
                self.respond(cc, LocalResponse::Msg(msg));
            }
            ReplyTo::Remote(node) => {
                if !self.links_up.contains(&node) {
                    return self.respond(conn, err(Errno::NodeUnreachable));
                }
                self.actions
                    .push_back(Action::Peer(PeerAction::Send { node, frame }));
            }
        }
        self.respond(conn, LocalResponse::Done);
    }

    pub(super) fn notify(&mut self, conn: ConnId, dst: Ep, value: u64, _now: Instant) {
        let Some((dc, me)) = self.bound(conn) else {
            return self.respond(conn, err(Errno::NotBound));
        };
        if let Err(e) = self.dc_check(dc, dst) {
            return self.respond(conn, err(e));
        }
        if dst == me {
            return self.respond(conn, err(Errno::SelfSend));
        }
        // Never blocks: a notify to a migrating endpoint is stored and delivered after the move.
        if self.migr.holds(dc, dst) {
            self.migr.hold_frame(
                dc,
                dst,
                PeerFrame::Ipc(IpcFrame::Notify(Notify {
                    dc,
                    src: me,
                    dst,
                    value,
                })),
                self.now(),
            );
            return self.respond(conn, LocalResponse::Done);
        }
        let Some(reg) = self.resolve(conn, dc, dst, &LocalRequest::Notify { dst, value }) else {
            return;
        };
        match reg {
            Registration::Local { conn: q } => self.notify_local(q, me, value),
            Registration::Remote { node } | Registration::Backup { node } => {
                if !self.links_up.contains(&node) {
                    return self.respond(conn, err(Errno::NodeUnreachable));
                }
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node,
                    frame: PeerFrame::Ipc(IpcFrame::Notify(Notify {
                        dc,
                        src: me,
                        dst,
                        value,
                    })),
                }));
            }
        }
        self.respond(conn, LocalResponse::Done);
    }

    pub(super) fn notify_local(&mut self, q: ConnId, src: Ep, value: u64) {
        let Some(qc) = self.conns.get_mut(&q) else {
            return;
        };
        match qc.blocked {
            Blocked::Receiving { src: s } if s.accepts(src) && !qc.notifies.contains_key(&src) => {
                self.respond(q, LocalResponse::Msg(notify_message(src, value)));
            }
            _ => *qc.notifies.entry(src).or_insert(0) |= value,
        }
    }
}
