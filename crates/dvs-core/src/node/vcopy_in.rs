//! Vcopies streaming into this node from others: each `VcopyData` chunk must belong to a
//! vcopy this node expects and follow the chunks before it, before a byte of it is written.

use dvs_wire::peer::{BulkFrame, PeerFrame, VcopyData};
use dvs_wire::{DcId, Ep, Errno, NodeId};
use tracing::debug;

use super::conn::is_blocked_in_ipc;
use super::peer_check::Violation;
use super::{NodeCore, VCOPY_MAX};
use crate::table::Registration;
use crate::OpId;

/// Most vcopies a peer may have streaming into this node at once for callers on other
/// nodes. A stream whose source failed midway never finishes here (nobody tells this node),
/// so the oldest is dropped to make room.
pub const MAX_INCOMING_VCOPIES_PER_PEER: usize = 32;

/// One `VcopyData` chunk as the daemon received it: the frame's fields and the length of its
/// data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcopyChunk {
    pub op: OpId,
    pub caller_node: NodeId,
    pub dc: DcId,
    pub caller: Ep,
    pub dst: Ep,
    pub dst_addr: u64,
    pub offset: u64,
    pub total: u64,
    /// Bytes of data in this chunk.
    pub len: u64,
}

impl VcopyChunk {
    /// The chunk of a `VcopyData` frame carrying `len` bytes; `None` for other frames.
    pub fn from_frame(frame: &PeerFrame, len: u64) -> Option<Self> {
        match *frame {
            PeerFrame::Bulk(BulkFrame::VcopyData(VcopyData {
                op,
                caller_node,
                dc,
                caller,
                dst,
                dst_addr,
                offset,
                total,
            })) => Some(VcopyChunk {
                op,
                caller_node,
                dc,
                caller,
                dst,
                dst_addr,
                offset,
                total,
                len,
            }),
            _ => None,
        }
    }

    /// Where in the destination process this chunk goes.
    pub fn addr(&self) -> u64 {
        self.dst_addr.wrapping_add(self.offset)
    }

    /// Whether this chunk ends the copy.
    pub fn last(&self) -> bool {
        self.offset.saturating_add(self.len) >= self.total
    }
}

/// A vcopy streaming into this node: what its later chunks must look like.
#[derive(Clone, Debug)]
pub(super) struct IncomingVcopy {
    pub(super) dc: DcId,
    pub(super) caller: Ep,
    pub(super) dst: Ep,
    pub(super) dst_addr: u64,
    pub(super) total: u64,
    pub(super) received: u64,
    /// Opening order, to drop the oldest when a peer has too many open.
    pub(super) seq: u64,
}

/// Key of an [`IncomingVcopy`]: (sending node, caller's node, caller's op). The sender is part
/// of the key so that a peer cannot collide with (or close) another node's stream.
pub(super) type IncomingKey = (NodeId, NodeId, OpId);

