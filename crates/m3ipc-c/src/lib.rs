//! `libm3ipc`: the M3-IPC calls of the DVK for C programs (and, through the shared library,
//! for Python), over the Rust library [`m3ipc`]. The header is `include/m3ipc.h`.
//!
//! A binding belongs to the thread that made it, as a DVK endpoint belongs to a task: each
//! thread holds its own [`m3ipc::Endpoint`] (its own connection to the node kernel), so
//! threads never share a connection and need no lock. Every entry point returns `>= 0` on
//! success or a negative `EDVS*` code ([`codes`]); none lets a panic cross into C (it becomes
//! [`codes::EDVSGENERIC`]), and none dereferences a null pointer (it becomes
//! [`codes::EDVSFAULT`]).

pub mod codes;
pub mod message;

use std::cell::RefCell;
use std::ffi::{c_void, CStr, CString};
use std::os::raw::{c_char, c_int, c_long};
use std::panic::{catch_unwind, AssertUnwindSafe};

use m3ipc::{DcId, Endpoint, Ep, Source, Timeout};

use codes::{error_code, EDVSFAULT, EDVSGENERIC, EDVSINVAL, EDVSNOTBIND, OK};
pub use message::CMessage;

/// `receive` from any sender (the DVK's and MINIX's value).
pub const ANY: c_int = 0x7ace;
/// No endpoint.
pub const NONE: c_int = 0x6ace;
/// The calling thread's own endpoint.
pub const SELF: c_int = 0x8ace;
/// Timeout: wait until the call completes.
pub const TIMEOUT_FOREVER: c_long = -1;
/// Timeout: fail with `EDVSTIMEDOUT` unless the call completes at once.
pub const TIMEOUT_NOWAIT: c_long = 0;

thread_local! {
    /// The calling thread's endpoint, once bound.
    static BOUND: RefCell<Option<Endpoint>> = const { RefCell::new(None) };
    /// Words on the last failure of this thread, for `dvs_last_error`.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Remembers what went wrong, for `dvs_last_error`.
fn set_last_error(text: String) {
    let c = CString::new(text.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

/// Runs one entry point: a panic becomes `EDVSGENERIC`, an error its code.
fn guard(f: impl FnOnce() -> Result<c_long, c_long>) -> c_long {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(code)) => code,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            set_last_error(format!("internal error in libm3ipc: {what}"));
            EDVSGENERIC as c_long
        }
    }
}

/// The code of a failed m3ipc call, with its words kept for `dvs_last_error`.
fn fail(e: m3ipc::Error) -> c_long {
    set_last_error(e.to_string());
    error_code(&e) as c_long
}

/// An invalid argument: `EDVSINVAL` with the reason.
fn invalid(why: &str) -> c_long {
    set_last_error(why.to_string());
    EDVSINVAL as c_long
}

/// Runs `f` on the calling thread's endpoint, or fails with `EDVSNOTBIND`.
fn with_ep<T>(f: impl FnOnce(&mut Endpoint) -> Result<T, c_long>) -> Result<T, c_long> {
    BOUND.with(|b| match b.borrow_mut().as_mut() {
        Some(ep) => f(ep),
        None => {
            set_last_error("this thread has not bound an endpoint (dvk_bind)".into());
            Err(EDVSNOTBIND as c_long)
        }
    })
}

/// The DVK's timeout in milliseconds as a [`Timeout`].
fn timeout(ms: c_long) -> Result<Timeout, c_long> {
    match ms {
        -1 => Ok(Timeout::Forever),
        0 => Ok(Timeout::NoWait),
        ms if ms > 0 => u32::try_from(ms)
            .map(Timeout::Millis)
            .map_err(|_| invalid("timeout larger than 2^32-1 ms")),
        _ => Err(invalid(
            "timeout below -1 (-1 waits forever, 0 does not wait)",
        )),
    }
}

