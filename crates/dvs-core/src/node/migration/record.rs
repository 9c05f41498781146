//! The migration record in the directory (`migr/{dc}/{ep}`): the single place where a
//! migration's outcome is decided, by compare-and-set.

use dvs_wire::peer::MigrationId;
use dvs_wire::NodeId;

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
