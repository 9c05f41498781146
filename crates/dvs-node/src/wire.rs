//! The write side of a connection (local or peer): frames are queued into one buffer and
//! written together, so that everything one event produced leaves in as few writes as possible.

use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};

use bytes::{Buf, BytesMut};
use dvs_wire::frame::{self, FrameError};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

/// A local or peer socket, as accepted or dialed.
pub enum Sock {
    /// A process's connection.
    Unix(tokio::net::UnixStream),
    /// A peer link in plaintext (`[link] tls = false`).
    Tcp(tokio::net::TcpStream),
    /// A peer link after its TLS handshake: the socket and its record layer.
    Tls(tokio::net::TcpStream, Box<TlsLink>),
}

/// The record layer of a peer link whose TLS handshake is done.
pub struct TlsLink {
    /// Seals what this node sends.
    pub sealer: dvs_tls::records::Sealer,
    /// Opens what the peer sends.
    pub opener: dvs_tls::records::Opener,
    /// Ciphertext already read from the socket and not yet opened.
    pub cipher_in: BytesMut,
}

/// Bytes queued beyond which a link whose peer has stopped reading (no write progress for
/// [`STUCK_AFTER`]) is closed: such a peer must not make this node buffer without bound. A
/// peer that reads keeps its link however much is queued (a big migration image is).
pub const MAX_PENDING: usize = 256 << 20;
/// How long a link over [`MAX_PENDING`] may make no write progress.
pub const STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Plaintext sealed per step: big writes reach the socket while the rest is being sealed.
const SEAL_STEP: usize = 256 * 1024;

/// How far [`Wire::write_some`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Written {
    /// Everything.
    All,
    /// Part: the socket is full, the writer task takes over.
    Full,
    /// The socket failed: the connection is over.
    Failed,
}

/// The record layer of a peer link and its ciphertext buffers.
struct Tls {
    sealer: dvs_tls::records::Sealer,
    opener: dvs_tls::records::Opener,
    cipher_in: BytesMut,
    cipher_out: Vec<u8>,
    /// Bytes of `cipher_out` already written.
    written: usize,
    eof: bool,
}

/// A socket registered with the reactor directly (not through tokio's stream types), so
/// that the node kernel chooses its epoll interest and when its readiness is consumed.
enum Io {
    /// A process's connection, registered for readability only: a Unix socket signals
    /// "writable" to its epoll waiters each time the peer consumes data, so with write
    /// interest every response a process reads would wake the node kernel for nothing.
    /// Writes that would block wait on a temporary write registration (see `writable`).
    Unix(AsyncFd<std::os::unix::net::UnixStream>),
    /// A peer link (TCP signals "writable" only after a write found the buffer full).
    Tcp(AsyncFd<std::net::TcpStream>),
}

impl Io {
    fn new(sock: Sock) -> io::Result<(Io, Option<Tls>)> {
        // `into_std` deregisters the stream and leaves it non-blocking.
        let tcp = |s: tokio::net::TcpStream| {
            register(s.into_std()?, Interest::READABLE | Interest::WRITABLE).map(Io::Tcp)
        };
        Ok(match sock {
            Sock::Unix(s) => (Io::Unix(register(s.into_std()?, Interest::READABLE)?), None),
            Sock::Tcp(s) => (tcp(s)?, None),
            Sock::Tls(s, link) => {
                let TlsLink {
                    sealer,
                    opener,
                    cipher_in,
                } = *link;
                let tls = Tls {
                    sealer,
                    opener,
                    cipher_in,
                    cipher_out: Vec::new(),
                    written: 0,
                    eof: false,
                };
                (tcp(s)?, Some(tls))
            }
        })
    }

