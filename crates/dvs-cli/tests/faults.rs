//! Failures around real node kernels: a node killed under a waiting client, a process killed
//! while bound, a node restarted (its links come back), bad configs, and the CLI's answers
//! when there is no cluster or a program ends.

mod common;

use std::sync::mpsc;
use std::thread;

use common::{dvs, errno, eventually, Cluster, CALL_TIMEOUT, PATIENCE};
use dvs_config::{ClusterConfig, NodeRef};
use m3ipc::{Endpoint, Errno, Message, Source, Timeout};
use serde_json::Value;

/// Serves `n` sendrec requests on `ep` in a thread, replying with type `mtype`.
fn serve(mut ep: Endpoint, n: usize, mtype: i32) -> thread::JoinHandle<Endpoint> {
    thread::spawn(move || {
        for _ in 0..n {
            let req = ep.receive_timeout(Source::Any, CALL_TIMEOUT).unwrap();
            ep.reply(req.source, &Message::new(mtype)).unwrap();
        }
        ep
    })
}

#[test]
fn killed_peer_node_fails_waiting_and_new_calls() {
    let c = Cluster::start();
    let mut client = c.bind(0, 1);
    let server = c.bind(2, 2);
    let survivor = c.bind(1, 3);

    // The server takes the client's sendrec and never replies.
    let (taken_tx, taken_rx) = mpsc::channel();
    let st = thread::spawn(move || {
        let mut server = server;
        let req = server.receive_timeout(Source::Any, CALL_TIMEOUT);
        taken_tx.send(req.is_ok()).unwrap();
        // Then its node kernel dies under it.
        server.receive_timeout(Source::Any, CALL_TIMEOUT)
    });
    let ct = thread::spawn(move || {
        let r = client.sendrec_timeout(2, &Message::new(1), CALL_TIMEOUT);
        (client, r)
    });
    assert!(
        taken_rx.recv_timeout(PATIENCE).unwrap(),
        "server took the request"
    );
    c.kill_node(2);

    // The waiting client learns it well before its timeout.
    let (mut client, r) = ct.join().unwrap();
    let e = errno(r);
    assert!(
        matches!(e, Errno::NodeUnreachable | Errno::DstDied),
        "client blocked in sendrec to a killed node: {e:?}"
    );
    let r = st.join().unwrap();
    assert!(
        r.as_ref().is_err_and(|e| e.is_connection_error()),
        "the server's connection to its dead node kernel: {r:?}"
    );

    // New calls fail at once (a long timeout that is never reached).
    for (what, r) in [
        (
            "send",
            client.send_timeout(2, &Message::new(1), CALL_TIMEOUT),
        ),
        (
            "sendrec",
            client
                .sendrec_timeout(2, &Message::new(1), CALL_TIMEOUT)
                .map(|_| ()),
        ),
        ("notify", client.notify(2, 1)),
    ] {
        assert_eq!(
            errno(r),
            Errno::NodeUnreachable,
            "{what} after the node died"
        );
    }

    // The rest of the cluster works.
    let t = serve(survivor, 1, 0x33);
    let r = client
        .sendrec_timeout(3, &Message::new(1), CALL_TIMEOUT)
        .unwrap();
    assert_eq!(r.mtype, 0x33);
    t.join().unwrap();

    // Nobody can bind on the dead node; status reports it, and exits non-zero.
    assert!(c.try_bind(2, 0, 4).is_err_and(|e| e.is_connection_error()));
    let out = c.dvs(&["status", "--json"]);
    assert!(!out.status.success(), "status with a dead node must fail");
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["nodes"][2]["reachable"], false);
    eventually("node 0 to see its link to node 2 down", || {
        let s = c.status();
        let links = s["nodes"][0]["status"]["links"].as_array()?.clone();
        links
            .iter()
            .any(|l| l["node"] == 2 && l["up"] == false)
            .then_some(())
    });
}

#[test]
fn links_reconnect_after_a_node_restarts() {
    let c = Cluster::start();
    let before = c.bind(0, 1);
    c.kill_node(2);
    eventually("nodes 0 and 1 to see their links to node 2 down", || {
        let s = c.status();
        let down = |n: usize| {
            s["nodes"][n]["status"]["links"]
                .as_array()
                .is_some_and(|l| l.iter().any(|l| l["node"] == 2 && l["up"] == false))
        };
        (down(0) && down(1)).then_some(())
    });

    c.restart_node(2);
    c.wait_all_links_up();

    // Calls to an endpoint on the restarted node work, from both other nodes.
    let t = serve(c.bind(2, 5), 2, 0x55);
    for (node, ep) in [(0, 6), (1, 7)] {
        let mut client = c.bind(node, ep);
        let r = client
            .sendrec_timeout(5, &Message::new(1), CALL_TIMEOUT)
            .unwrap();
        assert_eq!((r.source, r.mtype), (5, 0x55), "from node {node}");
    }
    t.join().unwrap();

    // And the restarted node reaches an endpoint bound before it restarted.
    let t = serve(before, 1, 0x56);
    let mut from2 = c.bind(2, 8);
    let r = from2
        .sendrec_timeout(1, &Message::new(1), CALL_TIMEOUT)
        .unwrap();
    assert_eq!((r.source, r.mtype), (1, 0x56));
    t.join().unwrap();
}