/// A destination endpoint: `SELF` is the caller's own; `ANY` and `NONE` are refused.
fn target(ep: &Endpoint, e: c_int) -> Result<Ep, c_long> {
    match e {
        SELF => Ok(ep.ep()),
        ANY | NONE => Err(invalid("ANY or NONE where an endpoint is needed")),
        e => Ok(e),
    }
}

/// Reads the caller's message, refusing a null pointer.
///
/// # Safety
/// `m` is null or points to a readable `message`.
unsafe fn read_msg(m: *const CMessage) -> Result<m3ipc::Message, c_long> {
    if m.is_null() {
        set_last_error("null message pointer".into());
        return Err(EDVSFAULT as c_long);
    }
    Ok((*m).to_rust())
}

fn check_writable(m: *mut CMessage) -> Result<(), c_long> {
    if m.is_null() {
        set_last_error("null message pointer".into());
        return Err(EDVSFAULT as c_long);
    }
    Ok(())
}

fn dc_id(dcid: c_int) -> Result<DcId, c_long> {
    DcId::try_from(dcid).map_err(|_| invalid("DC number out of range"))
}

/// Binds `f()`'s endpoint to the calling thread, unless it holds one already.
fn bind_with(f: impl FnOnce() -> m3ipc::Result<Endpoint>) -> Result<c_long, c_long> {
    if BOUND.with(|b| b.borrow().is_some()) {
        set_last_error("this thread is already bound (dvk_unbind first)".into());
        return Err(codes::errno_code(m3ipc::Errno::ConnAlreadyBound) as c_long);
    }
    let ep = f().map_err(fail)?;
    let n = ep.ep() as c_long;
    BOUND.with(|b| *b.borrow_mut() = Some(ep));
    Ok(n)
}

/// Does nothing and returns 0: the DVK opened its device here; dvs connects at bind.
#[no_mangle]
pub extern "C" fn dvk_open() -> c_long {
    OK as c_long
}

/// Binds endpoint `ep` of DC `dcid` to the calling thread, through the node kernel whose
/// socket `DVS_SOCKET` names (set by `dvs run`). `ep == SELF` binds the endpoint `dvs run`
/// assigned (`DVS_DC`, `DVS_EP`; `dcid` is then ignored). Returns the endpoint.
#[no_mangle]
pub extern "C" fn dvk_bind(dcid: c_int, ep: c_int) -> c_long {
    guard(|| {
        if ep == SELF {
            return bind_with(Endpoint::from_env);
        }
        if ep == ANY || ep == NONE {
            return Err(invalid("ANY or NONE cannot be bound"));
        }
        let dc = dc_id(dcid)?;
        bind_with(|| Endpoint::bind(dc, ep))
    })
}

/// [`dvk_bind`] through the node kernel listening on the Unix socket `socket`.
///
/// # Safety
/// `socket` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn dvs_bind_at(socket: *const c_char, dcid: c_int, ep: c_int) -> c_long {
    guard(|| {
        if socket.is_null() {
            set_last_error("null socket path".into());
            return Err(EDVSFAULT as c_long);
        }
        let path = CStr::from_ptr(socket)
            .to_str()
            .map_err(|_| invalid("socket path is not UTF-8"))?
            .to_string();
        if ep == ANY || ep == NONE || ep == SELF {
            return Err(invalid("ANY, NONE or SELF cannot be bound at a socket"));
        }
        let dc = dc_id(dcid)?;
        bind_with(|| Endpoint::bind_at(path, dc, ep))
    })
}

/// Gives up the calling thread's endpoint `{dcid, ep}` and closes its connection.
#[no_mangle]
pub extern "C" fn dvk_unbind(dcid: c_int, ep: c_int) -> c_long {
    guard(|| {
        let bound = with_ep(|e| Ok((e.dc(), e.ep())))?;
        let want = (dc_id(dcid)?, if ep == SELF { bound.1 } else { ep });
        if want != bound {
            set_last_error(format!(
                "this thread is bound to dc {} ep {}, not dc {} ep {}",
                bound.0, bound.1, want.0, want.1
            ));
            return Err(codes::errno_code(m3ipc::Errno::Permission) as c_long);
        }
        let e = BOUND.with(|b| b.borrow_mut().take()).expect("bound above");
        e.unbind().map_err(fail)?;
        Ok(OK as c_long)
    })
}