impl NodeCore {
    /// Records that the local caller's vcopy `op` expects its data from `from`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn expect_vcopy_data(
        &mut self,
        from: NodeId,
        op: OpId,
        dc: DcId,
        caller: Ep,
        dst: Ep,
        dst_addr: u64,
        total: u64,
    ) {
        self.vcopies.seq += 1;
        self.vcopies.incoming.insert(
            (from, self.node, op),
            IncomingVcopy {
                dc,
                caller,
                dst,
                dst_addr,
                total,
                received: 0,
                seq: self.vcopies.seq,
            },
        );
    }

    /// Forgets what the local caller's vcopy `op` expected (it ended).
    pub(super) fn forget_local_vcopy(&mut self, op: OpId) {
        if !self.vcopies.incoming.is_empty() {
            let here = self.node;
            self.vcopies
                .incoming
                .retain(|(_, caller_node, o), _| !(*caller_node == here && *o == op));
        }
    }

    /// A `VcopyData` chunk arrived from `from`: the pid to write it into (at
    /// [`VcopyChunk::addr`]), or `None` to drop it. Then call
    /// [`NodeCore::on_vcopy_chunk_written`].
    ///
    /// A chunk must belong to an outstanding vcopy: one a local caller started (pulling from
    /// `from`), or, for a caller on another node, one whose first chunk opened a record here.
    /// That first chunk comes from the caller's node (its source is local there) or from a
    /// third node running the source, which the caller asked with `VcopyPull`; this node cannot
    /// see that request, so it checks only that the caller is known to run on `caller_node`.
    /// Later chunks must match the record and follow each other without gap or overlap.
    pub(super) fn on_vcopy_chunk(&mut self, from: NodeId, c: &VcopyChunk) -> Option<i32> {
        if self.is_condemned(from) {
            return None;
        }
        let end = c.offset.checked_add(c.len);
        if c.len == 0
            || c.total > VCOPY_MAX
            || end.is_none_or(|e| e > c.total)
            || c.dst_addr.checked_add(c.total).is_none()
        {
            self.peer_violation(from, "VcopyData", Violation::MalformedChunk { op: c.op });
            return None;
        }
        let key = (from, c.caller_node, c.op);
        let done = self.completion(c.caller_node, c.op);
        let last = c.last();
        if let Some(r) = self.vcopies.incoming.get_mut(&key) {
            let what = if (r.dc, r.caller, r.dst) != (c.dc, c.caller, c.dst) {
                Some("endpoints differ from the vcopy's")
            } else if (r.dst_addr, r.total) != (c.dst_addr, c.total) {
                Some("address range differs from the vcopy's")
            } else if c.offset != r.received {
                Some("chunk out of sequence")
            } else {
                None
            };
            if let Some(what) = what {
                self.vcopies.incoming.remove(&key);
                self.peer_violation(
                    from,
                    "VcopyData",
                    Violation::ChunkMismatch { op: c.op, what },
                );
                return None;
            }
            r.received += c.len;
            if last {
                self.vcopies.incoming.remove(&key);
            }
        } else if c.caller_node == self.node {
            // A vcopy of a local caller that is over (it timed out, failed, or its record is
            // gone with a failed chunk): the rest of its stream is still on the way.
            if c.op >= self.next_op {
                self.peer_violation(from, "VcopyData", Violation::NeverIssued { op: c.op });
            } else {
                debug!(
                    node = from,
                    op = c.op,
                    "chunk of a vcopy that ended here dropped"
                );
            }
            return None;
        } else if c.offset != 0 {
            debug!(
                node = from,
                op = c.op,
                "chunk of a vcopy refused or ended here dropped"
            );
            return None;
        } else {
            // The first chunk of a vcopy of a caller on another node: as before, DC errors go
            // back to the caller.
            if let Err(e) = self.chunk_dc_check(from, c) {
                self.complete_vcopy(done, Err(e));
                return None;
            }
            if let Err(v) = self.caller_on(c.caller_node, c.dc, c.caller) {
                // Refused, but not taken for a forgery: the registration here can be stale
                // (a directory event about an earlier holder of the endpoint), which the
                // randomised IPC simulation produced. The caller gets the error; the rest of
                // the stream is dropped (no record).
                tracing::warn!(node = from, op = c.op, "vcopy data refused: {v}");
                self.complete_vcopy(done, Err(Errno::Permission));
                return None;
            }
            if !last {
                self.open_incoming(key, c);
            }
        }
        match self.chunk_target(c) {
            Ok(pid) => Some(pid),
            Err(e) => {
                self.vcopies.incoming.remove(&key);
                self.complete_vcopy(done, Err(e));
                None
            }
        }
    }

    pub(super) fn chunk_dc_check(&self, from: NodeId, c: &VcopyChunk) -> Result<(), Errno> {
        let info = self.dcs.get(&c.dc).ok_or(Errno::NoSuchDc)?;
        if !info.nodes.contains(&from)
            || !info.nodes.contains(&self.node)
            || !info.nodes.contains(&c.caller_node)
        {
            return Err(Errno::NodeNotInDc);
        }
        Ok(())
    }

    /// Opens the record of a vcopy streaming in for a caller on another node.
    pub(super) fn open_incoming(&mut self, key: IncomingKey, c: &VcopyChunk) {
        let (from, here) = (key.0, self.node);
        let open: Vec<(IncomingKey, u64)> = self
            .vcopies
            .incoming
            .iter()
            .filter(|((f, cn, _), _)| *f == from && *cn != here)
            .map(|(k, r)| (*k, r.seq))
            .collect();
        if open.len() >= MAX_INCOMING_VCOPIES_PER_PEER {
            let (oldest, _) = *open.iter().min_by_key(|(_, s)| *s).expect("not empty");
            self.vcopies.incoming.remove(&oldest);
            debug!(
                node = from,
                op = oldest.2,
                "too many vcopies from one peer: oldest dropped"
            );
            let done = self.completion(oldest.1, oldest.2);
            self.complete_vcopy(done, Err(Errno::Busy));
        }
        self.vcopies.seq += 1;
        self.vcopies.incoming.insert(
            key,
            IncomingVcopy {
                dc: c.dc,
                caller: c.caller,
                dst: c.dst,
                dst_addr: c.dst_addr,
                total: c.total,
                received: c.len,
                seq: self.vcopies.seq,
            },
        );
    }

    /// The process a chunk is written into, as long as it may be written (the state may have
    /// moved on since the vcopy started: an honest race, reported to the caller).
    pub(super) fn chunk_target(&self, c: &VcopyChunk) -> Result<i32, Errno> {
        let Some(Registration::Local { conn }) = self.table.get(c.dc, c.dst) else {
            return self.installing_pid(c.dc, c.dst).ok_or(Errno::DstDied);
        };
        let p = self.conns.get(&conn).ok_or(Errno::DstDied)?;
        let is_caller = c.caller_node == self.node && c.caller == c.dst;
        if !is_caller && !is_blocked_in_ipc(&p.blocked) {
            return Err(Errno::Busy);
        }
        Ok(p.pid)
    }

    /// A chunk accepted by [`NodeCore::on_vcopy_chunk`] was written (or writing it failed);
    /// the last one closes the vcopy.
    pub(super) fn on_vcopy_chunk_written(
        &mut self,
        from: NodeId,
        c: &VcopyChunk,
        result: Result<(), Errno>,
    ) {
        let done = self.completion(c.caller_node, c.op);
        match result {
            Err(e) => {
                self.vcopies.incoming.remove(&(from, c.caller_node, c.op));
                self.complete_vcopy(done, Err(e));
            }
            Ok(()) if c.last() => self.complete_vcopy(done, Ok(())),
            Ok(()) => {}
        }
    }

    /// The link to `node` went down: nothing more streams in from it.
    pub(super) fn forget_incoming_vcopies(&mut self, node: NodeId) {
        self.vcopies.incoming.retain(|(f, _, _), _| *f != node);
    }
}