    /// Waits until the socket is readable, then reads once, appending to `buf`;
    /// `WouldBlock` when the readiness was stale.
    async fn read_ready(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Io::Unix(fd) => read_ready(fd, buf).await,
            Io::Tcp(fd) => read_ready(fd, buf).await,
        }
    }

    /// Waits until the socket may take more bytes.
    async fn writable(&self) -> io::Result<()> {
        match self {
            Io::Unix(fd) => {
                // Rare (a process that does not read its responses): a second registration
                // with write interest, on a duplicate of the descriptor, only while waiting.
                let dup = register(fd.get_ref().try_clone()?, Interest::WRITABLE)?;
                let _ready = dup.writable().await?;
                Ok(())
            }
            Io::Tcp(fd) => {
                // Consumed here: `try_write` reports `WouldBlock` again if it is still full,
                // and the next edge sets the readiness anew.
                fd.writable().await?.clear_ready();
                Ok(())
            }
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Io::Unix(fd) => fd.get_ref().write(buf),
            Io::Tcp(fd) => fd.get_ref().write(buf),
        }
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Io::Unix(fd) => fd.as_raw_fd(),
            Io::Tcp(fd) => fd.as_raw_fd(),
        }
    }
}

/// Registers a std socket with the reactor for `interest`.
fn register<T: AsRawFd>(sock: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `sock` is a std socket that owns its descriptor, which therefore stays open and
    // the same for as long as the `AsyncFd` owns the socket.
    Ok(unsafe { AsyncFd::register_with_interest(sock, interest) }?)
}

