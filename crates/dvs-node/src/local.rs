//! The local socket server: one Unix-socket connection per application process.
//!
//! The accept task reads who connected (and walks `/proc` for the launched-for check off the
//! loop); the event loop registers the connection, owns its writer and starts its reader,
//! which hands every request to the loop in order.

use dvs_core::{ConnId, Input, LocalPeer};
use std::rc::Rc;

use dvs_wire::local::LocalRequest;
use dvs_wire::{DcId, Ep, FrameDecoder};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::access::{self, PeerCred};
use crate::event_loop::{blocking, Ctx, Event, Events, Node};
use crate::wire::{Sock, Wire};

/// Bytes asked for per read: requests are under 100 bytes, so one read takes many.
const READ_CHUNK: usize = 16 * 1024;

/// Accepts process connections forever.
pub(crate) async fn serve(ctx: Rc<Ctx>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::task::spawn_local(accepted(ctx.clone(), stream));
            }
            Err(e) => {
                warn!("accept on the local socket failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads the credentials and ancestry of a new connection, then hands it to the event loop.
async fn accepted(ctx: Rc<Ctx>, stream: UnixStream) {
    let cred = match access::peer_cred(&stream) {
        Ok(c) => c,
        // Without credentials there is nothing to decide a bind on.
        Err(e) => return warn!("local connection without peer credentials refused: {e}"),
    };
    let pid = cred.pid;
    let ancestors = blocking(move || access::ancestors(pid))
        .await
        .unwrap_or_default();
    let ev = Event::LocalAccepted {
        stream,
        cred,
        ancestors,
    };
    let _ = ctx.events.send(ev).await;
}

impl Node {
    /// Registers a process's connection: it may bind what it (or an ancestor) was launched or
    /// restored here for.
    pub(crate) fn local_accepted(&mut self, stream: UnixStream, cred: PeerCred, ancestors: &[i32]) {
        let launched_for = ancestors.iter().find_map(|p| self.launched_endpoint(*p));
        let peer = LocalPeer {
            pid: cred.pid,
            uid: cred.uid,
            launched_for,
        };
        let pid = cred.pid;
        match self.open_local(stream, peer) {
            Ok(conn) => debug!(conn, pid, uid = cred.uid, ?launched_for, "local connection"),
            Err(e) => warn!(pid, "cannot register a local connection: {e}"),
        }
    }

    /// Serves a connection made by the node itself for a process it restored as `{dc, ep}` (a
    /// criu migration's new connection); the core learns the process's pid with `Restored`.
    pub(crate) fn adopt(
        &mut self,
        stream: std::os::unix::net::UnixStream,
        dc: DcId,
        ep: Ep,
    ) -> std::io::Result<ConnId> {
        stream.set_nonblocking(true)?;
        let stream = UnixStream::from_std(stream)?;
        let peer = LocalPeer {
            pid: 0,
            uid: nix::unistd::geteuid().as_raw(),
            launched_for: Some((dc, ep)),
        };
        self.open_local(stream, peer)
    }

    fn open_local(&mut self, stream: UnixStream, peer: LocalPeer) -> std::io::Result<ConnId> {
        let wire = Rc::new(Wire::new(Sock::Unix(stream), false)?);
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(conn, wire.clone());
        self.input(Input::LocalConnect { conn, peer });
        let events = self.ctx.events.clone();
        tokio::task::spawn_local(serve_conn(events, conn, wire, peer.pid));
        Ok(conn)
    }

    /// The reader of `conn` stopped: the process is gone for the core.
    pub(crate) fn local_closed(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
        self.input(Input::LocalDisconnect { conn });
    }
}

/// Reads a connection's requests until it ends, then reports it closed.
async fn serve_conn(events: Events, conn: ConnId, wire: Rc<Wire>, pid: i32) {
    debug!(conn, pid, "process connected");
    let writer = wire.clone();
    tokio::task::spawn_local(async move { writer.writer().await });
    let mut dec = FrameDecoder::new();
    loop {
        match wire.read(dec.buffer(), READ_CHUNK).await {
            Ok(0) | Err(_) => {
                // A request cut short by the end of the stream is logged like a malformed one.
                if dec.buffered() > 0 && !wire.is_closed() {
                    warn!(
                        conn,
                        pid,
                        "a local process closed its connection in the middle of a frame ({} bytes unread)",
                        dec.buffered()
                    );
                }
                break;
            }
            Ok(_) => {}
        }
        let mut reqs = Vec::new();
        let malformed = loop {
            match dec.next_frame::<LocalRequest>() {
                Ok(Some((req, _))) => reqs.push(Input::LocalRequest { conn, req }),
                Ok(None) => break false,
                Err(e) => {
                    warn!(conn, pid, "refusing a malformed frame from a local process, closing its connection: {e}");
                    break true;
                }
            }
        };
        // One read's requests go together, so that their answers leave together.
        if !reqs.is_empty() && events.send(Event::Inputs(reqs)).await.is_err() {
            break;
        }
        if malformed {
            break;
        }
    }
    wire.close();
    let _ = events.send(Event::LocalClosed { conn }).await;
    debug!(conn, pid, "process disconnected");
}
