//! The CRIU backend: runs the `criu` binary, for dumps and detached restores as a service
//! worker (`criu swrk`, see [`CriuWorker`]) that can be started ahead of need.

mod locate;
mod log;
mod rpc;
mod worker;

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{
    dir_size, sibling_file, CheckpointBackend, CheckpointError, DumpReport, DumpRequest,
    RestoreReport, RestoreRequest,
};
pub use locate::find_criu;
use locate::{candidates, probe};
use log::{combined, failure_reason, rpc_failure};
pub use worker::CriuWorker;

/// Oldest CRIU that works here: 3.17 fails on kernels >= 6.13 (vDSO layout) and 4.1 cannot dump
/// TCP or UDP sockets on kernels >= 6.16; see docs/ARCHITECTURE.md §7.3.
pub const MIN_CRIU_VERSION: (u32, u32) = (4, 2);

/// Where `scripts/install-criu.sh` puts its private CRIU (overridable by `DVS_CRIU_PREFIX`).
pub const DEFAULT_CRIU_PREFIX: &str = "/opt/dvs/criu";

/// criu's log verbosity unless `DVS_CRIU_LOG_LEVEL` says otherwise: 2 keeps criu's errors
/// and warnings, which is what an error message quotes. 4 (debug) costs about 5 ms per dump
/// and per restore on a 2 MB process (criu writes each of about 800 lines with its own
/// write), a quarter of a small migration; set it to diagnose a failure in depth.
const DEFAULT_LOG_LEVEL: i32 = 2;

/// criu's log verbosity: `DVS_CRIU_LOG_LEVEL` (0 to 4) in the node's environment, else
/// [`DEFAULT_LOG_LEVEL`].
fn log_level() -> i32 {
    static LEVEL: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        std::env::var("DVS_CRIU_LOG_LEVEL")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|v| (0..=4).contains(v))
            .unwrap_or(DEFAULT_LOG_LEVEL)
    })
}

/// How many log lines an error carries.
const LOG_TAIL_LINES: usize = 20;

/// How long a non-detached restore may take to write its pidfile.
const ATTACHED_RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

/// The CRIU checkpoint backend: a located `criu` binary (possibly the wrapper written by
/// `scripts/install-criu.sh`). Needs root (or CAP_CHECKPOINT_RESTORE + CAP_SYS_PTRACE).
///
/// Clones share one spare dump worker (see [`Criu::keep_dumper_ready`]).
#[derive(Debug, Clone)]
pub struct Criu {
    bin: PathBuf,
    version: String,
    /// A `criu swrk` started ahead of the next dump.
    spare: Arc<Mutex<Option<CriuWorker>>>,
}

impl PartialEq for Criu {
    fn eq(&self, other: &Criu) -> bool {
        self.bin == other.bin && self.version == other.version
    }
}

impl Eq for Criu {}

impl Criu {
    /// Finds criu as [`find_criu`] does, but says why each candidate was rejected. An explicit
    /// `$DVS_CRIU` that does not work is an error, not skipped: the operator asked for it.
    pub fn locate() -> Result<Criu, CheckpointError> {
        let mut why = Vec::new();
        for (label, bin) in candidates() {
            match probe(&bin) {
                Ok(version) => return Ok(Criu::new(bin, version)),
                Err(CheckpointError::CriuNotFound(m)) if label == "$DVS_CRIU" => {
                    return Err(CheckpointError::CriuNotFound(format!("{label}: {m}")))
                }
                Err(e) if label == "$DVS_CRIU" => return Err(e),
                Err(CheckpointError::CriuNotFound(m)) => why.push(format!("{label}: {m}")),
                Err(e) => why.push(format!("{label}: {e}")),
            }
        }
        if why.iter().all(|w| !w.starts_with("PATH")) {
            why.push("PATH: no criu".to_string());
        }
        Err(CheckpointError::CriuNotFound(format!(
            "{} (run scripts/install-criu.sh as root)",
            why.join("; ")
        )))
    }

