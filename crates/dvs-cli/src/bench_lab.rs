//! `dvs bench migration --lab`: the migration bench on a fresh 3-host lab with etcd beside
//! the same bench on a single-machine cluster with the embedded directory, measured in the
//! same run in alternating blocks (so that both see the same machine noise).
//!
//! The lab is reachable only inside its namespaces, so the bench runs on host1 (`--lab-inner`):
//! there it starts its single-machine cluster on the host's loopback, keeps the lab's
//! cluster from DVS_CONFIG, and drives both with the same harness.

use std::process::ExitCode;

use anyhow::{bail, Result};
use dvs_config::ClusterConfig;
use m3ipc::Ep;
use serde::Serialize;

use crate::bench::{cpu_model, loadavg};
use crate::bench_migration::{
    one_run, summarize, BackendReport, MigrationOptions, BENCH_BASE_PORT, BENCH_BLOCK,
    BENCH_ITERATIONS,
};
use crate::harness::{bytes_text, criu_on, with_cluster, Harness, Sample, EP_SERVER};
use crate::helpers::progress;

/// Migrations per block; the two clusters take turns block by block.
const BLOCK_RUNS: u32 = 5;
/// The target: lab+etcd migration median at most this times the single-machine one.
const LAB_FACTOR: f64 = 1.3;

/// One backend on both clusters.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    /// `criu` or `cooperative`.
    pub backend: String,
    /// Single machine, loopback, embedded directory.
    pub local: BackendReport,
    /// 3-host lab, bridge, etcd over TLS.
    pub lab: BackendReport,
    /// Median migration time on the lab / on the single machine.
    pub ratio: f64,
}

/// The report of `dvs bench migration --lab`.
#[derive(Debug, Clone, Serialize)]
pub struct LabReport {
    /// How the run was set up.
    pub method: String,
    /// CPUs, model.
    pub machine: String,
    /// /proc/loadavg before and after.
    pub loadavg_before: String,
    /// /proc/loadavg after.
    pub loadavg_after: String,
    /// Why criu was not measured, if it was not.
    pub criu_unavailable: Option<String>,
    /// Per backend.
    pub pairs: Vec<Pair>,
}

/// `dvs bench migration --lab`: a fresh lab, the bench on its host1, the lab taken down.
pub fn migration_lab(o: &MigrationOptions) -> Result<ExitCode> {
    if o.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut args = vec![
        "--runs".to_string(),
        o.runs.to_string(),
        "--ballast-mb".into(),
        o.ballast_mb.to_string(),
    ];
    if let Some(b) = &o.backend {
        args.extend(["--backend".into(), b.clone()]);
    }
    crate::demo_lab::bench_on_lab("bench", "migration", &args, o.json)
}

/// `dvs bench migration --lab-inner`: on a lab host, with the lab's cluster `lab`.
pub fn migration_inner(lab: &ClusterConfig, o: &MigrationOptions) -> Result<ExitCode> {
    let before = loadavg();
    let dir = std::env::temp_dir().join(format!("dvs-bench-migration-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    progress(&format!(
        "starting a 3-node single-machine cluster (embedded directory) under {} on this host",
        dir.display()
    ));
    let (pairs, criu_unavailable) = with_cluster(&dir, 3, BENCH_BASE_PORT, true, |local| {
        let (criu_ok, detail) = criu_on(lab, &lab.nodes[0]);
        let wanted: Vec<&str> = match o.backend.as_deref() {
            Some(b) => vec![b],
            None if criu_ok => vec!["criu", "cooperative"],
            None => vec!["cooperative"],
        };
        let mut pairs = Vec::new();
        for (i, b) in wanted.iter().enumerate() {
            pairs.push(pair(local, lab, b, EP_SERVER + 2 * i as Ep, o)?);
        }
        Ok((pairs, (!criu_ok).then_some(detail)))
    })?;
    let report = LabReport {
        method: format!(
            "per backend, {} migrations of migr-server --ballast-mb {} on each cluster, taking \
             turns in blocks of {BLOCK_RUNS}: the server moves between the first two nodes, a \
             migr-client run ({BENCH_ITERATIONS} iterations of {BENCH_BLOCK} bytes) on the third \
             loads it; single machine = 3 node kernels on one host's loopback with the embedded \
             directory; lab = 3 simulated hosts (own network and mount namespaces, veths on a \
             bridge) with etcd over client-cert TLS; both driven from host1",
            o.runs, o.ballast_mb
        ),
        machine: format!(
            "{} CPUs ({})",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model()
        ),
        loadavg_before: before,
        loadavg_after: loadavg(),
        criu_unavailable,
        pairs,
    };
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// `o.runs` migrations of `backend` on each cluster, alternating in blocks.
fn pair(
    local: &ClusterConfig,
    lab: &ClusterConfig,
    backend: &str,
    ep: Ep,
    o: &MigrationOptions,
) -> Result<Pair> {
    let mut hs = Vec::new();
    for cfg in [local, lab] {
        let mut h = Harness::new(cfg, ep, BENCH_ITERATIONS, BENCH_BLOCK)?;
        h.backend = Some(backend.to_string());
        h.ballast_mb = o.ballast_mb;
        h.start_server(cfg.nodes[0].id)?;
        hs.push(h);
    }
    progress(&format!(
        "{backend}: {} migrations on each cluster, in blocks of {BLOCK_RUNS}",
        o.runs
    ));
    let labels = [format!("{backend}/local"), format!("{backend}/lab")];
    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    let mut block = 0;
    while samples[1].len() < o.runs as usize {
        let order = if block % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            for _ in 0..BLOCK_RUNS {
                let i = samples[side].len() as u32;
                if i >= o.runs {
                    break;
                }
                let s = one_run(&mut hs[side], &labels[side], i, o.runs)?;
                samples[side].push(s);
            }
        }
        block += 1;
    }
    let [l, b] = samples;
    let local_r = summarize(local, backend, l);
    let lab_r = summarize(lab, backend, b);
    let ratio = lab_r.migration_ms.median / local_r.migration_ms.median;
    Ok(Pair {
        backend: backend.to_string(),
        local: local_r,
        lab: lab_r,
        ratio,
    })
}

