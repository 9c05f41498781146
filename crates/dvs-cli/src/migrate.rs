//! `dvs migrate` and `dvs doctor`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use dvs_config::{ClusterConfig, DcConfig, NodeConfig};
use dvs_directory::keys;
use dvs_node::ctl::{CtlRequest, CtlResponse, MigrationReport};
use dvs_wire::peer::{Backend, FailAt};
use dvs_wire::{Ep, NodeId};

use crate::helpers::{ctl_connect, directory_get, find_node, node_name, parse_target, running_on};

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
) -> Result<MigrationReport> {
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
    let source = source_node(cfg, dcc, ep, progress)?.ok_or_else(|| {
        anyhow!(
            "endpoint {}/{ep} is not running on any node (see `dvs status`)",
            dcc.name
        )
    })?;
    let mut c = ctl_connect(cfg, source, Duration::from_secs(60)).with_context(|| {
        format!(
            "endpoint {}/{ep} runs on node {}, which does not answer",
            dcc.name, source.name
        )
    })?;
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

/// The node that runs `{dc, ep}`: the one the cluster directory names (`ep/{dc}/{ep}`, the
/// key the node kernels keep). When the directory cannot be read, the node that reports the
/// endpoint RUNNING: a member of the config's admin group may use the nodes' sockets without
/// being able to read the directory's private folder.
fn source_node<'a>(
    cfg: &'a ClusterConfig,
    dc: &DcConfig,
    ep: Ep,
    progress: &mut dyn Write,
) -> Result<Option<&'a NodeConfig>> {
    let key = keys::endpoint_key(dc.id, ep);
    let entry = match directory_get(cfg, &key) {
        Ok(entry) => entry,
        Err(e) => {
            writeln!(progress, "note: {e:#}; asking every node instead")?;
            return Ok(running_on(cfg, dc.id, ep));
        }
    };
    let Some(entry) = entry else {
        return Ok(None);
    };
    let id: NodeId = entry.value.parse().map_err(|_| {
        anyhow!(
            "the cluster directory's entry {key} is {:?}, not a node id",
            entry.value
        )
    })?;
    let node = cfg.node_by_id(id).ok_or_else(|| {
        anyhow!(
            "the cluster directory says endpoint {}/{ep} runs on node {id} ({key}), \
             but the cluster config has no node {id}",
            dc.name
        )
    })?;
    Ok(Some(node))
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
    println!(
        "  process frozen {:.2} ms; the longest-held call waited {:.2} ms",
        s.frozen_ms, s.longest_hold_ms
    );
    Ok(if expected {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Starts `true` the way a node starts an endpoint's program (pid 1 of a new PID namespace)
/// and waits for it.
fn pid_namespace_check() -> Result<(), String> {
    let null = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map(std::os::fd::OwnedFd::from)
            .map_err(|e| format!("cannot open /dev/null: {e}"))
    };
    let cmd = dvs_checkpoint::PidNsCommand {
        program: "true".into(),
        args: Vec::new(),
        env: Vec::new(),
        cwd: "/".into(),
        stdout: null()?,
        stderr: null()?,
        umask: 0o022,
    };
    let child = dvs_checkpoint::spawn_pid_ns_init(&cmd).map_err(|e| e.to_string())?;
    match dvs_checkpoint::wait_pidfd(&child.pidfd) {
        Some(dvs_checkpoint::ExitKind::Code(0)) => Ok(()),
        other => Err(format!("`true` ended with {other:?}")),
    }
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
    let pidns = pid_namespace_check();
    println!(
        "{:<14} {:<4} {}",
        "pid namespace",
        yes(pidns.is_ok()),
        match &pidns {
            Ok(()) => "a program starts as pid 1 of a PID namespace of its own".to_string(),
            Err(e) => format!("cannot start a program in a PID namespace of its own: {e}"),
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
            let Ok(mut c) = ctl_connect(cfg, n, Duration::from_secs(30)) else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use dvs_config::DirectoryConfig;

    /// A 3-node config under `dir` (no node runs) whose directory holds `entries`.
    fn config_with(dir: &std::path::Path, entries: &[(String, &str)]) -> ClusterConfig {
        let cfg = ClusterConfig::local(dir, 3, 7400);
        let d = dvs_directory::open(&cfg.directory).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for (k, v) in entries {
            rt.block_on(d.cas(k, None, Some(v.to_string()))).unwrap();
        }
        cfg
    }

    fn lookup(cfg: &ClusterConfig, ep: Ep) -> (Result<Option<String>>, String) {
        let mut progress = Vec::new();
        let r = source_node(cfg, &cfg.dcs[0], ep, &mut progress).map(|n| n.map(|n| n.name.clone()));
        (r, String::from_utf8(progress).unwrap())
    }

    #[test]
    fn the_source_is_the_node_the_directory_names() {
        let t = tempfile::tempdir().unwrap();
        let cfg = config_with(
            t.path(),
            &[
                (keys::endpoint_key(0, 1), "1"),
                (keys::endpoint_key(0, 2), "42"),
                (keys::endpoint_key(0, 3), "node1"),
            ],
        );
        let (r, progress) = lookup(&cfg, 1);
        assert_eq!(r.unwrap().as_deref(), Some("node1"));
        assert_eq!(progress, "");
        // No entry: not running anywhere.
        assert_eq!(lookup(&cfg, 4).0.unwrap(), None);
        let e = lookup(&cfg, 2).0.unwrap_err().to_string();
        assert!(
            e.contains("dc0/2 runs on node 42") && e.contains("no node 42"),
            "{e}"
        );
        let e = lookup(&cfg, 3).0.unwrap_err().to_string();
        assert!(e.contains("not a node id"), "{e}");
    }

    #[test]
    fn an_unreadable_directory_falls_back_to_asking_the_nodes() {
        let t = tempfile::tempdir().unwrap();
        let mut cfg = config_with(t.path(), &[(keys::endpoint_key(0, 1), "1")]);
        let not_a_folder = t.path().join("file");
        std::fs::write(&not_a_folder, "").unwrap();
        cfg.directory = DirectoryConfig::Embedded { path: not_a_folder };
        let (r, progress) = lookup(&cfg, 1);
        // No node runs, so none reports it.
        assert_eq!(r.unwrap(), None);
        assert!(progress.contains("asking every node instead"), "{progress}");
    }
}