    /// Uses a specific binary, checking its version.
    pub fn at(bin: impl Into<PathBuf>) -> Result<Criu, CheckpointError> {
        let bin = bin.into();
        let version = probe(&bin)?;
        Ok(Criu::new(bin, version))
    }

    fn new(bin: PathBuf, version: String) -> Criu {
        Criu {
            bin,
            version,
            spare: Arc::default(),
        }
    }

    /// Starts a `criu swrk` worker now, for a request that comes later; each of `inherit` is
    /// open in it at the same number (see [`CriuWorker::inherited_fds`]), e.g. the socket a
    /// restore plugs in with [`RestoreRequest::inherit_fds`].
    pub fn spawn_worker(&self, inherit: Vec<OwnedFd>) -> Result<CriuWorker, CheckpointError> {
        CriuWorker::spawn(&self.bin, inherit)
    }

    /// Starts a spare dump worker unless one waits already, so that the next [`Criu::dump`]
    /// does not wait for criu to start. A dump uses the spare up; call this again once the
    /// dump's migration is over (a worker starting up takes CPU from whatever runs then).
    pub fn keep_dumper_ready(&self) -> Result<(), CheckpointError> {
        let mut slot = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(self.spawn_worker(Vec::new())?);
        }
        Ok(())
    }

    /// The spare worker, or a new one.
    fn dump_worker(&self) -> Result<CriuWorker, CheckpointError> {
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
        match spare {
            Some(w) => Ok(w),
            None => self.spawn_worker(Vec::new()),
        }
    }

    /// The binary that is run.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The version it reported, e.g. `4.2.1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Runs `criu check`: whether the kernel has what criu needs. Returns the version when
    /// criu says "Looks good."; otherwise [`CheckpointError::CheckFailed`] with criu's output,
    /// which says what is missing.
    pub fn check(&self) -> Result<String, CheckpointError> {
        let out = self.run("criu check", [OsString::from("check")], &[])?;
        let text = combined(&out);
        if out.status.success() && text.contains("Looks good.") {
            Ok(self.version.clone())
        } else {
            Err(CheckpointError::CheckFailed {
                bin: self.bin.clone(),
                status: out.status.to_string(),
                output: text.trim().to_string(),
            })
        }
    }

    /// Checkpoints a tree: `criu dump --tree PID --images-dir DIR -o LOG -vN --manage-cgroups=ignore
    /// [--leave-stopped] [--external unix[INODE]]...`, sent to the spare worker (or a new one)
    /// as an RPC request. With [`DumpRequest::extra_args`] criu runs as a command instead.
    ///
    /// No `--shell-job`: a migratable process is a session leader in its own pid namespace
    /// ([`crate::migratable_command`]), so nothing outside the tree owns its session.
    pub fn dump(&self, req: &DumpRequest) -> Result<DumpReport, CheckpointError> {
        if !req.extra_args.is_empty() {
            return self.dump_on(None, req);
        }
        let worker = self.dump_worker()?;
        self.dump_on(Some(worker), req)
    }

    /// [`Criu::dump`] on a worker started earlier (e.g. with descriptors the request names).
    pub fn dump_with(
        &self,
        worker: CriuWorker,
        req: &DumpRequest,
    ) -> Result<DumpReport, CheckpointError> {
        self.dump_on(Some(worker), req)
    }

    fn dump_on(
        &self,
        worker: Option<CriuWorker>,
        req: &DumpRequest,
    ) -> Result<DumpReport, CheckpointError> {
        // Checked here so that the common mistake gets a plain typed error, not criu's
        // ptrace noise.
        if req.pid <= 0 || !Path::new(&format!("/proc/{}", req.pid)).exists() {
            return Err(CheckpointError::NoSuchProcess { pid: req.pid });
        }
        let images_dir = absolute(&req.images_dir)?;
        fs::create_dir_all(&images_dir).map_err(|e| {
            CheckpointError::io(format!("create images dir {}", images_dir.display()), e)
        })?;
        if has_images(&images_dir)? {
            return Err(CheckpointError::InvalidRequest(format!(
                "images dir {} already holds a checkpoint; use an empty one",
                images_dir.display()
            )));
        }
        let log_file = match &req.log_file {
            Some(l) => absolute(l)?,
            None => sibling_file(&images_dir, "dump.log"),
        };
        remove_stale(&log_file)?;

        let t0 = Instant::now();
        let failed = match worker {
            Some(worker) => {
                let (base, work_dir) = rpc_opts(&images_dir, &log_file, req.leave_stopped)?;
                let opts = rpc::Opts {
                    pid: Some(req.pid),
                    external: req
                        .external_unix_inodes
                        .iter()
                        .map(|ino| format!("unix[{ino}]"))
                        .collect(),
                    tcp_established: req.tcp_established.then_some(true),
                    network_lock: req.tcp_established.then_some(rpc::NetworkLock::Skip as i32),
                    ghost_limit: req.ghost_limit.map(ghost_limit),
                    ..base
                };
                let resp = worker.call("criu dump", &rpc::Req::new(rpc::ReqType::Dump, opts))?;
                drop(work_dir);
                (!resp.success).then(|| rpc_failure(&log_file, &resp))
            }
            None => {
                let mut args = command_args("dump", &images_dir, &log_file, req.leave_stopped);
                args.extend(["--tree".into(), req.pid.to_string().into()]);
                for ino in &req.external_unix_inodes {
                    args.extend(["--external".into(), format!("unix[{ino}]").into()]);
                }
                if req.tcp_established {
                    args.extend(
                        ["--tcp-established", "--network-lock", "skip"].map(OsString::from),
                    );
                }
                if let Some(limit) = req.ghost_limit {
                    args.extend([
                        "--ghost-limit".into(),
                        ghost_limit(limit).to_string().into(),
                    ]);
                }
                args.extend(req.extra_args.iter().cloned());
                let out = self.run("criu dump", args, &[])?;
                (!out.status.success()).then(|| {
                    let (reason, tail) = failure_reason(&log_file, &out);
                    (out.status.to_string(), reason, tail)
                })
            }
        };
        let duration = t0.elapsed();
        if let Some((status, reason, log_tail)) = failed {
            return Err(CheckpointError::DumpFailed {
                pid: req.pid,
                images_dir,
                status,
                reason,
                log_file,
                log_tail,
            });
        }
        Ok(DumpReport {
            pid: req.pid,
            image_bytes: dir_size(&images_dir)?,
            images_dir,
            duration,
            left_stopped: req.leave_stopped,
            log_file,
        })
    }

    /// `criu restore --images-dir DIR -o LOG -vN --manage-cgroups=ignore --pidfile PIDFILE [--restore-detached]
    /// [--inherit-fd fd[N]:KEY]... [extra]`, passing each inherited fd to criu at the same
    /// number.
    ///
    /// A detached restore without extra arguments runs as an RPC request on a new worker
    /// that inherits the fds, and the restored root becomes a child of the caller
    /// (`rst_sibling`) instead of criu's; its pid is still written to the pidfile.
    pub fn restore(&self, req: &RestoreRequest) -> Result<RestoreReport, CheckpointError> {
        let how = if req.detached && req.extra_args.is_empty() {
            Via::NewWorker
        } else {
            Via::Command
        };
        self.restore_on(how, req)
    }

    /// A detached restore on a worker started earlier, which holds every fd that
    /// [`RestoreRequest::inherit_fds`] names (see [`Criu::spawn_worker`]).
    pub fn restore_with(
        &self,
        worker: CriuWorker,
        req: &RestoreRequest,
    ) -> Result<RestoreReport, CheckpointError> {
        let held = worker.inherited_fds();
        if let Some((fd, key)) = req.inherit_fds.iter().find(|(fd, _)| !held.contains(fd)) {
            return Err(CheckpointError::InvalidRequest(format!(
                "fd {fd} to pass as {key} was not given to the criu worker when it started"
            )));
        }
        if !req.detached || !req.extra_args.is_empty() {
            return Err(CheckpointError::InvalidRequest(
                "a criu worker restores detached, without extra arguments".into(),
            ));
        }
        self.restore_on(Via::Worker(worker), req)
    }

    fn restore_on(&self, how: Via, req: &RestoreRequest) -> Result<RestoreReport, CheckpointError> {
        let images_dir = absolute(&req.images_dir)?;
        if !images_dir.join("inventory.img").is_file() {
            return Err(CheckpointError::InvalidRequest(format!(
                "{} holds no checkpoint (no inventory.img)",
                images_dir.display()
            )));
        }
        for (fd, key) in &req.inherit_fds {
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(CheckpointError::InvalidRequest(format!(
                    "inherit-fd key {key:?} is malformed"
                )));
            }
            // SAFETY: F_GETFD only queries the descriptor table.
            if *fd < 0 || unsafe { libc::fcntl(*fd, libc::F_GETFD) } == -1 {
                return Err(CheckpointError::InvalidRequest(format!(
                    "fd {fd} to pass as {key} is not open in this process"
                )));
            }
        }
        let log_file = match &req.log_file {
            Some(l) => absolute(l)?,
            None => sibling_file(&images_dir, "restore.log"),
        };
        let pidfile = match &req.pidfile {
            Some(p) => absolute(p)?,
            None => sibling_file(&images_dir, "restore.pid"),
        };
        remove_stale(&log_file)?;
        remove_stale(&pidfile)?;

        let fds: Vec<i32> = req.inherit_fds.iter().map(|(fd, _)| *fd).collect();
        let worker = match how {
            Via::Worker(w) => Some(w),
            Via::NewWorker => Some(CriuWorker::spawn_borrowing(&self.bin, &fds)?),
            Via::Command => None,
        };
        // An image with TCP connections (see `DumpRequest::tcp_established`) is restored
        // with the options it was dumped with.
        let tcp = has_tcp_streams(&images_dir);
        if let Some(worker) = worker {
            let t0 = Instant::now();
            let (base, _work_dir) = rpc_opts(&images_dir, &log_file, req.leave_stopped)?;
            let opts = rpc::Opts {
                rst_sibling: Some(true),
                tcp_established: tcp.then_some(true),
                network_lock: tcp.then_some(rpc::NetworkLock::Skip as i32),
                inherit_fd: req
                    .inherit_fds
                    .iter()
                    .map(|(fd, key)| rpc::InheritFd {
                        key: key.clone(),
                        fd: *fd,
                    })
                    .collect(),
                ..base
            };
            let resp = worker.call("criu restore", &rpc::Req::new(rpc::ReqType::Restore, opts))?;
            let duration = t0.elapsed();
            let pid = resp.restore.as_ref().map_or(-1, |r| r.pid);
            if !resp.success || pid <= 0 {
                let (status, reason, log_tail) = rpc_failure(&log_file, &resp);
                return Err(CheckpointError::RestoreFailed {
                    images_dir,
                    status,
                    reason,
                    log_file,
                    log_tail,
                });
            }
            fs::write(&pidfile, pid.to_string())
                .map_err(|e| CheckpointError::io(format!("write {}", pidfile.display()), e))?;
            return Ok(RestoreReport {
                pid,
                duration,
                log_file,
                waiter: None,
            });
        }

        let mut args = command_args("restore", &images_dir, &log_file, req.leave_stopped);
        args.extend(["--pidfile".into(), pidfile.clone().into_os_string()]);
        if req.detached {
            args.push("--restore-detached".into());
        }
        if tcp {
            args.extend(["--tcp-established", "--network-lock", "skip"].map(OsString::from));
        }
        for (fd, key) in &req.inherit_fds {
            args.extend(["--inherit-fd".into(), format!("fd[{fd}]:{key}").into()]);
        }
        args.extend(req.extra_args.iter().cloned());

        let t0 = Instant::now();
        if req.detached {
            let out = self.run("criu restore", args, &fds)?;
            let duration = t0.elapsed();
            if !out.status.success() {
                let (reason, log_tail) = failure_reason(&log_file, &out);
                return Err(CheckpointError::RestoreFailed {
                    images_dir,
                    status: out.status.to_string(),
                    reason,
                    log_file,
                    log_tail,
                });
            }
            let pid = read_pidfile(&pidfile)?.ok_or_else(|| {
                CheckpointError::io(
                    format!(
                        "criu restore succeeded but wrote no pid to {}",
                        pidfile.display()
                    ),
                    io::ErrorKind::InvalidData.into(),
                )
            })?;
            return Ok(RestoreReport {
                pid,
                duration,
                log_file,
                waiter: None,
            });
        }

        // Attached: criu stays the tree's parent, so it cannot be waited for; the pidfile tells
        // when the tree runs. criu's output goes to its log, not to pipes nobody would drain.
        let mut cmd = self.command(args, &fds);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(|source| CheckpointError::Spawn {
            what: "criu restore",
            bin: self.bin.clone(),
            source,
        })?;
        loop {
            if let Some(pid) = read_pidfile(&pidfile)? {
                return Ok(RestoreReport {
                    pid,
                    duration: t0.elapsed(),
                    log_file,
                    waiter: Some(child),
                });
            }
            let exited = child
                .try_wait()
                .map_err(|e| CheckpointError::io("wait for criu restore", e))?;
            if let Some(status) = exited {
                // It may have written the pidfile just before exiting (a tree that ran and ended).
                if let (true, Some(pid)) = (status.success(), read_pidfile(&pidfile)?) {
                    return Ok(RestoreReport {
                        pid,
                        duration: t0.elapsed(),
                        log_file,
                        waiter: Some(child),
                    });
                }
                let (reason, log_tail) = failure_reason(
                    &log_file,
                    &Output {
                        status,
                        stdout: Vec::new(),
                        stderr: Vec::new(),
                    },
                );
                return Err(CheckpointError::RestoreFailed {
                    images_dir,
                    status: status.to_string(),
                    reason,
                    log_file,
                    log_tail,
                });
            }
            if t0.elapsed() > ATTACHED_RESTORE_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CheckpointError::Timeout(format!(
                    "criu restore from {} wrote no pidfile within {ATTACHED_RESTORE_TIMEOUT:?} (log {})",
                    images_dir.display(),
                    log_file.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A criu command whose child keeps `fds` open (without close-on-exec) at their numbers.
    fn command(&self, args: impl IntoIterator<Item = OsString>, fds: &[i32]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).stdin(Stdio::null());
        if !fds.is_empty() {
            let fds = fds.to_vec();
            // SAFETY: the closure runs between fork and exec and only calls fcntl(2), which is
            // async-signal-safe; it allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    for &fd in &fds {
                        if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    fn run(
        &self,
        what: &'static str,
        args: impl IntoIterator<Item = OsString>,
        fds: &[i32],
    ) -> Result<Output, CheckpointError> {
        self.command(args, fds)
            .output()
            .map_err(|source| CheckpointError::Spawn {
                what,
                bin: self.bin.clone(),
                source,
            })
    }
}

impl CheckpointBackend for Criu {
    fn name(&self) -> &str {
        "criu"
    }

    fn check(&self) -> Result<String, CheckpointError> {
        Criu::check(self)
    }

    fn dump(&self, req: &DumpRequest) -> Result<DumpReport, CheckpointError> {
        Criu::dump(self, req)
    }

    fn restore(&self, req: &RestoreRequest) -> Result<RestoreReport, CheckpointError> {
        Criu::restore(self, req)
    }
}

/// How a restore runs.
enum Via {
    /// As a command (`criu restore ...`).
    Command,
    /// On a worker started for it.
    NewWorker,
    /// On a worker started earlier.
    Worker(CriuWorker),
}

impl rpc::Req {
    fn new(kind: rpc::ReqType, opts: rpc::Opts) -> rpc::Req {
        rpc::Req {
            r#type: kind as i32,
            opts: Some(opts),
        }
    }
}

/// The folder of a log file, opened (criu's RPC takes the log as a name in its work folder),
/// and the name.
/// The options every dump and restore request carries: the image folder, criu's log (a name
/// in its folder, whose descriptor the caller keeps open until criu answers) at
/// [`log_level`], and cgroups left alone.
fn rpc_opts(
    images_dir: &Path,
    log_file: &Path,
    leave_stopped: bool,
) -> Result<(rpc::Opts, OwnedFd), CheckpointError> {
    let (work_dir, log_name) = log_place(log_file)?;
    let opts = rpc::Opts {
        images_dir_fd: -1,
        images_dir: Some(path_str(images_dir)?),
        log_level: Some(log_level()),
        manage_cgroups_mode: Some(rpc::CgroupMode::Ignore as i32),
        log_file: Some(log_name),
        work_dir_fd: Some(work_dir.as_raw_fd()),
        leave_stopped: Some(leave_stopped),
        ..Default::default()
    };
    Ok((opts, work_dir))
}

/// The same options as command-line arguments, after `verb` (`dump`, `restore`).
fn command_args(
    verb: &str,
    images_dir: &Path,
    log_file: &Path,
    leave_stopped: bool,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        verb.into(),
        "--images-dir".into(),
        images_dir.as_os_str().to_owned(),
        "-o".into(),
        log_file.as_os_str().to_owned(),
        format!("-v{}", log_level()).into(),
        "--manage-cgroups=ignore".into(),
    ];
    if leave_stopped {
        args.push("--leave-stopped".into());
    }
    args
}

fn log_place(log_file: &Path) -> Result<(OwnedFd, String), CheckpointError> {
    let (Some(dir), Some(name)) = (log_file.parent(), log_file.file_name()) else {
        return Err(CheckpointError::InvalidRequest(format!(
            "log file {} has no folder",
            log_file.display()
        )));
    };
    let name = name.to_str().ok_or_else(|| {
        CheckpointError::InvalidRequest(format!("log file {} is not UTF-8", log_file.display()))
    })?;
    let dir = fs::File::open(dir)
        .map_err(|e| CheckpointError::io(format!("open {}", dir.display()), e))?;
    Ok((dir.into(), name.to_string()))
}

fn path_str(p: &Path) -> Result<String, CheckpointError> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| CheckpointError::InvalidRequest(format!("{} is not UTF-8", p.display())))
}

