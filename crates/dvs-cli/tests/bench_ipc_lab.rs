//! `dvs bench ipc --lab`, in small: the table must have every row for both clusters, and the
//! lab must be gone afterwards. No timing is checked: the figures depend on the machine.
//!
//! Needs what `dvs lab` needs (root, namespaces, etcd from scripts/install-etcd.sh).

mod common;

use std::process::Command;
use std::time::Duration;

use common::lab::run_lab_command;

#[test]
fn bench_ipc_runs_on_a_lab_and_takes_it_down() {
    // A few seconds here; far more means it hangs.
    let (status, stdout, stderr) = run_lab_command(
        &[
            "bench",
            "ipc",
            "--lab",
            "--iterations",
            "200",
            "--bulk-mib",
            "4",
        ],
        Duration::from_secs(300),
    );
    println!("{stdout}{stderr}");
    assert!(status.success(), "dvs bench ipc --lab failed ({status})");
    assert!(stdout.contains("dvs bench ipc --lab"), "{stdout}");
    // Every row, with a figure for each cluster and their ratio.
    for label in [
        "raw TCP ping-pong, NODELAY",
        "dvs sendrec, remote",
        "dvs sendrec, local",
        "raw TCP ping-pong (1 / median)",
        "dvs send, remote",
        "dvs send, local",
        "raw TCP stream, 1 MiB writes",
        "dvs vcopy 1 MiB, remote",
        "dvs vcopy 1 MiB, local",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no row {label:?}:\n{stdout}"));
        assert!(row.trim_end().ends_with('x'), "row without a ratio: {row}");
        assert!(!row.contains("NaN") && !row.contains("inf"), "{row}");
    }
    for side in ["1 machine  remote sendrec", "lab        remote sendrec"] {
        assert!(stdout.contains(side), "no {side:?} line:\n{stdout}");
    }
    // The lab is gone: its namespaces and its state folder.
    let name = stderr
        .lines()
        .find_map(|l| l.strip_prefix("dvs bench: lab "))
        .and_then(|r| r.split_whitespace().next())
        .expect("the lab's name");
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(&format!("dvs-lab-{name}-")),
        "namespaces of lab {name} are left"
    );
    assert!(
        !std::path::Path::new("/var/lib/dvs/lab").join(name).exists(),
        "the state of lab {name} is left"
    );
    assert!(stderr.contains(&format!("lab {name} down")), "{stderr}");
}
