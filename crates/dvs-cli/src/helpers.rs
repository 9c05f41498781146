//! Helpers the CLI's commands share: reaching a node's control socket, resolving names and
//! `DC/EP` targets, reading the cluster directory, waiting and stopping processes, and the
//! guard that stops the clusters a command started.
//!
//! This module uses no other module of the CLI, so every command can use it without an
//! import cycle.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dvs_config::{ClusterConfig, DcConfig, NodeConfig};
use dvs_directory::Versioned;
use dvs_node::ctl::{CtlClient, CtlError, CtlRequest, CtlResponse, EndpointState, NodeStatus};
use dvs_wire::{DcId, Ep, NodeId};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

// ----- nodes ---------------------------------------------------------------------------------

/// A control connection to `node` whose answers are awaited at most `timeout` each.
///
/// A node of this host is reached at its `ctl.sock`. A node whose runtime folder is not on
/// this host (hosts share no file) is reached through the node of this host, which relays
/// the requests over its peer link: `$DVS_NODE` (a name or id) names that node, else it is
/// the first node of the config whose control socket is here.
pub fn ctl_connect(
    cfg: &ClusterConfig,
    node: &NodeConfig,
    timeout: Duration,
) -> Result<CtlClient, CtlError> {
    let sock = node.ctl_socket();
    let mut c = match CtlClient::connect(&sock) {
        Ok(c) => c,
        Err(direct) => {
            if sock.exists() {
                return Err(direct);
            }
            let Some(local) = local_node(cfg, node) else {
                return Err(direct);
            };
            CtlClient::relayed(&local.ctl_socket(), node.id)?
        }
    };
    c.set_timeout(Some(timeout))?;
    Ok(c)
}

/// The node of this host that relays requests to `target` (see [`ctl_connect`]).
fn local_node<'a>(cfg: &'a ClusterConfig, target: &NodeConfig) -> Option<&'a NodeConfig> {
    if let Ok(name) = std::env::var("DVS_NODE") {
        return cfg.find_node(&name).filter(|n| n.id != target.id);
    }
    cfg.nodes
        .iter()
        .find(|n| n.id != target.id && n.ctl_socket().exists())
}

/// Asks one node for its status, with a short timeout.
pub fn node_status(cfg: &ClusterConfig, node: &NodeConfig) -> Result<NodeStatus> {
    match ctl_connect(cfg, node, Duration::from_secs(3))?.call(&CtlRequest::Status)? {
        CtlResponse::Status(s) => Ok(s),
        other => bail!("unexpected answer from node {}: {other:?}", node.name),
    }
}

/// The node that reports `{dc, ep}` RUNNING, asking every node in turn.
pub fn running_on(cfg: &ClusterConfig, dc: DcId, ep: Ep) -> Option<&NodeConfig> {
    cfg.nodes.iter().find(|n| {
        node_status(cfg, n).is_ok_and(|s| {
            s.endpoints
                .iter()
                .any(|e| e.dc == dc && e.ep == ep && e.state == EndpointState::Running)
        })
    })
}

