//! Process helpers around checkpointing: launching a migratable process, finding the root of
//! its tree, its sockets, stopping/resuming/killing it, and measuring image directories.
//!
//! All of these read Linux `/proc`; they work on any backend.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::CheckpointError;

/// Builds the command that starts `program` as a migratable process:
/// `unshare --pid --fork setsid PROGRAM`.
///
/// Why: criu can only dump a tree whose session leader is inside it ("A session leader of X(1)
/// is outside of its pid namespace"), and giving the process its own pid namespace keeps its
/// pids stable across restore (the paper's virtual pid). The spawned child is the `unshare`
/// process in the host namespace; the process to dump is its only child, the namespace's pid 1
/// (see [`pid_namespace_init`]).
///
/// Do not add `--kill-child`: it sets a parent-death signal that criu restores, and the
/// restored process would be killed as soon as criu (its parent after restore) exits.
/// Standard streams should be files, `/dev/null` or sockets passed as external: a pipe or a
/// terminal shared with the caller would have to be restored too.
pub fn migratable_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "setsid"]).arg(program);
    cmd
}

/// Returns the host pid of the init (pid 1) of the pid namespace created by the `unshare`
/// process `unshare_pid` (its only child), waiting up to `timeout` for the fork to happen.
/// This is the pid to give to [`crate::DumpRequest::pid`].
pub fn pid_namespace_init(unshare_pid: i32, timeout: Duration) -> Result<i32, CheckpointError> {
    let deadline = Instant::now() + timeout;
    loop {
        if !Path::new(&format!("/proc/{unshare_pid}")).exists() {
            return Err(CheckpointError::NoSuchProcess { pid: unshare_pid });
        }
        for child in children_of(unshare_pid) {
            if ns_pid(child).ok().flatten() == Some(1) {
                return Ok(child);
            }
        }
        if Instant::now() >= deadline {
            return Err(CheckpointError::Timeout(format!(
                "pid {unshare_pid} has no child that is pid 1 of a pid namespace after {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The pid of `pid` inside its own (innermost) pid namespace, from `NSpid:` in
/// `/proc/PID/status`; `None` if the kernel does not report it.
pub fn ns_pid(pid: i32) -> Result<Option<i32>, CheckpointError> {
    let path = format!("/proc/{pid}/status");
    let status =
        fs::read_to_string(&path).map_err(|e| CheckpointError::io(format!("read {path}"), e))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last())
        .and_then(|v| v.parse().ok()))
}

/// The direct children of `pid`. Uses `/proc/PID/task/*/children` and falls back to scanning
/// `/proc` when that file is absent (kernels without CONFIG_PROC_CHILDREN). A process that
/// vanished yields no children.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let tasks = match fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(t) => t,
        Err(_) => return out,
    };
    let mut have_children_file = false;
    for task in tasks.flatten() {
        if let Ok(s) = fs::read_to_string(task.path().join("children")) {
            have_children_file = true;
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    if !have_children_file {
        out = scan_children(pid);
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn scan_children(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
            // comm may contain spaces and parentheses: fields start after the last ')'.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let ppid = rest
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<i32>().ok());
                if ppid == Some(parent) {
                    out.push(pid);
                }
            }
        }
    }
    out
}

/// `root` and all its descendants, parents before children.
pub fn tree_pids(root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let kids = children_of(out[i]);
        out.extend(
            kids.into_iter()
                .filter(|k| !out.contains(k))
                .collect::<Vec<_>>(),
        );
        i += 1;
    }
    out
}

/// Whether any thread of process `pid` still runs (a state other than zombie or dead).
///
/// The group leader's own state is not enough: after SIGKILL the leader can show `Z` while
/// other threads are still exiting and still hold the process's files (its listening
/// sockets among them). A zombie whose threads have all exited counts as gone, so that an
/// init that reaps lazily does not make a caller wait for a process that already ended.
pub fn process_alive(pid: i32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
    })
}

/// The scheduler state letter of `pid` (`R`, `S`, `T` = stopped, `Z` = zombie, ...), from
/// `/proc/PID/stat`.
pub fn process_state(pid: i32) -> Result<char, CheckpointError> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CheckpointError::NoSuchProcess { pid }
        } else {
            CheckpointError::io(format!("read {path}"), e)
        }
    })?;
    stat.rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|s| s.chars().next())
        .ok_or_else(|| {
            CheckpointError::io(format!("parse {path}"), io::ErrorKind::InvalidData.into())
        })
}

/// How much of the tree rooted at `pid` is resident in memory, in bytes: the sum of each
/// process's resident pages (`/proc/PID/statm`; memory shared between them counts twice).
pub fn resident_bytes(pid: i32) -> Result<u64, CheckpointError> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let mut total = 0;
    for p in tree_pids(pid) {
        let path = format!("/proc/{p}/statm");
        // A process that ended meanwhile holds nothing.
        let Ok(statm) = fs::read_to_string(&path) else {
            continue;
        };
        let resident: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| {
                CheckpointError::io(format!("parse {path}"), io::ErrorKind::InvalidData.into())
            })?;
        total += resident * page;
    }
    Ok(total)
}

/// When `pid` started, in clock ticks since boot (`/proc/PID/stat` field 22); with the pid,
/// it names one process for good (a pid alone may be reused). `None` if it does not exist.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, start 22.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

