//! The destination's side of a migration: getting ready while the source quiesces and
//! dumps (a criu restorer started ahead), then restoring from the image that arrived (criu)
//! or starting the program with its snapshot (cooperative).
//! Blocking work (criu, image files) runs on the pool; the outcome comes back as an event.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dvs_checkpoint::{Criu, CriuWorker, RestoreRequest};
use dvs_core::{Input, MigrationInput};
use dvs_wire::peer::{Backend, MigrationId};
use dvs_wire::{DcId, Ep, NodeId};
use tracing::{info, warn};

use crate::dir::{DirJob, LaunchRecord};
use crate::event_loop::{blocking, Event, Node};
use crate::migrate::{
    criu, kill_tree_off_loop, reap_later, RestoreResult, Restored, LOCAL_PATHS_FILE, SNAPSHOT_FILE,
    SOCKET_FILE,
};
use crate::workdir;

/// A `criu swrk` started before the image it restores has arrived, holding what the restored
/// process gets in place of its node-local resources.
pub(crate) struct Restorer {
    worker: CriuWorker,
    /// The node's end of the restored process's new connection.
    node_end: UnixStream,
    /// The process's end, open in the worker.
    proc_fd: RawFd,
    /// This node's log file of the endpoint (not for the spare restorer) and its runtime
    /// folder, open in the worker.
    stdout_fd: Option<RawFd>,
    cwd_fd: RawFd,
}

impl Node {
    /// Destination: starts the criu restorer of `id` while the source dumps, with this node's
    /// files for the endpoint open in it. Only when criu is known to work here; otherwise the
    /// restore starts its own.
    pub(crate) fn migr_prepare_restore(
        &mut self,
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        backend: Backend,
        from: NodeId,
    ) {
        // A cooperative program is started only once its snapshot has come: started at
        // START it had about 2 ms of lead here against 5 ms to start, and gained nothing.
        // What to start is asked for now, so that the restart waits for no directory read.
        if backend == Backend::Cooperative {
            let answer = self.launch_record(dc, ep);
            self.migrations.launch_records.insert(id, answer);
            return;
        }
        let Some(Ok(criu)) = self.migrations.criu.clone() else {
            return;
        };
        // A source whose runtime folder this host sees (nodes of one machine) leaves no path
        // to substitute: the spare restorer, started long before, will do, and nothing starts
        // while the source dumps.
        let shares_files = self
            .ctx
            .cfg
            .node_by_id(from)
            .is_some_and(|n| n.runtime_dir.exists());
        if shares_files {
            if let Some(spare) = self.migrations.spare_restorer.take() {
                self.migrations.restorers.insert(id, spare);
                return;
            }
        }
        let Some((runtime_dir, log)) = self.endpoint_log(dc, ep) else {
            return;
        };
        let task =
            tokio::task::spawn_blocking(move || prepare_restorer(&criu, &runtime_dir, Some(log)));
        self.migrations.restorers.insert(id, task);
    }

    /// Starts the spare restorer if there is none and criu works here (after a restore, so
    /// that its start-up competes with no migration).
    pub(crate) fn keep_restorer_ready(&mut self) {
        let Some(Ok(criu)) = self.migrations.criu.clone() else {
            return;
        };
        if self.migrations.spare_restorer.is_some() {
            return;
        }
        let runtime_dir = self.ctx.me.runtime_dir.clone();
        self.migrations.spare_restorer = Some(tokio::task::spawn_blocking(move || {
            prepare_restorer(&criu, &runtime_dir, None)
        }));
    }

    /// (runtime folder, log file) of endpoint `{dc, ep}` on this node.
    fn endpoint_log(&self, dc: DcId, ep: Ep) -> Option<(PathBuf, PathBuf)> {
        self.ctx.cfg.dc_by_id(dc).map(|d| {
            let rt = self.ctx.me.runtime_dir.clone();
            let file = rt.join("logs").join(format!("{}-{ep}.log", d.name));
            (rt, file)
        })
    }

