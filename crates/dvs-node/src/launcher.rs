//! Launching application processes as endpoints: each in its own PID namespace, as a session
//! leader, with stdio in a log file and no inherited descriptors, so that CRIU can later
//! checkpoint it (docs/ARCHITECTURE.md §7.3).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use dvs_wire::{DcId, Ep};
use tracing::{info, warn};

use crate::ctl::{ProcState, ProcStatus};
use crate::State;

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

    /// Marks the process whose namespace init is `pid` as migrated to `to`.
    pub fn migrated_away(&mut self, pid: i32, to: dvs_wire::NodeId) {
        for (launcher, p) in self.by_pid.iter_mut() {
            if *launcher == pid || dvs_checkpoint::children_of(*launcher).contains(&pid) {
                p.migrated_to = Some(to);
            }
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

/// Starts `cmd` as endpoint `{dc, ep}` of this node; returns its launcher's pid and log path.
pub(crate) fn launch(
    state: &State,
    dc: DcId,
    ep: Ep,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
) -> Result<(i32, PathBuf), String> {
    let (me, cfg, umask) = {
        let s = state.borrow();
        (s.me.clone(), s.cfg.clone(), s.app_umask)
    };
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
    let logs = me.runtime_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let log = logs.join(format!("{}-{ep}.log", dcc.name));
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    // unshare forks the program as pid 1 of a new PID namespace; setsid makes it a session
    // leader. Not --kill-child: CRIU would restore that parent-death signal and the restored
    // process would die with its restorer.
    let mut command = tokio::process::Command::new("unshare");
    command
        .args(["--pid", "--fork", "setsid", "--"])
        .args(&cmd)
        .env("DVS_SOCKET", me.ipc_socket())
        .env("DVS_DC", dc.to_string())
        .env("DVS_EP", ep.to_string())
        .env("DVS_NODE", me.id.to_string())
        .envs(env)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .current_dir(&me.runtime_dir);
    // The node runs with umask 077; the program gets the umask the node was started with.
    // SAFETY: umask(2) is async-signal-safe and touches no memory.
    unsafe {
        command.pre_exec(move || {
            libc::umask(umask as libc::mode_t);
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd[0]))?;
    let pid = child
        .id()
        .map(|p| p as i32)
        .ok_or("the process ended at once")?;
    info!(pid, dc, ep, cmd = ?cmd, "launched");
    // The launch record: what a cooperative migration restarts on its destination.
    let record = crate::dir::DirOp::PutLaunch {
        dc,
        ep,
        cmd: cmd.clone(),
    };
    if state.borrow().dir_tx.send(record).is_err() {
        warn!("directory worker is gone; no launch record for {dc}/{ep}");
    }
    state.borrow_mut().procs.by_pid.insert(
        pid,
        Proc {
            dc,
            ep,
            cmd,
            log: log.clone(),
            started: Instant::now(),
            ended: None,
            migrated_to: None,
        },
    );
    let st = state.clone();
    tokio::task::spawn_local(async move {
        let ended = match child.wait().await {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                match (s.code(), s.signal()) {
                    (Some(c), _) => Ended::Code(c),
                    (_, Some(sig)) => Ended::Signal(sig),
                    _ => Ended::Code(-1),
                }
            }
            Err(e) => {
                warn!(pid, "cannot wait for the process: {e}");
                Ended::Code(-1)
            }
        };
        info!(pid, ?ended, "process ended");
        if let Some(p) = st.borrow_mut().procs.by_pid.get_mut(&pid) {
            p.ended = Some(ended);
        }
    });
    Ok((pid, log))
}

/// How the process with launcher pid `pid` ended, if it did.
pub(crate) fn ended(state: &State, pid: i32) -> Option<Ended> {
    state.borrow().procs.by_pid.get(&pid).and_then(|p| p.ended)
}
