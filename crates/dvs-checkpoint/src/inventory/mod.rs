//! What a process tree holds, read from `/proc`: per process its open files (regular files,
//! folders, pipes and FIFOs, devices, sockets, anonymous inodes), its file mappings and its
//! working folder; and the kernel's view of the tree's sockets (TCP and UDP addresses and
//! states, unix socket names and peers).
//!
//! This is the raw material of a migration's preflight ([`crate::preflight`]): criu carries
//! some of these resources, others only when the destination has what they refer to, and
//! some not at all.

pub mod net;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

pub use net::{host_addresses, InetSocket, Proto, UnixSocket};

use crate::CheckpointError;

/// The resources of a process tree.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    /// The tree's root (a host pid).
    pub root: i32,
    /// Each process of the tree, parents first.
    pub procs: Vec<ProcResources>,
    /// The tree's TCP and UDP sockets, by inode.
    pub inet: HashMap<u64, InetSocket>,
    /// The tree's unix sockets, by inode.
    pub unix: HashMap<u64, UnixSocket>,
}

/// What one process holds.
#[derive(Clone, Debug, Default)]
pub struct ProcResources {
    /// Host pid.
    pub pid: i32,
    /// Its command name (`/proc/PID/comm`), for messages.
    pub comm: String,
    /// Its working folder.
    pub cwd: Option<PathBuf>,
    /// Its open descriptors.
    pub fds: Vec<OpenFd>,
    /// The files it maps (one entry per file, not per mapping).
    pub maps: Vec<FileRef>,
}

/// One open descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenFd {
    /// The descriptor number.
    pub fd: i32,
    /// What it refers to.
    pub target: FdTarget,
    /// Open for writing (from `flags:` in `/proc/PID/fdinfo/N`).
    pub write: bool,
    /// Open for reading.
    pub read: bool,
}

/// A file by path, as `/proc` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRef {
    /// The path (without the kernel's ` (deleted)` suffix).
    pub path: PathBuf,
    /// The file was unlinked while open (criu must copy it into the image, as a "ghost").
    pub deleted: bool,
    /// Its size, when it could be read.
    pub size: Option<u64>,
    /// The disk space it takes (`st_blocks` * 512), which is what criu's ghost limit
    /// counts; when it could be read.
    pub allocated: Option<u64>,
}

/// What a descriptor refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FdTarget {
    /// A regular file.
    File(FileRef),
    /// A folder.
    Dir(PathBuf),
    /// A named pipe, by path and inode.
    Fifo(PathBuf, u64),
    /// A device node, by path.
    Device(PathBuf),
    /// A socket, by inode (see [`Inventory::inet`] and [`Inventory::unix`]).
    Socket(u64),
    /// An anonymous pipe, by inode.
    Pipe(u64),
    /// An anonymous inode (`eventfd`, `eventpoll`, `timerfd`, `io_uring`, ...), by kind.
    AnonInode(String),
    /// Anything else, as the link reads.
    Other(String),
}

impl Inventory {
    /// Takes the inventory of the tree rooted at `root` (blocking: reads `/proc`). Processes
    /// or descriptors that vanish meanwhile are skipped; the sockets are those of the root's
    /// network namespace, unix sockets those of the caller's (the node and its processes
    /// share one).
    pub fn take(root: i32) -> Result<Inventory, CheckpointError> {
        if !Path::new(&format!("/proc/{root}")).exists() {
            return Err(CheckpointError::NoSuchProcess { pid: root });
        }
        let mut inv = Inventory {
            root,
            ..Default::default()
        };
        for pid in crate::tree_pids(root) {
            if let Some(p) = proc_resources(pid) {
                inv.procs.push(p);
            }
        }
        let held = inv.socket_inodes();
        let unix = net::unix_sockets()
            .map_err(|e| CheckpointError::io("list unix sockets (sock_diag)", e))?;
        inv.unix = unix
            .into_iter()
            .filter(|(ino, _)| held.contains(ino))
            .collect();
        // Reading the TCP tables walks the kernel's whole connection hash (milliseconds on
        // a big machine): only when the tree holds a socket that is not a unix one.
        if held.iter().any(|ino| !inv.unix.contains_key(ino)) {
            let mut inet = net::inet_sockets(root)
                .map_err(|e| CheckpointError::io(format!("read /proc/{root}/net"), e))?;
            inet.retain(|ino, _| held.contains(ino));
            inv.inet = inet;
        }
        Ok(inv)
    }

