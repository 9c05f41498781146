//! A criu migration's preflight across simulated hosts (`dvs lab`): a server listening on
//! its host's own address is refused before it stops (the destination host lacks that
//! address), and a server listening on every address (0.0.0.0) moves with its listener,
//! which answers on the destination host afterwards.
//!
//! Needs root, namespaces, etcd and criu 4.2 (see `lab.rs`); `DVS_SKIP_CRIU=1` skips.

mod common;

use std::time::Duration;

use common::lab::*;

/// The lab address of the host that runs node `n`.
fn host_addr(lab: &Lab, n: u16) -> String {
    let host = host_of(lab, n);
    host["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address for node{n}'s host: {host}"))
        .to_string()
}

/// Starts `migr-server ARGS` as dc0/`ep` on node1 and waits until node1 runs it.
fn start_server(lab: &Lab, ep: i32, args: &[&str]) {
    let server = example_bin("migr-server");
    let mut cmd = vec![server.as_str()];
    cmd.extend_from_slice(args);
    run_on_node1(lab, ep, None, &cmd);
}

/// The first line a TCP connection to `addr:port` reads, from host `n`.
fn tcp_line(lab: &Lab, n: u16, addr: &str, port: u16) -> String {
    let script = format!("exec 3<>/dev/tcp/{addr}/{port} && head -n 1 <&3");
    let out = lab.exec(
        &format!("host{n}"),
        &["bash", "-c", &script],
        Duration::from_secs(20),
    );
    text(&out.stdout).trim().to_string()
}

#[test]
fn lab_preflight_refuses_a_host_address_and_moves_a_wildcard_listener() {
    if !criu_wanted() {
        return;
    }
    let lab = Lab::up(3);
    let addr1 = host_addr(&lab, 1);

    // Bound to host1's own address: host2 does not have it.
    start_server(&lab, 1, &["--listen-tcp", &format!("{addr1}:7101")]);
    let out = run_bounded(
        &mut lab.dvs_on(
            1,
            &["migrate", "dc0/1", "--to", "node2", "--backend", "criu"],
        ),
        Duration::from_secs(60),
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "not refused: {said}");
    for e in [
        "cannot migrate dc0/1 with criu",
        &format!("TCP listener on {addr1}:7101"),
        "an address node2 does not have",
    ] {
        assert!(said.contains(e), "the refusal does not say {e:?}: {said}");
    }
    assert_eq!(lab.server_node(1, 3), Some(1), "the refused server moved");
    assert!(
        tcp_line(&lab, 1, &addr1, 7101).starts_with("migr-server "),
        "the refused server's listener does not answer on host1"
    );

    // On every address: it moves, and answers on host2 afterwards.
    start_server(&lab, 2, &["--listen-tcp", "0.0.0.0:7102"]);
    assert!(tcp_line(&lab, 1, "127.0.0.1", 7102).starts_with("migr-server "));
    let report = migrate_json(&lab, 1, "dc0/2", "node2", Duration::from_secs(60));
    assert_eq!(report["committed"], true, "{report}");
    assert_eq!(lab.server_node(2, 3), Some(2));
    let line = tcp_line(&lab, 2, "127.0.0.1", 7102);
    assert!(
        line.starts_with("migr-server "),
        "the moved listener does not answer on host2: {line:?}"
    );
    println!(
        "listener moved host1 -> host2 in {} ms; host2 answers {line:?}",
        report["migration_ms"]
    );
}
