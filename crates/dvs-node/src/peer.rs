//! Peer links: one TCP connection per node pair, dialed by the node with the lower id.
//!
//! A link starts with a mutual TLS handshake (both nodes present a certificate of the cluster
//! CA naming their node id; see `dvs-tls`), then `Hello` (protocol version, cluster id, node
//! id, which must be the one the certificate names) answered by `Welcome` or `Refuse`; then
//! frames flow both ways. A refused peer learns nothing about the cluster; the log says why.
//! Until the handshake is done a connection may send only small frames, and only
//! [`MAX_HANDSHAKES`] connections may be in it at once. Idle links carry `Ping`/`Pong`; a link silent for
//! `dead_after_ms` is declared down. The dialing side reconnects by itself.

use dvs_core::Input;
use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use dvs_wire::frame::HANDSHAKE_MAX_FRAME;
use dvs_wire::peer::PeerFrame;
use dvs_wire::peer::{BulkFrame, Hello, ImageChunk, LinkFrame, Refuse, VcopyData, Welcome};
use dvs_wire::{FrameDecoder, NodeId, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{error, info, warn};

use crate::wire::{Sock, TlsLink, Wire};
use crate::State;
use bytes::{Buf, BytesMut};

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

/// Most peer connections in their handshake at once; more are closed at accept, so that a
/// flood of connections that never authenticate costs a bounded amount of memory.
pub(crate) const MAX_HANDSHAKES: usize = 64;

/// What a refused peer is told: nothing about the cluster. The node logs the real reason.
const REFUSAL: &str = "link refused";

async fn accept_loop(state: State, listener: TcpListener) {
    let mut last_full_warning: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let full = {
                    let mut s = state.borrow_mut();
                    if s.handshakes >= MAX_HANDSHAKES {
                        true
                    } else {
                        s.handshakes += 1;
                        false
                    }
                };
                if full {
                    if last_full_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        warn!(
                            "{MAX_HANDSHAKES} peer connections are already in their handshake: \
                             dropping the one from {addr} (and others for 5 s, silently)"
                        );
                        last_full_warning = Some(Instant::now());
                    }
                    drop(stream);
                    continue;
                }
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
async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    dec: &mut FrameDecoder,
) -> Result<PeerFrame, String> {
    let mut buf = [0u8; 4096];
    loop {
        match dec.next_frame::<PeerFrame>() {
            Ok(Some((f, _))) => return Ok(f),
            Ok(None) => {}
            Err(e) => return Err(format!("malformed handshake frame: {e}")),
        }
        let n = match stream.read(&mut buf).await {
            // A TLS peer that closes without close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            r => r.map_err(|e| e.to_string())?,
        };
        if n == 0 {
            return Err("connection closed during the handshake".into());
        }
        dec.extend(&buf[..n]);
    }
}

async fn write_frame<S: AsyncWrite + Unpin>(stream: &mut S, f: &PeerFrame) -> std::io::Result<()> {
    let b = dvs_wire::frame::encode_to_vec(f, &[], false).expect("handshake frames encode");
    stream.write_all(&b).await?;
    stream.flush().await
}

/// Tells a refused peer [`REFUSAL`] and ends the stream (over TLS with close_notify, so
/// that the peer sees a clean end rather than a truncation).
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S) {
    let _ = write_frame(
        stream,
        &PeerFrame::Link(LinkFrame::Refuse(Refuse {
            reason: REFUSAL.into(),
        })),
    )
    .await;
    let _ = stream.shutdown().await;
}

/// A link that finished its handshake: the socket (with its TLS session), the frames read
/// past the handshake, and the serial of the peer's certificate.
struct Established {
    sock: Sock,
    dec: FrameDecoder,
    serial: Option<String>,
}

