//! The realistic server (`app-server`: worker threads, a helper child, a timer, a cache and a
//! hash-chained `app.log` kept open in its working folder) migrated with criu across
//! simulated hosts that share no file (`dvs lab`), under two checking clients on the other
//! hosts. Its helper is linked by a TCP connection on 127.0.0.1 (`--helper-link tcp`): an
//! established connection with both ends in the tree, which criu carries with TCP repair
//! into the destination host's network namespace (`tests/app.rs` covers the pipes). Its working folder is under /tmp, which each lab host has to itself: it
//! exists on the destination only because it travels with the image (`dvs run --workdir`).
//!
//! Checks: both clients got every answer right (each needs a helper call over the
//! connection); the log on the destination host is intact and holds every request; the
//! server's worker threads and helper child are the same after the move; the files the source had are on the destination (the log grown from them).
//!
//! Needs root, namespaces, etcd and criu 4.2 (see `lab.rs`); `DVS_SKIP_CRIU=1` skips.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use common::lab::*;
use serde_json::Value;

/// Requests each client sends.
const COUNT: u64 = 2000;
/// The server's endpoint.
const SERVER: i32 = 1;

/// `dvs run --wait -- app-client --server SERVER ARGS` as dc0/`ep` on node `n`.
fn app_client(lab: &Lab, n: u16, ep: i32, args: &[&str]) -> std::process::Command {
    let client = example_bin("app-client");
    let (ep, node, server) = (ep.to_string(), format!("node{n}"), SERVER.to_string());
    let mut cmd = vec![
        "run", "--dc", "dc0", "--ep", &ep, "--node", &node, "--wait", "--", &client, "--server",
        &server,
    ];
    cmd.extend_from_slice(args);
    let mut c = lab.dvs_on(n, &cmd);
    c.stdin(Stdio::null());
    c
}

