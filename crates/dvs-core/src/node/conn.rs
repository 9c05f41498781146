//! Local connections: the state of each process's connection (what it is blocked in, its
//! queue, whom it owes a reply), and what happens when one connects, disconnects or gives up
//! a call.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use dvs_wire::local::{LocalRequest, Source};
use dvs_wire::peer::{
    Cancel, DeliverKind, Delivered, IpcFrame, MigrationId, PeerFrame, Reply, Unbound,
};
use dvs_wire::{DcId, Ep, Errno, Message, NodeId, Timeout};

use super::action::{DirRequest, PeerAction};
use super::{err, Action, LocalPeer, NodeCore};
use crate::table::Registration;
use crate::Map;
use crate::{ConnId, OpId};

/// Where a queued message came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Origin {
    Local(ConnId),
    Remote { node: NodeId, op: OpId },
}

/// A message waiting for its receiver to take it.
#[derive(Clone, Debug)]
pub(super) struct Incoming {
    pub(super) src: Ep,
    pub(super) msg: Message,
    pub(super) kind: DeliverKind,
    pub(super) origin: Origin,
}

/// Whom a process owes a reply to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReplyTo {
    Local(ConnId),
    Remote(NodeId),
}

/// What a local process is blocked in.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Blocked {
    /// Not in a call (or in a call that completes at once).
    No,
    /// Its message waits in the queue of a local endpoint.
    SendingLocal {
        dst: Ep,
        kind: DeliverKind,
        msg: Message,
        timeout: Timeout,
    },
    /// Its message went to another node (op outstanding).
    SendingRemote {
        dst: Ep,
        node: NodeId,
        op: OpId,
        kind: DeliverKind,
        msg: Message,
        timeout: Timeout,
    },
    /// Its request waits for a migration's outcome (of its peer, or of itself).
    Held { req: LocalRequest },
    /// Cooperative migration: asked for its snapshot.
    Snapshotting,
    /// Restored on this node as the destination of a migration; waits for the commit.
    Installing { id: MigrationId },
    /// Waiting for a reply from `from` (its sendrec message was taken).
    AwaitingReply { from: Ep },
    /// In receive.
    Receiving { src: Source },
    /// In vcopy.
    Vcopy { op: OpId },
    /// In wait_for_bind.
    WaitingBind { ep: Ep },
    /// Waiting for the directory to say where an endpoint runs; the request is re-run then.
    LookingUp { ep: Ep, req: LocalRequest },
    /// Waiting for the directory to accept its registration.
    Binding,
    /// Waiting for the directory to forget its endpoint.
    Unbinding,
}

pub(super) struct Conn {
    pub(super) pid: i32,
    /// Uid and launch record of the process, for the bind permission check.
    pub(super) uid: u32,
    pub(super) launched_for: Option<(DcId, Ep)>,
    pub(super) bound: Option<(DcId, Ep)>,
    pub(super) blocked: Blocked,
    /// Deadline of the current call; a fresh generation invalidates older timers.
    pub(super) deadline: Option<Instant>,
    pub(super) gen: u64,
    pub(super) queue: VecDeque<Incoming>,
    pub(super) notifies: BTreeMap<Ep, u64>,
    pub(super) owes_reply: Map<Ep, ReplyTo>,
    /// Set while this endpoint migrates away: nothing enters or leaves it.
    pub(super) migrating_out: Option<MigrationId>,
}

pub(super) fn is_blocked_in_ipc(b: &Blocked) -> bool {
    matches!(
        b,
        Blocked::SendingLocal { .. }
            | Blocked::SendingRemote { .. }
            | Blocked::AwaitingReply { .. }
            | Blocked::Receiving { .. }
            | Blocked::Held { .. }
    )
}

impl NodeCore {
    /// A process connected; `peer` says who it is (pid as seen by the node kernel, uid, and
    /// the endpoint it was launched for).
    pub(super) fn on_local_connect(&mut self, conn: ConnId, peer: LocalPeer) {
        self.conns.insert(
            conn,
            Conn {
                pid: peer.pid,
                uid: peer.uid,
                launched_for: peer.launched_for,
                bound: None,
                blocked: Blocked::No,
                deadline: None,
                gen: 0,
                queue: VecDeque::new(),
                notifies: BTreeMap::new(),
                owes_reply: Map::default(),
                migrating_out: None,
            },
        );
    }

    /// A process disconnected (exited, died, or its connection was closed).
    pub(super) fn on_local_disconnect(&mut self, conn: ConnId) {
        self.abandon_call(conn);
        self.release_endpoint(conn, Errno::DstDied);
        self.conns.remove(&conn);
    }