    /// The inodes of every socket the tree holds.
    pub fn socket_inodes(&self) -> HashSet<u64> {
        self.fds()
            .filter_map(|(_, f)| match f.target {
                FdTarget::Socket(i) => Some(i),
                _ => None,
            })
            .collect()
    }

    /// Every descriptor with the pid that holds it.
    pub fn fds(&self) -> impl Iterator<Item = (i32, &OpenFd)> {
        self.procs
            .iter()
            .flat_map(|p| p.fds.iter().map(move |f| (p.pid, f)))
    }

    /// Where a resource is held, for messages: `pid 1234 (comm) fd 4`.
    pub fn holder(&self, pid: i32, fd: Option<i32>) -> String {
        let comm = self
            .procs
            .iter()
            .find(|p| p.pid == pid)
            .map_or("", |p| p.comm.as_str());
        match fd {
            Some(fd) => format!("pid {pid} ({comm}) fd {fd}"),
            None => format!("pid {pid} ({comm})"),
        }
    }
}

/// The resources of one process; `None` if it is gone.
fn proc_resources(pid: i32) -> Option<ProcResources> {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let comm = fs::read_to_string(base.join("comm"))
        .ok()?
        .trim()
        .to_string();
    let mut p = ProcResources {
        pid,
        comm,
        cwd: fs::read_link(base.join("cwd")).ok(),
        ..Default::default()
    };
    for e in fs::read_dir(base.join("fd")).ok()?.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // The fd may close between readdir and readlink: skip it.
        let Ok(link) = fs::read_link(e.path()) else {
            continue;
        };
        let flags = fs::read_to_string(base.join(format!("fdinfo/{fd}")))
            .ok()
            .and_then(|t| fdinfo_flags(&t))
            .unwrap_or(0);
        let mode = flags & libc::O_ACCMODE as u32;
        p.fds.push(OpenFd {
            fd,
            target: classify(&link.to_string_lossy(), fs::metadata(e.path()).ok()),
            write: mode == libc::O_WRONLY as u32 || mode == libc::O_RDWR as u32,
            read: mode == libc::O_RDONLY as u32 || mode == libc::O_RDWR as u32,
        });
    }
    p.fds.sort_by_key(|f| f.fd);
    if let Ok(maps) = fs::read_to_string(base.join("maps")) {
        for (range, path) in parse_maps(&maps) {
            if p.maps.iter().any(|m| m.path == path.path) {
                continue;
            }
            // map_files shows the mapped file itself, deleted or not (root only).
            let meta = fs::metadata(base.join("map_files").join(&range)).ok();
            p.maps.push(FileRef {
                size: meta.as_ref().map(|m| m.len()),
                allocated: meta.as_ref().map(|m| m.blocks() * 512),
                ..path
            });
        }
    }
    Some(p)
}

/// The `flags:` of an fdinfo file (octal).
fn fdinfo_flags(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
}

/// What an `/proc/PID/fd/N` link names, with the `stat` of the file behind it when known.
pub fn classify(link: &str, meta: Option<fs::Metadata>) -> FdTarget {
    let inode_of = |prefix: &str| {
        link.strip_prefix(prefix)
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
    };
    if let Some(i) = inode_of("socket:[") {
        return FdTarget::Socket(i);
    }
    if let Some(i) = inode_of("pipe:[") {
        return FdTarget::Pipe(i);
    }
    if link.starts_with("/memfd:") {
        // criu dumps a memfd's contents as memory, whatever its name says.
        return FdTarget::AnonInode("memfd".to_string());
    }
    if let Some(kind) = link.strip_prefix("anon_inode:") {
        return FdTarget::AnonInode(kind.trim_matches(['[', ']']).to_string());
    }
    if !link.starts_with('/') {
        return FdTarget::Other(link.to_string());
    }
    let (path, deleted) = match link.strip_suffix(" (deleted)") {
        Some(p) => (PathBuf::from(p), true),
        None => (PathBuf::from(link), false),
    };
    let Some(meta) = meta else {
        return FdTarget::File(FileRef {
            path,
            deleted,
            size: None,
            allocated: None,
        });
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        FdTarget::Dir(path)
    } else if ft.is_fifo() {
        FdTarget::Fifo(path, meta.ino())
    } else if ft.is_char_device() || ft.is_block_device() {
        FdTarget::Device(path)
    } else {
        FdTarget::File(FileRef {
            path,
            deleted,
            size: Some(meta.len()),
            allocated: Some(meta.blocks() * 512),
        })
    }
}

