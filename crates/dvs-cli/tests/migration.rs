//! The paper's evaluation (docs/ARCHITECTURE.md §7.4) as integration tests: real node kernels, real CRIU, real
//! sockets. `migr-server` serves `migr-client`'s sendrec + vcopy requests while the server is
//! migrated between the nodes of a fresh 3-node cluster:
//!
//! 1. server on a remote node → the client's node;
//! 2. server on the client's node → a remote node;
//! 3. server on a remote node → another remote node;
//!
//! each with both backends (criu and cooperative), and each once more as a failed migration
//! (`--fail-at`, rotating checkpoint/transfer/restore) that rolls back. Every run checks the
//! client's tally (all ok, nothing corrupt, lost or duplicated), that the server's counter
//! went on across the move, the migration's outcome, and every node's registration of the
//! endpoint afterwards. Then: a client migrated while it waits in sendrec, two migrations of
//! different endpoints at once, and one server moved 20 times under load.
//!
//! The criu tests fail when criu does not work here (install it with
//! `scripts/install-criu.sh`), unless `DVS_SKIP_CRIU=1` is set: then they are skipped.
//!
//! The tests take turns (one global lock): each runs a cluster of three node kernels plus
//! CRIU, which is about all a 2-core machine can do without making the runs flaky. Timeouts
//! here are only hang guards; nothing asserts on timing.

mod common;

use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use common::examples::criu_available;
use common::migr::*;
use common::{Cluster, DVS};
use serde_json::Value;

/// One run of the paper's evaluation: fresh cluster, server, client with [`ITERATIONS`]
/// requests, one migration of the server after ≥ 100 requests (failing at `fail_at` if
/// given), then the checks.
fn paper_run(backend: Backend, scenario: Scenario, fail_at: Option<&str>) {
    let _turn = serial();
    let name = format!("{} {scenario:?} fail_at={fail_at:?}", backend.name());
    if backend == Backend::Criu && !criu_available(&name) {
        return;
    }
    let (server_node, client_node, dest) = scenario.nodes();
    let c = Cluster::start();
    start_server(&c, server_node, SERVER);
    let client = ClientRun::start(&c, client_node, CLIENT, SERVER, ITERATIONS, BLOCK);
    let log = ep_log(&c, server_node, SERVER);
    assert!(
        wait_served(&c, &log, 1, &client),
        "{name}: the client ended before the server served 100 requests: {}",
        client.finish(&c)
    );
    let report = migrate(&c, SERVER, dest, backend, fail_at);
    if client.finished() {
        eprintln!("{name}: note: the client ended before the migration did (slow machine?)");
    }
    let result = client.finish(&c);
    assert_client_ok(&c, &name, &result, ITERATIONS);
    let home = if fail_at.is_some() { server_node } else { dest };
    assert_runs_on(&c, SERVER, home);
    // The stall figures: a criu commit froze the process for a while, within the move; a
    // held call waited, and only a held call.
    let f = |k: &str| {
        report[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{name}: no {k} in {report}"))
    };
    if backend == Backend::Criu && fail_at.is_none() {
        assert!(
            f("frozen_ms") > 0.0 && f("frozen_ms") <= f("migration_ms"),
            "{name}: frozen time out of the move: {report}"
        );
    }
    assert_eq!(
        report["held"].as_u64() == Some(0),
        f("longest_hold_ms") == 0.0,
        "{name}: held calls and their longest wait disagree: {report}"
    );
    println!(
        "{name}: {} in {:.1} ms (frozen {:.1} ms, {} held, the longest {:.1} ms), client max \
         stall {:.1} ms",
        if fail_at.is_some() {
            "rolled back"
        } else {
            "committed"
        },
        f("migration_ms"),
        f("frozen_ms"),
        report["held"],
        f("longest_hold_ms"),
        result["max_stall_ms"].as_f64().unwrap_or(f64::NAN)
    );
}

/// The injected failure of scenario `i` (0..3) of `backend`: each backend rotates through
/// every phase, shifted so that the two backends fail different phases in each scenario.
fn fail_phase(backend: Backend, i: usize) -> &'static str {
    let shift = match backend {
        Backend::Criu => 0,
        Backend::Cooperative => 1,
    };
    FAIL_PHASES[(i + shift) % FAIL_PHASES.len()]
}

