//! M3-IPC for applications: a small blocking API over the node kernel's local socket.
//!
//! A process binds an [`Endpoint`] of a distributed container (DC) and then uses the M3-IPC
//! calls on it: [`send`](Endpoint::send), [`receive`](Endpoint::receive),
//! [`sendrec`](Endpoint::sendrec), [`reply`](Endpoint::reply), [`notify`](Endpoint::notify) and
//! [`vcopy`](Endpoint::vcopy). Each bound endpoint owns one Unix-socket connection to its node
//! kernel; every call is one request frame answered by exactly one response frame.
//!
//! The library works from plain threads (no async runtime). It keeps no state about the
//! connection beyond the endpoint identity that [`Endpoint::getep`] refreshes, because after a
//! migration the socket is replaced underneath the process by a connection to another node
//! kernel.
//!
//! ```no_run
//! use m3ipc::{Endpoint, Message, Source};
//! let mut ep = Endpoint::from_env()?;
//! let req = ep.receive(Source::Any)?;
//! ep.reply(req.source, &Message::new(2))?;
//! # Ok::<(), m3ipc::Error>(())
//! ```

use std::fmt;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use bytes::BytesMut;
use dvs_wire::frame::{self, FrameDecoder};
use dvs_wire::local::{LocalRequest, LocalResponse};
use dvs_wire::PROTOCOL_VERSION;

pub use dvs_wire::local::Source;
pub use dvs_wire::message::NOTIFY_MTYPE;
pub use dvs_wire::{DcId, Ep, Errno, Message, NodeId, Timeout, MSG_PAYLOAD};

/// Environment variable holding the path of the node kernel's local socket.
pub const ENV_SOCKET: &str = "DVS_SOCKET";
/// Environment variable holding the DC number the process should bind in.
pub const ENV_DC: &str = "DVS_DC";
/// Environment variable holding the endpoint number the process should bind.
pub const ENV_EP: &str = "DVS_EP";

/// How many bytes one `read` asks for; a response frame is under 100 bytes.
const READ_CHUNK: usize = 512;
/// Initial capacity of the request buffer, enough for every request so it never grows.
const WRITE_CAPACITY: usize = 256;

/// Errors of the M3-IPC library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node kernel refused or failed the call with this IPC error code.
    #[error("{0}")]
    Ipc(Errno),
    /// The connection to the node kernel failed (connecting, reading or writing).
    #[error("{0}")]
    Io(std::io::Error),
    /// The node kernel answered something that does not follow the local protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A required environment variable is missing or malformed.
    #[error("{0}")]
    Env(String),
}

impl Error {
    /// The IPC error code, if this is an [`Error::Ipc`].
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Ipc(e) => Some(*e),
            _ => None,
        }
    }

    /// Whether the connection to the node kernel is unusable after this error (as opposed to
    /// one call failing with an IPC error code).
    pub fn is_connection_error(&self) -> bool {
        matches!(self, Error::Io(_) | Error::Protocol(_))
    }
}

impl From<Errno> for Error {
    fn from(e: Errno) -> Self {
        Error::Ipc(e)
    }
}

/// Result of M3-IPC calls.
pub type Result<T> = std::result::Result<T, Error>;

/// An endpoint bound by this process: its connection to the node kernel and its identity.
pub struct Endpoint {
    stream: UnixStream,
    dc: DcId,
    ep: Ep,
    node: NodeId,
    /// Reused for every request so the hot path does not allocate.
    wbuf: BytesMut,
    /// Reused for every response; empty between calls (no partial frame outlives a call).
    dec: FrameDecoder,
    /// Set after an I/O or protocol error in the middle of a call: the stream position is
    /// unknown, so a later response could be attributed to the wrong call.
    broken: bool,
    /// Cooperative migration: produces the program's state when the node asks for it.
    snapshot_hook: Option<SnapshotHook>,
    /// Cooperative migration: the state this process was restored from, until taken.
    restored: Option<Vec<u8>>,
}

/// A program's snapshot hook for cooperative migration.
pub type SnapshotHook = Box<dyn FnMut() -> Vec<u8> + Send>;