    /// Destination: restores `id` (criu: from its image with a fresh node connection;
    /// cooperative: by starting the program with the snapshot), once every chunk of the
    /// image is written.
    pub(crate) fn migr_restore(
        &mut self,
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        backend: Backend,
        fail: bool,
    ) {
        let dir = self.migrations.images.dir(id);
        let written = self.migrations.images.barrier();
        let events = self.ctx.events.clone();
        match backend {
            Backend::Cooperative => {
                // What to start comes from the directory's launch record, never from a peer.
                let answer = match self.migrations.launch_records.remove(&id) {
                    Some(answer) => answer,
                    None => self.launch_record(dc, ep),
                };
                let ctx = self.ctx.clone();
                let snapshot = dir.join(SNAPSHOT_FILE);
                tokio::task::spawn_local(async move {
                    let _ = written.await;
                    // The program reports itself with `BindRestored`; only a failure is told.
                    let started = async {
                        // The working folder that came with the snapshot goes in place, and
                        // the program starts in it.
                        let image = dir.clone();
                        let unpacked = blocking(move || workdir::unpack(&image)).await??;
                        let folder = unpacked.as_ref().map(|u| u.path.clone());
                        if let Some(unpacked) = unpacked.filter(|u| u.created) {
                            let ev = Event::WorkdirUnpacked {
                                id,
                                dc,
                                ep,
                                unpacked,
                            };
                            let _ = events.send(ev).await;
                        }
                        relaunch(&ctx, id, dc, ep, snapshot, answer, folder).await
                    };
                    if let Err(e) = started.await {
                        let done = MigrationInput::Restored { id, result: Err(e) };
                        let _ = events.send(Event::Input(Input::Migration(done))).await;
                    }
                });
            }
            Backend::Criu => {
                let cached = self.migrations.criu.clone();
                let log = self.endpoint_log(dc, ep);
                let prepared = self.migrations.restorers.remove(&id);
                tokio::task::spawn_local(async move {
                    let _ = written.await;
                    let restorer = match prepared {
                        Some(task) => match task.await {
                            Ok(Ok(r)) => Some(r),
                            Ok(Err(e)) => {
                                warn!("the criu restorer started ahead failed ({e}); starting another");
                                None
                            }
                            Err(_) => None,
                        },
                        None => None,
                    };
                    let result = match criu(&events, cached).await {
                        Err(e) => Err((format!("criu does not work on this node: {e}"), None)),
                        Ok(criu) => blocking(move || restore(&criu, &dir, log, restorer, fail))
                            .await
                            .unwrap_or_else(|e| Err((e, None))),
                    };
                    let ev = Event::CriuRestored { id, dc, ep, result };
                    let _ = events.send(ev).await;
                });
            }
        }
    }

    /// Asks the directory for the command line `{dc, ep}` was launched with.
    fn launch_record(&mut self, dc: DcId, ep: Ep) -> crate::migrate::LaunchRecordAnswer {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.directory(DirJob::Launch(LaunchRecord::Get { dc, ep, reply }));
        answer
    }

    /// Destination: a criu restore finished; the process's connection is served from now on.
    pub(crate) fn criu_restored(
        &mut self,
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        result: RestoreResult,
    ) {
        let result = match result {
            Ok((node_end, pid, unpacked)) => match self.adopt(node_end, dc, ep) {
                Ok(conn) => {
                    match &unpacked {
                        Some(u) => self.migrations.workdirs.insert((dc, ep), u.path.clone()),
                        None => self.migrations.workdirs.remove(&(dc, ep)),
                    };
                    self.migrations.restored.insert(
                        pid,
                        Restored {
                            dc,
                            ep,
                            since: Instant::now(),
                            // A criu image carries no command line.
                            cmd: Vec::new(),
                            unpacked: unpacked.filter(|u| u.created),
                            resumed: false,
                        },
                    );
                    reap_later(pid);
                    Ok((conn, pid))
                }
                Err(e) => {
                    kill_tree_off_loop(pid);
                    reap_later(pid);
                    if let Some(u) = unpacked {
                        tokio::task::spawn_blocking(move || u.undo());
                    }
                    Err(e.to_string())
                }
            },
            Err((e, killed)) => {
                if let Some(pid) = killed {
                    reap_later(pid);
                }
                Err(e)
            }
        };
        self.input(Input::Migration(MigrationInput::Restored { id, result }));
    }
}