/// The `dvs ps --json` entry of the process launched as `ep` on node `node`.
fn ps_entry(c: &Cluster, node: &str, ep: i64) -> Option<Value> {
    let out = c.dvs(&["ps", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array()?
        .iter()
        .filter(|n| n["node"] == node)
        .flat_map(|n| n["procs"].as_array().cloned().unwrap_or_default())
        .find(|p| p["ep"] == ep)
}

#[test]
fn process_killed_while_bound_fails_its_clients() {
    let c = Cluster::start();
    let me = std::env::current_exe().unwrap();
    let out = c.dvs(&[
        "run",
        "--dc",
        "dc0",
        "--ep",
        "20",
        "--node",
        "node1",
        "--",
        me.to_str().unwrap(),
        "--exact",
        "child_server",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    assert!(
        out.status.success(),
        "dvs run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the launched server to be bound", || {
        Cluster::registrations(&c.status(), 0, 20)
            .contains(&(1, "RUNNING".to_string()))
            .then_some(())
    });

    // Two clients, one on the server's node and one on another, blocked in sendrec to it.
    let clients: Vec<_> = [(1, 21), (0, 22)]
        .into_iter()
        .map(|(node, ep)| {
            let mut cl = c.bind(node, ep);
            thread::spawn(move || cl.sendrec_timeout(20, &Message::new(1), CALL_TIMEOUT))
        })
        .collect();
    let log = c.node(1).runtime_dir.join("logs").join("dc0-20.log");
    eventually("the server to take both requests", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.contains("took a request from 21") && text.contains("took a request from 22"))
            .then_some(())
    });

    let proc_ = ps_entry(&c, "node1", 20).expect("dvs ps lists the server");
    assert_eq!(proc_["state"], "running");
    let pid = proc_["pid"].as_i64().unwrap() as i32;
    dvs_checkpoint::kill_tree(pid).unwrap();

    for (t, what) in clients.into_iter().zip(["local", "remote"]) {
        assert_eq!(errno(t.join().unwrap()), Errno::DstDied, "{what} client");
    }
    eventually("every node to forget the dead endpoint", || {
        Cluster::registrations(&c.status(), 0, 20)
            .is_empty()
            .then_some(())
    });
    eventually("dvs ps to show the server ended", || {
        (ps_entry(&c, "node1", 20)?["state"] != "running").then_some(())
    });
    // The endpoint number is free again.
    let _again = c.bind(0, 20);
}

/// Not a test: the program `process_killed_while_bound_fails_its_clients` launches with
/// `dvs run` (this test binary, told to run only this function). It binds the endpoint named
/// by the environment, takes requests and never replies.
#[test]
#[ignore = "helper process started through `dvs run` by another test"]
fn child_server() {
    if std::env::var_os(m3ipc::ENV_SOCKET).is_none() {
        return;
    }
    let mut ep = Endpoint::from_env().expect("bind from the environment");
    println!("child_server: bound as endpoint {}", ep.ep());
    loop {
        match ep.receive(Source::Any) {
            Ok(m) => println!("child_server: took a request from {}", m.source),
            Err(e) => {
                println!("child_server: {e}");
                return;
            }
        }
    }
}

#[test]
fn run_wait_returns_the_exit_status() {
    let c = Cluster::start();
    let run = |ep: &str, script: &str| {
        c.dvs(&[
            "run", "--dc", "dc0", "--ep", ep, "--node", "node2", "--wait", "--", "sh", "-c", script,
        ])
    };
    let out = run("30", "echo hello from dvs run; exit 7");
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello from dvs run"));
    let out = run("31", "exit 0");
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // Launching on a node or DC that does not exist is refused.
    let out = c.dvs(&[
        "run", "--dc", "dc9", "--ep", "1", "--node", "node0", "--", "true",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dc9"));
    let out = c.dvs(&[
        "run", "--dc", "dc0", "--ep", "1", "--node", "node7", "--", "true",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("node7"));

    // Once the cluster is down, status fails.
    assert!(c.dvs(&["down"]).status.success());
    let out = c.dvs(&["status"]);
    assert!(
        !out.status.success(),
        "status of a stopped cluster must fail"
    );
}

#[test]
fn status_and_ps_without_a_cluster_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let want = format!("no cluster running under {d}: start one with `dvs up`");
    for cmd in [
        &["status"][..],
        &["status", "--json"],
        &["ps"],
        &["ps", "--json"],
        &["down"],
    ] {
        let mut args = vec!["--dir", d];
        args.extend_from_slice(cmd);
        let out = dvs(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "dvs {cmd:?} without a cluster must fail"
        );
        assert!(err.contains(&want), "dvs {cmd:?}: {err}");
    }
}

#[test]
fn bad_configs_name_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = ClusterConfig::local(dir.path(), 3, 7000);
    let good_text = good.to_toml();
    let mut unknown_node = good.clone();
    unknown_node.dcs[0]
        .nodes
        .push(NodeRef::Name("node7".into()));
    let mut bad_dc_id = good.clone();
    bad_dc_id.dcs[0].nodes.push(NodeRef::Id(9));

    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("garbage", "this is [[ not = = toml".into(), vec!["line 1"]),
        (
            "unknown key",
            format!("bogus_key = 1\n{good_text}"),
            vec!["bogus_key"],
        ),
        (
            "unknown key in a node",
            good_text.replacen("name = \"node0\"", "name = \"node0\"\ncolour = \"red\"", 1),
            vec!["colour"],
        ),
        (
            "bad address",
            good_text.replacen("127.0.0.1:7001", "127.0.0.1:seven", 1),
            vec!["peer_addr"],
        ),
        (
            "dc naming an unknown node",
            unknown_node.to_toml(),
            vec!["dc[0].nodes[3]", "node7"],
        ),
        (
            "dc naming an unknown node id",
            bad_dc_id.to_toml(),
            vec!["dc[0].nodes[3]", "9"],
        ),
        (
            "missing key",
            good_text.replacen("cluster_id", "cluster_name", 1),
            vec!["cluster_id"],
        ),
    ];
    for (i, (what, text, keys)) in cases.iter().enumerate() {
        assert_ne!(text, &good_text, "{what}: the edit must change the config");
        let path = dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let p = path.to_str().unwrap();
        for cmd in [&["status"][..], &["node", "--node", "0"]] {
            let mut args = vec!["--config", p];
            args.extend_from_slice(cmd);
            let out = dvs(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{what}: dvs {cmd:?} must fail");
            assert!(
                err.contains(p),
                "{what}: dvs {cmd:?} must name the file: {err}"
            );
            for k in keys {
                assert!(
                    err.contains(k),
                    "{what}: dvs {cmd:?} must name {k:?}: {err}"
                );
            }
        }
    }
    // The unedited config is fine (status then fails only because no node runs).
    let path = dir.path().join("good.toml");
    std::fs::write(&path, &good_text).unwrap();
    let out = dvs(&["--config", path.to_str().unwrap(), "status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("config "),
        "a good config is not reported: {err}"
    );
}

#[test]
fn receive_from_an_endpoint_of_a_killed_node_fails() {
    let c = Cluster::start();
    let mut r = c.bind(0, 1);
    let _s = c.bind(2, 2);
    r.wait_for_bind(2, CALL_TIMEOUT).unwrap();
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || {
        tx.send(()).unwrap();
        r.receive_timeout(Source::Ep(2), Timeout::Millis(5000))
    });
    rx.recv().unwrap();
    c.kill_node(2);
    let e = errno(t.join().unwrap());
    assert_ne!(
        e,
        Errno::TimedOut,
        "receive from an endpoint of a dead node"
    );
}

#[test]
fn a_node_without_its_tls_files_says_which_and_how_to_make_them() {
    let dir = tempfile::Builder::new()
        .prefix("dvs-it-")
        .tempdir_in("/tmp")
        .unwrap();
    let cfg = ClusterConfig::local(dir.path(), 2, 7050);
    let path = dir.path().join("cluster.toml");
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let p = path.to_str().unwrap();
    let out = dvs(&["--config", p, "node", "--node", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a node without certificates must not start"
    );
    assert!(err.contains("ca.crt"), "names the missing file: {err}");
    assert!(err.contains("dvs tls init"), "says how to make it: {err}");

    // A certificate of another node in this node's place is refused at start too.
    assert!(dvs(&["--config", p, "tls", "init"]).status.success());
    assert!(dvs(&["--config", p, "tls", "issue", "all"])
        .status
        .success());
    let tls = dir.path().join("tls");
    std::fs::copy(tls.join("node1.crt"), tls.join("node0.crt")).unwrap();
    std::fs::copy(tls.join("node1.key"), tls.join("node0.key")).unwrap();
    let out = dvs(&["--config", p, "node", "--node", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("names node 1"), "{err}");
}
