//! Starting and stopping a local cluster, and launching programs on its nodes.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dvs_config::{ClusterConfig, Compression, NodeConfig};
use dvs_node::ctl::{CtlRequest, CtlResponse};

use crate::helpers::{
    ctl_connect, find_dc, find_node, node_status, parse_target, stop_cluster, wait_until,
};

fn free_ports(base: u16, n: u16) -> Result<u16> {
    let mut start = base;
    'search: while start.checked_add(n).is_some() {
        for i in 0..n {
            if TcpListener::bind(("127.0.0.1", start + i)).is_err() {
                start += i + 1;
                continue 'search;
            }
        }
        return Ok(start);
    }
    bail!("no {n} consecutive free ports from {base}")
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// `dvs up`: writes a config for `n` nodes under `dir` and starts them.
pub fn up(dir: &Path, n: u16, base_port: u16, lz4: bool) -> Result<()> {
    let cfg = start(dir, n, base_port, lz4)?;
    let dir = dir.canonicalize()?;
    let config_path = dir.join("cluster.toml");
    println!(
        "cluster {} up: {} nodes under {}",
        cfg.cluster_id,
        n,
        dir.display()
    );
    for node in &cfg.nodes {
        println!(
            "  {} (id {}): peer {}, socket {}, log {}",
            node.name,
            node.id,
            node.peer_addr,
            node.ipc_socket().display(),
            node.runtime_dir.join("node.log").display()
        );
    }
    println!("config: {}", config_path.display());
    for dc in &cfg.dcs {
        println!(
            "DC {} (id {}) spans all nodes, endpoints 0..{}",
            dc.name, dc.id, dc.max_endpoints
        );
    }
    println!("next: `dvs run --dc dc0 --ep 1 --node node0 -- PROGRAM`, `dvs status`, `dvs down`");
    Ok(())
}

/// Writes a config for `n` nodes under `dir` (as `dir/cluster.toml`), starts them and waits
/// until every node answers and every peer link is up. Prints nothing; returns the config.
pub fn start(dir: &Path, n: u16, base_port: u16, lz4: bool) -> Result<ClusterConfig> {
    start_opts(dir, n, base_port, lz4, true)
}

/// [`start`], with mutual TLS on the links or (`tls = false`) in plaintext, for benchmarks
/// that compare the two.
pub fn start_opts(
    dir: &Path,
    n: u16,
    base_port: u16,
    lz4: bool,
    tls: bool,
) -> Result<ClusterConfig> {
    if n == 0 {
        bail!("--nodes must be at least 1");
    }
    // Before reading or writing anything in it: the folder must be this user's alone.
    let dir = crate::cluster_dir::prepare(dir)?;
    let config_path = dir.join("cluster.toml");
    if std::fs::symlink_metadata(&config_path).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!(
            "refusing to use {}: it is a symlink (someone else may have planted it; remove it)",
            config_path.display()
        );
    }
    if config_path.exists() {
        if let Ok(old) = ClusterConfig::load(&config_path) {
            if old.nodes.iter().any(|node| node_status(&old, node).is_ok()) {
                bail!(
                    "a cluster is already running under {}: stop it with `dvs down` first",
                    dir.display()
                );
            }
        }
    }
    let dir = dir.canonicalize()?;
    let port = free_ports(base_port, n)?;
    let mut cfg = ClusterConfig::local(&dir, n, port);
    if lz4 {
        cfg.link.compression = Compression::Lz4;
    }
    cfg.link.tls = tls;
    // A fresh directory: registrations of an earlier cluster under this folder are stale.
    let _ = std::fs::remove_dir_all(dir.join("directory"));
    let config_path = crate::cluster_dir::write_file(&dir, "cluster.toml", &cfg.to_toml())?;
    crate::tls::provision_local(&cfg)?;
    let exe = std::env::current_exe().context("cannot find the dvs executable")?;
    for node in &cfg.nodes {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&node.runtime_dir)
            .with_context(|| format!("cannot create {}", node.runtime_dir.display()))?;
        let log_path = node.runtime_dir.join("node.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("--config")
            .arg(&config_path)
            .arg("node")
            .arg("--node")
            .arg(node.id.to_string());
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Own session: the nodes outlive this command and the terminal's signals.
        cmd.process_group(0);
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        cmd.spawn()
            .with_context(|| format!("cannot start node {}", node.name))?;
    }
    // Wait until every node answers and every link is up.
    let ready = wait_until(Duration::from_secs(15), Duration::from_millis(20), || {
        cfg.nodes
            .iter()
            .all(|n| node_status(&cfg, n).is_ok_and(|s| s.links.iter().all(|l| l.up)))
    });
    if !ready {
        let mut msg = String::from("the cluster did not come up within 15 s:");
        for node in &cfg.nodes {
            match node_status(&cfg, node) {
                Ok(s) => {
                    let down: Vec<String> = s
                        .links
                        .iter()
                        .filter(|l| !l.up)
                        .map(|l| {
                            format!("{} ({})", l.name, l.last_error.clone().unwrap_or_default())
                        })
                        .collect();
                    msg += &format!("\n  {}: links down to {}", node.name, down.join(", "));
                }
                Err(e) => {
                    msg += &format!(
                        "\n  {}: {e:#}\n    log: {}",
                        node.name,
                        log_tail(&node.runtime_dir.join("node.log"), 5).replace('\n', "\n    ")
                    )
                }
            }
        }
        stop_cluster(&cfg);
        bail!(msg);
    }
    Ok(cfg)
}

