//! Whether a process tree can be carried to another node with criu, decided before anything
//! stops: the [`Inventory`] of what the tree holds is judged against this host and, when
//! known, the destination. The answer is a [`Plan`] (how to dump it) or the list of
//! [`Obstacle`]s, each naming the resource and why it cannot travel.
//!
//! The rules, and why:
//! * **The node connection** (a unix socket whose peer the node kernel holds) is the one
//!   external socket criu may leave out (`--external unix[INODE]`); the restore plugs a new
//!   one in. Any other unix socket whose peer is outside the tree would be cut.
//! * **Pipes and FIFOs** travel only with both ends in the tree.
//! * **TCP connections** travel (criu's `tcp_established`, TCP repair) only between two
//!   processes of the tree. One to a peer outside the tree is refused: on this host (loopback
//!   or one of its addresses) its peer stays behind; elsewhere, dvs dumps without criu's
//!   network lock (it needs iptables or nft, which a node need not have), so bytes the peer
//!   sends while the process is frozen would be acknowledged by the source and lost.
//! * **Bound sockets** (listeners, bound UDP) need their address on the destination. A
//!   destination that shares this host's network stack (nodes on one machine) cannot take
//!   any bound port or connection: the stopped source keeps them until the commit, and the
//!   restore's bind or connect fails.
//! * **Deleted files** (open or mapped) are copied into the image by criu as "ghost" files:
//!   up to [`GHOST_LIMIT`] each, which dvs raises criu's 1 MiB default to; a bigger one would
//!   make criu fail after the freeze, so it is refused here.
//! * **Other files and folders** must exist on the destination with the same size (criu
//!   checks it), except the node's own runtime folder (the endpoint's log and working
//!   folder: the destination substitutes its own) and paths that travel with the image.
//! * **Terminals** and anonymous inodes criu cannot dump (`io_uring`, `perf_event`, ...) are
//!   refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::inventory::net::tcp_state;
use crate::inventory::{FdTarget, FileRef, Inventory, Proto};
use crate::CheckpointError;

/// The largest deleted file dvs lets criu copy into an image (criu's `ghost_limit`): big
/// enough for a replaced binary or a scratch file, small enough not to stall a migration
/// with a copy the operator did not expect.
pub const GHOST_LIMIT: u64 = 32 << 20;
/// criu's own default ghost limit: larger deleted files need [`Plan::ghost_limit`].
pub const CRIU_GHOST_LIMIT: u64 = 1 << 20;

/// Anonymous inodes criu 4.2 dumps.
const ANON_OK: [&str; 9] = [
    "eventfd",
    "eventpoll",
    "timerfd",
    "signalfd",
    "inotify",
    "fanotify",
    "pidfd",
    "bpf-map",
    "memfd",
];
/// Devices that are the same on every Linux host.
const PORTABLE_DEVICES: [&str; 5] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// What the source side knows.
#[derive(Clone, Debug, Default)]
pub struct Source {
    /// This node's name, for messages ("whose other end stays on node0").
    pub node: String,
    /// The socket inodes the node kernel holds (the peers of node connections).
    pub node_sockets: HashSet<u64>,
    /// This host's addresses.
    pub addrs: Vec<IpAddr>,
    /// Path prefixes the destination replaces with its own (the node's runtime folder).
    pub substituted: Vec<PathBuf>,
    /// Path prefixes shipped with the image (the endpoint's working folder); none yet.
    pub travelling: Vec<PathBuf>,
}

impl Source {
    /// The facts of this host, for a node kernel named `node` running as this process.
    pub fn here(node: impl Into<String>) -> Result<Source, CheckpointError> {
        let me = std::process::id() as i32;
        Ok(Source {
            node: node.into(),
            node_sockets: crate::process_socket_inodes(me)?
                .into_iter()
                .map(|(_, i)| i)
                .collect(),
            addrs: crate::inventory::host_addresses()
                .map_err(|e| CheckpointError::io("list this host's addresses", e))?,
            substituted: Vec::new(),
            travelling: Vec::new(),
        })
    }

    fn exempt(&self, p: &Path) -> bool {
        self.substituted
            .iter()
            .chain(&self.travelling)
            .any(|pre| p.starts_with(pre))
    }
}

/// What the destination said about itself.
#[derive(Clone, Debug, Default)]
pub struct Destination {
    /// Its name, for messages.
    pub node: String,
    /// Its addresses.
    pub addrs: Vec<IpAddr>,
    /// Whether it runs in this host's network stack (nodes on one machine).
    pub shares_network: bool,
    /// Paths it lacks, or has otherwise: `(path, what is wrong, e.g. "does not exist")`.
    pub path_problems: Vec<(PathBuf, String)>,
}

