//! What the realistic-program tests share: `app-server` with a working directory, its
//! checking `app-client`s under `dvs run --wait`, status answers, the log check, and what
//! `/proc` shows of the server's process tree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;

use serde_json::Value;

use super::examples::example_bin;
use super::migr::{diagnose, node_name, printed, wait_until, ClientRun};
use super::{Cluster, DVS};

/// Worker threads of the server in these tests.
pub const WORKERS: u16 = 4;
/// The server's threads: the receiver, the workers and the timer.
pub const THREADS: u16 = WORKERS + 2;
/// The log's file name in the working directory.
pub const LOG: &str = "app.log";

/// A per-test working directory under /tmp, removed when dropped, unless the test failed:
/// then it is kept (and its path printed) to look at the log.
pub struct Workdir(Option<tempfile::TempDir>);

impl Workdir {
    /// A fresh folder.
    pub fn new() -> Workdir {
        let dir = tempfile::Builder::new()
            .prefix("dvs-app-")
            .tempdir_in("/tmp")
            .expect("cannot create a working directory");
        Workdir(Some(dir))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("present until dropped").path()
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            if thread::panicking() {
                eprintln!("the working directory is kept: {}", dir.keep().display());
            }
        }
    }
}

/// Launches `app-server --workdir DIR --workers 4 --cache-mb MB` as endpoint `ep` of dc0 on
/// node `node` (in the background), with `dvs run --workdir DIR`.
pub fn start_app_server(c: &Cluster, node: u16, ep: i32, dir: &Path, cache_mb: u32) {
    let server = example_bin("app-server");
    let (ep_s, name) = (ep.to_string(), node_name(c, node));
    let (workers, mb) = (WORKERS.to_string(), cache_mb.to_string());
    let dir = dir.to_str().expect("UTF-8 path");
    let args = [
        "run",
        "--dc",
        "dc0",
        "--ep",
        &ep_s,
        "--node",
        &name,
        // The node's working folder for the program, which travels with it.
        "--workdir",
        dir,
        "--",
        server.to_str().expect("UTF-8 path"),
        "--workdir",
        dir,
        "--workers",
        &workers,
        "--cache-mb",
        &mb,
        "--tick-ms",
        "50",
    ];
    let out = c.dvs(&args);
    assert!(
        out.status.success(),
        "dvs run app-server failed: {}",
        printed(&out)
    );
}

/// `dvs run --dc dc0 --ep EP --node NODE --wait -- app-client --server SERVER ARGS`.
fn client_command(c: &Cluster, node: u16, ep: i32, server: i32, args: &[&str]) -> Command {
    let client = example_bin("app-client");
    let mut cmd = Command::new(DVS);
    cmd.arg("--dir")
        .arg(c.dir())
        .args(["run", "--dc", "dc0", "--ep", &ep.to_string()])
        .args(["--node", &node_name(c, node), "--wait", "--"])
        .arg(client)
        .args(["--server", &server.to_string()])
        .args(args)
        .stdin(Stdio::null());
    cmd
}

/// Starts `app-client --count COUNT --json` as endpoint `ep` on node `node`, under
/// `dvs run --wait`, in a background thread.
pub fn start_app_client(c: &Cluster, node: u16, ep: i32, server: i32, count: u64) -> ClientRun {
    let what = format!("app-client ep {ep} on node {node} (server ep {server})");
    let count = count.to_string();
    let cmd = client_command(c, node, ep, server, &["--count", &count, "--json"]);
    ClientRun::spawn(what, cmd)
}

/// Asserts a client's result: `count` answers ok, none corrupt, lost or duplicated, and
/// the server's status the same in its first and last status answers.
pub fn assert_app_client_ok(c: &Cluster, what: &str, r: &Value, count: u64) {
    assert_app_result(what, r, count, &diagnose(c));
}

/// [`assert_app_client_ok`] for any cluster: `context` ends each failure message.
pub fn assert_app_result(what: &str, r: &Value, count: u64, context: &str) {
    let n = |k: &str| {
        r[k].as_u64()
            .unwrap_or_else(|| panic!("{what}: no {k} in {r}"))
    };
    assert_eq!(
        (n("ok"), n("corrupt"), n("lost"), n("duplicated")),
        (count, 0, 0, 0),
        "{what}: (ok, corrupt, lost, duplicated) in {r}{context}"
    );
    for k in ["workers", "threads", "helper_pid", "cache_bytes"] {
        assert_eq!(
            r["first_status"][k], r["last_status"][k],
            "{what}: the server's {k} changed during the run ({r})"
        );
    }
}

