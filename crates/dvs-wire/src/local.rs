//! The local protocol: one application process (one bound endpoint) talks to its node kernel
//! over one Unix-socket connection. Each request gets exactly one response, in order.

use serde::{Deserialize, Serialize};

use crate::message::{Errno, Message, Timeout};
use crate::{DcId, Ep, NodeId};

/// Whom `receive` accepts a message from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// Any sender (pending notifications first).
    Any,
    /// Only this endpoint.
    Ep(Ep),
}

impl Source {
    /// Whether a message from `ep` matches.
    pub fn accepts(self, ep: Ep) -> bool {
        match self {
            Source::Any => true,
            Source::Ep(e) => e == ep,
        }
    }
}

/// A request from an application process to its node kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalRequest {
    /// Become endpoint `ep` of DC `dc` on this node. Must be the first request.
    Bind { version: u32, dc: DcId, ep: Ep },
    /// Give up the endpoint; the connection stays open but unbound.
    Unbind,
    /// Rendezvous send: completes when `dst` has taken the message.
    Send {
        dst: Ep,
        msg: Message,
        timeout: Timeout,
    },
    /// Receive from `src` (or any): pending notifications first, then queued senders.
    Receive { src: Source, timeout: Timeout },
    /// Send to `dst` then wait for its reply, atomically.
    SendRec {
        dst: Ep,
        msg: Message,
        timeout: Timeout,
    },
    /// Reply to `dst`, which must be waiting in `sendrec` on the caller. Never blocks.
    Reply { dst: Ep, msg: Message },
    /// Set a pending notification bit at `dst` (coalesces). Never blocks.
    Notify { dst: Ep, value: u64 },
    /// Copy `len` bytes from `src_addr` in `src`'s address space to `dst_addr` in `dst`'s.
    Vcopy {
        src: Ep,
        src_addr: u64,
        dst: Ep,
        dst_addr: u64,
        len: u64,
        timeout: Timeout,
    },
    /// Which endpoint this connection is bound to.
    GetEp,
    /// Wait until endpoint `ep` of the caller's DC is bound somewhere.
    WaitForBind { ep: Ep, timeout: Timeout },
    /// Bind as the destination of migration `migration` (cooperative restore): the node answers
    /// `Ep` once the migration commits, or closes the connection if it rolls back.
    BindRestored {
        version: u32,
        dc: DcId,
        ep: Ep,
        migration: u64,
    },
    /// The program's snapshot answering `LocalResponse::Checkpoint` (`None`: the program
    /// registered no snapshot hook, so it cannot migrate cooperatively).
    Snapshot { data: Option<Vec<u8>> },
}

/// The node kernel's answer to a [`LocalRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalResponse {
    /// The call completed.
    Done,
    /// The call completed with this message (receive, sendrec).
    Msg(Message),
    /// The endpoint of this connection, and the node it runs on.
    Ep { dc: DcId, ep: Ep, node: NodeId },
    /// The call failed.
    Err(Errno),
    /// Cooperative migration: take a snapshot with the program's hook and send it as
    /// `LocalRequest::Snapshot`, then wait for `Resume` or `Exit`.
    Checkpoint,
    /// Cooperative migration rolled back: issue the interrupted call again.
    Resume,
    /// Cooperative migration committed: the program continues on another node; exit now.
    Exit,
}