/// What the destination must be asked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Specific local addresses of bound sockets (other than loopback).
    pub addrs: Vec<IpAddr>,
    /// Files and folders that must be there, with the size of files.
    pub paths: Vec<(PathBuf, Option<u64>)>,
}

/// How to dump a tree that can travel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The inode of the node connection (criu's `--external unix[INODE]`).
    pub node_connection: u64,
    /// The tree has TCP connections between its processes (criu's `tcp_established`).
    pub tcp_established: bool,
    /// criu's ghost limit, when a deleted file is bigger than its default.
    pub ghost_limit: Option<u64>,
    /// What could not be checked, in words (for the operator's note).
    pub unchecked: Vec<String>,
}

/// One resource that cannot travel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Obstacle {
    /// The resource and who holds it, e.g. `TCP connection 127.0.0.1:40112 ->
    /// 127.0.0.1:5432 (pid 7 (migr-server) fd 4)`.
    pub resource: String,
    /// Why it cannot travel, e.g. `whose other end stays on node0`.
    pub why: String,
}

impl std::fmt::Display for Obstacle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}, {}", self.resource, self.why)
    }
}

/// Why a preflight said no.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// Resources that cannot travel.
    #[error("it holds {}", list(.0))]
    Refused(Vec<Obstacle>),
    /// The inventory could not be taken.
    #[error("cannot list what the process holds: {0}")]
    Inventory(#[from] Box<CheckpointError>),
}

fn list(o: &[Obstacle]) -> String {
    o.iter()
        .map(|o| o.to_string())
        .collect::<Vec<_>>()
        .join("; and ")
}

/// The dump plan of the tree rooted at `root`, judged on this host only: what `criu dump`
/// needs, and the refusals that need no destination facts (run again just before the dump,
/// since the process may have opened something since the preflight).
pub fn dump_plan(root: i32, node: &str) -> Result<Plan, PreflightError> {
    let inv = Inventory::take(root).map_err(Box::new)?;
    let src = Source::here(node).map_err(Box::new)?;
    judge(&inv, &src, None).map_err(PreflightError::Refused)
}

/// A resource with where it is held, for messages.
fn held(inv: &Inventory, what: String, pid: i32, fd: Option<i32>) -> String {
    format!("{what} ({})", inv.holder(pid, fd))
}

/// The files, folders and addresses the destination must have.
pub fn needs(inv: &Inventory, src: &Source) -> Needs {
    let mut paths: BTreeMap<PathBuf, Option<u64>> = BTreeMap::new();
    let mut want = |p: &Path, size: Option<u64>| {
        if !src.exempt(p) && !p.starts_with("/proc") && !p.starts_with("/sys") {
            paths.entry(p.to_path_buf()).or_insert(size);
        }
    };
    for p in &inv.procs {
        if let Some(cwd) = &p.cwd {
            want(cwd, None);
        }
        for m in p.maps.iter().filter(|m| !m.deleted) {
            want(&m.path, m.size);
        }
        for f in &p.fds {
            match &f.target {
                // A file open for writing may grow between this look and the destination's
                // (on one machine it is the same file): only its existence is asked.
                FdTarget::File(r) if !r.deleted => want(&r.path, r.size.filter(|_| !f.write)),
                FdTarget::Dir(d) => want(d, None),
                FdTarget::Fifo(d, _) => want(d, None),
                FdTarget::Device(d) if !PORTABLE_DEVICES.iter().any(|p| d == Path::new(p)) => {
                    want(d, None)
                }
                _ => {}
            }
        }
    }
    let mut addrs: Vec<IpAddr> = inv
        .inet
        .values()
        .filter(|s| s.bound() && !s.local.ip().is_unspecified() && !s.local.ip().is_loopback())
        .map(|s| s.local.ip())
        .collect();
    addrs.sort();
    addrs.dedup();
    Needs {
        addrs,
        paths: paths.into_iter().collect(),
    }
}

