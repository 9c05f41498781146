//! The migration record in the directory (`migr/{dc}/{ep}`): the single place where a
//! migration's outcome is decided, by compare-and-set.

use std::time::Instant;

use dvs_wire::peer::MigrationId;
use dvs_wire::NodeId;

use super::super::action::DirRequest;
use super::super::{Action, NodeCore, TimerKey};
use super::coordinator::{Outcome, DECISION_RETRY};
use super::MigrationError;

/// State of a migration record in the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// Running.
    Started,
    /// Decided: committed.
    Committed,
    /// Decided: rolled back.
    RolledBack,
}

/// The migration record of one endpoint, kept in the directory under `migr/{dc}/{ep}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrRecord {
    /// The migration.
    pub id: MigrationId,
    /// Source node.
    pub from: NodeId,
    /// Destination node.
    pub to: NodeId,
    /// Where it stands.
    pub state: RecordState,
}

impl MigrRecord {
    /// Text form stored in the directory.
    pub fn encode(&self) -> String {
        let st = match self.state {
            RecordState::Started => "started",
            RecordState::Committed => "committed",
            RecordState::RolledBack => "rolled_back",
        };
        format!(
            "id={} from={} to={} state={st}",
            self.id, self.from, self.to
        )
    }

    /// Whether this record, the endpoint's latest, still places the endpoint on `node` after
    /// migration `id` moved it there: it is that migration, committed, or a later one that
    /// started from `node` and did not commit (started, or rolled back: the endpoint stayed
    /// on `node`). A later migration from `node` that committed moved it on.
    pub fn places_at(&self, id: MigrationId, node: NodeId) -> bool {
        if self.id == id {
            return self.state == RecordState::Committed;
        }
        self.from == node && self.state != RecordState::Committed
    }

    /// Parses [`MigrRecord::encode`]'s form.
    pub fn parse(s: &str) -> Option<Self> {
        let mut id = None;
        let mut from = None;
        let mut to = None;
        let mut state = None;
        for kv in s.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            match k {
                "id" => id = v.parse().ok(),
                "from" => from = v.parse().ok(),
                "to" => to = v.parse().ok(),
                "state" => {
                    state = match v {
                        "started" => Some(RecordState::Started),
                        "committed" => Some(RecordState::Committed),
                        "rolled_back" => Some(RecordState::RolledBack),
                        _ => None,
                    }
                }
                _ => {}
            }
        }
        Some(MigrRecord {
            id: id?,
            from: from?,
            to: to?,
            state: state?,
        })
    }
}

/// What the current migration record must be for a write to go ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Require {
    /// No migration of the endpoint is running (no record, or a decided one).
    NotRunning,
    /// This migration is still undecided.
    Started(MigrationId),
}

impl Require {
    /// Whether `current` satisfies the requirement.
    pub fn allows(&self, current: Option<&MigrRecord>) -> bool {
        match (self, current) {
            (Require::NotRunning, None) => true,
            (Require::NotRunning, Some(r)) => r.state != RecordState::Started,
            (Require::Started(id), Some(r)) => r.id == *id && r.state == RecordState::Started,
            (Require::Started(_), None) => false,
        }
    }
}

/// The coordinator's record when a write of it got no definite answer (`Err(None)`: the
/// directory failed, and the write may or may not have landed).
impl NodeCore {
    /// The migration's timer, with the record's state unsure: read it (again: a read the
    /// directory fails is not answered).
    pub(super) fn check_record(&mut self, id: MigrationId, now: Instant) {
        let Some(c) = self.migr.coords.get(&id) else {
            return;
        };
        let (dc, ep) = (c.req.dc, c.req.ep);
        self.actions
            .push_back(Action::Directory(DirRequest::ReadMigrRecord { id, dc, ep }));
        self.add_timer(now + DECISION_RETRY, TimerKey::Migration { id });
    }

    /// The record, read because the coordinator was unsure of it: `false` if this node does
    /// not coordinate `id` or was not unsure (a participant's read, or a late answer).
    pub(in crate::node) fn coord_record_read(
        &mut self,
        id: MigrationId,
        record: Option<MigrRecord>,
        now: Instant,
    ) -> bool {
        let Some(c) = self.migr.coords.get_mut(&id) else {
            return false;
        };
        if !std::mem::take(&mut c.unsure) {
            return true;
        }
        let (outcome, dc, ep) = (c.outcome, c.req.dc, c.req.ep);
        let mine = record.filter(|r| r.id == id);
        match (outcome, mine) {
            // The start landed.
            (Outcome::Open, Some(r)) if r.state == RecordState::Started => {
                self.on_migr_record_result(id, Ok(()), now)
            }
            // It did not (or was decided: only this node decides a start it never saw
            // recorded, so that cannot be): write it again.
            (Outcome::Open, _) => self.write_record(id),
            // The decision did not land: write it again.
            (Outcome::Deciding { .. }, Some(r)) if r.state == RecordState::Started => {
                self.write_record(id)
            }
            // It landed (or a participant's rollback did): follow the record.
            (Outcome::Deciding { .. }, Some(r)) => self.on_migr_record(dc, ep, r, now),
            // The start never landed, so nobody can have committed: roll back here.
            (Outcome::Deciding { .. }, None) => {
                let c = self.migr.coords.get_mut(&id).expect("present");
                c.outcome = Outcome::Deciding { commit: false };
                c.error.get_or_insert(MigrationError::RecordChanged);
                self.apply_decision(id, false, now);
            }
            (Outcome::Decided { .. }, _) => {}
        }
        true
    }

    /// Writes the record the migration's outcome calls for: its start while open, else its
    /// decision (first time, or again after an unknown answer).
    pub(super) fn write_record(&mut self, id: MigrationId) {
        let Some(c) = self.migr.coords.get(&id) else {
            return;
        };
        let (state, require) = match c.outcome {
            Outcome::Open => (RecordState::Started, Require::NotRunning),
            Outcome::Deciding { commit: true } => (RecordState::Committed, Require::Started(id)),
            Outcome::Deciding { commit: false } => (RecordState::RolledBack, Require::Started(id)),
            Outcome::Decided { .. } => return,
        };
        let (dc, ep, from, to) = (c.req.dc, c.req.ep, c.from, c.req.to);
        self.actions
            .push_back(Action::Directory(DirRequest::WriteMigrRecord {
                id,
                dc,
                ep,
                record: MigrRecord {
                    id,
                    from,
                    to,
                    state,
                },
                require,
            }));
    }
}