/// The file mappings of `/proc/PID/maps`: `(address range, file)`, one per mapping line that
/// names a file. Pseudo mappings (`[heap]`, `[vdso]`, anonymous ones) and kernel-made files
/// criu handles as memory (`/memfd:`, `/dev/zero` shared mappings, System V segments) are
/// left out. The size is unknown here.
pub fn parse_maps(text: &str) -> Vec<(String, FileRef)> {
    let mut out = Vec::new();
    for line in text.lines() {
        // start-end perms offset dev inode [path]; the path may contain spaces.
        let mut it = line.splitn(6, ' ');
        let (Some(range), Some(_), Some(_), Some(_), Some(inode)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let name = it.next().unwrap_or("").trim_start();
        if inode == "0" || !name.starts_with('/') {
            continue;
        }
        if name.starts_with("/memfd:")
            || name.starts_with("/SYSV")
            || name.starts_with("/dev/zero")
            || name.starts_with("/[aio]")
        {
            continue;
        }
        let (path, deleted) = match name.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (name, false),
        };
        out.push((
            range.to_string(),
            FileRef {
                path: PathBuf::from(path),
                deleted,
                size: None,
                allocated: None,
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_name_files_and_skip_pseudo_mappings() {
        let text = "\
55d0c0a00000-55d0c0a21000 r--p 00000000 fd:01 1234 /usr/bin/migr server\n\
55d0c2a00000-55d0c2a21000 rw-p 00000000 00:00 0 [heap]\n\
7f0000000000-7f0001000000 r--s 00000000 00:1f 99 /tmp/big.bin (deleted)\n\
7f0001000000-7f0001001000 rw-s 00000000 00:01 5 /memfd:cache (deleted)\n\
7f0001001000-7f0001002000 rw-s 00000000 00:01 6 /dev/zero (deleted)\n\
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]\n";
        let m = parse_maps(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].0, "55d0c0a00000-55d0c0a21000");
        assert_eq!(m[0].1.path, PathBuf::from("/usr/bin/migr server"));
        assert!(!m[0].1.deleted);
        assert_eq!(m[1].1.path, PathBuf::from("/tmp/big.bin"));
        assert!(m[1].1.deleted);
    }

    #[test]
    fn fd_links_classify() {
        assert_eq!(classify("socket:[77]", None), FdTarget::Socket(77));
        assert_eq!(classify("pipe:[78]", None), FdTarget::Pipe(78));
        assert_eq!(
            classify("anon_inode:[eventfd]", None),
            FdTarget::AnonInode("eventfd".into())
        );
        assert_eq!(
            classify("anon_inode:inotify", None),
            FdTarget::AnonInode("inotify".into())
        );
        assert_eq!(
            classify("/tmp/x (deleted)", None),
            FdTarget::File(FileRef {
                path: "/tmp/x".into(),
                deleted: true,
                size: None,
                allocated: None
            })
        );
        assert_eq!(
            classify("/", fs::metadata("/").ok()),
            FdTarget::Dir("/".into())
        );
        assert_eq!(
            classify("/dev/null", fs::metadata("/dev/null").ok()),
            FdTarget::Device("/dev/null".into())
        );
        assert_eq!(fdinfo_flags("pos:\t0\nflags:\t02100001\n"), Some(0o2100001));
    }

    #[test]
    fn inventory_of_a_child_sees_its_files_and_pipe() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("held");
        fs::write(&f, [1u8; 4096]).unwrap();
        // A shell holding the file on fd 5, with its stdin a pipe from us.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "exec 5<\"$0\"; read x", f.to_str().unwrap()])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let inv = loop {
            let inv = Inventory::take(pid).unwrap();
            let has = inv
                .fds()
                .any(|(_, o)| matches!(&o.target, FdTarget::File(r) if r.path == f));
            if has || std::time::Instant::now() > deadline {
                break inv;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let file = inv.fds().find_map(|(_, o)| match &o.target {
            FdTarget::File(r) if r.path == f => Some((o.fd, r.size, o.read, o.write)),
            _ => None,
        });
        assert_eq!(file, Some((5, Some(4096), true, false)));
        let stdin = inv.fds().find(|(_, o)| o.fd == 0).unwrap().1;
        assert!(matches!(stdin.target, FdTarget::Pipe(_)) && stdin.read && !stdin.write);
        drop(child.stdin.take());
        child.wait().unwrap();
    }
}