/// Judges an inventory: the plan, or every obstacle found. Without `dest`, only what this
/// host can tell is judged, and [`Plan::unchecked`] says what was left out.
pub fn judge(
    inv: &Inventory,
    src: &Source,
    dest: Option<&Destination>,
) -> Result<Plan, Vec<Obstacle>> {
    let mut plan = Plan::default();
    let mut out = Vec::new();
    let tree = inv.socket_inodes();
    let mut node_conns = Vec::new();
    let mut seen = HashSet::new();
    // Pipes and FIFOs by inode: (a read end in the tree, a write end, first holder).
    let mut pipes: HashMap<u64, (bool, bool, String)> = HashMap::new();
    let dest_name = dest.map_or("the destination", |d| d.node.as_str());
    for (pid, f) in inv.fds() {
        let here = |what: String| held(inv, what, pid, Some(f.fd));
        match &f.target {
            FdTarget::Socket(ino) => {
                if !seen.insert(*ino) {
                    continue; // inherited: judged once
                }
                if let Some(u) = inv.unix.get(ino) {
                    let name = u.name.clone().unwrap_or_else(|| format!("socket:[{ino}]"));
                    match u.peer {
                        Some(p) if tree.contains(&p) => {}
                        Some(p) if src.node_sockets.contains(&p) => node_conns.push((pid, f.fd, *ino)),
                        Some(_) => out.push(Obstacle {
                            resource: here(format!("unix socket {name}")),
                            why: "whose peer is outside the process tree (only the node connection is replaced on the destination)".into(),
                        }),
                        None => {}
                    }
                } else if let Some(s) = inv.inet.get(ino) {
                    judge_inet(inv, src, dest, s, &here, &mut plan, &mut out);
                } else {
                    out.push(Obstacle {
                        resource: here(format!("socket:[{ino}]")),
                        why: "which is neither a unix, TCP nor UDP socket (dvs does not migrate other kinds)".into(),
                    });
                }
            }
            FdTarget::Pipe(ino) | FdTarget::Fifo(_, ino) => {
                let label = match &f.target {
                    FdTarget::Fifo(p, _) => format!("FIFO {}", p.display()),
                    _ => format!("pipe:[{ino}]"),
                };
                let e = pipes.entry(*ino).or_insert((false, false, here(label)));
                e.0 |= f.read;
                e.1 |= f.write;
            }
            FdTarget::File(r) if r.deleted => ghost(
                r,
                here(format!("deleted file {}", r.path.display())),
                &mut plan,
                &mut out,
            ),
            FdTarget::Device(d) => {
                let s = d.to_string_lossy();
                if s.starts_with("/dev/pts/")
                    || s.starts_with("/dev/tty")
                    || s == "/dev/console"
                    || s == "/dev/ptmx"
                {
                    out.push(Obstacle {
                        resource: here(format!("terminal {s}")),
                        why: "which criu restores only for a shell job; start the program with `dvs run`, whose output goes to a log".into(),
                    });
                }
            }
            FdTarget::AnonInode(kind) if !ANON_OK.contains(&kind.as_str()) => out.push(Obstacle {
                resource: here(format!("anon_inode:[{kind}]")),
                why: "which criu cannot dump".into(),
            }),
            FdTarget::Other(what) => out.push(Obstacle {
                resource: here(what.clone()),
                why: "a kind of file dvs does not know criu to carry".into(),
            }),
            _ => {}
        }
    }
    for p in &inv.procs {
        for m in p.maps.iter().filter(|m| m.deleted) {
            let what = held(
                inv,
                format!("deleted file {} (mapped)", m.path.display()),
                p.pid,
                None,
            );
            ghost(m, what, &mut plan, &mut out);
        }
    }
    let mut pipes: Vec<_> = pipes
        .into_values()
        .filter(|(r, w, _)| !(*r && *w))
        .collect();
    pipes.sort_by(|a, b| a.2.cmp(&b.2));
    for (r, _, what) in pipes {
        out.push(Obstacle {
            resource: format!("{what}, {} end", if r { "read" } else { "write" }),
            why: "whose other end is outside the process tree".into(),
        });
    }
    match node_conns.as_slice() {
        [] => out.push(Obstacle {
            resource: format!("no connection to the node kernel (pid {})", inv.root),
            why: "and a criu migration replaces exactly one".into(),
        }),
        [(_, _, ino), more @ ..] => {
            plan.node_connection = *ino;
            for (pid, fd, ino) in more {
                out.push(Obstacle {
                    resource: held(
                        inv,
                        format!("a second connection to the node kernel (socket:[{ino}])"),
                        *pid,
                        Some(*fd),
                    ),
                    why: "and a criu migration replaces only one".into(),
                });
            }
        }
    }
    match dest {
        Some(d) => {
            let needs = needs(inv, src);
            let holder = path_holders(inv);
            for (path, problem) in &d.path_problems {
                if !needs.paths.iter().any(|(p, _)| p == path) {
                    continue;
                }
                let who = holder.get(path).cloned().unwrap_or_default();
                out.push(Obstacle {
                    resource: format!("{} ({who})", path.display()),
                    why: format!("which {problem} on {}", d.node),
                });
            }
        }
        None => {
            let n = needs(inv, src);
            plan.unchecked.push(format!(
                "whether {dest_name} has the {} files and folders and the {} addresses the process uses, and whether it shares this host's network",
                n.paths.len(),
                n.addrs.len()
            ));
        }
    }
    if out.is_empty() {
        Ok(plan)
    } else {
        Err(out)
    }
}

