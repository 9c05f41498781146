//! Launching application processes as endpoints: each in its own PID namespace, as a session
//! leader, with stdio in a log file and no inherited descriptors, so that CRIU can later
//! checkpoint it (docs/ARCHITECTURE.md §7.3).
//!
//! [`start`] checks the request and opens the log off the event loop; the event loop then
//! starts the program ([`Node::launch`]) and keeps it in its process table.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dvs_wire::{DcId, Ep};
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::ctl::{ProcState, ProcStatus};
use crate::dir::{DirJob, LaunchRecord};
use crate::event_loop::{blocking, Ctx, Event, Node};

/// How a launched process ended.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ended {
    Code(i32),
    Signal(i32),
}

pub(crate) struct Proc {
    pub dc: DcId,
    pub ep: Ep,
    pub cmd: Vec<String>,
    pub log: PathBuf,
    pub started: Instant,
    pub ended: Option<Ended>,
    /// The process was migrated to this node.
    pub migrated_to: Option<dvs_wire::NodeId>,
}

/// The processes launched by this node, by host pid of their launcher.
#[derive(Default)]
pub(crate) struct Procs {
    pub by_pid: BTreeMap<i32, Proc>,
}

impl Procs {
    /// Kills every running process: the namespace's init first (which takes the rest of its
    /// namespace with it), then the launcher.
    pub fn kill_all(&mut self) {
        for (pid, p) in &self.by_pid {
            if p.ended.is_none() {
                if let Err(e) = dvs_checkpoint::kill_tree(*pid) {
                    warn!(pid, "cannot kill the process tree: {e}");
                }
            }
        }
    }

    /// The pids of every process launched here (their launchers').
    pub fn launchers(&self) -> Vec<i32> {
        self.by_pid.keys().copied().collect()
    }

    /// Marks the processes of `launchers` (whose trees held the migrated process) as migrated
    /// to `to`.
    pub fn migrated_away(&mut self, launchers: &[i32], to: dvs_wire::NodeId) {
        for l in launchers {
            if let Some(p) = self.by_pid.get_mut(l) {
                p.migrated_to = Some(to);
            }
        }
    }

    /// Records how the process with launcher pid `pid` ended.
    pub fn ended(&mut self, pid: i32, ended: Ended) {
        if let Some(p) = self.by_pid.get_mut(&pid) {
            p.ended = Some(ended);
        }
    }

    /// The endpoint the running process with launcher pid `pid` was launched for.
    pub fn endpoint_of(&self, pid: i32) -> Option<(DcId, Ep)> {
        self.by_pid
            .get(&pid)
            .filter(|p| p.ended.is_none() && p.migrated_to.is_none())
            .map(|p| (p.dc, p.ep))
    }

    /// Command line of the running process launched as `{dc, ep}`.
    pub fn cmd_of(&self, dc: DcId, ep: Ep) -> Option<Vec<String>> {
        self.by_pid
            .values()
            .rev()
            .find(|p| p.dc == dc && p.ep == ep && p.ended.is_none() && p.migrated_to.is_none())
            .map(|p| p.cmd.clone())
    }

    /// Status of every process, for `dvs ps`.
    pub fn status(&self) -> Vec<ProcStatus> {
        self.by_pid
            .iter()
            .map(|(pid, p)| ProcStatus {
                pid: *pid,
                dc: p.dc,
                ep: p.ep,
                cmd: p.cmd.clone(),
                log: p.log.display().to_string(),
                age_ms: p.started.elapsed().as_millis() as u64,
                state: match (p.migrated_to, p.ended) {
                    (Some(n), _) => ProcState::MigratedTo(n),
                    (None, None) => ProcState::Running,
                    (None, Some(Ended::Code(c))) => ProcState::Exited(c),
                    (None, Some(Ended::Signal(s))) => ProcState::Killed(s),
                },
            })
            .collect()
    }
}

