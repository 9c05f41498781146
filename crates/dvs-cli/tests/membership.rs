//! Membership: every node holds a lease in the directory while it runs (`dvs status` shows
//! it), leaves cleanly with `dvs node leave`, is seen gone when killed, fences itself when
//! it cannot renew its lease (a real etcd frozen past the lease), and DCs change the nodes
//! they span at runtime (`dvs dc add-node` / `remove-node`).

mod common;

use std::process::Output;
use std::thread;
use std::time::Duration;

use common::etcd::Etcd;
use common::examples::example_bin;
use common::{errno, eventually, Cluster, CALL_TIMEOUT};
use m3ipc::{Errno, Message, Source};
use serde_json::Value;

fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `member` of node `id` in a `dvs status --json`.
fn member(status: &Value, id: u64) -> Value {
    status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["id"] == id)
        .map(|n| n["member"].clone())
        .unwrap_or(Value::Null)
}

/// The single-letter state of process `pid` (`T` when stopped).
fn proc_state(pid: i64) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')')
        .next()
        .and_then(|s| s.trim().chars().next())
        .unwrap_or('?')
}

#[test]
fn nodes_hold_leases_and_leave_cleanly() {
    let c = Cluster::start();
    eventually("every node alive in the directory", || {
        let s = c.status();
        (0..3)
            .all(|id| member(&s, id)["alive"] == true)
            .then_some(())
    });
    // A node that runs an endpoint does not leave unless forced.
    let _ep = c.bind(1, 5);
    let out = c.dvs(&["node", "leave", "--node", "node1"]);
    assert!(!out.status.success(), "{}", printed(&out));
    assert!(
        printed(&out).contains("0/5") && printed(&out).contains("migrate"),
        "the refusal does not name the endpoint or the way out: {}",
        printed(&out)
    );
    // One that runs none leaves: the others see its lease gone at once, not after it.
    let out = c.dvs(&["node", "leave", "--node", "node2"]);
    assert!(out.status.success(), "{}", printed(&out));
    assert!(
        printed(&out).contains("left the cluster"),
        "{}",
        printed(&out)
    );
    let s = c.status();
    assert_eq!(member(&s, 2)["alive"], false, "{s}");
    assert_eq!(member(&s, 1)["alive"], true, "{s}");
}

#[test]
fn a_killed_node_is_seen_gone_and_a_restarted_one_rejoins() {
    let c = Cluster::start();
    let mut client = c.bind(0, 7);
    let server = c.bind(2, 8);
    c.kill_node(2);
    // New calls to an endpoint of the dead node fail at once with a clear error.
    let e = errno(client.sendrec_timeout(8, &Message::new(1), CALL_TIMEOUT));
    assert!(
        matches!(e, Errno::NodeUnreachable | Errno::DstDied),
        "a call to the dead node's endpoint got {e:?}"
    );
    drop(server);
    // Its lease runs out (2 s): every other node sees it gone.
    eventually("node2's lease to end", || {
        let s = c.status();
        (member(&s, 2)["alive"] == false).then_some(())
    });
    c.restart_node(2);
    c.wait_all_links_up();
    eventually("node2 alive again", || {
        let s = c.status();
        (member(&s, 2)["alive"] == true).then_some(())
    });
    // It serves again.
    let mut again = c.bind(2, 9);
    let t = thread::spawn(move || {
        let m = again.receive_timeout(Source::Any, CALL_TIMEOUT).unwrap();
        again.reply(m.source, &m).unwrap();
    });
    let r = client.sendrec_timeout(9, &Message::new(4), CALL_TIMEOUT);
    assert_eq!(r.expect("call after the rejoin").mtype, 4);
    t.join().unwrap();
}

#[test]
fn a_node_that_loses_its_lease_fences_itself_until_it_holds_one_again() {
    let etcd = Etcd::start();
    let dir = etcd.directory_config();
    let c = Cluster::start_with(move |cfg| cfg.directory = dir);
    let server = example_bin("migr-server").display().to_string();
    let out = c.dvs(&[
        "run", "--dc", "dc0", "--ep", "1", "--node", "node1", "--", &server,
    ]);
    assert!(out.status.success(), "{}", printed(&out));
    let pid = eventually("migr-server running on node1", || {
        let s = c.status();
        s["nodes"][1]["status"]["endpoints"]
            .as_array()?
            .iter()
            .find(|e| e["ep"] == 1 && e["state"] == "RUNNING")
            .and_then(|e| e["pid"].as_i64())
    });
    let mut client = c.bind(0, 20);
    // The directory goes away for longer than a lease: every node fences itself.
    etcd.freeze(true);
    eventually("node1 fenced, its endpoint stopped", || {
        let s = c.status();
        (s["nodes"][1]["status"]["fenced"] == true && proc_state(pid) == 'T').then_some(())
    });
    let s = c.status();
    let links_up = s["nodes"][1]["status"]["links"]
        .as_array()
        .expect("links")
        .iter()
        .any(|l| l["up"] == true);
    assert!(!links_up, "a fenced node kept a link: {s}");
    // A call from another node fails at once instead of reaching the fenced copy.
    let e = errno(client.sendrec_timeout(1, &Message::new(1), m3ipc::Timeout::Millis(3000)));
    assert!(
        matches!(e, Errno::NodeUnreachable | Errno::TimedOut),
        "a call to a fenced endpoint got {e:?}"
    );
    // The directory is back: the node holds a lease, finds the endpoint still its own,
    // resumes it and links again.
    etcd.freeze(false);
    eventually("node1 unfenced and its endpoint running", || {
        let s = c.status();
        (s["nodes"][1]["status"]["fenced"] == false
            && Cluster::all_links_up(&s)
            && proc_state(pid) != 'T')
            .then_some(())
    });
    thread::sleep(Duration::from_millis(100));
    assert_ne!(proc_state(pid), 'T');
}

