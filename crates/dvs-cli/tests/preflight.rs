//! A criu migration's preflight on a real cluster (one machine, real criu): a server whose
//! state cannot travel is refused before it stops, with an error that names the resource,
//! and keeps serving its client; one whose state can travel (a deleted file criu may copy)
//! moves.
//!
//! The server is `migr-server` with a resource (`--connect-tcp`, `--listen-tcp`,
//! `--map-file`); its client (`migr-client`) runs on another node during the attempt and
//! must see every request answered. While `dvs migrate` runs, a thread samples the server's
//! state in `/proc` and must never see it stopped.
//!
//! Needs root and criu 4.2 (scripts/install-criu.sh); `DVS_SKIP_CRIU=1` skips.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::examples::criu_available;
use common::migr::*;
use common::Cluster;
use serde_json::Value;

/// The server's host pid (the root of its tree), as its node reports it.
fn server_pid(c: &Cluster, ep: i32) -> u64 {
    wait_until(
        &format!("a pid for dc0/{ep}"),
        || {
            let st = c.status();
            st["nodes"].as_array()?.iter().find_map(|n| {
                n["status"]["endpoints"].as_array()?.iter().find_map(|e| {
                    (e["ep"] == ep && e["state"] == "RUNNING")
                        .then(|| e["pid"].as_u64())
                        .flatten()
                })
            })
        },
        || diagnose(c),
    )
}

/// Samples the state of `pid` until stopped; reports whether it was ever seen stopped.
struct StopWatch {
    stop: Arc<AtomicBool>,
    seen: thread::JoinHandle<Vec<String>>,
}

impl StopWatch {
    fn start(pid: u64) -> StopWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let seen = thread::spawn(move || {
            let mut states = Vec::new();
            // Bounded: the migrate command it watches is bounded by HANG_GUARD.
            for _ in 0..(HANG_GUARD.as_millis() as usize) {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Some(s) = proc_state(pid) {
                    if !states.contains(&s) {
                        states.push(s);
                    }
                }
                thread::sleep(Duration::from_millis(1));
            }
            states
        });
        StopWatch { stop, seen }
    }

    /// The states seen.
    fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.seen.join().expect("the watcher panicked")
    }
}

/// Starts `migr-server ARGS` as dc0/SERVER on node 0, then [`check_refused_running`].
fn refused_while_serving(c: &Cluster, args: &[&str], expect: &[&str]) {
    start_server_with(c, 0, SERVER, args);
    let log = ep_log(c, 0, SERVER);
    wait_until(
        "the server to bind",
        || {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("bound")
                .then_some(())
        },
        || diagnose(c),
    );
    check_refused_running(c, expect);
}

#[test]
fn a_tcp_connection_to_this_host_is_refused_and_the_server_keeps_serving() {
    let _serial = serial();
    if !criu_available("a_tcp_connection_to_this_host_is_refused") {
        return;
    }
    let c = Cluster::start();
    // The server's peer: this test, on loopback. It stays here whatever happens.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let peer = thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("the server connects");
        let mut buf = [0u8; 16];
        // Ends when the server's connection closes (at cluster shutdown).
        let _ = conn.read(&mut buf);
    });
    refused_while_serving(
        &c,
        &["--connect-tcp", &addr],
        &[
            "TCP connection 127.0.0.1:",
            &format!("-> {addr} (pid "),
            "whose other end stays on node0",
        ],
    );
    drop(c);
    let _ = peer.join();
}

#[test]
fn a_deleted_mapped_file_too_big_to_copy_is_refused_and_the_server_keeps_serving() {
    let _serial = serial();
    if !criu_available("a_deleted_mapped_file_too_big_to_copy_is_refused") {
        return;
    }
    let c = Cluster::start();
    // Real data (criu's limit counts allocated blocks): 40 MiB, above dvs's 32 MiB.
    let block: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8 | 1).collect();
    let mut data = Vec::with_capacity(40 << 20);
    for _ in 0..40 {
        data.extend_from_slice(&block);
    }
    let (path, _log) = serve_a_deleted_file(&c, "big.bin", &data);
    check_refused_running(
        &c,
        &[
            &format!("deleted file {path} (mapped)"),
            "40.0 MiB",
            "at most 32 MiB",
        ],
    );
}

