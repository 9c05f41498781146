//! Failures on the lab (hosts that share nothing but a network, etcd over TLS): the
//! destination host's network is cut while a 300 MiB server's image crosses to it. The
//! source learns it from the link, rolls back and runs on; the client on a third host gets
//! every block; the cut-off host comes back and rejoins.
//!
//! Needs root, etcd and criu like `lab.rs`; `DVS_SKIP_CRIU=1` skips it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::lab::*;
use serde_json::Value;

/// Every node's view through host1's node: `dvs status --json` run on host1.
fn status(lab: &Lab) -> Value {
    let out = run_bounded(
        &mut lab.dvs_on(1, &["status", "--json"]),
        Duration::from_secs(30),
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The nodes that report dc0/`ep` RUNNING.
fn running(lab: &Lab, ep: i32) -> Vec<u64> {
    let s = status(lab);
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
fn within<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
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

#[test]
fn a_host_cut_off_during_the_transfer_rolls_back_and_rejoins() {
    if !criu_wanted() {
        return;
    }
    let lab = Lab::up(3);
    let server = example_bin("migr-server");
    ok(
        run_bounded(
            &mut lab.dvs_on(
                2,
                &[
                    "run",
                    "--dc",
                    "dc0",
                    "--ep",
                    "1",
                    "--node",
                    "node1",
                    "--",
                    &server,
                    "--ballast-mb",
                    "300",
                ],
            ),
            Duration::from_secs(60),
        ),
        "run migr-server on node1",
    );
    within(
        Duration::from_secs(30),
        "migr-server RUNNING on node1",
        || (running(&lab, 1) == [1]).then_some(()),
    );
    // The client runs on host2, long enough to span the move and the rollback.
    let client = example_bin("migr-client");
    let client_run = lab
        .dvs_on(
            2,
            &[
                "run",
                "--dc",
                "dc0",
                "--ep",
                "2",
                "--node",
                "node2",
                "--wait",
                "--",
                &client,
                "--server",
                "1",
                "--iterations",
                "4000",
                "--block-size",
                "65536",
                "--timeout-ms",
                "20000",
                "--json",
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the client");
    thread::sleep(Duration::from_millis(300));
    // Asked on host2: neither the source nor the destination is there.
    let mut migration = lab
        .dvs_on(
            2,
            &["migrate", "dc0/1", "--to", "node3", "--backend", "criu"],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dvs migrate");
    let (tx, lines) = mpsc::channel();
    let out = migration.stdout.take().expect("piped");
    thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut seen = Vec::new();
    loop {
        let l = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no transfer phase: {seen:?}"));
        let transfer = l.split_whitespace().last() == Some("transfer");
        seen.push(l);
        if transfer {
            break;
        }
    }
    ok(
        lab.exec(
            "host3",
            &["ip", "link", "set", "eth0", "down"],
            Duration::from_secs(10),
        ),
        "cut host3 off",
    );
    let cut = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while migration.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = migration.kill();
            panic!("dvs migrate did not end within 60 s of the cut: {seen:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    while let Ok(l) = lines.recv_timeout(Duration::from_millis(500)) {
        seen.push(l);
    }
    let report = seen.join("\n");
    println!(
        "migration with host3 cut off after {:?}:\n{report}",
        cut.elapsed()
    );
    assert!(
        report.contains("rolled back")
            || report.contains("ROLLBACK")
            || report.contains("rollback"),
        "the migration to a host cut off did not roll back: {report}"
    );
    // The source runs on, and the client, on a host the cut does not concern, gets every
    // block.
    within(
        Duration::from_secs(30),
        "the server RUNNING on node1 only",
        || (running(&lab, 1) == [1]).then_some(()),
    );
    let out = wait_bounded(client_run, Duration::from_secs(120), "the client");
    let stdout = text(&out.stdout);
    let json: Value = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "the client printed no report: {stdout}{}",
                text(&out.stderr)
            )
        });
    assert!(out.status.success(), "the client failed: {stdout}");
    assert_eq!(json["ok"], 4000, "{json}");
    for k in ["lost", "duplicated", "corrupt"] {
        assert_eq!(json[k], 0, "{k}: {json}");
    }
    // host3 comes back: its node rejoins (links up, lease held), with no copy of the server.
    ok(
        lab.exec(
            "host3",
            &["ip", "link", "set", "eth0", "up"],
            Duration::from_secs(10),
        ),
        "bring host3 back",
    );
    within(Duration::from_secs(60), "node3 rejoined", || {
        let s = status(&lab);
        let nodes = s["nodes"].as_array()?.clone();
        let all_up = nodes.iter().all(|n| {
            n["reachable"] == true
                && n["status"]["fenced"] == false
                && n["status"]["links"]
                    .as_array()
                    .is_some_and(|l| l.iter().all(|l| l["up"] == true))
        });
        let alive = nodes.iter().all(|n| n["member"]["alive"] == true);
        (all_up && alive).then_some(())
    });
    assert_eq!(running(&lab, 1), [1]);
}
