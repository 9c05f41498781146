//! What the migration tests share: the example server and its checking client on a real
//! cluster, `dvs migrate` and the checks on where the server runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::examples::example_bin;
use super::{Cluster, DVS};

/// The paper's three placements of a migration (docs/ARCHITECTURE.md §7.4).
#[derive(Clone, Copy, Debug)]
pub enum Scenario {
    /// Server on a remote node → the (first) client's node.
    RemoteToClientNode,
    /// Server on the (first) client's node → a remote node.
    ClientNodeToRemote,
    /// Server on a remote node → another remote node.
    RemoteToRemote,
}

impl Scenario {
    /// (server's node, (first) client's node, destination) for the scenario.
    pub fn nodes(self) -> (u16, u16, u16) {
        match self {
            Scenario::RemoteToClientNode => (0, 2, 2),
            Scenario::ClientNodeToRemote => (0, 0, 1),
            Scenario::RemoteToRemote => (0, 2, 1),
        }
    }
}

/// Upper bound for anything a test waits for. Never reached when things work: it only turns
/// a hang into a failure.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// Endpoint of the (first) server.
pub const SERVER: i32 = 1;
/// Endpoint of the (first) client.
pub const CLIENT: i32 = 2;
/// Iterations of a client run (the paper's figure).
pub const ITERATIONS: u64 = 1000;
/// Bytes the server copies into the client per iteration.
pub const BLOCK: &str = "65536";
/// The server logs a line with this every 100 requests served.
pub const SERVED: &str = "requests served";

/// How the process state moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Transparent checkpoint/restore with CRIU.
    Criu,
    /// The program's own snapshot hook (m3ipc), restarted on the destination.
    Cooperative,
}

impl Backend {
    /// The value of `dvs migrate --backend`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Criu => "criu",
            Backend::Cooperative => "cooperative",
        }
    }
}

/// Takes the global lock that makes the tests of this file run one at a time (a poisoned
/// lock only means another test failed).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `f` every 10 ms until it returns `Some`, failing the test with `what` (and what
/// `detail` says then) after [`HANG_GUARD`].
pub fn wait_until<T>(
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    detail: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {HANG_GUARD:?} waiting for {what}; {}",
            detail()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The name of node `id` (`dvs` commands take names).
pub fn node_name(c: &Cluster, id: u16) -> String {
    c.node(id).name.clone()
}

/// The log file of the process launched as endpoint `ep` of dc0 on node `node` (a process
/// restored by criu elsewhere keeps writing to it).
pub fn ep_log(c: &Cluster, node: u16, ep: i32) -> PathBuf {
    c.node(node)
        .runtime_dir
        .join("logs")
        .join(format!("dc0-{ep}.log"))
}

/// How many "N requests served" lines the log at `path` holds (one per 100 requests).
pub fn served_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(SERVED))
        .count()
}