/// With the server dc0/SERVER running on node 0, starts a 1000-request client on node 1;
/// once the client is under way, asks for a criu migration to node 2, which must be refused
/// with an error containing each of `expect`; then the client must end with every request
/// answered, the server never seen stopped and still on node 0.
fn check_refused_running(c: &Cluster, expect: &[&str]) {
    let log = ep_log(c, 0, SERVER);
    let pid = server_pid(c, SERVER);
    let client = ClientRun::start(c, 1, CLIENT, SERVER, ITERATIONS, BLOCK);
    let mid_run = wait_served(c, &log, 2, &client);
    let watch = StopWatch::start(pid);
    let to = node_name(c, 2);
    let out = c.dvs(&["migrate", "dc0/1", "--to", &to, "--backend", "criu"]);
    let states = watch.finish();
    let said = printed(&out);
    assert!(
        !out.status.success(),
        "the migration was not refused: {said}"
    );
    for e in expect.iter().chain(&["cannot migrate dc0/1 with criu"]) {
        assert!(said.contains(e), "the refusal does not say {e:?}: {said}");
    }
    assert!(
        !states.iter().any(|s| s == "T" || s == "t"),
        "the server was stopped during the refused migration (states seen: {states:?})"
    );
    assert!(mid_run, "the client ended before the migration was asked");
    let result = client.finish(c);
    assert_client_ok(c, "the client of the refused server", &result, ITERATIONS);
    assert_runs_on(c, SERVER, 0);
    println!(
        "refused as expected: {}",
        said.trim_end().lines().last().unwrap_or("")
    );
}

#[test]
fn a_listener_cannot_move_to_a_node_sharing_this_hosts_network() {
    let _serial = serial();
    if !criu_available("a_listener_cannot_move_to_a_node_sharing_this_hosts_network") {
        return;
    }
    let c = Cluster::start();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    refused_while_serving(
        &c,
        &["--listen-tcp", &format!("0.0.0.0:{port}")],
        &[
            &format!("TCP listener on 0.0.0.0:{port}"),
            "it shares this host's network",
        ],
    );
}

/// Starts the server on node0 mapping a file `name` of `data` in the cluster's folder, waits
/// until it has mapped it, and deletes the file, as a binary upgraded under a running
/// program; returns the file's path and the server's log.
fn serve_a_deleted_file(c: &Cluster, name: &str, data: &[u8]) -> (String, std::path::PathBuf) {
    let file = c.dir().join(name);
    std::fs::write(&file, data).unwrap();
    let path = file.display().to_string();
    start_server_with(c, 0, SERVER, &["--map-file", &path]);
    let log = ep_log(c, 0, SERVER);
    wait_until(
        "the server to map the file",
        || {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("mapped")
                .then_some(())
        },
        || diagnose(c),
    );
    std::fs::remove_file(&file).unwrap();
    (path, log)
}

#[test]
fn a_small_deleted_file_is_copied_with_the_image_and_the_server_moves() {
    let _serial = serial();
    if !criu_available("a_small_deleted_file_is_copied_with_the_image") {
        return;
    }
    let c = Cluster::start();
    // 3 MiB: above criu's own 1 MiB ghost limit, so the plan must raise it.
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 253) as u8 | 1).collect();
    let (_path, log) = serve_a_deleted_file(&c, "scratch.bin", &data);
    let client = ClientRun::start(&c, 1, CLIENT, SERVER, ITERATIONS, BLOCK);
    let mid_run = wait_served(&c, &log, 2, &client);
    let report: Value = migrate(&c, SERVER, 2, Backend::Criu, None);
    let result = client.finish(&c);
    assert_client_ok(&c, "the client of the moved server", &result, ITERATIONS);
    assert!(mid_run, "the client ended before the migration");
    assert_runs_on(&c, SERVER, 2);
    println!(
        "moved with a 3 MiB deleted file: {} ms, image {} bytes",
        report["migration_ms"], report["image_bytes"]
    );
}
