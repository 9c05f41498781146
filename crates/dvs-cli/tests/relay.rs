//! The CLI acts on the whole cluster through the node of its own host: `status`, `ps`, `run`
//! and `migrate` for a node whose control socket is not on this host are relayed by the
//! local node over its (authenticated) peer link.
//!
//! The cluster runs on one machine, so the other host's view is made with a copy of the
//! config in which the other nodes' runtime folders do not exist (exactly what a host that
//! shares no file sees); `DVS_NODE` names the local node.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::examples::{criu_available, example_bin};
use common::{eventually, Cluster, DVS};
use dvs_config::ClusterConfig;
use serde_json::Value;

/// The config as seen from the host of `local`: every other node's runtime folder is
/// elsewhere (absent here).
fn host_view(c: &Cluster, local: u16) -> PathBuf {
    let mut cfg: ClusterConfig = c.cfg.clone();
    for n in &mut cfg.nodes {
        if n.id != local {
            n.runtime_dir = PathBuf::from(format!("/nonexistent/dvs-other-host/{}", n.name));
        }
    }
    let path = c.dir().join(format!("host-of-node{local}.toml"));
    std::fs::write(&path, cfg.to_toml()).expect("write the host's config");
    path
}

/// Runs `dvs ARGS` on the host of node `local`.
fn dvs_on(c: &Cluster, local: u16, args: &[&str]) -> Output {
    let config = host_view(c, local);
    Command::new(DVS)
        .arg("--config")
        .arg(&config)
        .args(args)
        .env("DVS_NODE", c.node(local).name.clone())
        .stdin(Stdio::null())
        .output()
        .expect("cannot run dvs")
}

fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn status_on(c: &Cluster, local: u16) -> Value {
    let out = dvs_on(c, local, &["status", "--json"]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("dvs status --json printed no JSON ({e}): {}", printed(&out)))
}

/// Where `dvs status` (seen from node `local`'s host) says dc0/`ep` runs.
fn running_on(c: &Cluster, local: u16, ep: i64) -> Vec<u64> {
    let s = status_on(c, local);
    s["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| {
            n["status"]["endpoints"].as_array().is_some_and(|e| {
                e.iter()
                    .any(|e| e["dc"] == 0 && e["ep"] == ep && e["state"] == "RUNNING")
            })
        })
        .map(|n| n["id"].as_u64().expect("id"))
        .collect()
}

#[test]
fn every_command_reaches_other_hosts_through_the_local_node() {
    let c = Cluster::start();
    // status: every node answers, with its own pid, through node0.
    let s = status_on(&c, 0);
    for n in s["nodes"].as_array().expect("nodes") {
        assert_eq!(n["reachable"], true, "node unreachable through node0: {n}");
        assert_eq!(n["status"]["node"], n["id"], "{n}");
    }
    let pids: Vec<&Value> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["status"]["pid"])
        .collect();
    assert!(pids[0] != pids[1] && pids[1] != pids[2], "{pids:?}");

    // run --wait on node2, from node0's host: its output and exit status come back.
    let out = dvs_on(
        &c,
        0,
        &[
            "run",
            "--dc",
            "dc0",
            "--ep",
            "7",
            "--node",
            "node2",
            "--wait",
            "--",
            "/bin/sh",
            "-c",
            "echo relayed-output; exit 3",
        ],
    );
    assert!(
        printed(&out).contains("relayed-output"),
        "the program's output did not come back: {}",
        printed(&out)
    );
    assert_eq!(out.status.code(), Some(3), "{}", printed(&out));

    // ps on node1's host shows the program node2 ran.
    let out = dvs_on(&c, 1, &["ps", "--json"]);
    assert!(out.status.success(), "{}", printed(&out));
    assert!(
        printed(&out).contains("relayed-output"),
        "dvs ps from node1's host does not show node2's program: {}",
        printed(&out)
    );
}

#[test]
fn a_migration_is_started_and_followed_from_another_host() {
    if !criu_available("a_migration_is_started_and_followed_from_another_host") {
        return;
    }
    let c = Cluster::start();
    let server = example_bin("migr-server").display().to_string();
    let out = dvs_on(
        &c,
        0,
        &[
            "run", "--dc", "dc0", "--ep", "1", "--node", "node1", "--", &server,
        ],
    );
    assert!(
        out.status.success(),
        "relayed run failed: {}",
        printed(&out)
    );
    eventually("migr-server bound on node1", || {
        (running_on(&c, 0, 1) == [1]).then_some(())
    });
    // From node0's host: the source (node1) and the destination (node2) are both elsewhere.
    let out = dvs_on(
        &c,
        0,
        &[
            "migrate",
            "dc0/1",
            "--to",
            "node2",
            "--backend",
            "criu",
            "--json",
        ],
    );
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("relayed migrate printed no JSON ({e}): {}", printed(&out)));
    assert_eq!(report["committed"], true, "{report}");
    assert!(out.status.success(), "{}", printed(&out));
    assert_eq!(running_on(&c, 0, 1), [2]);
    // And back, asked on the host of the node it now runs on.
    let out = dvs_on(
        &c,
        2,
        &[
            "migrate",
            "dc0/1",
            "--to",
            "node1",
            "--backend",
            "criu",
            "--json",
        ],
    );
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("relayed migrate printed no JSON ({e}): {}", printed(&out)));
    assert_eq!(report["committed"], true, "{report}");
    assert_eq!(running_on(&c, 1, 1), [1]);
}

#[test]
fn a_node_that_refuses_relayed_requests_says_so() {
    let c = Cluster::start_with(|cfg| cfg.access.remote_control = false);
    let out = dvs_on(&c, 0, &["status"]);
    assert!(!out.status.success(), "{}", printed(&out));
    assert!(
        printed(&out).contains("remote_control = false"),
        "the refusal does not name the setting: {}",
        printed(&out)
    );
    // Its own node still answers.
    let s = status_on(&c, 0);
    assert_eq!(s["nodes"][0]["reachable"], true, "{s}");
    // Nothing was run on node1.
    let out = dvs_on(
        &c,
        0,
        &[
            "run",
            "--dc",
            "dc0",
            "--ep",
            "7",
            "--node",
            "node1",
            "--",
            "/bin/true",
        ],
    );
    assert!(!out.status.success(), "{}", printed(&out));
    let out = c.dvs(&["ps", "--json"]);
    assert!(
        !printed(&out).contains("/bin/true"),
        "node1 ran a relayed program: {}",
        printed(&out)
    );
}

#[test]
fn plaintext_clusters_do_not_relay() {
    let c = Cluster::start_with(|cfg| cfg.link.tls = false);
    let out = dvs_on(&c, 0, &["status"]);
    assert!(!out.status.success(), "{}", printed(&out));
    assert!(
        printed(&out).contains("plaintext"),
        "the refusal does not say why: {}",
        printed(&out)
    );
}