#[test]
fn dcs_gain_and_lose_nodes_at_runtime() {
    let c = Cluster::start_with(|cfg| {
        let mut dc1 = cfg.dcs[0].clone();
        dc1.id = 1;
        dc1.name = "dc1".into();
        dc1.nodes.truncate(2);
        cfg.dcs.push(dc1);
    });
    // dc1 spans node0 and node1: a bind on node2 is refused.
    assert!(
        c.try_bind(2, 1, 3).is_err(),
        "bound dc1 on a node it does not span"
    );
    let out = c.dvs(&["dc", "add-node", "dc1", "node2"]);
    assert!(out.status.success(), "{}", printed(&out));
    assert!(
        printed(&out).contains("node0, node1, node2"),
        "{}",
        printed(&out)
    );
    let ep = eventually("node2 to accept dc1 binds", || c.try_bind(2, 1, 3).ok());
    // While dc1/3 runs on node2, node2 cannot leave dc1.
    let out = c.dvs(&["dc", "remove-node", "dc1", "node2"]);
    assert!(!out.status.success(), "{}", printed(&out));
    assert!(
        printed(&out).contains("dc1/3"),
        "the refusal does not name the endpoint: {}",
        printed(&out)
    );
    drop(ep);
    eventually("dc1/3 unregistered", || {
        let out = c.dvs(&["dc", "remove-node", "dc1", "node2"]);
        out.status.success().then_some(())
    });
    eventually("node2 to refuse dc1 binds again", || {
        c.try_bind(2, 1, 4).is_err().then_some(())
    });
    let s = c.dvs(&["status"]);
    assert!(
        printed(&s).contains("DC dc1 (id 1) spans node0, node1\n"),
        "{}",
        printed(&s)
    );
}

/// Kills the node kernel it holds when dropped (a node the cluster's `dvs down` does not
/// know, since its config does not name it).
struct Joined(std::process::Child);

impl Drop for Joined {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_node_that_no_config_names_joins_and_leaves_a_running_cluster() {
    let c = Cluster::start();
    // The new host's config: the cluster's, plus itself.
    let mut cfg = c.cfg.clone();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cfg.nodes.push(dvs_config::NodeConfig {
        id: 3,
        name: "node3".into(),
        peer_addr: ([127, 0, 0, 1], port).into(),
        runtime_dir: c.dir().join("node3"),
    });
    let config = c.dir().join("join.toml");
    std::fs::write(&config, cfg.to_toml()).unwrap();
    let config = config.to_str().unwrap().to_owned();
    let out = common::dvs(&["--config", &config, "tls", "issue", "node3"]);
    assert!(out.status.success(), "{}", printed(&out));
    std::fs::create_dir_all(c.dir().join("node3")).unwrap();
    let log = std::fs::File::create(c.dir().join("node3.log")).unwrap();
    let _node3 = Joined(
        std::process::Command::new(common::DVS)
            .args(["--config", &config, "node", "--node", "node3"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // The others learn it from the directory and link to it; the CLI, whose config does not
    // name it either, finds it there too and reaches it through a node of this host.
    eventually("node3 linked to every node", || {
        let s = c.status();
        let n3 = s["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["id"] == 3)?
            .clone();
        (Cluster::all_links_up(&s) && n3["reachable"] == true && n3["member"]["alive"] == true)
            .then_some(())
    });
    let out = c.dvs(&["dc", "add-node", "dc0", "node3"]);
    assert!(out.status.success(), "{}", printed(&out));
    let sock = c.dir().join("node3").join("ipc.sock");
    let mut server = eventually("dc0 to span node3", || {
        m3ipc::Endpoint::bind_at(&sock, 0, 30).ok()
    });
    let t = thread::spawn(move || {
        let m = server.receive_timeout(Source::Any, CALL_TIMEOUT).unwrap();
        server.reply(m.source, &m).unwrap();
        server
    });
    let mut client = c.bind(0, 31);
    let r = client.sendrec_timeout(30, &Message::new(6), CALL_TIMEOUT);
    assert_eq!(r.expect("a call to the joined node").mtype, 6);
    drop(t.join().unwrap());
    // It leaves (asked from another node's host), and the others see it go.
    eventually("dc0/30 unregistered", || {
        let out = c.dvs(&["node", "leave", "--node", "node3"]);
        out.status.success().then_some(())
    });
    // Gone from the directory, it is no node of the cluster any more.
    eventually("node3 gone", || {
        let s = c.status();
        let n3 = s["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["id"] == 3)
            .cloned();
        n3.is_none_or(|n| n["member"]["alive"] == false)
            .then_some(())
    });
    // And the others forget it: no link to it left to redial.
    eventually("node3 forgotten by the others", || {
        let s = c.status();
        let links = s["nodes"][0]["status"]["links"].as_array()?.clone();
        links.iter().all(|l| l["node"] != 3).then_some(())
    });
}
