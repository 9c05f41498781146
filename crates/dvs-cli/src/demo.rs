//! `dvs demo`: the README's main job, the paper's evaluation on a local cluster.
//!
//! Starts a 3-node cluster, starts `migr-server` (with the ballast that gives its checkpoint
//! image the paper's 2.5 MB) and runs the paper's three scenarios and a rollback, `--runs`
//! times each: a `migr-client` does `--iterations` sendrec + vcopy round trips against the
//! server while the server migrates, and every client run is checked (no iteration lost,
//! duplicated or corrupt, the server's counter continuing across runs). Prints the figures
//! beside the paper's published ones, shows `dvs status` and always stops the cluster.
//! `dvs demo --lab` runs the same on a lab (see `crate::demo_lab`).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use dvs_config::ClusterConfig;
use dvs_node::ctl::MigrationReport;

use crate::harness::{
    bytes_text, criu_on, phase_medians, stall_stats, with_cluster, Harness, Sample, Stats,
    BALLAST_MB, EP_SERVER,
};

/// Options of `dvs demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Runs per scenario.
    pub runs: u32,
    /// Client iterations per run.
    pub iterations: u32,
    /// Bytes the server copies into the client per iteration.
    pub block_size: String,
    /// `criu` or `cooperative`; default: criu when it works, else cooperative.
    pub backend: Option<String>,
}

/// One scenario of the paper.
#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    /// The server moves from a remote node to the client's node.
    RemoteToClient,
    /// The server moves from the client's node to a remote node.
    ClientToRemote,
    /// The server moves from a remote node to another remote node.
    RemoteToRemote,
    /// A migration made to fail, which must roll back.
    Rollback,
}

impl Scenario {
    const ALL: [Scenario; 4] = [
        Scenario::RemoteToClient,
        Scenario::ClientToRemote,
        Scenario::RemoteToRemote,
        Scenario::Rollback,
    ];

    fn label(self) -> &'static str {
        match self {
            Scenario::RemoteToClient => "1 remote -> client's node",
            Scenario::ClientToRemote => "2 client's node -> remote",
            Scenario::RemoteToRemote => "3 remote -> other remote",
            Scenario::Rollback => "rollback (failed migration)",
        }
    }

    /// The paper's published migration time (mean, sd) and transfer time, in milliseconds.
    fn paper(self) -> Option<(f64, f64, f64)> {
        match self {
            Scenario::RemoteToClient => Some((1738.0, 77.0, 450.0)),
            Scenario::ClientToRemote => Some((1598.0, 311.0, 684.0)),
            Scenario::RemoteToRemote => Some((1983.0, 218.0, 471.0)),
            Scenario::Rollback => None,
        }
    }

    /// Client node and destination for run `i` when the server runs on `s` (`nodes` in
    /// cluster order), and the phase made to fail.
    fn placement(self, nodes: &[u16], s: u16, i: u32) -> (u16, u16, Option<&'static str>) {
        // The other nodes, starting after `s`, so that runs rotate over the nodes.
        let at = nodes.iter().position(|&n| n == s).unwrap_or(0);
        let others: Vec<u16> = (1..nodes.len())
            .map(|k| nodes[(at + k) % nodes.len()])
            .collect();
        match self {
            Scenario::RemoteToClient => (others[0], others[0], None),
            Scenario::ClientToRemote => (s, others[0], None),
            Scenario::RemoteToRemote => (others[0], others[1], None),
            Scenario::Rollback => {
                // Every shape with every failing phase: (shape, phase) over 9 runs.
                let fail = ["checkpoint", "transfer", "restore"][(i % 3) as usize];
                let (c, t, _) = [
                    Scenario::RemoteToClient,
                    Scenario::ClientToRemote,
                    Scenario::RemoteToRemote,
                ][((i / 3) % 3) as usize]
                    .placement(nodes, s, i);
                (c, t, Some(fail))
            }
        }
    }
}

/// Refuses options that make no demo.
pub fn check(o: &DemoOptions) -> Result<()> {
    if o.runs == 0 || o.iterations == 0 {
        bail!("--runs and --iterations must be at least 1");
    }
    Ok(())
}

