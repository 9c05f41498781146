//! Crash-safe migration: a node kernel is killed (SIGKILL) in the middle of a criu migration
//! of a 200 MiB server (big enough for each phase to last a while), once per role and phase:
//! the destination, the source (which coordinates) and the client's node, during the
//! transfer of the image or the restore.
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

fn crash_run(victim: Victim, phase: &str) {
    let _turn = serial();
    let name = format!("{victim:?} killed during the {phase}");
    if !criu_available(&name) {
        return;
    }
    let c = Cluster::start();
    start_ballast_server(&c, 0, SERVER, 200);
    let client = ClientRun::start(&c, 1, CLIENT, SERVER, ITERATIONS, BLOCK);
    assert!(
        wait_served(&c, &ep_log(&c, 0, SERVER), 1, &client),
        "{name}: the client ended too early"
    );
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
    let (migration, lines) = start_migration(&c);
    let mut seen = Vec::new();
    loop {
        let line = lines
            .recv_timeout(HANG_GUARD)
            .unwrap_or_else(|_| panic!("{name}: no {phase} phase within {HANG_GUARD:?}: {seen:?}"));
        let reached = line.split_whitespace().last() == Some(phase);
        seen.push(line);
        if reached {
            break;
        }
    }
    c.kill_node(victim.node());
    wait_bounded(migration);

    // The migration ends: its record is decided.
    let decided = eventually(&format!("{name}: the migration record decided"), || {
        record(&c).filter(|r| !r.contains("state=started"))
    });
    let committed = decided.contains("state=committed");
    // At most one copy runs, and it is where the record says.
    let run_on = eventually(&format!("{name}: the placements settle"), || {
        let r = running(&c);
        let want: &[u64] = match (committed, victim) {
            (true, _) => &[2],
            (false, Victim::Source) => &[],
            (false, _) => &[0],
        };
        (r == want).then_some(r)
    });
    assert!(run_on.len() <= 1, "{name}: {run_on:?}");
    assert_none_stopped(&c, &name);
    match victim {
        // Killing the node that only calls the server changes nothing for the move.
        Victim::ClientNode => assert!(committed, "{name}: {decided}"),
        // Losing the destination before the decision rolls back; the source runs on.
        Victim::Destination => {
            assert!(!committed, "{name}: {decided}");
            let result = client.finish(&c);
            assert_client_ok(&c, &name, &result, ITERATIONS);
        }
        // Losing the source: the destination commits if its copy was restored (the client
        // goes on there), else the endpoint died with its node and the client says so.
        Victim::Source => {
            let out = client.finish_raw().unwrap_or_else(|| {
                panic!(
                    "{name}: the client hung after the source died{}",
                    diagnose(&c)
                )
            });
            if out.status.success() {
                assert!(committed, "{name}: the client succeeded but {decided}");
                let result = client_json(&String::from_utf8_lossy(&out.stdout))
                    .expect("the client's result");
                assert_client_ok(&c, &name, &result, ITERATIONS);
            } else {
                let text = printed(&out);
                assert!(
                    text.contains("unreachable") || text.contains("died"),
                    "{name}: the client failed without a clear error: {text}"
                );
            }
            if phase == "transfer" {
                assert!(
                    !committed,
                    "{name}: committed before the restore: {decided}"
                );
            }
        }
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
    crash_run(Victim::Destination, "transfer");
}

#[test]
fn criu_destination_killed_during_the_restore() {
    crash_run(Victim::Destination, "restore");
}

#[test]
fn criu_source_killed_during_the_transfer() {
    crash_run(Victim::Source, "transfer");
}

#[test]
fn criu_source_killed_during_the_restore() {
    crash_run(Victim::Source, "restore");
}

#[test]
fn criu_client_node_killed_during_the_checkpoint() {
    crash_run(Victim::ClientNode, "checkpoint");
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
