//! The coordinator, on the node the endpoint runs on: records the migration, has every node
//! hold calls, waits for quiescence, has the process checkpointed and its image sent, has the
//! destination restore it, decides the outcome with one compare-and-set of the migration
//! record, broadcasts it and reports.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use dvs_wire::peer::{
    Backend, FailAt, IpcFrame, MigratedEndpoint, MigrationId, Notify, PeerFrame, RestoreInfo,
};
use dvs_wire::peer::{
    MigrCommit, MigrDone, MigrFrame, MigrPrepare, MigrRestore, MigrRestored, MigrRollback,
    MigrStart, MigrStartAck,
};
use dvs_wire::{DcId, Ep, NodeId};

use super::super::action::{DirRequest, PeerAction, ProcessAction, Report};
use super::super::{Action, NodeCore, TimerKey};
use super::record::{MigrRecord, RecordState, Require};
use super::{ms, MigrationError, MigrationReport, MigrationRequest, Phase, PhaseTime};
use crate::table::Registration;
use crate::ConnId;

/// The coordinator's view of one migration.
pub(super) struct Coord {
    pub(super) req: MigrationRequest,
    pub(super) from: NodeId,
    pub(super) conn: ConnId,
    pub(super) pid: i32,
    pub(super) phase: Phase,
    pub(super) started: Instant,
    pub(super) phase_started: Instant,
    pub(super) phases: Vec<(Phase, f64)>,
    pub(super) acks: BTreeSet<NodeId>,
    /// Set once the outcome is decided: commit or not.
    pub(super) outcome: Outcome,
    pub(super) error: Option<MigrationError>,
    pub(super) source: Source,
    pub(super) image_bytes: u64,
    pub(super) info: Option<RestoreInfo>,
    pub(super) held: u32,
    /// The longest any held call or frame waited, over the nodes that answered.
    pub(super) longest_hold: Duration,
    /// When the checkpoint started (the process froze) and when the destination reported
    /// its copy running.
    pub(super) frozen_at: Option<Instant>,
    pub(super) thawed_at: Option<Instant>,
    /// The record's last write (the start or the decision) got no definite answer: the
    /// record is read when the migration's timer fires, until the directory answers.
    pub(super) unsure: bool,
    /// A stale started record was rolled back for this start (done once only).
    pub(super) cleared_stale: bool,
}

/// How long the coordinator waits before reading its record after the directory gave no
/// definite answer to a write (and between reads the directory does not answer).
pub(super) const DECISION_RETRY: Duration = Duration::from_millis(200);

/// Where the outcome of a coordinated migration stands: a state, not a pair of flags, so
/// that "decided but not recorded yet" and "recorded" cannot be confused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Nothing decided: the migration works through its phases.
    Open,
    /// `commit` chosen; the migration record is being written.
    Deciding { commit: bool },
    /// Recorded at `at`, broadcast and applied here; the other nodes' acks are awaited.
    Decided { commit: bool, at: Instant },
}

impl Outcome {
    /// Whether no outcome is chosen yet.
    pub(super) fn is_open(self) -> bool {
        self == Outcome::Open
    }

    /// The chosen outcome (commit or not), once chosen.
    pub(super) fn commit(self) -> Option<bool> {
        match self {
            Outcome::Open => None,
            Outcome::Deciding { commit } | Outcome::Decided { commit, .. } => Some(commit),
        }
    }

    /// When the outcome was recorded.
    pub(super) fn decided_at(self) -> Option<Instant> {
        match self {
            Outcome::Decided { at, .. } => Some(at),
            _ => None,
        }
    }
}

/// What the migration did to the source process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// It runs (or is blocked in IPC): nothing to undo on a rollback.
    Running,
    /// A criu dump stopped it: a rollback must let it run again.
    Stopped,
}

