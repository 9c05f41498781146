//! The local socket server: one Unix-socket connection per application process.

use dvs_core::Input;
use std::rc::Rc;
use std::time::Instant;

use dvs_wire::local::LocalRequest;
use dvs_wire::FrameDecoder;
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use dvs_core::LocalPeer;
use dvs_wire::{DcId, Ep};

use crate::access;
use crate::wire::{Sock, Wire};
use crate::State;

/// Bytes asked for per read: requests are under 100 bytes, so one read takes many.
const READ_CHUNK: usize = 16 * 1024;

/// Accepts process connections forever.
pub(crate) async fn serve(state: State, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::task::spawn_local(connection(state.clone(), stream));
            }
            Err(e) => {
                warn!("accept on the local socket failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves a connection made by the node itself for a process it restores as `{dc, ep}` (a
/// criu migration's new connection); the core learns the process's pid when it is restored.
pub(crate) fn adopt(
    state: &State,
    stream: std::os::unix::net::UnixStream,
    dc: DcId,
    ep: Ep,
) -> std::io::Result<dvs_core::ConnId> {
    stream.set_nonblocking(true)?;
    let stream = UnixStream::from_std(stream)?;
    let peer = LocalPeer {
        pid: 0,
        uid: nix::unistd::geteuid().as_raw(),
        launched_for: Some((dc, ep)),
    };
    let (conn, wire) = register(state, stream, peer)?;
    tokio::task::spawn_local(serve_conn(state.clone(), conn, wire, 0));
    Ok(conn)
}

fn register(
    state: &State,
    stream: UnixStream,
    peer: LocalPeer,
) -> std::io::Result<(dvs_core::ConnId, Rc<Wire>)> {
    let wire = Rc::new(Wire::new(Sock::Unix(stream), false)?);
    let mut s = state.borrow_mut();
    let id = s.next_conn;
    s.next_conn += 1;
    s.conns.insert(id, wire.clone());
    s.core
        .handle(Instant::now(), Input::LocalConnect { conn: id, peer });
    Ok((id, wire))
}

async fn connection(state: State, stream: UnixStream) {
    let cred = match access::peer_cred(&stream) {
        Ok(c) => c,
        // Without credentials there is nothing to decide a bind on.
        Err(e) => return warn!("local connection without peer credentials refused: {e}"),
    };
    let launched_for = {
        let s = state.borrow();
        access::launched_for(cred.pid, |p| s.launched_endpoint(p))
    };
    let peer = LocalPeer {
        pid: cred.pid,
        uid: cred.uid,
        launched_for,
    };
    let pid = cred.pid;
    let (conn, wire) = match register(&state, stream, peer) {
        Ok(r) => r,
        Err(e) => return warn!(pid, "cannot register a local connection: {e}"),
    };
    debug!(conn, pid, uid = cred.uid, ?launched_for, "local connection");
    serve_conn(state, conn, wire, pid).await;
}

async fn serve_conn(state: State, conn: dvs_core::ConnId, wire: Rc<Wire>, pid: i32) {
    debug!(conn, pid, "process connected");
    let writer = wire.clone();
    tokio::task::spawn_local(async move { writer.writer().await });
    let mut dec = FrameDecoder::new();
    'read: loop {
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
        let now = Instant::now();
        let mut s = state.borrow_mut();
        loop {
            match dec.next_frame::<LocalRequest>() {
                Ok(Some((req, _))) => s.core.handle(now, Input::LocalRequest { conn, req }),
                Ok(None) => break,
                Err(e) => {
                    warn!(conn, pid, "refusing a malformed frame from a local process, closing its connection: {e}");
                    s.drive();
                    break 'read;
                }
            }
        }
        s.drive();
    }
    wire.close();
    let mut s = state.borrow_mut();
    s.conns.remove(&conn);
    s.core
        .handle(Instant::now(), Input::LocalDisconnect { conn });
    s.drive();
    debug!(conn, pid, "process disconnected");
}
