//! What a migration reports: its phases, why it failed, and the figures of one run. The same
//! types travel from the core to the node's control socket, the CLI, the demo and the
//! benches.

use serde::{Deserialize, Serialize};

use crate::peer::{Backend, MigrationId};
use crate::{DcId, Ep, NodeId};

/// Phases of a migration, as reported to the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Migration record written, START broadcast, every node holding calls.
    Start,
    /// Waiting for the process to be blocked in IPC with no unanswered sendrec.
    Quiesce,
    /// Checkpointing the process on the source.
    Checkpoint,
    /// Streaming the image to the destination.
    Transfer,
    /// Restoring the process on the destination.
    Restore,
    /// Deciding COMMIT and applying it everywhere.
    Commit,
    /// Deciding ROLLBACK and applying it everywhere.
    Rollback,
}

impl Phase {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Start => "start",
            Phase::Quiesce => "quiesce",
            Phase::Checkpoint => "checkpoint",
            Phase::Transfer => "transfer",
            Phase::Restore => "restore",
            Phase::Commit => "commit",
            Phase::Rollback => "rollback",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, so that table columns (`{:<10}`) line up.
        f.pad(self.name())
    }
}

/// Why a migration was refused or rolled back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MigrationError {
    /// The DC is not in the cluster config.
    #[error("no DC {dc}")]
    UnknownDc {
        /// The DC asked for.
        dc: DcId,
    },
    /// The destination does not span the endpoint's DC.
    #[error("node {node} is not part of DC {dc}")]
    NotInDc {
        /// The destination asked for.
        node: NodeId,
        /// The endpoint's DC.
        dc: DcId,
    },
    /// The endpoint runs on the destination already.
    #[error("endpoint {dc}/{ep} already runs on node {node}")]
    AlreadyThere {
        /// DC of the endpoint.
        dc: DcId,
        /// The endpoint.
        ep: Ep,
        /// The destination asked for.
        node: NodeId,
    },
    /// The endpoint does not run on the node asked to move it.
    #[error("endpoint {dc}/{ep} does not run on node {node}")]
    NotHere {
        /// DC of the endpoint.
        dc: DcId,
        /// The endpoint.
        ep: Ep,
        /// The node asked.
        node: NodeId,
    },
    /// Another migration of the endpoint is under way (known here, or recorded in the
    /// directory by `id` from `from` to `to`).
    #[error("another migration of {dc}/{ep} is in progress{}", match other { Some((id, from, to)) => format!(" (id {id}, node {from} to node {to})"), None => String::new() })]
    InProgress {
        /// DC of the endpoint.
        dc: DcId,
        /// The endpoint.
        ep: Ep,
        /// The migration recorded in the directory: (id, from, to).
        other: Option<(MigrationId, NodeId, NodeId)>,
    },
    /// The link to the destination is down.
    #[error("the link to node {node} is down")]
    LinkDown {
        /// The destination.
        node: NodeId,
    },
    /// The directory did not take the migration record.
    #[error("cannot record the migration of {dc}/{ep} in the directory")]
    NotRecorded {
        /// DC of the endpoint.
        dc: DcId,
        /// The endpoint.
        ep: Ep,
    },
    /// The process never got to a state where it can be checkpointed.
    #[error("endpoint {dc}/{ep} did not become quiescent within {timeout_ms} ms (it is {state})")]
    NotQuiescent {
        /// DC of the endpoint.
        dc: DcId,
        /// The endpoint.
        ep: Ep,
        /// How long it was given.
        timeout_ms: u64,
        /// What it was doing instead.
        state: String,
    },
    /// The checkpoint failed.
    #[error("checkpoint failed: {reason}")]
    Checkpoint {
        /// Why.
        reason: String,
    },
    /// The image did not reach the destination.
    #[error("transfer failed: {reason}")]
    Transfer {
        /// Why.
        reason: String,
    },
    /// The destination could not restore the process.
    #[error("restore failed: {reason}")]
    Restore {
        /// Why (the destination's words).
        reason: String,
    },
    /// The link to the destination went down before the outcome.
    #[error("lost the link to the destination node {node}")]
    DestinationLost {
        /// The destination.
        node: NodeId,
    },
    /// Another node recorded a rollback (e.g. a participant whose wait ran out).
    #[error("rolled back by another node")]
    RolledBackElsewhere,
    /// The migration record was gone or foreign when the outcome was written.
    #[error("the migration record changed under the coordinator")]
    RecordChanged,
}

/// Time spent in one migration phase.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseTime {
    /// The phase.
    pub phase: Phase,
    /// Milliseconds.
    pub ms: f64,
}

/// The outcome of a migration, with the time each phase took.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The migration.
    pub id: MigrationId,
    /// DC of the endpoint.
    pub dc: DcId,
    /// The endpoint.
    pub ep: Ep,
    /// Source node.
    pub from: NodeId,
    /// Destination node.
    pub to: NodeId,
    /// Backend used.
    pub backend: Backend,
    /// Whether it committed (else it rolled back).
    pub committed: bool,
    /// Why it rolled back, in words (`failure` rendered).
    pub error: Option<String>,
    /// Why it rolled back, typed.
    pub failure: Option<MigrationError>,
    /// Time spent in each phase, in order.
    pub phases: Vec<PhaseTime>,
    /// Milliseconds from START to the outcome applied on the source node.
    pub migration_ms: f64,
    /// Checkpoint image bytes moved.
    pub image_bytes: u64,
    /// Milliseconds the destination took to receive the image (first to last byte).
    pub transfer_ms: f64,
    /// Milliseconds the restore took on the destination.
    pub restore_ms: f64,
    /// Calls, replies and notifications held during the move and replayed, over all nodes.
    pub held: u32,
    /// Milliseconds the process was frozen: from the start of the checkpoint until the
    /// destination reported its copy running (commit) or the outcome was decided (rollback).
    /// 0 when nothing was frozen.
    #[serde(default)]
    pub frozen_ms: f64,
    /// Milliseconds the longest-held call, reply or notification waited before it was
    /// replayed, over all nodes.
    #[serde(default)]
    pub longest_hold_ms: f64,
}