/// One read once `fd` is readable, into the spare capacity of `buf` (no zero-filling and no
/// copy out of a separate read buffer: bulk vcopy chunks land in the frame decoder directly).
/// A short read drains the socket (epoll is edge-triggered), so the readiness is cleared
/// then, which spares the next read's `EAGAIN` round trip to the kernel (tokio's own
/// `AsyncRead` does the same). End of stream stays ready: tokio never clears the closed state.
async fn read_ready<T: AsRawFd>(fd: &AsyncFd<T>, buf: &mut BytesMut) -> io::Result<usize> {
    let mut guard = fd.readable().await?;
    let spare = buf.spare_capacity_mut();
    let want = spare.len();
    let r = guard.try_io(|fd| {
        // SAFETY: the kernel writes at most `want` bytes into `spare`, which is writable
        // memory of that length owned by `buf`; `fd` is open for as long as `fd` lives.
        let n = unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), want) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    });
    match r {
        Ok(Ok(n)) => {
            // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + n) };
            if n > 0 && n < want {
                guard.clear_ready();
            }
            Ok(n)
        }
        Ok(Err(e)) => Err(e),
        Err(_would_block) => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// A connection shared by its reader task, its writer task and the event loop.
pub struct Wire {
    sock: Io,
    tls: Option<RefCell<Tls>>,
    out: RefCell<BytesMut>,
    wake: Notify,
    closed: Cell<bool>,
    compress: bool,
    /// When a write last made progress.
    last_progress: Cell<std::time::Instant>,
    /// Woken whenever a write made progress (see [`Wire::wait_pending_below`]).
    progress: Notify,
    /// [`MAX_PENDING`] and [`STUCK_AFTER`] (smaller in tests).
    stuck: Cell<(usize, std::time::Duration)>,
    /// Frames queued since the connection opened.
    pub frames_out: Cell<u64>,
    /// Bytes queued since the connection opened.
    pub bytes_out: Cell<u64>,
}

impl Wire {
    /// Wraps a socket (registering it with the reactor); `compress` enables lz4 on frames
    /// that shrink.
    pub fn new(sock: Sock, compress: bool) -> io::Result<Self> {
        let (sock, tls) = Io::new(sock)?;
        Ok(Wire {
            sock,
            tls: tls.map(RefCell::new),
            out: RefCell::new(BytesMut::with_capacity(8 * 1024)),
            wake: Notify::new(),
            closed: Cell::new(false),
            compress,
            last_progress: Cell::new(std::time::Instant::now()),
            progress: Notify::new(),
            stuck: Cell::new((MAX_PENDING, STUCK_AFTER)),
            frames_out: Cell::new(0),
            bytes_out: Cell::new(0),
        })
    }

    /// Queues one frame (not written until [`Wire::flush`]).
    pub fn queue<T: Serialize>(&self, body: &T, tail: &[u8]) -> Result<(), FrameError> {
        if self.closed.get() {
            return Ok(());
        }
        let mut out = self.out.borrow_mut();
        let before = out.len();
        frame::encode(&mut out, body, tail, self.compress)?;
        self.frames_out.set(self.frames_out.get() + 1);
        self.bytes_out
            .set(self.bytes_out.get() + (out.len() - before) as u64);
        Ok(())
    }

    /// Queues one frame whose tail `fill` writes in place, when the link does not compress
    /// (a compressed frame needs its tail in a buffer anyway): `None` means use [`Wire::queue`].
    pub fn queue_filled<T: Serialize, E>(
        &self,
        body: &T,
        tail_len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Option<Result<Result<(), E>, FrameError>> {
        if self.compress {
            return None;
        }
        if self.closed.get() {
            return Some(Ok(Ok(())));
        }
        let mut out = self.out.borrow_mut();
        let before = out.len();
        let r = frame::encode_filled(&mut out, body, tail_len, fill);
        if matches!(r, Ok(Ok(()))) {
            self.frames_out.set(self.frames_out.get() + 1);
            self.bytes_out
                .set(self.bytes_out.get() + (out.len() - before) as u64);
        }
        Some(r)
    }

    /// Bytes queued and not yet written (plaintext, and ciphertext sealed ahead).
    pub fn pending(&self) -> usize {
        let sealed = self.tls.as_ref().map_or(0, |t| {
            let t = t.borrow();
            t.cipher_out.len() - t.written
        });
        self.out.borrow().len() + sealed
    }

    /// Waits until at most `limit` bytes are queued (or the connection closed): a bulk sender
    /// paces itself with this, so that what it queues delays later frames by a bounded amount.
    pub async fn wait_pending_below(&self, limit: usize) {
        loop {
            let progressed = self.progress.notified();
            if self.closed.get() || self.pending() <= limit {
                return;
            }
            progressed.await;
        }
    }

    /// Changes the limits of [`Wire::over_limit`].
    #[cfg(test)]
    fn set_stuck_limit(&self, bytes: usize, after: std::time::Duration) {
        self.stuck.set((bytes, after));
    }

    /// Whether the link's peer stopped reading long enough for [`MAX_PENDING`] bytes to pile
    /// up; the caller closes such a link.
    pub fn over_limit(&self) -> bool {
        let (limit, after) = self.stuck.get();
        self.pending() > limit && self.last_progress.get().elapsed() > after
    }

    /// Writes what it can now; the writer task finishes the rest when the socket drains.
    pub fn flush(&self) {
        if self.closed.get() {
            return;
        }
        if let Some(tls) = &self.tls {
            return self.flush_tls(&mut tls.borrow_mut());
        }
        let mut out = self.out.borrow_mut();
        let mut sent = 0;
        let r = self.write_some(&out, &mut sent);
        out.advance(sent);
        if r == Written::Failed {
            out.clear();
            drop(out);
            self.close();
        }
    }

    /// Writes `buf[*done..]` until it is all written or the socket is full, moving `*done`
    /// on; records the progress, and wakes the writer task when the socket is full.
    fn write_some(&self, buf: &[u8], done: &mut usize) -> Written {
        while *done < buf.len() {
            match self.sock.try_write(&buf[*done..]) {
                Ok(n) => {
                    *done += n;
                    self.last_progress.set(std::time::Instant::now());
                    self.progress.notify_waiters();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wake.notify_one();
                    return Written::Full;
                }
                Err(_) => return Written::Failed,
            }
        }
        Written::All
    }

    /// [`Wire::flush`] through TLS: plaintext is sealed in steps of [`SEAL_STEP`], each
    /// written out before the next is sealed.
    fn flush_tls(&self, tls: &mut Tls) {
        let mut out = self.out.borrow_mut();
        loop {
            match self.write_some(&tls.cipher_out, &mut tls.written) {
                Written::All => {}
                Written::Full => return,
                Written::Failed => {
                    out.clear();
                    drop(out);
                    self.close();
                    return;
                }
            }
            tls.cipher_out.clear();
            tls.written = 0;
            if out.is_empty() {
                return;
            }
            let n = out.len().min(SEAL_STEP);
            if let Err(e) = tls.sealer.seal(&out[..n], &mut tls.cipher_out) {
                tracing::warn!("closing a peer link: {e}");
                out.clear();
                drop(out);
                self.close();
                return;
            }
            out.advance(n);
        }
    }

    /// The writer task: drains the buffer whenever [`Wire::flush`] could not.
    pub async fn writer(&self) {
        loop {
            self.wake.notified().await;
            while !self.closed.get() && self.pending() > 0 {
                if self.sock.writable().await.is_err() {
                    self.close();
                    return;
                }
                self.flush();
            }
            if self.closed.get() {
                return;
            }
        }
    }

    /// Waits until the socket is readable, then appends what one read returns to `buf`,
    /// asking for up to `want` bytes at least (0 = end of stream).
    pub async fn read(&self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        // A socket that always has data never makes its readiness future wait, and that
        // future takes no share of tokio's cooperative budget: without this, a bulk transfer
        // on one link kept every other task of the node from running (heartbeats to the other
        // nodes stopped for seconds and they declared this node dead).
        tokio::task::coop::consume_budget().await;
        if let Some(tls) = &self.tls {
            return self.read_tls(tls, buf, want).await;
        }
        loop {
            if self.closed.get() {
                return Ok(0);
            }
            buf.reserve(want.max(1));
            match self.sock.read_ready(buf).await {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                r => return r,
            }
        }
    }

    /// [`Wire::read`] through TLS: reads up to `want` bytes of ciphertext at once, then
    /// opens every complete record into `buf`.
    async fn read_tls(
        &self,
        tls: &RefCell<Tls>,
        buf: &mut BytesMut,
        want: usize,
    ) -> io::Result<usize> {
        loop {
            if self.closed.get() {
                return Ok(0);
            }
            let n = {
                let mut t = tls.borrow_mut();
                let t = &mut *t;
                let before = buf.len();
                buf.reserve(t.cipher_in.len());
                let used = t
                    .opener
                    .open(&mut t.cipher_in, |d| buf.extend_from_slice(d))
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                t.cipher_in.advance(used);
                if buf.len() == before && t.eof {
                    return Ok(0);
                }
                buf.len() - before
            };
            if n > 0 {
                return Ok(n);
            }
            let mut cin = std::mem::take(&mut tls.borrow_mut().cipher_in);
            cin.reserve(want.max(1));
            let r = self.sock.read_ready(&mut cin).await;
            let mut t = tls.borrow_mut();
            t.cipher_in = cin;
            match r {
                Ok(0) => t.eof = true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the connection was closed by us.
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Closes both directions: the reader sees end of stream, the writer stops.
    pub fn close(&self) {
        if !self.closed.replace(true) {
            self.progress.notify_waiters();
            let _ =
                nix::sys::socket::shutdown(self.sock.raw_fd(), nix::sys::socket::Shutdown::Both);
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvs_wire::FrameDecoder;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn run_local<F: std::future::Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    /// Two connected loopback TCP sockets.
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (b, _) = listener.accept().await.unwrap();
        (a, b)
    }

    /// A process that does not read its responses for a while: the writes that would block
    /// wait on the temporary write registration and all arrive, in order, once it reads.
    #[test]
    fn unix_writes_that_block_finish_when_the_peer_reads() {
        run_local(async {
            let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
            let wire = std::rc::Rc::new(Wire::new(Sock::Unix(a), false).unwrap());
            let writer = wire.clone();
            tokio::task::spawn_local(async move { writer.writer().await });
            let chunk = vec![7u8; 64 * 1024];
            let frames = 64u32; // 4 MiB: far more than a Unix socket buffers.
            for i in 0..frames {
                wire.queue(&i, &chunk).unwrap();
                wire.flush();
            }
            assert!(wire.pending() > 0, "the socket should have filled up");
            let mut dec = FrameDecoder::new();
            let mut got = 0u32;
            let mut buf = vec![0u8; 256 * 1024];
            while got < frames {
                let n = b.read(&mut buf).await.unwrap();
                assert!(n > 0, "stream ended after {got} frames");
                dec.extend(&buf[..n]);
                while let Some((i, tail)) = dec.next_frame::<u32>().unwrap() {
                    assert_eq!(i, got);
                    assert_eq!(&tail[..], &chunk[..]);
                    got += 1;
                }
            }
            assert_eq!(wire.pending(), 0);
        });
    }

    /// Reads append to the buffer; a short read clears the readiness, and data or the end
    /// of the stream arriving afterwards still wake the reader.
    #[test]
    fn reads_see_later_data_and_the_end_of_stream() {
        run_local(async {
            let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
            let wire = Wire::new(Sock::Unix(a), false).unwrap();
            let mut buf = BytesMut::new();
            b.write_all(b"hello").await.unwrap();
            assert_eq!(wire.read(&mut buf, 1024).await.unwrap(), 5);
            let later = tokio::task::spawn_local(async move {
                tokio::task::yield_now().await;
                b.write_all(b" world").await.unwrap();
                tokio::task::yield_now().await;
                drop(b);
            });
            assert_eq!(wire.read(&mut buf, 1024).await.unwrap(), 6);
            assert_eq!(&buf[..], b"hello world");
            assert_eq!(wire.read(&mut buf, 1024).await.unwrap(), 0);
            later.await.unwrap();
        });
    }

    /// A peer that reads keeps its link however much is queued; one that stops reading with
    /// more than the limit queued is reported stuck once no write made progress for a while.
    #[test]
    fn a_link_is_stuck_only_when_over_the_limit_and_not_read() {
        run_local(async {
            let (a, mut b) = tcp_pair().await;
            let wire = Wire::new(Sock::Tcp(a), false).unwrap();
            let after = std::time::Duration::from_millis(100);
            wire.set_stuck_limit(1 << 20, after);
            let chunk = vec![1u8; 1 << 20];
            for i in 0..16u32 {
                wire.queue(&i, &chunk).unwrap();
            }
            wire.flush();
            assert!(
                wire.pending() > 1 << 20,
                "the socket buffers must have filled"
            );
            assert!(!wire.over_limit(), "progress was just made");
            tokio::time::sleep(after * 2).await;
            assert!(wire.over_limit(), "no reader for longer than the limit");
            // The peer reads again: progress resets the verdict.
            let mut buf = vec![0u8; 1 << 20];
            let n = b.read(&mut buf).await.unwrap();
            assert!(n > 0);
            wire.flush();
            assert!(!wire.over_limit());
        });
    }

    /// The same over TCP, whose registration also carries write interest.
    #[test]
    fn tcp_reads_and_blocked_writes() {
        run_local(async {
            let (a, mut b) = tcp_pair().await;
            let wire = std::rc::Rc::new(Wire::new(Sock::Tcp(a), false).unwrap());
            let writer = wire.clone();
            tokio::task::spawn_local(async move { writer.writer().await });
            let chunk = vec![3u8; 256 * 1024];
            for i in 0..64u32 {
                wire.queue(&i, &chunk).unwrap();
            }
            wire.flush();
            let total = wire.bytes_out.get() as usize;
            let mut seen = 0;
            let mut buf = vec![0u8; 256 * 1024];
            while seen < total {
                let n = b.read(&mut buf).await.unwrap();
                assert!(n > 0);
                seen += n;
            }
            b.write_all(b"pong").await.unwrap();
            let mut rbuf = BytesMut::new();
            assert_eq!(wire.read(&mut rbuf, 16).await.unwrap(), 4);
            drop(b);
            assert_eq!(wire.read(&mut rbuf, 16).await.unwrap(), 0);
        });
    }
}
