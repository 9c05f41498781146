//! The processes a previous run of this node left behind.
//!
//! A node kernel that is killed (SIGKILL, a crash) leaves the process trees it launched or
//! restored running, or stopped if a checkpoint was under way. Their connections to the node
//! are gone, so they can no longer be endpoints, and at start-up the node removes every
//! registration naming it: they are orphans. The node keeps the roots of its endpoints' trees
//! in `RUNTIME_DIR/procs.json` (pid and start time, which together name one process even if
//! pids are reused), and a node that starts kills what that file names and still runs; so
//! does `dvs down` for a node that is not running (it may never start again).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::safe_fs;

/// The file, in the node's runtime folder.
const FILE: &str = "procs.json";

/// One process tree's root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Root {
    pid: i32,
    /// Start time in clock ticks since boot (`/proc/PID/stat`).
    start: u64,
}

/// Kills the trees the previous run recorded that still run; returns how many.
pub fn kill_previous(runtime_dir: &Path) -> usize {
    let path = runtime_dir.join(FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return 0;
    };
    let roots: Vec<Root> = match serde_json::from_str(&text) {
        Ok(r) => r,
        Err(e) => {
            warn!(
                "{} is not a list of processes ({e}); ignored",
                path.display()
            );
            return 0;
        }
    };
    let mut killed = 0;
    for r in roots {
        if dvs_checkpoint::process_start_time(r.pid) != Some(r.start) {
            continue;
        }
        match dvs_checkpoint::kill_tree(r.pid) {
            Ok(()) => {
                info!(
                    pid = r.pid,
                    "killed a process tree left by the previous run of this node"
                );
                killed += 1;
            }
            Err(e) => warn!(
                pid = r.pid,
                "cannot kill a process tree left by the previous run: {e}"
            ),
        }
    }
    let _ = std::fs::remove_file(&path);
    killed
}

/// Starts the thread that records the roots it is sent (the latest list wins) in
/// `runtime_dir`; it ends when the sender is dropped.
pub(crate) fn recorder(runtime_dir: std::path::PathBuf) -> std::sync::mpsc::Sender<Vec<i32>> {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<i32>>();
    let spawned = std::thread::Builder::new()
        .name("dvs-trees".into())
        .spawn(move || {
            while let Ok(mut roots) = rx.recv() {
                while let Ok(newer) = rx.try_recv() {
                    roots = newer;
                }
                record(&runtime_dir, &roots);
            }
        });
    if let Err(e) = spawned {
        warn!("cannot start the thread that records this node's process trees: {e}");
    }
    tx
}

/// Records `pids` as the roots of this run's endpoint trees (blocking: run it off the loop).
pub(crate) fn record(runtime_dir: &Path, pids: &[i32]) {
    let roots: Vec<Root> = pids
        .iter()
        .filter_map(|&pid| dvs_checkpoint::process_start_time(pid).map(|start| Root { pid, start }))
        .collect();
    let text = serde_json::to_vec(&roots).expect("roots serialize");
    if let Err(e) = safe_fs::write_private(&runtime_dir.join(FILE), &text) {
        warn!("cannot record this node's process trees: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn a_recorded_tree_is_killed_and_a_reused_pid_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut victim = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut other = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        record(dir.path(), &[victim.id() as i32]);
        // A record naming `other`'s pid with another start time: a pid reused since.
        let mut roots: Vec<Root> =
            serde_json::from_slice(&std::fs::read(dir.path().join(FILE)).unwrap()).unwrap();
        roots.push(Root {
            pid: other.id() as i32,
            start: 1,
        });
        std::fs::write(dir.path().join(FILE), serde_json::to_vec(&roots).unwrap()).unwrap();
        assert_eq!(kill_previous(dir.path()), 1);
        let status = victim.wait().unwrap();
        assert!(!status.success(), "the recorded process was not killed");
        assert_eq!(other.try_wait().unwrap(), None, "a reused pid was killed");
        other.kill().unwrap();
        other.wait().unwrap();
        assert!(!dir.path().join(FILE).exists());
    }
}
