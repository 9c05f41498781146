//! The daemon's part of a migration: running checkpoint backends, storing and streaming
//! images, restoring on the destination, and reporting progress to whoever asked. The
//! protocol itself is in `dvs_core::node::migration`.

use dvs_core::{Input, MigrationInput};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dvs_checkpoint::{Criu, DumpRequest, RestoreRequest};
use dvs_core::{MigrationReport, Phase};
use dvs_wire::peer::{Backend, MigrationId, PeerFrame};
use dvs_wire::peer::{BulkFrame, ImageChunk};
use dvs_wire::{DcId, Ep, NodeId};
use tokio::sync::mpsc;

use crate::wire::Wire;
use tracing::{info, warn};

use crate::ctl::CtlResponse;
use crate::{safe_fs, Shared, State};

/// Image chunk size on the peer link.
const IMAGE_CHUNK: usize = 1 << 20;
/// File in an image folder naming the socket inode the process's node connection had.
const SOCKET_FILE: &str = "dvs-socket-inode";
/// File of a cooperative snapshot.
pub(crate) const SNAPSHOT_FILE: &str = "snapshot.bin";

/// A process restored here by a migration (the node is its subreaper).
pub(crate) struct Restored {
    pub dc: DcId,
    pub ep: Ep,
    pub since: Instant,
    /// The program's command line, carried from node to node (a later cooperative
    /// migration restarts it).
    pub cmd: Vec<String>,
}

/// Migration bookkeeping of the daemon.
#[derive(Default)]
pub(crate) struct Migrations {
    /// Whoever asked for a migration coordinated here, and when it started.
    pub requesters: HashMap<MigrationId, (Instant, mpsc::UnboundedSender<CtlResponse>)>,
    /// Processes restored here, by host pid.
    pub restored: BTreeMap<i32, Restored>,
    /// Whether CRIU works here (checked once, on first use).
    pub criu: Option<Result<Arc<Criu>, String>>,
    /// Folder of the image folders (see [`images_root`]).
    pub images_root: PathBuf,
    /// Destination: image files being received, kept open between chunks.
    pub receiving: HashMap<(MigrationId, String), std::fs::File>,
}

impl Migrations {
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

    /// CRIU, if it works on this node (the reason otherwise).
    pub fn criu(&mut self) -> Result<Arc<Criu>, String> {
        self.criu
            .get_or_insert_with(|| {
                let c = Criu::locate().map_err(|e| e.to_string())?;
                c.check().map_err(|e| e.to_string())?;
                Ok(Arc::new(c))
            })
            .clone()
    }
}

/// The folder of migration `id`'s image on this node.
pub(crate) fn image_dir(s: &Shared, id: MigrationId) -> PathBuf {
    s.migrations.images_root.join(format!("{id:x}"))
}