/// Environment variable naming the migration a cooperatively restored process belongs to.
pub const ENV_RESTORE_MIGRATION: &str = "DVS_RESTORE_MIGRATION";
/// Environment variable naming the file holding the snapshot to restore from.
pub const ENV_RESTORE_FILE: &str = "DVS_RESTORE_FILE";

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("dc", &self.dc)
            .field("ep", &self.ep)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Connects to the node kernel whose socket path is in `DVS_SOCKET` and binds endpoint
    /// `ep` of DC `dc`.
    pub fn bind(dc: DcId, ep: Ep) -> Result<Endpoint> {
        let socket = env_var(ENV_SOCKET)?;
        Self::bind_at(socket, dc, ep)
    }

    /// Connects to the node kernel listening on `socket` and binds endpoint `ep` of DC `dc`.
    pub fn bind_at(socket: impl AsRef<Path>, dc: DcId, ep: Ep) -> Result<Endpoint> {
        let path = socket.as_ref();
        let stream = UnixStream::connect(path).map_err(|e| {
            Error::Io(io::Error::new(
                e.kind(),
                format!(
                    "cannot connect to the node kernel at {}: {e}",
                    path.display()
                ),
            ))
        })?;
        Self::bind_stream(stream, dc, ep)
    }

    /// A connection not bound yet (the bind request is sent by the caller).
    fn unbound(stream: UnixStream, dc: DcId, ep: Ep, restored: Option<Vec<u8>>) -> Endpoint {
        Endpoint {
            stream,
            dc,
            ep,
            node: 0,
            wbuf: BytesMut::with_capacity(WRITE_CAPACITY),
            dec: FrameDecoder::new(),
            broken: false,
            snapshot_hook: None,
            restored,
        }
    }

    /// Binds endpoint `ep` of DC `dc` over an already connected stream to a node kernel
    /// (e.g. one inherited from a launcher).
    pub fn bind_stream(stream: UnixStream, dc: DcId, ep: Ep) -> Result<Endpoint> {
        let me = Self::unbound(stream, dc, ep, None);
        let req = LocalRequest::Bind {
            version: PROTOCOL_VERSION,
            dc,
            ep,
        };
        me.finish_bind(req)
    }

    /// Binds as the destination of a cooperative migration: the node answers once the
    /// migration commits; the snapshot is then available from [`Endpoint::take_restored`].
    fn bind_restored(
        stream: UnixStream,
        dc: DcId,
        ep: Ep,
        migration: u64,
        snapshot: Vec<u8>,
    ) -> Result<Endpoint> {
        let me = Self::unbound(stream, dc, ep, Some(snapshot));
        let req = LocalRequest::BindRestored {
            version: PROTOCOL_VERSION,
            dc,
            ep,
            migration,
        };
        me.finish_bind(req)
    }

    fn finish_bind(mut self, req: LocalRequest) -> Result<Endpoint> {
        let (dc, ep) = (self.dc, self.ep);
        let me = &mut self;
        match me.call(&req)? {
            LocalResponse::Ep {
                dc: got_dc,
                ep: got_ep,
                node,
            } if got_dc == dc && got_ep == ep => {
                me.node = node;
                Ok(self)
            }
            LocalResponse::Ep {
                dc: got_dc,
                ep: got_ep,
                ..
            } => Err(Error::Protocol(format!(
                "asked to bind dc {dc} ep {ep}, the node kernel bound dc {got_dc} ep {got_ep}"
            ))),
            LocalResponse::Err(e) => Err(Error::Ipc(e)),
            other => Err(unexpected("bind", &other)),
        }
    }

    /// Binds the endpoint that `dvs run` assigned to this process: socket path, DC and
    /// endpoint from `DVS_SOCKET`, `DVS_DC` and `DVS_EP`.
    pub fn from_env() -> Result<Endpoint> {
        let socket = env_var(ENV_SOCKET)?;
        let dc = env_parse::<DcId>(ENV_DC)?;
        let ep = env_parse::<Ep>(ENV_EP)?;
        if let Ok(migration) = env_parse::<u64>(ENV_RESTORE_MIGRATION) {
            let file = env_var(ENV_RESTORE_FILE)?;
            let snapshot = std::fs::read(&file).map_err(|e| {
                Error::Env(format!(
                    "cannot read the snapshot {file} named by {ENV_RESTORE_FILE}: {e}"
                ))
            })?;
            let stream = UnixStream::connect(&socket).map_err(|e| {
                Error::Io(io::Error::new(
                    e.kind(),
                    format!("cannot connect to the node kernel at {socket}: {e}"),
                ))
            })?;
            return Self::bind_restored(stream, dc, ep, migration, snapshot);
        }
        Self::bind_at(socket, dc, ep)
    }

    /// Registers the hook that produces this program's state for a cooperative migration.
    /// It runs inside whatever blocking call the node interrupts (typically `receive`); the
    /// program restarted on the destination gets the bytes from [`Endpoint::take_restored`].
    pub fn set_snapshot_hook(&mut self, hook: impl FnMut() -> Vec<u8> + Send + 'static) {
        self.snapshot_hook = Some(Box::new(hook));
    }

    /// The snapshot this process was restored from (cooperative migration), once.
    pub fn take_restored(&mut self) -> Option<Vec<u8>> {
        self.restored.take()
    }

    /// The DC this endpoint belongs to.
    pub fn dc(&self) -> DcId {
        self.dc
    }

    /// The endpoint number.
    pub fn ep(&self) -> Ep {
        self.ep
    }

    /// The node this endpoint ran on when last asked (at bind or by [`getep`](Self::getep)).
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Asks the node kernel which endpoint this connection is bound to and on which node it
    /// runs now (it changes after a migration), and refreshes the cached values.
    pub fn getep(&mut self) -> Result<(DcId, Ep, NodeId)> {
        match self.call(&LocalRequest::GetEp)? {
            LocalResponse::Ep { dc, ep, node } => {
                self.dc = dc;
                self.ep = ep;
                self.node = node;
                Ok((dc, ep, node))
            }
            LocalResponse::Err(e) => Err(Error::Ipc(e)),
            other => Err(unexpected("getep", &other)),
        }
    }

    /// Gives up the endpoint and closes the connection.
    pub fn unbind(mut self) -> Result<()> {
        self.call_done("unbind", &LocalRequest::Unbind)
    }

    /// Rendezvous send: returns when `dst` has taken the message.
    pub fn send(&mut self, dst: Ep, msg: &Message) -> Result<()> {
        self.send_timeout(dst, msg, Timeout::Forever)
    }

    /// [`send`](Self::send) that fails with [`Errno::TimedOut`] after `timeout`.
    pub fn send_timeout(&mut self, dst: Ep, msg: &Message, timeout: Timeout) -> Result<()> {
        self.call_done(
            "send",
            &LocalRequest::Send {
                dst,
                msg: *msg,
                timeout,
            },
        )
    }

    /// Receives a message from `src` (or any sender): pending notifications first (as
    /// messages of type [`NOTIFY_MTYPE`]), then queued senders; blocks otherwise.
    pub fn receive(&mut self, src: Source) -> Result<Message> {
        self.receive_timeout(src, Timeout::Forever)
    }

    /// [`receive`](Self::receive) that fails with [`Errno::TimedOut`] after `timeout`.
    pub fn receive_timeout(&mut self, src: Source, timeout: Timeout) -> Result<Message> {
        self.call_msg("receive", &LocalRequest::Receive { src, timeout })
    }

    /// Sends `msg` to `dst` and waits for its reply, atomically.
    pub fn sendrec(&mut self, dst: Ep, msg: &Message) -> Result<Message> {
        self.sendrec_timeout(dst, msg, Timeout::Forever)
    }

    /// [`sendrec`](Self::sendrec) that fails with [`Errno::TimedOut`] after `timeout`.
    pub fn sendrec_timeout(&mut self, dst: Ep, msg: &Message, timeout: Timeout) -> Result<Message> {
        self.call_msg(
            "sendrec",
            &LocalRequest::SendRec {
                dst,
                msg: *msg,
                timeout,
            },
        )
    }

    /// Replies to `dst`, which must be waiting in `sendrec` on this endpoint. Never blocks.
    pub fn reply(&mut self, dst: Ep, msg: &Message) -> Result<()> {
        self.call_done("reply", &LocalRequest::Reply { dst, msg: *msg })
    }

    /// Sets a pending notification at `dst` (notifications coalesce). Never blocks.
    pub fn notify(&mut self, dst: Ep, value: u64) -> Result<()> {
        self.call_done("notify", &LocalRequest::Notify { dst, value })
    }

    /// Copies `len` bytes from `src_addr` in the address space of `src`'s process to
    /// `dst_addr` in `dst`'s. Every party other than the caller must be blocked in IPC.
    pub fn vcopy(
        &mut self,
        src: Ep,
        src_addr: u64,
        dst: Ep,
        dst_addr: u64,
        len: u64,
    ) -> Result<()> {
        self.vcopy_timeout(src, src_addr, dst, dst_addr, len, Timeout::Forever)
    }

    /// [`vcopy`](Self::vcopy) that fails with [`Errno::TimedOut`] after `timeout`.
    pub fn vcopy_timeout(
        &mut self,
        src: Ep,
        src_addr: u64,
        dst: Ep,
        dst_addr: u64,
        len: u64,
        timeout: Timeout,
    ) -> Result<()> {
        self.call_done(
            "vcopy",
            &LocalRequest::Vcopy {
                src,
                src_addr,
                dst,
                dst_addr,
                len,
                timeout,
            },
        )
    }

    /// Copies `data` (in this process) to `dst_addr` in the address space of `dst`'s process.
    pub fn vcopy_to(&mut self, dst: Ep, dst_addr: u64, data: &[u8]) -> Result<()> {
        // The node kernel reads `data` with process_vm_readv while this call blocks on the
        // socket, so the borrow covers the whole copy.
        let (me, addr, len) = (self.ep, data.as_ptr() as u64, data.len() as u64);
        self.vcopy(me, addr, dst, dst_addr, len)
    }

    /// Fills `buf` (in this process) from `src_addr` in the address space of `src`'s process.
    pub fn vcopy_from(&mut self, src: Ep, src_addr: u64, buf: &mut [u8]) -> Result<()> {
        // The node kernel writes `buf` with process_vm_writev while this call blocks in a
        // syscall; the pointer escapes to that syscall, so the compiler cannot assume `buf`
        // unchanged afterwards.
        let (me, addr, len) = (self.ep, buf.as_mut_ptr() as u64, buf.len() as u64);
        self.vcopy(src, src_addr, me, addr, len)
    }

    /// Waits until endpoint `ep` of this endpoint's DC is bound somewhere in the cluster.
    pub fn wait_for_bind(&mut self, ep: Ep, timeout: Timeout) -> Result<()> {
        self.call_done("wait_for_bind", &LocalRequest::WaitForBind { ep, timeout })
    }

    /// A call whose success answer is `Done`.
    fn call_done(&mut self, what: &str, req: &LocalRequest) -> Result<()> {
        match self.call(req)? {
            LocalResponse::Done => Ok(()),
            LocalResponse::Err(e) => Err(Error::Ipc(e)),
            other => Err(unexpected(what, &other)),
        }
    }

    /// A call whose success answer is a message.
    fn call_msg(&mut self, what: &str, req: &LocalRequest) -> Result<Message> {
        match self.call(req)? {
            LocalResponse::Msg(m) => Ok(m),
            LocalResponse::Err(e) => Err(Error::Ipc(e)),
            other => Err(unexpected(what, &other)),
        }
    }

    /// Sends one request and reads its response. Any I/O or framing failure marks the
    /// connection broken: where the next response starts is unknown after it.
    fn call(&mut self, req: &LocalRequest) -> Result<LocalResponse> {
        if self.broken {
            return Err(Error::Protocol(
                "the connection to the node kernel is unusable after an earlier error".into(),
            ));
        }
        let res = self.exchange(req);
        if res.is_err() {
            self.broken = true;
            self.dec = FrameDecoder::new();
        }
        res
    }

    /// One request and its response, serving cooperative-migration requests in between.
    fn exchange(&mut self, req: &LocalRequest) -> Result<LocalResponse> {
        self.write_request(req)?;
        loop {
            match self.read_response()? {
                LocalResponse::Checkpoint => {
                    let data = self.snapshot_hook.as_mut().map(|h| h());
                    self.write_request(&LocalRequest::Snapshot { data })?;
                }
                // Rolled back: the interrupted call was dropped by the node; ask again.
                LocalResponse::Resume => self.write_request(req)?,
                // Committed: this program now runs on the destination node.
                LocalResponse::Exit => std::process::exit(0),
                other => return Ok(other),
            }
        }
    }

    fn write_request(&mut self, req: &LocalRequest) -> Result<()> {
        self.wbuf.clear();
        frame::encode(&mut self.wbuf, req, &[], false)
            .map_err(|e| Error::Protocol(format!("cannot encode request: {e}")))?;
        send_all(&self.stream, &self.wbuf).map_err(Error::Io)
    }

    /// Reads from the socket into the decoder's buffer until one whole response frame is in.
    fn read_response(&mut self) -> Result<LocalResponse> {
        loop {
            match self.dec.next_frame::<LocalResponse>() {
                Ok(Some((resp, tail))) => {
                    if !tail.is_empty() {
                        return Err(Error::Protocol(format!(
                            "response frame with a {}-byte tail",
                            tail.len()
                        )));
                    }
                    // Exactly one response per request: anything more is a node kernel bug
                    // and would otherwise be taken as the answer to the next call.
                    if self.dec.buffered() != 0 {
                        return Err(Error::Protocol(
                            "the node kernel sent more than one response".into(),
                        ));
                    }
                    return Ok(resp);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(Error::Protocol(format!(
                        "bad frame from the node kernel: {e}"
                    )))
                }
            }
            if let Err(e) = wait_readable(&self.stream) {
                return Err(Error::Io(e));
            }
            let buf = self.dec.buffer();
            let len = buf.len();
            // Zero-filling a small chunk is cheaper than a syscall and keeps this safe code.
            buf.resize(len + READ_CHUNK, 0);
            match (&self.stream).read(&mut buf[len..]) {
                Ok(0) => {
                    buf.truncate(len);
                    let msg = if len == 0 {
                        "node kernel closed the connection"
                    } else {
                        "node kernel closed the connection in the middle of a response"
                    };
                    return Err(Error::Io(io::Error::new(io::ErrorKind::UnexpectedEof, msg)));
                }
                Ok(n) => buf.truncate(len + n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(len),
                Err(e) => {
                    buf.truncate(len);
                    return Err(Error::Io(e));
                }
            }
        }
    }
}