impl NodeCore {
    /// Starts migrating local endpoint `{dc, ep}`. Errors come before anything stops.
    pub(in crate::node) fn start_migration(
        &mut self,
        req: MigrationRequest,
        now: Instant,
    ) -> Result<MigrationId, MigrationError> {
        let (dc, ep, to) = (req.dc, req.ep, req.to);
        let info = self.dcs.get(&dc).ok_or(MigrationError::UnknownDc { dc })?;
        if !info.nodes.contains(&to) {
            return Err(MigrationError::NotInDc { node: to, dc });
        }
        if to == self.node {
            return Err(MigrationError::AlreadyThere { dc, ep, node: to });
        }
        let Some(Registration::Local { conn }) = self.table.get(dc, ep) else {
            return Err(MigrationError::NotHere {
                dc,
                ep,
                node: self.node,
            });
        };
        if self.migr.holds(dc, ep)
            || self
                .migr
                .coords
                .values()
                .any(|c| c.req.dc == dc && c.req.ep == ep)
        {
            return Err(MigrationError::InProgress {
                dc,
                ep,
                other: None,
            });
        }
        if !self.links_up.contains(&to) {
            return Err(MigrationError::LinkDown { node: to });
        }
        let pid = self.endpoint_pid(conn).ok_or(MigrationError::NotHere {
            dc,
            ep,
            node: self.node,
        })?;
        self.migr.next += 1;
        let id = ((self.node as u64) << 48) | (self.migr.next & 0xffff_ffff_ffff);
        let coord = Coord {
            from: self.node,
            conn,
            pid,
            phase: Phase::Start,
            started: now,
            phase_started: now,
            phases: Vec::new(),
            acks: BTreeSet::new(),
            outcome: Outcome::Open,
            error: None,
            source: Source::Running,
            image_bytes: 0,
            info: None,
            held: 0,
            longest_hold: Duration::ZERO,
            frozen_at: None,
            thawed_at: None,
            unsure: false,
            cleared_stale: false,
            req,
        };
        self.migr.coords.insert(id, coord);
        self.actions.push_back(Action::Report(Report::MigrProgress {
            id,
            phase: Phase::Start,
        }));
        self.write_record(id);
        Ok(id)
    }

    pub(in crate::node) fn enter_phase(&mut self, id: MigrationId, phase: Phase, now: Instant) {
        let Some(c) = self.migr.coords.get_mut(&id) else {
            return;
        };
        let prev = c.phase;
        c.phases.push((prev, ms(now - c.phase_started)));
        c.phase = phase;
        c.phase_started = now;
        self.actions
            .push_back(Action::Report(Report::MigrProgress { id, phase }));
    }

