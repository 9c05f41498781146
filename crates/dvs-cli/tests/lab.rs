//! `dvs lab`: a real dvs cluster on simulated hosts that share nothing (a network and a
//! mount namespace each), with a real etcd over TLS, real criu and real TLS links.
//!
//! The paper's client and server run on two hosts; the server is migrated to a third and
//! back with criu and with the cooperative backend, once rolled back on purpose, and the
//! client checks its 1000 blocks every time. Then `dvs lab down` must leave no namespace,
//! process, mount or file behind.
//!
//! Needs root (namespaces), `etcd` (scripts/install-etcd.sh) and criu 4.1 or later
//! (scripts/install-criu.sh); `DVS_SKIP_CRIU=1` leaves out the criu migrations. Without
//! namespaces the test fails, saying so: a lab that cannot be built is no pass.
//!
//! Nothing here talks to the lab's addresses from the root namespace: on this machine such
//! an address routes out of the machine. Every command that talks to the lab runs inside it
//! through `dvs lab exec`.

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
const DVS: &str = env!("CARGO_BIN_EXE_dvs");
/// Where labs keep their state on the machine (`dvs lab`'s LAB_ROOT).
const LAB_ROOT: &str = "/var/lib/dvs/lab";
/// Iterations of each client run.
const ITERATIONS: u32 = 1000;
/// The endpoint of the server moved with criu. A server restored by criu cannot then move
/// cooperatively (its node did not launch it, so it has no command line to restart it
/// with), so the cooperative moves use a server of their own.
const SERVER_CRIU: i32 = 1;
/// The endpoint of the server moved cooperatively.
const SERVER_COOP: i32 = 2;

/// A fresh lab name: distinct per test process and per lab within it, so that concurrent
/// test runs never share a lab.
fn lab_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `cmd`, killing it and failing the test if it has not ended within `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
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
fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> Output {
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `dvs ARGS` on this machine (lab commands only: nothing that talks to the lab).
fn dvs(args: &[&str]) -> Output {
    run_bounded(Command::new(DVS).args(args), Duration::from_secs(120))
}

/// Fails the test unless `out` succeeded.
fn ok(out: Output, what: &str) -> Output {
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
fn example_bin(name: &str) -> String {
    let p = Path::new(DVS).parent().expect("a folder").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p dvs-examples` (or `cargo test --workspace`)",
        p.display()
    );
    p.display().to_string()
}

