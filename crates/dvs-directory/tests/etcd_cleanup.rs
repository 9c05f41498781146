//! Nothing outlives its handle: the etcd client's thread ends once the last directory handle
//! and the last watch are gone, and the harness's etcd process and data dir are gone once
//! its handle drops. A test binary of its own, so that no other test's threads are counted.

mod common;

use std::time::{Duration, Instant};

use common::{etcd_available, Etcd, PATIENCE};
use dvs_directory::Directory;

/// Threads of this process named like the etcd client's.
fn client_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "dvs-etcd")
        .count()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "still waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn client_thread_etcd_process_and_data_dir_go_with_their_handles() {
    if !etcd_available("etcd_cleanup") {
        return;
    }
    let etcd = Etcd::start();
    let pid = etcd.members[0].pid().unwrap() as libc::pid_t;
    let dir = etcd.dir().to_owned();
    assert_eq!(client_threads(), 0);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let d = etcd.directory("/dvs/cleanup/");
    let clone = d.clone();
    let (_, rx) = rt.block_on(d.watch("")).unwrap();
    rt.block_on(clone.cas("k", None, Some("v".into()))).unwrap();
    assert_eq!(client_threads(), 1, "clones share one client thread");

    // The watch keeps the client alive after the handles are gone ...
    drop(d);
    drop(clone);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(client_threads(), 1);
    // ... and the thread ends once the watch is dropped too.
    drop(rx);
    wait_for("the etcd client thread to end", || client_threads() == 0);

    drop(etcd);
    // SAFETY: signal 0 only checks whether the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    assert!(!alive, "etcd {pid} still runs");
    assert!(!dir.exists(), "{} is still there", dir.display());
}