/// The accepting side's handshake: TLS (unless off), then `Hello` → `Welcome`.
async fn accept_handshake(
    state: &State,
    mut tcp: TcpStream,
) -> Result<(NodeId, Established), String> {
    let (me, cluster, tls) = {
        let s = state.borrow();
        (
            s.me.id,
            s.cfg.cluster_id.clone(),
            s.security.tls.as_ref().map(|t| t.server.clone()),
        )
    };
    let mut dec = FrameDecoder::with_limit(HANDSHAKE_MAX_FRAME);
    let check_hello = |hello: &PeerFrame, cert_node: Option<NodeId>| -> Result<NodeId, String> {
        match hello {
            PeerFrame::Link(LinkFrame::Hello(Hello { version, .. }))
                if *version != PROTOCOL_VERSION =>
            {
                Err(format!(
                    "protocol version mismatch (ours {PROTOCOL_VERSION}, theirs {version})"
                ))
            }
            PeerFrame::Link(LinkFrame::Hello(Hello { cluster: c, .. })) if *c != cluster => {
                Err(format!("its Hello names another cluster ({c:?})"))
            }
            PeerFrame::Link(LinkFrame::Hello(Hello { node, .. }))
                if cert_node.is_some_and(|n| n != *node) =>
            {
                Err(format!(
                    "it claims node id {node} but its certificate names node {}",
                    cert_node.unwrap_or_default()
                ))
            }
            PeerFrame::Link(LinkFrame::Hello(Hello { node, .. }))
                if *node == me || state.borrow().cfg.node_by_id(*node).is_none() =>
            {
                Err(format!(
                    "node id {node} is not a peer in our cluster config"
                ))
            }
            PeerFrame::Link(LinkFrame::Hello(Hello { node, .. })) => Ok(*node),
            other => Err(format!("expected Hello, got {}", other.kind())),
        }
    };
    match tls {
        Some(cfg) => {
            let mut stream = tokio_rustls::TlsAcceptor::from(cfg)
                .accept(tcp)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            let id =
                dvs_tls::verifier::peer_identity(stream.get_ref().1).map_err(|e| e.to_string())?;
            let refusal = state.borrow().security.refuse(&cluster, &id);
            let hello = match refusal {
                Some(r) => Err(r),
                None => read_frame(&mut stream, &mut dec).await,
            };
            let node = hello.and_then(|h| check_hello(&h, Some(id.node)));
            let node = match node {
                Ok(n) => n,
                Err(e) => {
                    refuse(&mut stream).await;
                    return Err(e);
                }
            };
            write_frame(
                &mut stream,
                &PeerFrame::Link(LinkFrame::Welcome(Welcome { node: me })),
            )
            .await
            .map_err(|e| e.to_string())?;
            let (mut tcp, conn) = stream.into_inner();
            let (sealer, mut opener) = dvs_tls::records::take_over(conn)?;
            // The dialer speaks first on the record layer (see `dial_handshake`): until then
            // nothing is sent, so no record of ours can reach the dialer's rustls session.
            // (A dialer that sent more behind its Hello broke the protocol: its bytes are
            // already in `dec`, and the link fails on them.)
            let mut cipher_in = BytesMut::new();
            while dec.buffered() == 0 {
                let used = opener
                    .open(&mut cipher_in, |d| dec.extend(d))
                    .map_err(|e| format!("first record: {e}"))?;
                cipher_in.advance(used);
                if dec.buffered() > 0 {
                    break;
                }
                if cipher_in.len() > 2 * HANDSHAKE_MAX_FRAME + 64 {
                    return Err("first record too large".into());
                }
                cipher_in.reserve(4096);
                let n = tcp
                    .read_buf(&mut cipher_in)
                    .await
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed during the handshake".into());
                }
            }
            Ok((
                node,
                Established {
                    sock: Sock::Tls(
                        tcp,
                        Box::new(TlsLink {
                            sealer,
                            opener,
                            cipher_in,
                        }),
                    ),
                    dec,
                    serial: Some(id.serial),
                },
            ))
        }
        None => {
            let hello = read_frame(&mut tcp, &mut dec).await;
            let node = match hello.and_then(|h| check_hello(&h, None)) {
                Ok(n) => n,
                Err(e) => {
                    refuse(&mut tcp).await;
                    return Err(e);
                }
            };
            write_frame(
                &mut tcp,
                &PeerFrame::Link(LinkFrame::Welcome(Welcome { node: me })),
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok((
                node,
                Established {
                    sock: Sock::Tcp(tcp),
                    dec,
                    serial: None,
                },
            ))
        }
    }
}

