//! The dvs node kernel: a thin async shell around [`dvs_core::NodeCore`].
//!
//! One single-threaded tokio runtime runs everything: the local socket server (one connection
//! per bound endpoint), the peer links, the directory glue, the control socket and the
//! launcher. All of them turn socket input into core events and carry out the core's
//! [`Action`]s in [`Shared::drive`]; none of the IPC semantics live here.

mod access;
pub mod ctl;
mod ctl_server;
mod dir;
mod launcher;
mod local;
mod migrate;
mod peer;
mod safe_fs;
mod tls;
pub mod vcopy;
mod wire;

use dvs_core::{
    DirRequest, Input, LocalAction, MemoryAction, PeerAction, ProcessAction, Report, Ticket,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Instant;

use dvs_config::{ClusterConfig, Compression, NodeConfig};
use dvs_core::{Action, ConnId, CoreConfig, DcInfo, NodeCore, VcopyChunk};
use dvs_directory::{Directory, EmbeddedDirectory};
use dvs_wire::peer::PeerFrame;
use dvs_wire::peer::{BulkFrame, VcopyData};
use dvs_wire::{Errno, NodeId};
use tokio::sync::{mpsc, Notify};
use tracing::{error, info, warn};

use crate::dir::DirOp;
use crate::launcher::Procs;
use crate::wire::Wire;

/// Why a node kernel could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node id is not in the config.
    #[error("node {0} is not defined in the cluster config")]
    UnknownNode(String),
    /// A socket or folder could not be set up.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// The directory could not be opened.
    #[error("directory: {0}")]
    Directory(#[from] dvs_directory::DirError),
    /// Configured but not available in this build.
    #[error("{0}")]
    Unsupported(String),
    /// The node's TLS material does not load.
    #[error("TLS: {0}")]
    Tls(String),
    /// Local access control cannot be set up as configured (unknown group, unsafe folder).
    #[error("{0}")]
    Access(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

/// State of a peer link, for status.
pub(crate) struct LinkInfo {
    pub up: bool,
    pub since: Instant,
    pub last_error: Option<String>,
    /// Serial of the certificate the peer presented on the current link (TLS only).
    pub serial: Option<String>,
    /// Longest time the current link went without receiving anything (heartbeats come
    /// every `heartbeat_ms`: more means the peer, or this node, was too busy to keep up).
    pub max_silence: std::time::Duration,
}

/// Everything the event loop shares between its tasks (single thread, so `Rc<RefCell<_>>`).
pub(crate) struct Shared {
    pub core: NodeCore,
    pub cfg: ClusterConfig,
    pub me: NodeConfig,
    pub conns: HashMap<ConnId, Rc<Wire>>,
    pub peers: HashMap<NodeId, Rc<Wire>>,
    pub links: HashMap<NodeId, LinkInfo>,
    pub next_conn: ConnId,
    pub dir_tx: mpsc::UnboundedSender<DirOp>,
    pub compress: bool,
    dirty: Vec<Rc<Wire>>,
    bounce: Vec<u8>,
    /// Deadline the timer task sleeps towards; it is woken only when an earlier one appears.
    timer_armed: Option<Instant>,
    pub timer_wake: Rc<Notify>,
    pub procs: Procs,
    pub started: Instant,
    pub shutdown: Rc<Notify>,
    pub migrations: migrate::Migrations,
    /// TLS material and deny list of the peer links.
    pub security: tls::LinkSecurity,
    /// Peer connections that have not finished their handshake.
    pub handshakes: usize,
    /// Who may send control requests besides root.
    pub admin: access::AdminGroup,
    /// The umask the node was started with; launched programs get it back (the node itself
    /// runs with 077 so that whatever it creates is private).
    pub app_umask: u32,
    /// The `Rc` this state lives in, for tasks started from inside the event loop.
    pub self_ref: Weak<RefCell<Shared>>,
    /// Reports that answer a ticketed request, until the requester takes them.
    pub answers: HashMap<Ticket, Report>,
    /// Last ticket handed out.
    pub next_ticket: Ticket,
}

pub(crate) type State = Rc<RefCell<Shared>>;

impl Shared {
    /// Carries out every action the core has produced, then writes what was queued.
    pub fn drive(&mut self) {
        while let Some(action) = self.core.poll_action() {
            self.execute(action);
        }
        for w in self.dirty.drain(..) {
            w.flush();
        }
        let next = self.core.poll_timeout();
        if let Some(t) = next {
            if self.timer_armed.is_none_or(|armed| t < armed) {
                self.timer_armed = Some(t);
                self.timer_wake.notify_one();
            }
        }
    }

    fn execute(&mut self, action: Action) {
        match action {
            Action::Local(LocalAction::Respond { conn, resp }) => {
                if let Some(w) = self.conns.get(&conn) {
                    if let Err(e) = w.queue(&resp, &[]) {
                        error!("cannot encode a response: {e}");
                    }
                    mark(&mut self.dirty, w);
                }
            }
            Action::Local(LocalAction::Close { conn, reason }) => {
                if let Some(w) = self.conns.get(&conn) {
                    warn!(conn, "closing local connection: {reason}");
                    w.close();
                }
            }
            Action::Peer(PeerAction::Send { node, frame }) => self.send_peer(node, &frame, &[]),
            Action::Peer(PeerAction::Condemn {
                node,
                frame,
                reason,
            }) => {
                // The read loop sees the close and takes the link down.
                warn!(node, frame, %reason, "closing the link to a peer that sent a forged frame");
                if let Some(w) = self.peers.get(&node) {
                    w.close();
                }
            }
            Action::Directory(DirRequest::Register { conn, dc, ep }) => {
                self.dir(DirOp::Register { conn, dc, ep })
            }
            Action::Directory(DirRequest::Unregister { dc, ep }) => {
                self.dir(DirOp::Unregister { dc, ep })
            }
            Action::Directory(DirRequest::Sync { conn }) => self.dir(DirOp::Sync { conn }),
            Action::Directory(DirRequest::Lookup { dc, ep }) => self.dir(DirOp::Lookup { dc, ep }),
            Action::Memory(MemoryAction::CopyLocal {
                src_pid,
                src_addr,
                dst_pid,
                dst_addr,
                len,
                done,
            }) => {
                let r = vcopy::copy(src_pid, src_addr, dst_pid, dst_addr, len, &mut self.bounce);
                self.core
                    .handle(Instant::now(), Input::VcopyLocalDone { done, result: r });
            }
            Action::Directory(DirRequest::WriteMigrRecord {
                id,
                dc,
                ep,
                record,
                require,
            }) => self.dir(DirOp::MigrRecord {
                id,
                dc,
                ep,
                record,
                require,
            }),
            Action::Directory(DirRequest::Relocate { dc, ep, node }) => {
                self.dir(DirOp::Relocate { dc, ep, node })
            }
            Action::Directory(DirRequest::ReadMigrRecord { id, dc, ep }) => {
                self.dir(DirOp::ReadMigr { id, dc, ep })
            }
            Action::Process(ProcessAction::Checkpoint { id, pid, fail }) => {
                self.migr_checkpoint(id, pid, fail)
            }
            Action::Process(ProcessAction::SaveSnapshot { id, data, fail }) => {
                self.migr_save_snapshot(id, &data, fail)
            }
            Action::Process(ProcessAction::SendImage { id, to }) => self.migr_send_image(id, to),
            Action::Process(ProcessAction::Restore {
                id,
                dc,
                ep,
                backend,
                fail,
            }) => self.migr_restore(id, dc, ep, backend, fail),
            Action::Process(ProcessAction::KillTree { pid }) => self.migr_kill_tree(pid),
            Action::Process(ProcessAction::MigratedAway { pid, to }) => {
                self.procs.migrated_away(pid, to)
            }
            Action::Process(ProcessAction::ResumeTree { pid }) => self.migr_resume_tree(pid),
            Action::Report(Report::MigrProgress { id, phase }) => self.migr_progress(id, phase),
            Action::Report(
                r @ (Report::Registered { ticket, .. } | Report::MigrationAccepted { ticket, .. }),
            ) => {
                self.answers.insert(ticket, r);
            }
            Action::Memory(MemoryAction::WriteChunk {
                pid,
                from,
                chunk,
                data,
            }) => {
                let result = vcopy::write(pid, chunk.addr(), &data);
                self.core.handle(
                    Instant::now(),
                    Input::VcopyChunkWritten {
                        from,
                        chunk,
                        result,
                    },
                );
            }
            Action::Report(Report::MigrFinished { id, report }) => self.migr_finished(id, report),
            Action::Process(ProcessAction::DropImage { id }) => self.migr_drop_image(id),
            Action::Memory(MemoryAction::Stream {
                pid,
                src_addr,
                len,
                to,
                op,
                caller_node,
                dc,
                caller,
                dst,
                dst_addr,
            }) => {
                let Some(w) = self.peers.get(&to).cloned() else {
                    self.core.handle(
                        Instant::now(),
                        Input::VcopyStreamFailed {
                            caller_node,
                            op,
                            error: Errno::NodeUnreachable,
                        },
                    );
                    return;
                };
                let mut off = 0u64;
                while off < len {
                    let n = ((len - off) as usize).min(vcopy::CHUNK);
                    let f = PeerFrame::Bulk(BulkFrame::VcopyData(VcopyData {
                        op,
                        caller_node,
                        dc,
                        caller,
                        dst,
                        dst_addr,
                        offset: off,
                        total: len,
                    }));
                    let at = src_addr + off;
                    // Read the process's memory straight into the link's buffer when the link
                    // does not compress; through the bounce buffer otherwise.
                    let queued = match w.queue_filled(&f, n, |buf| vcopy::read(pid, at, buf)) {
                        Some(r) => r,
                        None => {
                            self.bounce.resize(n, 0);
                            match vcopy::read(pid, at, &mut self.bounce[..n]) {
                                Ok(()) => w.queue(&f, &self.bounce[..n]).map(Ok),
                                Err(e) => Ok(Err(e)),
                            }
                        }
                    };
                    match queued {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            self.core.handle(
                                Instant::now(),
                                Input::VcopyStreamFailed {
                                    caller_node,
                                    op,
                                    error: e,
                                },
                            );
                            break;
                        }
                        Err(e) => error!("cannot encode a vcopy chunk: {e}"),
                    }
                    off += n as u64;
                    // Start writing big copies while reading the rest.
                    if w.pending() >= 4 * vcopy::CHUNK {
                        w.flush();
                    }
                }
                mark(&mut self.dirty, &w);
            }
        }
    }

    /// Queues a frame to a peer; dropped (with a log line) when the link is down, since the
    /// core already failed whatever depended on it.
    pub fn send_peer(&mut self, node: NodeId, frame: &PeerFrame, tail: &[u8]) {
        match self.peers.get(&node) {
            Some(w) => {
                if let Err(e) = w.queue(frame, tail) {
                    error!("cannot encode a frame for node {node}: {e}");
                }
                if w.over_limit() {
                    // The peer stopped reading: a dead link is better than unbounded memory.
                    error!(
                        "link to node {node}: over {} MiB queued and the peer read nothing for {:?}, closing the link",
                        wire::MAX_PENDING >> 20,
                        wire::STUCK_AFTER
                    );
                    w.close();
                    return;
                }
                mark(&mut self.dirty, w);
            }
            None => tracing::debug!("link to node {node} is down; dropping {frame:?}"),
        }
    }

    /// The endpoint process `pid` was launched or restored here for, if it was.
    pub fn launched_endpoint(&self, pid: i32) -> Option<(dvs_wire::DcId, dvs_wire::Ep)> {
        self.procs
            .endpoint_of(pid)
            .or_else(|| self.migrations.restored.get(&pid).map(|r| (r.dc, r.ep)))
    }

    fn dir(&mut self, op: DirOp) {
        if self.dir_tx.send(op).is_err() {
            error!("directory worker is gone");
        }
    }

    /// Hands a `VcopyData` chunk from `from` to the core, which checks it and asks for the
    /// write (`MemoryAction::WriteChunk`).
    pub fn vcopy_chunk(&mut self, from: NodeId, frame: PeerFrame, data: bytes::Bytes) {
        let Some(chunk) = VcopyChunk::from_frame(&frame, data.len() as u64) else {
            return;
        };
        self.core
            .handle(Instant::now(), Input::VcopyChunk { from, chunk, data });
    }

    /// Gives the core `input` now and carries out what follows.
    pub fn input(&mut self, input: Input) {
        self.core.handle(Instant::now(), input);
        self.drive();
    }

    /// A fresh ticket, to match a request to the core with its report.
    pub fn ticket(&mut self) -> Ticket {
        self.next_ticket += 1;
        self.next_ticket
    }
}

impl Shared {
    /// Closes every link whose peer certificate is on the deny list now.
    pub fn close_revoked_links(&mut self) {
        for (node, l) in &self.links {
            let Some(serial) = &l.serial else { continue };
            if self.security.cfg.is_revoked(serial) {
                if let Some(w) = self.peers.get(node) {
                    warn!("closing the link to node {node}: its certificate (serial {serial}) is revoked now");
                    w.close();
                }
            }
        }
    }
}

fn mark(dirty: &mut Vec<Rc<Wire>>, w: &Rc<Wire>) {
    if !dirty.iter().any(|d| Rc::ptr_eq(d, w)) {
        dirty.push(w.clone());
    }
}

/// Options of `dvs node`.
pub struct NodeOptions {
    /// The validated cluster config.
    pub config: ClusterConfig,
    /// This node (id or name).
    pub node: String,
    /// The file `config` came from: the node rereads its TLS deny list from it.
    pub config_path: Option<std::path::PathBuf>,
}

/// Runs a node kernel until it is told to shut down (control `Shutdown`, SIGTERM or SIGINT).
pub fn run(opts: NodeOptions) -> Result<(), NodeError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("cannot start the runtime"))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, main_loop(opts))
}

