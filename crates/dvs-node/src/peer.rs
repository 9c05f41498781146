//! Peer links: one TCP connection per node pair, dialed by the node with the lower id.
//!
//! A link starts with a mutual TLS handshake (both nodes present a certificate of the cluster
//! CA naming their node id; see `dvs-tls`), then `Hello` (protocol version, cluster id, node
//! id, which must be the one the certificate names) answered by `Welcome` or `Refuse`; then
//! frames flow both ways (see `handshake.rs`). A refused peer learns nothing about the
//! cluster; the log says why. Until the handshake is done a connection may send only small
//! frames, and only [`MAX_HANDSHAKES`] connections may be in it at once. Idle links carry
//! `Ping`/`Pong`; a link silent for `dead_after_ms` is declared down. The dialing side
//! reconnects by itself.
//!
//! A handshake's task hands the link to the event loop ([`LinkEvent::Established`]), which
//! owns its writer and starts its reader and heartbeat tasks; they report back as
//! [`LinkEvent`]s tagged with the link's [`LinkId`], so that what a replaced link still
//! delivers is dropped.

use dvs_core::{Input, VcopyChunk};
use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dvs_wire::peer::{BulkFrame, CtlFrame, ImageChunk, LinkFrame, PeerFrame};
use dvs_wire::{FrameDecoder, NodeId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{error, info, warn};

use crate::event_loop::{Ctx, Event, Node};
use crate::handshake::{accept_handshake, dial_handshake, Established};
use crate::images::IMAGE_BACKLOG;
use crate::wire::Wire;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes asked for per read of an established link (vcopy chunks are 256 KiB frames; they
/// are read straight into the frame decoder's buffer).
const READ_CHUNK: usize = 256 * 1024;

/// Most peer connections in their handshake at once; more are closed at accept, so that a
/// flood of connections that never authenticate costs a bounded amount of memory.
pub(crate) const MAX_HANDSHAKES: usize = 64;

/// Names one link (one connection) to a peer, unique for the node's lifetime.
pub(crate) type LinkId = u64;

/// What a link's tasks tell the event loop.
pub(crate) enum LinkEvent {
    /// A link to `node` finished its handshake; `ended` fires once it is over (its dialer
    /// then dials again).
    Established {
        node: NodeId,
        link: Established,
        ended: Option<oneshot::Sender<()>>,
    },
    /// What one read of link `link` to `node` decoded, in order.
    Frames {
        node: NodeId,
        link: LinkId,
        frames: Vec<Incoming>,
    },
    /// Time to send a `Ping`.
    Heartbeat { node: NodeId, link: LinkId },
    /// The link broke (or was closed) for `reason`.
    Down {
        node: NodeId,
        link: LinkId,
        reason: String,
    },
    /// Dialing `node` failed.
    DialFailed { node: NodeId, error: String },
}

/// A frame from a peer, as the link's reader hands it over.
pub(crate) enum Incoming {
    /// `Ping`: answered by the event loop.
    Ping,
    /// Anything for the core (vcopy chunks included: the core checks them).
    Input(Input),
    /// An operator request relayed between nodes, or its answer (see `relay.rs`).
    Ctl(CtlFrame),
    /// A chunk of a migration image; `permit` holds its share of the link's
    /// [`IMAGE_BACKLOG`] until the chunk is written.
    Image {
        chunk: ImageChunk,
        data: Bytes,
        permit: OwnedSemaphorePermit,
    },
}

/// State of a peer link, for status.
pub(crate) struct LinkInfo {
    pub up: bool,
    pub since: Instant,
    pub last_error: Option<String>,
    /// Serial of the certificate the peer presented on the current link (TLS only).
    pub serial: Option<String>,
    /// Longest silence of the last link (the current one keeps its own, see [`PeerLink`]).
    pub max_silence: Duration,
}

impl LinkInfo {
    /// A link never up yet.
    pub fn new() -> Self {
        LinkInfo {
            up: false,
            since: Instant::now(),
            last_error: None,
            serial: None,
            max_silence: Duration::ZERO,
        }
    }
}

/// An established link: its writer (owned by the event loop, shared with the link's reader,
/// writer and heartbeat tasks) and what its reader has heard.
pub(crate) struct PeerLink {
    pub id: LinkId,
    pub wire: Rc<Wire>,
    /// When the reader last got bytes.
    last_rx: Cell<Instant>,
    /// Longest time the link went without receiving anything (heartbeats come every
    /// `heartbeat_ms`: more means the peer, or this node, was too busy to keep up).
    max_silence: Cell<Duration>,
}

impl PeerLink {
    /// Records that bytes arrived now.
    fn heard(&self) {
        let now = Instant::now();
        let silence = now - self.last_rx.replace(now);
        self.max_silence.set(self.max_silence.get().max(silence));
    }

    /// See [`PeerLink::max_silence`] (the field).
    pub fn max_silence(&self) -> Duration {
        self.max_silence.get()
    }
}

/// Starts the listener and one dialer per peer with a higher id.
pub(crate) fn start(ctx: &Rc<Ctx>, listener: TcpListener) {
    tokio::task::spawn_local(accept_loop(ctx.clone(), listener));
    for n in ctx.cfg.nodes.iter().filter(|n| n.id > ctx.me.id) {
        tokio::task::spawn_local(dial_loop(ctx.clone(), n.id, n.peer_addr));
    }
}

impl Node {
    /// A node that joined the cluster (it holds a membership lease) but is not in this node's
    /// config: link to it like to a configured peer, the lower id dialing. Only with TLS,
    /// where the cluster's CA vouches for its id.
    pub(crate) fn peer_joined(&mut self, node: NodeId, addr: &str) {
        if node == self.ctx.me.id || self.links.contains_key(&node) {
            return;
        }
        if !self.ctx.cfg.link.tls {
            return warn!("node {node} holds a membership lease but is not in the config, and plaintext links cannot authenticate it: not linking to it");
        }
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            return warn!("node {node} joined with a bad peer address {addr:?}");
        };
        info!("node {node} joined the cluster at {addr}");
        self.ctx.joined.borrow_mut().insert(node);
        self.links.insert(node, LinkInfo::new());
        if node > self.ctx.me.id {
            tokio::task::spawn_local(dial_loop(self.ctx.clone(), node, addr));
        }
    }
}

async fn accept_loop(ctx: Rc<Ctx>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let mut last_full_warning: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    tokio::task::spawn_local(accept_one(ctx.clone(), stream, addr, slot));
                }
                Err(_) => {
                    if last_full_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        warn!(
                            "{MAX_HANDSHAKES} peer connections are already in their handshake: \
                             dropping the one from {addr} (and others for 5 s, silently)"
                        );
                        last_full_warning = Some(Instant::now());
                    }
                    drop(stream);
                }
            },
            Err(e) => {
                warn!("accept on the peer socket failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs the accepting handshake, holding one of the [`MAX_HANDSHAKES`] slots meanwhile.
async fn accept_one(ctx: Rc<Ctx>, stream: TcpStream, addr: SocketAddr, slot: OwnedSemaphorePermit) {
    if ctx.fenced.get() {
        // A fenced node takes no link until it holds its lease again (membership.rs).
        return;
    }
    let _ = stream.set_nodelay(true);
    let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_handshake(&ctx, stream)).await;
    drop(slot);
    match r {
        Ok(Ok((node, link))) => {
            let ev = LinkEvent::Established {
                node,
                link,
                ended: None,
            };
            let _ = ctx.events.send(Event::Link(ev)).await;
        }
        Ok(Err(e)) => warn!("refused a peer link from {addr}: {e}"),
        Err(_) => {
            warn!("refused a peer link from {addr}: no handshake within {HANDSHAKE_TIMEOUT:?}")
        }
    }
}

async fn dial_loop(ctx: Rc<Ctx>, peer: NodeId, addr: SocketAddr) {
    let base = Duration::from_millis(ctx.cfg.link.reconnect_ms.max(1));
    let mut backoff = base;
    let mut last_logged: Option<String> = None;
    loop {
        while ctx.fenced.get() {
            // No link while fenced (membership.rs).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if ctx.cfg.node_by_id(peer).is_none() && !ctx.joined.borrow().contains(&peer) {
            // A node that joined without being in the config, and left.
            return;
        }
        let attempt = tokio::time::timeout(HANDSHAKE_TIMEOUT, dial_handshake(&ctx, peer, addr));
        let result = match attempt.await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no handshake with {addr} within {HANDSHAKE_TIMEOUT:?}"
            )),
        };
        let ev = match result {
            Ok(link) => {
                backoff = base;
                last_logged = None;
                let (ended, over) = oneshot::channel();
                let ev = LinkEvent::Established {
                    node: peer,
                    link,
                    ended: Some(ended),
                };
                if ctx.events.send(Event::Link(ev)).await.is_err() {
                    return;
                }
                // Dial again once the link is over.
                let _ = over.await;
                None
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
                backoff = (backoff * 2).min(Duration::from_secs(1));
                Some(LinkEvent::DialFailed {
                    node: peer,
                    error: e,
                })
            }
        };
        if let Some(ev) = ev {
            if ctx.events.send(Event::Link(ev)).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Reads an established link until it breaks, handing what it reads to the event loop in
/// order.
async fn read_link(
    ctx: Rc<Ctx>,
    node: NodeId,
    link: Rc<PeerLink>,
    mut dec: FrameDecoder,
    ended: Option<oneshot::Sender<()>>,
) {
    let id = link.id;
    // Image bytes read and not yet written to their files: past this the link is not read
    // until the image writer catches up.
    let backlog = Arc::new(Semaphore::new(IMAGE_BACKLOG));
    let batch = |frames| {
        Event::Link(LinkEvent::Frames {
            node,
            link: id,
            frames,
        })
    };
    let reason = 'read: loop {
        // Frames that arrived with the end of the handshake (rare) are in `dec` already.
        let mut frames = Vec::new();
        let malformed = loop {
            let incoming = match dec.next_frame::<PeerFrame>() {
                Ok(Some((frame, tail))) => match frame {
                    PeerFrame::Link(LinkFrame::Ping) => Incoming::Ping,
                    PeerFrame::Link(LinkFrame::Pong) => continue,
                    f @ PeerFrame::Bulk(BulkFrame::VcopyData(_)) => {
                        // The core checks the chunk, then asks for the write.
                        let Some(chunk) = VcopyChunk::from_frame(&f, tail.len() as u64) else {
                            continue;
                        };
                        Incoming::Input(Input::VcopyChunk {
                            from: node,
                            chunk,
                            data: tail,
                        })
                    }
                    PeerFrame::Bulk(BulkFrame::ImageChunk(chunk)) => {
                        let n = tail.len().min(IMAGE_BACKLOG) as u32;
                        let permit = match backlog.clone().try_acquire_many_owned(n) {
                            Ok(p) => p,
                            Err(_) => {
                                // The writer is behind: hand over what is decoded, then wait.
                                let before = std::mem::take(&mut frames);
                                if !before.is_empty()
                                    && ctx.events.send(batch(before)).await.is_err()
                                {
                                    break 'read "the node is stopping".to_string();
                                }
                                let Ok(p) = backlog.clone().acquire_many_owned(n).await else {
                                    break 'read "closed".to_string();
                                };
                                p
                            }
                        };
                        Incoming::Image {
                            chunk,
                            data: tail,
                            permit,
                        }
                    }
                    PeerFrame::Ctl(f) => Incoming::Ctl(f),
                    frame => Incoming::Input(Input::PeerFrame { from: node, frame }),
                },
                Ok(None) => break None,
                Err(e) => break Some(format!("malformed frame from node {node}: {e}")),
            };
            frames.push(incoming);
        };
        // One read's frames go together: the loop answers their pings as it meets them and
        // carries out the core's actions after the last one.
        if !frames.is_empty() && ctx.events.send(batch(frames)).await.is_err() {
            break 'read "the node is stopping".to_string();
        }
        if let Some(reason) = malformed {
            break reason;
        }
        match link.wire.read(dec.buffer(), READ_CHUNK).await {
            Ok(0) => {
                break if link.wire.is_closed() {
                    "closed".to_string()
                } else {
                    "peer closed the connection".to_string()
                }
            }
            Ok(_) => link.heard(),
            Err(e) => break e.to_string(),
        }
    };
    link.wire.close();
    let _ = ctx
        .events
        .send(Event::Link(LinkEvent::Down {
            node,
            link: id,
            reason,
        }))
        .await;
    if let Some(ended) = ended {
        let _ = ended.send(());
    }
}

