//! A realistic program migrated with criu (issue 10, item 4): `app-server` (a receiver
//! thread, a pool of workers, a helper child over pipes, a timerfd, a cache, a hash-chained
//! `app.log` kept open in its working directory) serves two checking `app-client`s on the
//! other nodes while it moves in the paper's three scenarios, and once more in a move that
//! fails and rolls back, after the transfer and after the destination's restore.
//!
//! Each run checks: every answer of both clients verified (nothing lost, duplicated or
//! corrupt, the log positions in the answers going forward and chaining), the whole log
//! intact afterwards (`app-client --verify-log`), the server's thread count and its helper
//! child (same pid inside the namespace, alive, not stopped) the same after the move in
//! `/proc` and in the server's own status answer, and the working directory's files the same
//! (the log only grown).
//!
//! The working directory is a per-test folder under /tmp given with `--workdir`; every node
//! of a local cluster sees it at the same path. The criu tests fail when criu does not work
//! here, unless `DVS_SKIP_CRIU=1` is set. The tests take turns (one lock); timeouts are
//! only hang guards, nothing asserts on timing.

mod common;

use common::app::*;
use common::examples::criu_available;
use common::migr::*;
use common::Cluster;
use serde_json::Value;

/// Requests each client sends: enough to keep both busy through the move.
const COUNT: u64 = 3000;
/// Request lines in the log before the move is started.
const BEFORE_MOVE: usize = 400;
/// MiB of cache the server fills.
const CACHE_MB: u32 = 32;
/// Endpoint of the second client.
const CLIENT_B: i32 = 3;
/// Endpoints of the one-shot status clients (before and after the move).
const STATUS_BEFORE: i32 = 4;
const STATUS_AFTER: i32 = 5;

/// The node of the second client in `scenario`: one other than the server's whenever the
/// scenario leaves one.
fn second_client_node(scenario: Scenario) -> u16 {
    match scenario {
        Scenario::RemoteToClientNode => 1,
        Scenario::ClientNodeToRemote => 2,
        Scenario::RemoteToRemote => 1,
    }
}

/// The u64 field `k` of a JSON object, failing the test with `what` if it is missing.
fn field(what: &str, v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{what}: no {k} in {v}"))
}

