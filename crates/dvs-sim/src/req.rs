//! Local requests under short names, for tests.

use dvs_wire::local::{LocalRequest, Source};
use dvs_wire::{DcId, Ep, Message, Timeout, PROTOCOL_VERSION};

/// Wait without end.
pub const FOREVER: Timeout = Timeout::Forever;
/// Do not wait.
pub const NOWAIT: Timeout = Timeout::NoWait;

/// A message of type `mtype`, all words zero.
pub fn msg(mtype: i32) -> Message {
    Message::new(mtype)
}

/// Bind `{dc, ep}`.
pub fn bind(dc: DcId, ep: Ep) -> LocalRequest {
    LocalRequest::Bind {
        version: PROTOCOL_VERSION,
        dc,
        ep,
    }
}

/// Send a message of type `mtype` to `dst`.
pub fn send(dst: Ep, mtype: i32, timeout: Timeout) -> LocalRequest {
    LocalRequest::Send {
        dst,
        msg: msg(mtype),
        timeout,
    }
}

/// Send a message of type `mtype` to `dst` and wait for the reply.
pub fn sendrec(dst: Ep, mtype: i32, timeout: Timeout) -> LocalRequest {
    LocalRequest::SendRec {
        dst,
        msg: msg(mtype),
        timeout,
    }
}

/// Receive from `src`.
pub fn recv(src: Source, timeout: Timeout) -> LocalRequest {
    LocalRequest::Receive { src, timeout }
}

/// Receive from anyone, without end.
pub fn any() -> LocalRequest {
    recv(Source::Any, Timeout::Forever)
}

/// Receive from `ep`, without end.
pub fn from(ep: Ep) -> LocalRequest {
    recv(Source::Ep(ep), Timeout::Forever)
}

/// Reply to `dst` with a message of type `mtype`.
pub fn reply(dst: Ep, mtype: i32) -> LocalRequest {
    LocalRequest::Reply {
        dst,
        msg: msg(mtype),
    }
}

/// Notify `dst` with `value`.
pub fn notify(dst: Ep, value: u64) -> LocalRequest {
    LocalRequest::Notify { dst, value }
}

/// Wait until `ep` is bound somewhere.
pub fn wait_bind(ep: Ep, timeout: Timeout) -> LocalRequest {
    LocalRequest::WaitForBind { ep, timeout }
}
