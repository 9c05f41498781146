//! libm3ipc (the C library) against real clusters: every call and error code from C threads
//! on one node and across nodes, vcopy of 1 B, 64 KiB and 1 MiB, timeouts, bad input that
//! must come back as codes without hurting the node, the codes of full queues, of another
//! DC's endpoints, of a frozen directory and of failing nodes, and C programs talking to Rust
//! ones, also across a criu migration of the server.
//!
//! Where each code comes from C (checked to cover every code by
//! `every_code_is_produced_from_c_or_explained`): [`HEALTHY`] on a healthy cluster,
//! [`LIMITS`] from a DC's queue limit and its isolation, [`DIRECTORY`] while etcd is stopped,
//! [`FAILURES`] from nodes that shut down or die. [`NEVER_FROM_A_NODE`] are the codes no node
//! kernel produces through the C API; `crates/m3ipc-c/tests/every_errno.rs` checks that they
//! (and every other code) still reach C as their values when a node kernel answers them.
//!
//! The C programs (`examples/c`) are compiled here with the system's C compiler against the
//! static library cargo built; the header's layout and constants are checked against the
//! Rust side by `crates/m3ipc-c/tests/header.rs`.

mod clib_support;
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clib_support::{c_program, mixed_run, Lang};
use common::etcd::Etcd;
use common::examples::criu_available;
use common::migr::serial;
use common::{eventually, Cluster, CALL_TIMEOUT};
use m3ipc::{Message, Source};
use m3ipc_c::codes::{lookup, CODES};