    /// The directory's answer to [`DirRequest::WriteMigrRecord`]: `Err` carries the record that
    /// prevented the write.
    pub(in crate::node) fn on_migr_record_result(
        &mut self,
        id: MigrationId,
        result: Result<(), Option<MigrRecord>>,
        now: Instant,
    ) {
        let Some(c) = self.migr.coords.get(&id) else {
            return;
        };
        if c.outcome.decided_at().is_some() {
            // A second answer (to a decision written again): the outcome is applied already.
            return;
        }
        let (dc, ep, conn, to, backend) = (c.req.dc, c.req.ep, c.conn, c.req.to, c.req.backend);
        match (c.outcome.commit(), result) {
            (None, Ok(())) => {
                // Recorded: hold calls here and tell every node of the DC to hold them.
                self.migr.holds.entry((dc, ep)).or_default().id = Some(id);
                self.mark_migrating_out(conn, id);
                let nodes: Vec<NodeId> = self.dc_peers(dc);
                for n in &nodes {
                    self.actions.push_back(Action::Peer(PeerAction::Send {
                        node: *n,
                        frame: PeerFrame::Migr(MigrFrame::Start(MigrStart {
                            id,
                            dc,
                            ep,
                            from: self.node,
                            to,
                            backend,
                        })),
                    }));
                }
                let c = self.migr.coords.get_mut(&id).expect("present");
                c.acks = nodes.into_iter().collect();
                if c.acks.is_empty() {
                    self.enter_quiesce(id, now);
                }
            }
            // An earlier write of this start landed after all (its answer was lost).
            (None, Err(Some(r))) if r.id == id && r.state == RecordState::Started => {
                self.on_migr_record_result(id, Ok(()), now)
            }
            // No definite answer: as for a decision (below), the start may be recorded; a
            // record left started with nobody to decide it would block the endpoint. Write it
            // again until the directory answers (nothing is stopped or held meanwhile).
            (None, Err(None)) => {
                if let Some(c) = self.migr.coords.get_mut(&id) {
                    c.unsure = true;
                }
                self.add_timer(now + DECISION_RETRY, TimerKey::Migration { id });
            }
            (None, Err(Some(r)))
                if r.state == RecordState::Started
                    && !c.cleared_stale
                    && !self.migr.coords.contains_key(&r.id)
                    && self.table.get(dc, ep) == Some(Registration::Local { conn }) =>
            {
                // A migration recorded as started that nobody runs: the endpoint runs here
                // and this node does not coordinate it, and only the node an endpoint runs
                // on coordinates its migration; so its coordinator died (a crashed node, a
                // previous run of this one) before deciding, and no participant holding
                // calls was left to time out and roll it back. It can never commit (only a
                // coordinator records a commit): record its rollback, which the nodes that
                // still know of it apply from the watch, then record this start again.
                let stale = r.id;
                let c = self.migr.coords.get_mut(&id).expect("present");
                c.cleared_stale = true;
                self.actions
                    .push_back(Action::Directory(DirRequest::WriteMigrRecord {
                        id: stale,
                        dc,
                        ep,
                        record: MigrRecord {
                            id: stale,
                            from: r.from,
                            to: r.to,
                            state: RecordState::RolledBack,
                        },
                        require: Require::Started(stale),
                    }));
                self.write_record(id);
            }
            (None, Err(current)) => {
                let why = match current {
                    Some(r) => MigrationError::InProgress {
                        dc,
                        ep,
                        other: Some((r.id, r.from, r.to)),
                    },
                    None => MigrationError::NotRecorded { dc, ep },
                };
                // Nothing was stopped or held yet: just report.
                let c = self.migr.coords.remove(&id).expect("present");
                let report = self.report(id, &c, false, Some(why), now);
                self.actions
                    .push_back(Action::Report(Report::MigrFinished { id, report }));
            }
            (Some(commit), Ok(())) => self.apply_decision(id, commit, now),
            (Some(_), Err(Some(r))) if r.id == id && r.state != RecordState::Started => {
                // Someone else decided (a participant's timeout): follow the record.
                let commit = r.state == RecordState::Committed;
                if let Some(c) = self.migr.coords.get_mut(&id) {
                    c.outcome = Outcome::Deciding { commit };
                    if !commit && c.error.is_none() {
                        c.error = Some(MigrationError::RolledBackElsewhere);
                    }
                }
                self.apply_decision(id, commit, now);
            }
            (Some(_), Err(None)) => {
                // No definite answer (the directory is down, or the write's fate is unknown):
                // the decision may be recorded after all. Deciding anything here could
                // contradict the record (a commit that landed while this node resumes the
                // source: the endpoint would run twice), and leaving the record started
                // would block every later migration of the endpoint: write it again until
                // the directory answers. The record is never deleted, so `None` is never a
                // definite "absent".
                if let Some(c) = self.migr.coords.get_mut(&id) {
                    c.unsure = true;
                }
                self.add_timer(now + DECISION_RETRY, TimerKey::Migration { id });
            }
            (Some(commit), Err(_)) => {
                // The record is foreign: the safe outcome is the one that keeps the
                // source, unless the destination already runs it and the record says so.
                let _ = commit;
                if let Some(c) = self.migr.coords.get_mut(&id) {
                    c.outcome = Outcome::Deciding { commit: false };
                    c.error.get_or_insert(MigrationError::RecordChanged);
                }
                self.apply_decision(id, false, now);
            }
        }
    }

