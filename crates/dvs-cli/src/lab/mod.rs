//! `dvs lab`: simulated hosts that share nothing, on this one machine.
//!
//! A lab NAME is a switch namespace `dvs-lab-NAME-sw` holding bridge `br0`, and per host a
//! network namespace `dvs-lab-NAME-HOST` with `eth0` on `10.77.K.0/24` (K picked per lab),
//! plus a mount namespace with private `/run`, `/tmp` and `/dev/shm` and its own state folder
//! at `/var/lib/dvs` (see [`hosts`]). Hosts `host1..hostN` run node `nodeI` (id I) at
//! `10.77.K.I`; host `etcd` runs etcd at `10.77.K.250`. The root namespace has no address
//! on the lab network: everything that talks to the lab runs inside its namespaces.
//!
//! On the machine, the lab lives in `/var/lib/dvs/lab/NAME/`: `lab.json` (what `down`
//! needs), `admin/` (the CA and every certificate: the operator's machine, seen by no
//! host) and one state folder per host.

mod etcd;
mod guard;
mod hosts;
mod netns;
mod provision;

use std::collections::HashSet;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::helpers::wait_until;
pub use guard::LabGuard;
use hosts::HOST_STATE;

/// Where labs keep their state on the machine.
pub const LAB_ROOT: &str = "/var/lib/dvs/lab";
/// Most hosts in a lab (their addresses are `.1` to `.200`).
const MAX_HOSTS: u16 = 200;
/// The etcd host's last address byte.
const ETCD_HOST_BYTE: u8 = 250;
/// Longest wait for every node's links after the start.
const LINKS_TIMEOUT: Duration = Duration::from_secs(30);