/// One status answer of the server at endpoint `server`, asked by a client with endpoint
/// `ep` on node `node`: `workers`, `threads`, `helper_pid`, `cache_bytes`, `ticks` and the
/// status line's `log_seq`.
pub fn app_status(c: &Cluster, node: u16, ep: i32, server: i32) -> Value {
    let out = client_command(c, node, ep, server, &["--status", "--json"])
        .output()
        .expect("cannot run dvs run --wait");
    let text = String::from_utf8_lossy(&out.stdout);
    let status = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(|v| v.get("helper_pid").is_some());
    match status {
        Some(s) if out.status.success() => s,
        _ => panic!(
            "app-client --status failed: {}{}",
            printed(&out),
            diagnose(c)
        ),
    }
}

/// `app-client --verify-log PATH --json`: the log's summary (`intact`, `lines`,
/// `requests`, `ticks`, `last_seq`), failing the test on any defect.
pub fn verify_log(path: &Path) -> Value {
    let out = Command::new(example_bin("app-client"))
        .arg("--verify-log")
        .arg(path)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .expect("cannot run app-client --verify-log");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("--verify-log printed no JSON ({e}): {}", printed(&out)));
    assert!(
        out.status.success() && v["intact"] == Value::Bool(true),
        "{} is not intact: {v}",
        path.display()
    );
    v
}

/// Request lines in the log at `path` so far (0 if it does not exist yet).
pub fn request_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" ep="))
        .count()
}

/// The command line of `pid`, split at NULs (empty for a zombie or a process gone).
fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The host pids of the `app-server` processes (not helpers) serving working directory
/// `dir` that are pid 1 of their namespace and not stopped.
pub fn server_pids(dir: &Path) -> Vec<i32> {
    let dir = dir.to_str().expect("UTF-8 path");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let argv = cmdline(pid);
        let ours = argv.first().is_some_and(|a| a.ends_with("app-server"))
            && argv.windows(2).any(|w| w[0] == "--workdir" && w[1] == dir)
            && !argv.iter().any(|a| a == "--helper");
        if ours
            && dvs_checkpoint::ns_pid(pid).ok().flatten() == Some(1)
            && dvs_checkpoint::process_state(pid).is_ok_and(|s| s != 'T')
        {
            out.push(pid);
        }
    }
    out
}

/// Waits until exactly one running server serves `dir` (after a commit the stopped source
/// copy is being killed) and returns its host pid.
pub fn the_server(c: &Cluster, dir: &Path) -> i32 {
    let last = std::cell::RefCell::new(Vec::new());
    wait_until(
        &format!("exactly one running app-server for {}", dir.display()),
        || {
            let pids = server_pids(dir);
            let one = (pids.len() == 1).then(|| pids[0]);
            *last.borrow_mut() = pids;
            one
        },
        || format!("found {:?}{}", last.borrow(), diagnose(c)),
    )
}

/// Threads of process `pid` (entries of `/proc/PID/task`).
pub fn thread_count(pid: i32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// The children of `pid` as (host pid, pid in their namespace, state).
pub fn children(pid: i32) -> Vec<(i32, Option<i32>, Option<char>)> {
    dvs_checkpoint::children_of(pid)
        .into_iter()
        .map(|child| {
            let ns = dvs_checkpoint::ns_pid(child).ok().flatten();
            (child, ns, dvs_checkpoint::process_state(child).ok())
        })
        .collect()
}

/// Every file of the working directory and its content.
pub fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("the working directory exists") {
        let path = entry.expect("a directory entry").path();
        let content =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        out.insert(path, content);
    }
    out
}

/// Asserts that the working directory after a move holds the same files as `before`, each
/// with the same content, except the log, which may only have grown (`before`'s log is a
/// prefix of it).
pub fn assert_same_files(what: &str, before: &BTreeMap<PathBuf, Vec<u8>>, dir: &Path) {
    let after = files(dir);
    let names = |m: &BTreeMap<PathBuf, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(before),
        names(&after),
        "{what}: the working directory's files changed"
    );
    for (path, old) in before {
        let new = &after[path];
        if path.file_name().is_some_and(|n| n == LOG) {
            assert!(
                new.len() >= old.len() && new[..old.len()] == old[..],
                "{what}: {} is not an extension of what it held before the move \
                 ({} bytes before, {} after)",
                path.display(),
                old.len(),
                new.len()
            );
        } else {
            assert!(
                new == old,
                "{what}: {} changed across the move",
                path.display()
            );
        }
    }
}
