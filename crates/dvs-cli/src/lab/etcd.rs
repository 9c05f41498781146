//! The lab's etcd: one member on the etcd host, TLS only, requiring client certificates of
//! the lab's CA, its data in that host's private `/run`.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

use super::hosts::{self, HOST_STATE};
use super::netns;
use super::provision::{etcd_url, ETCD_CERT, ETCD_PORT};
use crate::helpers::wait_until;

/// The etcd binary: `$DVS_ETCD_BIN`, or `etcd` on `PATH` (scripts/install-etcd.sh).
fn etcd_bin() -> String {
    std::env::var("DVS_ETCD_BIN").unwrap_or_else(|_| "etcd".into())
}

/// Starts etcd in the namespaces of `holder` (listening on `addr`), its log in `log`, and
/// waits until it listens. Returns its pid.
pub fn start(lab: &str, holder: i32, addr: Ipv4Addr, log: &Path) -> Result<i32> {
    let client = etcd_url(addr);
    // The peer URL stays on the host's loopback: a single member talks to no one.
    let peer = "http://127.0.0.1:2380";
    let tls = Path::new(HOST_STATE).join("tls");
    let mut cmd = hosts::enter(holder, etcd_bin());
    cmd.arg("--name")
        .arg(lab)
        .args(["--data-dir", "/run/etcd"])
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", peer])
        .args(["--initial-advertise-peer-urls", peer])
        .arg("--initial-cluster")
        .arg(format!("{lab}={peer}"))
        .arg("--initial-cluster-token")
        .arg(format!("dvs-lab-{lab}"))
        .args(["--initial-cluster-state", "new"])
        .arg("--cert-file")
        .arg(tls.join(format!("{ETCD_CERT}.crt")))
        .arg("--key-file")
        .arg(tls.join(format!("{ETCD_CERT}.key")))
        .arg("--trusted-ca-file")
        .arg(tls.join("ca.crt"))
        .arg("--client-cert-auth")
        .args(["--logger", "zap", "--log-level", "warn"]);
    let pid = hosts::spawn_daemon(cmd, log)?;
    let up = wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
        netns::listening(holder, addr, ETCD_PORT) || !dvs_checkpoint::process_alive(pid)
    });
    if !up || !dvs_checkpoint::process_alive(pid) {
        bail!(
            "etcd did not start listening on {client} within 20 s (log {}): {}",
            log.display(),
            super::log_tail(log, 5)
        );
    }
    Ok(pid)
}