/// The endpoint of process `pid`: only the caller's own (`pid` 0, `SELF`, its pid or its
/// thread id); it asks the node kernel, so it also tells that the binding still works.
#[no_mangle]
pub extern "C" fn dvk_getep(pid: c_int) -> c_long {
    guard(|| {
        // SAFETY: getpid and gettid have no preconditions.
        let (me, tid) = unsafe { (libc::getpid(), libc::gettid()) };
        if pid != 0 && pid != SELF && pid != me && pid != tid {
            return Err(invalid("dvk_getep answers for the calling thread only"));
        }
        with_ep(|e| e.getep().map(|(_, ep, _)| ep as c_long).map_err(fail))
    })
}

/// Where the calling thread's endpoint is: its DC, endpoint and the node it runs on now
/// (it changes after a migration). Null pointers are skipped.
///
/// # Safety
/// Each pointer is null or points to a writable `int`.
#[no_mangle]
pub unsafe extern "C" fn dvs_getep(dcid: *mut c_int, ep: *mut c_int, node: *mut c_int) -> c_long {
    guard(|| {
        let (d, e, n) = with_ep(|e| e.getep().map_err(fail))?;
        for (p, v) in [(dcid, d as c_int), (ep, e), (node, n as c_int)] {
            if !p.is_null() {
                *p = v;
            }
        }
        Ok(OK as c_long)
    })
}

/// Rendezvous send of `*m` to `dst`: returns once `dst` has taken it.
///
/// # Safety
/// `m` is null or points to a readable `message`.
#[no_mangle]
pub unsafe extern "C" fn dvk_send_T(dst: c_int, m: *const CMessage, timeout_ms: c_long) -> c_long {
    guard(|| {
        let msg = read_msg(m)?;
        let t = timeout(timeout_ms)?;
        with_ep(|e| {
            let dst = target(e, dst)?;
            e.send_timeout(dst, &msg, t).map_err(fail)?;
            Ok(OK as c_long)
        })
    })
}

/// Receives into `*m` from `src` or `ANY`: pending notifications first, then queued senders.
///
/// # Safety
/// `m` is null or points to a writable `message`.
#[no_mangle]
pub unsafe extern "C" fn dvk_receive_T(src: c_int, m: *mut CMessage, timeout_ms: c_long) -> c_long {
    guard(|| {
        check_writable(m)?;
        let t = timeout(timeout_ms)?;
        let got = with_ep(|e| {
            let from = match src {
                ANY => Source::Any,
                other => Source::Ep(target(e, other)?),
            };
            e.receive_timeout(from, t).map_err(fail)
        })?;
        *m = CMessage::from_rust(&got);
        Ok(OK as c_long)
    })
}

/// Sends `*m` to `dst` and waits for the reply, which overwrites `*m`.
///
/// # Safety
/// `m` is null or points to a readable and writable `message`.
#[no_mangle]
pub unsafe extern "C" fn dvk_sendrec_T(dst: c_int, m: *mut CMessage, timeout_ms: c_long) -> c_long {
    guard(|| {
        let msg = read_msg(m)?;
        let t = timeout(timeout_ms)?;
        let got = with_ep(|e| {
            let dst = target(e, dst)?;
            e.sendrec_timeout(dst, &msg, t).map_err(fail)
        })?;
        *m = CMessage::from_rust(&got);
        Ok(OK as c_long)
    })
}

