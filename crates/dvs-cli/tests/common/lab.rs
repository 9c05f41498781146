//! The harness of the lab tests: `dvs lab up` / `down` around a test, commands inside a
//! host, and what a lab must leave behind (nothing). Nothing here talks to the lab's
//! addresses from the root namespace: every command runs inside it through `dvs lab exec`.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `dvs` binary under test.
pub const DVS: &str = env!("CARGO_BIN_EXE_dvs");
/// Where labs keep their state on the machine (`dvs lab`'s LAB_ROOT).
pub const LAB_ROOT: &str = "/var/lib/dvs/lab";

/// A fresh lab name: distinct per test process and per lab within it, so that concurrent
/// test runs never share a lab.
pub fn lab_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `cmd`, killing it and failing the test if it has not ended within `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    wait_bounded(child, limit, &what)
}

/// Waits for `child` and collects its output, killing it after `limit`.
pub fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> Output {
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not end within {limit:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `dvs ARGS` on this machine (lab commands only: nothing that talks to the lab).
pub fn dvs(args: &[&str]) -> Output {
    run_bounded(Command::new(DVS).args(args), Duration::from_secs(120))
}

/// Fails the test unless `out` succeeded.
pub fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// The path of example program `name`, next to the dvs binary (`cargo test --workspace`
/// builds it).
pub fn example_bin(name: &str) -> String {
    let p = Path::new(DVS).parent().expect("a folder").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p dvs-examples` (or `cargo test --workspace`)",
        p.display()
    );
    p.display().to_string()
}

/// Whether the criu migrations run: criu must work unless `DVS_SKIP_CRIU=1`.
pub fn criu_wanted() -> bool {
    let out = dvs(&["--dir", "/nonexistent/dvs-lab-tests", "doctor"]);
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("criu backend"))
        .unwrap_or("")
        .to_string();
    if line["criu backend".len().min(line.len())..]
        .trim_start()
        .starts_with("yes")
    {
        return true;
    }
    if std::env::var("DVS_SKIP_CRIU").is_ok_and(|v| v == "1") {
        println!("criu is not usable here (DVS_SKIP_CRIU=1): {line}; criu migrations left out");
        return false;
    }
    panic!(
        "criu is not usable here ({line}): run scripts/install-criu.sh (as root), or set \
         DVS_SKIP_CRIU=1 to leave out the criu migrations"
    );
}

/// A lab that exists from `up` until dropped; dropping takes it down (also when the test
/// panics).
pub struct Lab {
    pub name: String,
}

impl Lab {
    /// `dvs lab up --name NAME --hosts N`; fails the test, with the reason, if the lab cannot
    /// be built (no namespaces, no etcd, ...).
    pub fn up(hosts: u16) -> Lab {
        let lab = Lab { name: lab_name() };
        let out = dvs(&[
            "lab",
            "up",
            "--name",
            &lab.name,
            "--hosts",
            &hosts.to_string(),
        ]);
        assert!(
            out.status.success(),
            "`dvs lab up` failed: the lab cannot be built here (it needs root, network and mount \
             namespaces, ip/nsenter/unshare and etcd from scripts/install-etcd.sh):\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        println!("{}", text(&out.stdout));
        lab
    }

    /// `dvs lab status --json`.
    pub fn status(&self) -> Value {
        let out = dvs(&["lab", "status", "--name", &self.name, "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "lab status: {e}: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            )
        })
    }

    /// `CMD` run inside `host` (`dvs lab exec`), bounded by `limit`.
    pub fn exec(&self, host: &str, cmd: &[&str], limit: Duration) -> Output {
        run_bounded(
            Command::new(DVS)
                .args(["lab", "exec", "--name", &self.name, host, "--"])
                .args(cmd),
            limit,
        )
    }

