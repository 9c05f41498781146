//! The local socket server: one Unix-socket connection per application process.

use std::rc::Rc;
use std::time::Instant;

use dvs_wire::local::LocalRequest;
use dvs_wire::FrameDecoder;
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

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

/// The pid of the peer process, as seen from the node kernel's pid namespace.
fn peer_pid(stream: &UnixStream) -> i32 {
    stream.peer_cred().ok().and_then(|c| c.pid()).unwrap_or(0)
}

/// Serves a connection made by the node itself (a migrated process's new connection); the
/// core learns the process's pid when it is restored.
pub(crate) fn adopt(
    state: &State,
    stream: std::os::unix::net::UnixStream,
) -> std::io::Result<dvs_core::ConnId> {
    stream.set_nonblocking(true)?;
    let stream = UnixStream::from_std(stream)?;
    let (conn, wire) = register(state, stream, 0)?;
    tokio::task::spawn_local(serve_conn(state.clone(), conn, wire, 0));
    Ok(conn)
}

fn register(
    state: &State,
    stream: UnixStream,
    pid: i32,
) -> std::io::Result<(dvs_core::ConnId, Rc<Wire>)> {
    let wire = Rc::new(Wire::new(Sock::Unix(stream), false)?);
    let mut s = state.borrow_mut();
    let id = s.next_conn;
    s.next_conn += 1;
    s.conns.insert(id, wire.clone());
    s.core.on_local_connect(id, pid);
    Ok((id, wire))
}

async fn connection(state: State, stream: UnixStream) {
    let pid = peer_pid(&stream);
    let (conn, wire) = match register(&state, stream, pid) {
        Ok(r) => r,
        Err(e) => return warn!(pid, "cannot register a local connection: {e}"),
    };
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
                Ok(Some((req, _))) => s.core.on_local_request(conn, req, now),
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
    s.core.on_local_disconnect(conn);
    s.drive();
    debug!(conn, pid, "process disconnected");
}