/// Where this node keeps checkpoint images: they are transient (deleted once the outcome is
/// decided), so on a tmpfs when the machine has one (`/dev/shm/dvs/CLUSTER/NODE`), else under
/// the node's runtime dir. Every level is a private folder of this uid (images hold process
/// memory); a `/dev/shm/dvs` that someone else owns makes the node use its runtime dir.
/// Images left by an earlier run of this node are deleted.
pub(crate) fn prepare_images_root(
    cluster_id: &str,
    node: &str,
    runtime_dir: &Path,
) -> Result<PathBuf, String> {
    let shm = Path::new("/dev/shm");
    let on_tmpfs = nix::sys::statfs::statfs(shm)
        .is_ok_and(|f| f.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    let root = if on_tmpfs {
        // Names are validated by the config (no '/', no leading dot), so these stay below
        // /dev/shm/dvs.
        let levels = [
            shm.join("dvs"),
            shm.join("dvs").join(cluster_id),
            shm.join("dvs").join(cluster_id).join(node),
        ];
        match levels
            .iter()
            .try_for_each(|d| safe_fs::secure_dir(d, safe_fs::PRIVATE_DIR, None))
        {
            Ok(()) => Some(levels[2].clone()),
            Err(e) => {
                warn!("not keeping images under /dev/shm: {e}; using the runtime dir");
                None
            }
        }
    } else {
        None
    };
    let root = match root {
        Some(r) => r,
        None => {
            let r = runtime_dir.join("migrations");
            safe_fs::secure_dir(&r, safe_fs::PRIVATE_DIR, None)
                .map_err(|e| format!("images folder {}: {e}", r.display()))?;
            r
        }
    };
    // Stale images of migrations this node never saw decided (it stopped or crashed).
    let entries =
        std::fs::read_dir(&root).map_err(|e| format!("cannot read {}: {e}", root.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        let r = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
            _ => std::fs::remove_file(&p),
        };
        match r {
            Ok(()) => info!("deleted stale migration file {}", p.display()),
            Err(err) => warn!("cannot delete stale {}: {err}", p.display()),
        }
    }
    Ok(root)
}

impl Shared {
    fn state(&self) -> State {
        self.self_ref
            .upgrade()
            .expect("the event loop owns the state")
    }

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
        self.migr_drop_image(id);
        if let Some((_, tx)) = self.migrations.requesters.remove(&id) {
            let _ = tx.send(CtlResponse::Migrated(report.clone()));
        }
    }

    /// Source: checkpoints process `pid` with CRIU in a blocking thread.
    pub(crate) fn migr_checkpoint(&mut self, id: MigrationId, pid: i32, fail: bool) {
        let dir = image_dir(self, id);
        let criu = self.migrations.criu();
        let st = self.state();
        tokio::task::spawn_local(async move {
            let result = match criu {
                Err(e) => Err(format!("criu does not work on this node: {e}")),
                Ok(criu) => tokio::task::spawn_blocking(move || checkpoint(&criu, pid, &dir, fail))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string())),
            };
            let mut s = st.borrow_mut();
            s.core.handle(
                Instant::now(),
                Input::Migration(MigrationInput::CheckpointDone { id, result }),
            );
            s.drive();
        });
    }

    /// Source: stores a cooperative snapshot as the image.
    pub(crate) fn migr_save_snapshot(&mut self, id: MigrationId, data: &[u8], fail: bool) {
        let dir = image_dir(self, id);
        let result = (|| {
            let _ = std::fs::remove_dir_all(&dir);
            safe_fs::secure_dir(&dir, safe_fs::PRIVATE_DIR, None)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            safe_fs::write_private(&dir.join(SNAPSHOT_FILE), data)
                .map_err(|e| format!("cannot store the snapshot: {e}"))?;
            if fail {
                return Err("injected failure (--fail-at checkpoint)".to_string());
            }
            Ok(data.len() as u64)
        })();
        self.core.handle(
            Instant::now(),
            Input::Migration(MigrationInput::CheckpointDone { id, result }),
        );
    }

    /// Source: streams the image folder to `to` as `MigrImage` frames.
    pub(crate) fn migr_send_image(&mut self, id: MigrationId, to: NodeId) {
        let dir = image_dir(self, id);
        let Some(w) = self.peers.get(&to).cloned() else {
            let e = format!("the link to node {to} is down");
            return self.core.handle(
                Instant::now(),
                Input::Migration(MigrationInput::ImageSent { id, result: Err(e) }),
            );
        };
        // Streamed by a task of its own, a chunk at a time: reading and queueing a big image
        // in one go stopped this event loop for seconds (peers then declared its links dead),
        // and the link's queue holds at most `IMAGE_AHEAD` of it, so frames behind it
        // (heartbeats, IPC) wait at most that long.
        let st = self.state();
        tokio::task::spawn_local(async move {
            let result = stream_image(&w, id, &dir).await;
            let mut s = st.borrow_mut();
            s.core.handle(
                Instant::now(),
                Input::Migration(MigrationInput::ImageSent { id, result }),
            );
            s.drive();
        });
    }

    /// Destination: stores one image chunk.
    pub(crate) fn migr_image_chunk(&mut self, from: NodeId, frame: PeerFrame, data: &[u8]) {
        let PeerFrame::Bulk(BulkFrame::ImageChunk(ImageChunk {
            id,
            file,
            offset,
            last,
        })) = frame
        else {
            return;
        };
        match self.core.arrival(id) {
            None => return warn!("image chunk for unknown migration {id:x} dropped"),
            Some((_, _, coordinator)) if coordinator != from => {
                // Only the coordinator streams the image: anything else is forged.
                warn!(
                    node = from,
                    "closing the link to a peer that sent an image chunk of migration {id:x}, \
                     which node {coordinator} coordinates"
                );
                if let Some(w) = self.peers.get(&from) {
                    w.close();
                }
                return;
            }
            Some(_) => {}
        }
        // The name comes from a peer: keep it inside the image folder.
        if file.is_empty() || file.contains('/') || file.starts_with('.') {
            return warn!("image file name {file:?} refused");
        }
        let dir = image_dir(self, id);
        let key = (id, file);
        let r = (|| -> std::io::Result<()> {
            if !self.migrations.receiving.contains_key(&key) {
                safe_fs::secure_dir(&dir, safe_fs::PRIVATE_DIR, None)?;
                let f = safe_fs::open_private(&dir.join(&key.1))?;
                self.migrations.receiving.insert(key.clone(), f);
            }
            let f = &self.migrations.receiving[&key];
            std::os::unix::fs::FileExt::write_all_at(f, data, offset)
        })();
        if let Err(e) = &r {
            warn!("cannot store image chunk of {}: {e}", key.1);
        }
        if last || r.is_err() {
            self.migrations.receiving.remove(&key);
        }
        self.core.handle(
            Instant::now(),
            Input::Migration(MigrationInput::ImageChunk {
                id,
                bytes: data.len() as u64,
            }),
        );
    }

    /// Destination: restores `id` (criu: from its image with a fresh node connection;
    /// cooperative: by starting the program with the snapshot).
    pub(crate) fn migr_restore(
        &mut self,
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        backend: Backend,
        fail: bool,
    ) {
        let dir = image_dir(self, id);
        let st = self.state();
        match backend {
            Backend::Cooperative => {
                let env = vec![
                    ("DVS_RESTORE_MIGRATION".to_string(), id.to_string()),
                    (
                        "DVS_RESTORE_FILE".to_string(),
                        dir.join(SNAPSHOT_FILE).display().to_string(),
                    ),
                ];
                // What to start comes from the directory's launch record, never from a peer.
                let (reply, answer) = tokio::sync::oneshot::channel();
                let ask = crate::dir::DirOp::GetLaunch { dc, ep, reply };
                let asked = self.dir_tx.send(ask).is_ok();
                // Launching needs the state unborrowed; do it from a task.
                tokio::task::spawn_local(async move {
                    let cmd = match answer.await {
                        Ok(r) => r,
                        Err(_) if !asked => Err("the directory worker is gone".to_string()),
                        Err(_) => Err("the directory worker dropped the request".to_string()),
                    };
                    let launched =
                        cmd.and_then(|cmd| crate::launcher::launch(&st, dc, ep, cmd, env));
                    if let Err(e) = launched {
                        let mut s = st.borrow_mut();
                        s.core.handle(
                            Instant::now(),
                            Input::Migration(MigrationInput::Restored { id, result: Err(e) }),
                        );
                        s.drive();
                    }
                });
            }
            Backend::Criu => {
                let criu = self.migrations.criu();
                tokio::task::spawn_local(async move {
                    let result = async {
                        let criu =
                            criu.map_err(|e| format!("criu does not work on this node: {e}"))?;
                        let inode: u64 = std::fs::read_to_string(dir.join(SOCKET_FILE))
                            .map_err(|e| format!("image has no {SOCKET_FILE}: {e}"))?
                            .trim()
                            .parse()
                            .map_err(|_| format!("bad {SOCKET_FILE}"))?;
                        let (node_end, proc_end) =
                            std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
                        let conn = crate::local::adopt(&st, node_end, dc, ep)
                            .map_err(|e| e.to_string())?;
                        let restored = tokio::task::spawn_blocking(move || {
                            let req = RestoreRequest::new(&dir)
                                .inherit_unix_socket(proc_end.as_raw_fd(), inode);
                            let r = criu.restore(&req).map(|r| r.pid).map_err(|e| e.to_string());
                            drop(proc_end);
                            r
                        })
                        .await
                        .unwrap_or_else(|e| Err(e.to_string()));
                        match restored {
                            Ok(pid) if fail => {
                                let _ = dvs_checkpoint::kill_tree(pid);
                                reap_later(pid);
                                if let Some(w) = st.borrow().conns.get(&conn) {
                                    w.close();
                                }
                                Err("injected failure (--fail-at restore)".to_string())
                            }
                            Ok(pid) => Ok((conn, pid)),
                            Err(e) => {
                                if let Some(w) = st.borrow().conns.get(&conn) {
                                    w.close();
                                }
                                Err(e)
                            }
                        }
                    }
                    .await;
                    let mut s = st.borrow_mut();
                    if let Ok((_, pid)) = &result {
                        s.migrations.restored.insert(
                            *pid,
                            Restored {
                                dc,
                                ep,
                                since: Instant::now(),
                                // A criu image carries no command line.
                                cmd: Vec::new(),
                            },
                        );
                        reap_later(*pid);
                    }
                    s.core.handle(
                        Instant::now(),
                        Input::Migration(MigrationInput::Restored { id, result }),
                    );
                    s.drive();
                });
            }
        }
    }

    pub(crate) fn migr_kill_tree(&mut self, pid: i32) {
        if let Err(e) = dvs_checkpoint::kill_tree(pid) {
            warn!(pid, "cannot kill the process tree: {e}");
        }
        self.migrations.restored.remove(&pid);
    }

    pub(crate) fn migr_resume_tree(&mut self, pid: i32) {
        if let Err(e) = dvs_checkpoint::resume_tree(pid) {
            warn!(pid, "cannot resume the process tree: {e}");
        }
    }

    /// Deletes the image of `id` and criu's files beside it (`ID.dump.log`, `ID.restore.log`,
    /// `ID.restore.pid`): images are copies of process memory, and large.
    pub(crate) fn migr_drop_image(&mut self, id: MigrationId) {
        self.migrations.receiving.retain(|(m, _), _| *m != id);
        let dir = image_dir(self, id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::debug!("deleted image {}", dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("cannot delete image {}: {e}", dir.display()),
        }
        let prefix = format!("{id:x}.");
        if let Ok(entries) = std::fs::read_dir(&self.migrations.images_root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// Image bytes queued on a link ahead of what the socket took, at most.
const IMAGE_AHEAD: usize = 4 * IMAGE_CHUNK;

/// Sends the image files of `dir` as `MigrImage` frames on `w`, reading each chunk off the
/// event loop and waiting while more than [`IMAGE_AHEAD`] is queued. Returns the bytes sent.
async fn stream_image(w: &Rc<Wire>, id: MigrationId, dir: &Path) -> Result<u64, String> {
    use tokio::io::AsyncReadExt;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut total = 0u64;
    let mut buf = vec![0u8; IMAGE_CHUNK];
    for f in files {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or("non-UTF-8 image file name")?
            .to_string();
        let cannot = |e: std::io::Error| format!("cannot read {}: {e}", f.display());
        let len = std::fs::metadata(&f).map_err(cannot)?.len();
        // Small files (most of a small process's image) are read at once: from tmpfs that
        // is a memory copy, cheaper than a trip through the blocking pool per chunk. Big
        // ones are read a chunk at a time.
        enum Source {
            Whole(Vec<u8>),
            Chunks(tokio::fs::File),
        }
        let mut source = if len <= IMAGE_AHEAD as u64 {
            Source::Whole(std::fs::read(&f).map_err(cannot)?)
        } else {
            Source::Chunks(tokio::fs::File::open(&f).await.map_err(cannot)?)
        };
        let mut off = 0u64;
        loop {
            let want = (len - off).min(IMAGE_CHUNK as u64) as usize;
            let chunk: &[u8] = match &mut source {
                Source::Whole(data) => &data[off as usize..off as usize + want],
                Source::Chunks(file) => {
                    file.read_exact(&mut buf[..want]).await.map_err(cannot)?;
                    &buf[..want]
                }
            };
            let last = off + want as u64 == len;
            let frame = PeerFrame::Bulk(BulkFrame::ImageChunk(ImageChunk {
                id,
                file: name.clone(),
                offset: off,
                last,
            }));
            if w.is_closed() {
                return Err("the link to the destination closed during the transfer".into());
            }
            w.queue(&frame, chunk).map_err(|e| e.to_string())?;
            w.flush();
            w.wait_pending_below(IMAGE_AHEAD).await;
            off += want as u64;
            if last {
                break;
            }
        }
        total += len;
    }
    Ok(total)
}

/// Dumps `pid`'s tree into `dir`, leaving it stopped; returns the image size.
fn checkpoint(criu: &Criu, pid: i32, dir: &Path, fail: bool) -> Result<u64, String> {
    let _ = std::fs::remove_dir_all(dir);
    safe_fs::secure_dir(dir, safe_fs::PRIVATE_DIR, None)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let sockets = dvs_checkpoint::process_socket_inodes(pid).map_err(|e| e.to_string())?;
    let inode = match sockets.as_slice() {
        [(_, inode)] => *inode,
        [] => return Err(format!("process {pid} has no connection to the node kernel")),
        more => {
            return Err(format!(
                "process {pid} holds {} sockets; a criu migration carries only its node-kernel connection",
                more.len()
            ))
        }
    };
    let mut req = DumpRequest::new(pid, dir);
    req.leave_stopped = true;
    req.external_unix_inodes = vec![inode];
    let report = criu.dump(&req).map_err(|e| e.to_string())?;
    // criu runs under the node's umask 077 already; this holds whatever criu does.
    safe_fs::private_files_in(dir).map_err(|e| format!("cannot chmod the image: {e}"))?;
    safe_fs::write_private(&dir.join(SOCKET_FILE), inode.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    if fail {
        return Err("injected failure (--fail-at checkpoint)".into());
    }
    Ok(report.image_bytes)
}

/// Reaps a process this node adopted as subreaper, whenever it ends.
fn reap_later(pid: i32) {
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
