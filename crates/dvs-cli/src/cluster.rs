//! Starting and stopping a local cluster, and launching programs on its nodes.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dvs_config::{ClusterConfig, Compression, NodeConfig};
use dvs_node::ctl::{CtlClient, CtlRequest, CtlResponse, NodeStatus};

/// Asks one node for its status, with a short timeout.
pub fn node_status(node: &NodeConfig) -> Result<NodeStatus> {
    let mut c = CtlClient::connect(&node.ctl_socket())?;
    c.set_timeout(Some(Duration::from_secs(3)))?;
    match c.call(&CtlRequest::Status)? {
        CtlResponse::Status(s) => Ok(s),
        other => bail!("unexpected answer from node {}: {other:?}", node.name),
    }
}

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
            if old.nodes.iter().any(|node| node_status(node).is_ok()) {
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
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let statuses: Vec<Result<NodeStatus>> = cfg.nodes.iter().map(node_status).collect();
        let ready = statuses
            .iter()
            .all(|s| s.as_ref().is_ok_and(|s| s.links.iter().all(|l| l.up)));
        if ready {
            break;
        }
        if Instant::now() > deadline {
            let mut msg = String::from("the cluster did not come up within 15 s:");
            for (node, s) in cfg.nodes.iter().zip(statuses) {
                match s {
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
            stop(&cfg);
            bail!(msg);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(cfg)
}

/// Whether process `pid` still runs. A zombie counts as gone: a node started by `dvs up` is
/// reparented to init once `up` exits, and an init that reaps lazily (as in some containers)
/// would otherwise make `down` wait its full grace period for a process that already exited.
fn pid_alive(pid: i32) -> bool {
    dvs_checkpoint::process_alive(pid)
}

/// `dvs down`: asks every node to stop, then makes sure it did.
pub fn down(cfg: &ClusterConfig) -> Result<()> {
    let stopped = stop(cfg);
    println!(
        "cluster {} down ({stopped} node kernels stopped)",
        cfg.cluster_id
    );
    Ok(())
}

/// Asks every node of `cfg` to stop and kills those that do not within 5 s. Prints nothing
/// on stdout; returns how many node kernels were stopped.
pub fn stop(cfg: &ClusterConfig) -> usize {
    let mut stopped = 0;
    for node in &cfg.nodes {
        let pid: Option<i32> = std::fs::read_to_string(node.runtime_dir.join("node.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let asked = CtlClient::connect(&node.ctl_socket()).and_then(|mut c| {
            c.set_timeout(Some(Duration::from_secs(3)))?;
            c.call(&CtlRequest::Shutdown)
        });
        let Some(pid) = pid else {
            if asked.is_ok() {
                stopped += 1;
            }
            continue;
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if pid_alive(pid) {
            eprintln!("node {} (pid {pid}) did not stop; killing it", node.name);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if asked.is_ok() || pid_alive(pid) {
            stopped += 1;
        }
        let _ = std::fs::remove_file(node.runtime_dir.join("node.pid"));
    }
    stopped
}

/// `dvs run`: launches `cmd` as endpoint `ep` of `dc` on `node`.
pub fn run(
    cfg: &ClusterConfig,
    dc: &str,
    ep: i32,
    node: &str,
    wait: bool,
    cmd: Vec<String>,
) -> Result<ExitCode> {
    let dcc = cfg.find_dc(dc).ok_or_else(|| {
        anyhow!(
            "no DC {dc:?} in the cluster config (DCs: {})",
            names(cfg.dcs.iter().map(|d| &d.name))
        )
    })?;
    let nodec = cfg.find_node(node).ok_or_else(|| {
        anyhow!(
            "no node {node:?} in the cluster config (nodes: {})",
            names(cfg.nodes.iter().map(|n| &n.name))
        )
    })?;
    // Resolve the program here, so that a relative path means what the user typed.
    let mut cmd = cmd;
    let p = Path::new(&cmd[0]);
    if p.components().count() > 1 && p.exists() {
        cmd[0] = p.canonicalize()?.display().to_string();
    }
    let mut c = CtlClient::connect(&nodec.ctl_socket()).with_context(|| {
        format!(
            "node {} is not running: start the cluster with `dvs up`",
            nodec.name
        )
    })?;
    let started = c.call(&CtlRequest::Run {
        dc: dcc.id,
        ep,
        cmd,
        wait,
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

fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    it.cloned().collect::<Vec<_>>().join(", ")
}

/// Splits `DC/EP` and resolves the DC.
pub fn parse_target(cfg: &ClusterConfig, target: &str) -> Result<(u16, i32)> {
    let (dc, ep) = target
        .split_once('/')
        .ok_or_else(|| anyhow!("{target:?}: expected DC/EP, e.g. dc0/1"))?;
    let dcc = cfg
        .find_dc(dc)
        .ok_or_else(|| anyhow!("no DC {dc:?} in the cluster config"))?;
    let ep: i32 = ep
        .parse()
        .map_err(|_| anyhow!("{ep:?} is not an endpoint number"))?;
    Ok((dcc.id, ep))
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
    let at = cfg
        .find_node(at)
        .ok_or_else(|| anyhow!("no node {at:?} in the cluster config"))?;
    let nodes: Vec<&NodeConfig> = if on.is_empty() {
        cfg.dc_nodes(dcc)
            .into_iter()
            .filter(|n| *n != at.id)
            .filter_map(|n| cfg.node_by_id(n))
            .collect()
    } else {
        on.iter()
            .map(|n| {
                cfg.find_node(n)
                    .ok_or_else(|| anyhow!("no node {n:?} in the cluster config"))
            })
            .collect::<Result<_>>()?
    };
    let kind = if backup { "BACKUP" } else { "REMOTE" };
    for node in nodes {
        let mut c = CtlClient::connect(&node.ctl_socket())
            .with_context(|| format!("node {} is not running", node.name))?;
        c.set_timeout(Some(Duration::from_secs(3)))?;
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
