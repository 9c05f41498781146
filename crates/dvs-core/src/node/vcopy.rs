//! vcopy: memory copies between endpoints, local or across nodes.

use std::time::{Duration, Instant};

use dvs_wire::local::{LocalRequest, LocalResponse};
use dvs_wire::peer::{IpcFrame, PeerFrame, VcopyDone, VcopyPull};
use dvs_wire::{Ep, Errno, NodeId, Timeout};

use super::action::{MemoryAction, PeerAction};
use super::conn::{is_blocked_in_ipc, Blocked};
use super::vcopy_in::{IncomingKey, IncomingVcopy};
use super::{err, Action, NodeCore, VcopyCompletion, VCOPY_MAX};
use crate::table::Registration;
use crate::Map;
use crate::{ConnId, OpId};

#[derive(Clone, Copy, Debug)]
pub(super) enum Op {
    /// A local caller's vcopy; `nodes`: the other nodes it depends on.
    Vcopy {
        conn: ConnId,
        nodes: [Option<NodeId>; 2],
    },
}

pub(super) struct VcopyArgs {
    pub(super) src: Ep,
    pub(super) src_addr: u64,
    pub(super) dst: Ep,
    pub(super) dst_addr: u64,
    pub(super) len: u64,
    pub(super) timeout: Timeout,
}

impl VcopyArgs {
    fn request(&self) -> LocalRequest {
        LocalRequest::Vcopy {
            src: self.src,
            src_addr: self.src_addr,
            dst: self.dst,
            dst_addr: self.dst_addr,
            len: self.len,
            timeout: self.timeout,
        }
    }
}

pub(super) fn req_vcopy(
    src: Ep,
    src_addr: u64,
    dst: Ep,
    dst_addr: u64,
    len: u64,
    timeout: Timeout,
) -> VcopyArgs {
    VcopyArgs {
        src,
        src_addr,
        dst,
        dst_addr,
        len,
        timeout,
    }
}

/// Vcopy state of this node.
#[derive(Default)]
pub(super) struct Vcopies {
    /// Vcopies of local callers, by op.
    pub(super) local: Map<OpId, Op>,
    /// Vcopies streaming into this node, until their last chunk.
    pub(super) incoming: Map<IncomingKey, IncomingVcopy>,
    /// Opening order of incoming streams.
    pub(super) seq: u64,
}

