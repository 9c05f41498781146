//! Crash-safe migration: a node kernel is killed (SIGKILL) in the middle of a criu migration,
//! once per role (the destination, the source, which coordinates, and the client's node) and
//! phase: start and commit (held open by freezing the cluster's etcd while the record's
//! write is under way), quiesce (held open by a server that is slow to reply), checkpoint,
//! transfer and restore (a 200 MiB server, whose phases last a while).
//!
//! Whatever dies, on every surviving node: the migration ends (its record in the directory is
//! decided, never left `started`), at most one copy of the server runs and none is left
//! stopped, and the client either gets every block right or fails with a clear error (never
//! hangs). The server is on node0, the client on node1, the destination is node2.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::etcd::Etcd;
use common::examples::criu_available;
use common::migr::*;
use common::{eventually, Cluster, DVS};
use serde_json::Value;

/// Which node is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    /// node2, where the server moves.
    Destination,
    /// node0, where the server runs and which coordinates the move.
    Source,
    /// node1, where the client runs.
    ClientNode,
}

impl Victim {
    fn node(self) -> u16 {
        match self {
            Victim::Source => 0,
            Victim::ClientNode => 1,
            Victim::Destination => 2,
        }
    }
}

/// The migration record of dc0/`SERVER` in the cluster's directory.
fn record(c: &Cluster) -> Option<String> {
    let dir = dvs_directory::open(&c.cfg.directory).expect("open the directory");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(dir.get(&format!("migr/0/{SERVER}")))
        .expect("read the directory")
        .map(|v| v.value)
}

