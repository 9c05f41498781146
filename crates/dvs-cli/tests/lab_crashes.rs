//! Crash-safe migration on the lab (hosts that share nothing, etcd over TLS on its own
//! host): a node kernel is SIGKILLed during a criu migration of a server from host1 to host3
//! while a client on host2 calls it, once per role (the source, which coordinates, and the
//! destination) and phase:
//! - start: the client's node is stopped (SIGSTOP) for less than it takes to declare its
//!   link dead, so the coordinator waits for its START acknowledgement;
//! - quiesce: the server waits 1.5 s before each reply (`migr-server --delay-ms`);
//! - checkpoint and restore: a 300 MiB server (the transfer is in `lab_faults.rs`);
//! - commit: the lab's etcd is stopped (SIGSTOP) once the restore begins, so the decision's
//!   write waits (briefly: longer than a membership lease would fence every node).
//!
//! Then, on every surviving node: nobody holds calls any more (the migration ended there),
//! the server runs in one place at most, where the outcome puts it (nowhere if it died with
//! its node), and the client gets every block or a clear error. The killed node comes back
//! and rejoins. Needs root, etcd and criu like `lab.rs`; `DVS_SKIP_CRIU=1` skips it.

mod common;

use std::thread;
use std::time::Duration;

use common::lab::*;

/// The node killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    /// node1, which runs the server and coordinates.
    Source,
    /// node3, where the server moves.
    Destination,
}

impl Victim {
    fn node(self) -> u16 {
        match self {
            Victim::Source => 1,
            Victim::Destination => 3,
        }
    }
}

/// When it is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum When {
    Start,
    Quiesce,
    Checkpoint,
    Restore,
    Commit,
}

impl When {
    fn phase(self) -> &'static str {
        match self {
            When::Start => "start",
            When::Quiesce => "quiesce",
            When::Checkpoint => "checkpoint",
            When::Restore => "restore",
            When::Commit => "commit",
        }
    }
}

