//! The dvs node kernel: a thin async shell around [`dvs_core::NodeCore`].
//!
//! One single-threaded tokio runtime runs the node. One task, the event loop
//! ([`event_loop::Node::run`]), owns the core and every I/O handle: the writers of the local
//! connections and peer links, the directory thread's job queue, the process table and the
//! migration bookkeeping. The I/O tasks (the local socket server and its connection readers,
//! the peer links' dialers, readers and heartbeats, the control socket, the directory thread,
//! the TLS reloader) and the blocking jobs (criu, image files, `/proc`) send it events over one
//! channel; it feeds them to the core and carries out the core's [`dvs_core::Action`]s. None of
//! the IPC semantics live here, and nothing that blocks runs on the loop.

mod access;
mod actions;
pub mod ctl;
pub use images::cluster_images_dir;
pub use leftovers::kill_previous as kill_leftover_trees;
mod ctl_server;
mod dir;
mod event_loop;
mod handshake;
mod images;
mod launcher;
mod leftovers;
mod local;
mod membership;
mod migrate;
mod peer;
mod preflight;
mod relay;
mod restore;
mod safe_fs;
mod tls;
pub mod vcopy;
mod wire;
mod workdir;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::rc::Rc;

use dvs_config::{ClusterConfig, NodeConfig};
use dvs_core::{CoreConfig, DcInfo, NodeCore};
use dvs_wire::NodeId;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::event_loop::{Ctx, Node};
use crate::images::ImageStore;
use crate::migrate::Migrations;

/// Why a node kernel could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node id is not in the config.
    #[error("node {0} is not defined in the cluster config")]
    UnknownNode(String),
    /// A socket or folder could not be set up.
    #[error("{what}: {error}")]
    Io {
        what: String,
        /// Not a `source`: the message already says it, and the CLI prints the chain.
        error: std::io::Error,
    },
    /// The directory could not be opened (its errors say "directory: ...").
    #[error(transparent)]
    Directory(#[from] dvs_directory::DirError),
    /// The node's TLS material does not load.
    #[error("TLS: {0}")]
    Tls(String),
    /// Local access control cannot be set up as configured (unknown group, unsafe folder).
    #[error("{0}")]
    Access(String),
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |error| NodeError::Io { what, error }
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
    close_inherited_fds_on_exec();
    keep_big_buffers_on_the_heap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("cannot start the runtime"))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, main_loop(opts))
}

/// Descriptors the node kernel inherited beyond stdin, stdout and stderr (a shell's or a
/// service manager's) must not reach the programs it launches, nor criu: a program holding a
/// file opened in another mount namespace cannot be checkpointed (criu: "Can't lookup
/// mount=N for fd=M"), which is what happened to every node started in a private mount
/// namespace from a shell that leaked one. Marked close-on-exec before the node opens
/// anything of its own.
fn close_inherited_fds_on_exec() {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets a flag on descriptors.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if rc != 0 {
        // Kernels before 5.11: mark them one by one.
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            let fds: Vec<i32> = fds
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd > 2)
                .collect();
            for fd in fds {
                // SAFETY: setting FD_CLOEXEC on a descriptor of ours; a stale one fails harmlessly.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
        }
    }
}

/// Image and vcopy chunks are MiB-sized buffers that live a few milliseconds (read, handed
/// to the image writer, freed). With glibc's defaults each one is a fresh `mmap` (zero-filled,
/// page-faulted) and an `munmap`: measured, that cost a quarter of the image transfer rate of
/// a 1 GiB migration. Serving them from the heap, and not trimming it after every burst,
/// avoids that; the heap stays bounded by the links' backlogs (16 MiB of image per link).
fn keep_big_buffers_on_the_heap() {
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
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
    let me: NodeConfig = cfg
        .find_node(&opts.node)
        .cloned()
        .ok_or_else(|| NodeError::UnknownNode(opts.node.clone()))?;
    // Everything the node creates (sockets, logs, images, criu's files) is private unless
    // opened up on purpose; this also closes the window between bind and chmod.
    let app_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077)).bits();
    let admin = access::AdminGroup::resolve(cfg.access.admin_group.as_deref())
        .map_err(NodeError::Access)?;
    prepare_runtime_dir(&me.runtime_dir, admin.gid())?;
    let killed = leftovers::kill_previous(&me.runtime_dir);
    if killed > 0 {
        warn!("killed {killed} process trees left by the previous run of this node (it was not stopped cleanly)");
    }
    let directory = dvs_directory::open(&cfg.directory)?;
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
    let images_root = images::prepare_images_root(&cfg.cluster_id, &me.name, &me.runtime_dir)
        .map_err(NodeError::Access)?;
    let images = ImageStore::start(images_root).map_err(io_err("cannot start the image writer"))?;

    // Processes restored by CRIU lose their parent; as subreaper this node adopts and reaps them.
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only sets a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let (events, mut rx) = mpsc::channel(event_loop::EVENTS);
    let (publish_auth, auth) = watch::channel(security.current());
    let core = NodeCore::new(core_config(&cfg, me.id));
    let member = membership::MemberRecord {
        name: me.name.clone(),
        addr: me.peer_addr.to_string(),
        pid: std::process::id(),
        since_ms: 0,
    };
    let lease_ttl = std::time::Duration::from_millis(cfg.membership.lease_ms);
    let started = dir::start(directory, me.id, member, lease_ttl, events.clone()).await?;
    let ctx = Rc::new(Ctx {
        cfg,
        me: me.clone(),
        admin,
        app_umask,
        events: events.clone(),
        auth,
        fenced: std::cell::Cell::new(false),
        joined: Default::default(),
    });
    let mut node = Node::new(
        core,
        ctx.clone(),
        started.jobs,
        started.membership,
        Migrations::new(images),
    );
    // The directory's registrations come before anything a connection could ask.
    for input in started.inputs {
        node.input(input);
    }
    tokio::task::spawn_local(local::serve(ctx.clone(), ipc));
    tokio::task::spawn_local(ctl_server::serve(ctx.clone(), ctl));
    peer::start(&ctx, peer_listener);
    tokio::task::spawn_local(tls::reload_task(security, publish_auth, events));
    drop(ctx);
    info!(node = me.id, name = %me.name, ipc = %ipc_path.display(), peer = %me.peer_addr, "node kernel up");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_err("signal handler"))?;
    tokio::select! {
        () = node.run(&mut rx) => info!("shutdown requested"),
        _ = term.recv() => info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT"),
    }
    node.kill_all();
    // Others see this node leave now, not when its lease would have run out.
    node.leave_cluster().await;
    // Images of migrations cut short by the shutdown, and the folders that held only them
    // (remove_dir fails on a folder another node still uses).
    let root = node.migrations.images.root().to_path_buf();
    node.migrations.images.stop();
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
            error: std::io::Error::from(std::io::ErrorKind::AddrInUse),
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
