//! A lab host's mount namespace and the processes that run on it.
//!
//! A long-lived *holder* (`sleep`) owns each host's namespaces: it is started in the host's
//! network namespace under `unshare --mount --uts`, mounts the host's private file systems,
//! and sleeps. Every later command joins its namespaces with `nsenter --target HOLDER`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use super::netns;

/// Where a host sees its own state folder: its config, TLS files and logs (the lab's
/// `HOSTDIR/NAME` on the machine, bind-mounted here).
pub const HOST_STATE: &str = "/var/lib/dvs";

/// What the holder does in its new mount namespace before it sleeps. `$1`: the host's state
/// folder on the machine; `$2`: the host name; `$3`: a folder of the machine to keep visible
/// although it lies under one of the private mounts (the folder of the `dvs` binary and the
/// example programs, when the build is under `/tmp`), or empty.
const HOLDER_SCRIPT: &str = r#"set -eu
# The copies of namespace handles (ip netns's nsfs mounts) that this namespace inherited
# would keep other labs' namespaces alive for as long as this host lives.
awk '{for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "nsfs") print $5; break }}' \
    /proc/self/mountinfo | sort -r | while read -r m; do
        # Another lab going down at the same time may have removed it already.
        umount -l "$m" 2>/dev/null || ! awk -v m="$m" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo
    done
# The binaries' folder, parked on /mnt (of this namespace only) while the private mounts
# cover where it lies, then moved back.
if [ -n "$3" ]; then
    mount --bind "$3" /mnt
fi
# Only this host's own state shows under /var/lib/dvs (every lab's folders are hidden).
mount --bind "$1" /var/lib/dvs
mount -t tmpfs -o mode=0755 lab-run /run
mount -t tmpfs -o mode=1777 lab-tmp /tmp
mount -t tmpfs -o mode=1777 lab-shm /dev/shm
if [ -n "$3" ]; then
    mkdir -p "$3"
    mount --move /mnt "$3"
fi
hostname "$2"
echo ready
exec sleep infinity </dev/null >/dev/null 2>&1
"#;

/// Starts the holder of a host: in network namespace `ns`, a new mount and UTS namespace
/// with private `/run`, `/tmp`, `/dev/shm`, `state` at [`HOST_STATE`] and host name
/// `hostname`. Returns its pid once the mounts are done.
pub fn start_holder(ns: &str, hostname: &str, state: &Path) -> Result<i32> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .args([
            "--",
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            HOLDER_SCRIPT,
            "holder",
        ])
        .arg(state)
        .arg(hostname)
        .arg(hidden_bin_dir().unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    detach(&mut cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start the holder of {hostname}"))?;
    let pid = child.id() as i32;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the holder's output")?;
    if line.trim() != "ready" {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let status = child.wait()?;
        bail!("the holder of {hostname} failed ({status}): {}", err.trim());
    }
    // nsenter and unshare exec what follows, so the child is the holder itself.
    Ok(pid)
}

/// The folder of this `dvs` binary (and of the example programs built with it) if the
/// host's private mounts would hide it (a build under `/tmp`, `/run` or `/dev/shm`).
fn hidden_bin_dir() -> Option<std::ffi::OsString> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    ["/tmp", "/run", "/dev/shm"]
        .iter()
        .any(|p| dir.starts_with(p))
        .then(|| dir.as_os_str().to_owned())
}

/// Whether `pid` is still the holder of the host whose network namespace is `inode`.
pub fn holder_alive(pid: i32, inode: Option<u64>) -> bool {
    dvs_checkpoint::process_alive(pid) && inode.is_some() && netns::inode_of(pid) == inode
}

/// A command that runs `program` in the namespaces of `holder`.
pub fn enter(holder: i32, program: impl AsRef<std::ffi::OsStr>) -> Command {
    enter_in(holder, None, program)
}

/// [`enter`], in folder `wd` of the host (default: its root).
pub fn enter_in(holder: i32, wd: Option<&Path>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--target={holder}"))
        .args(["--net", "--mount", "--uts"]);
    if let Some(wd) = wd {
        cmd.arg(format!("--wd={}", wd.display()));
    }
    cmd.arg("--").arg(program);
    cmd
}

/// Starts `cmd` (made by [`enter`]) as a daemon of its own session, its output appended to
/// `log`; returns its pid (nsenter execs the program, so that is the program's).
pub fn spawn_daemon(mut cmd: Command, log: &Path) -> Result<i32> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    detach(&mut cmd);
    let line = netns::command_line(&cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    Ok(child.id() as i32)
}

/// Puts the process in a session of its own: it outlives this command and ignores the
/// terminal's signals.
fn detach(cmd: &mut Command) {
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}