/// A program to start, its log open.
pub(crate) struct LaunchJob {
    program: Program,
    log: PathBuf,
    /// The log's length before the program starts: where its output begins.
    log_start: u64,
    reply: oneshot::Sender<Result<Launched, String>>,
}

/// What runs as `{dc, ep}`, and where its output goes.
struct Program {
    dc: DcId,
    ep: Ep,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    out: std::fs::File,
    workdir: Option<PathBuf>,
}

/// A program the node started.
pub(crate) struct Launched {
    /// Its launcher's pid.
    pub pid: i32,
    /// Its log.
    pub log: PathBuf,
    /// Where its output begins in the log (earlier runs of the endpoint wrote before).
    pub log_start: u64,
    /// How it ends, once it does.
    pub exit: oneshot::Receiver<Ended>,
}

/// Starts `cmd` as endpoint `{dc, ep}` of this node: checks the request, opens the log on the
/// blocking pool, then has the event loop start the program.
pub(crate) async fn start(
    ctx: &Ctx,
    dc: DcId,
    ep: Ep,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    workdir: Option<PathBuf>,
) -> Result<Launched, String> {
    let name = check(ctx, dc, ep, &cmd)?;
    if let Some(w) = &workdir {
        if !crate::workdir::is_plain(w) {
            return Err(format!(
                "the working folder {} is not an absolute path without . or .. (nor /)",
                w.display()
            ));
        }
    }
    let logs = ctx.me.runtime_dir.join("logs");
    let wd = workdir.clone();
    let (log, out, log_start) = blocking(move || {
        if let Some(w) = &wd {
            std::fs::create_dir_all(w)
                .map_err(|e| format!("cannot create the working folder {}: {e}", w.display()))?;
            if !w.is_dir() {
                return Err(format!(
                    "the working folder {} is not a folder",
                    w.display()
                ));
            }
        }
        open_log(&logs, &name, ep)
    })
    .await??;
    let (reply, answer) = oneshot::channel();
    let program = Program {
        dc,
        ep,
        cmd,
        env,
        out,
        workdir,
    };
    let job = LaunchJob {
        program,
        log,
        log_start,
        reply,
    };
    let stopping = || "the node kernel is stopping".to_string();
    ctx.events
        .send(Event::Launch(job))
        .await
        .map_err(|_| stopping())?;
    answer.await.map_err(|_| stopping())?
}

/// Whether `cmd` may run as `{dc, ep}` here; the DC's name if so.
fn check(ctx: &Ctx, dc: DcId, ep: Ep, cmd: &[String]) -> Result<String, String> {
    let (cfg, me) = (&ctx.cfg, &ctx.me);
    let dcc = cfg
        .dc_by_id(dc)
        .ok_or_else(|| format!("no DC {dc} in the cluster config"))?;
    if !cfg.dc_nodes(dcc).contains(&me.id) {
        return Err(format!(
            "DC {} does not span node {} ({})",
            dcc.name, me.name, me.id
        ));
    }
    if !dvs_config::ClusterConfig::ep_in_range(dcc, ep) {
        return Err(format!(
            "endpoint {ep} is out of range for DC {} (0..{})",
            dcc.name, dcc.max_endpoints
        ));
    }
    if cmd.is_empty() {
        return Err("no command given".into());
    }
    Ok(dcc.name.clone())
}

