//! Peer links: one TCP connection per node pair, dialed by the node with the lower id.
//!
//! A link starts with `Hello` (protocol version, cluster id, node id) answered by `Welcome`
//! or `Refuse`; then frames flow both ways. Idle links carry `Ping`/`Pong`; a link silent for
//! `dead_after_ms` is declared down. The dialing side reconnects by itself.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use dvs_wire::peer::PeerFrame;
use dvs_wire::{FrameDecoder, NodeId, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{error, info, warn};

use crate::wire::{Sock, Wire};
use crate::State;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes asked for per read of an established link (vcopy chunks are 256 KiB frames; they
/// are read straight into the frame decoder's buffer).
const READ_CHUNK: usize = 256 * 1024;

/// Starts the listener and one dialer per peer with a higher id.
pub(crate) fn start(state: State, listener: TcpListener) {
    tokio::task::spawn_local(accept_loop(state.clone(), listener));
    let (me, peers) = {
        let s = state.borrow();
        (
            s.me.id,
            s.cfg
                .nodes
                .iter()
                .filter(|n| n.id > s.me.id)
                .map(|n| (n.id, n.peer_addr))
                .collect::<Vec<_>>(),
        )
    };
    for (id, addr) in peers {
        tokio::task::spawn_local(dial_loop(state.clone(), me, id, addr));
    }
}

async fn accept_loop(state: State, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                tokio::task::spawn_local(accept_one(state.clone(), stream, addr));
            }
            Err(e) => {
                warn!("accept on the peer socket failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads one frame during the handshake (before the link is shared with the event loop).
async fn read_frame(stream: &mut TcpStream, dec: &mut FrameDecoder) -> Result<PeerFrame, String> {
    let mut buf = [0u8; 4096];
    loop {
        match dec.next_frame::<PeerFrame>() {
            Ok(Some((f, _))) => return Ok(f),
            Ok(None) => {}
            Err(e) => return Err(format!("malformed handshake frame: {e}")),
        }
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed during the handshake".into());
        }
        dec.extend(&buf[..n]);
    }
}

async fn write_frame(stream: &mut TcpStream, f: &PeerFrame) -> std::io::Result<()> {
    let b = dvs_wire::frame::encode_to_vec(f, &[], false).expect("handshake frames encode");
    stream.write_all(&b).await
}

async fn accept_one(state: State, mut stream: TcpStream, addr: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let mut dec = FrameDecoder::new();
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut stream, &mut dec))
        .await
    {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => return warn!("peer link from {addr} dropped: {e}"),
        Err(_) => {
            return warn!("peer link from {addr} dropped: no Hello within {HANDSHAKE_TIMEOUT:?}")
        }
    };
    let (me, cluster) = {
        let s = state.borrow();
        (s.me.id, s.cfg.cluster_id.clone())
    };
    let refusal = match &hello {
        PeerFrame::Hello { version, .. } if *version != PROTOCOL_VERSION => Some(format!(
            "protocol version mismatch (ours {PROTOCOL_VERSION}, theirs {version})"
        )),
        PeerFrame::Hello { cluster: c, .. } if *c != cluster => Some(format!(
            "cluster id mismatch (ours {cluster:?}, theirs {c:?})"
        )),
        PeerFrame::Hello { node, .. }
            if *node == me || state.borrow().cfg.node_by_id(*node).is_none() =>
        {
            Some(format!(
                "node id {node} is not a peer in our cluster config"
            ))
        }
        PeerFrame::Hello { .. } => None,
        other => Some(format!("expected Hello, got {other:?}")),
    };
    if let Some(reason) = refusal {
        error!("refusing peer link from {addr}: {reason}");
        let _ = write_frame(&mut stream, &PeerFrame::Refuse { reason }).await;
        return;
    }
    let PeerFrame::Hello { node, .. } = hello else {
        unreachable!("checked above")
    };
    if write_frame(&mut stream, &PeerFrame::Welcome { node: me })
        .await
        .is_err()
    {
        return;
    }
    run_link(state, node, stream, dec).await;
}

async fn dial_loop(state: State, me: NodeId, peer: NodeId, addr: SocketAddr) {
    let (base, cluster) = {
        let s = state.borrow();
        (
            Duration::from_millis(s.cfg.link.reconnect_ms.max(1)),
            s.cfg.cluster_id.clone(),
        )
    };
    let mut backoff = base;
    let mut last_logged: Option<String> = None;
    loop {
        let attempt = async {
            let mut stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            let _ = stream.set_nodelay(true);
            write_frame(
                &mut stream,
                &PeerFrame::Hello {
                    version: PROTOCOL_VERSION,
                    cluster: cluster.clone(),
                    node: me,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
            let mut dec = FrameDecoder::new();
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut stream, &mut dec)).await {
                Ok(Ok(PeerFrame::Welcome { node })) if node == peer => Ok((stream, dec)),
                Ok(Ok(PeerFrame::Welcome { node })) => Err(format!(
                    "{addr} is node {node}, not node {peer} as configured"
                )),
                Ok(Ok(PeerFrame::Refuse { reason })) => {
                    Err(format!("node {peer} refused our link: {reason}"))
                }
                Ok(Ok(other)) => Err(format!("unexpected handshake answer {other:?}")),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!("no handshake answer within {HANDSHAKE_TIMEOUT:?}")),
            }
        };
        match attempt.await {
            Ok((stream, dec)) => {
                backoff = base;
                last_logged = None;
                run_link(state.clone(), peer, stream, dec).await;
            }
            Err(e) => {
                // Log each distinct failure once, not every retry.
                if last_logged.as_ref() != Some(&e) {
                    if e.contains("refused our link") || e.contains("not node") {
                        error!("{e}");
                    } else {
                        info!("link to node {peer}: {e}; retrying");
                    }
                    last_logged = Some(e.clone());
                }
                if let Some(l) = state.borrow_mut().links.get_mut(&peer) {
                    l.last_error = Some(e);
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Runs an established link until it breaks.
async fn run_link(state: State, peer: NodeId, stream: TcpStream, mut dec: FrameDecoder) {
    let (compress, heartbeat, dead_after) = {
        let s = state.borrow();
        (
            s.compress,
            Duration::from_millis(s.cfg.link.heartbeat_ms),
            Duration::from_millis(s.cfg.link.dead_after_ms),
        )
    };
    let wire = match Wire::new(Sock::Tcp(stream), compress) {
        Ok(w) => Rc::new(w),
        Err(e) => return warn!("link to node {peer}: cannot register the socket: {e}"),
    };
    {
        let mut s = state.borrow_mut();
        if let Some(old) = s.peers.insert(peer, wire.clone()) {
            // The peer restarted and redialed before we noticed the old link die.
            old.close();
            s.core.on_link_down(peer);
        }
        if let Some(l) = s.links.get_mut(&peer) {
            l.up = true;
            l.since = Instant::now();
            l.last_error = None;
        }
        s.core.on_link_up(peer);
        s.drive();
    }
    info!("link to node {peer} up");
    let writer = wire.clone();
    tokio::task::spawn_local(async move { writer.writer().await });
    let last_rx = Rc::new(Cell::new(Instant::now()));
    tokio::task::spawn_local(heartbeat_task(
        state.clone(),
        peer,
        wire.clone(),
        last_rx.clone(),
        heartbeat,
        dead_after,
    ));

    let reason = 'read: loop {
        // Frames that arrived before the link was shared (rare) are in `dec` already.
        {
            let now = Instant::now();
            let mut s = state.borrow_mut();
            loop {
                match dec.next_frame::<PeerFrame>() {
                    Ok(Some((frame, tail))) => match frame {
                        PeerFrame::Ping => s.send_peer(peer, &PeerFrame::Pong, &[]),
                        PeerFrame::Pong => {}
                        f @ PeerFrame::VcopyData { .. } => s.vcopy_chunk(peer, f, &tail),
                        f @ PeerFrame::MigrImage { .. } => s.migr_image_chunk(f, &tail),
                        f => s.core.on_peer_frame(peer, f, now),
                    },
                    Ok(None) => break,
                    Err(e) => {
                        s.drive();
                        break 'read format!("malformed frame from node {peer}: {e}");
                    }
                }
            }
            s.drive();
        }
        match wire.read(dec.buffer(), READ_CHUNK).await {
            Ok(0) => {
                break if wire.is_closed() {
                    "closed".to_string()
                } else {
                    "peer closed the connection".to_string()
                }
            }
            Ok(_) => last_rx.set(Instant::now()),
            Err(e) => break e.to_string(),
        }
    };
    wire.close();
    let mut s = state.borrow_mut();
    let current = s.peers.get(&peer).is_some_and(|w| Rc::ptr_eq(w, &wire));
    if current {
        s.peers.remove(&peer);
        if let Some(l) = s.links.get_mut(&peer) {
            l.up = false;
            l.since = Instant::now();
            l.last_error = Some(reason.clone());
        }
        s.core.on_link_down(peer);
        s.drive();
        warn!("link to node {peer} down: {reason}");
    }
}

async fn heartbeat_task(
    state: State,
    peer: NodeId,
    wire: Rc<Wire>,
    last_rx: Rc<Cell<Instant>>,
    every: Duration,
    dead_after: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if wire.is_closed() {
            return;
        }
        if last_rx.get().elapsed() > dead_after {
            warn!("link to node {peer}: nothing heard for {dead_after:?}, closing it");
            wire.close();
            return;
        }
        let mut s = state.borrow_mut();
        if s.peers.get(&peer).is_some_and(|w| Rc::ptr_eq(w, &wire)) {
            s.send_peer(peer, &PeerFrame::Ping, &[]);
            s.drive();
        }
    }
}
