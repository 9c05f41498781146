//! Everything that can happen to a node kernel, as one type: [`NodeCore::handle`] takes an
//! [`Input`] and the current time, and nothing else changes the core's state.
//!
//! [`NodeCore::handle`]: crate::NodeCore::handle

use std::collections::BTreeSet;

use bytes::Bytes;
use dvs_wire::local::LocalRequest;
use dvs_wire::peer::{MigrationId, PeerFrame};
use dvs_wire::{DcId, Ep, Errno, NodeId};

use super::action::VcopyCompletion;
use super::migration::{MigrRecord, MigrationRequest};
use super::vcopy_in::VcopyChunk;
use super::LocalPeer;
use crate::{ConnId, OpId};

/// A number the daemon picks to match a request with the report that answers it
/// ([`crate::Report::Registered`], [`crate::Report::MigrationAccepted`]).
pub type Ticket = u64;

/// An event for the core.
#[derive(Clone, Debug)]
pub enum Input {
    /// A process connected; `peer` says who it is.
    LocalConnect { conn: ConnId, peer: LocalPeer },
    /// A process disconnected (exited, died, or its connection was closed).
    LocalDisconnect { conn: ConnId },
    /// A request from a local process.
    LocalRequest { conn: ConnId, req: LocalRequest },
    /// The link to `node` is up (authenticated).
    LinkUp { node: NodeId },
    /// The link to `node` went down.
    LinkDown { node: NodeId },
    /// A frame from `from`, other than vcopy data.
    PeerFrame { from: NodeId, frame: PeerFrame },
    /// A vcopy data chunk from `from`, with its bytes.
    VcopyChunk {
        from: NodeId,
        chunk: VcopyChunk,
        data: Bytes,
    },
    /// A [`crate::MemoryAction::WriteChunk`] finished.
    VcopyChunkWritten {
        from: NodeId,
        chunk: VcopyChunk,
        result: Result<(), Errno>,
    },
    /// A [`crate::MemoryAction::CopyLocal`] finished.
    VcopyLocalDone {
        done: VcopyCompletion,
        result: Result<(), Errno>,
    },
    /// A [`crate::MemoryAction::Stream`] could not read its source.
    VcopyStreamFailed {
        caller_node: NodeId,
        op: OpId,
        error: Errno,
    },
    /// An answer or a change from the directory.
    Directory(DirectoryInput),
    /// An operator's request or the outcome of a migration step the daemon carried out.
    Migration(MigrationInput),
    /// Time passed: fire the timers due by now.
    Timeout,
}

/// What the directory answered, or a change it reported.
#[derive(Clone, Debug)]
pub enum DirectoryInput {
    /// A [`crate::DirRequest::Register`] landed (or why not).
    Registered {
        conn: ConnId,
        result: Result<(), Errno>,
    },
    /// Every directory request before a [`crate::DirRequest::Sync`] has landed.
    Synced { conn: ConnId },
    /// The answer to a [`crate::DirRequest::Lookup`].
    Located {
        dc: DcId,
        ep: Ep,
        node: Option<NodeId>,
    },
    /// The directory says `{dc, ep}` now runs on `node` (or nowhere).
    Changed {
        dc: DcId,
        ep: Ep,
        node: Option<NodeId>,
    },
    /// An operator registers `{dc, ep}` as running on `node` (or its backup there); answered
    /// by [`crate::Report::Registered`].
    RegisterRemote {
        ticket: Ticket,
        dc: DcId,
        ep: Ep,
        node: NodeId,
        backup: bool,
    },
    /// The outcome of a [`crate::DirRequest::WriteMigrRecord`]: written, or the record found
    /// instead.
    MigrRecordWritten {
        id: MigrationId,
        result: Result<(), Option<MigrRecord>>,
    },
    /// The answer to a [`crate::DirRequest::ReadMigrRecord`].
    MigrRecordRead {
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        record: Option<MigrRecord>,
    },
    /// The migration record of `{dc, ep}` changed.
    MigrRecordChanged {
        dc: DcId,
        ep: Ep,
        record: MigrRecord,
    },
    /// The directory sets the nodes DC `dc` spans (an operator's `dvs dc add-node` or
    /// `remove-node`); unknown DCs are ignored.
    DcNodes { dc: DcId, nodes: BTreeSet<NodeId> },
}

/// A migration request or the outcome of one of its steps.
#[derive(Clone, Debug)]
pub enum MigrationInput {
    /// An operator asks to migrate; answered by [`crate::Report::MigrationAccepted`].
    Start {
        ticket: Ticket,
        req: MigrationRequest,
    },
    /// A [`crate::ProcessAction::Checkpoint`] or `SaveSnapshot` finished (image bytes).
    CheckpointDone {
        id: MigrationId,
        result: Result<u64, String>,
    },
    /// A [`crate::ProcessAction::SendImage`] finished (bytes sent).
    ImageSent {
        id: MigrationId,
        result: Result<u64, String>,
    },
    /// `bytes` more image bytes of `id` arrived (destination).
    ImageChunk { id: MigrationId, bytes: u64 },
    /// A [`crate::ProcessAction::Restore`] finished: the restored process's connection and
    /// pid, or why not.
    Restored {
        id: MigrationId,
        result: Result<(ConnId, i32), String>,
    },
}