/// Replies `*m` to `dst`, which must be waiting in `sendrec` on the caller. Never blocks;
/// `timeout_ms` is checked and otherwise unused.
///
/// # Safety
/// `m` is null or points to a readable `message`.
#[no_mangle]
pub unsafe extern "C" fn dvk_reply_T(dst: c_int, m: *const CMessage, timeout_ms: c_long) -> c_long {
    guard(|| {
        let msg = read_msg(m)?;
        timeout(timeout_ms)?;
        with_ep(|e| {
            let dst = target(e, dst)?;
            e.reply(dst, &msg).map_err(fail)?;
            Ok(OK as c_long)
        })
    })
}

/// Sets a pending notification of the caller at `dst`; `src` must be `SELF` or the
/// caller's endpoint. The receiver gets a message of type `NOTIFY_MTYPE` with `value` in
/// `m_word[0]`. Never blocks.
#[no_mangle]
pub extern "C" fn dvk_notify_X(src: c_int, dst: c_int, value: c_int) -> c_long {
    guard(|| {
        with_ep(|e| {
            if src != SELF && src != e.ep() {
                set_last_error("a thread notifies only as its own endpoint".into());
                return Err(codes::errno_code(m3ipc::Errno::Permission) as c_long);
            }
            let dst = target(e, dst)?;
            e.notify(dst, value as u32 as u64).map_err(fail)?;
            Ok(OK as c_long)
        })
    })
}

/// [`dvk_notify_X`] with a 64-bit value, as the caller.
#[no_mangle]
pub extern "C" fn dvs_notify(dst: c_int, value: u64) -> c_long {
    guard(|| {
        with_ep(|e| {
            let dst = target(e, dst)?;
            e.notify(dst, value).map_err(fail)?;
            Ok(OK as c_long)
        })
    })
}

/// Copies `bytes` bytes from `src_addr` in `src_ep`'s process to `dst_addr` in `dst_ep`'s
/// (`SELF` for the caller). Every party other than the caller must be blocked in IPC.
#[no_mangle]
pub extern "C" fn dvk_vcopy(
    src_ep: c_int,
    src_addr: *const c_void,
    dst_ep: c_int,
    dst_addr: *mut c_void,
    bytes: c_int,
) -> c_long {
    dvs_vcopy_T(
        src_ep,
        src_addr,
        dst_ep,
        dst_addr,
        bytes as c_long,
        TIMEOUT_FOREVER,
    )
}

/// [`dvk_vcopy`] with a `long` size and a timeout.
#[no_mangle]
pub extern "C" fn dvs_vcopy_T(
    src_ep: c_int,
    src_addr: *const c_void,
    dst_ep: c_int,
    dst_addr: *mut c_void,
    bytes: c_long,
    timeout_ms: c_long,
) -> c_long {
    guard(|| {
        if bytes < 0 {
            return Err(invalid("negative vcopy size"));
        }
        if src_addr.is_null() || dst_addr.is_null() {
            set_last_error("null vcopy address".into());
            return Err(EDVSFAULT as c_long);
        }
        let t = timeout(timeout_ms)?;
        with_ep(|e| {
            let (src, dst) = (target(e, src_ep)?, target(e, dst_ep)?);
            // The node kernel reads and writes the buffers with process_vm_readv/writev while
            // this call blocks, and answers EDVSFAULT for any byte outside mapped memory.
            e.vcopy_timeout(src, src_addr as u64, dst, dst_addr as u64, bytes as u64, t)
                .map_err(fail)?;
            Ok(OK as c_long)
        })
    })
}

/// Waits until the calling thread is bound and returns its endpoint. A thread that is not
/// bound yet binds the endpoint `dvs run` assigned (`DVS_DC`, `DVS_EP`); without that
/// environment nothing else can bind it, so the call fails with `EDVSNOTBIND` at once.
#[no_mangle]
pub extern "C" fn dvk_wait4bind_T(timeout_ms: c_long) -> c_long {
    guard(|| {
        timeout(timeout_ms)?;
        if let Some(ep) = BOUND.with(|b| b.borrow().as_ref().map(|e| e.ep() as c_long)) {
            return Ok(ep);
        }
        if std::env::var_os(m3ipc::ENV_EP).is_none() {
            set_last_error("not bound, and DVS_EP is not set (not started by dvs run)".into());
            return Err(EDVSNOTBIND as c_long);
        }
        bind_with(Endpoint::from_env)
    })
}

