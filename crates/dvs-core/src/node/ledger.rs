//! The remote-call ledger: every M3-IPC call that crosses a node boundary, from the moment it
//! is sent until it is answered, cancelled or its node is gone.
//!
//! Operation ids are minted by the caller's node, so a call is known by (caller's node, op)
//! on both sides: as *outgoing* on the caller's node (keyed by the node it went to and our
//! op) and as *inbound* on the callee's node (keyed by the caller's node and its op).

use dvs_wire::{DcId, Ep, NodeId};

use crate::Map;
use crate::{ConnId, OpId};

/// A call a local process made to an endpoint on another node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outgoing {
    /// The caller waits on connection `conn`.
    Waiting(ConnId),
    /// The caller gave up a sendrec (`Cancel` sent) and the other node has not acknowledged
    /// yet: a `Reply` from `server` to `client` meanwhile answers this call, not a later
    /// sendrec of the same pair (`Reply` carries no op).
    Abandoned { dc: DcId, client: Ep, server: Ep },
}

/// Every call crossing a node boundary, seen from this node.
#[derive(Default)]
pub(super) struct RemoteCalls {
    /// Calls of local processes to other nodes, by (the node it went to, our op).
    outgoing: Map<(NodeId, OpId), Outgoing>,
    /// Messages from other nodes queued here and not taken yet, by (caller's node, its op):
    /// the endpoint `(dc, dst)` whose queue holds it.
    queued: Map<(NodeId, OpId), (DcId, Ep)>,
    /// Sendrecs from other nodes taken here and not replied to yet, (dc, server, client) ->
    /// (caller's node, op): a `Cancel` of that op means the caller is not waiting any more.
    taken: Map<(DcId, Ep, Ep), (NodeId, OpId)>,
}

impl RemoteCalls {
    /// Local connection `conn` sent operation `op` to `node` and waits for its outcome.
    pub(super) fn sent(&mut self, node: NodeId, op: OpId, conn: ConnId) {
        self.outgoing.insert((node, op), Outgoing::Waiting(conn));
    }

    /// The connection waiting for operation `op` sent to `node`.
    pub(super) fn waiting(&self, node: NodeId, op: OpId) -> Option<ConnId> {
        match self.outgoing.get(&(node, op)) {
            Some(Outgoing::Waiting(conn)) => Some(*conn),
            _ => None,
        }
    }

    /// Whether operation `op` was sent to `node` and is not settled yet (waited for or
    /// abandoned).
    pub(super) fn is_outgoing(&self, node: NodeId, op: OpId) -> bool {
        self.outgoing.contains_key(&(node, op))
    }

    /// Operation `op` sent to `node` is settled (answered, acknowledged or replayed
    /// elsewhere); the connection that waited for it, if one still did.
    pub(super) fn settle(&mut self, node: NodeId, op: OpId) -> Option<ConnId> {
        match self.outgoing.remove(&(node, op)) {
            Some(Outgoing::Waiting(conn)) => Some(conn),
            _ => None,
        }
    }

    /// The caller of sendrec `op` (from `client` to `server` on `node`) gave up; it stays
    /// known until `node` acknowledges the cancel.
    pub(super) fn abandon(&mut self, node: NodeId, op: OpId, dc: DcId, client: Ep, server: Ep) {
        self.outgoing
            .insert((node, op), Outgoing::Abandoned { dc, client, server });
    }

    /// Whether a reply from `server` on `node` to local `client` answers an abandoned call.
    pub(super) fn answers_abandoned(&self, node: NodeId, dc: DcId, client: Ep, server: Ep) -> bool {
        self.outgoing
            .iter()
            .any(|((n, _), o)| *n == node && *o == Outgoing::Abandoned { dc, client, server })
    }

    /// A message (operation `op` of `node`) was queued for local endpoint `(dc, dst)`.
    pub(super) fn queued(&mut self, node: NodeId, op: OpId, dc: DcId, dst: Ep) {
        self.queued.insert((node, op), (dc, dst));
    }

    /// Forgets a queued message (taken, cancelled, timed out): the endpoint it was queued for.
    pub(super) fn unqueue(&mut self, node: NodeId, op: OpId) -> Option<(DcId, Ep)> {
        self.queued.remove(&(node, op))
    }

    /// Every message queued here by a process of `node`.
    pub(super) fn queued_from(&self, node: NodeId) -> Vec<(NodeId, OpId)> {
        self.queued
            .keys()
            .filter(|(n, _)| *n == node)
            .copied()
            .collect()
    }

    /// `server` took the sendrec `op` of remote `client` (on `node`): it owes a reply now.
    pub(super) fn taken(&mut self, node: NodeId, op: OpId, dc: DcId, server: Ep, client: Ep) {
        self.queued.remove(&(node, op));
        self.taken.insert((dc, server, client), (node, op));
    }

    /// `server` replied to remote `client` (or will not any more).
    pub(super) fn replied(&mut self, dc: DcId, server: Ep, client: Ep) {
        self.taken.remove(&(dc, server, client));
    }

    /// The taken sendrecs whose caller gave up (`Cancel` of operation `op` of `node`):
    /// forgotten, and returned as (dc, server, client).
    pub(super) fn cancel_taken(&mut self, node: NodeId, op: OpId) -> Vec<(DcId, Ep, Ep)> {
        let gave_up: Vec<(DcId, Ep, Ep)> = self
            .taken
            .iter()
            .filter(|(_, v)| **v == (node, op))
            .map(|(k, _)| *k)
            .collect();
        for k in &gave_up {
            self.taken.remove(k);
        }
        gave_up
    }

    /// Local endpoint `(dc, server)` is gone: it owes no reply any more.
    pub(super) fn server_gone(&mut self, dc: DcId, server: Ep) {
        self.taken.retain(|(d, s, _), _| (*d, *s) != (dc, server));
    }

    /// The link to `node` went down: forget every call to it and every reply owed to it.
    /// Messages it queued here are left to [`RemoteCalls::queued_from`], as each must be
    /// taken out of its queue.
    pub(super) fn node_gone(&mut self, node: NodeId) {
        self.outgoing.retain(|(n, _), _| *n != node);
        self.taken.retain(|_, (n, _)| *n != node);
    }
}
