//! `dvs lab`: a real dvs cluster on simulated hosts that share nothing (a network and a
//! mount namespace each), with a real etcd over TLS, real criu and real TLS links.
//!
//! The paper's client and server run on two hosts; the server is migrated to a third and
//! back with criu and with the cooperative backend, once rolled back on purpose, and the
//! client checks its 1000 blocks every time. Then `dvs lab down` must leave no namespace,
//! process, mount or file behind.
//!
//! Needs root (namespaces), `etcd` (scripts/install-etcd.sh) and criu 4.2 or later
//! (scripts/install-criu.sh); `DVS_SKIP_CRIU=1` leaves out the criu migrations. Without
//! namespaces the test fails, saying so: a lab that cannot be built is no pass.
//!
//! Nothing here talks to the lab's addresses from the root namespace: on this machine such
//! an address routes out of the machine. Every command that talks to the lab runs inside it
//! through `dvs lab exec`.

mod common;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::lab::*;
use serde_json::Value;

/// Iterations of each client run.
const ITERATIONS: u32 = 1000;
/// The endpoint of the server moved with criu. A server restored by criu cannot then move
/// cooperatively (its node did not launch it, so it has no command line to restart it
/// with), so the cooperative moves use a server of their own.
const SERVER_CRIU: i32 = 1;
/// The endpoint of the server moved cooperatively.
const SERVER_COOP: i32 = 2;

/// One client run on host 2 against server `server`, with one migration of the server to
/// `to` (made to fail at `fail_at`) once it has served part of the run. Returns where the
/// server runs afterwards.
fn migrate_under_load(
    lab: &Lab,
    server_ep: i32,
    from: u16,
    to: u16,
    backend: &str,
    fail_at: Option<&str>,
    client_ep: i32,
) -> u16 {
    let what = format!("{backend} node{from} -> node{to} (fail at {fail_at:?})");
    let base = lab.served(server_ep);
    let client_run = start_client(lab, client_ep, server_ep, ITERATIONS, 10_000);
    // Migrate once 200 requests of this run are served, so that the client is mid-run.
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab.served(server_ep) < base + 200 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let mid_run = lab.served(server_ep) < base + ITERATIONS as u64;
    let target = format!("dc0/{server_ep}");
    let to_name = format!("node{to}");
    let mut args = vec![
        "migrate",
        &target,
        "--to",
        &to_name,
        "--backend",
        backend,
        "--json",
    ];
    if let Some(p) = fail_at {
        args.extend(["--fail-at", p]);
    }
    let migrated = run_bounded(&mut lab.dvs_on(from, &args), Duration::from_secs(60));
    let report: Value = serde_json::from_slice(&migrated.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: no migration report ({e}): {}{}",
            text(&migrated.stdout),
            text(&migrated.stderr)
        )
    });
    let out = wait_bounded(client_run, Duration::from_secs(90), "the client");
    let json = client_report(&out, &what);
    println!(
        "{what}: committed {}, {:.1} ms, client ok {} lost {} duplicated {} corrupt {}, mid-run {mid_run}",
        report["committed"], report["migration_ms"].as_f64().unwrap_or(0.0),
        json["ok"], json["lost"], json["duplicated"], json["corrupt"]
    );
    assert_eq!(
        report["committed"],
        fail_at.is_none(),
        "{what}: unexpected outcome: {report}"
    );
    assert_client_all_ok(&out, ITERATIONS, &what);
    assert!(
        mid_run,
        "{what}: the client ended before the migration started"
    );
    let now = if fail_at.is_none() { to } else { from };
    assert_eq!(
        lab.server_node(server_ep, 3),
        Some(now),
        "{what}: the server is not where it should be"
    );
    now
}