/// The pid of the lab's etcd.
fn etcd_pid(lab: &Lab) -> i32 {
    let st = lab.status();
    st["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|h| h["host"] == "etcd")
        .and_then(|h| h["pid"].as_i64())
        .expect("etcd's pid") as i32
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on a process of the lab this test built (a signal, no network traffic).
    unsafe { libc::kill(pid, sig) };
}

/// Whether any node that answers still holds calls for dc0/1 (a migration not ended there).
fn holding(lab: &Lab) -> bool {
    // Through host2's node, which no test kills.
    let s = status_on(lab, 2);
    s["nodes"].as_array().into_iter().flatten().any(|n| {
        n["status"]["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["ep"] == 1 && e["migrating"] == true))
    })
}

fn crash(victim: Victim, when: When) {
    if !criu_wanted() {
        return;
    }
    let name = format!("{victim:?} killed during the {}", when.phase());
    let lab = Lab::up(3);
    // The operator's host: neither the victim's nor a stopped one.
    let cli = if when == When::Start {
        4 - victim.node()
    } else {
        2
    };
    let server = example_bin("migr-server");
    let server_args: &[&str] = if when == When::Quiesce {
        &["--delay-ms", "1500"]
    } else {
        &["--ballast-mb", "300"]
    };
    let mut run = vec![
        "run", "--dc", "dc0", "--ep", "1", "--node", "node1", "--", &server,
    ];
    run.extend_from_slice(server_args);
    ok(
        run_bounded(&mut lab.dvs_on(cli, &run), Duration::from_secs(60)),
        "run migr-server on node1",
    );
    within(
        Duration::from_secs(30),
        "migr-server RUNNING on node1",
        || (running(&lab, 1) == [1]).then_some(()),
    );
    let iterations: u32 = if when == When::Quiesce { 12 } else { 4000 };
    let client_run = start_client(&lab, 2, 1, iterations, 20_000);
    thread::sleep(Duration::from_millis(500));
    // Every pid now: `dvs lab status` asks the nodes, which takes a while when one is stopped
    // (and the CLI reads etcd), and the kill must land in its phase.
    let client_node = node_pid(&lab, 2);
    let victim_pid = node_pid(&lab, victim.node());
    let etcd = etcd_pid(&lab);
    if when == When::Start {
        signal(client_node, libc::SIGSTOP);
    }
    let (migration, lines) = spawn_streaming(
        &lab,
        cli,
        &["migrate", "dc0/1", "--to", "node3", "--backend", "criu"],
    );
    let mut seen: Vec<String> = Vec::new();
    if when == When::Commit {
        wait_phase(&lines, "restore", &mut seen, &name);
        signal(etcd, libc::SIGSTOP);
    }
    wait_phase(&lines, when.phase(), &mut seen, &name);
    signal(victim_pid, libc::SIGKILL);
    // Briefly: longer than the membership lease, and every node would fence itself.
    signal(etcd, libc::SIGCONT);
    signal(client_node, libc::SIGCONT);
    finish_streaming(migration, &lines, &mut seen, &name);
    println!("{name}:\n{}", seen.join("\n"));

    // The migration ends on every surviving node, and the server runs in one place at most.
    within(
        Duration::from_secs(40),
        &format!("{name}: calls still held"),
        || (!holding(&lab)).then_some(()),
    );
    // The client ends: with every block if the server lived on, else with a clear error.
    let out = wait_bounded(client_run, Duration::from_secs(180), "the client");
    let stdout = text(&out.stdout);
    let served = out.status.success();
    if served {
        assert_client_all_ok(&out, iterations, &name);
    } else {
        assert!(
            stdout.contains("unreachable") || stdout.contains("died"),
            "{name}: the client failed without a clear error: {stdout}"
        );
    }
    // The server runs in exactly one place if it served the client to the end, else nowhere
    // (it died with its node), and never on the killed node.
    let placed = within(
        Duration::from_secs(30),
        &format!("{name}: placements"),
        || {
            let r = running_seen_from(&lab, 2, 1);
            let one = r.len() == 1 && !r.contains(&u64::from(victim.node()));
            (if served { one } else { r.is_empty() }).then_some(r)
        },
    );
    // Before the copy on the destination is restored, only a rollback is possible.
    if matches!(when, When::Start | When::Quiesce | When::Checkpoint) {
        let want: Vec<u64> = if victim == Victim::Source {
            vec![]
        } else {
            vec![1]
        };
        assert_eq!(
            placed, want,
            "{name}: the server is not where a rollback puts it"
        );
    }
    // The killed node comes back and rejoins; the server is still where it was.
    restart_node(&lab, victim.node());
    within(
        Duration::from_secs(60),
        &format!("{name}: every node back"),
        || {
            let s = status_on(&lab, 2);
            let nodes = s["nodes"].as_array()?.clone();
            let back = nodes.iter().all(|n| {
                n["reachable"] == true
                    && n["status"]["fenced"] == false
                    && n["member"]["alive"] == true
                    && n["status"]["links"]
                        .as_array()
                        .is_some_and(|l| l.iter().all(|l| l["up"] == true))
            });
            back.then_some(())
        },
    );
    assert_eq!(
        running_seen_from(&lab, 2, 1),
        placed,
        "{name}: the server moved after the rejoin"
    );
    println!("{name}: the server runs on {placed:?}");
}

#[test]
fn lab_source_killed_during_the_start() {
    crash(Victim::Source, When::Start);
}

#[test]
fn lab_destination_killed_during_the_start() {
    crash(Victim::Destination, When::Start);
}

#[test]
fn lab_source_killed_during_the_quiesce() {
    crash(Victim::Source, When::Quiesce);
}

#[test]
fn lab_destination_killed_during_the_quiesce() {
    crash(Victim::Destination, When::Quiesce);
}

#[test]
fn lab_source_killed_during_the_checkpoint() {
    crash(Victim::Source, When::Checkpoint);
}

#[test]
fn lab_destination_killed_during_the_checkpoint() {
    crash(Victim::Destination, When::Checkpoint);
}

#[test]
fn lab_source_killed_during_the_restore() {
    crash(Victim::Source, When::Restore);
}

#[test]
fn lab_destination_killed_during_the_restore() {
    crash(Victim::Destination, When::Restore);
}

#[test]
fn lab_source_killed_during_the_commit() {
    crash(Victim::Source, When::Commit);
}

#[test]
fn lab_destination_killed_during_the_commit() {
    crash(Victim::Destination, When::Commit);
}
