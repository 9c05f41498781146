//! Migration frames: the coordinator, the participants and the destination agree on one
//! endpoint's move (see docs/ARCHITECTURE.md §5 for the protocol).

use serde::{Deserialize, Serialize};

use crate::local::LocalRequest;
use crate::{DcId, Ep, NodeId};

/// Identifies one migration attempt, unique in the cluster (coordinator node id in the top
/// 16 bits).
pub type MigrationId = u64;

/// How a process's state is moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// CRIU checkpoint/restore: transparent to the program.
    Criu,
    /// The program's own snapshot/restore hooks (m3ipc), for hosts without CRIU.
    Cooperative,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Criu => "criu",
            Backend::Cooperative => "cooperative",
        })
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "criu" => Ok(Backend::Criu),
            "cooperative" => Ok(Backend::Cooperative),
            other => Err(format!(
                "{other:?} is not a backend: expected criu or cooperative"
            )),
        }
    }
}

/// A phase of a migration that can be made to fail on purpose, to show a rollback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailAt {
    /// After the checkpoint was taken (the source stays stopped until the rollback).
    Checkpoint,
    /// After the image was sent.
    Transfer,
    /// After the destination restored the process (the copy is killed).
    Restore,
}

impl std::fmt::Display for FailAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailAt::Checkpoint => "checkpoint",
            FailAt::Transfer => "transfer",
            FailAt::Restore => "restore",
        })
    }
}

impl std::str::FromStr for FailAt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "checkpoint" => Ok(FailAt::Checkpoint),
            "transfer" => Ok(FailAt::Transfer),
            "restore" => Ok(FailAt::Restore),
            other => Err(format!(
                "{other:?} is not a phase that can fail: expected checkpoint, transfer or restore"
            )),
        }
    }
}

/// The IPC call a migrating process was blocked in, carried to the destination node so that
/// the call continues there (the source node consumed the request bytes already).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigratedCall {
    /// A request not yet completed (typically `Receive`); the destination runs it again.
    Request(LocalRequest),
    /// Its sendrec message was taken; only the reply from `from` is awaited.
    AwaitingReply { from: Ep, remaining_ms: Option<u32> },
}

/// The node-kernel side of a migrating endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigratedEndpoint {
    /// The call it was blocked in, if any.
    pub call: Option<MigratedCall>,
    /// Pending notifications (source, OR'ed value).
    pub notifies: Vec<(Ep, u64)>,
}

/// MIGR_START: hold every call to `{dc, ep}` until the outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrStart {
    /// The migration.
    pub id: MigrationId,
    /// DC of the endpoint.
    pub dc: DcId,
    /// The migrating endpoint.
    pub ep: Ep,
    /// Node it runs on now (the coordinator).
    pub from: NodeId,
    /// Node it moves to.
    pub to: NodeId,
    /// How it moves: the destination gets ready for the restore from here on.
    pub backend: Backend,
}

/// The sender holds calls to the endpoint now; anything it sent before is on the wire ahead.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrStartAck {
    /// The migration.
    pub id: MigrationId,
}

/// Coordinator to destination: the endpoint's node-kernel state and how to restore it.
/// No program to run comes with it: a cooperative restore starts what the directory's
/// launch record of the endpoint names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrPrepare {
    /// The migration.
    pub id: MigrationId,
    /// DC of the endpoint.
    pub dc: DcId,
    /// The migrating endpoint.
    pub ep: Ep,
    /// How the process is restored.
    pub backend: Backend,
    /// The node-kernel state of the endpoint.
    pub state: MigratedEndpoint,
    /// Fail the restore on purpose (`--fail-at restore`).
    pub fail_restore: bool,
}

/// Coordinator to destination: every image byte has been sent; restore now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrRestore {
    /// The migration.
    pub id: MigrationId,
}

/// Destination to coordinator: the process runs (held) on the destination, or why not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrRestored {
    /// The migration.
    pub id: MigrationId,
    /// What the restore measured, or why it failed.
    pub result: Result<RestoreInfo, String>,
}

/// MIGR_COMMIT: `{dc, ep}` now runs on `to`; replay held calls there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrCommit {
    /// The migration.
    pub id: MigrationId,
    /// DC of the endpoint.
    pub dc: DcId,
    /// The endpoint that moved.
    pub ep: Ep,
    /// Where it runs now.
    pub to: NodeId,
}

/// MIGR_ROLLBACK: `{dc, ep}` stays on `from`; replay held calls there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrRollback {
    /// The migration.
    pub id: MigrationId,
    /// DC of the endpoint.
    pub dc: DcId,
    /// The endpoint that stays.
    pub ep: Ep,
    /// Where it still runs.
    pub from: NodeId,
}

/// The sender applied the outcome; `held` calls and frames were replayed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrDone {
    /// The migration.
    pub id: MigrationId,
    /// Calls and frames the sender held and replayed.
    pub held: u32,
    /// How long the first of them waited, in microseconds (all are replayed together).
    pub longest_hold_us: u64,
}

/// A migration frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MigrFrame {
    /// See [`MigrStart`].
    Start(MigrStart),
    /// See [`MigrStartAck`].
    StartAck(MigrStartAck),
    /// See [`MigrPrepare`].
    Prepare(MigrPrepare),
    /// See [`MigrRestore`].
    Restore(MigrRestore),
    /// See [`MigrRestored`].
    Restored(MigrRestored),
    /// See [`MigrCommit`].
    Commit(MigrCommit),
    /// See [`MigrRollback`].
    Rollback(MigrRollback),
    /// See [`MigrDone`].
    Done(MigrDone),
}

impl MigrFrame {
    /// The frame's name, for logs (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            MigrFrame::Start(_) => "MigrStart",
            MigrFrame::StartAck(_) => "MigrStartAck",
            MigrFrame::Prepare(_) => "MigrPrepare",
            MigrFrame::Restore(_) => "MigrRestore",
            MigrFrame::Restored(_) => "MigrRestored",
            MigrFrame::Commit(_) => "MigrCommit",
            MigrFrame::Rollback(_) => "MigrRollback",
            MigrFrame::Done(_) => "MigrDone",
        }
    }
}

/// What the destination reports of a restore.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RestoreInfo {
    /// Image bytes received.
    pub image_bytes: u64,
    /// Milliseconds from the first to the last image byte received.
    pub transfer_ms: f64,
    /// Milliseconds the restore took.
    pub restore_ms: f64,
}