    /// Other nodes of the DC whose links are up.
    pub(in crate::node) fn dc_peers(&self, dc: DcId) -> Vec<NodeId> {
        self.dcs
            .get(&dc)
            .map(|d| {
                d.nodes
                    .iter()
                    .copied()
                    .filter(|n| *n != self.node && self.links_up.contains(n))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(in crate::node) fn enter_quiesce(&mut self, id: MigrationId, now: Instant) {
        self.enter_phase(id, Phase::Quiesce, now);
        let Some(c) = self.migr.coords.get(&id) else {
            return;
        };
        let deadline = now + c.req.quiesce_timeout;
        self.add_timer(deadline, TimerKey::Migration { id });
        self.check_quiescence(now);
    }

    /// Moves every coordinated migration whose process became quiescent to its checkpoint.
    pub(in crate::node) fn check_quiescence(&mut self, now: Instant) {
        if self.migr.coords.is_empty() {
            return;
        }
        let ready: Vec<MigrationId> = self
            .migr
            .coords
            .iter()
            .filter(|(_, c)| c.phase == Phase::Quiesce && c.outcome.is_open())
            .filter(|(_, c)| self.endpoint_quiescent(c.conn, c.req.backend))
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            self.capture(id, now);
        }
    }

    /// Moves the notifications held here for `{dc, ep}` into its captured state (as pending
    /// bits, which is what an undelivered notification is), so that they reach the
    /// destination with the process, before anything sent there later. Replayed from here
    /// after the commit they could be overtaken by a later notification of the same sender,
    /// sent to the destination directly once its node learnt the outcome. Every node's
    /// notifications sent before it held its own arrived here before its START
    /// acknowledgement, so before this capture. They stay held for a rollback.
    fn package_held_notifies(&mut self, dc: DcId, ep: Ep, state: &mut MigratedEndpoint) {
        let Some(hold) = self.migr.holds.get_mut(&(dc, ep)) else {
            return;
        };
        hold.packaged = hold.frames.len();
        for frame in &hold.frames {
            if let PeerFrame::Ipc(IpcFrame::Notify(Notify { src, value, .. })) = frame {
                match state.notifies.iter_mut().find(|(s, _)| s == src) {
                    Some((_, bits)) => *bits |= value,
                    None => state.notifies.push((*src, *value)),
                }
            }
        }
    }

    /// The process is quiescent: take its IPC state, send its queued callers away, and have
    /// it checkpointed.
    pub(in crate::node) fn capture(&mut self, id: MigrationId, now: Instant) {
        let c = self.migr.coords.get(&id).expect("ready");
        let (dc, ep, conn, backend, to, pid) =
            (c.req.dc, c.req.ep, c.conn, c.req.backend, c.req.to, c.pid);
        let fail = c.req.fail_at == Some(FailAt::Checkpoint);
        let mut state = self.capture_endpoint(conn, dc, ep, backend, now);
        self.package_held_notifies(dc, ep, &mut state);
        self.enter_phase(id, Phase::Checkpoint, now);
        if let Some(c) = self.migr.coords.get_mut(&id) {
            c.frozen_at = Some(now);
        }
        self.actions.push_back(Action::Peer(PeerAction::Send {
            node: to,
            frame: PeerFrame::Migr(MigrFrame::Prepare(MigrPrepare {
                id,
                dc,
                ep,
                backend,
                state,
                fail_restore: self.migr.coords[&id].req.fail_at == Some(FailAt::Restore),
            })),
        }));
        match backend {
            Backend::Criu => {
                self.migr.dumping.insert(id, pid);
                self.actions
                    .push_back(Action::Process(ProcessAction::Checkpoint {
                        id,
                        dc,
                        ep,
                        pid,
                        to,
                        fail,
                    }))
            }
            Backend::Cooperative => {
                self.interrupt_for_snapshot(conn);
            }
        }
    }

    /// A cooperative program sent its snapshot.
    pub(in crate::node) fn on_snapshot(&mut self, conn: ConnId, data: Option<Vec<u8>>) {
        let Some(id) = self.migrating_out(conn) else {
            return;
        };
        let fail = self
            .migr
            .coords
            .get(&id)
            .is_some_and(|c| c.req.fail_at == Some(FailAt::Checkpoint));
        match data {
            Some(data) => self
                .actions
                .push_back(Action::Process(ProcessAction::SaveSnapshot {
                    id,
                    data,
                    fail,
                })),
            None => {
                let now = self.now();
                self.on_checkpoint_done(id, Err("the program registered no snapshot hook (m3ipc::Endpoint::set_snapshot_hook)".into()), now);
            }
        }
    }

    /// The checkpoint is taken (`Ok(image bytes)`) or failed.
    pub(in crate::node) fn on_checkpoint_done(
        &mut self,
        id: MigrationId,
        result: Result<u64, String>,
        now: Instant,
    ) {
        let dumped = self.migr.dumping.remove(&id);
        let decided = self.migr.coords.get(&id).map(|c| !c.outcome.is_open());
        if decided != Some(false) {
            // Rolled back while the dump ran (a commit needs the dump): the dump left the
            // process stopped and wrote an image nobody needs.
            if let Some(pid) = dumped {
                self.actions
                    .push_back(Action::Process(ProcessAction::ResumeTree { pid }));
            }
            self.actions
                .push_back(Action::Process(ProcessAction::DropImage { id }));
            return;
        }
        let Some(c) = self.migr.coords.get_mut(&id) else {
            return;
        };
        match result {
            Ok(bytes) => {
                if c.req.backend == Backend::Criu {
                    // criu leaves the dumped process stopped.
                    c.source = Source::Stopped;
                }
                c.image_bytes = bytes;
                let to = c.req.to;
                self.enter_phase(id, Phase::Transfer, now);
                self.actions
                    .push_back(Action::Process(ProcessAction::SendImage { id, to }));
            }
            Err(e) => {
                if c.req.backend == Backend::Criu {
                    // A failed dump may still have stopped the process.
                    c.source = Source::Stopped;
                }
                self.decide(
                    id,
                    false,
                    Some(MigrationError::Checkpoint { reason: e }),
                    now,
                )
            }
        }
    }

    /// The image is on its way (all of it queued on the link), or could not be sent.
    pub(in crate::node) fn on_image_sent(
        &mut self,
        id: MigrationId,
        result: Result<u64, String>,
        now: Instant,
    ) {
        let Some(c) = self.migr.coords.get_mut(&id) else {
            return;
        };
        if !c.outcome.is_open() {
            return;
        }
        match result {
            Ok(_) if c.req.fail_at == Some(FailAt::Transfer) => self.decide(
                id,
                false,
                Some(MigrationError::Transfer {
                    reason: "injected failure (--fail-at transfer)".into(),
                }),
                now,
            ),
            Ok(bytes) => {
                c.image_bytes = c.image_bytes.max(bytes);
                let to = c.req.to;
                self.enter_phase(id, Phase::Restore, now);
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node: to,
                    frame: PeerFrame::Migr(MigrFrame::Restore(MigrRestore { id })),
                }));
            }
            Err(e) => self.decide(id, false, Some(MigrationError::Transfer { reason: e }), now),
        }
    }

    pub(in crate::node) fn decide(
        &mut self,
        id: MigrationId,
        commit: bool,
        error: Option<MigrationError>,
        now: Instant,
    ) {
        let Some(c) = self.migr.coords.get_mut(&id) else {
            return;
        };
        if !c.outcome.is_open() {
            return;
        }
        c.outcome = Outcome::Deciding { commit };
        c.error = error;
        self.enter_phase(
            id,
            if commit {
                Phase::Commit
            } else {
                Phase::Rollback
            },
            now,
        );
        self.write_record(id);
    }

    /// The outcome is recorded: broadcast it and apply it here.
    pub(in crate::node) fn apply_decision(&mut self, id: MigrationId, commit: bool, now: Instant) {
        let Some(c) = self.migr.coords.get_mut(&id) else {
            return;
        };
        c.outcome = Outcome::Decided { commit, at: now };
        let (dc, ep, from, to) = (c.req.dc, c.req.ep, c.from, c.req.to);
        // The source's image is of no use once the outcome is recorded: committed, the
        // process runs on the destination; rolled back, the stopped process itself resumes.
        self.actions
            .push_back(Action::Process(ProcessAction::DropImage { id }));
        let nodes = self.dc_peers(dc);
        let frame = if commit {
            PeerFrame::Migr(MigrFrame::Commit(MigrCommit { id, dc, ep, to }))
        } else {
            PeerFrame::Migr(MigrFrame::Rollback(MigrRollback { id, dc, ep, from }))
        };
        for n in &nodes {
            self.actions.push_back(Action::Peer(PeerAction::Send {
                node: *n,
                frame: frame.clone(),
            }));
        }
        if commit {
            self.actions
                .push_back(Action::Directory(DirRequest::Relocate {
                    id,
                    dc,
                    ep,
                    node: to,
                }));
        }
        let c = self.migr.coords.get_mut(&id).expect("present");
        c.acks = nodes.into_iter().collect();
        let (held, longest) = self.apply_outcome(id, dc, ep, commit, from, to, now);
        let c = self.migr.coords.get_mut(&id).expect("present");
        c.held += held;
        c.longest_hold = c.longest_hold.max(longest);
        // Outcome acks are awaited a bounded time only: a node that never answers learns the
        // outcome from the directory.
        self.add_timer(now + Duration::from_secs(5), TimerKey::Migration { id });
        self.maybe_finish(id, now);
    }

    pub(in crate::node) fn maybe_finish(&mut self, id: MigrationId, now: Instant) {
        let done = self
            .migr
            .coords
            .get(&id)
            .is_some_and(|c| c.outcome.decided_at().is_some() && c.acks.is_empty());
        if !done {
            return;
        }
        let c = self.migr.coords.remove(&id).expect("present");
        let committed = c.outcome.commit() == Some(true);
        let report = self.report(id, &c, committed, c.error.clone(), now);
        self.actions
            .push_back(Action::Report(Report::MigrFinished { id, report }));
    }

    pub(super) fn report(
        &self,
        id: MigrationId,
        c: &Coord,
        committed: bool,
        error: Option<MigrationError>,
        now: Instant,
    ) -> MigrationReport {
        let mut phases = c.phases.clone();
        let end = c.outcome.decided_at().unwrap_or(now);
        phases.push((c.phase, ms(end.saturating_duration_since(c.phase_started))));
        MigrationReport {
            id,
            dc: c.req.dc,
            ep: c.req.ep,
            from: c.from,
            to: c.req.to,
            backend: c.req.backend,
            committed,
            error: error.as_ref().map(ToString::to_string),
            failure: error,
            phases: phases
                .into_iter()
                .map(|(phase, ms)| PhaseTime { phase, ms })
                .collect(),
            migration_ms: ms(end - c.started),
            image_bytes: c
                .info
                .as_ref()
                .map(|i| i.image_bytes)
                .unwrap_or(c.image_bytes),
            transfer_ms: c.info.as_ref().map(|i| i.transfer_ms).unwrap_or(0.0),
            restore_ms: c.info.as_ref().map(|i| i.restore_ms).unwrap_or(0.0),
            held: c.held,
            frozen_ms: c
                .frozen_at
                .map(|t| ms(c.thawed_at.unwrap_or(end).saturating_duration_since(t)))
                .unwrap_or(0.0),
            longest_hold_ms: ms(c.longest_hold),
        }
    }

    /// A participant holds calls now.
    pub(in crate::node) fn on_start_ack(
        &mut self,
        from: NodeId,
        frame: MigrStartAck,
        now: Instant,
    ) {
        let MigrStartAck { id } = frame;
        let Some(c) = self.migr.coords.get_mut(&id) else {
            return;
        };
        if c.phase == Phase::Start
            && c.outcome.is_open()
            && c.acks.remove(&from)
            && c.acks.is_empty()
        {
            self.enter_quiesce(id, now);
        }
    }

    /// The destination restored the process, or could not.
    pub(in crate::node) fn on_restore_report(
        &mut self,
        _from: NodeId,
        frame: MigrRestored,
        now: Instant,
    ) {
        let MigrRestored { id, result } = frame;
        let Some(c) = self.migr.coords.get_mut(&id) else {
            return;
        };
        if !c.outcome.is_open() {
            return;
        }
        match result {
            Ok(info) => {
                c.info = Some(info);
                c.thawed_at = Some(now);
                self.decide(id, true, None, now);
            }
            Err(e) => self.decide(id, false, Some(MigrationError::Restore { reason: e }), now),
        }
    }

    /// A participant applied the outcome.
    pub(in crate::node) fn on_outcome_applied(
        &mut self,
        from: NodeId,
        frame: MigrDone,
        now: Instant,
    ) {
        let MigrDone {
            id,
            held,
            longest_hold_us,
        } = frame;
        if let Some(c) = self.migr.coords.get_mut(&id) {
            if c.acks.remove(&from) {
                c.held += held;
                c.longest_hold = c.longest_hold.max(Duration::from_micros(longest_hold_us));
            }
        }
        self.maybe_finish(id, now);
    }
}
