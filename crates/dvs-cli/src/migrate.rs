//! `dvs migrate` and `dvs doctor`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use dvs_config::ClusterConfig;
use dvs_node::ctl::{CtlClient, CtlRequest, CtlResponse, MigrationSummary};
use dvs_wire::peer::{Backend, FailAt};

use crate::helpers::{find_node, node_name, node_status, parse_target};

/// Options of `dvs migrate`.
pub struct MigrateOptions<'a> {
    /// `DC/EP`, DC by id or name.
    pub target: &'a str,
    /// Destination node, by id or name.
    pub to: &'a str,
    /// `criu` or `cooperative`.
    pub backend: Option<String>,
    /// Phase to fail on purpose.
    pub fail_at: Option<String>,
    /// Longest wait for quiescence.
    pub quiesce_ms: Option<u64>,
    /// JSON output.
    pub json: bool,
}

/// Runs one migration and returns its summary (progress lines go to `progress`).
pub fn run_migration(
    cfg: &ClusterConfig,
    o: &MigrateOptions,
    progress: &mut dyn Write,
) -> Result<MigrationSummary> {
    let (dc, ep) = parse_target(cfg, o.target)?;
    let backend: Option<Backend> = o
        .backend
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: String| anyhow!("--backend: {e}"))?;
    let fail_at: Option<FailAt> = o
        .fail_at
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: String| anyhow!("--fail-at: {e}"))?;
    let dcc = cfg.dc_by_id(dc).expect("resolved");
    let to = find_node(cfg, o.to)?;
    if !cfg.dc_nodes(dcc).contains(&to.id) {
        bail!(
            "node {} is not part of DC {} (it spans nodes {:?})",
            to.name,
            dcc.name,
            cfg.dc_nodes(dcc)
        );
    }
    // The migration is coordinated by the node the endpoint runs on.
    let source = cfg
        .nodes
        .iter()
        .find(|n| {
            node_status(n).is_ok_and(|s| {
                s.endpoints
                    .iter()
                    .any(|e| e.dc == dc && e.ep == ep && e.state == "RUNNING")
            })
        })
        .ok_or_else(|| {
            anyhow!(
                "endpoint {}/{ep} is not running on any node (see `dvs status`)",
                dcc.name
            )
        })?;
    let mut c = CtlClient::connect(&source.ctl_socket())?;
    c.set_timeout(Some(Duration::from_secs(60)))?;
    let r = c.call(&CtlRequest::Migrate {
        dc,
        ep,
        to: to.id,
        backend,
        fail_at,
        quiesce_ms: o.quiesce_ms,
    })?;
    let CtlResponse::Accepted { backend, note, .. } = r else {
        bail!("unexpected answer: {r:?}")
    };
    if let Some(n) = note {
        writeln!(progress, "note: {n}")?;
    }
    writeln!(
        progress,
        "migrating {}/{ep}: {} -> {} (backend {backend})",
        dcc.name, source.name, to.name
    )?;
    loop {
        match c.recv().context("migration")? {
            CtlResponse::MigrPhase { phase, at_ms } => {
                writeln!(progress, "  {at_ms:8.1} ms  {phase}")?
            }
            CtlResponse::Migrated(s) => return Ok(s),
            other => bail!("unexpected answer: {other:?}"),
        }
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

/// `dvs migrate`.
pub fn migrate(cfg: &ClusterConfig, o: &MigrateOptions) -> Result<ExitCode> {
    let mut sink = std::io::sink();
    let mut out = std::io::stdout();
    let progress: &mut dyn Write = if o.json { &mut sink } else { &mut out };
    let s = run_migration(cfg, o, progress)?;
    let expected = s.committed == o.fail_at.is_none();
    if o.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(if expected {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let name = |id: u16| node_name(cfg, id);
    if s.committed {
        println!(
            "committed: {}/{} now runs on {} ({:.1} ms from START to COMMIT)",
            s.dc,
            s.ep,
            name(s.to),
            s.migration_ms
        );
    } else {
        println!(
            "rolled back: {}/{} still runs on {} ({:.1} ms): {}",
            s.dc,
            s.ep,
            name(s.from),
            s.migration_ms,
            s.error.clone().unwrap_or_default()
        );
    }
    println!("  {:<11} {:>9}", "phase", "ms");
    for p in &s.phases {
        println!("  {:<11} {:>9.2}", p.phase, p.ms);
    }
    let rate = if s.transfer_ms > 0.0 {
        format!(" ({:.0} MB/s)", s.image_bytes as f64 / 1e3 / s.transfer_ms)
    } else {
        String::new()
    };
    println!(
        "  image {}, received in {:.2} ms{rate}, restored in {:.2} ms; {} calls/notifications held and replayed",
        mb(s.image_bytes),
        s.transfer_ms,
        s.restore_ms,
        s.held
    );
    Ok(if expected {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `dvs doctor`: which checkpoint backends work on this machine, and on each running node.
pub fn doctor(cfg: Option<&ClusterConfig>) -> Result<ExitCode> {
    let root = nix::unistd::Uid::effective().is_root();
    println!("{:<14} {:<4} detail", "check", "ok");
    println!(
        "{:<14} {:<4} {}",
        "root",
        yes(root),
        if root {
            "running as root"
        } else {
            "criu needs root (or CAP_CHECKPOINT_RESTORE + CAP_SYS_PTRACE)"
        }
    );
    let unshare = std::process::Command::new("unshare")
        .arg("--version")
        .output()
        .is_ok();
    println!(
        "{:<14} {:<4} {}",
        "unshare",
        yes(unshare),
        if unshare {
            "util-linux unshare found (PID namespaces for migratable processes)"
        } else {
            "unshare not found: install util-linux"
        }
    );
    let criu = dvs_checkpoint::Criu::locate()
        .map_err(|e| e.to_string())
        .and_then(|c| match c.check() {
            Ok(v) => Ok((c, v)),
            Err(e) => Err(e.to_string()),
        });
    match criu {
        Ok((c, v)) => println!(
            "{:<14} {:<4} criu {v} at {} passes `criu check`",
            "criu backend",
            "yes",
            c.bin().display()
        ),
        Err(e) => println!(
            "{:<14} {:<4} {e}; run scripts/install-criu.sh",
            "criu backend", "no"
        ),
    }
    println!("{:<14} {:<4} always: programs that register m3ipc snapshot/restore hooks, started with `dvs run`", "cooperative", "yes");
    if let Some(cfg) = cfg {
        for n in &cfg.nodes {
            let Ok(mut c) = CtlClient::connect(&n.ctl_socket()) else {
                continue;
            };
            if let Ok(CtlResponse::Doctor { checks }) = c.call(&CtlRequest::Doctor) {
                for ch in checks {
                    println!(
                        "{:<14} {:<4} {}: {}",
                        format!("{} {}", n.name, ch.name),
                        yes(ch.ok),
                        n.name,
                        ch.detail
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
