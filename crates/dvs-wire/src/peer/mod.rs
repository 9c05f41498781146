//! Frames exchanged by node kernels over a peer link (one connection per node pair).
//!
//! A frame is one of five families, each in its own module: [`link`] (handshake and
//! heartbeat), [`ipc`] (M3-IPC calls between nodes), [`migration`] (the migration protocol),
//! [`bulk`] (vcopy and image bytes, which travel in the frame's tail) and [`ctl`] (operator
//! requests forwarded to the node they concern; never seen by the core). Every variant wraps
//! a named struct, so code that handles one frame can take exactly that frame.

use serde::{Deserialize, Serialize};

pub mod bulk;
pub mod ctl;
pub mod ipc;
pub mod link;
pub mod migration;

pub use bulk::{BulkFrame, ImageChunk, VcopyData};
pub use ctl::{CtlAnswer, CtlForward, CtlFrame, CtlId};
pub use ipc::{
    Bound, Cancel, Deliver, DeliverKind, Delivered, IpcFrame, Notify, Redirect, Reply, Unbound,
    VcopyDone, VcopyPull,
};
pub use link::{Hello, LinkFrame, Refuse, Welcome};
pub use migration::{
    Backend, FailAt, MigrCommit, MigrDone, MigrFrame, MigrPrepare, MigrRestore, MigrRestored,
    MigrRollback, MigrStart, MigrStartAck, MigratedCall, MigratedEndpoint, MigrationId,
    RestoreInfo,
};

/// A frame on a peer link.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// Handshake and heartbeat.
    Link(LinkFrame),
    /// M3-IPC between endpoints on two nodes.
    Ipc(IpcFrame),
    /// The migration protocol.
    Migr(MigrFrame),
    /// Vcopy and image bytes.
    Bulk(BulkFrame),
    /// Operator requests between nodes (handled by the node kernel, not the core).
    Ctl(CtlFrame),
}

impl PeerFrame {
    /// The frame's name, for logs (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            PeerFrame::Link(f) => f.kind(),
            PeerFrame::Ipc(f) => f.kind(),
            PeerFrame::Migr(f) => f.kind(),
            PeerFrame::Bulk(f) => f.kind(),
            PeerFrame::Ctl(f) => f.kind(),
        }
    }
}
