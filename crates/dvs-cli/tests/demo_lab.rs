//! `dvs demo --lab`: the paper's evaluation on a fresh 3-host lab with etcd, in small: one
//! run per scenario. The table must list every scenario with no lost, duplicated or
//! corrupt iteration, and the lab must be gone afterwards.
//!
//! Needs what `dvs lab` needs (root, namespaces, etcd from scripts/install-etcd.sh); uses
//! criu when it works, else the cooperative backend.

mod common;

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::lab::{run_lab_command, DVS};

#[test]
fn demo_runs_on_a_lab_and_takes_it_down() {
    // A few seconds here; far more means it hangs.
    let (status, stdout, stderr) = run_lab_command(
        &["demo", "--lab", "--runs", "1", "--iterations", "200"],
        Duration::from_secs(300),
    );
    println!("{stdout}{stderr}");
    assert!(status.success(), "dvs demo --lab failed ({status})");
    for label in [
        "1 remote -> client's node",
        "2 client's node -> remote",
        "3 remote -> other remote",
        "rollback (failed migration)",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(label) && !l.contains("VIOLATION")),
            "no table row for {label:?}"
        );
    }
    assert!(stdout.contains("ran on a 3-host lab with etcd"), "{stdout}");
    assert!(
        stdout.contains("correctness: 4 migrations under load (1 rolled back on purpose), 800 client iterations all ok: none lost, duplicated or corrupt"),
        "{stdout}"
    );
    assert!(!stdout.contains("VIOLATION"), "{stdout}");
    // The lab is gone: its namespaces and its state folder.
    let name = stdout
        .lines()
        .find_map(|l| l.strip_prefix("== starting a 3-host lab "))
        .and_then(|r| r.split_whitespace().next())
        .expect("the lab's name");
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let prefix = format!("dvs-lab-{name}-");
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(&prefix),
        "namespaces of lab {name} are left"
    );
    assert!(
        !std::path::Path::new("/var/lib/dvs/lab").join(name).exists(),
        "the state of lab {name} is left"
    );
    assert!(stderr.contains(&format!("lab {name} down")), "{stderr}");
}

/// SIGINT in the middle of the demo takes the lab down before the command exits.
#[test]
fn sigint_takes_the_demo_lab_down() {
    let mut child = Command::new(DVS)
        .args(["demo", "--lab", "--runs", "10", "--iterations", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dvs demo --lab");
    let out = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut name = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let l = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the demo did not reach its first scenario");
        if let Some(r) = l.strip_prefix("== starting a 3-host lab ") {
            name = r.split_whitespace().next().map(str::to_string);
        }
        if l.starts_with("== scenario") {
            break;
        }
    }
    let name = name.expect("the lab's name");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status}");
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(&format!("dvs-lab-{name}-")),
        "namespaces of lab {name} are left"
    );
    assert!(!std::path::Path::new("/var/lib/dvs/lab")
        .join(&name)
        .exists());
}