/// What `dvs lab` does.
#[derive(clap::Subcommand)]
pub enum LabCmd {
    /// Build the lab's hosts, provision each with its own files, start etcd and a node per
    /// host, wait until every link is up and print the hosts.
    Up {
        /// The lab's name (lower-case letters and digits): its namespaces, subnet and state.
        #[arg(long, default_value = "lab")]
        name: String,
        /// Number of node hosts.
        #[arg(long, default_value_t = 3)]
        hosts: u16,
    },
    /// Kill every process of the lab, delete its namespaces and state (idempotent).
    Down {
        /// The lab's name.
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Run a command inside a host, with DVS_CONFIG and DVS_NODE set for its node.
    Exec {
        /// The lab's name.
        #[arg(long, default_value = "lab")]
        name: String,
        /// The host: hostI, its node's name (nodeI), I, or etcd.
        host: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// The lab's hosts and whether their node (or etcd) runs.
    Status {
        /// The lab's name.
        #[arg(long, default_value = "lab")]
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `dvs lab` command.
pub fn run(cmd: LabCmd) -> Result<ExitCode> {
    match cmd {
        LabCmd::Up { name, hosts } => {
            let lab = up(&name, hosts)?;
            print_table(&lab, &host_states(&lab));
            println!(
                "next: `dvs lab exec --name {name} host1 -- dvs status`, `dvs lab down --name {name}`"
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Down { name } => {
            let killed = down(&name)?;
            println!("lab {name} down ({killed} processes killed)");
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Exec { name, host, cmd } => exec(&name, &host, &cmd),
        LabCmd::Status { name, json } => status(&name, json),
    }
}

// ----- the lab's state -----------------------------------------------------------------------

/// One host of a lab.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Host {
    /// `hostI` or `etcd`.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address on the lab network.
    pub addr: Ipv4Addr,
    /// The node it runs (none on the etcd host).
    pub node: Option<String>,
    /// That node's id.
    pub node_id: Option<u16>,
    /// Pid of the holder of its namespaces.
    pub holder: Option<i32>,
    /// Pid of its node kernel (or of etcd).
    pub pid: Option<i32>,
}

/// What a lab is made of, kept in `lab.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabState {
    /// The lab's name.
    pub name: String,
    /// K of the lab's subnet `10.77.K.0/24`.
    pub subnet: u8,
    /// The node hosts, then the etcd host.
    pub hosts: Vec<Host>,
}

impl LabState {
    /// The cluster id of the lab's dvs cluster.
    pub fn cluster_id(&self) -> String {
        format!("lab-{}", self.name)
    }

    /// The address of host byte `b`.
    fn addr(&self, b: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, b)
    }

    /// The etcd host's address.
    pub fn etcd_addr(&self) -> Ipv4Addr {
        self.addr(ETCD_HOST_BYTE)
    }

    fn switch(&self) -> String {
        netns_name(&self.name, "sw")
    }

    /// The host named `s`: hostI, nodeI, I or etcd.
    pub fn host(&self, s: &str) -> Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.name == s || h.node.as_deref() == Some(s) || h.name == format!("host{s}"))
            .ok_or_else(|| {
                anyhow!(
                    "lab {} has no host {s:?} (hosts: {})",
                    self.name,
                    self.hosts
                        .iter()
                        .map(|h| h.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}

fn netns_name(lab: &str, host: &str) -> String {
    format!("dvs-lab-{lab}-{host}")
}

/// Whether `ns` is one of lab `lab`'s namespaces.
fn is_lab_netns(lab: &str, ns: &str) -> bool {
    ns.strip_prefix(&format!("dvs-lab-{lab}-"))
        .is_some_and(|rest| {
            rest == "sw"
                || rest == "etcd"
                || rest
                    .strip_prefix("host")
                    .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        })
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 16
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        bail!("lab name {name:?}: 1 to 16 lower-case ASCII letters and digits");
    }
    Ok(())
}

/// The lab's folder on the machine.
pub fn lab_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

fn load(name: &str) -> Result<Option<LabState>> {
    let path = lab_dir(name).join("lab.json");
    match std::fs::read(&path) {
        Ok(data) => {
            Ok(Some(serde_json::from_slice(&data).with_context(|| {
                format!("{} is not a lab's state", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn load_existing(name: &str) -> Result<LabState> {
    check_name(name)?;
    load(name)?.ok_or_else(|| anyhow!("no lab {name:?}: start one with `dvs lab up --name {name}`"))
}

fn save(lab: &LabState) -> Result<()> {
    let path = lab_dir(&lab.name).join("lab.json");
    dvs_tls::files::write_file(&path, &serde_json::to_vec_pretty(lab)?, 0o600, true)?;
    Ok(())
}

/// Holds an exclusive lock on [`LAB_ROOT`] while a lab is reserved or removed, so that two
/// concurrent `up`s never pick the same name or subnet.
struct RootLock {
    _held: File,
}

impl RootLock {
    fn take() -> Result<RootLock> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(LAB_ROOT)
            .with_context(|| format!("cannot create {LAB_ROOT}"))?;
        let f = File::open(LAB_ROOT).with_context(|| format!("cannot open {LAB_ROOT}"))?;
        // SAFETY: flock on an fd this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot lock the labs' folder");
        }
        Ok(RootLock { _held: f })
    }
}

/// A subnet byte no other lab uses, starting from one derived from the name.
fn pick_subnet(name: &str) -> Result<u8> {
    let mut used = HashSet::new();
    for e in std::fs::read_dir(LAB_ROOT)?.flatten() {
        if let Some(other) = e.file_name().to_str().and_then(|n| load(n).ok().flatten()) {
            used.insert(other.subnet);
        }
    }
    let start = name
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    (0..249u32)
        .map(|i| ((start + i) % 249 + 1) as u8)
        .find(|k| !used.contains(k))
        .ok_or_else(|| anyhow!("every lab subnet 10.77.1-249.0/24 is taken"))
}

// ----- up ------------------------------------------------------------------------------------

/// Builds lab `name` with `n` node hosts and etcd, and waits until every link is up; a lab
/// that cannot be built whole is taken down.
pub fn up(name: &str, n: u16) -> Result<LabState> {
    check_name(name)?;
    if n == 0 || n > MAX_HOSTS {
        bail!("--hosts must be 1 to {MAX_HOSTS}");
    }
    let mut lab = {
        let _lock = RootLock::take()?;
        let leftover: Vec<String> = netns::list()?
            .into_iter()
            .filter(|ns| is_lab_netns(name, ns))
            .collect();
        if lab_dir(name).exists() || !leftover.is_empty() {
            bail!(
                "lab {name} already exists ({}): `dvs lab down --name {name}` first",
                if leftover.is_empty() {
                    lab_dir(name).display().to_string()
                } else {
                    leftover.join(", ")
                }
            );
        }
        let subnet = pick_subnet(name)?;
        let mut lab = LabState {
            name: name.to_string(),
            subnet,
            hosts: Vec::new(),
        };
        for i in 1..=n {
            lab.hosts.push(Host {
                name: format!("host{i}"),
                netns: netns_name(name, &format!("host{i}")),
                addr: lab.addr(i as u8),
                node: Some(format!("node{i}")),
                node_id: Some(i),
                holder: None,
                pid: None,
            });
        }
        lab.hosts.push(Host {
            name: "etcd".into(),
            netns: netns_name(name, "etcd"),
            addr: lab.etcd_addr(),
            node: None,
            node_id: None,
            holder: None,
            pid: None,
        });
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(lab_dir(name))
            .with_context(|| format!("cannot create {}", lab_dir(name).display()))?;
        save(&lab)?;
        lab
    };
    if let Err(e) = build(&mut lab) {
        // Half a lab is worth nothing: take it all down, and say why it failed.
        if let Err(d) = down(name) {
            return Err(e.context(format!("and `lab down` failed too: {d:#}")));
        }
        return Err(e.context(format!("lab {name} could not be built (it was taken down)")));
    }
    Ok(lab)
}

fn build(lab: &mut LabState) -> Result<()> {
    let dir = lab_dir(&lab.name);
    let sw = lab.switch();
    netns::create_switch(&sw)?;
    for h in &lab.hosts {
        netns::add_host(&sw, &h.netns, &h.name, h.addr)
            .with_context(|| format!("cannot plug {} into the lab network", h.name))?;
    }
    for i in 0..lab.hosts.len() {
        let h = &lab.hosts[i];
        let state = dir.join(&h.name);
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&state)
            .with_context(|| format!("cannot create {}", state.display()))?;
        let holder = hosts::start_holder(&h.netns, &h.name, &state)?;
        lab.hosts[i].holder = Some(holder);
        save(lab)?;
    }
    provision::provision(lab, &dir)?;
    let etcd = lab.hosts.len() - 1;
    let (holder, addr) = (lab.hosts[etcd].holder.expect("started"), lab.etcd_addr());
    let pid = etcd::start(&lab.name, holder, addr, &dir.join("etcd").join("etcd.log"))?;
    lab.hosts[etcd].pid = Some(pid);
    save(lab)?;
    for i in 0..etcd {
        start_node(lab, i)?;
    }
    let mut last = Vec::new();
    let ready = wait_until(LINKS_TIMEOUT, Duration::from_millis(200), || {
        last = host_states(lab);
        last.iter().all(|s| s.ok)
    });
    if !ready {
        let mut msg = format!(
            "the lab's nodes were not all linked within {} s:",
            LINKS_TIMEOUT.as_secs()
        );
        for (h, s) in lab.hosts.iter().zip(&last) {
            msg += &format!("\n  {}: {}", h.name, s.state);
            if !s.ok {
                let log = match &h.node {
                    Some(_) => dir.join(&h.name).join("node.log"),
                    None => dir.join("etcd").join("etcd.log"),
                };
                msg += &format!("\n    {}", log_tail(&log, 5).replace('\n', "\n    "));
            }
        }
        bail!(msg);
    }
    Ok(())
}

/// Starts the node kernel of host `i` (a node host) in the background, its output appended
/// to the host's `node.log`, and records its pid in `lab.json`.
pub fn start_node(lab: &mut LabState, i: usize) -> Result<i32> {
    let exe = std::env::current_exe().context("cannot find the dvs executable")?;
    let h = &lab.hosts[i];
    let holder = h
        .holder
        .ok_or_else(|| anyhow!("host {} has no holder", h.name))?;
    let node = h
        .node
        .as_deref()
        .ok_or_else(|| anyhow!("host {} runs no node", h.name))?;
    let mut cmd = hosts::enter(holder, &exe);
    cmd.arg("--config")
        .arg(Path::new(HOST_STATE).join("cluster.toml"))
        .args(["node", "--node", node]);
    let log = lab_dir(&lab.name).join(&h.name).join("node.log");
    let pid = hosts::spawn_daemon(cmd, &log)?;
    lab.hosts[i].pid = Some(pid);
    save(lab)?;
    Ok(pid)
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

// ----- status --------------------------------------------------------------------------------

/// What is known of one host now.
#[derive(Debug, Serialize)]
struct HostStatus {
    host: String,
    address: Ipv4Addr,
    netns: String,
    node: Option<String>,
    holder: Option<i32>,
    pid: Option<i32>,
    /// Whether the host's node (or etcd) process runs.
    running: bool,
    /// Links up, and links, as the node itself reports them.
    links_up: Option<usize>,
    links: Option<usize>,
    /// In words.
    state: String,
    /// Everything as it should be: running, and (for a node) every link up.
    ok: bool,
}

/// A `dvs` command run on `host`, with the host's config (and, on a node host, `DVS_NODE`
/// naming its node): every CLI command the lab runs goes through here. Any node host
/// reaches the whole cluster: the CLI's requests are relayed by the host's node.
pub fn cli_on(host: &Host, args: &[&str]) -> Result<std::process::Command> {
    let holder = host
        .holder
        .ok_or_else(|| anyhow!("host {} has no holder", host.name))?;
    let exe = std::env::current_exe().context("cannot find the dvs executable")?;
    let mut cmd = hosts::enter(holder, exe);
    cmd.env("DVS_CONFIG", Path::new(HOST_STATE).join("cluster.toml"))
        .args(args);
    if let Some(node) = &host.node {
        cmd.env("DVS_NODE", node);
    }
    Ok(cmd)
}

/// The links of `host`'s node, asked inside the host: (up, total).
fn links_of(host: &Host) -> Result<(usize, usize)> {
    let node = host.node.as_deref().unwrap_or_default();
    let out = cli_on(host, &["status", "--json"])?
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run `dvs status` on the host")?;
    // The exit code says whether every node answered; only this host's node can here.
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|_| {
        anyhow!(
            "`dvs status` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let entry = v["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == node))
        .ok_or_else(|| anyhow!("`dvs status` does not list {node}"))?;
    let Some(links) = entry["status"]["links"].as_array() else {
        bail!(
            "{}",
            entry["error"]
                .as_str()
                .unwrap_or("the node does not answer")
        );
    };
    let up = links.iter().filter(|l| l["up"] == true).count();
    Ok((up, links.len()))
}

fn host_states(lab: &LabState) -> Vec<HostStatus> {
    lab.hosts
        .iter()
        .map(|h| {
            let inode = netns::inode(&h.netns);
            let holder_ok = h.holder.is_some_and(|p| hosts::holder_alive(p, inode));
            let running = holder_ok
                && h.pid.is_some_and(|p| {
                    dvs_checkpoint::process_alive(p) && netns::inode_of(p) == inode
                });
            let mut s = HostStatus {
                host: h.name.clone(),
                address: h.addr,
                netns: h.netns.clone(),
                node: h.node.clone(),
                holder: h.holder,
                pid: h.pid,
                running,
                links_up: None,
                links: None,
                state: String::new(),
                ok: false,
            };
            let what = if h.node.is_some() { "node" } else { "etcd" };
            if !holder_ok {
                s.state = "host gone (its holder is not running)".into();
            } else if !running {
                s.state = format!("{what} not running");
            } else if h.node.is_none() {
                s.state = "etcd running".into();
                s.ok = true;
            } else {
                match links_of(h) {
                    Ok((up, total)) => {
                        s.links_up = Some(up);
                        s.links = Some(total);
                        s.ok = up == total;
                        s.state = format!("node running, links up {up}/{total}");
                    }
                    Err(e) => s.state = format!("node running, not answering: {e:#}"),
                }
            }
            s
        })
        .collect()
}

fn print_table(lab: &LabState, states: &[HostStatus]) {
    println!(
        "lab {} (cluster {}, network 10.77.{}.0/24, state {})",
        lab.name,
        lab.cluster_id(),
        lab.subnet,
        lab_dir(&lab.name).display()
    );
    println!("{:<8} {:<15} {:<8} STATE", "HOST", "ADDRESS", "NODE");
    for s in states {
        println!(
            "{:<8} {:<15} {:<8} {}",
            s.host,
            s.address.to_string(),
            s.node.as_deref().unwrap_or("-"),
            s.state
        );
    }
}

fn status(name: &str, json: bool) -> Result<ExitCode> {
    let lab = load_existing(name)?;
    let states = host_states(&lab);
    let ok = states.iter().all(|s| s.ok);
    if json {
        let v = serde_json::json!({
            "name": lab.name,
            "cluster_id": lab.cluster_id(),
            "network": format!("10.77.{}.0/24", lab.subnet),
            "dir": lab_dir(name),
            "hosts": states,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_table(&lab, &states);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

// ----- exec ----------------------------------------------------------------------------------

fn exec(name: &str, host: &str, cmd: &[String]) -> Result<ExitCode> {
    let lab = load_existing(name)?;
    let h = lab.host(host)?;
    let alive = h
        .holder
        .is_some_and(|p| hosts::holder_alive(p, netns::inode(&h.netns)));
    let Some(holder) = h.holder.filter(|_| alive) else {
        bail!(
            "host {} of lab {name} is gone: `dvs lab down --name {name}`, then up again",
            h.name
        );
    };
    // The caller's folder, when the host has it too (the repository does; /tmp does not):
    // relative paths then mean what they mean outside.
    let wd = std::env::current_dir()
        .ok()
        .filter(|d| Path::new(&format!("/proc/{holder}/root{}", d.display())).is_dir());
    let mut c = hosts::enter_in(holder, wd.as_deref(), &cmd[0]);
    c.args(&cmd[1..]);
    if let Some(node) = &h.node {
        c.env("DVS_CONFIG", Path::new(HOST_STATE).join("cluster.toml"))
            .env("DVS_NODE", node);
    }
    let status = c
        .status()
        .with_context(|| format!("cannot run {:?} on {}", cmd[0], h.name))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code.clamp(0, 255) as u8),
        (None, Some(sig)) => ExitCode::from(128u8.saturating_add(sig as u8)),
        _ => ExitCode::FAILURE,
    })
}

// ----- down ----------------------------------------------------------------------------------

/// Takes lab `name` down: kills every process in its namespaces (and waits until they are
/// gone), deletes the namespaces (the bridge and veths go with them) and its state folder.
/// Nothing to do is no error. Returns how many processes were killed.
pub fn down(name: &str) -> Result<usize> {
    check_name(name)?;
    let _lock = RootLock::take()?;
    let mut names: Vec<String> = netns::list()?
        .into_iter()
        .filter(|ns| is_lab_netns(name, ns))
        .collect();
    if let Ok(Some(lab)) = load(name) {
        for h in &lab.hosts {
            if !names.contains(&h.netns) {
                names.push(h.netns.clone());
            }
        }
    }
    let inodes: HashSet<u64> = names.iter().filter_map(|n| netns::inode(n)).collect();
    // The mounts of a host live in its mount namespace only; they go with its last process.
    let killed = netns::kill_all(&inodes, Duration::from_secs(20))?;
    // The switch last: the hosts' veths end in it.
    names.sort_by_key(|n| n.ends_with("-sw"));
    for ns in &names {
        netns::delete(ns)?;
    }
    let dir = lab_dir(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    // Leave no empty folders behind either (they fail to go while another lab uses them).
    let _ = std::fs::remove_dir(LAB_ROOT);
    let _ = std::fs::remove_dir("/var/lib/dvs");
    let left: Vec<String> = netns::list()?
        .into_iter()
        .filter(|ns| is_lab_netns(name, ns))
        .collect();
    if !left.is_empty() {
        bail!("namespaces {} are still there", left.join(", "));
    }
    Ok(killed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_namespaces_are_told_apart() {
        assert!(is_lab_netns("a", "dvs-lab-a-sw"));
        assert!(is_lab_netns("a", "dvs-lab-a-host12"));
        assert!(is_lab_netns("a", "dvs-lab-a-etcd"));
        assert!(!is_lab_netns("a", "dvs-lab-ab-sw"));
        assert!(!is_lab_netns("a", "dvs-lab-a-host"));
        assert!(!is_lab_netns("a", "dvs-lab-a-hostx"));
        assert!(!is_lab_netns("a", "other"));
    }

    #[test]
    fn lab_names_are_checked() {
        assert!(check_name("t123").is_ok());
        for bad in ["", "A", "a-b", "a/b", "abcdefghijklmnopq"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