#[test]
fn criu_remote_to_client_node() {
    paper_run(Backend::Criu, Scenario::RemoteToClientNode, None);
}

#[test]
fn criu_client_node_to_remote() {
    paper_run(Backend::Criu, Scenario::ClientNodeToRemote, None);
}

#[test]
fn criu_remote_to_remote() {
    paper_run(Backend::Criu, Scenario::RemoteToRemote, None);
}

#[test]
fn criu_remote_to_client_node_rolls_back() {
    let b = Backend::Criu;
    paper_run(b, Scenario::RemoteToClientNode, Some(fail_phase(b, 0)));
}

#[test]
fn criu_client_node_to_remote_rolls_back() {
    let b = Backend::Criu;
    paper_run(b, Scenario::ClientNodeToRemote, Some(fail_phase(b, 1)));
}

#[test]
fn criu_remote_to_remote_rolls_back() {
    let b = Backend::Criu;
    paper_run(b, Scenario::RemoteToRemote, Some(fail_phase(b, 2)));
}

#[test]
fn cooperative_remote_to_client_node() {
    paper_run(Backend::Cooperative, Scenario::RemoteToClientNode, None);
}

#[test]
fn cooperative_client_node_to_remote() {
    paper_run(Backend::Cooperative, Scenario::ClientNodeToRemote, None);
}

#[test]
fn cooperative_remote_to_remote() {
    paper_run(Backend::Cooperative, Scenario::RemoteToRemote, None);
}

#[test]
fn cooperative_remote_to_client_node_rolls_back() {
    let b = Backend::Cooperative;
    paper_run(b, Scenario::RemoteToClientNode, Some(fail_phase(b, 0)));
}

#[test]
fn cooperative_client_node_to_remote_rolls_back() {
    let b = Backend::Cooperative;
    paper_run(b, Scenario::ClientNodeToRemote, Some(fail_phase(b, 1)));
}

#[test]
fn cooperative_remote_to_remote_rolls_back() {
    let b = Backend::Cooperative;
    paper_run(b, Scenario::RemoteToRemote, Some(fail_phase(b, 2)));
}

/// A client migrated (criu) while it waits in sendrec for the server finishes its run with
/// every request ok. It is launched in the background: its result comes from its log, which
/// the restored process keeps writing to.
#[test]
fn criu_client_migrated_while_in_sendrec() {
    let _turn = serial();
    if !criu_available("criu_client_migrated_while_in_sendrec") {
        return;
    }
    let c = Cluster::start();
    start_server(&c, 0, SERVER);
    let cmd = client_cmd(SERVER, ITERATIONS, BLOCK);
    let mut args = vec!["run", "--dc", "dc0", "--ep", "2", "--node", "node2", "--"];
    args.extend(cmd.iter().map(String::as_str));
    let out = c.dvs(&args);
    assert!(
        out.status.success(),
        "dvs run migr-client failed: {}",
        printed(&out)
    );
    let server_log = ep_log(&c, 0, SERVER);
    let client_log = ep_log(&c, 2, CLIENT);
    let result_in_log = || client_json(&std::fs::read_to_string(&client_log).unwrap_or_default());
    wait_until(
        "the server to serve 100 requests",
        || (served_lines(&server_log) >= 1 || result_in_log().is_some()).then_some(()),
        || format!("server log lines: {}", served_lines(&server_log)),
    );
    assert!(
        result_in_log().is_none(),
        "the client ended before the server served 100 requests"
    );
    migrate(&c, CLIENT, 1, Backend::Criu, None);
    // The client unbinds when done: look at its registrations while it still runs.
    let last = std::cell::RefCell::new(Vec::new());
    let checked = wait_until(
        "dc0/2 RUNNING on node 1 and REMOTE(node 1) elsewhere",
        || match check_runs_on(&c, CLIENT, 1) {
            Ok(()) => Some(true),
            Err(_) if result_in_log().is_some() => Some(false),
            Err(got) => {
                *last.borrow_mut() = got;
                None
            }
        },
        || format!("registrations (node, state, node): {:?}", last.borrow()),
    );
    if !checked {
        eprintln!(
            "note: the client ended before its registrations could be checked (slow machine?)"
        );
    }
    let result = wait_until(
        "the migrated client's result in its log",
        result_in_log,
        || diagnose(&c),
    );
    assert_client_ok(&c, "migrated client", &result, ITERATIONS);
    // Its unbind, made on its new node, reached every node.
    wait_until(
        "the migrated client's unbind to reach every node",
        || placements(&c.status(), CLIENT).is_empty().then_some(()),
        || format!("registrations: {:?}", placements(&c.status(), CLIENT)),
    );
    assert_runs_on(&c, SERVER, 0);
}