impl NodeCore {
    pub(super) fn vcopy(&mut self, conn: ConnId, v: VcopyArgs, now: Instant) {
        let Some((dc, me)) = self.bound(conn) else {
            return self.respond(conn, err(Errno::NotBound));
        };
        if v.len > VCOPY_MAX {
            return self.respond(conn, err(Errno::TooBig));
        }
        for ep in [v.src, v.dst] {
            if let Err(e) = self.dc_check(dc, ep) {
                return self.respond(conn, err(e));
            }
        }
        let req = v.request();
        let Some(src_reg) = self.resolve(conn, dc, v.src, &req) else {
            return;
        };
        let Some(dst_reg) = self.resolve(conn, dc, v.dst, &req) else {
            return;
        };
        if v.len == 0 {
            return self.respond(conn, LocalResponse::Done);
        }
        let op = self.new_op();
        match src_reg {
            Registration::Local { conn: sc } => {
                let src_pid = match self.party_pid(sc, conn) {
                    Ok(p) => p,
                    Err(e) => return self.respond(conn, err(e)),
                };
                match dst_reg {
                    Registration::Local { conn: dcn } => {
                        let dst_pid = match self.party_pid(dcn, conn) {
                            Ok(p) => p,
                            Err(e) => return self.respond(conn, err(e)),
                        };
                        self.actions
                            .push_back(Action::Memory(MemoryAction::CopyLocal {
                                src_pid,
                                src_addr: v.src_addr,
                                dst_pid,
                                dst_addr: v.dst_addr,
                                len: v.len,
                                done: VcopyCompletion::Local { op },
                            }));
                    }
                    Registration::Remote { node } | Registration::Backup { node } => {
                        if !self.links_up.contains(&node) {
                            return self.respond(conn, err(Errno::NodeUnreachable));
                        }
                        self.actions.push_back(Action::Memory(MemoryAction::Stream {
                            pid: src_pid,
                            src_addr: v.src_addr,
                            len: v.len,
                            to: node,
                            op,
                            caller_node: self.node,
                            dc,
                            caller: me,
                            dst: v.dst,
                            dst_addr: v.dst_addr,
                        }));
                    }
                }
            }
            Registration::Remote { node } | Registration::Backup { node } => {
                if !self.links_up.contains(&node) {
                    return self.respond(conn, err(Errno::NodeUnreachable));
                }
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node,
                    frame: PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull {
                        op,
                        caller_node: self.node,
                        dc,
                        caller: me,
                        src: v.src,
                        src_addr: v.src_addr,
                        dst: v.dst,
                        dst_addr: v.dst_addr,
                        len: v.len,
                    })),
                }));
                // The source node streams the data here when the destination is local.
                if let Registration::Local { .. } = dst_reg {
                    self.expect_vcopy_data(node, op, dc, me, v.dst, v.dst_addr, v.len);
                }
            }
        }
        let remote = |r: Registration| Some(r.node(self.node)).filter(|n| *n != self.node);
        let nodes = [remote(src_reg), remote(dst_reg)];
        self.vcopies.local.insert(op, Op::Vcopy { conn, nodes });
        self.block(conn, Blocked::Vcopy { op }, v.timeout, now, Duration::ZERO);
    }

    /// The pid of a vcopy party: it must be the caller or blocked in IPC.
    pub(super) fn party_pid(&self, party: ConnId, caller_conn: ConnId) -> Result<i32, Errno> {
        let c = self.conns.get(&party).ok_or(Errno::DstDied)?;
        if party != caller_conn && !is_blocked_in_ipc(&c.blocked) {
            return Err(Errno::Busy);
        }
        Ok(c.pid)
    }

    /// A local vcopy finished.
    pub(super) fn on_vcopy_local_done(&mut self, done: VcopyCompletion, result: Result<(), Errno>) {
        self.complete_vcopy(done, result);
    }

    pub(super) fn complete_vcopy(&mut self, done: VcopyCompletion, result: Result<(), Errno>) {
        match done {
            VcopyCompletion::Local { op } => {
                if let Some(Op::Vcopy { conn, .. }) = self.vcopies.local.remove(&op) {
                    self.forget_local_vcopy(op);
                    let resp = match result {
                        Ok(()) => LocalResponse::Done,
                        Err(e) => err(e),
                    };
                    self.respond(conn, resp);
                }
            }
            VcopyCompletion::Remote { node, op } => {
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node,
                    frame: PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone { op, result })),
                }));
            }
        }
    }

    pub(super) fn completion(&self, caller_node: NodeId, op: OpId) -> VcopyCompletion {
        if caller_node == self.node {
            VcopyCompletion::Local { op }
        } else {
            VcopyCompletion::Remote {
                node: caller_node,
                op,
            }
        }
    }

    /// Reading the source of a vcopy stream failed; tell the caller.
    pub(super) fn on_vcopy_stream_failed(&mut self, caller_node: NodeId, op: OpId, e: Errno) {
        let done = self.completion(caller_node, op);
        self.complete_vcopy(done, Err(e));
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn remote_vcopy_pull(&mut self, from: NodeId, pull: VcopyPull) {
        let VcopyPull {
            op,
            caller_node,
            dc,
            caller,
            src,
            src_addr,
            dst,
            dst_addr,
            len,
        } = pull;
        let done = self.completion(caller_node, op);
        let result: Result<(), Errno> = (|| {
            if !self.peer_in_dc(from, dc) {
                return Err(Errno::NodeNotInDc);
            }
            if let Err(v) = self.caller_on(from, dc, caller) {
                tracing::warn!(node = from, op, "vcopy pull refused: {v}");
                return Err(Errno::Permission);
            }
            if len > VCOPY_MAX {
                return Err(Errno::TooBig);
            }
            let src_pid = match self.table.get(dc, src) {
                Some(Registration::Local { conn: sc }) => {
                    let s = self.conns.get(&sc).ok_or(Errno::SrcDied)?;
                    if !is_blocked_in_ipc(&s.blocked) {
                        return Err(Errno::Busy);
                    }
                    s.pid
                }
                _ => self.installing_pid(dc, src).ok_or(Errno::SrcDied)?,
            };
            match self.table.get(dc, dst) {
                Some(Registration::Local { conn: dcn }) => {
                    let d = self.conns.get(&dcn).ok_or(Errno::DstDied)?;
                    if !is_blocked_in_ipc(&d.blocked) {
                        return Err(Errno::Busy);
                    }
                    self.actions
                        .push_back(Action::Memory(MemoryAction::CopyLocal {
                            src_pid,
                            src_addr,
                            dst_pid: d.pid,
                            dst_addr,
                            len,
                            done,
                        }));
                }
                Some(Registration::Remote { node } | Registration::Backup { node }) => {
                    if !self.links_up.contains(&node) {
                        return Err(Errno::NodeUnreachable);
                    }
                    self.actions.push_back(Action::Memory(MemoryAction::Stream {
                        pid: src_pid,
                        src_addr,
                        len,
                        to: node,
                        op,
                        caller_node,
                        dc,
                        caller,
                        dst,
                        dst_addr,
                    }));
                }
                None => {
                    // The caller knows the destination; trust its node if it is the caller's.
                    if caller == dst && self.links_up.contains(&caller_node) {
                        self.actions.push_back(Action::Memory(MemoryAction::Stream {
                            pid: src_pid,
                            src_addr,
                            len,
                            to: caller_node,
                            op,
                            caller_node,
                            dc,
                            caller,
                            dst,
                            dst_addr,
                        }));
                    } else {
                        return Err(Errno::NoSuchEndpoint);
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.complete_vcopy(done, Err(e));
        }
    }
}