fn signal_one(pid: i32, sig: libc::c_int, name: &'static str) -> Result<(), CheckpointError> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        // Gone already (e.g. killed with its namespace): nothing left to signal.
        return Ok(());
    }
    Err(CheckpointError::Signal {
        pid,
        signal: name,
        source: err,
    })
}

/// Resumes a tree that a dump left stopped (`--leave-stopped`): SIGCONT to every process of
/// the tree, since SIGCONT only continues the process it is sent to. This is the rollback path.
pub fn resume_tree(root: i32) -> Result<(), CheckpointError> {
    if !Path::new(&format!("/proc/{root}")).exists() {
        return Err(CheckpointError::NoSuchProcess { pid: root });
    }
    for pid in tree_pids(root) {
        signal_one(pid, libc::SIGCONT, "SIGCONT")?;
    }
    Ok(())
}

/// Stops every process of a tree (SIGSTOP): a fenced node keeps its endpoints' processes
/// from running until it proves again that they are its own; [`resume_tree`] continues them.
/// A process that is already gone is not an error.
pub fn stop_tree(root: i32) -> Result<(), CheckpointError> {
    for pid in tree_pids(root) {
        signal_one(pid, libc::SIGSTOP, "SIGSTOP")?;
    }
    Ok(())
}

/// Kills a tree (typically the stopped source after a committed migration): SIGKILL to every
/// process of it. A process that is already gone is not an error. The caller still has to reap
/// the root if it is the caller's child.
pub fn kill_tree(root: i32) -> Result<(), CheckpointError> {
    // Collect first: once the namespace's init dies the kernel kills the rest and the tree
    // can no longer be walked.
    let pids = tree_pids(root);
    for pid in pids.iter().rev() {
        signal_one(*pid, libc::SIGKILL, "SIGKILL")?;
    }
    Ok(())
}

/// The inode number of the socket (or any file) behind `fd`, as criu names it
/// (`socket:[INODE]` in `/proc/PID/fd`).
pub fn socket_inode(fd: impl AsFd) -> io::Result<u64> {
    // fstat through a dup: std offers no fstat on a borrowed fd, and the dup is cheap.
    let file = fs::File::from(fd.as_fd().try_clone_to_owned()?);
    Ok(file.metadata()?.ino())
}

/// The sockets that process `pid` holds: `(fd number, socket inode)` for every
/// `/proc/PID/fd/N -> socket:[INODE]`, sorted by fd.
pub fn process_socket_inodes(pid: i32) -> Result<Vec<(i32, u64)>, CheckpointError> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CheckpointError::NoSuchProcess { pid }
        } else {
            CheckpointError::io(format!("read {dir}"), e)
        }
    })?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // The fd may close between readdir and readlink: skip it.
        let Ok(target) = fs::read_link(e.path()) else {
            continue;
        };
        if let Some(ino) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        {
            out.push((fd, ino));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Total size in bytes of the regular files under `dir` (recursively): the size of a
/// checkpoint image, for reports and transfer estimates.
pub fn dir_size(dir: &Path) -> Result<u64, CheckpointError> {
    let mut total = 0;
    let entries =
        fs::read_dir(dir).map_err(|e| CheckpointError::io(format!("read {}", dir.display()), e))?;
    for e in entries {
        let e = e.map_err(|e| CheckpointError::io(format!("read {}", dir.display()), e))?;
        let path = e.path();
        let md = fs::symlink_metadata(&path)
            .map_err(|err| CheckpointError::io(format!("stat {}", path.display()), err))?;
        if md.is_dir() {
            total += dir_size(&path)?;
        } else if md.is_file() {
            total += md.len();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn socket_inode_matches_proc_link() {
        let (a, _b) = UnixStream::pair().unwrap();
        let ino = socket_inode(&a).unwrap();
        let me = std::process::id() as i32;
        let socks = process_socket_inodes(me).unwrap();
        use std::os::fd::AsRawFd;
        assert!(
            socks.contains(&(a.as_raw_fd(), ino)),
            "{socks:?} lacks fd {} ino {ino}",
            a.as_raw_fd()
        );
    }

    #[test]
    fn tree_and_state_of_a_child() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let me = std::process::id() as i32;
        let pid = child.id() as i32;
        assert!(children_of(me).contains(&pid));
        assert!(scan_children(me).contains(&pid));
        assert_eq!(tree_pids(pid), vec![pid]);
        // Alive and not stopped: right after the spawn it may still be in uninterruptible
        // sleep ('D', paging the program in) rather than 'S' or 'R'.
        let state = process_state(pid).unwrap();
        assert!(matches!(state, 'S' | 'R' | 'D'), "state {state:?}");
        kill_tree(pid).unwrap();
        child.wait().unwrap();
        assert!(matches!(
            process_state(pid),
            Err(CheckpointError::NoSuchProcess { .. })
        ));
    }

    #[test]
    fn dir_size_sums_files() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("a"), [0u8; 100]).unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        fs::write(d.path().join("sub/b"), [0u8; 23]).unwrap();
        assert_eq!(dir_size(d.path()).unwrap(), 123);
        assert!(dir_size(&d.path().join("missing")).is_err());
    }
}
