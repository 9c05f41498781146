//! Node kernels on the etcd directory (a real etcd started by the test): IPC, registrations
//! and a criu migration through etcd; garbage written into the directory by hand; a brief
//! etcd outage; an etcd that cannot be reached at start.

mod common;

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::examples::{criu_available, example_bin};
use common::{eventually, Cluster, CALL_TIMEOUT, DVS, PATIENCE};
use dvs_directory::Directory;
use m3ipc::{Endpoint, Message, Source};
use serde_json::Value;

fn on_etcd(etcd: &Etcd) -> Cluster {
    let dir = etcd.directory_config();
    Cluster::start_with(move |cfg| cfg.directory = dir)
}

/// Serves `n` sendrecs on `server` (answering with the request's word 0 plus one) in a thread.
fn serve(mut server: Endpoint, n: usize) -> thread::JoinHandle<Endpoint> {
    thread::spawn(move || {
        for _ in 0..n {
            let m = server
                .receive_timeout(Source::Any, CALL_TIMEOUT)
                .expect("server receives");
            let mut r = Message::new(2);
            r.set_word(0, m.word(0) + 1);
            server.reply(m.source, &r).expect("server replies");
        }
        server
    })
}

fn call(client: &mut Endpoint, server: m3ipc::Ep, x: u64) {
    let mut m = Message::new(1);
    m.set_word(0, x);
    let r = client
        .sendrec_timeout(server, &m, CALL_TIMEOUT)
        .unwrap_or_else(|e| panic!("sendrec {x} to {server}: {e}"));
    assert_eq!(r.word(0), x + 1);
}

/// The directory value of `key` (under the cluster's prefix), read straight from etcd.
fn etcd_value(etcd: &Etcd, c: &Cluster, key: &str) -> Option<String> {
    let prefix = dvs_config::default_etcd_prefix(&c.cfg.cluster_id);
    let client = etcd.client(&prefix);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(client.get(key))
        .expect("read etcd")
        .map(|v| v.value)
}

fn etcd_put(etcd: &Etcd, c: &Cluster, key: &str, value: &str) {
    let prefix = dvs_config::default_etcd_prefix(&c.cfg.cluster_id);
    let client = etcd.client(&prefix);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let current = rt.block_on(client.get(key)).expect("read etcd");
    rt.block_on(client.cas(key, current.map(|v| v.version), Some(value.into())))
        .expect("write etcd");
}