/// One run: fresh cluster and working directory, the server, two clients, one criu move
/// after [`BEFORE_MOVE`] requests (failing at `fail_at` if given), then the checks.
fn app_run(scenario: Scenario, fail_at: Option<&str>) {
    let _turn = serial();
    let name = format!("app {scenario:?} fail_at={fail_at:?}");
    if !criu_available(&name) {
        return;
    }
    let (server_node, a_node, dest) = scenario.nodes();
    let b_node = second_client_node(scenario);
    let c = Cluster::start();
    let wd = Workdir::new();
    let dir = wd.path();
    let log = dir.join(LOG);
    start_app_server(&c, server_node, SERVER, dir, CACHE_MB);
    // The first status waits for the server to be bound.
    let before = app_status(&c, b_node, STATUS_BEFORE, SERVER);
    let pid = the_server(&c, dir);
    assert_eq!(field(&name, &before, "workers"), WORKERS as u64, "{before}");
    assert_eq!(field(&name, &before, "threads"), THREADS as u64, "{before}");
    assert_eq!(
        thread_count(pid),
        THREADS as u64,
        "{name}: threads of pid {pid}"
    );
    let helper = field(&name, &before, "helper_pid") as i32;
    let kids = children(pid);
    assert!(
        kids.iter().any(|(_, ns, _)| *ns == Some(helper)),
        "{name}: the helper (pid {helper} in the namespace) is not a child of {pid}: {kids:?}"
    );

    let a = start_app_client(&c, a_node, CLIENT, SERVER, COUNT);
    let b = start_app_client(&c, b_node, CLIENT_B, SERVER, COUNT);
    wait_until(
        &format!("{BEFORE_MOVE} requests in {}", log.display()),
        || (request_lines(&log) >= BEFORE_MOVE || a.finished() || b.finished()).then_some(()),
        || format!("{} request lines{}", request_lines(&log), diagnose(&c)),
    );
    if a.finished() || b.finished() {
        eprintln!("{name}: note: a client ended before the move started (slow machine?)");
    }
    // The log only grows, so what it holds now must be a prefix of what it holds later.
    let files_before = files(dir);
    let report = migrate(&c, SERVER, dest, Backend::Criu, fail_at);
    if a.finished() && b.finished() {
        eprintln!("{name}: note: both clients ended before the move did (slow machine?)");
    }
    let (what_a, what_b) = (a.what.clone(), b.what.clone());
    let result_a = a.finish(&c);
    let result_b = b.finish(&c);
    assert_app_client_ok(&c, &what_a, &result_a, COUNT);
    assert_app_client_ok(&c, &what_b, &result_b, COUNT);
    let home = if fail_at.is_some() { server_node } else { dest };
    assert_runs_on(&c, SERVER, home);

    // The same process tree after the move: its status answer and /proc agree.
    let after = app_status(&c, a_node, STATUS_AFTER, SERVER);
    for k in ["workers", "threads", "helper_pid", "cache_bytes"] {
        assert_eq!(
            before[k], after[k],
            "{name}: the server's {k} changed across the move: {before} then {after}"
        );
    }
    assert!(
        field(&name, &after, "ticks") > field(&name, &before, "ticks"),
        "{name}: the timer stopped ticking: {before} then {after}"
    );
    let pid = the_server(&c, dir);
    assert_eq!(
        thread_count(pid),
        THREADS as u64,
        "{name}: threads of the server (pid {pid}) after the move"
    );
    let kids = children(pid);
    let helpers: Vec<_> = kids
        .iter()
        .filter(|(_, ns, state)| *ns == Some(helper) && !matches!(state, Some('T' | 'Z')))
        .collect();
    assert_eq!(
        helpers.len(),
        1,
        "{name}: the helper (pid {helper} in the namespace) is not a live child of the \
         server (pid {pid}) after the move: {kids:?}"
    );

    // The whole log, and every client's answers inside it.
    let summary = verify_log(&log);
    let last_answered = [&result_a, &result_b]
        .iter()
        .map(|r| field(&name, r, "last_log_seq"))
        .max()
        .unwrap_or(0);
    assert!(
        field(&name, &summary, "last_seq") >= field(&name, &after, "log_seq")
            && field(&name, &after, "log_seq") > last_answered,
        "{name}: the log ({summary}) does not hold every answered line (last answered \
         {last_answered}, status {after})"
    );
    // Both clients' requests, the two status requests, nothing else.
    assert_eq!(
        field(&name, &summary, "requests"),
        2 * COUNT + 2,
        "{name}: request lines in the log ({summary})"
    );
    assert_same_files(&name, &files_before, dir);
    println!(
        "{name}: {} in {:.1} ms (image {:.1} MB); clients' max stall {:.1} / {:.1} ms; log {} lines",
        if fail_at.is_some() {
            "rolled back"
        } else {
            "committed"
        },
        report["migration_ms"].as_f64().unwrap_or(f64::NAN),
        report["image_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
        result_a["max_stall_ms"].as_f64().unwrap_or(f64::NAN),
        result_b["max_stall_ms"].as_f64().unwrap_or(f64::NAN),
        summary["lines"],
    );
}

#[test]
fn criu_app_remote_to_client_node() {
    app_run(Scenario::RemoteToClientNode, None);
}

#[test]
fn criu_app_client_node_to_remote() {
    app_run(Scenario::ClientNodeToRemote, None);
}

#[test]
fn criu_app_remote_to_remote() {
    app_run(Scenario::RemoteToRemote, None);
}

/// The move fails once the whole image has crossed (before it is restored): the source
/// copy is resumed and goes on serving, its log, helper and threads untouched.
#[test]
fn criu_app_remote_to_remote_rolls_back() {
    app_run(Scenario::RemoteToRemote, Some("transfer"));
}

/// The move fails after the destination restored its copy. That copy was restored stopped
/// and never runs (it is killed by the rollback), so its timer thread cannot append a line to
/// the shared log that the resumed source would then write again (seen before the
/// destination kept restored copies stopped until the commit: `450 tick t=5` from the
/// destination's copy, then `450 get ...` from the source).
#[test]
fn criu_app_rolls_back_after_the_restore() {
    app_run(Scenario::RemoteToRemote, Some("restore"));
}