/// Asks every node of `cfg` to stop and kills the process tree of those that do not within
/// 5 s (a node that hangs would otherwise leave the programs it launched behind). Prints
/// nothing on stdout; returns how many node kernels were stopped.
pub fn stop_cluster(cfg: &ClusterConfig) -> usize {
    let mut stopped = 0;
    for node in &cfg.nodes {
        let pid: Option<i32> = std::fs::read_to_string(node.runtime_dir.join("node.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let asked = ctl_connect(cfg, node, Duration::from_secs(3))
            .and_then(|mut c| c.call(&CtlRequest::Shutdown));
        let Some(pid) = pid else {
            if asked.is_ok() {
                stopped += 1;
            }
            continue;
        };
        if !wait_gone(pid, Duration::from_secs(5)) {
            if is_node_kernel(pid) {
                eprintln!("node {} (pid {pid}) did not stop; killing it", node.name);
                let _ = dvs_checkpoint::kill_tree(pid);
            } else {
                eprintln!(
                    "node {}: pid {pid} from its node.pid is no node kernel (a stale file?); left alone",
                    node.name
                );
            }
        }
        if asked.is_ok() || dvs_checkpoint::process_alive(pid) {
            stopped += 1;
        }
        let _ = std::fs::remove_file(node.runtime_dir.join("node.pid"));
    }
    // A node kernel that was killed left its process trees behind (a copy stopped by a
    // migration stays stopped); a node that starts kills them, but it may never start again.
    for node in &cfg.nodes {
        let killed = dvs_node::kill_leftover_trees(&node.runtime_dir);
        if killed > 0 {
            eprintln!(
                "node {}: killed {killed} process tree(s) its killed kernel left behind",
                node.name
            );
        }
    }
    // Images a node killed mid-migration left behind (a node deletes its own only when it
    // starts again). Only once no node of the cluster runs here any more.
    let running = cfg.nodes.iter().any(|n| {
        std::fs::read_to_string(n.runtime_dir.join("node.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .is_some_and(|pid: i32| dvs_checkpoint::process_alive(pid) && is_node_kernel(pid))
    });
    if !running {
        let dir = dvs_node::cluster_images_dir(&cfg.cluster_id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("cannot delete the images under {}: {e}", dir.display());
            }
        }
    }
    stopped
}

/// Whether `pid` runs `dvs … node --node ID`. A node that crashed leaves its `node.pid`
/// behind, and the system may since have given that pid to an unrelated program, whose
/// process tree must not be killed.
fn is_node_kernel(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        args.contains(&&b"node"[..])
            && args
                .iter()
                .any(|a| *a == b"--node" || a.starts_with(b"--node="))
    })
}

// ----- names and targets ---------------------------------------------------------------------

fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    it.cloned().collect::<Vec<_>>().join(", ")
}

/// The node named by `s` (an id or a name).
pub fn find_node<'a>(cfg: &'a ClusterConfig, s: &str) -> Result<&'a NodeConfig> {
    cfg.find_node(s).ok_or_else(|| {
        anyhow!(
            "no node {s:?} in the cluster config (nodes: {})",
            names(cfg.nodes.iter().map(|n| &n.name))
        )
    })
}

/// The DC named by `s` (an id or a name).
pub fn find_dc<'a>(cfg: &'a ClusterConfig, s: &str) -> Result<&'a DcConfig> {
    cfg.find_dc(s).ok_or_else(|| {
        anyhow!(
            "no DC {s:?} in the cluster config (DCs: {})",
            names(cfg.dcs.iter().map(|d| &d.name))
        )
    })
}

/// The name of node `id`, or the id itself when the config has no such node.
pub fn node_name(cfg: &ClusterConfig, id: NodeId) -> String {
    cfg.node_by_id(id)
        .map_or_else(|| id.to_string(), |n| n.name.clone())
}

/// Splits `DC/EP` and resolves the DC.
pub fn parse_target(cfg: &ClusterConfig, target: &str) -> Result<(DcId, Ep)> {
    let (dc, ep) = target
        .split_once('/')
        .ok_or_else(|| anyhow!("{target:?}: expected DC/EP, e.g. dc0/1"))?;
    let dcc = find_dc(cfg, dc)?;
    let ep: Ep = ep
        .parse()
        .map_err(|_| anyhow!("{ep:?} is not an endpoint number"))?;
    Ok((dcc.id, ep))
}

// ----- the cluster directory -----------------------------------------------------------------

/// Reads `key` from the directory that `cfg` names, as a node kernel of the cluster sees it.
pub fn directory_get(cfg: &ClusterConfig, key: &str) -> Result<Option<Versioned>> {
    let dir = dvs_directory::open(&cfg.directory).context("cannot open the cluster directory")?;
    // The directory's interface is async (a remote store's is); one read needs no more than
    // a runtime on this thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start an async runtime to read the cluster directory")?;
    rt.block_on(dir.get(key))
        .with_context(|| format!("cannot read {key} from the cluster directory"))
}

