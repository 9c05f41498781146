//! IPC frames: M3-IPC calls between endpoints on different nodes, and the routing hints that
//! go with them.

use serde::{Deserialize, Serialize};

use crate::message::{Errno, Message, Timeout};
use crate::{DcId, Ep, NodeId};

/// What kind of call a [`Deliver`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliverKind {
    /// Plain rendezvous send: the destination node answers `Delivered` when taken.
    Send,
    /// First half of a sendrec: the answer is the `Reply`.
    SendRec,
}

/// A message from `src` (on the sending node) to `dst` (on the receiving node).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deliver {
    /// The sender's operation id (unique per sending node).
    pub op: u64,
    /// DC of both endpoints.
    pub dc: DcId,
    /// Sending endpoint.
    pub src: Ep,
    /// Receiving endpoint.
    pub dst: Ep,
    /// Send or the first half of a sendrec.
    pub kind: DeliverKind,
    /// The message.
    pub msg: Message,
    /// How long the sender waits for the message to be taken.
    pub timeout: Timeout,
}

/// Outcome of a [`Deliver`] of kind `Send` (or failure of a `SendRec` before it was taken).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delivered {
    /// The `Deliver`'s op.
    pub op: u64,
    /// Taken, or why not.
    pub result: Result<(), Errno>,
}

/// The sender gave up (timed out or died): drop `op` if it was not taken yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cancel {
    /// The `Deliver`'s op.
    pub op: u64,
}

/// The reply to a sendrec (or why there will be none).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// DC of both endpoints.
    pub dc: DcId,
    /// The replying server.
    pub src: Ep,
    /// The client that called.
    pub dst: Ep,
    /// The reply message, or why there is none.
    pub result: Result<Message, Errno>,
}

/// A notification from `src` to `dst`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notify {
    /// DC of both endpoints.
    pub dc: DcId,
    /// Notifying endpoint.
    pub src: Ep,
    /// Notified endpoint.
    pub dst: Ep,
    /// Bits OR'ed into the pending notification.
    pub value: u64,
}

/// Ask the node of `src` to read `len` bytes and stream them to the node of `dst`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcopyPull {
    /// The caller's operation id.
    pub op: u64,
    /// Node of the caller, which gets the `VcopyDone`.
    pub caller_node: NodeId,
    /// DC of the three endpoints.
    pub dc: DcId,
    /// Endpoint that called vcopy.
    pub caller: Ep,
    /// Endpoint read from.
    pub src: Ep,
    /// Address read from.
    pub src_addr: u64,
    /// Endpoint written to.
    pub dst: Ep,
    /// Address written to.
    pub dst_addr: u64,
    /// Bytes to copy.
    pub len: u64,
}

/// Outcome of a vcopy, sent to the caller's node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcopyDone {
    /// The caller's op.
    pub op: u64,
    /// Copied, or why not.
    pub result: Result<(), Errno>,
}

/// Endpoint `ep` of `dc` is now bound on the sending node (fast path; the directory is the
/// truth).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bound {
    /// DC of the endpoint.
    pub dc: DcId,
    /// The endpoint.
    pub ep: Ep,
}

/// Endpoint `ep` of `dc` is no longer bound on the sending node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unbound {
    /// DC of the endpoint.
    pub dc: DcId,
    /// The endpoint.
    pub ep: Ep,
}

/// The message `op` was not taken: its destination is migrating. Hold the call and send it
/// again once the migration's outcome is known.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Redirect {
    /// The `Deliver`'s op.
    pub op: u64,
    /// DC of the destination.
    pub dc: DcId,
    /// The migrating destination.
    pub dst: Ep,
}

/// An IPC frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum IpcFrame {
    /// See [`Deliver`].
    Deliver(Deliver),
    /// See [`Delivered`].
    Delivered(Delivered),
    /// See [`Cancel`].
    Cancel(Cancel),
    /// See [`Reply`].
    Reply(Reply),
    /// See [`Notify`].
    Notify(Notify),
    /// See [`VcopyPull`].
    VcopyPull(VcopyPull),
    /// See [`VcopyDone`].
    VcopyDone(VcopyDone),
    /// See [`Bound`].
    Bound(Bound),
    /// See [`Unbound`].
    Unbound(Unbound),
    /// See [`Redirect`].
    Redirect(Redirect),
}

impl IpcFrame {
    /// The frame's name, for logs (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            IpcFrame::Deliver(_) => "Deliver",
            IpcFrame::Delivered(_) => "Delivered",
            IpcFrame::Cancel(_) => "Cancel",
            IpcFrame::Reply(_) => "Reply",
            IpcFrame::Notify(_) => "Notify",
            IpcFrame::VcopyPull(_) => "VcopyPull",
            IpcFrame::VcopyDone(_) => "VcopyDone",
            IpcFrame::Bound(_) => "Bound",
            IpcFrame::Unbound(_) => "Unbound",
            IpcFrame::Redirect(_) => "Redirect",
        }
    }
}
