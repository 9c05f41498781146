//! The daemon's part of a migration on the source, and what both sides share: running the
//! checkpoint, streaming and storing images, the processes restored here, and reporting
//! progress to whoever asked. The destination's side is in `restore.rs`; the protocol itself
//! is in `dvs_core::node::migration`.
//!
//! The event loop only starts these steps: criu, image files and `/proc` walks run on the
//! blocking pool (or the image writer thread, see `images.rs`), and their outcome comes back
//! as an event.

use dvs_core::{Input, MigrationInput};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dvs_checkpoint::{Criu, DumpRequest};
use dvs_core::{MigrationReport, Phase};
use dvs_wire::peer::{ImageChunk, MigrationId};
use dvs_wire::{DcId, Ep, NodeId};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::{info, warn};

use crate::ctl::CtlResponse;
use crate::event_loop::{blocking, Event, Events, Node};
use crate::images::{stream_image, DumpState, ImageStore, LIVE_STREAM_MIN};
use crate::safe_fs;
use crate::workdir::{self, Unpacked};

/// File in an image folder naming the socket inode the process's node connection had.
pub(crate) const SOCKET_FILE: &str = "dvs-socket-inode";
/// The file in a criu image folder naming, at the dump, the process's stdout (its log on the
/// source node) when that was a regular file, and its working folder: `stdout PATH`,
/// `cwd PATH`, a line each.
pub(crate) const LOCAL_PATHS_FILE: &str = "dvs-local-paths";
/// File of a cooperative snapshot.
pub(crate) const SNAPSHOT_FILE: &str = "snapshot.bin";

/// How a criu restore went: the restored process's pid and the node's end of its new
/// connection; or why not, with the pid of a restored copy that was killed and is still to be
/// reaped.
pub(crate) type RestoreResult = Result<(UnixStream, i32, Option<Unpacked>), (String, Option<i32>)>;

/// A process restored here by a migration (the node is its subreaper).
pub(crate) struct Restored {
    pub dc: DcId,
    pub ep: Ep,
    pub since: Instant,
    /// The program's command line, carried from node to node (a later cooperative
    /// migration restarts it).
    pub cmd: Vec<String>,
    /// The working folder this node unpacked for it, if it created one: removed again if
    /// the copy is killed before it ever ran (a rollback).
    pub unpacked: Option<Unpacked>,
    /// The copy was resumed (its migration committed), so it is the process's own now.
    pub resumed: bool,
}

/// The directory's answer to a launch record request: the command line of an endpoint.
pub(crate) type LaunchRecordAnswer = tokio::sync::oneshot::Receiver<Result<Vec<String>, String>>;

/// Migration bookkeeping of the daemon.
pub(crate) struct Migrations {
    /// Whoever asked for a migration coordinated here, and when it started.
    pub requesters: HashMap<MigrationId, (Instant, mpsc::UnboundedSender<CtlResponse>)>,
    /// Processes restored here, by host pid.
    pub restored: BTreeMap<i32, Restored>,
    /// Whether CRIU works here (checked on first use, and again by `dvs doctor`).
    pub criu: Option<Result<Arc<Criu>, String>>,
    /// The image folders and their writer.
    pub images: ImageStore,
    /// Working folders of the endpoints running here that have one (`dvs run --workdir`):
    /// they travel with a criu migration.
    pub workdirs: HashMap<(DcId, Ep), PathBuf>,
    /// Source: images being sent while criu writes them, by migration.
    pub streams: HashMap<MigrationId, tokio::task::JoinHandle<Result<u64, String>>>,
    /// Destination: criu restorers started when a migration began, by migration.
    pub restorers:
        HashMap<MigrationId, tokio::task::JoinHandle<Result<crate::restore::Restorer, String>>>,
    /// Destination: the launch records of cooperative programs asked for when their
    /// migration began, so that the restart does not wait for the directory.
    pub launch_records: HashMap<MigrationId, LaunchRecordAnswer>,
    /// Destination: working folders created here for cooperative programs restarting, by
    /// migration, until its outcome is known (a rollback removes them).
    pub coop_unpacked: HashMap<MigrationId, (DcId, Ep, Unpacked)>,
    /// A criu restorer started ahead for the next migration from a node of this machine.
    pub spare_restorer: Option<tokio::task::JoinHandle<Result<crate::restore::Restorer, String>>>,
}

impl Migrations {
    /// Bookkeeping with no migration yet.
    pub fn new(images: ImageStore) -> Self {
        Migrations {
            requesters: HashMap::new(),
            restored: BTreeMap::new(),
            criu: None,
            images,
            restorers: HashMap::new(),
            launch_records: HashMap::new(),
            coop_unpacked: HashMap::new(),
            spare_restorer: None,
            streams: HashMap::new(),
            workdirs: HashMap::new(),
        }
    }