#[test]
fn lab_runs_a_cluster_on_hosts_that_share_nothing() {
    let criu = criu_wanted();
    let lab = Lab::up(3);
    let st = lab.status();
    let hosts = st["hosts"].as_array().expect("hosts");
    assert_eq!(hosts.len(), 4, "3 node hosts and etcd: {st}");
    for h in hosts {
        assert_eq!(h["running"], true, "{h}");
        if h["node"].is_string() {
            assert_eq!(h["links_up"], 2, "links of {h}");
        }
    }
    // The root namespace has no address and no route on the lab's network.
    let net = st["network"].as_str().expect("network");
    let prefix = net.trim_end_matches("0/24");
    for what in [["-4", "addr"], ["-4", "route"]] {
        let out = ok(
            run_bounded(Command::new("ip").args(what), Duration::from_secs(10)),
            "ip",
        );
        assert!(
            !text(&out.stdout).contains(prefix),
            "{what:?}: {}",
            text(&out.stdout)
        );
    }
    // Each host sees only its own files: its config, its own key, its own runtime folder.
    let out = ok(
        lab.exec(
            "host1",
            &["ls", "/var/lib/dvs/tls", "/run/dvs"],
            Duration::from_secs(10),
        ),
        "ls",
    );
    let listing = text(&out.stdout);
    assert!(
        listing.contains("node1.key") && listing.contains("node1\n"),
        "{listing}"
    );
    assert!(
        !listing.contains("node2") && !listing.contains("ca.key"),
        "{listing}"
    );
    let out = ok(
        lab.exec("host2", &["hostname"], Duration::from_secs(10)),
        "hostname",
    );
    assert_eq!(text(&out.stdout).trim(), "host2");
    // Every node sees its links up, asked on its own host.
    for n in 1..=3u16 {
        let out = run_bounded(
            &mut lab.dvs_on(n, &["status", "--json"]),
            Duration::from_secs(30),
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        let me = v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|x| x["name"] == format!("node{n}"))
            .expect("the host's node");
        let links = me["status"]["links"].as_array().expect("links");
        assert_eq!(links.len(), 2);
        assert!(links.iter().all(|l| l["up"] == true), "node{n}: {me}");
    }

    // The servers on host 1, the clients on host 2, the servers moved to host 3 and back.
    let mut plan: Vec<(i32, &str, u16, Option<&str>)> = Vec::new();
    if criu {
        plan.extend([
            (SERVER_CRIU, "criu", 3, None),
            (SERVER_CRIU, "criu", 1, None),
            (SERVER_CRIU, "criu", 3, Some("restore")),
        ]);
    }
    plan.extend([
        (SERVER_COOP, "cooperative", 3, None),
        (SERVER_COOP, "cooperative", 1, None),
    ]);
    if !criu {
        plan.push((SERVER_COOP, "cooperative", 3, Some("restore")));
    }
    let server = example_bin("migr-server");
    let mut servers: Vec<i32> = plan.iter().map(|p| p.0).collect();
    servers.dedup();
    for ep in servers {
        let ep_text = ep.to_string();
        let args = [
            "run",
            "--dc",
            "dc0",
            "--ep",
            &ep_text,
            "--node",
            "node1",
            "--",
            &server,
            "--ballast-mb",
            "2",
        ];
        ok(
            run_bounded(&mut lab.dvs_on(1, &args), Duration::from_secs(30)),
            "dvs run migr-server",
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while lab.server_node(ep, 3) != Some(1) {
            assert!(
                Instant::now() < deadline,
                "migr-server {ep} did not come up on node1"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
    // Where each server runs (indexed by its endpoint); each client run takes a new endpoint.
    let mut at = [0, 1, 1];
    for (client_ep, (server_ep, backend, to, fail_at)) in (10..).zip(plan) {
        let from = at[server_ep as usize];
        at[server_ep as usize] =
            migrate_under_load(&lab, server_ep, from, to, backend, fail_at, client_ep);
    }

    // Down leaves nothing behind, and a second down is no error.
    let traces = Traces::of(&lab);
    ok(dvs(&["lab", "down", "--name", &lab.name]), "lab down");
    traces.assert_gone();
    ok(
        dvs(&["lab", "down", "--name", &lab.name]),
        "a second lab down",
    );
    let out = dvs(&["lab", "exec", "--name", &lab.name, "host1", "--", "true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no lab"),
        "{}",
        text(&out.stderr)
    );
}