fn core_config(cfg: &ClusterConfig, node: NodeId) -> CoreConfig {
    // Migration ids must not repeat across restarts of this node.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    CoreConfig {
        node,
        migration_seed: seed << 8,
        dcs: cfg
            .dcs
            .iter()
            .map(|d| DcInfo {
                id: d.id,
                nodes: cfg.dc_nodes(d).into_iter().collect(),
                max_endpoints: d.max_endpoints,
                max_queue: d.max_queue,
                bind_uids: d.bind_uids.iter().copied().collect(),
            })
            .collect(),
    }
}

async fn main_loop(opts: NodeOptions) -> Result<(), NodeError> {
    let cfg = opts.config;
    let me = cfg
        .find_node(&opts.node)
        .cloned()
        .ok_or_else(|| NodeError::UnknownNode(opts.node.clone()))?;
    // Everything the node creates (sockets, logs, images, criu's files) is private unless
    // opened up on purpose; this also closes the window between bind and chmod.
    let app_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077)).bits();
    let admin = access::AdminGroup::resolve(cfg.access.admin_group.as_deref())
        .map_err(NodeError::Access)?;
    prepare_runtime_dir(&me.runtime_dir, admin.gid())?;
    let directory: Arc<dyn Directory> = match &cfg.directory {
        dvs_config::DirectoryConfig::Embedded { path } => Arc::new(EmbeddedDirectory::open(path)?),
        dvs_config::DirectoryConfig::Etcd { .. } => return Err(NodeError::Unsupported(
            "directory kind \"etcd\" is not supported by this build yet; use kind = \"embedded\""
                .into(),
        )),
    };
    let security = tls::LinkSecurity::load(&cfg, me.id, &me.name, opts.config_path.clone())?;
    let ipc_path = me.ipc_socket();
    let ctl_path = me.ctl_socket();
    let ipc = bind_unix(&ipc_path, admin.gid())?;
    let ctl = bind_unix(&ctl_path, admin.gid())?;
    let peer_listener = tokio::net::TcpListener::bind(me.peer_addr)
        .await
        .map_err(io_err(format!(
            "cannot listen for peers on {}",
            me.peer_addr
        )))?;
    safe_fs::write_private(
        &me.runtime_dir.join("node.pid"),
        format!("{}\n", std::process::id()).as_bytes(),
    )
    .map_err(io_err("cannot write node.pid"))?;
    let images_root = migrate::prepare_images_root(&cfg.cluster_id, &me.name, &me.runtime_dir)
        .map_err(NodeError::Access)?;

    let (dir_tx, dir_rx) = mpsc::unbounded_channel();
    // Processes restored by CRIU lose their parent; as subreaper this node adopts and reaps them.
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only sets a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let state: State = Rc::new_cyclic(|weak| {
        RefCell::new(Shared {
            migrations: migrate::Migrations {
                images_root,
                ..Default::default()
            },
            self_ref: weak.clone(),
            core: NodeCore::new(core_config(&cfg, me.id)),
            compress: cfg.link.compression == Compression::Lz4,
            me: me.clone(),
            conns: HashMap::new(),
            peers: HashMap::new(),
            links: cfg
                .nodes
                .iter()
                .filter(|n| n.id != me.id)
                .map(|n| {
                    (
                        n.id,
                        LinkInfo {
                            up: false,
                            since: Instant::now(),
                            last_error: None,
                            serial: None,
                            max_silence: std::time::Duration::ZERO,
                        },
                    )
                })
                .collect(),
            next_conn: 1,
            dir_tx,
            dirty: Vec::new(),
            bounce: Vec::new(),
            timer_armed: None,
            timer_wake: Rc::new(Notify::new()),
            procs: Procs::default(),
            started: Instant::now(),
            shutdown: Rc::new(Notify::new()),
            security,
            handshakes: 0,
            admin,
            app_umask,
            cfg: cfg.clone(),
            answers: HashMap::new(),
            next_ticket: 0,
        })
    });

    dir::start(state.clone(), directory, dir_rx).await?;
    tokio::task::spawn_local(timer_task(state.clone()));
    tokio::task::spawn_local(local::serve(state.clone(), ipc));
    tokio::task::spawn_local(ctl_server::serve(state.clone(), ctl));
    peer::start(state.clone(), peer_listener);
    tokio::task::spawn_local(tls::reload_task(state.clone()));
    info!(node = me.id, name = %me.name, ipc = %ipc_path.display(), peer = %me.peer_addr, "node kernel up");

    let shutdown = state.borrow().shutdown.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_err("signal handler"))?;
    tokio::select! {
        _ = shutdown.notified() => info!("shutdown requested"),
        _ = term.recv() => info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT"),
    }
    state.borrow_mut().procs.kill_all();
    // Images of migrations cut short by the shutdown, and the folders that held only them
    // (remove_dir fails on a folder another node still uses).
    let root = state.borrow().migrations.images_root.clone();
    let _ = std::fs::remove_dir_all(&root);
    for parent in root.ancestors().skip(1).take(2) {
        let _ = std::fs::remove_dir(parent);
    }
    let _ = std::fs::remove_file(&ipc_path);
    let _ = std::fs::remove_file(&ctl_path);
    let _ = std::fs::remove_file(me.runtime_dir.join("node.pid"));
    Ok(())
}