#[test]
fn a_cluster_on_etcd_serves_ipc_and_migrates() {
    let etcd = Etcd::start();
    let c = on_etcd(&etcd);
    // Local and remote sendrec, resolved through etcd.
    let server = serve(c.bind(1, 10), 2);
    let mut remote = c.bind(0, 11);
    let mut local = c.bind(1, 12);
    call(&mut remote, 10, 1);
    call(&mut local, 10, 2);
    let _server = server.join().expect("server thread");
    assert_eq!(etcd_value(&etcd, &c, "ep/0/10").as_deref(), Some("1"));
    let regs = Cluster::registrations(&c.status(), 0, 10);
    assert!(
        regs.iter().any(|(n, s)| *n == 0 && s == "REMOTE"),
        "node0 does not know where dc0/10 runs: {regs:?}"
    );

    if !criu_available("a_cluster_on_etcd_serves_ipc_and_migrates") {
        return;
    }
    let server = example_bin("migr-server").display().to_string();
    let out = c.dvs(&[
        "run", "--dc", "dc0", "--ep", "1", "--node", "node1", "--", &server,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("migr-server registered in etcd", || {
        (etcd_value(&etcd, &c, "ep/0/1").as_deref() == Some("1")).then_some(())
    });
    let out = c.dvs(&[
        "migrate",
        "dc0/1",
        "--to",
        "node2",
        "--backend",
        "criu",
        "--json",
    ]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "migrate printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(report["committed"], true, "{report}");
    // The new location is written after the decision, off the migration's path.
    eventually("ep/0/1 naming node2 in etcd", || {
        (etcd_value(&etcd, &c, "ep/0/1").as_deref() == Some("2")).then_some(())
    });
    let record = etcd_value(&etcd, &c, "migr/0/1").expect("the migration record");
    assert!(record.contains("state=committed"), "{record}");
}

#[test]
fn garbage_in_the_directory_is_named_and_the_nodes_keep_serving() {
    let etcd = Etcd::start();
    let c = on_etcd(&etcd);
    etcd_put(&etcd, &c, "ep/0/20", "not-a-node");
    etcd_put(&etcd, &c, "migr/0/21", "garbage");
    eventually("every node to log the bad ep/ entry", || {
        (0..3)
            .all(|n| {
                let log = std::fs::read_to_string(c.node(n).runtime_dir.join("node.log"))
                    .unwrap_or_default();
                log.contains("ep/0/20") && log.contains("migr/0/21")
            })
            .then_some(())
    });
    // The nodes still serve, and the bad entry routes nothing: a call to dc0/20 is refused
    // as to an endpoint that does not run anywhere.
    let server = serve(c.bind(2, 22), 1);
    let mut client = c.bind(0, 23);
    call(&mut client, 22, 5);
    server.join().unwrap();
    let e = client.sendrec_timeout(20, &Message::new(1), m3ipc::Timeout::Millis(300));
    assert!(
        e.is_err(),
        "a call to the garbage entry was answered: {e:?}"
    );
    assert!(Cluster::all_links_up(&c.status()));
}

#[test]
fn ipc_goes_on_while_etcd_is_briefly_away() {
    let etcd = Etcd::start();
    let c = on_etcd(&etcd);
    let server = serve(c.bind(1, 30), 20);
    let mut remote = c.bind(0, 31);
    call(&mut remote, 30, 0);
    etcd.freeze(true);
    // Calls between endpoints the nodes know need no directory write.
    for i in 1..20 {
        call(&mut remote, 30, i);
    }
    let started = Instant::now();
    // A bind needs a directory write: it waits for etcd, or fails clearly; it never hangs.
    let bind = thread::spawn({
        let sock = c.node(2).ipc_socket();
        move || Endpoint::bind_at(sock, 0, 32)
    });
    thread::sleep(Duration::from_millis(1500));
    etcd.freeze(false);
    let bound = bind.join().expect("bind thread");
    assert!(started.elapsed() < PATIENCE);
    server.join().unwrap();
    // Once etcd is back, a new endpoint is bound and found by the other nodes.
    let mut late = match bound {
        Ok(ep) => ep,
        Err(_) => c.bind(2, 32),
    };
    let server = thread::spawn(move || {
        let m = late.receive_timeout(Source::Any, CALL_TIMEOUT).unwrap();
        late.reply(m.source, &m).unwrap();
    });
    let r = remote.sendrec_timeout(32, &Message::new(9), CALL_TIMEOUT);
    assert_eq!(r.expect("call after the outage").mtype, 9);
    server.join().unwrap();
}

#[test]
fn a_node_names_the_etcd_it_cannot_reach() {
    // A one-node cluster whose directory is a port where no etcd listens.
    let dir = tempfile::Builder::new()
        .prefix("dvs-it-")
        .tempdir_in("/tmp")
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = dvs_config::ClusterConfig::local(dir.path(), 1, port);
    cfg.link.tls = false;
    cfg.directory = dvs_config::DirectoryConfig::Etcd {
        endpoints: vec!["http://127.0.0.1:9".into()],
        prefix: String::new(),
        dial_timeout_ms: 500,
        request_timeout_ms: 1000,
        tls: None,
    };
    let path = dir.path().join("unreachable.toml");
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let mut child = Command::new(DVS)
        .arg("--config")
        .arg(&path)
        .args(["node", "--node", "node0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the node neither started nor failed within {PATIENCE:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("127.0.0.1:9"),
        "the error does not name the etcd endpoint: {err}"
    );
}
