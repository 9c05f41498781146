//! A cooperative migration carries the program's working folder (`dvs run --workdir`) across
//! simulated hosts that share no file (`dvs lab`): the folder is under /tmp, which each lab
//! host has to itself. A move rolled back on purpose leaves no copy on the destination host;
//! a committed one puts the folder's files there, and the restarted program runs in it.
//!
//! Needs root, namespaces and etcd (see `lab.rs`); no criu.

mod common;

use std::time::Duration;

use common::lab::*;
use serde_json::Value;

/// The cooperatively moved server's endpoint.
const SERVER: i32 = 5;

/// Whether `path` exists on host `n`.
fn exists_on(lab: &Lab, n: u16, path: &str) -> bool {
    lab.exec(
        &format!("host{n}"),
        &["test", "-e", path],
        Duration::from_secs(30),
    )
    .status
    .success()
}

/// The pid node `n` runs endpoint dc0/`ep` as (`dvs ps --json`: one entry per node).
fn running_pid(lab: &Lab, n: u16, ep: i32) -> i64 {
    let out = ok(
        run_bounded(
            &mut lab.dvs_on(n, &["ps", "--json"]),
            Duration::from_secs(30),
        ),
        "dvs ps",
    );
    let ps: Value = serde_json::from_slice(&out.stdout).expect("ps JSON");
    ps.as_array()
        .expect("a list")
        .iter()
        .filter(|node| node["node"] == format!("node{n}"))
        .flat_map(|node| node["procs"].as_array().cloned().unwrap_or_default())
        .find(|p| p["ep"] == ep && p["state"] == "running")
        .and_then(|p| p["pid"].as_i64())
        .unwrap_or_else(|| panic!("node{n} runs no dc0/{ep}: {ps}"))
}

/// `dvs migrate TARGET --to node2 --backend cooperative [--fail-at PHASE]` from node1.
fn migrate_cooperatively(lab: &Lab, target: &str, fail_at: Option<&str>) -> Value {
    let mut args = vec![target, "--to", "node2", "--backend", "cooperative"];
    if let Some(phase) = fail_at {
        args.extend(["--fail-at", phase]);
    }
    migrate_report(lab, 1, &args, Duration::from_secs(60))
}

#[test]
fn lab_cooperative_move_carries_the_working_folder_and_a_rollback_leaves_none() {
    let lab = Lab::up(3);
    let dir = format!("/tmp/dvs-lab-coop-{}", std::process::id());
    let state = format!("{dir}/state.txt");
    let server = example_bin("migr-server");
    run_on_node1(&lab, SERVER, Some(&dir), &[&server]);
    let content = format!("written on host1 by the test {}\n", std::process::id());
    let write = lab.exec(
        "host1",
        &["sh", "-c", &format!("printf '%s' '{content}' > {state}")],
        Duration::from_secs(30),
    );
    assert!(write.status.success(), "{}", text(&write.stderr));
    assert!(
        !exists_on(&lab, 2, &dir),
        "{dir} exists on host2 before any move"
    );

    // Rolled back after the program restarted on node2: the folder it was given goes.
    let target = format!("dc0/{SERVER}");
    let report = migrate_cooperatively(&lab, &target, Some("restore"));
    assert_eq!(report["committed"], false, "{report}");
    assert_eq!(lab.server_node(SERVER, 3), Some(1), "not back on node1");
    within(
        Duration::from_secs(20),
        "the rolled-back copy's folder to go from host2",
        || (!exists_on(&lab, 2, &dir)).then_some(()),
    );

    // Committed: the files are on host2 and the program runs in the folder.
    let report = migrate_cooperatively(&lab, &target, None);
    assert_eq!(report["committed"], true, "{report}");
    assert_eq!(report["backend"], "cooperative", "{report}");
    assert_eq!(lab.server_node(SERVER, 3), Some(2), "not on node2");
    let read = lab.exec("host2", &["cat", &state], Duration::from_secs(30));
    assert_eq!(text(&read.stdout), content, "state.txt on host2");
    let pid = running_pid(&lab, 2, SERVER);
    let cwd = lab.exec(
        "host2",
        &["readlink", &format!("/proc/{pid}/cwd")],
        Duration::from_secs(30),
    );
    assert_eq!(
        text(&cwd.stdout).trim(),
        dir,
        "the restarted program's folder"
    );
    // The endpoint answers from host2.
    let client = start_client(&lab, 20, SERVER, 200, 5000);
    assert_client_all_ok(
        &wait_bounded(client, Duration::from_secs(60), "client"),
        200,
        "client after the move",
    );
}
