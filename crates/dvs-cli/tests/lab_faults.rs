//! Failures on the lab (hosts that share nothing but a network, etcd over TLS) while a
//! 300 MiB server's image crosses from host1 to host3: host3's network is cut, or the
//! destination's or the source's node kernel is SIGKILLed. The move ends, the server runs
//! in one place at most, the client on host2 gets every block or a clear error, and the
//! struck host or node comes back and rejoins.
//!
//! Needs root, etcd and criu like `lab.rs`; `DVS_SKIP_CRIU=1` skips it.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::lab::*;

/// What goes wrong during the transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// host3 (the destination) loses its network.
    CutDestination,
    /// node3's kernel (the destination) is SIGKILLed.
    KillDestination,
    /// node1's kernel (the source, which coordinates) is SIGKILLed.
    KillSource,
}

/// A 300 MiB server on node1 (host1) migrates to node3 (host3), asked on host2, while a
/// client on host2 calls it; `fault` strikes as the image starts crossing. Then the checks:
/// the move ends, the server runs where it should (nowhere if its node died with it), the
/// client gets every block or a clear error, and the struck host or node comes back and
/// rejoins.
fn move_under(fault: Fault) {
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
    let client_run = start_client(&lab, 2, 1, 4000, 20_000);
    thread::sleep(Duration::from_millis(300));
    // Every pid now: `dvs lab status` takes a while, and the fault must land in the transfer.
    let (source_pid, destination_pid) = (node_pid(&lab, 1), node_pid(&lab, 3));
    // Asked on host2: neither the source nor the destination is there.
    let (migration, lines) = spawn_streaming(
        &lab,
        2,
        &["migrate", "dc0/1", "--to", "node3", "--backend", "criu"],
    );
    let mut seen = Vec::new();
    wait_phase(&lines, "transfer", &mut seen, &format!("{fault:?}"));
    match fault {
        Fault::CutDestination => {
            ok(
                lab.exec(
                    "host3",
                    &["ip", "link", "set", "eth0", "down"],
                    Duration::from_secs(10),
                ),
                "cut host3 off",
            );
        }
        // Signals reach the lab's processes from here (they are no network traffic).
        Fault::KillDestination => unsafe {
            libc::kill(destination_pid, libc::SIGKILL);
        },
        Fault::KillSource => unsafe {
            libc::kill(source_pid, libc::SIGKILL);
        },
    }
    let struck = Instant::now();
    finish_streaming(migration, &lines, &mut seen, &format!("{fault:?}"));
    let report = seen.join("\n");
    println!("{fault:?} after {:?}:\n{report}", struck.elapsed());
    if fault != Fault::KillSource {
        // The source learns it from the link and rolls back (dvs migrate, relayed by node2,
        // follows the source to the end; with the source dead it has no report to give).
        assert!(
            report.contains("rolled back"),
            "the migration did not roll back: {report}"
        );
    }
    // The server: on node1 after a rollback, nowhere if it died with its node (the
    // destination's copy was not restored yet, so it records the rollback itself).
    let home: Vec<u64> = if fault == Fault::KillSource {
        vec![]
    } else {
        vec![1]
    };
    within(
        Duration::from_secs(30),
        "the server where it should be",
        || (running(&lab, 1) == home).then_some(()),
    );
    let out = wait_bounded(client_run, Duration::from_secs(120), "the client");
    let stdout = text(&out.stdout);
    if fault == Fault::KillSource {
        assert!(
            !out.status.success() && (stdout.contains("unreachable") || stdout.contains("died")),
            "the server died with its node, but the client did not say so: {stdout}"
        );
    } else {
        assert_client_all_ok(&out, 4000, &format!("{fault:?}"));
    }
    // The struck host or node comes back and rejoins: links up, leases held, not fenced.
    match fault {
        Fault::CutDestination => {
            ok(
                lab.exec(
                    "host3",
                    &["ip", "link", "set", "eth0", "up"],
                    Duration::from_secs(10),
                ),
                "bring host3 back",
            );
        }
        Fault::KillDestination => restart_node(&lab, 3),
        Fault::KillSource => restart_node(&lab, 1),
    }
    within(Duration::from_secs(60), "every node back", || {
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
    assert_eq!(running(&lab, 1), home);
    if fault == Fault::KillSource {
        // The restarted source killed the stopped original it had left behind.
        within(Duration::from_secs(30), "the orphan killed", || {
            let holder = host_of(&lab, 1)["holder"].as_i64()?;
            let log = std::fs::read_to_string(format!("/proc/{holder}/root/var/lib/dvs/node.log"))
                .unwrap_or_default();
            log.contains("left by the previous run").then_some(())
        });
    }
}

#[test]
fn a_host_cut_off_during_the_transfer_rolls_back_and_rejoins() {
    move_under(Fault::CutDestination);
}

#[test]
fn the_destination_killed_during_the_transfer_on_the_lab() {
    move_under(Fault::KillDestination);
}

#[test]
fn the_source_killed_during_the_transfer_on_the_lab() {
    move_under(Fault::KillSource);
}