/// Creates the runtime folder if needed and makes sure nobody else controls it: a real
/// folder owned by this uid, mode 0700 (0710 with the admin group, so that its members can
/// reach the sockets).
fn prepare_runtime_dir(dir: &Path, admin_gid: Option<u32>) -> Result<(), NodeError> {
    if let Some(parent) = dir.parent() {
        // Parents are created world-traversable on purpose (e.g. /run/dvs); the runtime
        // folder itself is what holds the sockets.
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true).mode(0o755);
        b.create(parent)
            .map_err(io_err(format!("cannot create {}", parent.display())))?;
    }
    let mode = if admin_gid.is_some() {
        0o710
    } else {
        safe_fs::PRIVATE_DIR
    };
    safe_fs::secure_dir(dir, mode, admin_gid)
        .map_err(|e| NodeError::Access(format!("runtime dir {}: {e}", dir.display())))
}

/// Binds a Unix socket at `path` (inside the private runtime folder, under umask 077) and
/// then gives it its final mode: 0600, or 0660 with group `admin_gid`.
fn bind_unix(path: &Path, admin_gid: Option<u32>) -> Result<tokio::net::UnixListener, NodeError> {
    // A socket file left by a dead node would make bind fail; a live node still answers.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(NodeError::Io {
            what: format!("another node kernel already listens on {}", path.display()),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        });
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(io_err(format!("cannot listen on {}", path.display())))?;
    let mode = match admin_gid {
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid))
                .map_err(io_err(format!("cannot chown {}", path.display())))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("cannot chmod {}", path.display())))?;
    Ok(listener)
}

/// Fires the core's timers.
async fn timer_task(state: State) {
    let wake = state.borrow().timer_wake.clone();
    loop {
        let next = state.borrow().core.poll_timeout();
        match next {
            Some(t) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t.into()) => {}
                    _ = wake.notified() => continue,
                }
            }
            None => {
                state.borrow_mut().timer_armed = None;
                wake.notified().await;
                continue;
            }
        }
        let mut s = state.borrow_mut();
        s.timer_armed = None;
        s.core.handle(Instant::now(), Input::Timeout);
        s.drive();
    }
}
