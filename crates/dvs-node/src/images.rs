//! Checkpoint images on disk. The destination writes received chunks to their files on a
//! thread of its own ([`ImageStore`]), in arrival order, so that the event loop never waits
//! on a file; the source streams an image to a peer from a blocking reader
//! ([`stream_image`]). Images live in one folder per migration under the images root.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use dvs_wire::peer::{BulkFrame, ImageChunk, MigrationId, PeerFrame};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tracing::{info, warn};

use crate::safe_fs;
use crate::wire::Wire;

/// Image chunk size on the peer link.
const IMAGE_CHUNK: usize = 1 << 20;
/// Image bytes queued on a link ahead of what the socket took, at most: frames queued behind
/// an image (heartbeats, IPC) wait at most that long.
const IMAGE_AHEAD: usize = 4 * IMAGE_CHUNK;
/// Image bytes a link may have read that are not written to their files yet; past this its
/// reader waits for the writer.
pub(crate) const IMAGE_BACKLOG: usize = 16 << 20;

/// A job for the image writer thread.
enum Job {
    /// Store a received chunk (the permit is released once it is written).
    Write {
        id: MigrationId,
        file: String,
        offset: u64,
        data: Bytes,
        last: bool,
        _permit: OwnedSemaphorePermit,
    },
    /// Delete the image of `id` and criu's files beside it.
    Drop { id: MigrationId },
    /// Answer once every job before this one is done.
    Barrier(oneshot::Sender<()>),
}