    /// A `dvs` command about node `n`, run where it can reach that node. Every CLI command
    /// the test runs goes through here: today a node's control socket exists only on its
    /// own host, so the command runs on host `n`. Once the CLI talks to its local node,
    /// which forwards, any host will do.
    pub fn dvs_on(&self, n: u16, args: &[&str]) -> Command {
        let mut c = Command::new(DVS);
        c.args([
            "lab",
            "exec",
            "--name",
            &self.name,
            &format!("host{n}"),
            "--",
            DVS,
        ])
        .args(args);
        c
    }

    /// The node server `ep` runs on, as each node reports it (RUNNING there).
    pub fn server_node(&self, ep: i32, nodes: u16) -> Option<u16> {
        (1..=nodes).find(|n| {
            let out = run_bounded(
                &mut self.dvs_on(*n, &["status", "--json"]),
                Duration::from_secs(30),
            );
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            v["nodes"].as_array().into_iter().flatten().any(|node| {
                node["name"] == format!("node{n}")
                    && node["status"]["endpoints"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|e| e["ep"] == ep && e["state"] == "RUNNING")
            })
        })
    }

    /// The highest request count server `ep` logged (a line per 100), over every host: read
    /// through the holders' `/proc/PID/root`, which shows each host's private `/run`.
    pub fn served(&self, ep: i32) -> u64 {
        let st = self.status();
        let mut best = 0;
        for h in st["hosts"].as_array().into_iter().flatten() {
            let Some(holder) = h["holder"].as_i64() else {
                continue;
            };
            let run = PathBuf::from(format!("/proc/{holder}/root/run/dvs"));
            for node in std::fs::read_dir(&run).into_iter().flatten().flatten() {
                let log = node.path().join("logs").join(format!("dc0-{ep}.log"));
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let last = text.lines().rev().find_map(|l| {
                    l.strip_prefix("migr-server: ")?
                        .split_once(" requests served")?
                        .0
                        .parse::<u64>()
                        .ok()
                });
                best = best.max(last.unwrap_or(0));
            }
        }
        best
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = Command::new(DVS)
            .args(["lab", "down", "--name", &self.name])
            .output();
        if let Ok(out) = out {
            if !out.status.success() {
                eprintln!("lab down {}: {}", self.name, text(&out.stderr));
            }
        }
    }
}

/// What is left of a lab after `down`: its namespaces, processes, mounts and files.
pub struct Traces {
    netns: Vec<String>,
    inodes: HashSet<u64>,
    pids: Vec<i64>,
    dir: PathBuf,
}

impl Traces {
    pub fn of(lab: &Lab) -> Traces {
        let st = lab.status();
        let mut netns = Vec::new();
        let mut pids = Vec::new();
        for h in st["hosts"].as_array().expect("hosts") {
            netns.push(h["netns"].as_str().expect("netns").to_string());
            pids.extend(h["holder"].as_i64());
            pids.extend(h["pid"].as_i64());
        }
        netns.push(format!("dvs-lab-{}-sw", lab.name));
        let inodes = netns
            .iter()
            .filter_map(|n| std::fs::metadata(Path::new("/run/netns").join(n)).ok())
            .map(|m| m.ino())
            .collect();
        Traces {
            netns,
            inodes,
            pids,
            dir: Path::new(LAB_ROOT).join(&lab.name),
        }
    }

    /// Fails the test if anything of the lab is still there.
    pub fn assert_gone(&self) {
        let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
        for ns in &self.netns {
            assert!(
                !text(&listed.stdout)
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(ns)),
                "namespace {ns} is still there"
            );
        }
        for pid in &self.pids {
            assert!(
                !dvs_checkpoint::process_alive(*pid as i32),
                "process {pid} of the lab is still alive"
            );
        }
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(m) = std::fs::metadata(p.path().join("ns/net")) else {
                continue;
            };
            assert!(
                !self.inodes.contains(&m.ino()),
                "process {} still runs in a namespace of the lab",
                p.file_name().to_string_lossy()
            );
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        for l in mounts.lines() {
            assert!(
                !self.netns.iter().any(|n| l.contains(n.as_str()))
                    && !l.contains(&*self.dir.to_string_lossy()),
                "a mount of the lab is left: {l}"
            );
        }
        assert!(!self.dir.exists(), "{} is left", self.dir.display());
    }
}

