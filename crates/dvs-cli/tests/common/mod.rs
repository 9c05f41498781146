//! Shared harness of the integration tests: real node kernels (the `dvs` binary) on loopback,
//! each cluster in a fresh temporary folder with its own ports, stopped by `dvs down` when its
//! handle drops, also when the test panics.
//!
//! The test process itself is the application: [`Cluster::bind`] connects an
//! [`m3ipc::Endpoint`] to a node's socket (one endpoint per thread; the node kernel copies
//! into the test process with `process_vm_readv`/`writev`, which needs root or ptrace rights).

#![allow(dead_code)] // Each test binary uses a different part of the harness.

pub mod app;
pub mod attack;
pub mod etcd;
pub mod examples;
pub mod lab;
pub mod migr;

use std::fs::OpenOptions;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use dvs_config::{ClusterConfig, NodeConfig};
use m3ipc::{DcId, Endpoint, Ep, Errno, NodeId};
use serde_json::Value;

/// The `dvs` binary under test.
pub const DVS: &str = env!("CARGO_BIN_EXE_dvs");

/// Upper bound for anything the tests wait for. Never reached when things work; it only turns
/// a hang into a failure.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Timeout of blocking calls that are expected to complete (an upper bound against hangs).
pub const CALL_TIMEOUT: m3ipc::Timeout = m3ipc::Timeout::Millis(20_000);

/// A first peer port for a new cluster: distinct per test process (from its pid) and per
/// cluster within it, below the ephemeral range so that outgoing connections do not take
/// it. `dvs up` skips ports that are busy anyway.
fn base_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let slot = NEXT.fetch_add(1, Ordering::Relaxed) % 16;
    20_000 + (std::process::id() % 240) as u16 * 50 + slot * 3
}

/// `n` consecutive free loopback ports from `from` on (for clusters not started by `dvs up`).
fn free_ports(from: u16, n: u16) -> u16 {
    let mut start = from;
    'search: loop {
        for i in 0..n {
            if TcpListener::bind(("127.0.0.1", start + i)).is_err() {
                start += i + 1;
                continue 'search;
            }
        }
        return start;
    }
}

/// A fresh folder for a cluster, under /tmp so that socket paths stay short.
fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dvs-it-")
        .tempdir_in("/tmp")
        .expect("cannot create a temporary folder")
}

/// Polls `f` every few milliseconds until it returns `Some`, failing the test with `what`
/// after [`PATIENCE`].
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The IPC error code of a failed call, failing the test on success or on a connection error.
pub fn errno<T: std::fmt::Debug>(r: m3ipc::Result<T>) -> Errno {
    match r {
        Ok(v) => panic!("expected an IPC error, got Ok({v:?})"),
        Err(m3ipc::Error::Ipc(e)) => e,
        Err(e) => panic!("expected an IPC error, got {e}"),
    }
}

/// Runs `dvs` with `args` and returns its output.
pub fn dvs(args: &[&str]) -> Output {
    Command::new(DVS)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run dvs")
}

/// A running cluster of node kernels. Dropping it runs `dvs down` and removes its folder.
pub struct Cluster {
    dir: tempfile::TempDir,
    /// The cluster's config, as the nodes read it.
    pub cfg: ClusterConfig,
}

impl Cluster {
    /// Starts a 3-node cluster with `dvs --dir DIR up --nodes 3` (one DC, `dc0` = id 0,
    /// spanning every node).
    pub fn start() -> Cluster {
        Self::start_under_umask(None)
    }

