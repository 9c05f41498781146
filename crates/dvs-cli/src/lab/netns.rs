//! The lab's network: a switch namespace holding a bridge, and one network namespace per host
//! with a veth into it. The root namespace gets no address and no route on the lab network.
//! Also the `/proc` scans that find every process of a namespace, to stop them.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Runs `cmd` to completion; fails with its command line and stderr unless it succeeds.
/// Returns its stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let line = command_line(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cmd` as the words a shell would show.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// The names of the network namespaces `ip netns` knows.
pub fn list() -> Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    // Lines read `NAME` or `NAME (id: N)`.
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// The inode of namespace `name` (as `/proc/PID/ns/net` of its processes shows it), if it
/// exists.
pub fn inode(name: &str) -> Option<u64> {
    std::fs::metadata(Path::new("/run/netns").join(name))
        .ok()
        .map(|m| m.ino())
}

/// The inode of the network namespace of process `pid`.
pub fn inode_of(pid: i32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// Creates the switch namespace `sw` with an up bridge `br0`.
pub fn create_switch(sw: &str) -> Result<()> {
    ip(&["netns", "add", sw])?;
    ip(&["-n", sw, "link", "set", "lo", "up"])?;
    ip(&["-n", sw, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", sw, "link", "set", "br0", "up"])?;
    Ok(())
}

/// Creates host namespace `ns` with `eth0` at `addr/24`, plugged into `sw`'s bridge as port
/// `port`, and its loopback up. The veth is created inside the switch, so its names never
/// meet another lab's (or the machine's) interfaces.
pub fn add_host(sw: &str, ns: &str, port: &str, addr: Ipv4Addr) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&[
        "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&["-n", sw, "link", "set", port, "master", "br0", "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes namespace `name` (its interfaces go with it); nothing if it does not exist.
pub fn delete(name: &str) -> Result<()> {
    if inode(name).is_none() && !list()?.iter().any(|n| n == name) {
        return Ok(());
    }
    ip(&["netns", "delete", name]).map(|_| ())
}

/// Every process (by pid) whose network namespace is one of `inodes`.
pub fn processes_in(inodes: &HashSet<u64>) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // A thread whose leader already exited still holds the namespace: look at every
            // task, not only the leader's link.
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|t| {
                    std::fs::metadata(t.path().join("ns/net"))
                        .is_ok_and(|m| inodes.contains(&m.ino()))
                })
        })
        .collect()
}

/// Kills (SIGKILL) every process in the namespaces `inodes`, again until none is left, and
/// waits until all their threads are gone. Returns how many were killed; fails if some are
/// still there after `limit`.
pub fn kill_all(inodes: &HashSet<u64>, limit: Duration) -> Result<usize> {
    let deadline = Instant::now() + limit;
    let mut killed = HashSet::new();
    loop {
        let left: Vec<i32> = processes_in(inodes)
            .into_iter()
            .chain(killed.iter().copied())
            .filter(|pid| dvs_checkpoint::process_alive(*pid))
            .collect();
        if left.is_empty() {
            return Ok(killed.len());
        }
        if Instant::now() >= deadline {
            bail!(
                "processes {left:?} of the lab are still alive {:.0} s after SIGKILL",
                limit.as_secs_f64()
            );
        }
        for pid in left {
            // SAFETY: a signal; the pid was just seen in one of the lab's namespaces.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.insert(pid);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether some process listens on TCP `addr:port` in the network namespace of `pid`
/// (from `/proc/PID/net/tcp`: this reads the namespace's table, sending nothing).
pub fn listening(pid: i32, addr: Ipv4Addr, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (Some(local), Some(state)) = (f.get(1), f.get(3)) else {
            return false;
        };
        let Some((a, p)) = local.split_once(':') else {
            return false;
        };
        // The address is printed as the u32 in memory (network order), in hex.
        let a = u32::from_str_radix(a, 16).map(|v| Ipv4Addr::from(v.to_le_bytes()));
        *state == "0A" && a.is_ok_and(|a| a == addr) && u16::from_str_radix(p, 16) == Ok(port)
    })
}