async fn accept_one(state: State, stream: TcpStream, addr: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_handshake(&state, stream)).await;
    state.borrow_mut().handshakes -= 1;
    match r {
        Ok(Ok((node, link))) => run_link(state, node, link).await,
        Ok(Err(e)) => warn!("refused a peer link from {addr}: {e}"),
        Err(_) => {
            warn!("refused a peer link from {addr}: no handshake within {HANDSHAKE_TIMEOUT:?}")
        }
    }
}

/// The dialing side's handshake: TLS (unless off), then `Hello` → `Welcome`.
async fn dial_handshake(
    state: &State,
    me: NodeId,
    peer: NodeId,
    addr: SocketAddr,
) -> Result<Established, String> {
    let (cluster, tls) = {
        let s = state.borrow();
        (
            s.cfg.cluster_id.clone(),
            s.security.tls.as_ref().map(|t| t.client.clone()),
        )
    };
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let hello = PeerFrame::Link(LinkFrame::Hello(Hello {
        version: PROTOCOL_VERSION,
        cluster: cluster.clone(),
        node: me,
    }));
    let mut dec = FrameDecoder::with_limit(HANDSHAKE_MAX_FRAME);
    let answer = |f: Result<PeerFrame, String>| match f {
        Ok(PeerFrame::Link(LinkFrame::Welcome(Welcome { node }))) if node == peer => Ok(()),
        Ok(PeerFrame::Link(LinkFrame::Welcome(Welcome { node }))) => Err(format!(
            "{addr} is node {node}, not node {peer} as configured"
        )),
        Ok(PeerFrame::Link(LinkFrame::Refuse(Refuse { reason }))) => Err(format!(
            "node {peer} refused our link: {reason} (its log says why)"
        )),
        Ok(other) => Err(format!("unexpected handshake answer {}", other.kind())),
        Err(e) => Err(e),
    };
    match tls {
        Some(cfg) => {
            let mut stream = tokio_rustls::TlsConnector::from(cfg)
                .connect(dvs_tls::verifier::server_name(), tcp)
                .await
                .map_err(|e| format!("TLS handshake with {addr} failed: {e}"))?;
            let id =
                dvs_tls::verifier::peer_identity(stream.get_ref().1).map_err(|e| e.to_string())?;
            if let Some(r) = state.borrow().security.refuse(&cluster, &id) {
                return Err(format!("refusing the link to {addr}: {r}"));
            }
            if id.node != peer {
                return Err(format!(
                    "{addr} presents the certificate of node {}, not node {peer} as configured",
                    id.node
                ));
            }
            write_frame(&mut stream, &hello)
                .await
                .map_err(|e| e.to_string())?;
            answer(read_frame(&mut stream, &mut dec).await)?;
            let (mut tcp, conn) = stream.into_inner();
            let (mut sealer, opener) = dvs_tls::records::take_over(conn)?;
            // The first record on the record layer, which the accepting side waits for.
            let ping =
                dvs_wire::frame::encode_to_vec(&PeerFrame::Link(LinkFrame::Ping), &[], false)
                    .expect("a ping encodes");
            let mut out = Vec::new();
            sealer.seal(&ping, &mut out).map_err(|e| e.to_string())?;
            tcp.write_all(&out).await.map_err(|e| e.to_string())?;
            Ok(Established {
                sock: Sock::Tls(
                    tcp,
                    Box::new(TlsLink {
                        sealer,
                        opener,
                        cipher_in: BytesMut::new(),
                    }),
                ),
                dec,
                serial: Some(id.serial),
            })
        }
        None => {
            let mut tcp = tcp;
            write_frame(&mut tcp, &hello)
                .await
                .map_err(|e| e.to_string())?;
            answer(read_frame(&mut tcp, &mut dec).await)?;
            Ok(Established {
                sock: Sock::Tcp(tcp),
                dec,
                serial: None,
            })
        }
    }
}

