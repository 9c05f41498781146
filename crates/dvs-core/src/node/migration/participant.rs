//! Every node of the DC: holds calls, replies and notifications aimed at a migrating
//! endpoint (never fails them), and replays them where the endpoint runs after the outcome.
//! Also follows an outcome recorded in the directory, and decides a rollback itself if the
//! coordinator is gone.

use std::time::{Duration, Instant};

use dvs_wire::peer::{Backend, IpcFrame, MigrationId, PeerFrame};
use dvs_wire::peer::{MigrCommit, MigrDone, MigrFrame, MigrRollback, MigrStart, MigrStartAck};
use dvs_wire::{DcId, Ep, NodeId};

use super::super::action::{DirRequest, PeerAction, ProcessAction};
use super::super::{Action, NodeCore, TimerKey};
use super::coordinator::{Outcome, Source};
use super::record::{MigrRecord, RecordState, Require};
use super::{
    Applied, MigrationError, Phase, APPLIED_MEMORY, COORDINATOR_LOST_GRACE, PARTICIPANT_TIMEOUT,
};
use crate::table::Registration;

impl NodeCore {
    /// Applies MIGR_COMMIT or MIGR_ROLLBACK on this node; returns how many held calls and
    /// frames were replayed, and how long the first of them waited.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::node) fn apply_outcome(
        &mut self,
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        commit: bool,
        from: NodeId,
        to: NodeId,
        now: Instant,
    ) -> (u32, Duration) {
        if !self.migr.recently_applied(id, dc, ep) {
            if self.migr.applied.len() >= APPLIED_MEMORY {
                self.migr.applied.pop_front();
            }
            self.migr.applied.push_back(Applied {
                id,
                dc,
                ep,
                moved: commit.then_some((from, to)),
                held: 0,
                longest_hold_us: 0,
            });
        }
        let hold = match self.migr.holds.get(&(dc, ep)) {
            Some(h) if h.id.is_none() || h.id == Some(id) => self.migr.holds.remove(&(dc, ep)),
            _ => None,
        }
        .unwrap_or_default();
        let here = self.node;
        // Source side.
        if let Some(conn) = self.migrating_out_conn(id) {
            let backend = self.migr.coords.get(&id).map(|c| c.req.backend);
            let stopped = self
                .migr
                .coords
                .get(&id)
                .is_some_and(|c| c.source == Source::Stopped);
            if commit {
                self.table.set(dc, ep, Registration::Remote { node: to });
                self.hand_over_source(conn, to, backend == Some(Backend::Cooperative));
            } else {
                self.resume_source(conn, backend == Some(Backend::Criu) && stopped, now);
            }
        }
        // Destination side.
        if let Some(a) = self.migr.arrivals.remove(&id) {
            if let Some(conn) = a.conn {
                if commit {
                    // The coordinator records where the endpoint runs now; so does this node,
                    // in case the coordinator dies (or loses its directory) before its write
                    // lands: a directory still naming the old node would let that node, once
                    // restarted, drop the entry and a second copy bind. Off the critical path.
                    self.actions
                        .push_back(Action::Directory(DirRequest::Relocate {
                            id,
                            dc,
                            ep,
                            node: here,
                        }));
                    self.table.set(dc, ep, Registration::Local { conn });
                    if a.backend == Backend::Criu {
                        // Restored stopped, so that a copy rolled back never ran (its side
                        // effects, e.g. a line in a shared file, would be seen twice).
                        self.actions
                            .push_back(Action::Process(ProcessAction::ResumeTree { pid: a.pid }));
                    }
                    self.install_arrival(conn, dc, ep, a.backend, &a.state, now);
                    self.wake_bind_waiters(dc, ep);
                } else {
                    self.discard_arrival(conn, a.pid);
                }
            }
            self.actions
                .push_back(Action::Process(ProcessAction::DropImage { id }));
        } else if hold.route.is_some_and(|(_, dest)| dest == here) {
            // The destination, ended before the endpoint's state came: what it prepared for
            // the restore (a restorer, a program waiting for its snapshot) goes.
            self.actions
                .push_back(Action::Process(ProcessAction::DropImage { id }));
        } else if commit && to != here {
            // Everyone else: the endpoint is remote, on the destination now.
            let known = matches!(
                self.table.get(dc, ep),
                Some(Registration::Remote { .. } | Registration::Backup { .. })
            );
            if known || !hold.calls.is_empty() || !hold.frames.is_empty() {
                self.table.set(dc, ep, Registration::Remote { node: to });
            }
        }
        // Replay, in the order held.
        let target = if commit { to } else { from };
        let held = (hold.calls.len() + hold.frames.len() + hold.delivers.len()) as u32;
        let longest = match hold.first_held {
            Some(t) if held > 0 => now.saturating_duration_since(t),
            _ => Duration::ZERO,
        };
        if let Some(a) = self.migr.applied.iter_mut().rev().find(|a| a.id == id) {
            a.held += held;
            a.longest_hold_us = a.longest_hold_us.max(longest.as_micros() as u64);
        }
        for (origin, frame) in hold.delivers {
            self.replay_deliver(origin, frame, target, now);
        }
        for (i, frame) in hold.frames.into_iter().enumerate() {
            // Sent with the process (see `package_held_notifies`).
            let packaged =
                commit && i < hold.packaged && matches!(frame, PeerFrame::Ipc(IpcFrame::Notify(_)));
            if !packaged {
                self.replay_frame(frame, target);
            }
        }
        for conn in hold.calls {
            self.replay_call(conn, now);
        }
        (held, longest)
    }

    /// The directory's migration record of `{dc, ep}`, read to check migration `id` (see
    /// [`DirRequest::ReadMigrRecord`]). A hold for a migration that the directory does not record
    /// (a forged or stale MIGR_START) is released, and its held calls go where they were going.
    pub(in crate::node) fn on_migr_record_read(
        &mut self,
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        record: Option<MigrRecord>,
        now: Instant,
    ) {
        if self.coord_record_read(id, record, now) {
            return;
        }
        match record {
            Some(r) if r.id == id && r.state == RecordState::Started => {
                // A START the directory records: the destination gets the restore going while
                // the source quiesces and dumps (never on a START it has not checked: that
                // would let a peer start the endpoint's program here).
                let hold = self.migr.holds.get(&(dc, ep)).filter(|h| h.id == Some(id));
                if let Some((Some((from, to)), Some(backend))) = hold.map(|h| (h.route, h.backend))
                {
                    if to == self.node && r.to == self.node {
                        self.actions
                            .push_back(Action::Process(ProcessAction::PrepareRestore {
                                id,
                                dc,
                                ep,
                                backend,
                                from,
                            }));
                    }
                }
            }
            Some(r) if r.id == id => self.on_migr_record(dc, ep, r, now),
            _ => {
                let held = self.migr.holds.get(&(dc, ep)).and_then(|h| h.id) == Some(id);
                if held && !self.migr.arrivals.contains_key(&id) {
                    tracing::warn!(
                        "releasing calls held for migration {id:x} of {dc}/{ep}: the directory \
                         does not record it (a forged or stale MIGR_START)"
                    );
                    let from = self.migr.holds[&(dc, ep)].route.map_or(self.node, |r| r.0);
                    self.apply_outcome(id, dc, ep, false, from, from, now);
                }
            }
        }
    }

    /// The directory shows a migration record (watch): a node that missed the outcome's
    /// broadcast applies it from here.
    pub(in crate::node) fn on_migr_record(
        &mut self,
        dc: DcId,
        ep: Ep,
        record: MigrRecord,
        now: Instant,
    ) {
        if record.state == RecordState::Started {
            return;
        }
        if let Some(c) = self.migr.coords.get_mut(&record.id) {
            // A participant recorded a rollback while this coordinator was still at work
            // (it thought the coordinator gone), or this coordinator's own decision landed
            // while its answer was lost: follow the record at once, so that the source
            // resumes (or hands over) and no restored copy survives a rollback.
            if c.outcome.decided_at().is_none() {
                let commit = record.state == RecordState::Committed;
                c.outcome = Outcome::Deciding { commit };
                if !commit && c.error.is_none() {
                    c.error = Some(MigrationError::RolledBackElsewhere);
                }
                self.apply_decision(record.id, commit, now);
            }
            return;
        }
        if self
            .migr
            .holds
            .get(&(dc, ep))
            .is_some_and(|h| h.id == Some(record.id))
            || self.migr.arrivals.contains_key(&record.id)
        {
            let commit = record.state == RecordState::Committed;
            self.apply_outcome(record.id, dc, ep, commit, record.from, record.to, now);
        }
    }

    pub(in crate::node) fn on_migration_timer(&mut self, id: MigrationId, now: Instant) {
        let Some(c) = self.migr.coords.get(&id) else {
            // A participant still holding calls for an undecided migration: the coordinator may
            // be gone. Try to decide a rollback; the directory watch applies what is recorded.
            let held = self
                .migr
                .holds
                .iter()
                .find(|(_, h)| h.id == Some(id))
                .map(|(k, h)| (*k, h.route, h.coordinator_lost));
            if let Some(((dc, ep), Some((from, to)), lost)) = held {
                if self.links_up.contains(&from) && !lost {
                    // The coordinator (the source) is reachable: it is still at work (a big
                    // image takes a while) and decides itself, as long as the directory
                    // still records the migration as started. Losing its link ends this
                    // wait, even if it comes back: behind the new link may be a restarted
                    // node that will never decide (a rollback that the coordinator did not
                    // need is safe: the record's compare-and-set decides either way).
                    self.add_timer(now + PARTICIPANT_TIMEOUT, TimerKey::Migration { id });
                    self.actions
                        .push_back(Action::Directory(DirRequest::ReadMigrRecord { id, dc, ep }));
                    return;
                }
                let record = MigrRecord {
                    id,
                    from,
                    to,
                    state: RecordState::RolledBack,
                };
                let require = Require::Started(id);
                self.actions
                    .push_back(Action::Directory(DirRequest::WriteMigrRecord {
                        id,
                        dc,
                        ep,
                        record,
                        require,
                    }));
                self.add_timer(now + PARTICIPANT_TIMEOUT, TimerKey::Migration { id });
            }
            return;
        };
        match (c.phase, c.outcome.decided_at()) {
            (Phase::Quiesce, None) if c.outcome.is_open() => {
                let what = self.endpoint_state(c.conn);
                let why = MigrationError::NotQuiescent {
                    dc: c.req.dc,
                    ep: c.req.ep,
                    timeout_ms: c.req.quiesce_timeout.as_millis() as u64,
                    state: what.to_string(),
                };
                self.decide(id, false, Some(why), now);
            }
            (_, None) if c.unsure => self.check_record(id, now),
            (_, Some(_)) => {
                // Stop waiting for outcome acks.
                if let Some(c) = self.migr.coords.get_mut(&id) {
                    c.acks.clear();
                }
                self.maybe_finish(id, now);
            }
            _ => {}
        }
    }

    /// A link went down: a migration does not wait for that node's acks.
    pub(in crate::node) fn migration_link_down(&mut self, node: NodeId) {
        let now = self.now();
        let here = self.node;
        let mut soon = Vec::new();
        for h in self.migr.holds.values_mut() {
            if h.route.is_some_and(|(from, _)| from == node) {
                h.coordinator_lost = true;
                // Not the destination (which decides at once, below): give the destination
                // a moment to record a commit, then record the rollback, instead of holding
                // the calls for the whole participant timeout.
                if let (Some(id), Some((_, to))) = (h.id, h.route) {
                    if to != here {
                        soon.push(id);
                    }
                }
            }
        }
        for id in soon {
            self.add_timer(now + COORDINATOR_LOST_GRACE, TimerKey::Migration { id });
        }
        let ids: Vec<MigrationId> = self
            .migr
            .coords
            .iter()
            .filter(|(_, c)| c.acks.contains(&node))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let c = self.migr.coords.get_mut(&id).expect("listed");
            c.acks.remove(&node);
            let (phase, decided, to) = (c.phase, c.outcome.decided_at().is_some(), c.req.to);
            if decided {
                self.maybe_finish(id, now);
            } else if phase == Phase::Start && self.migr.coords[&id].acks.is_empty() {
                self.enter_quiesce(id, now);
            }
            let _ = to;
        }
        // The destination that lost its coordinator (the source) decides at once, instead of
        // waiting for the participant timeout: a commit if its copy is restored (the source's
        // copy is stopped and resumes only on a recorded rollback), else a rollback. The CAS on
        // the record makes this one decision with whatever the coordinator decides.
        let orphaned: Vec<(MigrationId, DcId, Ep, bool)> = self
            .migr
            .arrivals
            .iter()
            .filter(|(_, a)| a.coordinator == node)
            .map(|(id, a)| (*id, a.dc, a.ep, a.conn.is_some()))
            .collect();
        for (id, dc, ep, restored) in orphaned {
            let record = MigrRecord {
                id,
                from: node,
                to: self.node,
                state: if restored {
                    RecordState::Committed
                } else {
                    RecordState::RolledBack
                },
            };
            tracing::warn!(
                "lost the coordinator (node {node}) of migration {id:x} of {dc}/{ep}: recording a {} ({})",
                if restored { "commit" } else { "rollback" },
                if restored { "the copy here is restored" } else { "the copy here is not restored" }
            );
            self.actions
                .push_back(Action::Directory(DirRequest::WriteMigrRecord {
                    id,
                    dc,
                    ep,
                    record,
                    require: Require::Started(id),
                }));
        }
        // Losing the destination before the decision means rolling back.
        let lost: Vec<MigrationId> = self
            .migr
            .coords
            .iter()
            .filter(|(_, c)| c.req.to == node && c.outcome.is_open())
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            self.decide(
                id,
                false,
                Some(MigrationError::DestinationLost { node }),
                now,
            );
        }
    }

    /// MIGR_START: hold calls to the endpoint until the outcome.
    pub(in crate::node) fn on_migr_start(&mut self, from: NodeId, frame: MigrStart, now: Instant) {
        let MigrStart {
            id,
            dc,
            ep,
            from: src,
            to,
            backend,
        } = frame;
        let h = self.migr.holds.entry((dc, ep)).or_default();
        h.id = Some(id);
        h.route = Some((src, to));
        h.backend = Some(backend);
        self.add_timer(now + PARTICIPANT_TIMEOUT, TimerKey::Migration { id });
        // The coordinator records the START before it broadcasts it: check.
        self.actions
            .push_back(Action::Directory(DirRequest::ReadMigrRecord { id, dc, ep }));
        self.actions.push_back(Action::Peer(PeerAction::Send {
            node: from,
            frame: PeerFrame::Migr(MigrFrame::StartAck(MigrStartAck { id })),
        }));
    }

    /// MIGR_COMMIT from the coordinator.
    pub(in crate::node) fn on_migr_commit(
        &mut self,
        from: NodeId,
        frame: MigrCommit,
        now: Instant,
    ) {
        let MigrCommit { id, dc, ep, to } = frame;
        let (held, longest) = self.apply_outcome(id, dc, ep, true, from, to, now);
        self.actions.push_back(Action::Peer(PeerAction::Send {
            node: from,
            frame: PeerFrame::Migr(MigrFrame::Done(MigrDone {
                id,
                held,
                longest_hold_us: longest.as_micros() as u64,
            })),
        }));
    }

    /// MIGR_ROLLBACK from the coordinator.
    pub(in crate::node) fn on_migr_rollback(
        &mut self,
        from: NodeId,
        frame: MigrRollback,
        now: Instant,
    ) {
        let MigrRollback {
            id,
            dc,
            ep,
            from: src,
        } = frame;
        let (held, longest) = self.apply_outcome(id, dc, ep, false, src, src, now);
        self.actions.push_back(Action::Peer(PeerAction::Send {
            node: from,
            frame: PeerFrame::Migr(MigrFrame::Done(MigrDone {
                id,
                held,
                longest_hold_us: longest.as_micros() as u64,
            })),
        }));
    }
}
