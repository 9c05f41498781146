//! Checkpoint/restore backends for dvs process migration.
//!
//! A migration moves a process tree from one node to another: the source node checkpoints the
//! tree into an *image directory*, the directory is moved, and the destination restores the
//! tree from it. [`CheckpointBackend`] is that contract; [`Criu`] implements it with the CRIU
//! binary (a cooperative backend, where the program writes its own snapshot, can implement
//! the same trait).
//!
//! # How a migratable process looks (CRIU)
//!
//! * It is a session leader and pid 1 of its own pid namespace. A node kernel starts it with
//!   [`spawn_pid_ns_init`] (one `clone3`, then the program: the child is the tree's root).
//!   [`migratable_command`] (`unshare --pid --fork setsid CMD`) does the same with helper
//!   programs: the child the caller spawns is `unshare` (in the host namespace), and the tree
//!   to dump is rooted at its only child, found with [`pid_namespace_init`]. After restore the
//!   tree keeps its in-namespace pids; its host pid is new ([`RestoreReport::pid`]).
//! * Its connection to the node kernel is a unix socket whose peer is outside the tree. The dump
//!   names it in [`DumpRequest::external_unix_inodes`] (`--external unix[INODE]`), and the
//!   restore plugs a fresh connection in its place with [`RestoreRequest::inherit_fds`]
//!   (`--inherit-fd fd[N]:socket:[INODE]`). Bytes queued in the old socket are not carried.
//! * The dump can leave the source stopped ([`DumpRequest::leave_stopped`]) so that a failed
//!   migration resumes it ([`resume_tree`]) and a committed one kills it ([`kill_tree`]).
//! * After a detached restore (`--restore-detached`) the restored root is reparented to the
//!   nearest child subreaper of the caller, or to init: a node daemon that wants to reap it sets
//!   `PR_SET_CHILD_SUBREAPER` on itself.
//!
//! The CRIU binary must be >= 4.2 on this kernel; `scripts/install-criu.sh` provides one
//! (see [`find_criu`]).

mod criu;
mod error;
pub mod inventory;
pub mod preflight;
mod process;
mod spawn;

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

pub use criu::{find_criu, Criu, CriuWorker, DEFAULT_CRIU_PREFIX, MIN_CRIU_VERSION};
pub use error::CheckpointError;
pub use inventory::Inventory;
pub use preflight::{Plan, PreflightError};
pub use process::{
    children_of, dir_size, kill_tree, migratable_command, ns_pid, pid_namespace_init,
    process_alive, process_socket_inodes, process_start_time, process_state, resident_bytes,
    resume_tree, socket_inode, stop_tree, tree_pids,
};
pub use spawn::{spawn_pid_ns_init, wait_pidfd, ExitKind, PidNsChild, PidNsCommand};

/// A way to checkpoint a process tree into an image directory and restore it from one.
///
/// Implementations are synchronous (they run an external tool or wait for the program's own
/// snapshot); call them from a blocking thread in an async daemon.
pub trait CheckpointBackend: Send + Sync {
    /// Short name for logs and reports ("criu", "cooperative").
    fn name(&self) -> &str;

    /// Whether the backend can work on this machine. Returns a version or description on
    /// success, or an error that says why not (for `dvs doctor`).
    fn check(&self) -> Result<String, CheckpointError>;

    /// Checkpoints the tree rooted at [`DumpRequest::pid`] into [`DumpRequest::images_dir`].
    fn dump(&self, req: &DumpRequest) -> Result<DumpReport, CheckpointError>;

    /// Restores a tree from [`RestoreRequest::images_dir`].
    fn restore(&self, req: &RestoreRequest) -> Result<RestoreReport, CheckpointError>;
}

/// What to checkpoint and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpRequest {
    /// Root of the tree, as a host pid. For a process started with [`migratable_command`] this
    /// is the pid namespace's init ([`pid_namespace_init`]), not the `unshare` process.
    pub pid: i32,
    /// Where the images go. Created if missing; must not already hold images (stale files of
    /// an earlier dump would be mixed into this one).
    pub images_dir: PathBuf,
    /// Keep the source tree stopped after the dump (for rollback) instead of killing it.
    pub leave_stopped: bool,
    /// Inodes of the tree's unix sockets whose peer is outside the tree (the connection to the
    /// node kernel); see [`process_socket_inodes`]. The restore must supply replacements.
    pub external_unix_inodes: Vec<u64>,
    /// Backend log. `None`: `<images_dir>.dump.log` beside the images dir (kept out of the
    /// images dir so that it is not shipped with them).
    pub log_file: Option<PathBuf>,
    /// Dump TCP connections (criu's `tcp_established`), without criu's network lock: only
    /// connections between processes of the tree, whose both ends are frozen (see
    /// [`preflight`]).
    pub tcp_established: bool,
    /// Largest deleted file criu may copy into the image (criu's `ghost_limit`); `None`:
    /// criu's default, 1 MiB.
    pub ghost_limit: Option<u64>,
    /// Extra backend-specific arguments (for CRIU e.g. `--page-server --address A --port P`).
    pub extra_args: Vec<OsString>,
}