/// Adds to `cfg.nodes` the nodes that hold a membership lease in the directory but are not
/// in the config (they joined later), so that commands can name and reach them (through the
/// node of this host: their runtime folder is nowhere here). A directory that cannot be read
/// adds nothing.
pub fn add_joined_nodes(cfg: &mut ClusterConfig) {
    let Ok(dir) = dvs_directory::open(&cfg.directory) else {
        return;
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let read = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(3),
            dir.get_prefix(dvs_directory::keys::NODE_PREFIX),
        )
        .await
    });
    let Ok(Ok(entries)) = read else {
        return;
    };
    for (key, v) in entries {
        let Some(id) = dvs_directory::keys::parse_node_key(&key) else {
            continue;
        };
        if cfg.node_by_id(id).is_some() {
            continue;
        }
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&v.value) else {
            continue;
        };
        let (Some(name), Some(addr)) = (
            record["name"].as_str(),
            record["addr"].as_str().and_then(|a| a.parse().ok()),
        ) else {
            continue;
        };
        if cfg.find_node(name).is_some() {
            continue;
        }
        cfg.nodes.push(NodeConfig {
            id,
            name: name.to_owned(),
            peer_addr: addr,
            runtime_dir: PathBuf::from(format!("/nonexistent/dvs-joined-node/{name}")),
        });
    }
}

/// A bench's progress line: on stderr, so that stdout holds only the report (table or JSON).
pub fn progress(what: &str) {
    eprintln!("dvs bench: {what}");
}

// ----- waiting -------------------------------------------------------------------------------

/// Checks `done` every `step` until it holds or `timeout` has passed; whether it held.
pub fn wait_until(timeout: Duration, step: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(step);
    }
}

/// Waits up to `timeout` for process `pid` to be gone; whether it is. A zombie counts as
/// gone: a node started by `dvs up` is reparented to init once `up` exits, and an init that
/// reaps lazily (as in some containers) would otherwise make callers wait for a process that
/// already exited.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    wait_until(timeout, Duration::from_millis(10), || {
        !dvs_checkpoint::process_alive(pid)
    })
}

/// The nearest-rank `q` quantile (0 < q <= 1) of `sorted`, which must not be empty.
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> T {
    let n = sorted.len();
    sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1]
}

// ----- the cluster guard ---------------------------------------------------------------------

/// What a [`ClusterGuard`] cleans up.
struct Guarded {
    clusters: Vec<ClusterConfig>,
    /// Folder to remove once the clusters are stopped.
    remove: Option<PathBuf>,
}