/// Who holds each path, for messages.
fn path_holders(inv: &Inventory) -> HashMap<PathBuf, String> {
    let mut out = HashMap::new();
    for p in &inv.procs {
        for f in &p.fds {
            let path = match &f.target {
                FdTarget::File(r) => &r.path,
                FdTarget::Dir(d) | FdTarget::Fifo(d, _) | FdTarget::Device(d) => d,
                _ => continue,
            };
            out.entry(path.clone())
                .or_insert_with(|| inv.holder(p.pid, Some(f.fd)));
        }
        for m in &p.maps {
            out.entry(m.path.clone())
                .or_insert_with(|| format!("mapped by {}", inv.holder(p.pid, None)));
        }
        if let Some(cwd) = &p.cwd {
            out.entry(cwd.clone())
                .or_insert_with(|| format!("working folder of {}", inv.holder(p.pid, None)));
        }
    }
    out
}

/// A deleted file: carried if criu may copy it (raising its limit), refused otherwise.
fn ghost(r: &FileRef, what: String, plan: &mut Plan, out: &mut Vec<Obstacle>) {
    match r.allocated.or(r.size) {
        Some(n) if n <= GHOST_LIMIT => {
            if n > CRIU_GHOST_LIMIT {
                plan.ghost_limit = Some(plan.ghost_limit.unwrap_or(0).max(n));
            }
        }
        Some(n) => out.push(Obstacle {
            resource: format!("{what}, {:.1} MiB", n as f64 / (1 << 20) as f64),
            why: format!(
                "which criu would have to copy into the image, and dvs carries deleted files of at most {} MiB",
                GHOST_LIMIT >> 20
            ),
        }),
        None => out.push(Obstacle {
            resource: what,
            why: "whose size cannot be read, so criu's copy of it cannot be bounded".into(),
        }),
    }
}

/// The rules of one TCP or UDP socket.
fn judge_inet(
    inv: &Inventory,
    src: &Source,
    dest: Option<&Destination>,
    s: &crate::inventory::InetSocket,
    here: &dyn Fn(String) -> String,
    plan: &mut Plan,
    out: &mut Vec<Obstacle>,
) {
    let on_this_host = |a: &SocketAddr| a.ip().is_loopback() || src.addrs.contains(&a.ip());
    let shared = dest.filter(|d| d.shares_network).map(|d| d.node.as_str());
    let mut refuse = |what: String, why: String| {
        out.push(Obstacle {
            resource: here(what),
            why,
        })
    };
    if s.connected() {
        let what = format!("{} connection {} -> {}", s.proto, s.local, s.remote);
        let in_tree = inv
            .inet
            .values()
            .any(|o| o.proto == s.proto && o.local == s.remote && o.remote == s.local);
        if s.proto == Proto::Tcp && matches!(s.state, tcp_state::SYN_SENT | tcp_state::SYN_RECV) {
            return refuse(what, "which is still being set up".into());
        }
        if !in_tree && on_this_host(&s.remote) {
            return refuse(what, format!("whose other end stays on {}", src.node));
        }
        if !in_tree && s.proto == Proto::Tcp {
            return refuse(what, "whose peer is outside the process tree: dvs dumps without criu's network lock, so what the peer sends while the process is frozen would be lost".into());
        }
        if s.proto == Proto::Tcp {
            plan.tcp_established = true;
        }
        if let Some(d) = shared {
            refuse(what, format!("which cannot be restored on {d}: it shares this host's network, where the stopped source holds the connection until the migration commits"));
        }
    } else if s.bound() {
        let what = match (s.proto, s.state) {
            (Proto::Tcp, tcp_state::LISTEN) => format!("TCP listener on {}", s.local),
            (p, _) => format!("{p} socket bound to {}", s.local),
        };
        if let Some(d) = shared {
            return refuse(what, format!("whose port cannot be taken on {d}: it shares this host's network, where the stopped source keeps the port until the migration commits"));
        }
        let ip = s.local.ip();
        if let Some(d) = dest {
            if !ip.is_unspecified() && !ip.is_loopback() && !d.addrs.contains(&ip) {
                refuse(what, format!("an address {} does not have", d.node));
            }
        }
    }
}

#[cfg(test)]
#[path = "preflight_tests.rs"]
mod tests;
