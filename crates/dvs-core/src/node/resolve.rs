//! Endpoint resolution: bind and unbind through the directory, where an endpoint runs, and
//! processes waiting for an endpoint to be bound.

use std::time::{Duration, Instant};

use dvs_wire::local::{LocalRequest, LocalResponse};
use dvs_wire::peer::{Bound, IpcFrame, PeerFrame};
use dvs_wire::{DcId, Ep, Errno, NodeId, Timeout, PROTOCOL_VERSION};

use super::action::{DirRequest, PeerAction};
use super::conn::{Blocked, Incoming};
use super::{err, Action, DcInfo, NodeCore};
use crate::table::Registration;
use crate::ConnId;
use crate::Map;

/// Local processes waiting on the directory about an endpoint, by endpoint.
#[derive(Default)]
pub(super) struct Waiters {
    /// Calls parked until a lookup says where the endpoint runs (the first one asked).
    pub(super) lookups: Map<(DcId, Ep), Vec<ConnId>>,
    /// Processes in `wait_for_bind`, woken when the endpoint is bound anywhere.
    pub(super) binds: Map<(DcId, Ep), Vec<ConnId>>,
}

impl NodeCore {
    pub(super) fn dc_check(&self, dc: DcId, ep: Ep) -> Result<&DcInfo, Errno> {
        let info = self.dcs.get(&dc).ok_or(Errno::NoSuchDc)?;
        if ep < 0 || ep as u32 >= info.max_endpoints {
            return Err(Errno::BadEndpoint);
        }
        Ok(info)
    }

