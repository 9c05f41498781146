//! `dvs demo --lab`: the paper's evaluation on a fresh 3-host lab with etcd.
//!
//! The lab's addresses are reachable only inside its namespaces, so this command builds the
//! lab (guarded: it is taken down on error, panic, SIGINT and SIGTERM too) and runs the demo
//! itself on host1 as `dvs demo --lab-inner`, whose output passes through. The inner demo
//! drives the cluster only through the control protocol, which host1's node relays to the
//! others: placements from each node's status, the client's progress and report from its
//! streamed output (`run --wait`), migrations by request.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use dvs_config::ClusterConfig;

use crate::demo::{scenarios, DemoOptions};
use crate::lab::{self, LabGuard, LabState};

/// Node hosts of the demo's lab.
const HOSTS: u16 = 3;

/// A lab name of this process's own (`dvs lab` names: lower-case letters and digits).
pub fn lab_name(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id())
}

/// Builds a fresh lab of [`HOSTS`] node hosts and etcd named PREFIX+pid, runs `f` on it and
/// always takes it down (also on error, panic, SIGINT or SIGTERM). Call it before any other
/// thread starts (see [`LabGuard::new`]).
pub fn with_lab(
    prefix: &str,
    f: impl FnOnce(&mut LabState) -> Result<ExitCode>,
) -> Result<ExitCode> {
    let name = lab_name(prefix);
    let guard = LabGuard::new()?;
    let mut lab = guard.up(&name, HOSTS)?;
    let r = f(&mut lab);
    drop(guard);
    r
}

/// Runs `dvs ARGS` on host1 of `lab`, its output passed through; whether it succeeded.
pub fn dvs_on_host1(lab: &LabState, args: &[String]) -> Result<ExitCode> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let status = lab::cli_on(lab.host("host1")?, &args)?
        .stdin(std::process::Stdio::null())
        .status()
        .with_context(|| format!("cannot run `dvs {}` on host1", args.join(" ")))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A bench's `--lab` mode: a fresh lab named PREFIX+pid, `dvs bench BENCH --lab-inner
/// ARGS [--json]` on its host1 with its output passed through, the lab taken down.
pub fn bench_on_lab(prefix: &str, bench: &str, args: &[String], json: bool) -> Result<ExitCode> {
    let mut all: Vec<String> = vec!["bench".into(), bench.into(), "--lab-inner".into()];
    all.extend_from_slice(args);
    if json {
        all.push("--json".into());
    }
    crate::helpers::progress("starting a 3-host lab with etcd");
    with_lab(prefix, |lab| {
        crate::helpers::progress(&format!("lab {} up; the bench runs on host1", lab.name));
        dvs_on_host1(lab, &all)
    })
}

/// `dvs demo --lab`: builds the lab, runs the demo on host1, takes the lab down.
pub fn demo_lab(o: &DemoOptions) -> Result<ExitCode> {
    let t0 = Instant::now();
    println!(
        "== starting a {HOSTS}-host lab {} with etcd (`dvs lab up`)",
        lab_name("demo")
    );
    let code = with_lab("demo", |lab| run_demo(lab, o, t0))?;
    println!(
        "lab {} taken down ({:.1} s in all)",
        lab_name("demo"),
        t0.elapsed().as_secs_f64()
    );
    Ok(code)
}

fn run_demo(lab: &LabState, o: &DemoOptions, t0: Instant) -> Result<ExitCode> {
    let name = &lab.name;
    for h in &lab.hosts {
        println!(
            "   {:<6} {:<15} {}",
            h.name,
            h.addr.to_string(),
            h.node.as_deref().unwrap_or("etcd, client-cert TLS")
        );
    }
    println!(
        "   lab up in {:.1} s; the demo runs on host1 (`dvs lab exec --name {name} host1 -- dvs demo --lab-inner`)",
        t0.elapsed().as_secs_f64()
    );
    let mut args = vec![
        "demo".to_string(),
        "--lab-inner".into(),
        "--runs".into(),
        o.runs.to_string(),
        "--iterations".into(),
        o.iterations.to_string(),
        "--block-size".into(),
        o.block_size.clone(),
    ];
    if let Some(b) = &o.backend {
        args.extend(["--backend".into(), b.clone()]);
    }
    dvs_on_host1(lab, &args)
}

/// `dvs demo --lab-inner`: the demo on the running cluster `cfg` (a lab's, from inside one
/// of its hosts). Leaves the cluster running: the lab's owner takes it down.
pub fn inner(cfg: &ClusterConfig, path: &Path, o: &DemoOptions) -> Result<ExitCode> {
    let t0 = Instant::now();
    let place = format!(
        "on a {}-host lab with etcd: one node kernel per simulated host (own network and mount \
         namespaces, links over a bridge), etcd over client-cert TLS as the directory",
        cfg.nodes.len()
    );
    let r = scenarios(cfg, o, t0, Some(&place));
    println!("\n== dvs status");
    let _ = crate::status::status(cfg, path, false);
    println!();
    r
}