/// The images of this node: their root folder, and the thread that writes and deletes them.
pub(crate) struct ImageStore {
    root: PathBuf,
    jobs: Option<std_mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ImageStore {
    /// Starts the writer thread for images under `root`.
    pub fn start(root: PathBuf) -> std::io::Result<Self> {
        let (jobs, rx) = std_mpsc::channel();
        let r = root.clone();
        let thread = std::thread::Builder::new()
            .name("dvs-images".into())
            .spawn(move || writer(&r, rx))?;
        Ok(ImageStore {
            root,
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// The folder of the images.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of migration `id`'s image.
    pub fn dir(&self, id: MigrationId) -> PathBuf {
        image_dir(&self.root, id)
    }

    fn send(&self, job: Job) {
        if self.jobs.as_ref().is_none_or(|j| j.send(job).is_err()) {
            warn!("the image writer is gone");
        }
    }

    /// Stores a chunk of file `file` (a name checked by the caller) of `id`'s image.
    pub fn write(
        &self,
        id: MigrationId,
        chunk: ImageChunk,
        data: Bytes,
        permit: OwnedSemaphorePermit,
    ) {
        self.send(Job::Write {
            id,
            file: chunk.file,
            offset: chunk.offset,
            data,
            last: chunk.last,
            _permit: permit,
        });
    }

    /// Deletes the image of `id` and criu's files beside it (`ID.dump.log`,
    /// `ID.restore.log`, `ID.restore.pid`): images are copies of process memory, and large.
    pub fn drop_image(&self, id: MigrationId) {
        self.send(Job::Drop { id });
    }

    /// Resolves once every chunk received so far is written: a restore waits for this.
    pub fn barrier(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Barrier(tx));
        rx
    }

    /// Finishes the jobs queued and stops the thread.
    pub fn stop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn image_dir(root: &Path, id: MigrationId) -> PathBuf {
    root.join(format!("{id:x}"))
}

/// The image writer thread: image files being received stay open between chunks.
fn writer(root: &Path, jobs: std_mpsc::Receiver<Job>) {
    let mut receiving: HashMap<(MigrationId, String), std::fs::File> = HashMap::new();
    for job in jobs {
        match job {
            Job::Write {
                id,
                file,
                offset,
                data,
                last,
                _permit,
            } => {
                let key = (id, file);
                let r = (|| -> std::io::Result<()> {
                    if !receiving.contains_key(&key) {
                        let dir = image_dir(root, id);
                        safe_fs::secure_dir(&dir, safe_fs::PRIVATE_DIR, None)?;
                        let f = safe_fs::open_private(&dir.join(&key.1))?;
                        receiving.insert(key.clone(), f);
                    }
                    let f = &receiving[&key];
                    std::os::unix::fs::FileExt::write_all_at(f, &data, offset)
                })();
                if let Err(e) = &r {
                    warn!("cannot store image chunk of {}: {e}", key.1);
                }
                if last || r.is_err() {
                    receiving.remove(&key);
                }
            }
            Job::Drop { id } => {
                receiving.retain(|(m, _), _| *m != id);
                let dir = image_dir(root, id);
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => tracing::debug!("deleted image {}", dir.display()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => warn!("cannot delete image {}: {e}", dir.display()),
                }
                let prefix = format!("{id:x}.");
                if let Ok(entries) = std::fs::read_dir(root) {
                    for e in entries.flatten() {
                        if e.file_name().to_string_lossy().starts_with(&prefix) {
                            let _ = std::fs::remove_file(e.path());
                        }
                    }
                }
            }
            Job::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// How the dump that writes an image being streamed stands (see [`DumpState`]): under way
/// (the image is sent once it is over), under way and sent as it is written, over, failed.
const DUMPING: u8 = 0;
const DUMPED: u8 = 1;
const DUMP_FAILED: u8 = 2;
const DUMPING_LIVE: u8 = 3;

/// A process whose resident memory is at least this is streamed while it is dumped. A smaller
/// image crosses in a few milliseconds after the dump; reading it during the dump only takes
/// CPU from criu (on two cores that made a 2.3 MB dump 3 ms slower and gained 1.5 ms).
pub(crate) const LIVE_STREAM_MIN: u64 = 48 << 20;

/// Shared between the dump and the streamer of its image: whether the dump still writes the
/// image, finished it, or failed. A change wakes the streamer at once (a poll would add its
/// period to every transfer).
#[derive(Clone)]
pub(crate) struct DumpState(Arc<(Mutex<u8>, Condvar)>);

impl DumpState {
    fn new(state: u8) -> Self {
        DumpState(Arc::new((Mutex::new(state), Condvar::new())))
    }

    /// A dump under way.
    pub fn dumping() -> Self {
        DumpState::new(DUMPING)
    }

    /// A dump that is over: its image is complete.
    pub fn dumped() -> Self {
        DumpState::new(DUMPED)
    }

    fn set(&self, f: impl FnOnce(u8) -> u8) {
        let (state, changed) = &*self.0;
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        *s = f(*s);
        changed.notify_all();
    }

    /// Sends the image while it is written (a big process), instead of once it is whole.
    pub fn send_live(&self) {
        self.set(|s| if s == DUMPING { DUMPING_LIVE } else { s });
    }

    /// The dump finished (`true`, every file of the image is written) or failed.
    pub fn finish(&self, ok: bool) {
        self.set(|_| if ok { DUMPED } else { DUMP_FAILED });
    }

    /// The state; while the image is held back (not sent live), waits until that changes.
    fn get(&self) -> u8 {
        let (state, changed) = &*self.0;
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        *changed
            .wait_while(s, |s| *s == DUMPING)
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Waits at most `limit` for a change of the state (a live reader that found nothing new).
    fn wait_change(&self, seen: u8, limit: std::time::Duration) {
        let (state, changed) = &*self.0;
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        let _ = changed.wait_timeout_while(s, limit, |s| *s == seen);
    }
}

/// Sends the image files of `dir` as `MigrImage` frames on `w`, the link's writer lent for
/// the transfer, while `dump` writes them: a blocking reader sends what the files hold so
/// far, again and again, and once the dump is over what is left, each file's last chunk
/// marked `last`. No more than [`IMAGE_AHEAD`] is queued on the link at once, so control
/// frames queued by the event loop wait a bounded time behind the image. Returns the bytes
/// sent.
pub(crate) async fn stream_image(
    w: Rc<Wire>,
    id: MigrationId,
    dir: PathBuf,
    dump: DumpState,
) -> Result<u64, String> {
    let (tx, mut chunks) = mpsc::channel(IMAGE_AHEAD / IMAGE_CHUNK);
    // Ends when the files are read, or when `chunks` is dropped.
    let reader = tokio::task::spawn_blocking(move || read_image(id, &dir, &tx, &dump));
    while let Some((frame, data)) = chunks.recv().await {
        if w.is_closed() {
            return Err("the link to the destination closed during the transfer".into());
        }
        w.queue(&PeerFrame::Bulk(BulkFrame::ImageChunk(frame)), &data)
            .map_err(|e| e.to_string())?;
        w.flush();
        w.wait_pending_below(IMAGE_AHEAD).await;
    }
    reader.await.map_err(|e| e.to_string())?
}

/// One file of an image being read: how far it was sent, and whether its last chunk went.
struct Sending {
    file: std::fs::File,
    sent: u64,
    closed: bool,
}

/// Reads the image files of `dir` (sorted by name) a chunk at a time into `out` while `dump`
/// writes them (criu writes every image file front to back, never over what it wrote), and
/// once the dump is over, the rest; returns the bytes read. Blocking: runs on the blocking
/// pool.
fn read_image(
    id: MigrationId,
    dir: &Path,
    out: &mpsc::Sender<(ImageChunk, Vec<u8>)>,
    dump: &DumpState,
) -> Result<u64, String> {
    let mut files: BTreeMap<String, Sending> = BTreeMap::new();
    let mut total = 0u64;
    for pass in 0u64.. {
        // Read before the pass: a pass that starts after the dump ended sees every file whole.
        let state = dump.get();
        if state == DUMP_FAILED {
            return Err("the checkpoint failed".into());
        }
        let last_pass = state == DUMPED;
        let mut progressed = false;
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            // The dump has not created the folder yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !last_pass => {
                std::thread::sleep(LIVE_POLL);
                continue;
            }
            Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
        };
        let mut names: Vec<(String, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.path())))
            .collect();
        names.sort();
        for (name, path) in names {
            let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
            if !files.contains_key(&name) {
                let file = std::fs::File::open(&path).map_err(cannot)?;
                files.insert(
                    name.clone(),
                    Sending {
                        file,
                        sent: 0,
                        closed: false,
                    },
                );
            }
            let f = files.get_mut(&name).expect("inserted");
            if f.closed {
                continue;
            }
            let len = f.file.metadata().map_err(cannot)?.len();
            loop {
                let want = len.saturating_sub(f.sent).min(IMAGE_CHUNK as u64);
                let last = last_pass && f.sent + want == len;
                if want == 0 && !last {
                    break;
                }
                // One read of the whole chunk (read_to_end would start small and grow).
                let mut data = vec![0u8; want as usize];
                std::os::unix::fs::FileExt::read_exact_at(&f.file, &mut data, f.sent)
                    .map_err(cannot)?;
                let chunk = ImageChunk {
                    id,
                    file: name.clone(),
                    offset: f.sent,
                    last,
                };
                if out.blocking_send((chunk, data)).is_err() {
                    return Err("the transfer stopped".into());
                }
                f.sent += want;
                total += want;
                progressed = true;
                if last {
                    f.closed = true;
                    break;
                }
            }
        }
        if last_pass {
            tracing::debug!(passes = pass + 1, bytes = total, "image sent");
            return Ok(total);
        }
        if !progressed {
            dump.wait_change(state, LIVE_POLL);
        }
    }
    unreachable!("the passes end with the dump")
}

/// How long the reader of an image being dumped waits when a pass found nothing new.
const LIVE_POLL: std::time::Duration = std::time::Duration::from_millis(1);

/// The folder under `/dev/shm` that holds the images of every node of cluster `cluster_id`
/// on this host (see [`prepare_images_root`]); `dvs down` deletes it once the nodes stopped,
/// so that images a killed node left behind do not outlive the cluster.
pub fn cluster_images_dir(cluster_id: &str) -> PathBuf {
    Path::new("/dev/shm/dvs").join(cluster_id)
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