fn print(r: &LabReport) {
    println!();
    println!("dvs bench migration --lab");
    println!("  {}", r.method);
    println!(
        "  {}, {}",
        r.machine,
        load_text(&r.loadavg_before, &r.loadavg_after)
    );
    if let Some(why) = &r.criu_unavailable {
        println!("  criu not measured: {why}");
    }
    println!();
    let row = |a: &str, b: &str, c: &str, d: &str, e: &str, f: &str, g: &str| {
        println!("{a:<12} {b:<22} {c:>4}  {d:>18}  {e:>18}  {f:>9}  {g:>16}")
    };
    row(
        "backend",
        "cluster",
        "runs",
        "migration ms",
        "client stall ms",
        "image",
        "transfer ms",
    );
    row(
        "",
        "",
        "",
        "median / p95",
        "median / p95",
        "",
        "median / p95",
    );
    for p in &r.pairs {
        for (what, b) in [
            ("1 machine, embedded", &p.local),
            ("3-host lab, etcd", &p.lab),
        ] {
            row(
                &p.backend,
                what,
                &b.runs.to_string(),
                &format!("{:.1} / {:.1}", b.migration_ms.median, b.migration_ms.p95),
                &format!("{:.1} / {:.1}", b.stall_ms.median, b.stall_ms.p95),
                &bytes_text(b.image_bytes),
                &format!("{:.2} / {:.2}", b.transfer_ms.median, b.transfer_ms.p95),
            );
        }
    }
    println!();
    for p in &r.pairs {
        for (what, b) in [("1 machine", &p.local), ("lab", &p.lab)] {
            let phases: Vec<String> = b
                .phases_ms
                .iter()
                .map(|(p, ms)| format!("{p} {ms:.2}"))
                .collect();
            println!(
                "{} on {what}, phases (median ms): {}",
                p.backend,
                phases.join(", ")
            );
        }
    }
    println!();
    for p in &r.pairs {
        println!(
            "target: {} migration on the lab with etcd <= {LAB_FACTOR}x the single machine's (median): {:.2}x {}",
            p.backend,
            p.ratio,
            if p.ratio <= LAB_FACTOR { "PASS" } else { "MISS" }
        );
    }
    let v: Vec<String> = r
        .pairs
        .iter()
        .flat_map(|p| {
            [("1 machine", &p.local), ("lab", &p.lab)]
                .into_iter()
                .flat_map(move |(w, b)| {
                    b.violations
                        .iter()
                        .map(move |v| format!("{} on {w}: {v}", p.backend))
                })
        })
        .collect();
    let n: usize = r.pairs.iter().map(|p| p.local.runs + p.lab.runs).sum();
    if v.is_empty() {
        println!("correctness: {n} migrations under load, every client iteration ok (none lost, duplicated or corrupt)");
    } else {
        println!("correctness: {} violations", v.len());
        for x in v {
            println!("  {x}");
        }
    }
}

/// `load BEFORE before / AFTER after`, with a warning when either 1-minute figure says the
/// machine was busy.
pub fn load_text(before: &str, after: &str) -> String {
    let warning = if busy(before) || busy(after) {
        " (1-minute load above 0.5: figures may be noisy)"
    } else {
        ""
    };
    format!("load {before} before / {after} after{warning}")
}

/// Whether a load average line's 1-minute figure is above 0.5.
pub fn busy(l: &str) -> bool {
    l.split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .is_some_and(|v| v > 0.5)
}