    /// A request from a local process.
    pub(super) fn on_local_request(&mut self, conn: ConnId, req: LocalRequest, now: Instant) {
        self.local_request(conn, req, now);
        self.check_quiescence(now);
    }

    /// Unbinds `conn`'s endpoint: everyone waiting on it gets `why`.
    pub(super) fn release_endpoint(&mut self, conn: ConnId, why: Errno) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some((dc, ep)) = c.bound.take() else {
            return;
        };
        let was_binding = c.blocked == Blocked::Binding;
        let queue = std::mem::take(&mut c.queue);
        let owed: Vec<(Ep, ReplyTo)> = c.owes_reply.drain().collect();
        c.notifies.clear();
        if was_binding {
            // The directory may still record it; remove it when the CAS lands.
            self.actions
                .push_back(Action::Directory(DirRequest::Unregister { dc, ep }));
            return;
        }
        if self.table.get(dc, ep) == Some(Registration::Local { conn }) {
            self.table.remove(dc, ep);
            self.actions
                .push_back(Action::Directory(DirRequest::Unregister { dc, ep }));
            self.broadcast(dc, PeerFrame::Ipc(IpcFrame::Unbound(Unbound { dc, ep })));
        }
        self.calls.server_gone(dc, ep);
        for inc in queue {
            self.fail_incoming(dc, ep, inc, why);
        }
        for (client, to) in owed {
            match to {
                ReplyTo::Local(cc) => {
                    if matches!(self.conns.get(&cc).map(|c| &c.blocked), Some(Blocked::AwaitingReply { from }) if *from == ep)
                    {
                        self.respond(cc, err(why));
                    }
                }
                ReplyTo::Remote(node) => {
                    self.actions.push_back(Action::Peer(PeerAction::Send {
                        node,
                        frame: PeerFrame::Ipc(IpcFrame::Reply(Reply {
                            dc,
                            src: ep,
                            dst: client,
                            result: Err(why),
                        })),
                    }));
                }
            }
        }
        self.fail_local_receivers_from(dc, ep, Errno::SrcDied);
    }

    /// Local processes receiving only from `{dc, ep}` will never get a message: fail them.
    pub(super) fn fail_local_receivers_from(&mut self, dc: DcId, ep: Ep, why: Errno) {
        let victims: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.bound.map(|b| b.0) == Some(dc)
                    && c.blocked
                        == Blocked::Receiving {
                            src: Source::Ep(ep),
                        }
            })
            .map(|(id, _)| *id)
            .collect();
        for v in victims {
            self.respond(v, err(why));
        }
    }

    pub(super) fn fail_incoming(&mut self, dc: DcId, _dst: Ep, inc: Incoming, why: Errno) {
        match inc.origin {
            Origin::Local(sc) => self.respond(sc, err(why)),
            Origin::Remote { node, op } => {
                self.calls.unqueue(node, op);
                let _ = dc;
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node,
                    frame: PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                        op,
                        result: Err(why),
                    })),
                }));
            }
        }
    }

    /// Abandons whatever call `conn` is blocked in (it died or timed out): removes its queued
    /// message, cancels remote operations.
    pub(super) fn abandon_call(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let dc = c.bound.map(|b| b.0);
        match c.blocked.clone() {
            Blocked::SendingLocal { dst, .. } => {
                if let (Some(dc), Some(Registration::Local { conn: q })) =
                    (dc, dc.and_then(|dc| self.table.get(dc, dst)))
                {
                    let _ = dc;
                    if let Some(qc) = self.conns.get_mut(&q) {
                        qc.queue.retain(|i| i.origin != Origin::Local(conn));
                    }
                }
            }
            Blocked::SendingRemote {
                node,
                op,
                dst,
                kind,
                ..
            } => {
                match (kind, c.bound) {
                    (DeliverKind::SendRec, Some((dc, me))) => {
                        self.calls.abandon(node, op, dc, me, dst)
                    }
                    _ => {
                        self.calls.settle(node, op);
                    }
                }
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node,
                    frame: PeerFrame::Ipc(IpcFrame::Cancel(Cancel { op })),
                }));
            }
            Blocked::Vcopy { op } => {
                self.vcopies.local.remove(&op);
                self.forget_local_vcopy(op);
            }
            Blocked::Held { .. } => self.migr.unhold_call(conn),
            Blocked::LookingUp { ep, .. } | Blocked::WaitingBind { ep } => {
                if let Some(dc) = dc {
                    if let Some(v) = self.waiters.lookups.get_mut(&(dc, ep)) {
                        v.retain(|x| *x != conn);
                    }
                    if let Some(v) = self.waiters.binds.get_mut(&(dc, ep)) {
                        v.retain(|x| *x != conn);
                    }
                }
            }
            _ => {}
        }
    }
}
