//! What the core asks the daemon to do, grouped by who carries it out: the local process
//! connections, the peer links, the directory, memory copies, processes and checkpoint
//! images, and whoever waits for a report.

use bytes::Bytes;
use dvs_wire::local::LocalResponse;
use dvs_wire::peer::{Backend, MigrationId, PeerFrame};
use dvs_wire::{DcId, Ep, Errno, NodeId};

use super::input::Ticket;
use super::migration::{MigrRecord, MigrationError, MigrationReport, Phase, Require};
use super::peer_check::Violation;
use super::vcopy_in::VcopyChunk;
use crate::{ConnId, OpId};

/// Where the result of a vcopy goes when the copy is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcopyCompletion {
    /// The caller is local: answer its connection.
    Local { op: OpId },
    /// The caller is on another node: send it `VcopyDone`.
    Remote { node: NodeId, op: OpId },
}

/// Something the daemon must do for the core.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// On a local process's connection.
    Local(LocalAction),
    /// On a peer link.
    Peer(PeerAction),
    /// In the directory.
    Directory(DirRequest),
    /// In the memory of local processes.
    Memory(MemoryAction),
    /// On a local process tree or a checkpoint image.
    Process(ProcessAction),
    /// For whoever asked (the control socket).
    Report(Report),
}

/// An action on a local connection.
#[derive(Clone, Debug, PartialEq)]
pub enum LocalAction {
    /// Send a response on a local connection.
    Respond { conn: ConnId, resp: LocalResponse },
    /// Close a local connection that broke the protocol.
    Close { conn: ConnId, reason: String },
}

/// An action on a peer link.
#[derive(Clone, Debug, PartialEq)]
pub enum PeerAction {
    /// Send a frame on the link to `node`.
    Send { node: NodeId, frame: PeerFrame },
    /// `node` sent a frame no honest peer sends (of kind `frame`): it was dropped, and so is
    /// everything else from `node` until its link comes up again. Close the link.
    Condemn {
        node: NodeId,
        frame: &'static str,
        reason: Violation,
    },
}

/// A directory request; its answer comes back as a [`crate::DirectoryInput`].
#[derive(Clone, Debug, PartialEq)]
pub enum DirRequest {
    /// Record that `{dc, ep}` is bound on this node (must be absent), then answer
    /// `Registered`.
    Register { conn: ConnId, dc: DcId, ep: Ep },
    /// Remove `{dc, ep}` on this node from the directory.
    Unregister { dc: DcId, ep: Ep },
    /// Once every directory request before this one has landed, answer `Synced` (an
    /// `unbind` answers only then, so that the endpoint can be bound elsewhere as soon as it
    /// returns).
    Sync { conn: ConnId },
    /// Ask where `{dc, ep}` runs; answer `Located`.
    Lookup { dc: DcId, ep: Ep },
    /// Migration `id` committed: record that `{dc, ep}` runs on `node`, as long as `id` is
    /// still the endpoint's latest migration (its record says so): a relocation that lands
    /// late must not undo a later move.
    Relocate {
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        node: NodeId,
    },
    /// Migration: write the migration record of `{dc, ep}` if the current one satisfies
    /// `require`, then answer `MigrRecordWritten`. This compare-and-set is the single place
    /// where a migration's outcome is decided.
    WriteMigrRecord {
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        record: MigrRecord,
        require: Require,
    },
    /// Migration (participant): read the migration record of `{dc, ep}` and answer
    /// `MigrRecordRead`: a MIGR_START is believed only while the directory records that
    /// migration as started.
    ReadMigrRecord { id: MigrationId, dc: DcId, ep: Ep },
}

/// A copy into or out of local processes' memory.
#[derive(Clone, Debug, PartialEq)]
pub enum MemoryAction {
    /// Copy between two local processes, then answer `VcopyLocalDone`.
    CopyLocal {
        src_pid: i32,
        src_addr: u64,
        dst_pid: i32,
        dst_addr: u64,
        len: u64,
        done: VcopyCompletion,
    },
    /// Read `len` bytes at `src_addr` of local process `pid` and stream them as `VcopyData`
    /// frames to `to`. On a read error, answer `VcopyStreamFailed`.
    Stream {
        pid: i32,
        src_addr: u64,
        len: u64,
        to: NodeId,
        op: OpId,
        caller_node: NodeId,
        dc: DcId,
        caller: Ep,
        dst: Ep,
        dst_addr: u64,
    },
    /// Write a received vcopy chunk into process `pid` at the chunk's address, then answer
    /// `VcopyChunkWritten`.
    WriteChunk {
        pid: i32,
        from: NodeId,
        chunk: VcopyChunk,
        data: Bytes,
    },
}

/// An action on a local process tree or on a checkpoint image.
#[derive(Clone, Debug, PartialEq)]
pub enum ProcessAction {
    /// Checkpoint the process `pid` (criu) into a fresh image folder for `id`, then answer
    /// `CheckpointDone`. With `fail`, fail on purpose afterwards. The image goes to `to`
    /// (the `SendImage` that follows names it too): it may be streamed while it is written.
    Checkpoint {
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        pid: i32,
        to: NodeId,
        fail: bool,
    },
    /// Store a cooperative snapshot as the image of `id`, then answer `CheckpointDone`.
    SaveSnapshot {
        id: MigrationId,
        data: Vec<u8>,
        fail: bool,
    },
    /// Stream the image folder of `id` to `to` as image chunks, then answer `ImageSent`.
    SendImage { id: MigrationId, to: NodeId },
    /// Destination: get ready to restore `id` as `{dc, ep}` with `backend`, once the directory
    /// confirms the START (criu: start the restorer), so that starting it costs nothing while
    /// the process is frozen. Nothing answers; a `Restore` or a `DropImage` for `id` follows.
    PrepareRestore {
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        backend: Backend,
        /// The source node.
        from: NodeId,
    },
    /// Destination: restore `id` from its received image, then answer `Restored` (criu) or
    /// wait for the program's `BindRestored` (cooperative).
    Restore {
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        backend: Backend,
        fail: bool,
    },
    /// SIGKILL the process tree rooted at `pid` (a stopped or failed copy).
    KillTree { pid: i32 },
    /// Migration committed: the local process `pid` now runs on node `to` (for `dvs ps`).
    MigratedAway { pid: i32, to: NodeId },
    /// Migration rolled back: let the stopped source process tree run again.
    ResumeTree { pid: i32 },
    /// Forget the image folder of `id`.
    DropImage { id: MigrationId },
}

/// A report for whoever asked for it.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// The answer to a `RegisterRemote`.
    Registered {
        ticket: Ticket,
        result: Result<(), Errno>,
    },
    /// The answer to a migration `Start`: its id, or why it cannot start.
    MigrationAccepted {
        ticket: Ticket,
        result: Result<MigrationId, MigrationError>,
    },
    /// Migration progress.
    MigrProgress { id: MigrationId, phase: Phase },
    /// Migration finished (committed or rolled back).
    MigrFinished {
        id: MigrationId,
        report: MigrationReport,
    },
}