fn absolute(p: &Path) -> Result<PathBuf, CheckpointError> {
    // criu resolves relative log/pidfile paths against the images dir, not our cwd.
    std::path::absolute(p)
        .map_err(|e| CheckpointError::io(format!("resolve path {}", p.display()), e))
}

/// criu's ghost limit is 32 bits wide.
fn ghost_limit(bytes: u64) -> u32 {
    bytes.min(u32::MAX as u64) as u32
}

/// Whether a dump holds TCP connections (criu writes one `tcp-stream-ID.img` for each).
fn has_tcp_streams(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("tcp-stream-"))
        })
    })
}

fn has_images(dir: &Path) -> Result<bool, CheckpointError> {
    let entries =
        fs::read_dir(dir).map_err(|e| CheckpointError::io(format!("read {}", dir.display()), e))?;
    Ok(entries
        .flatten()
        .any(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".img"))))
}

fn remove_stale(path: &Path) -> Result<(), CheckpointError> {
    // A leftover from an earlier run would be mistaken for this run's log or pid.
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CheckpointError::io(
            format!("remove stale {}", path.display()),
            e,
        )),
    }
}

fn read_pidfile(path: &Path) -> Result<Option<i32>, CheckpointError> {
    match fs::read_to_string(path) {
        // criu creates the file, then writes the pid in one write: empty means "not yet".
        Ok(s) => Ok(s.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CheckpointError::io(
            format!("read pidfile {}", path.display()),
            e,
        )),
    }
}