/// The last JSON object line `dvs run --wait` printed that has key `key`.
fn json_with(out: &Output, key: &str, what: &str) -> Value {
    text(&out.stdout)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(|v| v.get(key).is_some())
        .unwrap_or_else(|| {
            panic!(
                "{what}: no JSON with {key}: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            )
        })
}

/// One status answer of the server, asked from node `n` as endpoint `ep`.
fn status(lab: &Lab, n: u16, ep: i32) -> Value {
    let out = run_bounded(
        &mut app_client(lab, n, ep, &["--status", "--json"]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "app-client --status failed: {}",
        text(&out.stderr)
    );
    json_with(&out, "helper_pid", "status")
}

/// `app-client --verify-log PATH --json` on host `n`.
fn verify_log_on(lab: &Lab, n: u16, path: &str) -> Value {
    let client = example_bin("app-client");
    let out = lab.exec(
        &format!("host{n}"),
        &[&client, "--verify-log", path, "--json"],
        Duration::from_secs(60),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "--verify-log on host{n} printed no JSON ({e}): {}{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    });
    assert!(
        out.status.success() && v["intact"] == Value::Bool(true),
        "{path} on host{n} is not intact: {v}"
    );
    v
}

/// A file of host `n`, read inside it.
fn read_on(lab: &Lab, n: u16, path: &str) -> Vec<u8> {
    let out = lab.exec(&format!("host{n}"), &["cat", path], Duration::from_secs(30));
    assert!(
        out.status.success(),
        "cannot read {path} on host{n}: {}",
        text(&out.stderr)
    );
    out.stdout
}

/// Starts a checking client on node `n`; returns it once it printed its first progress
/// line (it is under way), with a thread draining the rest of its output into the result.
fn start_client(lab: &Lab, n: u16, ep: i32) -> (Child, std::sync::mpsc::Receiver<String>) {
    let count = COUNT.to_string();
    let mut child = app_client(
        lab,
        n,
        ep,
        &["--count", &count, "--progress", "100", "--json"],
    )
    .stdout(Stdio::piped())
    // Not read here: inherited, so that it can never fill a pipe and stall the client.
    .stderr(Stdio::inherit())
    .spawn()
    .expect("the client");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits (bounded) for a progress line from a client; returns the lines read.
fn until_progress(rx: &std::sync::mpsc::Receiver<String>, what: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => {
                let done = l.contains("requests done");
                seen.push(l);
                if done {
                    return seen;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    panic!("{what} printed no progress: {seen:?}")
}

/// The client's result: its JSON line among what it printed.
fn finish_client(
    mut child: Child,
    rx: std::sync::mpsc::Receiver<String>,
    mut lines: Vec<String>,
    what: &str,
) -> Value {
    let out = wait_bounded_status(&mut child, Duration::from_secs(180), what);
    lines.extend(rx.try_iter());
    // The drain thread ends with the pipe; collect what it still had.
    lines.extend(rx.recv_timeout(Duration::from_secs(5)));
    lines.extend(rx.try_iter());
    let result = lines
        .iter()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(|v| v.get("ok").is_some())
        .unwrap_or_else(|| panic!("{what} printed no result: {lines:?}"));
    assert!(out, "{what} failed: {result}");
    common::app::assert_app_result(what, &result, COUNT, "");
    result
}

/// Waits for `child` at most `limit` (killing it then); whether it succeeded.
fn wait_bounded_status(child: &mut Child, limit: Duration, what: &str) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s.success();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn lab_app_moves_with_its_workdir_across_hosts() {
    if !criu_wanted() {
        return;
    }
    let lab = Lab::up(3);
    let dir = format!("/tmp/dvs-lab-app-{}", std::process::id());
    let log = format!("{dir}/app.log");
    let server = example_bin("app-server");
    run_on_node1(
        &lab,
        SERVER,
        Some(&dir),
        &[
            &server,
            "--workers",
            "4",
            "--cache-mb",
            "32",
            "--tick-ms",
            "50",
            "--helper-link",
            "tcp",
        ],
    );
    let before = status(&lab, 2, 10);
    // The working folder is host1's own: host2 does not see it before the move.
    let on_host2 = lab.exec("host2", &["test", "-e", &dir], Duration::from_secs(30));
    assert!(
        !on_host2.status.success(),
        "{dir} exists on host2 before the move"
    );
    let conf_before = read_on(&lab, 1, &format!("{dir}/app.conf"));

    let (c2, rx2) = start_client(&lab, 2, 2);
    let (c3, rx3) = start_client(&lab, 3, 3);
    let seen2 = until_progress(&rx2, "client on node2");
    let seen3 = until_progress(&rx3, "client on node3");

    let report = migrate_json(&lab, 1, "dc0/1", "node2", Duration::from_secs(120));
    assert_eq!(report["committed"], true, "{report}");
    assert_eq!(
        lab.server_node(SERVER, 3),
        Some(2),
        "the server is not on node2"
    );

    let r2 = finish_client(c2, rx2, seen2, "client on node2");
    let r3 = finish_client(c3, rx3, seen3, "client on node3");
    let after = status(&lab, 3, 11);
    for k in ["workers", "threads", "helper_pid", "cache_bytes"] {
        assert_eq!(
            before[k], after[k],
            "the server's {k} changed across the move"
        );
    }
    assert!(
        after["ticks"].as_u64() > before["ticks"].as_u64(),
        "the timer stopped: {before} then {after}"
    );

    // The destination's log: intact, every request of both clients in it, grown from what
    // the source had.
    let v = verify_log_on(&lab, 2, &log);
    assert!(
        v["requests"].as_u64().unwrap_or(0) >= 2 * COUNT,
        "the log on host2 lacks requests: {v}"
    );
    assert_eq!(read_on(&lab, 2, &format!("{dir}/app.conf")), conf_before);
    let src = read_on(&lab, 1, &log);
    let dst = read_on(&lab, 2, &log);
    assert!(
        dst.len() > src.len() && dst.starts_with(&src),
        "host2's log does not continue host1's ({} and {} bytes)",
        src.len(),
        dst.len()
    );
    println!(
        "app-server moved host1 -> host2 in {} ms (frozen {} ms, longest held call {} ms), \
         clients {} and {} requests ok",
        report["migration_ms"], report["frozen_ms"], report["longest_hold_ms"], r2["ok"], r3["ok"]
    );
}
