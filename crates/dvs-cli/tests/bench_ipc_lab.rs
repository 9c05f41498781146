//! `dvs bench ipc --lab`, in small: the table must have every row for both clusters, and the
//! lab must be gone afterwards. No timing is checked: the figures depend on the machine.
//!
//! Needs what `dvs lab` needs (root, namespaces, etcd from scripts/install-etcd.sh).

use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const DVS: &str = env!("CARGO_BIN_EXE_dvs");

#[test]
fn bench_ipc_runs_on_a_lab_and_takes_it_down() {
    let mut child = Command::new(DVS)
        .args([
            "bench",
            "ipc",
            "--lab",
            "--iterations",
            "200",
            "--bulk-mib",
            "4",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dvs bench ipc --lab");
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    // A few seconds here; far more means it hangs.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            // SIGTERM: its guard takes the lab down.
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            panic!("dvs bench ipc --lab did not end within 120 s");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let stdout = reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
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
