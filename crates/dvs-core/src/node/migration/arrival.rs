//! The destination: receives the endpoint's state and image, restores the process and holds
//! it until the outcome.

use std::time::Instant;

use dvs_wire::peer::{Backend, MigratedEndpoint, MigrationId, PeerFrame, RestoreInfo};
use dvs_wire::peer::{MigrFrame, MigrPrepare, MigrRestore, MigrRestored};
use dvs_wire::{DcId, Ep, Errno, NodeId, PROTOCOL_VERSION};

use super::super::action::{LocalAction, PeerAction, ProcessAction};
use super::super::{err, Action, NodeCore};
use super::ms;
use crate::ConnId;

/// The destination's view of one migration.
pub(super) struct Arrival {
    pub(super) dc: DcId,
    pub(super) ep: Ep,
    pub(super) coordinator: NodeId,
    pub(super) backend: Backend,
    pub(super) state: MigratedEndpoint,
    pub(super) fail_restore: bool,
    pub(super) conn: Option<ConnId>,
    pub(super) pid: i32,
    pub(super) image_bytes: u64,
    pub(super) first_chunk: Option<Instant>,
    pub(super) last_chunk: Option<Instant>,
    pub(super) restore_started: Option<Instant>,
}

impl NodeCore {
    /// Destination: a chunk of `id`'s image arrived (the daemon stored it).
    pub(in crate::node) fn on_image_chunk(&mut self, id: MigrationId, bytes: u64, now: Instant) {
        if let Some(a) = self.migr.arrivals.get_mut(&id) {
            a.first_chunk.get_or_insert(now);
            a.last_chunk = Some(now);
            a.image_bytes += bytes;
        }
    }

    /// Destination (criu): the process was restored with its node connection `conn` (already
    /// announced with [`NodeCore::on_local_connect`]), or restoring failed.
    pub(in crate::node) fn on_restored(
        &mut self,
        id: MigrationId,
        result: Result<(ConnId, i32), String>,
        now: Instant,
    ) {
        let Some(a) = self.migr.arrivals.get_mut(&id) else {
            // The outcome (a rollback) came while the restore ran: this copy must not live.
            if let Ok((conn, pid)) = result {
                self.actions
                    .push_back(Action::Process(ProcessAction::KillTree { pid }));
                self.actions.push_back(Action::Local(LocalAction::Close {
                    conn,
                    reason: format!("migration {id:x} was rolled back during the restore"),
                }));
            }
            return;
        };
        let coordinator = a.coordinator;
        let result = match result {
            Ok((conn, pid)) => {
                a.conn = Some(conn);
                a.pid = pid;
                let (dc, ep) = (a.dc, a.ep);
                self.bind_arrival(conn, dc, ep, pid, id);
                Ok(self.restore_info(id, now))
            }
            Err(e) => Err(e),
        };
        self.actions.push_back(Action::Peer(PeerAction::Send {
            node: coordinator,
            frame: PeerFrame::Migr(MigrFrame::Restored(MigrRestored { id, result })),
        }));
    }

    pub(in crate::node) fn restore_info(&self, id: MigrationId, now: Instant) -> RestoreInfo {
        let a = &self.migr.arrivals[&id];
        RestoreInfo {
            image_bytes: a.image_bytes,
            transfer_ms: match (a.first_chunk, a.last_chunk) {
                (Some(f), Some(l)) => ms(l - f),
                _ => 0.0,
            },
            restore_ms: a.restore_started.map(|t| ms(now - t)).unwrap_or(0.0),
        }
    }

    /// Destination (cooperative): the restarted program binds as the migrated endpoint.
    pub(in crate::node) fn on_bind_restored(
        &mut self,
        conn: ConnId,
        version: u32,
        dc: DcId,
        ep: Ep,
        id: MigrationId,
    ) {
        let now = self.now();
        let ok = version == PROTOCOL_VERSION
            && self
                .migr
                .arrivals
                .get(&id)
                .is_some_and(|a| a.dc == dc && a.ep == ep && a.conn.is_none());
        if !ok {
            return self.respond(conn, err(Errno::Invalid));
        }
        if self.migr.arrivals[&id].fail_restore {
            // The copy is killed by the rollback this failure causes.
            let pid = self.endpoint_pid(conn).unwrap_or(0);
            let a = self.migr.arrivals.get_mut(&id).expect("checked");
            a.conn = Some(conn);
            a.pid = pid;
            let coordinator = a.coordinator;
            self.actions.push_back(Action::Peer(PeerAction::Send {
                node: coordinator,
                frame: PeerFrame::Migr(MigrFrame::Restored(MigrRestored {
                    id,
                    result: Err("injected failure (--fail-at restore)".into()),
                })),
            }));
            return;
        }
        let pid = self.endpoint_pid(conn).unwrap_or(0);
        self.on_restored(id, Ok((conn, pid)), now);
    }

    /// Destination: the endpoint's state and how to restore it.
    pub(in crate::node) fn on_prepare(&mut self, from: NodeId, frame: MigrPrepare, _now: Instant) {
        let MigrPrepare {
            id,
            dc,
            ep,
            backend,
            state,
            fail_restore,
        } = frame;
        self.migr.arrivals.insert(
            id,
            Arrival {
                dc,
                ep,
                coordinator: from,
                backend,
                state,
                fail_restore,
                conn: None,
                pid: 0,
                image_bytes: 0,
                first_chunk: None,
                last_chunk: None,
                restore_started: None,
            },
        );
    }

    /// Destination: every image byte was sent; restore now.
    pub(in crate::node) fn on_restore(&mut self, from: NodeId, frame: MigrRestore, now: Instant) {
        let MigrRestore { id } = frame;
        let Some(a) = self.migr.arrivals.get_mut(&id) else {
            self.actions.push_back(Action::Peer(PeerAction::Send {
                node: from,
                frame: PeerFrame::Migr(MigrFrame::Restored(MigrRestored {
                    id,
                    result: Err("destination has no state for this migration".into()),
                })),
            }));
            return;
        };
        a.restore_started = Some(now);
        let (dc, ep, backend, fail) = (a.dc, a.ep, a.backend, a.fail_restore);
        self.actions
            .push_back(Action::Process(ProcessAction::Restore {
                id,
                dc,
                ep,
                backend,
                fail,
            }));
    }
}
