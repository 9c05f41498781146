//! Bulk frames: the bytes of a vcopy and of a checkpoint image. They travel in the frame's
//! tail, in bounded chunks, so that a link interleaves them with control frames.

use serde::{Deserialize, Serialize};

use crate::peer::MigrationId;
use crate::{DcId, Ep, NodeId};

/// One chunk of a vcopy; the bytes travel in the frame's tail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcopyData {
    /// The caller's operation id.
    pub op: u64,
    /// Node of the caller.
    pub caller_node: NodeId,
    /// DC of the endpoints.
    pub dc: DcId,
    /// Endpoint that called vcopy.
    pub caller: Ep,
    /// Endpoint written to.
    pub dst: Ep,
    /// Address of the copy's first byte in `dst`.
    pub dst_addr: u64,
    /// Offset of this chunk in the copy.
    pub offset: u64,
    /// Bytes in the whole copy.
    pub total: u64,
}

/// One chunk of checkpoint image file `file`; the bytes travel in the tail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageChunk {
    /// The migration.
    pub id: MigrationId,
    /// File name inside the image folder.
    pub file: String,
    /// Offset of this chunk in the file.
    pub offset: u64,
    /// The file's last chunk.
    pub last: bool,
}

/// A bulk frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum BulkFrame {
    /// See [`VcopyData`].
    VcopyData(VcopyData),
    /// See [`ImageChunk`].
    ImageChunk(ImageChunk),
}

impl BulkFrame {
    /// The frame's name, for logs (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            BulkFrame::VcopyData(_) => "VcopyData",
            BulkFrame::ImageChunk(_) => "MigrImage",
        }
    }
}