/// Everything `dvs` printed, for failure messages.
pub fn printed(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// What the cluster looks like, for failure messages: `dvs status`, `dvs ps` and the last
/// lines of every program's log.
pub fn diagnose(c: &Cluster) -> String {
    let mut out = String::new();
    for args in [["status"], ["ps"]] {
        let o = c.dvs(&args);
        out += &format!(
            "\n--- dvs {} ---\n{}{}",
            args[0],
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    for n in &c.cfg.nodes {
        let Ok(dir) = std::fs::read_dir(n.runtime_dir.join("logs")) else {
            continue;
        };
        for f in dir.flatten() {
            let text = std::fs::read_to_string(f.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(12)..].join("\n");
            out += &format!("\n--- {} (last lines) ---\n{tail}", f.path().display());
        }
    }
    out
}

/// Launches `migr-server` as endpoint `ep` of dc0 on node `node` (in the background).
pub fn start_server(c: &Cluster, node: u16, ep: i32) {
    start_server_with(c, node, ep, &[]);
}

/// Launches `migr-server --ballast-mb MB` as endpoint `ep` of dc0 on node `node`.
pub fn start_ballast_server(c: &Cluster, node: u16, ep: i32, mb: u32) {
    start_server_with(c, node, ep, &["--ballast-mb", &mb.to_string()]);
}

/// Launches `migr-server ARGS` as endpoint `ep` of dc0 on node `node`.
pub fn start_server_with(c: &Cluster, node: u16, ep: i32, args: &[&str]) {
    let server = example_bin("migr-server");
    let ep_s = ep.to_string();
    let name = node_name(c, node);
    let mut cmd = vec![
        "run",
        "--dc",
        "dc0",
        "--ep",
        &ep_s,
        "--node",
        &name,
        "--",
        server.to_str().expect("UTF-8 path"),
    ];
    cmd.extend_from_slice(args);
    let out = c.dvs(&cmd);
    assert!(
        out.status.success(),
        "dvs run migr-server {args:?} failed: {}",
        printed(&out)
    );
}

/// The `migr-client` command line for `iterations` requests of `block` bytes to `server`.
pub fn client_cmd(server: i32, iterations: u64, block: &str) -> Vec<String> {
    let client = example_bin("migr-client");
    vec![
        client.display().to_string(),
        "--server".into(),
        server.to_string(),
        "--iterations".into(),
        iterations.to_string(),
        "--block-size".into(),
        block.into(),
        "--json".into(),
    ]
}

/// A `migr-client` run under `dvs run --wait`, in a background thread.
pub struct ClientRun {
    /// What it is, for messages.
    pub what: String,
    /// The output of `dvs run --wait`, once it ended.
    pub rx: mpsc::Receiver<Output>,
    /// Set when `dvs run --wait` ended.
    pub done: Arc<AtomicBool>,
}

impl ClientRun {
    /// Starts `migr-client` as endpoint `ep` on node `node`, calling `server`.
    pub fn start(
        c: &Cluster,
        node: u16,
        ep: i32,
        server: i32,
        iterations: u64,
        block: &str,
    ) -> Self {
        let what = format!("migr-client ep {ep} on node {node} (server ep {server})");
        let mut cmd = Command::new(DVS);
        cmd.arg("--dir")
            .arg(c.dir())
            .args(["run", "--dc", "dc0", "--ep", &ep.to_string()])
            .args(["--node", &node_name(c, node), "--wait", "--"])
            .args(client_cmd(server, iterations, block))
            .stdin(Stdio::null());
        ClientRun::spawn(what, cmd)
    }

    /// Runs `cmd` (a client under `dvs run --wait`) in a background thread; `what` names it in
    /// messages.
    pub fn spawn(what: String, mut cmd: Command) -> Self {
        let (tx, rx) = mpsc::channel();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        thread::spawn(move || {
            let out = cmd.output().expect("cannot run dvs run --wait");
            flag.store(true, Ordering::SeqCst);
            let _ = tx.send(out);
        });
        ClientRun { what, rx, done }
    }

    /// Whether the run ended already.
    pub fn finished(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Waits for the run to end, at most [`HANG_GUARD`] (`None` if it did not), and returns
    /// what `dvs run --wait` printed and its status, whatever they are.
    pub fn finish_raw(self) -> Option<Output> {
        self.rx.recv_timeout(HANG_GUARD).ok()
    }

    /// Waits for the run to end (at most [`HANG_GUARD`]) and returns the client's JSON
    /// result, failing the test if the run printed none or failed.
    pub fn finish(self, c: &Cluster) -> Value {
        let out = self.rx.recv_timeout(HANG_GUARD).unwrap_or_else(|_| {
            panic!(
                "{} did not finish within {HANG_GUARD:?} after the migrations{}",
                self.what,
                diagnose(c)
            )
        });
        let result = client_json(&String::from_utf8_lossy(&out.stdout))
            .unwrap_or_else(|| panic!("{} printed no JSON result: {}", self.what, printed(&out)));
        assert!(
            out.status.success(),
            "{} failed (result {result}): {}{}",
            self.what,
            printed(&out),
            diagnose(c)
        );
        result
    }
}

/// The client's JSON result line in `text` (its output also holds its error lines).
pub fn client_json(text: &str) -> Option<Value> {
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(|v| v.get("ok").is_some())
}

/// Waits until the server log at `log` shows at least `lines` "requests served" lines (100
/// requests each) and returns `true`, or returns `false` if `client` ended first.
pub fn wait_served(c: &Cluster, log: &Path, lines: usize, client: &ClientRun) -> bool {
    wait_until(
        &format!("{} in {}", lines * 100, log.display()),
        || {
            if served_lines(log) >= lines {
                Some(true)
            } else if client.finished() {
                Some(served_lines(log) >= lines)
            } else {
                None
            }
        },
        || {
            format!(
                "the log holds {} such lines{}",
                served_lines(log),
                diagnose(c)
            )
        },
    )
}

/// Asserts a client's result: `iterations` ok, nothing corrupt, lost or duplicated, and the
/// server's counter went up by exactly one per request (it had no other client), from 1.
pub fn assert_client_ok(c: &Cluster, what: &str, r: &Value, iterations: u64) {
    let n = |k: &str| {
        r[k].as_u64()
            .unwrap_or_else(|| panic!("{what}: no {k} in {r}"))
    };
    assert_eq!(
        (n("ok"), n("corrupt"), n("lost"), n("duplicated")),
        (iterations, 0, 0, 0),
        "{what}: (ok, corrupt, lost, duplicated) in {r}{}",
        diagnose(c)
    );
    let (first, last) = (n("first_counter"), n("last_counter"));
    assert_eq!(
        last - first + 1,
        iterations,
        "{what}: the server's counter did not go on across the move ({r}){}",
        diagnose(c)
    );
    assert_eq!(first, 1, "{what}: the server's first counter ({r})");
}

/// A phase `dvs migrate --fail-at` can make fail.
pub const FAIL_PHASES: [&str; 3] = ["checkpoint", "transfer", "restore"];

/// Runs `dvs migrate dc0/EP --to NODE --backend B [--fail-at PHASE] --json` and checks the
/// outcome: committed without `fail_at`, rolled back with the injected error with it.
/// Returns the migration's JSON report.
pub fn migrate(c: &Cluster, ep: i32, to: u16, backend: Backend, fail_at: Option<&str>) -> Value {
    let target = format!("dc0/{ep}");
    let to_name = node_name(c, to);
    let mut args = vec![
        "migrate",
        &target,
        "--to",
        &to_name,
        "--backend",
        backend.name(),
        "--json",
    ];
    if let Some(phase) = fail_at {
        args.extend(["--fail-at", phase]);
    }
    let out = c.dvs(&args);
    let what = format!("dvs {}", args.join(" "));
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what} printed no JSON ({e}): {}", printed(&out)));
    match fail_at {
        None => assert_eq!(
            report["committed"],
            Value::Bool(true),
            "{what} did not commit: {report}"
        ),
        Some(phase) => {
            assert_eq!(
                report["committed"],
                Value::Bool(false),
                "{what} committed despite the injected failure: {report}"
            );
            let error = report["error"].as_str().unwrap_or_default();
            assert!(
                error.contains("injected failure") && error.contains(phase),
                "{what}: the rollback's error is not the injected one: {report}"
            );
        }
    }
    assert!(
        out.status.success(),
        "{what} exited with a failure: {}",
        printed(&out)
    );
    report
}

/// Every node's registration of dc0 endpoint `ep`, as (node, state, node it points at).
pub fn placements(status: &Value, ep: i32) -> Vec<(u64, String, u64)> {
    let mut out = Vec::new();
    for n in status["nodes"].as_array().expect("nodes array") {
        let id = n["id"].as_u64().expect("node id");
        for e in n["status"]["endpoints"].as_array().into_iter().flatten() {
            if e["dc"] == 0 && e["ep"] == ep {
                let state = e["state"].as_str().unwrap_or_default().to_string();
                out.push((id, state, e["node"].as_u64().unwrap_or(u64::MAX)));
            }
        }
    }
    out
}

/// Checks once that `dvs status --json` shows endpoint `ep` RUNNING on node `home` only, and
/// REMOTE pointing at `home` on every other node; returns what it shows otherwise, as
/// (node, state, node it points at).
pub fn check_runs_on(c: &Cluster, ep: i32, home: u16) -> Result<(), Vec<(u64, String, u64)>> {
    let home = home as u64;
    let want: Vec<(u64, String, u64)> = c
        .cfg
        .nodes
        .iter()
        .map(|n| {
            let id = n.id as u64;
            let state = if id == home { "RUNNING" } else { "REMOTE" };
            (id, state.to_string(), home)
        })
        .collect();
    let mut got = placements(&c.status(), ep);
    got.sort();
    if got == want {
        Ok(())
    } else {
        Err(got)
    }
}

/// Asserts (waiting at most [`HANG_GUARD`] for the nodes to settle) that `dvs status --json`
/// shows endpoint `ep` RUNNING on node `home` only, and REMOTE pointing at `home` on every
/// other node.
pub fn assert_runs_on(c: &Cluster, ep: i32, home: u16) {
    let last = std::cell::RefCell::new(Vec::new());
    wait_until(
        &format!("dc0/{ep} RUNNING on node {home} and REMOTE(node {home}) elsewhere"),
        || match check_runs_on(c, ep, home) {
            Ok(()) => Some(()),
            Err(got) => {
                *last.borrow_mut() = got;
                None
            }
        },
        || format!("registrations (node, state, node): {:?}", last.borrow()),
    );
}

/// The state letter of process `pid` (`T`: stopped), from /proc.
pub fn proc_state(pid: u64) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().next().map(str::to_string)
}