/// Waits until endpoint `ep` of the caller's DC is bound somewhere in the cluster.
#[no_mangle]
pub extern "C" fn dvs_wait4bind_T(ep: c_int, timeout_ms: c_long) -> c_long {
    guard(|| {
        let t = timeout(timeout_ms)?;
        with_ep(|e| {
            let ep = target(e, ep)?;
            e.wait_for_bind(ep, t).map_err(fail)?;
            Ok(OK as c_long)
        })
    })
}

/// The text of error code `code` (a static string; "unknown error code" for others).
#[no_mangle]
pub extern "C" fn dvk_strerror(code: c_int) -> *const c_char {
    let text = match code {
        0 => "success\0",
        c => codes::lookup(c).map_or("unknown error code\0", |c| c.text),
    };
    text.as_ptr().cast()
}

/// Words on the calling thread's last failure (valid until its next failing call).
#[no_mangle]
pub extern "C" fn dvs_last_error() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_without_a_binding_fail_with_edvsnotbind() {
        let mut m = CMessage::from_rust(&m3ipc::Message::new(1));
        // SAFETY: `m` is a valid message.
        unsafe {
            assert_eq!(dvk_send_T(1, &m, -1), EDVSNOTBIND as c_long);
            assert_eq!(dvk_sendrec_T(1, &mut m, -1), EDVSNOTBIND as c_long);
        }
        assert_eq!(dvk_getep(0), EDVSNOTBIND as c_long);
    }

    #[test]
    fn null_pointers_and_bad_arguments_are_codes() {
        // SAFETY: null is allowed and refused.
        unsafe {
            assert_eq!(dvk_send_T(1, std::ptr::null(), -1), EDVSFAULT as c_long);
            assert_eq!(
                dvk_receive_T(ANY, std::ptr::null_mut(), -1),
                EDVSFAULT as c_long
            );
            assert_eq!(dvs_bind_at(std::ptr::null(), 0, 1), EDVSFAULT as c_long);
        }
        let mut b = [0u8; 4];
        let p = b.as_mut_ptr().cast();
        assert_eq!(dvk_vcopy(1, p, 2, p, -1), EDVSINVAL as c_long);
        assert_eq!(dvk_vcopy(1, std::ptr::null(), 2, p, 1), EDVSFAULT as c_long);
        let m = CMessage::from_rust(&m3ipc::Message::new(1));
        // SAFETY: `m` is a valid message.
        assert_eq!(unsafe { dvk_send_T(1, &m, -2) }, EDVSINVAL as c_long);
        assert_eq!(dvk_bind(0, ANY), EDVSINVAL as c_long);
    }

    #[test]
    fn strerror_knows_every_code() {
        for c in codes::CODES {
            // SAFETY: dvk_strerror returns a static NUL-terminated string.
            let s = unsafe { CStr::from_ptr(dvk_strerror(c.value)) };
            assert_eq!(s.to_str().unwrap(), c.text.trim_end_matches('\0'));
        }
        // SAFETY: as above.
        let s = unsafe { CStr::from_ptr(dvk_strerror(-4)) };
        assert_eq!(s.to_str().unwrap(), "unknown error code");
    }

    #[test]
    fn a_panic_becomes_edvsgeneric() {
        assert_eq!(guard(|| panic!("boom")), EDVSGENERIC as c_long);
        // SAFETY: dvs_last_error returns a valid NUL-terminated string.
        let s = unsafe { CStr::from_ptr(dvs_last_error()) };
        assert!(s.to_str().unwrap().contains("boom"));
    }
}