    /// Command line of the process restored here as `{dc, ep}`.
    pub fn cmd_of(&self, dc: DcId, ep: Ep) -> Option<Vec<String>> {
        self.restored
            .values()
            .find(|r| r.dc == dc && r.ep == ep && !r.cmd.is_empty())
            .map(|r| r.cmd.clone())
    }

    /// Processes restored here, for `dvs ps`.
    pub fn restored_status(&self) -> Vec<crate::ctl::ProcStatus> {
        self.restored
            .iter()
            .map(|(pid, r)| crate::ctl::ProcStatus {
                pid: *pid,
                dc: r.dc,
                ep: r.ep,
                cmd: if r.cmd.is_empty() {
                    vec!["(restored by a criu migration)".into()]
                } else {
                    r.cmd.clone()
                },
                log: String::new(),
                age_ms: r.since.elapsed().as_millis() as u64,
                state: crate::ctl::ProcState::Running,
            })
            .collect()
    }
}

/// Finds criu and runs `criu check` (blocking: it starts criu).
pub(crate) fn check_criu() -> Result<Arc<Criu>, String> {
    let c = Criu::locate().map_err(|e| e.to_string())?;
    c.check().map_err(|e| e.to_string())?;
    // From the first migration on, a dump worker waits ready (see `Criu::keep_dumper_ready`).
    if let Err(e) = c.keep_dumper_ready() {
        warn!("cannot start a criu worker ahead of the next dump: {e}");
    }
    Ok(Arc::new(c))
}

/// CRIU, if it works on this node (the reason otherwise): `cached` when the event loop knew,
/// else checked now off the loop and reported to it.
pub(crate) async fn criu(
    events: &Events,
    cached: Option<Result<Arc<Criu>, String>>,
) -> Result<Arc<Criu>, String> {
    if let Some(c) = cached {
        return c;
    }
    let c = blocking(check_criu).await.and_then(|c| c);
    let _ = events.send(Event::CriuChecked(c.clone())).await;
    c
}

impl Node {
    pub(crate) fn migr_progress(&mut self, id: MigrationId, phase: Phase) {
        if let Some((t0, tx)) = self.migrations.requesters.get(&id) {
            let _ = tx.send(CtlResponse::MigrPhase {
                phase,
                at_ms: t0.elapsed().as_secs_f64() * 1000.0,
            });
        }
    }

    pub(crate) fn migr_finished(&mut self, id: MigrationId, report: MigrationReport) {
        info!(id = format!("{id:x}"), committed = report.committed, error = ?report.error, ms = report.migration_ms, "migration finished");
        // This node coordinated, so it is the source: once the outcome is decided its image
        // is useless (committed: the process runs on the destination; rolled back: the
        // stopped process itself resumes).
        self.migrations.images.drop_image(id);
        // The next dump's worker starts now, off this migration's path.
        if let Some(Ok(criu)) = self.migrations.criu.clone() {
            tokio::task::spawn_blocking(move || {
                if let Err(e) = criu.keep_dumper_ready() {
                    warn!("cannot start a criu worker ahead of the next dump: {e}");
                }
            });
        }
        if let Some((_, tx)) = self.migrations.requesters.remove(&id) {
            let _ = tx.send(CtlResponse::Migrated(report.clone()));
        }
    }

    /// Source: checkpoints process `pid` with CRIU on the blocking pool, and streams the image
    /// to `to` while criu writes it (the `SendImage` that follows waits for that stream).
    pub(crate) fn migr_checkpoint(
        &mut self,
        id: MigrationId,
        (dc, ep): (DcId, Ep),
        pid: i32,
        to: NodeId,
        fail: bool,
    ) {
        let dir = self.migrations.images.dir(id);
        let workdir = self.migrations.workdirs.get(&(dc, ep)).cloned();
        let cached = self.migrations.criu.clone();
        let events = self.ctx.events.clone();
        let dump = DumpState::dumping();
        if let Some(w) = self.peers.get(&to).map(|l| l.wire.clone()) {
            let stream = tokio::task::spawn_local(stream_image(w, id, dir.clone(), dump.clone()));
            self.migrations.streams.insert(id, stream);
        }
        tokio::task::spawn_local(async move {
            let live = dump.clone();
            let result = match criu(&events, cached).await {
                Err(e) => Err(format!("criu does not work on this node: {e}")),
                Ok(criu) => blocking(move || {
                    if dvs_checkpoint::resident_bytes(pid).unwrap_or(0) >= LIVE_STREAM_MIN {
                        live.send_live();
                    }
                    checkpoint(&criu, pid, &dir, workdir, fail)
                })
                .await
                .and_then(|r| r),
            };
            dump.finish(result.is_ok());
            let done = MigrationInput::CheckpointDone { id, result };
            let _ = events.send(Event::Input(Input::Migration(done))).await;
        });
    }