/// Starts `dvs migrate dc0/1 --to node2 --backend criu`; the returned channel gets each
/// line it prints, as it prints it (the phases as they begin).
fn start_migration(c: &Cluster) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(DVS)
        .arg("--dir")
        .arg(c.dir())
        .args(["migrate", "dc0/1", "--to", "node2", "--backend", "criu"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run dvs migrate");
    let out = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Waits (bounded) for `child` to end, killing it after [`HANG_GUARD`].
fn wait_bounded(mut child: Child) {
    let deadline = std::time::Instant::now() + HANG_GUARD;
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("dvs migrate did not end within {HANG_GUARD:?} after the crash");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// RUNNING placements of the server on the nodes that still run.
fn running(c: &Cluster) -> Vec<u64> {
    let s = c.status();
    placements(&s, SERVER)
        .into_iter()
        .filter(|(_, state, _)| state == "RUNNING")
        .map(|(node, _, _)| node)
        .collect()
}

/// No process of the server's trees on the surviving nodes is left stopped.
fn assert_none_stopped(c: &Cluster, name: &str) {
    let procs = c.dvs(&["ps", "--json"]);
    let procs: Value = serde_json::from_slice(&procs.stdout).unwrap_or(Value::Null);
    for n in procs.as_array().into_iter().flatten() {
        for p in n["procs"].as_array().into_iter().flatten() {
            if p["ep"] != SERVER || p["state"] != "running" {
                continue;
            }
            let pid = p["pid"].as_u64().expect("pid");
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            for child in children
                .split_whitespace()
                .filter_map(|s| s.parse::<u64>().ok())
                .chain([pid])
            {
                assert_ne!(
                    proc_state(child).as_deref(),
                    Some("T"),
                    "{name}: process {child} of the server was left stopped{}",
                    diagnose(c)
                );
            }
        }
    }
}

/// When, during the move, the victim is killed.
#[derive(Clone, Copy, Debug)]
enum When {
    /// As soon as `dvs migrate` reports this phase (long enough with a 200 MiB image:
    /// checkpoint, transfer, restore).
    Phase(&'static str),
    /// In the quiesce phase, held open by a server that waits 1.5 s before each reply.
    Quiesce,
    /// While the coordinator waits for the START acknowledgements: the client's node kernel
    /// is stopped (SIGSTOP) meanwhile, for less than it takes to declare its link dead.
    Start,
    /// While the directory (etcd, frozen once the restore begins) holds the decision's write.
    Commit,
}

impl When {
    fn name(self) -> &'static str {
        match self {
            When::Phase(p) => p,
            When::Quiesce => "quiesce",
            When::Start => "start",
            When::Commit => "commit",
        }
    }
}

/// Waits for the line of `dvs migrate` that reports `phase`.
fn wait_phase(lines: &mpsc::Receiver<String>, phase: &str, seen: &mut Vec<String>, name: &str) {
    loop {
        let line = lines
            .recv_timeout(HANG_GUARD)
            .unwrap_or_else(|_| panic!("{name}: no {phase} phase within {HANG_GUARD:?}: {seen:?}"));
        let reached = line.split_whitespace().last() == Some(phase);
        seen.push(line);
        if reached {
            return;
        }
    }
}

/// A migration of a server on node0 (its client on node1) to node2, on a cluster whose
/// directory is a real etcd, with `victim` killed `when`; then the checks of the module
/// documentation.
fn crash_run(victim: Victim, when: When) {
    let _turn = serial();
    let phase = when.name();
    let name = format!("{victim:?} killed during the {phase}");
    if !criu_available(&name) {
        return;
    }
    let etcd = Etcd::start();
    let dir = etcd.directory_config();
    let c = Cluster::start_with(move |cfg| {
        let mut dir = dir;
        if let dvs_config::DirectoryConfig::Etcd { prefix, .. } = &mut dir {
            *prefix = dvs_config::default_etcd_prefix(&cfg.cluster_id);
        }
        cfg.directory = dir;
    });
    let slow = matches!(when, When::Quiesce);
    let iterations = if slow { 12 } else { ITERATIONS };
    if slow {
        start_server_with(&c, 0, SERVER, &["--delay-ms", "1500"]);
    } else {
        start_ballast_server(&c, 0, SERVER, 200);
    }
    let client = ClientRun::start(&c, 1, CLIENT, SERVER, iterations, BLOCK);
    if slow {
        thread::sleep(Duration::from_millis(300));
    } else {
        assert!(
            wait_served(&c, &ep_log(&c, 0, SERVER), 1, &client),
            "{name}: the client ended too early"
        );
    }
    // The server's process tree (its launcher's pid): a killed node kernel leaves it behind.
    let launcher = eventually("the server in dvs ps", || {
        let procs = c.dvs(&["ps", "--json"]);
        let procs: Value = serde_json::from_slice(&procs.stdout).ok()?;
        procs.as_array()?.iter().find_map(|n| {
            n["procs"]
                .as_array()?
                .iter()
                .find(|p| p["ep"] == SERVER && p["state"] == "running")
                .and_then(|p| p["pid"].as_i64())
        })
    });
    let client_node_pid = c.node_pid(Victim::ClientNode.node());
    if matches!(when, When::Start) {
        // SAFETY: kill(2) on a node kernel this test started.
        unsafe { libc::kill(client_node_pid, libc::SIGSTOP) };
    }
    let (migration, lines) = start_migration(&c);
    let mut seen = Vec::new();
    if matches!(when, When::Commit) {
        wait_phase(&lines, "restore", &mut seen, &name);
        etcd.freeze(true);
    }
    wait_phase(&lines, phase, &mut seen, &name);
    c.kill_node(victim.node());
    // Briefly: a directory away for longer than the membership lease fences every node.
    etcd.freeze(false);
    if matches!(when, When::Start) {
        // SAFETY: as above.
        unsafe { libc::kill(client_node_pid, libc::SIGCONT) };
    }
    wait_bounded(migration);

    // The migration ends: its record is decided. A source killed before it decided may
    // leave its START record: then no node may hold calls any more.
    let decided = if matches!((victim, when), (Victim::Source, When::Start)) {
        eventually(&format!("{name}: no node holding calls"), || {
            let s = c.status();
            let held = s["nodes"].as_array()?.iter().any(|n| {
                n["status"]["endpoints"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|e| e["migrating"] == true))
            });
            (!held).then_some(())
        });
        record(&c).unwrap_or_default()
    } else {
        eventually(&format!("{name}: the migration record decided"), || {
            record(&c).filter(|r| !r.contains("state=started"))
        })
    };
    let committed = decided.contains("state=committed");
    // At most one copy runs, and it is where the record says (unless its node died).
    let home: Option<u64> = match (committed, victim) {
        (true, Victim::Destination) | (false, Victim::Source) => None,
        (true, _) => Some(2),
        (false, _) => Some(0),
    };
    let run_on = eventually(&format!("{name}: the placements settle"), || {
        let r = running(&c);
        (r == home.into_iter().collect::<Vec<_>>()).then_some(r)
    });
    assert_none_stopped(&c, &name);
    // The client: every block where the server lives on, a clear error where it died.
    if victim != Victim::ClientNode {
        let out = client
            .finish_raw()
            .unwrap_or_else(|| panic!("{name}: the client hung{}", diagnose(&c)));
        if home.is_some() {
            assert!(
                out.status.success(),
                "{name}: the client failed: {}",
                printed(&out)
            );
            let result =
                client_json(&String::from_utf8_lossy(&out.stdout)).expect("the client's result");
            assert_client_ok(&c, &name, &result, iterations);
        } else {
            let text = printed(&out);
            assert!(
                !out.status.success() && (text.contains("unreachable") || text.contains("died")),
                "{name}: the server died with its node, but the client did not say so: {text}"
            );
        }
    }
    match (victim, when) {
        (Victim::ClientNode, _) => assert!(committed, "{name}: {decided}"),
        // Before the destination's copy is restored, only a rollback is possible.
        (_, When::Start | When::Quiesce) | (_, When::Phase("checkpoint" | "transfer")) => {
            assert!(!committed, "{name}: {decided}")
        }
        _ => {}
    }
    if victim == Victim::Source {
        // The original stays behind, stopped, with its node gone. The node that comes back
        // kills it (it is no endpoint any more), rejoins and serves again.
        c.restart_node(0);
        c.wait_all_links_up();
        eventually(
            &format!("{name}: the restarted node to kill the orphan"),
            || (!dvs_checkpoint::process_alive(launcher as i32)).then_some(()),
        );
        assert!(
            c.log(0).contains("left by the previous run"),
            "{name}: the restarted node did not say it killed the orphan"
        );
        assert!(running(&c).len() <= 1, "{name}: {:?}", running(&c));
    }
    println!("{name}: {decided}; running on {run_on:?}");
}

#[test]
fn criu_destination_killed_during_the_transfer() {
    crash_run(Victim::Destination, When::Phase("transfer"));
}

#[test]
fn criu_destination_killed_during_the_restore() {
    crash_run(Victim::Destination, When::Phase("restore"));
}

#[test]
fn criu_source_killed_during_the_transfer() {
    crash_run(Victim::Source, When::Phase("transfer"));
}

#[test]
fn criu_source_killed_during_the_restore() {
    crash_run(Victim::Source, When::Phase("restore"));
}

#[test]
fn criu_client_node_killed_during_the_checkpoint() {
    crash_run(Victim::ClientNode, When::Phase("checkpoint"));
}

#[test]
fn criu_source_killed_during_the_start() {
    crash_run(Victim::Source, When::Start);
}

#[test]
fn criu_destination_killed_during_the_start() {
    crash_run(Victim::Destination, When::Start);
}

#[test]
fn criu_source_killed_during_the_quiesce() {
    crash_run(Victim::Source, When::Quiesce);
}

#[test]
fn criu_destination_killed_during_the_quiesce() {
    crash_run(Victim::Destination, When::Quiesce);
}

#[test]
fn criu_destination_killed_during_the_checkpoint() {
    crash_run(Victim::Destination, When::Phase("checkpoint"));
}

#[test]
fn criu_source_killed_during_the_checkpoint() {
    crash_run(Victim::Source, When::Phase("checkpoint"));
}

#[test]
fn criu_source_killed_during_the_commit() {
    crash_run(Victim::Source, When::Commit);
}

#[test]
fn criu_destination_killed_during_the_commit() {
    crash_run(Victim::Destination, When::Commit);
}

/// etcd's leader is killed (SIGKILL) while a 200 MiB server is being checkpointed, on a
/// cluster whose directory is a 3-member etcd: the members elect another leader, the
/// migration still ends with one recorded decision, the server runs in exactly one place,
/// and its client gets every block.
#[test]
fn criu_etcd_leader_killed_during_the_checkpoint() {
    let _turn = serial();
    let name = "etcd leader killed during the checkpoint";
    if !criu_available(name) {
        return;
    }
    let mut etcd = Etcd::start_members(3);
    let dir = etcd.directory_config();
    let c = Cluster::start_with(move |cfg| {
        let mut dir = dir;
        if let dvs_config::DirectoryConfig::Etcd { prefix, .. } = &mut dir {
            *prefix = dvs_config::default_etcd_prefix(&cfg.cluster_id);
        }
        cfg.directory = dir;
    });
    start_ballast_server(&c, 0, SERVER, 200);
    let client = ClientRun::start(&c, 1, CLIENT, SERVER, ITERATIONS, BLOCK);
    assert!(
        wait_served(&c, &ep_log(&c, 0, SERVER), 1, &client),
        "{name}: the client ended too early"
    );
    let leader = eventually("an etcd leader", || etcd.leader());
    let (migration, lines) = start_migration(&c);
    loop {
        let line = lines
            .recv_timeout(HANG_GUARD)
            .unwrap_or_else(|_| panic!("{name}: no checkpoint phase within {HANG_GUARD:?}"));
        if line.split_whitespace().last() == Some("checkpoint") {
            break;
        }
    }
    etcd.kill(leader);
    wait_bounded(migration);
    let decided = eventually(&format!("{name}: the migration record decided"), || {
        record(&c).filter(|r| !r.contains("state=started"))
    });
    let home = if decided.contains("state=committed") {
        2
    } else {
        0
    };
    eventually(&format!("{name}: the server on node {home} only"), || {
        (running(&c) == [home]).then_some(())
    });
    assert_none_stopped(&c, name);
    let result = client.finish(&c);
    assert_client_ok(&c, name, &result, ITERATIONS);
    let new_leader = etcd.leader();
    println!("{name}: {decided}; etcd leader {leader} killed, now {new_leader:?}");
}