/// Closes a link that stayed silent too long, and asks the event loop for a `Ping` every
/// `heartbeat_ms`.
async fn heartbeat(ctx: Rc<Ctx>, node: NodeId, link: Rc<PeerLink>) {
    let every = Duration::from_millis(ctx.cfg.link.heartbeat_ms);
    let dead_after = Duration::from_millis(ctx.cfg.link.dead_after_ms);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if link.wire.is_closed() {
            return;
        }
        if link.last_rx.get().elapsed() > dead_after {
            warn!("link to node {node}: nothing heard for {dead_after:?}, closing it");
            link.wire.close();
            return;
        }
        let ev = LinkEvent::Heartbeat {
            node,
            link: link.id,
        };
        if ctx.events.send(Event::Link(ev)).await.is_err() {
            return;
        }
    }
}

impl Node {
    /// Handles what a link's tasks report.
    pub(crate) fn link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Established { node, link, ended } => self.link_up(node, link, ended),
            LinkEvent::Frames { node, link, frames } => {
                if self.is_current(node, link) {
                    self.frames(node, frames);
                }
            }
            LinkEvent::Heartbeat { node, link } => {
                if self.is_current(node, link) {
                    self.send_peer(node, &PeerFrame::Link(LinkFrame::Ping), &[]);
                }
            }
            LinkEvent::Down { node, link, reason } => self.link_down(node, link, reason),
            LinkEvent::DialFailed { node, error } => {
                if let Some(l) = self.links.get_mut(&node) {
                    l.last_error = Some(error);
                }
            }
        }
    }

    /// Hands what one read of the link to `node` decoded to the core, then carries out what
    /// follows: pings are answered before the actions of the frames before them, as frames
    /// of one read were always handled.
    fn frames(&mut self, node: NodeId, frames: Vec<Incoming>) {
        let now = Instant::now();
        for f in frames {
            match f {
                Incoming::Ping => self.send_peer(node, &PeerFrame::Link(LinkFrame::Pong), &[]),
                Incoming::Input(input) => self.core.handle(now, input),
                Incoming::Ctl(f) => self.relay_frame(node, f),
                Incoming::Image {
                    chunk,
                    data,
                    permit,
                } => self.migr_image_chunk(node, chunk, data, permit),
            }
        }
        self.execute_actions();
    }

    /// Whether `link` is the current link to `node` (a replaced link's frames are dropped).
    fn is_current(&self, node: NodeId, link: LinkId) -> bool {
        self.peers.get(&node).is_some_and(|l| l.id == link)
    }

    /// Takes over a link whose handshake is done: registers its writer and starts its tasks.
    fn link_up(&mut self, node: NodeId, link: Established, ended: Option<oneshot::Sender<()>>) {
        let Established {
            sock,
            mut dec,
            serial,
        } = link;
        if self.fenced {
            // Finished its handshake while this node fenced itself: dropping it closes it
            // (and makes a dialer dial again later).
            return;
        }
        dec.set_limit(dvs_wire::MAX_FRAME);
        let compress = self.ctx.cfg.link.compression == dvs_config::Compression::Lz4;
        let wire = match Wire::new(sock, compress) {
            Ok(w) => Rc::new(w),
            // Dropping `ended` makes the dialer dial again.
            Err(e) => return warn!("link to node {node}: cannot register the socket: {e}"),
        };
        self.next_link += 1;
        let link = Rc::new(PeerLink {
            id: self.next_link,
            wire,
            last_rx: Cell::new(Instant::now()),
            max_silence: Cell::new(Duration::ZERO),
        });
        if let Some(old) = self.peers.remove(&node) {
            // The peer restarted and redialed before we noticed the old link die. Only an
            // authenticated node gets here, and the old link is closed (and every call that
            // depended on it failed) before the new one carries anything.
            warn!("node {node} opened a new link while the old one was up: closing the old one");
            old.wire.close();
            self.relays_link_down(node);
            self.input(Input::LinkDown { node });
        }
        self.peers.insert(node, link.clone());
        // A node that joined after this one started (not in its config) gets an entry too.
        let l = self.links.entry(node).or_insert_with(LinkInfo::new);
        l.up = true;
        l.since = Instant::now();
        l.last_error = None;
        l.serial = serial;
        l.max_silence = Duration::ZERO;
        self.input(Input::LinkUp { node });
        info!("link to node {node} up");
        let writer = link.wire.clone();
        tokio::task::spawn_local(async move { writer.writer().await });
        tokio::task::spawn_local(heartbeat(self.ctx.clone(), node, link.clone()));
        tokio::task::spawn_local(read_link(self.ctx.clone(), node, link, dec, ended));
    }

    /// A link's reader stopped: if it was the current link, the link is down.
    fn link_down(&mut self, node: NodeId, link: LinkId, reason: String) {
        if !self.is_current(node, link) {
            return;
        }
        let Some(old) = self.peers.remove(&node) else {
            return;
        };
        if let Some(l) = self.links.get_mut(&node) {
            l.up = false;
            l.since = Instant::now();
            l.last_error = Some(reason.clone());
            l.max_silence = old.max_silence();
        }
        self.relays_link_down(node);
        self.input(Input::LinkDown { node });
        warn!("link to node {node} down: {reason}");
        self.forget_if_left(node);
    }

    /// Closes every link whose peer certificate is on the deny list now.
    pub(crate) fn close_revoked_links(&mut self) {
        let auth = self.ctx.auth.borrow().clone();
        for (node, l) in &self.links {
            let Some(serial) = &l.serial else { continue };
            if auth.cfg.is_revoked(serial) {
                if let Some(p) = self.peers.get(node) {
                    warn!("closing the link to node {node}: its certificate (serial {serial}) is revoked now");
                    p.wire.close();
                }
            }
        }
    }
}
