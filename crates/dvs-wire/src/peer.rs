//! Frames exchanged by node kernels over a peer link (one TCP connection per node pair).

use serde::{Deserialize, Serialize};

use crate::local::LocalRequest;
use crate::message::{Errno, Message, Timeout};
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

/// What kind of call a [`PeerFrame::Deliver`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliverKind {
    /// Plain rendezvous send: the destination node answers `Delivered` when taken.
    Send,
    /// First half of a sendrec: the answer is the `Reply`.
    SendRec,
}

/// A frame on a peer link.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// First frame of the dialing side.
    Hello {
        version: u32,
        cluster: String,
        node: NodeId,
    },
    /// Accepting side's answer to a matching `Hello`.
    Welcome { node: NodeId },
    /// Accepting side refuses the link; the connection closes after it.
    Refuse { reason: String },
    /// Liveness probe.
    Ping,
    /// Answer to `Ping`.
    Pong,
    /// A message from `src` (on the sending node) to `dst` (on the receiving node).
    Deliver {
        op: u64,
        dc: DcId,
        src: Ep,
        dst: Ep,
        kind: DeliverKind,
        msg: Message,
        timeout: Timeout,
    },
    /// Outcome of a `Deliver` of kind `Send` (or failure of a `SendRec` before it was taken).
    Delivered { op: u64, result: Result<(), Errno> },
    /// The sender gave up (timed out or died): drop `op` if it was not taken yet.
    Cancel { op: u64 },
    /// The reply to a sendrec (or why there will be none).
    Reply {
        dc: DcId,
        src: Ep,
        dst: Ep,
        result: Result<Message, Errno>,
    },
    /// A notification from `src` to `dst`.
    Notify {
        dc: DcId,
        src: Ep,
        dst: Ep,
        value: u64,
    },
    /// Ask the node of `src` to read `len` bytes and stream them to the node of `dst`.
    VcopyPull {
        op: u64,
        caller_node: NodeId,
        dc: DcId,
        caller: Ep,
        src: Ep,
        src_addr: u64,
        dst: Ep,
        dst_addr: u64,
        len: u64,
    },
    /// One chunk of a vcopy; the bytes travel in the frame's tail.
    VcopyData {
        op: u64,
        caller_node: NodeId,
        dc: DcId,
        caller: Ep,
        dst: Ep,
        dst_addr: u64,
        offset: u64,
        total: u64,
    },
    /// Outcome of a vcopy, sent to the caller's node.
    VcopyDone { op: u64, result: Result<(), Errno> },
    /// Endpoint `ep` of `dc` is now bound on the sending node (fast path; the directory is the truth).
    Bound { dc: DcId, ep: Ep },
    /// Endpoint `ep` of `dc` is no longer bound on the sending node.
    Unbound { dc: DcId, ep: Ep },
    /// The message `op` was not taken: its destination is migrating. Hold the call and send it
    /// again once the migration's outcome is known.
    Redirect { op: u64, dc: DcId, dst: Ep },
    /// MIGR_START: hold every call to `{dc, ep}` until the outcome.
    MigrStart {
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        from: NodeId,
        to: NodeId,
    },
    /// The sender holds calls to the endpoint now; anything it sent before is on the wire ahead.
    MigrStartAck { id: MigrationId },
    /// Coordinator to destination: the endpoint's node-kernel state and how to restore it.
    /// No program to run comes with it: a cooperative restore starts what the directory's
    /// launch record of the endpoint names.
    MigrPrepare {
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        backend: Backend,
        state: MigratedEndpoint,
        fail_restore: bool,
    },
    /// One chunk of checkpoint image file `file`; the bytes travel in the tail.
    MigrImage {
        id: MigrationId,
        file: String,
        offset: u64,
        last: bool,
    },
    /// Coordinator to destination: every image byte has been sent; restore now.
    MigrRestore { id: MigrationId },
    /// Destination to coordinator: the process runs (held) on the destination, or why not.
    MigrRestored {
        id: MigrationId,
        result: Result<RestoreInfo, String>,
    },
    /// MIGR_COMMIT: `{dc, ep}` now runs on `to`; replay held calls there.
    MigrCommit {
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        to: NodeId,
    },
    /// MIGR_ROLLBACK: `{dc, ep}` stays on `from`; replay held calls there.
    MigrRollback {
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        from: NodeId,
    },
    /// The sender applied the outcome; `held` calls and frames were replayed.
    MigrDone { id: MigrationId, held: u32 },
}

impl PeerFrame {
    /// The frame's variant name, for logs (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            PeerFrame::Hello { .. } => "Hello",
            PeerFrame::Welcome { .. } => "Welcome",
            PeerFrame::Refuse { .. } => "Refuse",
            PeerFrame::Ping => "Ping",
            PeerFrame::Pong => "Pong",
            PeerFrame::Deliver { .. } => "Deliver",
            PeerFrame::Delivered { .. } => "Delivered",
            PeerFrame::Cancel { .. } => "Cancel",
            PeerFrame::Reply { .. } => "Reply",
            PeerFrame::Notify { .. } => "Notify",
            PeerFrame::VcopyPull { .. } => "VcopyPull",
            PeerFrame::VcopyData { .. } => "VcopyData",
            PeerFrame::VcopyDone { .. } => "VcopyDone",
            PeerFrame::Bound { .. } => "Bound",
            PeerFrame::Unbound { .. } => "Unbound",
            PeerFrame::Redirect { .. } => "Redirect",
            PeerFrame::MigrStart { .. } => "MigrStart",
            PeerFrame::MigrStartAck { .. } => "MigrStartAck",
            PeerFrame::MigrPrepare { .. } => "MigrPrepare",
            PeerFrame::MigrImage { .. } => "MigrImage",
            PeerFrame::MigrRestore { .. } => "MigrRestore",
            PeerFrame::MigrRestored { .. } => "MigrRestored",
            PeerFrame::MigrCommit { .. } => "MigrCommit",
            PeerFrame::MigrRollback { .. } => "MigrRollback",
            PeerFrame::MigrDone { .. } => "MigrDone",
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
