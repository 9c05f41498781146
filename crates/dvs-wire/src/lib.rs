//! Wire formats of dvs.
//!
//! - [`message`]: the fixed-size M3-IPC message (64 bytes on the wire) and the IPC error codes.
//! - [`local`]: requests and responses between an application process and its node kernel.
//! - [`peer`]: frames exchanged by node kernels over a peer link.
//! - [`report`]: what a migration reports (phases, typed errors, figures).
//! - [`frame`]: the length-prefixed framing shared by both, with optional lz4 per frame.

pub mod frame;
pub mod local;
pub mod message;
pub mod peer;
pub mod report;

pub use frame::{FrameDecoder, FrameError, MAX_FRAME};
pub use message::{Errno, Message, Timeout, MSG_PAYLOAD, MSG_WIRE_SIZE};

/// Identifier of a distributed container (DC).
pub type DcId = u16;
/// Identifier of a node of the cluster.
pub type NodeId = u16;
/// Endpoint number inside a DC.
pub type Ep = i32;

/// Version of the peer-link and local protocols; a peer with another version is refused.
pub const PROTOCOL_VERSION: u32 = 4;