/// Two servers, each with its own client, migrated at the same moment from two threads:
/// both migrations commit and both clients see every request ok.
#[test]
fn criu_two_endpoints_migrate_at_once() {
    let _turn = serial();
    if !criu_available("criu_two_endpoints_migrate_at_once") {
        return;
    }
    // (server ep, server node, client ep, client node, destination)
    let pairs = [(SERVER, 0u16, CLIENT, 2u16, 1u16), (3, 1, 4, 2, 2)];
    let c = Cluster::start();
    let mut clients = Vec::new();
    for (s_ep, s_node, c_ep, c_node, _) in pairs {
        start_server(&c, s_node, s_ep);
        clients.push(ClientRun::start(&c, c_node, c_ep, s_ep, ITERATIONS, BLOCK));
    }
    for ((s_ep, s_node, ..), client) in pairs.iter().zip(&clients) {
        assert!(
            wait_served(&c, &ep_log(&c, *s_node, *s_ep), 1, client),
            "{} ended before its server served 100 requests",
            client.what
        );
    }
    let barrier = Barrier::new(pairs.len());
    thread::scope(|s| {
        let (c, barrier) = (&c, &barrier);
        let handles: Vec<_> = pairs
            .iter()
            .map(|&(s_ep, _, _, _, dest)| {
                s.spawn(move || {
                    barrier.wait();
                    migrate(c, s_ep, dest, Backend::Criu, None)
                })
            })
            .collect();
        for h in handles {
            if let Err(panic) = h.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    for (client, (s_ep, _, _, _, dest)) in clients.into_iter().zip(pairs) {
        let what = client.what.clone();
        let result = client.finish(&c);
        assert_client_ok(&c, &what, &result, ITERATIONS);
        assert_runs_on(&c, s_ep, dest);
    }
}

/// One server moved 20 times in a row (criu) around the three nodes while one client keeps
/// calling it: every migration commits, every request is ok, the counter never skips. Between
/// two moves the server serves at least 100 more requests (unless the client is done).
#[test]
fn criu_server_moves_20_times_under_load() {
    const MOVES: usize = 20;
    let _turn = serial();
    if !criu_available("criu_server_moves_20_times_under_load") {
        return;
    }
    // Enough requests to keep the client busy through every move (≥ 100 between moves).
    let iterations = 200 * MOVES as u64 + 1000;
    let c = Cluster::start();
    start_server(&c, 0, SERVER);
    let client = ClientRun::start(&c, 2, CLIENT, SERVER, iterations, "4096");
    // A criu-restored server keeps writing to the log it was launched with.
    let log = ep_log(&c, 0, SERVER);
    let mut home = 0u16;
    let mut under_load = 0;
    for i in 0..MOVES {
        let seen = served_lines(&log);
        if wait_served(&c, &log, seen.max(1) + usize::from(i > 0), &client) {
            under_load += 1;
        }
        let dest = (home + 1) % 3;
        migrate(&c, SERVER, dest, Backend::Criu, None);
        home = dest;
    }
    if under_load < MOVES {
        eprintln!(
            "note: the client ended before move {} of {MOVES} (slow machine?)",
            under_load + 1
        );
    }
    let result = client.finish(&c);
    assert_client_ok(&c, "client of the moving server", &result, iterations);
    assert_runs_on(&c, SERVER, home);
}

/// The state letter of process `pid` (`T` = stopped), from /proc.
#[test]
fn criu_destination_killed_during_the_dump_rolls_back_and_the_source_runs_on() {
    let _turn = serial();
    let name = "destination killed while the source is dumped";
    if !criu_available(name) {
        return;
    }
    let c = Cluster::start();
    // A 200 MiB server: its dump takes long enough to kill the destination in the middle.
    start_ballast_server(&c, 0, SERVER, 200);
    let client = ClientRun::start(&c, 1, CLIENT, SERVER, ITERATIONS, BLOCK);
    assert!(
        wait_served(&c, &ep_log(&c, 0, SERVER), 1, &client),
        "{name}: the client ended too early"
    );
    let dir = c.dir().to_path_buf();
    let to = node_name(&c, 2);
    let migration = thread::spawn(move || {
        Command::new(DVS)
            .arg("--dir")
            .arg(&dir)
            .args([
                "migrate",
                "dc0/1",
                "--to",
                &to,
                "--backend",
                "criu",
                "--json",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run dvs migrate")
    });
    // Once the move has started, give the quiesce a moment and kill the destination while
    // the 200 MiB dump runs.
    wait_until(
        "the migration to start",
        || {
            let s = c.status();
            let migrating = s["nodes"].as_array()?.iter().any(|n| {
                n["status"]["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| e["ep"] == SERVER && e["migrating"] == Value::Bool(true))
            });
            migrating.then_some(())
        },
        || diagnose(&c),
    );
    thread::sleep(Duration::from_millis(40));
    c.kill_node(2);
    let out = migration.join().unwrap();
    if let Ok(report) = serde_json::from_slice::<Value>(&out.stdout) {
        assert_eq!(report["committed"], Value::Bool(false), "{name}: {report}");
    }
    let result = client.finish(&c);
    assert_client_ok(&c, name, &result, ITERATIONS);
    // The source process runs (not left stopped by the dump) and is RUNNING on node0.
    let status = c.status();
    let running: Vec<_> = placements(&status, SERVER)
        .into_iter()
        .filter(|(node, state, _)| *node == 0 && state == "RUNNING")
        .collect();
    assert_eq!(running.len(), 1, "{name}: {running:?}{}", diagnose(&c));
    let procs = c.dvs(&["ps", "--json"]);
    let procs: Value = serde_json::from_slice(&procs.stdout).unwrap_or(Value::Null);
    for n in procs.as_array().into_iter().flatten() {
        for p in n["procs"].as_array().into_iter().flatten() {
            if p["ep"] == SERVER {
                let pid = p["pid"].as_u64().expect("pid");
                for child in std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|s| s.parse::<u64>().ok())
                    .chain([pid])
                {
                    assert_ne!(
                        proc_state(child).as_deref(),
                        Some("T"),
                        "{name}: process {child} was left stopped"
                    );
                }
            }
        }
    }
}

/// A server with a 1 GiB heap migrates while a client on a third node calls it: the move
/// commits, no node declares a link dead meanwhile (the node busy with the image keeps its
/// heartbeats going), and the client gets every answer.
#[test]
fn criu_a_1_gib_server_migrates_under_load_without_losing_a_link() {
    let _turn = serial();
    let name = "1 GiB server";
    if !criu_available(name) {
        return;
    }
    let c = Cluster::start();
    start_ballast_server(&c, 0, SERVER, 1024);
    let client = ClientRun::start(&c, 2, CLIENT, SERVER, 3000, BLOCK);
    assert!(
        wait_served(&c, &ep_log(&c, 0, SERVER), 1, &client),
        "{name}: the client ended too early"
    );
    let downs: Vec<usize> = (0..3).map(|n| c.log_count(n, "down:")).collect();
    let report = migrate(&c, SERVER, 1, Backend::Criu, None);
    let result = client.finish(&c);
    assert_client_ok(&c, name, &result, 3000);
    assert_runs_on(&c, SERVER, 1);
    for n in 0..3 {
        assert_eq!(
            c.log_count(n, "down:"),
            downs[n as usize],
            "{name}: node {n} lost a link during the move:\n{}",
            c.log(n)
        );
    }
    println!(
        "{name}: committed in {:.0} ms (image {:.0} MB), client max stall {:.0} ms",
        report["migration_ms"].as_f64().unwrap_or(f64::NAN),
        report["image_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
        result["max_stall_ms"].as_f64().unwrap_or(f64::NAN)
    );
}

/// While a 256 MiB server migrates away from node0, a second client keeps calling another
/// server on node0: its calls keep being served during the move (the node busy with the
/// image still serves IPC), and both clients get every answer. The second client's longest
/// stall is printed.
#[test]
fn criu_a_256_mib_move_does_not_stop_other_traffic_on_the_source() {
    let _turn = serial();
    let name = "256 MiB server beside a busy one";
    if !criu_available(name) {
        return;
    }
    let c = Cluster::start();
    start_ballast_server(&c, 0, SERVER, 256);
    start_ballast_server(&c, 0, 3, 0);
    let moving = ClientRun::start(&c, 2, CLIENT, SERVER, 2000, BLOCK);
    let busy = ClientRun::start(&c, 1, 4, 3, 5_000, "1");
    assert!(
        wait_served(&c, &ep_log(&c, 0, SERVER), 1, &moving),
        "{name}: the first client ended too early"
    );
    let busy_log = ep_log(&c, 0, 3);
    assert!(
        wait_served(&c, &busy_log, 1, &busy),
        "{name}: the busy client ended too early"
    );
    let before = served_lines(&busy_log);
    let report = migrate(&c, SERVER, 1, Backend::Criu, None);
    let during = served_lines(&busy_log) - before;
    let busy_result = busy.finish(&c);
    let moving_result = moving.finish(&c);
    assert_client_ok(&c, name, &moving_result, 2000);
    assert_client_ok(&c, &format!("{name} (busy client)"), &busy_result, 5_000);
    assert!(
        during > 0,
        "{name}: the busy server served nothing during the move ({report})"
    );
    println!(
        "{name}: moved in {:.0} ms; the busy client was served {} x100 requests meanwhile, \
         its longest stall {:.1} ms",
        report["migration_ms"].as_f64().unwrap_or(f64::NAN),
        during,
        busy_result["max_stall_ms"].as_f64().unwrap_or(f64::NAN)
    );
}

/// A node kernel started in a mount namespace of its own (as systemd's `PrivateTmp=` or a
/// container would run it), by a parent that leaked it a descriptor from the old namespace:
/// a server it launched migrates away and back with criu, and its client sees every answer.
/// (criu refused it while the server inherited that descriptor: "Can't lookup mount=N".)
#[test]
fn criu_a_node_in_its_own_mount_namespace_migrates_both_ways() {
    let _turn = serial();
    let name = "node in its own mount namespace";
    if !criu_available(name) {
        return;
    }
    let c = Cluster::start();
    c.kill_node(1);
    c.restart_node_in_private_mount_ns(1);
    c.wait_all_links_up();
    start_ballast_server(&c, 1, SERVER, 2);
    let client = ClientRun::start(&c, 2, CLIENT, SERVER, 1000, BLOCK);
    assert!(
        wait_served(&c, &ep_log(&c, 1, SERVER), 1, &client),
        "{name}: the client ended too early"
    );
    migrate(&c, SERVER, 0, Backend::Criu, None);
    migrate(&c, SERVER, 1, Backend::Criu, None);
    let result = client.finish(&c);
    assert_client_ok(&c, name, &result, 1000);
}