/// Every node's view through host1's node: `dvs status --json` run on host1.
pub fn status(lab: &Lab) -> Value {
    status_on(lab, 1)
}

/// Every node's view through the node of host `n`: `dvs status --json` run there.
pub fn status_on(lab: &Lab, n: u16) -> Value {
    let out = run_bounded(
        &mut lab.dvs_on(n, &["status", "--json"]),
        Duration::from_secs(30),
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The nodes that report dc0/`ep` RUNNING.
pub fn running(lab: &Lab, ep: i32) -> Vec<u64> {
    running_seen_from(lab, 1, ep)
}

/// The nodes that report dc0/`ep` RUNNING, asked through the node of host `n`.
pub fn running_seen_from(lab: &Lab, n: u16, ep: i32) -> Vec<u64> {
    let s = status_on(lab, n);
    s["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| {
            n["status"]["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["dc"] == 0 && e["ep"] == ep && e["state"] == "RUNNING")
        })
        .filter_map(|n| n["id"].as_u64())
        .collect()
}

/// Polls `f` every 100 ms for at most `limit`, failing the test with `what`.
pub fn within<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `dvs migrate DC/EP --to NODE --backend criu --json` asked on node `n`'s host: the report,
/// failing the test when there is none.
pub fn migrate_json(lab: &Lab, n: u16, target: &str, to: &str, limit: Duration) -> Value {
    migrate_report(lab, n, &[target, "--to", to, "--backend", "criu"], limit)
}

/// `dvs migrate ARGS --json` asked on node `n`'s host: the report (committed or rolled
/// back), failing the test when there is none.
pub fn migrate_report(lab: &Lab, n: u16, args: &[&str], limit: Duration) -> Value {
    let mut all = vec!["migrate"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = run_bounded(&mut lab.dvs_on(n, &all), limit);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no migration report ({e}): {}{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

/// `dvs run --dc dc0 --ep EP --node node1 [--workdir DIR] -- CMD...` (asked on node1's
/// host), then waits until node1 runs the endpoint.
pub fn run_on_node1(lab: &Lab, ep: i32, workdir: Option<&str>, cmd: &[&str]) {
    let ep_text = ep.to_string();
    let mut args = vec!["run", "--dc", "dc0", "--ep", &ep_text, "--node", "node1"];
    if let Some(dir) = workdir {
        args.extend(["--workdir", dir]);
    }
    args.push("--");
    args.extend_from_slice(cmd);
    ok(
        run_bounded(&mut lab.dvs_on(1, &args), Duration::from_secs(30)),
        &format!("dvs run {}", cmd.first().copied().unwrap_or_default()),
    );
    within(
        Duration::from_secs(20),
        &format!("dc0/{ep} to run on node1"),
        || (lab.server_node(ep, 3) == Some(1)).then_some(()),
    );
}

/// The entry of the host that runs node `n` in `dvs lab status`.
pub fn host_of(lab: &Lab, n: u16) -> Value {
    let st = lab.status();
    st["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|h| h["node"] == format!("node{n}"))
        .cloned()
        .unwrap_or_else(|| panic!("no host runs node{n}: {st}"))
}

/// The pid of node `n`'s kernel, from `dvs lab status`.
pub fn node_pid(lab: &Lab, n: u16) -> i32 {
    host_of(lab, n)["pid"].as_i64().expect("the node's pid") as i32
}

/// Starts node `n` again on its host, logging to the host's `node.log` (detached; `lab
/// down` kills it with the rest).
pub fn restart_node(lab: &Lab, n: u16) {
    let script = format!("exec {DVS} node --node node{n} >>/var/lib/dvs/node.log 2>&1");
    let mut child = Command::new(DVS)
        .args([
            "lab",
            "exec",
            "--name",
            &lab.name,
            &format!("host{n}"),
            "--",
        ])
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("restart the node");
    // It lives until `lab down`; reaped then.
    thread::spawn(move || {
        let _ = child.wait();
    });
}

/// Starts `migr-client` as dc0/`ep` on node2 (host2) under `dvs run --wait`, calling
/// server `server` `iterations` times with 64 KiB blocks; its output is piped.
pub fn start_client(lab: &Lab, ep: i32, server: i32, iterations: u32, timeout_ms: u32) -> Child {
    let client = example_bin("migr-client");
    let (ep, server) = (ep.to_string(), server.to_string());
    let (iterations, timeout) = (iterations.to_string(), timeout_ms.to_string());
    lab.dvs_on(
        2,
        &[
            "run",
            "--dc",
            "dc0",
            "--ep",
            &ep,
            "--node",
            "node2",
            "--wait",
            "--",
            &client,
            "--server",
            &server,
            "--iterations",
            &iterations,
            "--block-size",
            "65536",
            "--timeout-ms",
            &timeout,
            "--json",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("the client")
}

/// The client's JSON report in what `dvs run --wait` printed, failing the test without one.
pub fn client_report(out: &Output, what: &str) -> Value {
    let stdout = text(&out.stdout);
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "{what}: the client printed no report: {stdout}{}",
                text(&out.stderr)
            )
        })
}

/// Fails the test unless the client ended well with all `iterations` blocks right.
pub fn assert_client_all_ok(out: &Output, iterations: u32, what: &str) {
    let json = client_report(out, what);
    assert!(
        out.status.success(),
        "{what}: the client failed: {}",
        text(&out.stdout)
    );
    assert_eq!(json["ok"], iterations, "{what}: {json}");
    for k in ["lost", "duplicated", "corrupt"] {
        assert_eq!(json[k], 0, "{what}: {k}: {json}");
    }
}

/// `dvs ARGS` (a `migrate`) started on host `n`; each line it prints arrives on the
/// receiver as it is printed (the phases as they begin).
pub fn spawn_streaming(
    lab: &Lab,
    n: u16,
    args: &[&str],
) -> (Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = lab
        .dvs_on(n, args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dvs migrate");
    let (tx, lines) = std::sync::mpsc::channel();
    let out = child.stdout.take().expect("piped");
    thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (child, lines)
}

/// Waits (at most 60 s) for the line reporting `phase`, keeping every line in `seen`.
pub fn wait_phase(
    lines: &std::sync::mpsc::Receiver<String>,
    phase: &str,
    seen: &mut Vec<String>,
    what: &str,
) {
    loop {
        let l = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{what}: no {phase} phase: {seen:?}"));
        let reached = l.split_whitespace().last() == Some(phase);
        seen.push(l);
        if reached {
            return;
        }
    }
}

/// Waits (at most 60 s) for `child` to end, then keeps the lines it printed last.
pub fn finish_streaming(
    mut child: Child,
    lines: &std::sync::mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what}: dvs migrate did not end within 60 s: {seen:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    while let Ok(l) = lines.recv_timeout(Duration::from_millis(300)) {
        seen.push(l);
    }
}

/// Runs `dvs ARGS` (a command that builds and takes down a lab of its own, like `demo
/// --lab`), its stdout and stderr collected; after `limit` it gets SIGTERM, on which its
/// guard takes its lab down, and the test fails.
pub fn run_lab_command(
    args: &[&str],
    limit: Duration,
) -> (std::process::ExitStatus, String, String) {
    let mut child = Command::new(DVS)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run dvs {args:?}: {e}"));
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            panic!("dvs {args:?} did not end within {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    (status, reader.join().unwrap(), err_reader.join().unwrap())
}