    /// Source: stores a cooperative snapshot as the image, with the endpoint's working folder
    /// packed beside it, on the blocking pool.
    pub(crate) fn migr_save_snapshot(&mut self, id: MigrationId, data: Vec<u8>, fail: bool) {
        let dir = self.migrations.images.dir(id);
        let workdir = self
            .core
            .coordinated(id)
            .and_then(|key| self.migrations.workdirs.get(&key).cloned());
        let events = self.ctx.events.clone();
        tokio::task::spawn_local(async move {
            let result = blocking(move || {
                let bytes = save_snapshot(&dir, &data, fail)?;
                // The program gave its snapshot and waits for the outcome: its files are as
                // the snapshot knows them.
                match workdir {
                    Some(w) => Ok(bytes + workdir::pack(&w, &dir)?),
                    None => Ok(bytes),
                }
            })
            .await
            .and_then(|r| r);
            let done = MigrationInput::CheckpointDone { id, result };
            let _ = events.send(Event::Input(Input::Migration(done))).await;
        });
    }

    /// Source: streams the image folder to `to` as `MigrImage` frames, or waits for the
    /// stream that began with the checkpoint.
    pub(crate) fn migr_send_image(&mut self, id: MigrationId, to: NodeId) {
        if let Some(stream) = self.migrations.streams.remove(&id) {
            let events = self.ctx.events.clone();
            tokio::task::spawn_local(async move {
                let result = stream.await.map_err(|e| e.to_string()).and_then(|r| r);
                let sent = MigrationInput::ImageSent { id, result };
                let _ = events.send(Event::Input(Input::Migration(sent))).await;
            });
            return;
        }
        let dir = self.migrations.images.dir(id);
        let Some(w) = self.peers.get(&to).map(|l| l.wire.clone()) else {
            let e = format!("the link to node {to} is down");
            let sent = MigrationInput::ImageSent { id, result: Err(e) };
            return self.core.handle(Instant::now(), Input::Migration(sent));
        };
        // Streamed by a task of its own, a chunk at a time: reading and queueing a big image
        // in one go stopped the event loop for seconds (peers then declared its links dead).
        let events = self.ctx.events.clone();
        tokio::task::spawn_local(async move {
            let result = stream_image(w, id, dir, DumpState::dumped()).await;
            let sent = MigrationInput::ImageSent { id, result };
            let _ = events.send(Event::Input(Input::Migration(sent))).await;
        });
    }

    /// Destination: checks one image chunk and has it written (the caller carries out the
    /// core's actions).
    pub(crate) fn migr_image_chunk(
        &mut self,
        from: NodeId,
        chunk: ImageChunk,
        data: Bytes,
        permit: OwnedSemaphorePermit,
    ) {
        let id = chunk.id;
        match self.core.arrival(id) {
            None => return warn!("image chunk for unknown migration {id:x} dropped"),
            Some((_, _, coordinator)) if coordinator != from => {
                // Only the coordinator streams the image: anything else is forged.
                warn!(
                    node = from,
                    "closing the link to a peer that sent an image chunk of migration {id:x}, \
                     which node {coordinator} coordinates"
                );
                if let Some(l) = self.peers.get(&from) {
                    l.wire.close();
                }
                return;
            }
            Some(_) => {}
        }
        // The name comes from a peer: keep it inside the image folder.
        let file = &chunk.file;
        if file.is_empty() || file.contains('/') || file.starts_with('.') {
            return warn!("image file name {file:?} refused");
        }
        let bytes = data.len() as u64;
        self.migrations.images.write(id, chunk, data, permit);
        let arrived = MigrationInput::ImageChunk { id, bytes };
        self.core.handle(Instant::now(), Input::Migration(arrived));
    }

    pub(crate) fn migr_kill_tree(&mut self, pid: i32) {
        kill_tree_off_loop(pid);
        if let Some(r) = self.migrations.restored.remove(&pid) {
            // A copy restored here that never ran (a rollback): the working folder this node
            // created for it goes too. Once resumed, the folder is the process's own.
            if let (false, Some(u)) = (r.resumed, r.unpacked) {
                tokio::task::spawn_blocking(move || u.undo());
            }
        }
    }