/// Opens (appending) the log of `{dc, ep}` in `logs`; also returns its length.
fn open_log(logs: &Path, dc_name: &str, ep: Ep) -> Result<(PathBuf, std::fs::File, u64), String> {
    std::fs::create_dir_all(logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let log = logs.join(format!("{dc_name}-{ep}.log"));
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let len = out.metadata().map_err(|e| e.to_string())?.len();
    Ok((log, out, len))
}

impl Node {
    /// Starts a program whose log is open, and answers whoever asked.
    pub(crate) fn launch(&mut self, job: LaunchJob) {
        let LaunchJob {
            program,
            log,
            log_start,
            reply,
        } = job;
        let r = self
            .spawn_program(program, &log)
            .map(|(pid, exit)| Launched {
                pid,
                log,
                log_start,
                exit,
            });
        let _ = reply.send(r);
    }

    /// Forks and execs the program (a short syscall pair, done on the loop like a vcopy),
    /// records it, and watches for its end: its pid, and how it ends once it does.
    fn spawn_program(
        &mut self,
        program: Program,
        log: &Path,
    ) -> Result<(i32, oneshot::Receiver<Ended>), String> {
        let Program {
            dc,
            ep,
            cmd,
            env,
            out,
            workdir,
        } = program;
        let me = &self.ctx.me;
        let umask = self.ctx.app_umask;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        // The program is pid 1 of a new PID namespace and a session leader (criu dumps only a
        // tree whose session is inside it), started without helper programs. No parent-death
        // signal: CRIU would restore it, and the restored process would die with its
        // restorer.
        let mut vars: Vec<(std::ffi::OsString, std::ffi::OsString)> = vec![
            ("DVS_SOCKET".into(), me.ipc_socket().into()),
            ("DVS_DC".into(), dc.to_string().into()),
            ("DVS_EP".into(), ep.to_string().into()),
            ("DVS_NODE".into(), me.id.to_string().into()),
        ];
        vars.extend(env.into_iter().map(|(k, v)| (k.into(), v.into())));
        let spawn = dvs_checkpoint::PidNsCommand {
            program: cmd[0].clone().into(),
            args: cmd[1..].iter().map(Into::into).collect(),
            env: vars,
            cwd: workdir.clone().unwrap_or_else(|| me.runtime_dir.clone()),
            stdout: out.into(),
            stderr: err.into(),
            // The node runs with umask 077; the program gets the umask the node was started
            // with.
            umask,
        };
        let child = dvs_checkpoint::spawn_pid_ns_init(&spawn)
            .map_err(|e| format!("cannot start {:?}: {e}", cmd[0]))?;
        drop(spawn);
        let pid = child.pid;
        info!(pid, dc, ep, cmd = ?cmd, "launched");
        // The launch record: what a cooperative migration restarts on its destination.
        self.directory(DirJob::Launch(LaunchRecord::Put {
            dc,
            ep,
            cmd: cmd.clone(),
        }));
        if let Some(w) = &workdir {
            self.migrations.workdirs.insert((dc, ep), w.clone());
        } else {
            self.migrations.workdirs.remove(&(dc, ep));
        }
        self.procs.by_pid.insert(
            pid,
            Proc {
                dc,
                ep,
                cmd,
                log: log.to_path_buf(),
                started: Instant::now(),
                ended: None,
                migrated_to: None,
            },
        );
        let (ended_tx, exit) = oneshot::channel();
        let events = self.ctx.events.clone();
        tokio::task::spawn_local(async move {
            let ended = match wait_for_end(child.pidfd).await {
                Ok(dvs_checkpoint::ExitKind::Code(c)) => Ended::Code(c),
                Ok(dvs_checkpoint::ExitKind::Signal(sig)) => Ended::Signal(sig),
                Err(e) => {
                    warn!(pid, "cannot wait for the process: {e}");
                    Ended::Code(-1)
                }
            };
            info!(pid, ?ended, "process ended");
            // The process table learns it first: a `ps` after the waiter's answer sees it.
            let _ = events.send(Event::ProcEnded { pid, ended }).await;
            let _ = ended_tx.send(ended);
        });
        Ok((pid, exit))
    }
}

/// Waits (on the event loop's reactor) until the process of `pidfd` ends, then reaps it.
async fn wait_for_end(pidfd: std::os::fd::OwnedFd) -> std::io::Result<dvs_checkpoint::ExitKind> {
    // SAFETY: the AsyncFd owns the pidfd, which stays open and the same until it is dropped.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(std::io::Error::from)?;
    // A pidfd is readable once its process has ended.
    let _ready = fd.readable().await?;
    dvs_checkpoint::wait_pidfd(fd.get_ref())
        .ok_or_else(|| std::io::Error::other("the process was reaped elsewhere"))
}