impl DumpRequest {
    /// A request with defaults: do not leave stopped, no external sockets, default log file.
    pub fn new(pid: i32, images_dir: impl Into<PathBuf>) -> Self {
        DumpRequest {
            pid,
            images_dir: images_dir.into(),
            leave_stopped: false,
            external_unix_inodes: Vec::new(),
            log_file: None,
            tcp_established: false,
            ghost_limit: None,
            extra_args: Vec::new(),
        }
    }
}

/// The outcome of a successful dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpReport {
    /// The root pid that was dumped.
    pub pid: i32,
    /// Where the images are.
    pub images_dir: PathBuf,
    /// Wall-clock time of the dump (the process is frozen at most this long).
    pub duration: Duration,
    /// Total size of the images.
    pub image_bytes: u64,
    /// Whether the source tree is still there, stopped.
    pub left_stopped: bool,
    /// The backend's log.
    pub log_file: PathBuf,
}

/// What to restore and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequest {
    /// The images of a dump.
    pub images_dir: PathBuf,
    /// Files to plug into the restored tree in place of external resources:
    /// `(fd in the calling process, key)`, where the key names what the fd replaces, e.g.
    /// `socket:[INODE]` for an inode given in [`DumpRequest::external_unix_inodes`]
    /// (CRIU's `--inherit-fd fd[N]:KEY`). The fds must stay open during the call; the restored
    /// process gets its own copy, so the caller may close them afterwards.
    pub inherit_fds: Vec<(RawFd, String)>,
    /// Where the backend writes the restored root's host pid. `None`: `<images_dir>.restore.pid`.
    pub pidfile: Option<PathBuf>,
    /// Backend log. `None`: `<images_dir>.restore.log`.
    pub log_file: Option<PathBuf>,
    /// Return once the tree runs, leaving it parentless (reparented to a subreaper or init).
    /// `false`: the backend process stays the tree's parent until the tree exits and is
    /// returned in [`RestoreReport::waiter`].
    pub detached: bool,
    /// Leave the restored tree stopped (SIGSTOP); [`crate::resume_tree`] lets it run.
    pub leave_stopped: bool,
    /// Extra backend-specific arguments.
    pub extra_args: Vec<OsString>,
}

impl RestoreRequest {
    /// A detached restore with defaults and no inherited fds.
    pub fn new(images_dir: impl Into<PathBuf>) -> Self {
        RestoreRequest {
            images_dir: images_dir.into(),
            inherit_fds: Vec::new(),
            pidfile: None,
            log_file: None,
            detached: true,
            leave_stopped: false,
            extra_args: Vec::new(),
        }
    }

    /// Adds an external unix socket replacement: `fd` (open in the caller) takes the place of
    /// the socket that had inode `inode` at dump time.
    pub fn inherit_unix_socket(mut self, fd: RawFd, inode: u64) -> Self {
        self.inherit_fds.push((fd, format!("socket:[{inode}]")));
        self
    }
}

/// The outcome of a successful restore.
#[derive(Debug)]
pub struct RestoreReport {
    /// Host pid of the restored root (in its namespace it keeps the pid it had, e.g. 1).
    pub pid: i32,
    /// Wall-clock time until the tree was running.
    pub duration: Duration,
    /// The backend's log.
    pub log_file: PathBuf,
    /// For a non-detached restore: the backend process that is the tree's parent; it exits
    /// when the tree does.
    pub waiter: Option<Child>,
}

/// `<dir>.<suffix>` beside `dir` (falls back to inside it for a root-like path).
pub(crate) fn sibling_file(dir: &Path, suffix: &str) -> PathBuf {
    match (dir.parent(), dir.file_name()) {
        (Some(parent), Some(name)) => {
            let mut n = name.to_os_string();
            n.push(".");
            n.push(suffix);
            parent.join(n)
        }
        _ => dir.join(suffix),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_file_sits_beside_the_dir() {
        assert_eq!(
            sibling_file(Path::new("/x/img"), "dump.log"),
            PathBuf::from("/x/img.dump.log")
        );
        assert_eq!(
            sibling_file(Path::new("/x/img/"), "dump.log"),
            PathBuf::from("/x/img.dump.log")
        );
        assert_eq!(
            sibling_file(Path::new("/"), "dump.log"),
            PathBuf::from("/dump.log")
        );
    }

    #[test]
    fn inherit_unix_socket_builds_criu_key() {
        let r = RestoreRequest::new("/x").inherit_unix_socket(7, 12345);
        assert_eq!(r.inherit_fds, vec![(7, "socket:[12345]".to_string())]);
        assert!(r.detached);
    }
}