    pub(crate) fn migr_resume_tree(&mut self, pid: i32) {
        if let Some(r) = self.migrations.restored.get_mut(&pid) {
            r.resumed = true;
        }
        // After a commit here: the next spare restorer starts now, off any migration's path.
        self.keep_restorer_ready();
        // Sending the signals walks `/proc`: off the loop.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = dvs_checkpoint::resume_tree(pid) {
                warn!(pid, "cannot resume the process tree: {e}");
            }
        });
    }

    /// Marks (off the loop: it walks `/proc`) the launched process whose tree held `pid` as
    /// migrated to `to`.
    pub(crate) fn migr_migrated_away(&mut self, pid: i32, to: NodeId) {
        let launchers = self.procs.launchers();
        let events = self.ctx.events.clone();
        tokio::task::spawn_local(async move {
            let held = blocking(move || {
                launchers
                    .into_iter()
                    .filter(|l| *l == pid || dvs_checkpoint::children_of(*l).contains(&pid))
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            let ev = Event::MigratedAway {
                launchers: held,
                to,
            };
            let _ = events.send(ev).await;
        });
    }
}

/// SIGKILLs the tree rooted at `pid` (walking `/proc`) on the blocking pool.
pub(crate) fn kill_tree_off_loop(pid: i32) {
    tokio::task::spawn_blocking(move || {
        if let Err(e) = dvs_checkpoint::kill_tree(pid) {
            warn!(pid, "cannot kill the process tree: {e}");
        }
    });
}

/// Stores a cooperative snapshot in `dir`; returns its size.
fn save_snapshot(dir: &Path, data: &[u8], fail: bool) -> Result<u64, String> {
    let _ = std::fs::remove_dir_all(dir);
    safe_fs::secure_dir(dir, safe_fs::PRIVATE_DIR, None)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    safe_fs::write_private(&dir.join(SNAPSHOT_FILE), data)
        .map_err(|e| format!("cannot store the snapshot: {e}"))?;
    if fail {
        return Err("injected failure (--fail-at checkpoint)".to_string());
    }
    Ok(data.len() as u64)
}

/// Dumps `pid`'s tree into `dir`, leaving it stopped, with its working folder packed beside
/// the image; returns the image size.
fn checkpoint(
    criu: &Criu,
    pid: i32,
    dir: &Path,
    workdir: Option<PathBuf>,
    fail: bool,
) -> Result<u64, String> {
    let _ = std::fs::remove_dir_all(dir);
    safe_fs::secure_dir(dir, safe_fs::PRIVATE_DIR, None)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // What the preflight decided, judged again on what the tree holds now (it may have
    // opened something since): the node connection to leave out, TCP connections inside the
    // tree, deleted files to copy. Refused here, the process has not been stopped yet.
    let plan = dvs_checkpoint::preflight::dump_plan(pid, "this node")
        .map_err(|e| format!("process {pid} cannot be migrated with criu: {e}"))?;
    let inode = plan.node_connection;
    let mut req = DumpRequest::new(pid, dir);
    req.leave_stopped = true;
    req.external_unix_inodes = vec![inode];
    req.tcp_established = plan.tcp_established;
    req.ghost_limit = plan.ghost_limit;
    let report = criu.dump(&req).map_err(|e| e.to_string())?;
    info!(
        pid,
        ms = report.duration.as_secs_f64() * 1000.0,
        bytes = report.image_bytes,
        "criu dump"
    );
    // criu runs under the node's umask 077 already; this holds whatever criu does.
    safe_fs::private_files_in(dir).map_err(|e| format!("cannot chmod the image: {e}"))?;
    safe_fs::write_private(&dir.join(SOCKET_FILE), inode.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    // Its node-local paths, for a destination that has no such files (see `restore`).
    let mut local = String::new();
    for (what, link, is) in [
        ("stdout", "fd/1", Path::is_file as fn(&Path) -> bool),
        ("cwd", "cwd", Path::is_dir),
    ] {
        if let Ok(p) = std::fs::read_link(format!("/proc/{pid}/{link}")) {
            if p.is_absolute() && is(&p) {
                local += &format!("{what} {}\n", p.display());
            }
        }
    }
    safe_fs::write_private(&dir.join(LOCAL_PATHS_FILE), local.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut bytes = report.image_bytes;
    if let Some(w) = workdir {
        bytes += workdir::pack(&w, dir)?;
    }
    if fail {
        return Err("injected failure (--fail-at checkpoint)".into());
    }
    Ok(bytes)
}

/// Reaps a process this node adopted as subreaper, whenever it ends.
pub(crate) fn reap_later(pid: i32) {
    tokio::task::spawn_local(async move {
        loop {
            match nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            ) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                // Exited, or not our child (yet/any more): nothing to reap.
                _ => return,
            }
        }
    });
}
