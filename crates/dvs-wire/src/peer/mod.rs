//! Frames exchanged by node kernels over a peer link (one connection per node pair).
//!
//! A frame is one of four families, each in its own module: [`link`] (handshake and
//! heartbeat), [`ipc`] (M3-IPC calls between nodes), [`migration`] (the migration protocol)
//! and [`bulk`] (vcopy and image bytes, which travel in the frame's tail). Every variant wraps
//! a named struct, so code that handles one frame can take exactly that frame.

use serde::{Deserialize, Serialize};

pub mod bulk;
pub mod ipc;
pub mod link;
pub mod migration;

pub use bulk::{BulkFrame, ImageChunk, VcopyData};
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
}

impl PeerFrame {
    /// The frame's name, for logs (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            PeerFrame::Link(f) => f.kind(),
            PeerFrame::Ipc(f) => f.kind(),
            PeerFrame::Migr(f) => f.kind(),
            PeerFrame::Bulk(f) => f.kind(),
        }
    }

    /// Whether the frame carries bulk bytes (sent behind control frames).
    pub fn is_bulk(&self) -> bool {
        matches!(self, PeerFrame::Bulk(_))
    }
}

/// `From` for each family and each frame struct, so that `Deliver { .. }.into()` is a
/// `PeerFrame`.
macro_rules! into_frame {
    ($family:ident, $enum:ident: $($variant:ident($ty:ty)),* $(,)?) => {
        impl From<$enum> for PeerFrame {
            fn from(f: $enum) -> Self {
                PeerFrame::$family(f)
            }
        }
        $(impl From<$ty> for PeerFrame {
            fn from(f: $ty) -> Self {
                PeerFrame::$family($enum::$variant(f))
            }
        })*
    };
}

into_frame!(Link, LinkFrame: Hello(Hello), Welcome(Welcome), Refuse(Refuse));
into_frame!(
    Ipc,
    IpcFrame: Deliver(Deliver),
    Delivered(Delivered),
    Cancel(Cancel),
    Reply(Reply),
    Notify(Notify),
    VcopyPull(VcopyPull),
    VcopyDone(VcopyDone),
    Bound(Bound),
    Unbound(Unbound),
    Redirect(Redirect),
);
into_frame!(
    Migr,
    MigrFrame: Start(MigrStart),
    StartAck(MigrStartAck),
    Prepare(MigrPrepare),
    Restore(MigrRestore),
    Restored(MigrRestored),
    Commit(MigrCommit),
    Rollback(MigrRollback),
    Done(MigrDone),
);
into_frame!(Bulk, BulkFrame: VcopyData(VcopyData), ImageChunk(ImageChunk));