    pub(super) fn bind(&mut self, conn: ConnId, version: u32, dc: DcId, ep: Ep) {
        if version != PROTOCOL_VERSION {
            return self.respond(conn, err(Errno::Invalid));
        }
        if self.bound(conn).is_some() {
            return self.respond(conn, err(Errno::ConnAlreadyBound));
        }
        let info = match self.dc_check(dc, ep) {
            Ok(i) => i,
            Err(e) => return self.respond(conn, err(e)),
        };
        if !info.nodes.contains(&self.node) {
            return self.respond(conn, err(Errno::NodeNotInDc));
        }
        if self.bind_refused(conn, dc, ep) {
            return self.respond(conn, err(Errno::Permission));
        }
        if let Some(Registration::Local { .. }) = self.table.get(dc, ep) {
            return self.respond(conn, err(Errno::AlreadyBound));
        }
        self.reblock(conn, Blocked::Binding);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.bound = Some((dc, ep));
        }
        self.actions
            .push_back(Action::Directory(DirRequest::Register { conn, dc, ep }));
    }

    /// The local connection of `{dc, ep}`: bound, or binding (its directory write is in flight;
    /// another node may already have seen it in the directory and sent it a message, which
    /// waits in its queue).
    pub(super) fn local_or_binding(&self, dc: DcId, ep: Ep) -> Option<ConnId> {
        if let Some(Registration::Local { conn }) = self.table.get(dc, ep) {
            return Some(conn);
        }
        self.conns
            .iter()
            .find(|(_, c)| c.blocked == Blocked::Binding && c.bound == Some((dc, ep)))
            .map(|(id, _)| *id)
    }

    /// Whether `conn` may not bind `{dc, ep}` (logged with the reason): a process launched for
    /// an endpoint may bind only that one; any other needs a uid in the DC's `bind_uids`.
    pub(super) fn bind_refused(&self, conn: ConnId, dc: DcId, ep: Ep) -> bool {
        let Some(c) = self.conns.get(&conn) else {
            return true;
        };
        let reason = match c.launched_for {
            Some(own) if own == (dc, ep) => return false,
            Some((ldc, lep)) => format!("it was launched for {ldc}/{lep}"),
            None if self
                .dcs
                .get(&dc)
                .is_some_and(|i| i.bind_uids.contains(&c.uid)) =>
            {
                return false
            }
            None => format!(
                "it was not launched by this node and uid {} is not in the DC's bind_uids",
                c.uid
            ),
        };
        tracing::warn!(
            conn,
            pid = c.pid,
            uid = c.uid,
            "bind of {dc}/{ep} refused (permission denied): {reason}"
        );
        true
    }

    /// Registers `{dc, ep}` here as running on `node` (the DVK's `rmtbind`), or as the backup
    /// of a replicated primary kept on `node` (`bkupbind`). Refused for an endpoint bound here.
    pub(super) fn register_remote(
        &mut self,
        dc: DcId,
        ep: Ep,
        node: NodeId,
        backup: bool,
    ) -> Result<(), Errno> {
        let info = self.dc_check(dc, ep)?;
        if !info.nodes.contains(&node) || !info.nodes.contains(&self.node) {
            return Err(Errno::NodeNotInDc);
        }
        if node == self.node || matches!(self.table.get(dc, ep), Some(Registration::Local { .. })) {
            return Err(Errno::AlreadyBound);
        }
        let reg = if backup {
            Registration::Backup { node }
        } else {
            Registration::Remote { node }
        };
        self.table.set(dc, ep, reg);
        self.wake_bind_waiters(dc, ep);
        Ok(())
    }

    /// Every directory action up to [`DirRequest::Sync`] has landed.
    pub(super) fn on_directory_synced(&mut self, conn: ConnId) {
        if self
            .conns
            .get(&conn)
            .is_some_and(|c| c.blocked == Blocked::Unbinding)
        {
            self.respond(conn, LocalResponse::Done);
        }
    }

    /// The directory's answer to [`DirRequest::Register`]: `Err` names why (e.g. bound elsewhere).
    pub(super) fn on_register_result(&mut self, conn: ConnId, result: Result<(), Errno>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.blocked != Blocked::Binding {
            return;
        }
        let (dc, ep) = c.bound.expect("binding connections carry their endpoint");
        let refused = match result {
            Err(e) => Some(e),
            // Two local connections raced for the same endpoint; the directory let the
            // second through because the key names this node.
            Ok(()) if matches!(self.table.get(dc, ep), Some(Registration::Local { .. })) => {
                Some(Errno::AlreadyBound)
            }
            Ok(()) => None,
        };
        if let Some(e) = refused {
            // Messages that arrived while the bind was in flight were for an endpoint that
            // did not come to be here.
            let c = self.conns.get_mut(&conn).expect("checked above");
            c.bound = None;
            let queued: Vec<Incoming> = c.queue.drain(..).collect();
            c.notifies.clear();
            for inc in queued {
                self.fail_incoming(dc, ep, inc, Errno::DstDied);
            }
            return self.respond(conn, err(e));
        }
        self.table.set(dc, ep, Registration::Local { conn });
        self.broadcast(dc, PeerFrame::Ipc(IpcFrame::Bound(Bound { dc, ep })));
        self.respond(
            conn,
            LocalResponse::Ep {
                dc,
                ep,
                node: self.node,
            },
        );
        self.wake_bind_waiters(dc, ep);
    }

    pub(super) fn broadcast(&mut self, dc: DcId, frame: PeerFrame) {
        let Some(info) = self.dcs.get(&dc) else {
            return;
        };
        for n in info.nodes.iter().copied().filter(|n| *n != self.node) {
            if self.links_up.contains(&n) {
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node: n,
                    frame: frame.clone(),
                }));
            }
        }
    }

    pub(super) fn wake_bind_waiters(&mut self, dc: DcId, ep: Ep) {
        for w in self.waiters.binds.remove(&(dc, ep)).unwrap_or_default() {
            if matches!(self.conns.get(&w).map(|c| &c.blocked), Some(Blocked::WaitingBind { ep: e }) if *e == ep)
            {
                self.respond(w, LocalResponse::Done);
            }
        }
    }

    /// Where `{dc, ep}` runs, or parks `conn` on a directory lookup and returns `None`.
    pub(super) fn resolve(
        &mut self,
        conn: ConnId,
        dc: DcId,
        ep: Ep,
        req: &LocalRequest,
    ) -> Option<Registration> {
        // Calls naming a migrating endpoint wait for the outcome, except the endpoint's own
        // (a server copying from itself while it finishes serving before it can quiesce).
        if self.migr.holds(dc, ep) && self.bound(conn) != Some((dc, ep)) {
            self.migr.hold_call(dc, ep, conn, self.now());
            self.reblock(conn, Blocked::Held { req: req.clone() });
            return None;
        }
        if let Some(r) = self.table.get(dc, ep) {
            return Some(r);
        }
        let waiters = self.waiters.lookups.entry((dc, ep)).or_default();
        if waiters.is_empty() {
            self.actions
                .push_back(Action::Directory(DirRequest::Lookup { dc, ep }));
        }
        waiters.push(conn);
        self.reblock(
            conn,
            Blocked::LookingUp {
                ep,
                req: req.clone(),
            },
        );
        None
    }

    /// The directory's answer to [`DirRequest::Lookup`]: the node running `{dc, ep}`, if any.
    pub(super) fn on_lookup_result(
        &mut self,
        dc: DcId,
        ep: Ep,
        node: Option<NodeId>,
        now: Instant,
    ) {
        if let Some(n) = node {
            if n != self.node && self.table.get(dc, ep).is_none() {
                self.table.set(dc, ep, Registration::Remote { node: n });
            }
        }
        let known = self.table.get(dc, ep).is_some();
        if known {
            self.wake_bind_waiters(dc, ep);
        }
        for w in self.waiters.lookups.remove(&(dc, ep)).unwrap_or_default() {
            let Some(c) = self.conns.get_mut(&w) else {
                continue;
            };
            let Blocked::LookingUp { ep: e, req } = c.blocked.clone() else {
                continue;
            };
            if e != ep {
                continue;
            }
            c.blocked = Blocked::No;
            if known {
                self.run_request(w, req, now);
            } else if self.table.registered_elsewhere(dc, ep) {
                self.respond(w, err(Errno::OtherDc));
            } else {
                self.respond(w, err(Errno::NoSuchEndpoint));
            }
        }
    }

    /// The directory says `{dc, ep}` now runs on `node` (`None`: nowhere).
    pub(super) fn on_directory_update(&mut self, dc: DcId, ep: Ep, node: Option<NodeId>) {
        match (node, self.table.get(dc, ep)) {
            (_, Some(Registration::Local { .. })) => {}
            (Some(n), _) if n != self.node => {
                self.table.set(dc, ep, Registration::Remote { node: n });
                self.wake_bind_waiters(dc, ep);
            }
            (None, Some(Registration::Remote { .. } | Registration::Backup { .. })) => {
                self.table.remove(dc, ep);
            }
            _ => {}
        }
    }

    pub(super) fn wait_for_bind(&mut self, conn: ConnId, ep: Ep, timeout: Timeout, now: Instant) {
        let Some((dc, _)) = self.bound(conn) else {
            return self.respond(conn, err(Errno::NotBound));
        };
        if let Err(e) = self.dc_check(dc, ep) {
            return self.respond(conn, err(e));
        }
        if self.table.get(dc, ep).is_some() {
            return self.respond(conn, LocalResponse::Done);
        }
        if timeout == Timeout::NoWait {
            return self.respond(conn, err(Errno::TimedOut));
        }
        // Ask the directory once in case a registration was missed; a watch or a peer's
        // `Bound` wakes us otherwise.
        if let std::collections::hash_map::Entry::Vacant(e) = self.waiters.lookups.entry((dc, ep)) {
            e.insert(Vec::new());
            self.actions
                .push_back(Action::Directory(DirRequest::Lookup { dc, ep }));
        }
        self.waiters.binds.entry((dc, ep)).or_default().push(conn);
        self.block(
            conn,
            Blocked::WaitingBind { ep },
            timeout,
            now,
            Duration::ZERO,
        );
    }
}