    /// [`Cluster::start`], with `dvs up` (and so the nodes it starts) running under `umask`
    /// if given.
    pub fn start_under_umask(umask: Option<libc::mode_t>) -> Cluster {
        use std::os::unix::process::CommandExt;
        let dir = temp_dir();
        let port = base_port().to_string();
        let mut cmd = Command::new(DVS);
        cmd.arg("--dir")
            .arg(dir.path())
            .args(["up", "--nodes", "3", "--base-port", &port])
            .stdin(Stdio::null());
        if let Some(mask) = umask {
            // SAFETY: umask(2) is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask);
                    Ok(())
                });
            }
        }
        let out = cmd.output().expect("cannot run dvs up");
        // Load the config before checking, so that a half-started cluster is stopped.
        let cfg = ClusterConfig::load(&dir.path().join("cluster.toml"));
        let cluster = cfg.map(|cfg| Cluster { dir, cfg });
        assert!(
            out.status.success(),
            "dvs up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.expect("dvs up wrote a valid config")
    }

    /// Starts a 3-node cluster from the default local config changed by `edit` (e.g. more
    /// DCs), written to DIR/cluster.toml and started node by node with
    /// `dvs --config DIR/cluster.toml node --node N`; returns once every link is up.
    pub fn start_with(edit: impl FnOnce(&mut ClusterConfig)) -> Cluster {
        let dir = temp_dir();
        let root = dir.path().canonicalize().expect("temp dir exists");
        let mut cfg = ClusterConfig::local(&root, 3, free_ports(base_port(), 3));
        edit(&mut cfg);
        std::fs::write(root.join("cluster.toml"), cfg.to_toml()).expect("cannot write config");
        let cluster = Cluster { dir, cfg };
        if cluster.cfg.link.tls {
            // The CA and node certificates, made as an operator would.
            let config = root.join("cluster.toml");
            let config = config.to_str().expect("utf-8 path");
            for args in [&["tls", "init"][..], &["tls", "issue", "all"][..]] {
                let out = dvs(&[&["--config", config][..], args].concat());
                assert!(
                    out.status.success(),
                    "dvs {args:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        for i in 0..cluster.cfg.nodes.len() {
            cluster.spawn_node(i as NodeId);
        }
        cluster.wait_all_links_up();
        cluster
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file the nodes run from.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("cluster.toml")
    }

    /// Node `id`'s config.
    pub fn node(&self, id: NodeId) -> &NodeConfig {
        self.cfg.node_by_id(id).expect("no such node")
    }

    /// Binds endpoint `ep` of DC `dc` on node `node` from this process.
    pub fn try_bind(&self, node: NodeId, dc: DcId, ep: Ep) -> m3ipc::Result<Endpoint> {
        Endpoint::bind_at(self.node(node).ipc_socket(), dc, ep)
    }

    /// Binds endpoint `ep` of DC 0 on node `node` from this process, failing the test if it
    /// cannot.
    pub fn bind(&self, node: NodeId, ep: Ep) -> Endpoint {
        self.try_bind(node, 0, ep)
            .unwrap_or_else(|e| panic!("cannot bind dc 0 ep {ep} on node {node}: {e}"))
    }

    /// Runs `dvs --dir DIR ARGS`.
    pub fn dvs(&self, args: &[&str]) -> Output {
        Command::new(DVS)
            .arg("--dir")
            .arg(self.dir.path())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run dvs")
    }

    /// `dvs status --json`, parsed (whatever its exit status: it fails when a node is down).
    pub fn status(&self) -> Value {
        let out = self.dvs(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "dvs status --json printed no JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Whether `status` shows every node reachable with every link up.
    pub fn all_links_up(status: &Value) -> bool {
        let nodes = status["nodes"].as_array().expect("nodes array");
        nodes.iter().all(|n| {
            n["reachable"] == Value::Bool(true)
                && n["status"]["links"]
                    .as_array()
                    .is_some_and(|l| l.iter().all(|l| l["up"] == Value::Bool(true)))
        })
    }

    /// Waits until `dvs status --json` shows every node reachable and every link up.
    pub fn wait_all_links_up(&self) {
        eventually("every node reachable and every link up", || {
            Self::all_links_up(&self.status()).then_some(())
        });
    }

    /// The registrations of `{dc, ep}` that `status` shows, as (node, state) pairs.
    pub fn registrations(status: &Value, dc: DcId, ep: Ep) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for n in status["nodes"].as_array().expect("nodes array") {
            let Some(eps) = n["status"]["endpoints"].as_array() else {
                continue;
            };
            for e in eps {
                if e["dc"] == dc && e["ep"] == ep {
                    out.push((
                        n["id"].as_u64().expect("node id"),
                        e["state"].as_str().unwrap_or_default().to_string(),
                    ));
                }
            }
        }
        out
    }

    /// The pid of node `id`'s kernel (from RUNTIME_DIR/node.pid).
    pub fn node_pid(&self, id: NodeId) -> i32 {
        let path = self.node(id).runtime_dir.join("node.pid");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
            .trim()
            .parse()
            .expect("node.pid holds a pid")
    }

    /// SIGKILLs node `id`'s kernel and waits until it is gone. Its pid file is removed, so
    /// that `dvs down` does not wait for a process that no longer exists.
    pub fn kill_node(&self, id: NodeId) {
        let pid = self.node_pid(id);
        kill(pid, libc::SIGKILL);
        eventually(&format!("node {id} (pid {pid}) to die"), || {
            (!dvs_checkpoint::process_alive(pid)).then_some(())
        });
        let _ = std::fs::remove_file(self.node(id).runtime_dir.join("node.pid"));
    }

    /// Starts node `id` again in the background (`dvs --config DIR/cluster.toml node --node
    /// ID`, output appended to its log). It is stopped by `dvs down` like the others.
    pub fn restart_node(&self, id: NodeId) {
        self.spawn_node(id);
        eventually(&format!("node {id} to write its pid file"), || {
            let p = self.node(id).runtime_dir.join("node.pid");
            p.exists().then_some(())
        });
    }

    /// Starts node `id` again the way a service manager with `PrivateTmp=` or a container
    /// would: in a mount namespace of its own (`unshare --mount --propagation private`). Its
    /// parent also leaks it a descriptor opened in the old namespace, as a shell can.
    pub fn restart_node_in_private_mount_ns(&self, id: NodeId) {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private"]).arg(DVS);
        // SAFETY: open(2) is async-signal-safe; the descriptor is left open on purpose.
        unsafe {
            cmd.pre_exec(|| {
                libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                Ok(())
            });
        }
        self.spawn_node_with(id, cmd);
        eventually(&format!("node {id} to write its pid file"), || {
            let p = self.node(id).runtime_dir.join("node.pid");
            p.exists().then_some(())
        });
    }

    fn spawn_node(&self, id: NodeId) {
        self.spawn_node_with(id, Command::new(DVS));
    }

    /// Starts `dvs node` for node `id` with `cmd` (`dvs` itself, or a wrapper followed by it).
    fn spawn_node_with(&self, id: NodeId, mut cmd: Command) {
        let node = self.node(id);
        std::fs::create_dir_all(&node.runtime_dir).expect("cannot create runtime dir");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.runtime_dir.join("node.log"))
            .expect("cannot open node log");
        let mut child = cmd
            .arg("--config")
            .arg(self.config_path())
            .args(["node", "--node", &id.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("cannot start a node");
        // Reap it when it exits, so that `dvs down` does not see a zombie.
        std::thread::spawn(move || child.wait());
    }

    /// Node `id`'s log so far.
    pub fn log(&self, id: NodeId) -> String {
        std::fs::read_to_string(self.node(id).runtime_dir.join("node.log")).unwrap_or_default()
    }

    /// Waits until node `id`'s log holds more than `before` lines containing `needle`, and
    /// returns the first such new line.
    pub fn wait_log(&self, id: NodeId, needle: &str, before: usize) -> String {
        eventually(&format!("node {id} to log {needle:?}"), || {
            self.log(id)
                .lines()
                .filter(|l| l.contains(needle))
                .nth(before)
                .map(str::to_string)
        })
    }

    /// How many lines of node `id`'s log contain `needle`.
    pub fn log_count(&self, id: NodeId, needle: &str) -> usize {
        self.log(id).lines().filter(|l| l.contains(needle)).count()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &self.cfg.nodes {
                let log = self.log(n.id);
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("---- last lines of {}'s log ----", n.name);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        let out = self.dvs(&["down"]);
        if !out.status.success() {
            eprintln!(
                "dvs down failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so that "random" inputs are the same on
/// every run.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}