/// Runs `m3ipc_test ARGS` to its end (at most a minute) and returns its output, failing the
/// test if it failed or reported a failed check.
fn run_test_program(args: &[&str]) -> String {
    let exe = c_program("m3ipc_test");
    let mut child = Command::new(&exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run m3ipc_test");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("m3ipc_test output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("FAIL"),
        "m3ipc_test {args:?} ({}):\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The codes a call on a healthy cluster produces, from C, on one node (across nodes the
/// same but EDVSDEADLK, which a node detects between its own endpoints only).
const HEALTHY: &[&str] = &[
    "EDVSNOTBIND",
    "EDVSBOUND",
    "EDVSBADDCID",
    "EDVSSLOTUSED",
    "EDVSTIMEDOUT",
    "EDVSFAULT",
    "EDVS2BIG",
    "EDVSPERM",
    "EDVSSELFSEND",
    "EDVSNOTREPLY",
    "EDVSBADSRCDST",
    "EDVSENDPOINT",
    "EDVSINVAL",
    "EDVSDEADLK",
    "EDVSBUSY",
    "EDVSDSTDIED",
    "EDVSSRCDIED",
];

/// A destination's queue at the DC's `max_queue`; an endpoint number bound in another DC.
const LIMITS: &[&str] = &["EDVSNOSPC", "EDVSOTHERDC"];

/// A bind while the directory (etcd) does not answer.
const DIRECTORY: &[&str] = &["EDVSAGAIN"];

/// A node outside the DC, a node shutting down or dead.
const FAILURES: &[&str] = &["EDVSNODCNODE", "EDVSIO", "EDVSNOPROXY"];

/// Codes no node kernel produces through the C API: EDVSSHUTDOWN (a node kernel that shuts
/// down closes its endpoints' connections, which callers see as EDVSIO, and answers no call
/// with a shutdown error) and EDVSGENERIC (a panic inside the library, which no input is
/// known to cause).
const NEVER_FROM_A_NODE: &[&str] = &["EDVSSHUTDOWN", "EDVSGENERIC"];

#[test]
fn every_code_is_produced_from_c_or_explained() {
    let mut listed: Vec<&str> = [HEALTHY, LIMITS, DIRECTORY, FAILURES, NEVER_FROM_A_NODE]
        .concat()
        .to_vec();
    listed.sort();
    let mut all: Vec<&str> = CODES.iter().map(|c| c.name).collect();
    all.sort();
    assert_eq!(listed, all, "each code is in exactly one list");
}

fn sock(c: &Cluster, node: u16) -> String {
    c.node(node).ipc_socket().display().to_string()
}

/// The names of the codes whose check ("ok EDVS...") the output holds.
fn codes_checked(text: &str) -> Vec<&'static str> {
    CODES
        .iter()
        .map(|c| c.name)
        .filter(|n| text.lines().any(|l| l.starts_with(&format!("ok {n}"))))
        .collect()
}

#[test]
fn every_call_and_error_code_on_one_node_and_across_nodes() {
    let c = Cluster::start();
    let local = run_test_program(&["calls", &sock(&c, 0), &sock(&c, 0), "0", "10"]);
    let remote = run_test_program(&["calls", &sock(&c, 0), &sock(&c, 1), "0", "20"]);
    for (what, text) in [("local", &local), ("remote", &remote)] {
        for call in [
            "dvk_open",
            "dvs_bind_at",
            "dvk_wait4bind_T once bound",
            "dvs_wait4bind_T",
            "dvk_getep",
            "dvs_getep values",
            "sendrec reply",
            "dvk_send_T",
            "dvk_receive_T from the server",
            "notify delivered",
            "64-bit notify delivered",
            "vcopy 1 bytes server to client",
            "vcopy 65536 bytes server to client",
            "vcopy 1048576 bytes server to client",
            "vcopy 1 bytes client to server",
            "vcopy 65536 bytes client to server",
            "vcopy 1048576 bytes client to server",
            "server saw the client's vcopy",
            "dvk_unbind",
        ] {
            assert!(
                text.lines().any(|l| l == format!("ok {call}")),
                "{what}: no passed check {call:?} in:\n{text}"
            );
        }
    }
    // Every code a call on a healthy cluster can produce, from C, on one node.
    let mut want = HEALTHY.to_vec();
    want.sort();
    let mut got = codes_checked(&local);
    got.sort();
    assert_eq!(got, want, "codes checked on one node");
    // Across nodes the same, except a deadlock (detected between one node's endpoints).
    want.retain(|n| *n != "EDVSDEADLK");
    let mut got = codes_checked(&remote);
    got.sort();
    assert_eq!(got, want, "codes checked across nodes");
}

#[test]
fn bad_input_is_an_error_code_and_the_node_keeps_serving() {
    let c = Cluster::start();
    let text = run_test_program(&["badinput", &sock(&c, 0), "0", "40"]);
    assert!(text.contains("ok vcopy outside memory"), "{text}");
    // The node is unharmed: a round trip through it and across a link still works.
    let mut server = c.bind(1, 41);
    let t = std::thread::spawn(move || {
        let m = server
            .receive_timeout(Source::Any, CALL_TIMEOUT)
            .expect("receive");
        server
            .reply(m.source, &Message::new(m.mtype + 1))
            .expect("reply");
    });
    let mut client = c.bind(0, 42);
    let rep = client
        .sendrec_timeout(41, &Message::new(7), CALL_TIMEOUT)
        .unwrap();
    assert_eq!(rep.mtype, 8);
    t.join().unwrap();
    assert!(Cluster::all_links_up(&c.status()));
}

/// A running `m3ipc_test block` or `send`, and its output lines.
struct Prog {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Prog {
    fn start(args: &[&str]) -> Prog {
        let mut child = Command::new(c_program("m3ipc_test"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run m3ipc_test");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Prog { child, lines }
    }

    /// The code on its next line starting with `what` (e.g. "receive -306").
    fn code(&self, what: &str) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {what:?} line from m3ipc_test"));
            if let Some(v) = line.strip_prefix(what) {
                return v.trim().parse().expect("a code");
            }
        }
    }
}

impl Drop for Prog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn name(code: i64) -> &'static str {
    lookup(code as i32).map_or("?", |c| c.name)
}

#[test]
fn failing_nodes_give_their_codes() {
    // dc1 spans nodes 0 and 1 only.
    let c = Cluster::start_with(|cfg| {
        let mut dc1 = cfg.dcs[0].clone();
        dc1.id = 1;
        dc1.name = "dc1".into();
        dc1.nodes.truncate(2);
        cfg.dcs.push(dc1);
    });
    let bind = Prog::start(&["bind", &sock(&c, 2), "1", "5"]);
    assert_eq!(name(bind.code("bind")), "EDVSNODCNODE");

    let on1 = Prog::start(&["block", &sock(&c, 1), "0", "30"]);
    assert_eq!(on1.code("bound"), 30);
    let on2 = Prog::start(&["block", &sock(&c, 2), "0", "31"]);
    assert_eq!(on2.code("bound"), 31);

    // Node 1 shuts down in order: it closes its endpoints' connections (it answers no call
    // with EDVSSHUTDOWN).
    let pid1 = c.node_pid(1);
    common::kill(pid1, libc::SIGTERM);
    assert_eq!(name(on1.code("receive")), "EDVSIO");
    eventually("node 1 to exit", || {
        (!dvs_checkpoint::process_alive(pid1)).then_some(())
    });
    let _ = std::fs::remove_file(c.node(1).runtime_dir.join("node.pid"));

    // Node 2 dies: its endpoint loses the connection, callers from elsewhere the node.
    c.kill_node(2);
    assert_eq!(name(on2.code("receive")), "EDVSIO");
    let send = Prog::start(&["send", &sock(&c, 0), "0", "32", "31"]);
    assert_eq!(name(send.code("send")), "EDVSNOPROXY");
}

#[test]
fn a_full_queue_and_an_endpoint_of_another_dc_give_their_codes() {
    // dc0 queues at most 2 messages per endpoint; dc1 spans nodes 0 and 1.
    let c = Cluster::start_with(|cfg| {
        cfg.dcs[0].max_queue = 2;
        let mut dc1 = cfg.dcs[0].clone();
        dc1.id = 1;
        dc1.name = "dc1".into();
        dc1.nodes.truncate(2);
        cfg.dcs.push(dc1);
    });
    let text = run_test_program(&["queuefull", &sock(&c, 0), &sock(&c, 1), "0", "50", "2"]);
    for check in [
        "EDVSNOSPC local send",
        "EDVSNOSPC local sendrec",
        "EDVSNOSPC remote send",
        "send once the queue has room",
    ] {
        assert!(
            text.lines().any(|l| l == format!("ok {check}")),
            "no passed check {check:?} in:\n{text}"
        );
    }

    // Endpoint 7 of dc1 is bound on node 0: to dc0's endpoints there, 7 is another DC's.
    let other = Prog::start(&["block", &sock(&c, 0), "1", "7"]);
    assert_eq!(other.code("bound"), 7);
    let send = Prog::start(&["send", &sock(&c, 0), "0", "60", "7"]);
    assert_eq!(name(send.code("send")), "EDVSOTHERDC");
    // The same number in dc0 is free: bound there, it is another endpoint.
    let bind = Prog::start(&["bind", &sock(&c, 1), "0", "7"]);
    assert_eq!(bind.code("bind"), 7);
}

#[test]
fn a_bind_while_the_directory_is_stopped_gives_edvsagain() {
    let etcd = Etcd::start();
    let dir = etcd.directory_config();
    let c = Cluster::start_with(move |cfg| cfg.directory = dir);
    // A bind writes the directory. With etcd stopped (SIGSTOP) the write gets no answer and
    // the node gives up after the directory's request timeout; etcd continues as soon as
    // the code is there (or when `etcd` drops, if the test fails first).
    etcd.freeze(true);
    let stalled = Prog::start(&["bind", &sock(&c, 1), "0", "9"]);
    let code = stalled.code("bind");
    etcd.freeze(false);
    assert_eq!(name(code), "EDVSAGAIN", "bind with etcd stopped: {code}");
    // With etcd back, binding another endpoint works again.
    let bind = Prog::start(&["bind", &sock(&c, 1), "0", "10"]);
    assert_eq!(bind.code("bind"), 10);
}

#[test]
fn c_client_rust_server() {
    mixed_run(Lang::Rust, Lang::C, false);
}

#[test]
fn rust_client_c_server() {
    mixed_run(Lang::C, Lang::Rust, false);
}

#[test]
fn c_client_c_server() {
    mixed_run(Lang::C, Lang::C, false);
}

#[test]
fn c_client_rust_server_migrated_with_criu() {
    let _turn = serial();
    if criu_available("c_client_rust_server_migrated_with_criu") {
        mixed_run(Lang::Rust, Lang::C, true);
    }
}

#[test]
fn rust_client_c_server_migrated_with_criu() {
    let _turn = serial();
    if criu_available("rust_client_c_server_migrated_with_criu") {
        mixed_run(Lang::C, Lang::Rust, true);
    }
}