impl Guarded {
    fn clean_up(&mut self) {
        for cfg in self.clusters.drain(..) {
            stop_cluster(&cfg);
        }
        if let Some(dir) = self.remove.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Stops the clusters a command started (and removes their folder, if asked) when dropped,
/// and also on SIGINT or SIGTERM: the nodes run in their own sessions and would outlive the
/// command.
pub struct ClusterGuard {
    guarded: Arc<Mutex<Guarded>>,
    old_mask: SigSet,
}

impl ClusterGuard {
    /// Guards the clusters later started with [`ClusterGuard::start`]; removes `remove` at the
    /// end.
    ///
    /// Blocks SIGINT and SIGTERM in the calling thread, so create the guard before any other
    /// thread starts: threads inherit the mask, and only the guard's watcher thread takes the
    /// signals. Drop it on the same thread (it restores that thread's mask).
    pub fn new(remove: Option<PathBuf>) -> Result<Self> {
        let mut sigs = SigSet::empty();
        sigs.add(Signal::SIGINT);
        sigs.add(Signal::SIGTERM);
        let old_mask = sigs.thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
        let guarded = Arc::new(Mutex::new(Guarded {
            clusters: Vec::new(),
            remove,
        }));
        let watched = guarded.clone();
        thread::spawn(move || {
            if let Ok(sig) = sigs.wait() {
                let mut g = watched.lock().unwrap_or_else(|e| e.into_inner());
                let what = if g.clusters.len() == 1 {
                    "the cluster"
                } else {
                    "the clusters"
                };
                eprintln!("dvs: {sig}, stopping {what}");
                g.clean_up();
                std::process::exit(130);
            }
        });
        Ok(ClusterGuard { guarded, old_mask })
    }

    /// Runs `start` and guards the cluster it started. The guard is held meanwhile, so that a
    /// signal arriving during the start is handled once the cluster exists and stops it too.
    pub fn start(&self, start: impl FnOnce() -> Result<ClusterConfig>) -> Result<ClusterConfig> {
        let mut guarded = self.guarded.lock().unwrap_or_else(|e| e.into_inner());
        let cfg = start()?;
        guarded.clusters.push(cfg.clone());
        Ok(cfg)
    }
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        self.guarded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clean_up();
        let _ = self.old_mask.thread_set_mask();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_checks_before_and_after_sleeping() {
        assert!(wait_until(Duration::ZERO, Duration::from_secs(10), || true));
        let mut calls = 0;
        assert!(!wait_until(
            Duration::from_millis(20),
            Duration::from_millis(1),
            || {
                calls += 1;
                false
            }
        ));
        assert!(calls >= 2, "{calls}");
    }

    #[test]
    fn a_process_that_exited_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Gone once it exited, also before it is reaped (a zombie).
        assert!(wait_gone(pid, Duration::from_secs(5)));
        child.wait().unwrap();
        assert!(!wait_gone(std::process::id() as i32, Duration::ZERO));
    }

    #[test]
    fn only_a_node_kernel_is_taken_for_one() {
        assert!(!is_node_kernel(std::process::id() as i32));
        // `sh -c SCRIPT node --node 0` shows those words in its command line; `; true` keeps
        // the shell from exec-ing `sleep` in its place.
        let mut fake = std::process::Command::new("sh")
            .args(["-c", "sleep 10; true", "node", "--node", "0"])
            .spawn()
            .unwrap();
        // Its command line can read empty for a moment after the spawn returns.
        let pid = fake.id() as i32;
        assert!(wait_until(
            Duration::from_secs(5),
            Duration::from_millis(5),
            || is_node_kernel(pid)
        ));
        fake.kill().unwrap();
        fake.wait().unwrap();
    }

    #[test]
    fn targets_and_names_resolve() {
        let cfg = ClusterConfig::local(std::path::Path::new("/nonexistent"), 2, 7400);
        assert_eq!(parse_target(&cfg, "dc0/3").unwrap(), (cfg.dcs[0].id, 3));
        assert_eq!(parse_target(&cfg, "0/-1").unwrap(), (0, -1));
        let e = parse_target(&cfg, "dcx/1").unwrap_err().to_string();
        assert!(e.contains("no DC \"dcx\"") && e.contains("dc0"), "{e}");
        assert!(parse_target(&cfg, "dc0").is_err());
        assert!(parse_target(&cfg, "dc0/x").is_err());
        assert_eq!(find_node(&cfg, "1").unwrap().name, "node1");
        let e = find_node(&cfg, "node9").unwrap_err().to_string();
        assert!(e.contains("node0, node1"), "{e}");
        assert_eq!(node_name(&cfg, 0), "node0");
        assert_eq!(node_name(&cfg, 42), "42");
    }

    #[test]
    fn the_guard_passes_start_errors_on_and_removes_its_folder() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("c");
        std::fs::create_dir(&dir).unwrap();
        let guard = ClusterGuard::new(Some(dir.clone())).unwrap();
        let e = guard.start(|| bail!("no room")).unwrap_err();
        assert_eq!(e.to_string(), "no room");
        // A cluster whose nodes are not running: stopping it finds nothing to stop.
        guard
            .start(|| Ok(ClusterConfig::local(&dir, 2, 7400)))
            .unwrap();
        assert!(dir.exists());
        drop(guard);
        assert!(!dir.exists());
    }

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<u32> = (1..=10).collect();
        assert_eq!(nearest_rank(&v, 0.5), 5);
        assert_eq!(nearest_rank(&v, 0.95), 10);
        assert_eq!(nearest_rank(&v, 0.01), 1);
    }
}
