//! `criu swrk`: a criu process that serves one RPC request on a socket. Starting criu (the
//! dynamic loader, its libraries, option and kernel-feature set-up) costs several
//! milliseconds; a worker started ahead of the request pays that before the process freezes
//! instead of while it is frozen.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message;

use super::rpc::{Req, ReqType, Resp};
use crate::CheckpointError;

/// The largest answer criu sends (a `criu_resp` is a few dozen bytes; this leaves room).
const MAX_RESP: usize = 64 * 1024;

/// How long a request may take before the worker is killed: a dump or restore of the largest
/// image a node moves takes seconds, never minutes.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// A `criu swrk` process waiting for its one request.
///
/// Dropping a worker that served nothing kills it.
#[derive(Debug)]
pub struct CriuWorker {
    child: Option<Child>,
    sock: OwnedFd,
    /// Descriptors the worker inherited at their numbers, kept open here until the request is
    /// served (criu refers to them by number in the request).
    inherited: Vec<OwnedFd>,
    bin: PathBuf,
    started: Instant,
}

impl CriuWorker {
    /// Starts `bin swrk FD` on one end of a `SOCK_SEQPACKET` pair. Each of `inherit` is open in
    /// the worker at the same number as here.
    pub(crate) fn spawn(bin: &Path, inherit: Vec<OwnedFd>) -> Result<CriuWorker, CheckpointError> {
        let raw: Vec<RawFd> = inherit.iter().map(|f| f.as_raw_fd()).collect();
        let mut w = CriuWorker::spawn_borrowing(bin, &raw)?;
        w.inherited = inherit;
        Ok(w)
    }

    /// [`CriuWorker::spawn`] with descriptors the caller keeps open (and owns) until the
    /// request is served.
    pub(crate) fn spawn_borrowing(
        bin: &Path,
        fds: &[RawFd],
    ) -> Result<CriuWorker, CheckpointError> {
        let (ours, theirs) =
            seqpacket_pair().map_err(|e| CheckpointError::io("socketpair for criu swrk", e))?;
        let mut keep: Vec<RawFd> = fds.to_vec();
        keep.push(theirs.as_raw_fd());
        let mut cmd = Command::new(bin);
        cmd.args([
            OsString::from("swrk"),
            theirs.as_raw_fd().to_string().into(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: the closure runs between fork and exec and only calls fcntl(2), which is
        // async-signal-safe; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| CheckpointError::Spawn {
            what: "criu swrk",
            bin: bin.to_path_buf(),
            source,
        })?;
        drop(theirs);
        Ok(CriuWorker {
            child: Some(child),
            sock: ours,
            inherited: Vec::new(),
            bin: bin.to_path_buf(),
            started: Instant::now(),
        })
    }

    /// The worker's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How long ago it was started.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// The numbers (here and in the worker) of the descriptors it inherited, in the order
    /// given to [`crate::Criu::spawn_worker`].
    pub fn inherited_fds(&self) -> Vec<RawFd> {
        self.inherited.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Sends `req` and waits for criu's answer, then for the worker to exit (it serves one
    /// request). `Err` only when the exchange itself failed (the worker died, or answered
    /// nothing parsable); a request criu refused comes back as `Ok` with `success: false`.
    pub(crate) fn call(mut self, what: &'static str, req: &Req) -> Result<Resp, CheckpointError> {
        let bytes = req.encode_to_vec();
        send_packet(&self.sock, &bytes).map_err(|e| self.died(what, e))?;
        let resp = loop {
            let packet =
                recv_packet(&self.sock, REQUEST_TIMEOUT).map_err(|e| self.died(what, e))?;
            let resp = Resp::decode(packet.as_slice()).map_err(|e| {
                self.died(
                    what,
                    io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
                )
            })?;
            // Notifications are sent only to a caller that asked for them; skip any anyway.
            if resp.r#type != ReqType::Notify as i32 {
                break resp;
            }
        };
        self.reap();
        Ok(resp)
    }

    fn died(&mut self, what: &'static str, e: io::Error) -> CheckpointError {
        let status = self.reap();
        CheckpointError::io(
            format!("{what} through `{} swrk` ({status})", self.bin.display()),
            e,
        )
    }

    /// Waits for the worker to exit (killing it if it does not within a second: it has
    /// answered, or failed); returns how it ended, in words.
    fn reap(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return "already reaped".into();
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                _ => {
                    let _ = child.kill();
                    return child
                        .wait()
                        .map_or_else(|e| e.to_string(), |s| format!("killed, {s}"));
                }
            }
        }
    }
}

impl Drop for CriuWorker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array on success.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn send_packet(sock: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: the buffer is valid for its length; MSG_NOSIGNAL turns a dead peer into EPIPE.
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != bytes.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short packet"));
    }
    Ok(())
}

fn recv_packet(sock: &OwnedFd, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_RESP];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ));
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            continue;
        }
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "criu closed its socket without an answer",
            ));
        }
        buf.truncate(n as usize);
        return Ok(buf);
    }
}