/// `dvs down`: asks every node to stop, then makes sure it did.
pub fn down(cfg: &ClusterConfig) -> Result<()> {
    let stopped = stop_cluster(cfg);
    println!(
        "cluster {} down ({stopped} node kernels stopped)",
        cfg.cluster_id
    );
    Ok(())
}

/// `dvs run`: launches `cmd` as endpoint `ep` of `dc` on `node`.
pub fn run(
    cfg: &ClusterConfig,
    dc: &str,
    ep: i32,
    node: &str,
    wait: bool,
    workdir: Option<std::path::PathBuf>,
    cmd: Vec<String>,
) -> Result<ExitCode> {
    let dcc = find_dc(cfg, dc)?;
    let nodec = find_node(cfg, node)?;
    // Resolve the program here, so that a relative path means what the user typed.
    let mut cmd = cmd;
    let p = Path::new(&cmd[0]);
    if p.components().count() > 1 && p.exists() {
        cmd[0] = p.canonicalize()?.display().to_string();
    }
    let mut c = ctl_connect(cfg, nodec, Duration::from_secs(10)).with_context(|| {
        format!(
            "node {} is not running: start the cluster with `dvs up`",
            nodec.name
        )
    })?;
    if wait {
        // The program's output comes whenever it writes.
        c.set_timeout(None)?;
    }
    // The folder is the program's, on its node: a relative one means the user's.
    let workdir = match workdir {
        Some(w) if w.is_relative() => Some(std::path::absolute(&w)?),
        w => w,
    };
    let started = c.call(&CtlRequest::Run {
        dc: dcc.id,
        ep,
        cmd,
        wait,
        workdir: workdir.map(|w| w.display().to_string()),
    })?;
    let CtlResponse::Started { pid, log } = started else {
        bail!("unexpected answer: {started:?}")
    };
    if !wait {
        println!(
            "started endpoint {}/{ep} on {} (pid {pid}), log {log}",
            dcc.name, nodec.name
        );
        return Ok(ExitCode::SUCCESS);
    }
    let stdout = std::io::stdout();
    loop {
        match c.recv()? {
            CtlResponse::Output { data } => {
                let mut out = stdout.lock();
                out.write_all(data.as_bytes())?;
                out.flush()?;
            }
            CtlResponse::Exited { code, signal } => {
                if let Some(sig) = signal {
                    eprintln!("dvs: endpoint {}/{ep} was killed by signal {sig}", dcc.name);
                    return Ok(ExitCode::from(128u8.saturating_add(sig as u8)));
                }
                return Ok(ExitCode::from(code.unwrap_or(1).clamp(0, 255) as u8));
            }
            other => bail!("unexpected answer: {other:?}"),
        }
    }
}

/// `dvs register`: records on nodes that `{dc, ep}` runs on `at` (REMOTE), or is a backup kept
/// on `at` (BACKUP). Without `on`, every other node of the DC.
pub fn register(
    cfg: &ClusterConfig,
    target: &str,
    at: &str,
    on: &[String],
    backup: bool,
) -> Result<()> {
    let (dc, ep) = parse_target(cfg, target)?;
    let dcc = cfg.dc_by_id(dc).expect("resolved");
    let at = find_node(cfg, at)?;
    let nodes: Vec<&NodeConfig> = if on.is_empty() {
        cfg.dc_nodes(dcc)
            .into_iter()
            .filter(|n| *n != at.id)
            .filter_map(|n| cfg.node_by_id(n))
            .collect()
    } else {
        on.iter()
            .map(|n| find_node(cfg, n))
            .collect::<Result<_>>()?
    };
    let kind = if backup { "BACKUP" } else { "REMOTE" };
    for node in nodes {
        let mut c = ctl_connect(cfg, node, Duration::from_secs(3))
            .with_context(|| format!("node {} is not running", node.name))?;
        c.call(&CtlRequest::Register {
            dc,
            ep,
            at: at.id,
            backup,
        })
        .with_context(|| format!("on node {}", node.name))?;
        println!(
            "{}: {}/{ep} registered as {kind}({})",
            node.name, dcc.name, at.name
        );
    }
    Ok(())
}