/// Runs the demo under `dir/demo` and always stops its cluster.
pub fn demo(dir: &Path, o: &DemoOptions) -> Result<ExitCode> {
    check(o)?;
    let dir = dir.join("demo");
    let t0 = Instant::now();
    println!("== starting a 3-node cluster under {}", dir.display());
    let out = with_cluster(&dir, 3, 7400, false, |cfg| {
        let r = scenarios(cfg, o, t0, None);
        println!("\n== dvs status");
        let _ = crate::status::status(cfg, &dir.join("cluster.toml"), false);
        println!();
        r
    });
    println!(
        "cluster stopped; logs under {} ({:.1} s in all)",
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    out
}

/// Runs the scenarios on the running cluster `cfg` and prints the table; `place` says where
/// the cluster runs, when that is not one machine's loopback.
pub fn scenarios(
    cfg: &ClusterConfig,
    o: &DemoOptions,
    t0: Instant,
    place: Option<&str>,
) -> Result<ExitCode> {
    for n in &cfg.nodes {
        println!("   {} (id {}) peer {}", n.name, n.id, n.peer_addr);
    }
    let (criu_ok, detail) = criu_on(cfg, &cfg.nodes[0]);
    let backend = match o.backend.as_deref() {
        Some(b) => {
            println!("== backend {b} (forced with --backend)");
            b.to_string()
        }
        None if criu_ok => {
            println!("== backend criu (transparent checkpoint/restore): {detail}");
            "criu".into()
        }
        None => {
            println!("== backend cooperative: criu does not work here ({detail})");
            "cooperative".into()
        }
    };
    let mut h = Harness::new(cfg, EP_SERVER, o.iterations, &o.block_size)?;
    h.backend = Some(backend.clone());
    let nodes: Vec<u16> = cfg.nodes.iter().map(|n| n.id).collect();
    h.start_server(nodes[0])?;
    println!(
        "== migr-server --ballast-mb {BALLAST_MB} as dc0/{EP_SERVER} on {}; each run: migr-client ({} iterations of {} bytes) on a node, the server migrates mid-run",
        cfg.nodes[0].name, o.iterations, o.block_size
    );
    let mut all: Vec<(Scenario, Vec<Sample>)> = Vec::new();
    for sc in Scenario::ALL {
        println!("\n== scenario {}", sc.label());
        let mut samples = Vec::new();
        for i in 0..o.runs {
            let s = match h.server_node() {
                Some(s) => s,
                None => {
                    println!(
                        "   migr-server is gone: starting it again on {}",
                        cfg.nodes[0].name
                    );
                    h.start_server(nodes[0])?;
                    nodes[0]
                }
            };
            let (client, to, fail) = sc.placement(&nodes, s, i);
            let x = h.run_once(client, to, fail)?;
            print_run(sc, i, o, &x);
            samples.push(x);
        }
        all.push((sc, samples));
    }
    print_table(&backend, &all, place);
    let violations: Vec<String> = all
        .iter()
        .flat_map(|(sc, v)| {
            v.iter().enumerate().flat_map(move |(i, s)| {
                s.violations
                    .iter()
                    .map(move |x| format!("{} run {}: {x}", sc.label(), i + 1))
            })
        })
        .collect();
    let runs: usize = all.iter().map(|(_, v)| v.len()).sum();
    let iterations: u64 = all
        .iter()
        .flat_map(|(_, v)| v.iter().filter_map(|s| s.client.as_ref().map(|c| c.ok)))
        .sum();
    println!();
    if violations.is_empty() {
        println!(
            "correctness: {runs} migrations under load ({} rolled back on purpose), {iterations} client iterations all ok: none lost, duplicated or corrupt ({:.1} s)",
            all.iter().filter(|(sc, _)| *sc == Scenario::Rollback).map(|(_, v)| v.len()).sum::<usize>(),
            t0.elapsed().as_secs_f64()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "correctness: {} VIOLATIONS in {runs} runs:",
            violations.len()
        );
        for v in &violations {
            println!("  {v}");
        }
        Ok(ExitCode::FAILURE)
    }
}

fn print_run(sc: Scenario, i: u32, o: &DemoOptions, s: &Sample) {
    let runs = o.runs;
    let m = s.summary.as_ref();
    let what = match (&s.fail_at, m) {
        (Some(f), Some(m)) if !m.committed => {
            format!("fail at {f:<10} rolled back in {:>6.1} ms", m.migration_ms)
        }
        (_, Some(m)) if m.committed => format!(
            "migration {:>6.1} ms (transfer {:>5.2} ms, {})",
            m.migration_ms,
            m.transfer_ms,
            bytes_text(m.image_bytes)
        ),
        (_, Some(m)) => format!("rolled back in {:.1} ms", m.migration_ms),
        (_, None) => "migration failed".into(),
    };
    let arrow = if s.fail_at.is_some() { "-x>" } else { "->" };
    let stall = s.client.as_ref().map_or("stall     ? ms".into(), |c| {
        format!("stall {:>6.1} ms", c.max_stall_ms)
    });
    let verdict = match &s.client {
        Some(c) if s.violations.is_empty() => format!("{}/{} ok", c.ok, o.iterations),
        _ => format!("VIOLATION: {}", s.violations.join("; ")),
    };
    let note = if s.mid_run {
        ""
    } else {
        " (the client had ended before the migration: stall not counted)"
    };
    println!(
        "   {:<27} run {:>2}/{runs}  {} {arrow} {} (client {})  {what}  {stall}  {verdict}{note}",
        sc.label(),
        i + 1,
        s.from,
        s.to,
        s.client_node,
    );
    let _ = std::io::stdout().flush();
}

fn print_table(backend: &str, all: &[(Scenario, Vec<Sample>)], place: Option<&str>) {
    println!("\n== results ({backend} backend) beside the paper's (3 VMs on a 2012 desktop, DMTCP, ssh transfer)");
    if let Some(place) = place {
        println!("   ran {place}");
    }
    println!(
        "{:<28} {:-^40}   {:-^31}   {:-^14}   {:>16}",
        "", " migration (ms) ", " image transfer (ms) ", " image (MB) ", "client stall (ms)"
    );
    println!(
        "{:<28} {:>16} {:>14} {:>8}   {:>13} {:>8} {:>8}   {:>7} {:>6}   {:>16}",
        "scenario",
        "dvs",
        "paper",
        "speed-up",
        "dvs",
        "paper",
        "speed-up",
        "dvs",
        "paper",
        "dvs, max per run"
    );
    let mut committed_all: Vec<&MigrationReport> = Vec::new();
    for (sc, samples) in all {
        let ms: Vec<&MigrationReport> = samples
            .iter()
            .filter_map(|s| s.summary.as_ref())
            .filter(|m| m.committed != (*sc == Scenario::Rollback))
            .collect();
        if *sc != Scenario::Rollback {
            committed_all.extend(ms.iter().copied());
        }
        let mig = Stats::of(&ms.iter().map(|m| m.migration_ms).collect::<Vec<_>>());
        // A rollback made to fail before the transfer moved nothing: count only real ones.
        let xfer = Stats::of(
            &ms.iter()
                .filter(|m| m.transfer_ms > 0.0)
                .map(|m| m.transfer_ms)
                .collect::<Vec<_>>(),
        );
        let image = Stats::of(
            &ms.iter()
                .filter(|m| m.image_bytes > 0)
                .map(|m| m.image_bytes as f64 / 1e6)
                .collect::<Vec<_>>(),
        );
        let stall = stall_stats(samples);
        let (paper_mig, mig_x, paper_xfer, xfer_x) = match sc.paper() {
            Some((m, sd, t)) => (
                format!("{m:.0} ± {sd:.0}"),
                speedup(m, mig.mean, mig.n),
                format!("{t:.0}"),
                speedup(t, xfer.mean, xfer.n),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<28} {:>16} {:>14} {:>8}   {:>13} {:>8} {:>8}   {:>7} {:>6}   {:>16}",
            sc.label(),
            ms_pm(&mig, 1),
            paper_mig,
            mig_x,
            ms_pm(&xfer, 2),
            paper_xfer,
            xfer_x,
            if image.n == 0 {
                "-".into()
            } else if image.mean < 0.005 {
                // A cooperative snapshot: a few bytes.
                format!("{:.0} B", image.mean * 1e6)
            } else {
                format!("{:.2}", image.mean)
            },
            if sc.paper().is_some() { "2.5" } else { "-" },
            ms_pm(&stall, 1),
        );
    }
    println!("(mean ± sd over the runs; migration = START -> COMMIT, for the rollback START -> ROLLBACK;");
    println!(
        " transfer = image received at the destination; the paper did not publish client stalls)"
    );
    let phases: Vec<String> = phase_medians(&committed_all)
        .iter()
        .map(|(p, ms)| format!("{p} {ms:.2}"))
        .collect();
    if !phases.is_empty() {
        println!(
            "phases of the committed migrations (median ms): {}",
            phases.join(", ")
        );
    }
}

fn ms_pm(s: &Stats, prec: usize) -> String {
    if s.n == 0 {
        return "-".into();
    }
    format!("{:.prec$} ± {:.prec$}", s.mean, s.sd)
}

fn speedup(paper: f64, ours: f64, n: usize) -> String {
    if n == 0 || ours <= 0.0 {
        return "-".into();
    }
    format!("{:.0}x", paper / ours)
}
