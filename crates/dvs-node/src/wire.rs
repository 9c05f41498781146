//! The write side of a connection (local or peer): frames are queued into one buffer and
//! written together, so that everything one event produced leaves in as few writes as possible.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use bytes::{Buf, BytesMut};
use dvs_wire::frame::{self, FrameError};
use serde::Serialize;
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Notify;

/// A local or peer socket.
pub enum Sock {
    /// A process's connection.
    Unix(UnixStream),
    /// A peer link.
    Tcp(TcpStream),
}

impl Sock {
    async fn ready(&self, interest: Interest) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.ready(interest).await.map(|_| ()),
            Sock::Tcp(s) => s.ready(interest).await.map(|_| ()),
        }
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.try_read(buf),
            Sock::Tcp(s) => s.try_read(buf),
        }
    }
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.try_write(buf),
            Sock::Tcp(s) => s.try_write(buf),
        }
    }
    fn raw_fd(&self) -> RawFd {
        match self {
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Tcp(s) => s.as_raw_fd(),
        }
    }
}

/// A connection shared by its reader task, its writer task and the event loop.
pub struct Wire {
    sock: Sock,
    out: RefCell<BytesMut>,
    wake: Notify,
    closed: Cell<bool>,
    compress: bool,
    /// Frames queued since the connection opened.
    pub frames_out: Cell<u64>,
    /// Bytes queued since the connection opened.
    pub bytes_out: Cell<u64>,
}

impl Wire {
    /// Wraps a socket; `compress` enables lz4 on frames that shrink.
    pub fn new(sock: Sock, compress: bool) -> Self {
        Wire {
            sock,
            out: RefCell::new(BytesMut::with_capacity(8 * 1024)),
            wake: Notify::new(),
            closed: Cell::new(false),
            compress,
            frames_out: Cell::new(0),
            bytes_out: Cell::new(0),
        }
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

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.out.borrow().len()
    }

    /// Writes what it can now; the writer task finishes the rest when the socket drains.
    pub fn flush(&self) {
        if self.closed.get() {
            return;
        }
        let mut out = self.out.borrow_mut();
        while !out.is_empty() {
            match self.sock.try_write(&out) {
                Ok(n) => out.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(out);
                    self.wake.notify_one();
                    return;
                }
                Err(_) => {
                    out.clear();
                    drop(out);
                    self.close();
                    return;
                }
            }
        }
    }

    /// The writer task: drains the buffer whenever [`Wire::flush`] could not.
    pub async fn writer(&self) {
        loop {
            self.wake.notified().await;
            while !self.closed.get() && self.pending() > 0 {
                if self.sock.ready(Interest::WRITABLE).await.is_err() {
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

    /// Waits until the socket is readable, then reads into `buf` (0 = end of stream).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.closed.get() {
                return Ok(0);
            }
            self.sock.ready(Interest::READABLE).await?;
            match self.sock.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
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
            let _ =
                nix::sys::socket::shutdown(self.sock.raw_fd(), nix::sys::socket::Shutdown::Both);
            self.wake.notify_one();
        }
    }
}
