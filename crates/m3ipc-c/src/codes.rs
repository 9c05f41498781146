//! The error codes of the C API: negative `EDVS*` values, one per [`Errno`] and three for what
//! only the library sees (a lost node kernel connection, a missing `dvs run` environment, an
//! internal failure).
//!
//! The names and values are the DVK's own (its `dvs_errno.h`: POSIX-like codes at their
//! MINIX numbers, message-passing codes from -101, the DVS's from -301), so that a DVK program
//! that compares against them ports by recompiling. Errors the DVK has no code for (an
//! endpoint of another DC, a thread bound twice, a reply nobody waits for, a send to oneself)
//! take values from -360 on, past the DVK's last. Every value is distinct, so a code always
//! maps back to one [`Errno`].

use m3ipc::Errno;

/// One error code: its C name, value and text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Code {
    /// The C macro's name, e.g. `EDVSTIMEDOUT`.
    pub name: &'static str,
    /// Its (negative) value.
    pub value: i32,
    /// What `dvk_strerror` returns for it (NUL-terminated for C).
    pub text: &'static str,
    /// The IPC error it stands for, `None` for the library's own codes.
    pub errno: Option<Errno>,
}

/// Success.
pub const OK: i32 = 0;
/// An internal failure of the library (a panic caught at the C boundary).
pub const EDVSGENERIC: i32 = -99;
/// The connection to the node kernel failed or is unusable after an earlier failure.
pub const EDVSIO: i32 = -5;
/// Invalid argument (bad timeout, negative size, `ANY` where an endpoint is needed, missing
/// `dvs run` environment).
pub const EDVSINVAL: i32 = -22;
/// A null or unmapped address.
pub const EDVSFAULT: i32 = -14;
/// The calling thread has not bound an endpoint.
pub const EDVSNOTBIND: i32 = -310;

macro_rules! codes {
    ($( $name:ident = $value:expr, $errno:expr, $text:literal; )*) => {
        /// Every error code of the C API, in the order of the header.
        pub const CODES: &[Code] = &[
            $( Code { name: stringify!($name), value: $value, text: concat!($text, "\0"), errno: $errno }, )*
        ];
    };
}

codes! {
    EDVSGENERIC = EDVSGENERIC, None, "internal error in the M3-IPC library";
    EDVSPERM = -1, Some(Errno::Permission), "permission denied";
    EDVSIO = EDVSIO, None, "the connection to the node kernel failed";
    EDVS2BIG = -7, Some(Errno::TooBig), "request too large";
    EDVSAGAIN = -11, Some(Errno::DirectoryUnavailable), "the cluster directory is unavailable; try again";
    EDVSFAULT = EDVSFAULT, Some(Errno::BadAddress), "bad address";
    EDVSBUSY = -16, Some(Errno::Busy), "endpoint busy";
    EDVSINVAL = EDVSINVAL, Some(Errno::Invalid), "invalid argument";
    EDVSNOSPC = -28, Some(Errno::QueueFull), "queue full";
    EDVSDEADLK = -35, Some(Errno::Deadlock), "call would deadlock";
    EDVSTIMEDOUT = -61, Some(Errno::TimedOut), "timed out";
    EDVSSHUTDOWN = -65, Some(Errno::Shutdown), "node kernel shutting down";
    EDVSNOTBIND = EDVSNOTBIND, Some(Errno::NotBound), "the caller is not bound to an endpoint";
    EDVSENDPOINT = -306, Some(Errno::NoSuchEndpoint), "no such endpoint";
    EDVSBADSRCDST = -103, Some(Errno::BadEndpoint), "endpoint number out of range for this DC";
    EDVSBADDCID = -302, Some(Errno::NoSuchDc), "no such DC";
    EDVSOTHERDC = -360, Some(Errno::OtherDc), "endpoint belongs to another DC";
    EDVSNODCNODE = -319, Some(Errno::NodeNotInDc), "this node is not part of the DC";
    EDVSSLOTUSED = -337, Some(Errno::AlreadyBound), "endpoint already bound";
    EDVSBOUND = -361, Some(Errno::ConnAlreadyBound), "this thread is already bound";
    EDVSDSTDIED = -109, Some(Errno::DstDied), "destination died";
    EDVSSRCDIED = -108, Some(Errno::SrcDied), "source died";
    EDVSNOTREPLY = -362, Some(Errno::NotWaiting), "destination is not waiting for a reply from the caller";
    EDVSNOPROXY = -307, Some(Errno::NodeUnreachable), "the peer's node is unreachable";
    EDVSSELFSEND = -363, Some(Errno::SelfSend), "an endpoint cannot send to itself";
}

/// The code of an IPC error. Exhaustive, so that a new [`Errno`] cannot be forgotten here.
pub fn errno_code(e: Errno) -> i32 {
    match e {
        Errno::NotBound => EDVSNOTBIND,
        Errno::NoSuchEndpoint => -306,
        Errno::BadEndpoint => -103,
        Errno::NoSuchDc => -302,
        Errno::OtherDc => -360,
        Errno::NodeNotInDc => -319,
        Errno::AlreadyBound => -337,
        Errno::ConnAlreadyBound => -361,
        Errno::DstDied => -109,
        Errno::SrcDied => -108,
        Errno::TimedOut => -61,
        Errno::Busy => -16,
        Errno::Permission => -1,
        Errno::NotWaiting => -362,
        Errno::NodeUnreachable => -307,
        Errno::SelfSend => -363,
        Errno::Deadlock => -35,
        Errno::BadAddress => EDVSFAULT,
        Errno::TooBig => -7,
        Errno::Invalid => EDVSINVAL,
        Errno::Shutdown => -65,
        Errno::QueueFull => -28,
        Errno::DirectoryUnavailable => -11,
    }
}

/// The code of a library error: its IPC code, or [`EDVSIO`] for a failed connection, or
/// [`EDVSINVAL`] for a missing or malformed `dvs run` environment.
pub fn error_code(e: &m3ipc::Error) -> i32 {
    match e {
        m3ipc::Error::Ipc(errno) => errno_code(*errno),
        m3ipc::Error::Io(_) | m3ipc::Error::Protocol(_) => EDVSIO,
        m3ipc::Error::Env(_) => EDVSINVAL,
    }
}

/// The entry of `value`, if it is one of the codes.
pub fn lookup(value: i32) -> Option<&'static Code> {
    CODES.iter().find(|c| c.value == value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_errno_has_one_code_that_maps_back() {
        let all = Errno::ALL;
        for e in all {
            let code = lookup(errno_code(e)).unwrap_or_else(|| panic!("{e:?} has no entry"));
            assert_eq!(code.errno, Some(e), "{}", code.name);
        }
        // Every Errno plus the two codes only the library produces.
        assert_eq!(CODES.len(), all.len() + 2);
    }

    #[test]
    fn codes_are_distinct_negative_and_nul_terminated() {
        for (i, a) in CODES.iter().enumerate() {
            assert!(a.value < 0, "{}", a.name);
            assert!(a.text.ends_with('\0') && !a.text[..a.text.len() - 1].contains('\0'));
            for b in &CODES[i + 1..] {
                assert_ne!(a.value, b.value, "{} and {}", a.name, b.name);
                assert_ne!(a.name, b.name);
            }
        }
    }
}