/// Waits until `stream` has bytes to read, is closed or failed.
///
/// A blocking `read` alone would do, but a thread asleep in `read` on a Unix socket is woken
/// each time the peer consumes bytes this side wrote (the kernel wakes every waiter of the
/// socket on "write space"), that is once per request, when the node kernel takes it: a
/// wasted context switch per call. `poll` filters wake-ups by event, so a thread waiting for
/// `POLLIN` sleeps through those.
fn wait_readable(stream: &UnixStream) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is one valid `pollfd`, and its descriptor is owned by `stream`.
        if unsafe { libc::poll(&mut pfd, 1, -1) } >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes the whole request. `MSG_NOSIGNAL` so that a vanished node kernel surfaces as
/// `EPIPE` instead of killing the process with SIGPIPE (which non-Rust hosts do not ignore).
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid readable slice for its whole length, and `fd` is owned by
        // `stream`, which outlives the call.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

fn unexpected(what: &str, resp: &LocalResponse) -> Error {
    Error::Protocol(format!("unexpected response to {what}: {resp:?}"))
}

fn env_var(name: &str) -> Result<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(v),
        Ok(_) | Err(std::env::VarError::NotPresent) => Err(Error::Env(format!(
            "environment variable {name} is not set (`dvs run` sets it)"
        ))),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::Env(format!(
            "environment variable {name} is not valid UTF-8"
        ))),
    }
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Result<T>
where
    T::Err: fmt::Display,
{
    let v = env_var(name)?;
    v.trim()
        .parse()
        .map_err(|e| Error::Env(format!("environment variable {name}={v:?} is invalid: {e}")))
}

#[cfg(test)]
mod tests;