async fn dial_loop(state: State, me: NodeId, peer: NodeId, addr: SocketAddr) {
    let base = {
        let s = state.borrow();
        Duration::from_millis(s.cfg.link.reconnect_ms.max(1))
    };
    let mut backoff = base;
    let mut last_logged: Option<String> = None;
    loop {
        let attempt =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, dial_handshake(&state, me, peer, addr));
        let result = match attempt.await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no handshake with {addr} within {HANDSHAKE_TIMEOUT:?}"
            )),
        };
        match result {
            Ok(link) => {
                backoff = base;
                last_logged = None;
                run_link(state.clone(), peer, link).await;
            }
            Err(e) => {
                // Log each distinct failure once, not every retry.
                if last_logged.as_ref() != Some(&e) {
                    if e.contains("refused our link")
                        || e.contains("refusing")
                        || e.contains("certificate")
                        || e.contains("not node")
                        || e.contains("TLS")
                    {
                        error!("link to node {peer}: {e}");
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
async fn run_link(state: State, peer: NodeId, link: Established) {
    let Established {
        sock,
        mut dec,
        serial,
    } = link;
    dec.set_limit(dvs_wire::MAX_FRAME);
    let (compress, heartbeat, dead_after) = {
        let s = state.borrow();
        (
            s.compress,
            Duration::from_millis(s.cfg.link.heartbeat_ms),
            Duration::from_millis(s.cfg.link.dead_after_ms),
        )
    };
    let wire = match Wire::new(sock, compress) {
        Ok(w) => Rc::new(w),
        Err(e) => return warn!("link to node {peer}: cannot register the socket: {e}"),
    };
    {
        let mut s = state.borrow_mut();
        if let Some(old) = s.peers.remove(&peer) {
            // The peer restarted and redialed before we noticed the old link die. Only an
            // authenticated node gets here, and the old link is closed (and every call that
            // depended on it failed) before the new one carries anything.
            warn!("node {peer} opened a new link while the old one was up: closing the old one");
            old.close();
            s.core
                .handle(Instant::now(), Input::LinkDown { node: peer });
            s.drive();
        }
        s.peers.insert(peer, wire.clone());
        if let Some(l) = s.links.get_mut(&peer) {
            l.up = true;
            l.since = Instant::now();
            l.last_error = None;
            l.serial = serial;
            l.max_silence = Duration::ZERO;
        }
        s.core.handle(Instant::now(), Input::LinkUp { node: peer });
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
                        PeerFrame::Link(LinkFrame::Ping) => {
                            s.send_peer(peer, &PeerFrame::Link(LinkFrame::Pong), &[])
                        }
                        PeerFrame::Link(LinkFrame::Pong) => {}
                        f @ PeerFrame::Bulk(BulkFrame::VcopyData(VcopyData { .. })) => {
                            s.vcopy_chunk(peer, f, tail)
                        }
                        f @ PeerFrame::Bulk(BulkFrame::ImageChunk(ImageChunk { .. })) => {
                            s.migr_image_chunk(peer, f, &tail)
                        }
                        f => s.core.handle(
                            now,
                            Input::PeerFrame {
                                from: peer,
                                frame: f,
                            },
                        ),
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
            Ok(_) => {
                let now = Instant::now();
                let silence = now - last_rx.replace(now);
                if let Some(l) = state.borrow_mut().links.get_mut(&peer) {
                    l.max_silence = l.max_silence.max(silence);
                }
            }
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
        s.core
            .handle(Instant::now(), Input::LinkDown { node: peer });
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
            s.send_peer(peer, &PeerFrame::Link(LinkFrame::Ping), &[]);
            s.drive();
        }
    }
}