/// Whether the criu migrations run: criu must work unless `DVS_SKIP_CRIU=1`.
fn criu_wanted() -> bool {
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
struct Lab {
    name: String,
}

impl Lab {
    /// `dvs lab up --name NAME --hosts N`; fails the test, with the reason, if the lab cannot
    /// be built (no namespaces, no etcd, ...).
    fn up(hosts: u16) -> Lab {
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
    fn status(&self) -> Value {
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
    fn exec(&self, host: &str, cmd: &[&str], limit: Duration) -> Output {
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
    fn dvs_on(&self, n: u16, args: &[&str]) -> Command {
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
    fn server_node(&self, ep: i32, nodes: u16) -> Option<u16> {
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
    fn served(&self, ep: i32) -> u64 {
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
struct Traces {
    netns: Vec<String>,
    inodes: HashSet<u64>,
    pids: Vec<i64>,
    dir: PathBuf,
}

impl Traces {
    fn of(lab: &Lab) -> Traces {
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
    fn assert_gone(&self) {
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

/// One client run on host 2 against server `server`, with one migration of the server to
/// `to` (made to fail at `fail_at`) once it has served part of the run. Returns where the
/// server runs afterwards.
fn migrate_under_load(
    lab: &Lab,
    server_ep: i32,
    from: u16,
    to: u16,
    backend: &str,
    fail_at: Option<&str>,
    client_ep: i32,
) -> u16 {
    let what = format!("{backend} node{from} -> node{to} (fail at {fail_at:?})");
    let base = lab.served(server_ep);
    let client = example_bin("migr-client");
    let ep = client_ep.to_string();
    let iterations = ITERATIONS.to_string();
    let server = server_ep.to_string();
    let client_run = lab
        .dvs_on(
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
                "10000",
                "--json",
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the client");
    // Migrate once 200 requests of this run are served, so that the client is mid-run.
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab.served(server_ep) < base + 200 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let mid_run = lab.served(server_ep) < base + ITERATIONS as u64;
    let target = format!("dc0/{server_ep}");
    let to_name = format!("node{to}");
    let mut args = vec![
        "migrate",
        &target,
        "--to",
        &to_name,
        "--backend",
        backend,
        "--json",
    ];
    if let Some(p) = fail_at {
        args.extend(["--fail-at", p]);
    }
    let migrated = run_bounded(&mut lab.dvs_on(from, &args), Duration::from_secs(60));
    let report: Value = serde_json::from_slice(&migrated.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: no migration report ({e}): {}{}",
            text(&migrated.stdout),
            text(&migrated.stderr)
        )
    });
    let out = wait_bounded(client_run, Duration::from_secs(90), "the client");
    let stdout = text(&out.stdout);
    let json: Value = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "{what}: the client printed no report: {stdout}{}",
                text(&out.stderr)
            )
        });
    println!(
        "{what}: committed {}, {:.1} ms, client ok {} lost {} duplicated {} corrupt {}, mid-run {mid_run}",
        report["committed"], report["migration_ms"].as_f64().unwrap_or(0.0),
        json["ok"], json["lost"], json["duplicated"], json["corrupt"]
    );
    assert_eq!(
        report["committed"],
        fail_at.is_none(),
        "{what}: unexpected outcome: {report}"
    );
    assert!(out.status.success(), "{what}: the client failed: {stdout}");
    assert_eq!(json["ok"], ITERATIONS, "{what}: {json}");
    for k in ["lost", "duplicated", "corrupt"] {
        assert_eq!(json[k], 0, "{what}: {k}: {json}");
    }
    assert!(
        mid_run,
        "{what}: the client ended before the migration started"
    );
    let now = if fail_at.is_none() { to } else { from };
    assert_eq!(
        lab.server_node(server_ep, 3),
        Some(now),
        "{what}: the server is not where it should be"
    );
    now
}

#[test]
fn lab_runs_a_cluster_on_hosts_that_share_nothing() {
    let criu = criu_wanted();
    let lab = Lab::up(3);
    let st = lab.status();
    let hosts = st["hosts"].as_array().expect("hosts");
    assert_eq!(hosts.len(), 4, "3 node hosts and etcd: {st}");
    for h in hosts {
        assert_eq!(h["running"], true, "{h}");
        if h["node"].is_string() {
            assert_eq!(h["links_up"], 2, "links of {h}");
        }
    }
    // The root namespace has no address and no route on the lab's network.
    let net = st["network"].as_str().expect("network");
    let prefix = net.trim_end_matches("0/24");
    for what in [["-4", "addr"], ["-4", "route"]] {
        let out = ok(
            run_bounded(Command::new("ip").args(what), Duration::from_secs(10)),
            "ip",
        );
        assert!(
            !text(&out.stdout).contains(prefix),
            "{what:?}: {}",
            text(&out.stdout)
        );
    }
    // Each host sees only its own files: its config, its own key, its own runtime folder.
    let out = ok(
        lab.exec(
            "host1",
            &["ls", "/var/lib/dvs/tls", "/run/dvs"],
            Duration::from_secs(10),
        ),
        "ls",
    );
    let listing = text(&out.stdout);
    assert!(
        listing.contains("node1.key") && listing.contains("node1\n"),
        "{listing}"
    );
    assert!(
        !listing.contains("node2") && !listing.contains("ca.key"),
        "{listing}"
    );
    let out = ok(
        lab.exec("host2", &["hostname"], Duration::from_secs(10)),
        "hostname",
    );
    assert_eq!(text(&out.stdout).trim(), "host2");
    // Every node sees its links up, asked on its own host.
    for n in 1..=3u16 {
        let out = run_bounded(
            &mut lab.dvs_on(n, &["status", "--json"]),
            Duration::from_secs(30),
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        let me = v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|x| x["name"] == format!("node{n}"))
            .expect("the host's node");
        let links = me["status"]["links"].as_array().expect("links");
        assert_eq!(links.len(), 2);
        assert!(links.iter().all(|l| l["up"] == true), "node{n}: {me}");
    }

    // The servers on host 1, the clients on host 2, the servers moved to host 3 and back.
    let mut plan: Vec<(i32, &str, u16, Option<&str>)> = Vec::new();
    if criu {
        plan.extend([
            (SERVER_CRIU, "criu", 3, None),
            (SERVER_CRIU, "criu", 1, None),
            (SERVER_CRIU, "criu", 3, Some("restore")),
        ]);
    }
    plan.extend([
        (SERVER_COOP, "cooperative", 3, None),
        (SERVER_COOP, "cooperative", 1, None),
    ]);
    if !criu {
        plan.push((SERVER_COOP, "cooperative", 3, Some("restore")));
    }
    let server = example_bin("migr-server");
    let mut servers: Vec<i32> = plan.iter().map(|p| p.0).collect();
    servers.dedup();
    for ep in servers {
        let ep_text = ep.to_string();
        let args = [
            "run",
            "--dc",
            "dc0",
            "--ep",
            &ep_text,
            "--node",
            "node1",
            "--",
            &server,
            "--ballast-mb",
            "2",
        ];
        ok(
            run_bounded(&mut lab.dvs_on(1, &args), Duration::from_secs(30)),
            "dvs run migr-server",
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while lab.server_node(ep, 3) != Some(1) {
            assert!(
                Instant::now() < deadline,
                "migr-server {ep} did not come up on node1"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
    // Where each server runs (indexed by its endpoint); each client run takes a new endpoint.
    let mut at = [0, 1, 1];
    for (client_ep, (server_ep, backend, to, fail_at)) in (10..).zip(plan) {
        let from = at[server_ep as usize];
        at[server_ep as usize] =
            migrate_under_load(&lab, server_ep, from, to, backend, fail_at, client_ep);
    }

    // Down leaves nothing behind, and a second down is no error.
    let traces = Traces::of(&lab);
    ok(dvs(&["lab", "down", "--name", &lab.name]), "lab down");
    traces.assert_gone();
    ok(
        dvs(&["lab", "down", "--name", &lab.name]),
        "a second lab down",
    );
    let out = dvs(&["lab", "exec", "--name", &lab.name, "host1", "--", "true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no lab"),
        "{}",
        text(&out.stderr)
    );
}