/// The environment a cooperatively restored program reads (see `m3ipc::Endpoint::from_env`).
const RESTORE_MIGRATION: &str = "DVS_RESTORE_MIGRATION";
const RESTORE_FILE: &str = "DVS_RESTORE_FILE";

/// Starts the program of `{dc, ep}` (its launch record is `answer`) with its snapshot in
/// `snapshot`.
async fn relaunch(
    ctx: &crate::event_loop::Ctx,
    id: MigrationId,
    dc: DcId,
    ep: Ep,
    snapshot: PathBuf,
    answer: crate::migrate::LaunchRecordAnswer,
    workdir: Option<PathBuf>,
) -> Result<(), String> {
    let env = vec![
        (RESTORE_MIGRATION.to_string(), id.to_string()),
        (RESTORE_FILE.to_string(), snapshot.display().to_string()),
    ];
    let cmd = answer
        .await
        .unwrap_or_else(|_| Err("the directory worker dropped the request".into()))?;
    crate::launcher::start(ctx, dc, ep, cmd, env, workdir)
        .await
        .map(|_| ())
}

/// Starts a criu worker holding a new connection's process end, this node's log file of the
/// endpoint and its runtime folder (blocking).
fn prepare_restorer(
    criu: &Criu,
    runtime_dir: &Path,
    log: Option<PathBuf>,
) -> Result<Restorer, String> {
    let (node_end, proc_end) = UnixStream::pair().map_err(|e| e.to_string())?;
    let cwd = std::fs::File::open(runtime_dir)
        .map_err(|e| format!("cannot open {}: {e}", runtime_dir.display()))?;
    let mut fds: Vec<OwnedFd> = vec![proc_end.into(), cwd.into()];
    if let Some(file) = &log {
        fds.push(open_log(file).map_err(|(e, _)| e)?.into());
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let worker = criu.spawn_worker(fds).map_err(|e| e.to_string())?;
    Ok(Restorer {
        worker,
        node_end,
        proc_fd: raw[0],
        cwd_fd: raw[1],
        stdout_fd: raw.get(2).copied(),
    })
}

/// Restores the image in `dir` with a new connection to this node in place of the one the
/// process had (blocking: runs criu), on `restorer` if one was started ahead. `log` is this
/// node's (runtime folder, log file of the endpoint). With `fail`, kills the restored copy
/// and fails.
fn restore(
    criu: &Criu,
    dir: &Path,
    log: Option<(PathBuf, PathBuf)>,
    restorer: Option<Restorer>,
    fail: bool,
) -> RestoreResult {
    let inode: u64 = std::fs::read_to_string(dir.join(SOCKET_FILE))
        .map_err(|e| (format!("image has no {SOCKET_FILE}: {e}"), None))?
        .trim()
        .parse()
        .map_err(|_| (format!("bad {SOCKET_FILE}"), None))?;
    // First the working folder, which the process's cwd may be: it is not missing then.
    let unpacked = workdir::unpack(dir).map_err(|e| (e, None))?;
    let substitutes = local_files_missing(dir);
    let undo = |e: (String, Option<i32>)| {
        if let Some(u) = &unpacked {
            u.undo();
        }
        e
    };
    let restored = restore_image(criu, dir, inode, log, restorer, substitutes);
    let (node_end, pid) = restored.map_err(undo)?;
    if fail {
        let _ = dvs_checkpoint::kill_tree(pid);
        return Err(undo((
            "injected failure (--fail-at restore)".to_string(),
            Some(pid),
        )));
    }
    Ok((node_end, pid, unpacked))
}

/// The criu part of [`restore`].
fn restore_image(
    criu: &Criu,
    dir: &Path,
    inode: u64,
    log: Option<(PathBuf, PathBuf)>,
    restorer: Option<Restorer>,
    substitutes: Vec<(LocalPath, String)>,
) -> Result<(UnixStream, i32), (String, Option<i32>)> {
    // A spare restorer holds no log file: it cannot serve an image that needs one.
    let restorer = restorer.filter(|r| {
        r.stdout_fd.is_some()
            || !substitutes
                .iter()
                .any(|(what, _)| matches!(what, LocalPath::Stdout))
    });
    let (node_end, pid) = match restorer {
        Some(r) => {
            let mut req = RestoreRequest::new(dir).inherit_unix_socket(r.proc_fd, inode);
            req.leave_stopped = true;
            for (what, key) in substitutes {
                let fd = match what {
                    LocalPath::Stdout => r.stdout_fd.expect("checked above"),
                    LocalPath::Cwd => r.cwd_fd,
                };
                req.inherit_fds.push((fd, key));
            }
            let worker_age = r.worker.age();
            let report = criu
                .restore_with(r.worker, &req)
                .map_err(|e| (e.to_string(), None))?;
            info!(
                pid = report.pid,
                ms = report.duration.as_secs_f64() * 1000.0,
                worker_ready_ms = worker_age.as_secs_f64() * 1000.0,
                "criu restore"
            );
            let pid = report.pid;
            (r.node_end, pid)
        }
        None => {
            let (node_end, proc_end) = UnixStream::pair().map_err(|e| (e.to_string(), None))?;
            let mut req = RestoreRequest::new(dir).inherit_unix_socket(proc_end.as_raw_fd(), inode);
            req.leave_stopped = true;
            // Kept open until criu has run: criu dups them into the process.
            let mut open = Vec::new();
            if let Some((runtime_dir, file)) = &log {
                for (what, key) in substitutes {
                    let f = match what {
                        LocalPath::Stdout => open_log(file)?,
                        LocalPath::Cwd => std::fs::File::open(runtime_dir).map_err(|e| {
                            (format!("cannot open {}: {e}", runtime_dir.display()), None)
                        })?,
                    };
                    req.inherit_fds.push((f.as_raw_fd(), key));
                    open.push(f);
                }
            }
            let pid = criu
                .restore(&req)
                .map(|r| r.pid)
                .map_err(|e| (e.to_string(), None))?;
            (node_end, pid)
        }
    };
    Ok((node_end, pid))
}

/// This node's log file of an endpoint, created if missing, for appending.
fn open_log(log: &Path) -> Result<std::fs::File, (String, Option<i32>)> {
    if let Some(logs) = log.parent() {
        std::fs::create_dir_all(logs)
            .map_err(|e| (format!("cannot create {}: {e}", logs.display()), None))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| (format!("cannot open {}: {e}", log.display()), None))
}

/// A node-local path an image refers to.
enum LocalPath {
    /// The process's stdout: the endpoint's log on the source node.
    Stdout,
    /// Its working folder (the source node's runtime folder).
    Cwd,
}

/// The node-local files an image refers to by path that a host without the source node's
/// runtime folder (another machine) lacks, so that criu could not reopen them, with the key
/// criu knows each by: the restored process gets this node's own in their place. On one
/// machine the source's files exist and the process keeps them, as before.
fn local_files_missing(dir: &Path) -> Vec<(LocalPath, String)> {
    let Ok(list) = std::fs::read_to_string(dir.join(LOCAL_PATHS_FILE)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in list.lines() {
        let Some((what, dumped)) = line.split_once(' ') else {
            continue;
        };
        // criu names a file by its path without the leading '/'; a name with blanks cannot
        // be passed, and criu then fails on it as it would have anyway.
        let Some(key) = dumped.strip_prefix('/') else {
            continue;
        };
        if Path::new(dumped).exists() || key.is_empty() || key.contains(char::is_whitespace) {
            continue;
        }
        let what = match what {
            "stdout" => LocalPath::Stdout,
            "cwd" => LocalPath::Cwd,
            _ => continue,
        };
        out.push((what, key.to_string()));
    }
    out
}
