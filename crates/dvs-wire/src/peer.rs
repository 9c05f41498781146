//! Frames exchanged by node kernels over a peer link (one TCP connection per node pair).

use serde::{Deserialize, Serialize};

use crate::message::{Errno, Message, Timeout};
use crate::{DcId, Ep, NodeId};

/// What kind of call a [`PeerFrame::Deliver`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliverKind {
    /// Plain rendezvous send: the destination node answers `Delivered` when taken.
    Send,
    /// First half of a sendrec: the answer is the `Reply`.
    SendRec,
}

/// A frame on a peer link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
}
