//! [`EmbeddedDirectory`]: the directory kept in a folder, for clusters on one machine.
//!
//! Layout of the folder:
//! - `directory.json`: the whole state (revision counter, entries, recent-change log). It is
//!   only ever replaced by `rename`, so a reader without a lock always sees a complete state.
//! - `directory.json.tmp`: the next state while it is being written (under the lock).
//! - `directory.lock`: `flock`ed exclusively around every read-modify-write, which serialises
//!   writers across processes and across handles within one process (each operation opens its
//!   own file description, and `flock` locks belong to the description).
//!
//! No `fsync`: the folder lives in the cluster's runtime dir and the cluster does not outlive
//! the machine, so durability across power loss buys nothing.
//!
//! Leases are kept in the state file with their absolute expiry time (wall clock, ms since
//! the epoch: every user of the folder runs on one machine, so shares one clock) and the keys
//! attached to them. Nothing runs in the background to expire them: whoever takes the lock
//! first reaps the leases that are due (deleting their keys, logged like any delete so that
//! watchers see them), reads reap before reading when a lease is due, and every watcher
//! thread wakes up when the next lease is due and reaps it, so that an expiry is seen at
//! once even if nobody writes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

use crate::{check_key, CasOutcome, DirError, DirEvent, Directory, LeaseId, Versioned};

const STATE_FILE: &str = "directory.json";
const TMP_FILE: &str = "directory.json.tmp";
const LOCK_FILE: &str = "directory.lock";

/// How many recent changes the state file keeps so that watchers can replay every change
/// (not just the net difference) between two polls. A watcher that falls further behind
/// falls back to diffing snapshots, which is still correct but coalesces changes.
const LOG_CAP: usize = 256;

/// How often a watcher looks at the state file. Directory changes are rare (registrations,
/// migrations), and a read of a small file every few ms is negligible.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// With inotify, the longest wait between two looks at the state file: it bounds how long a
/// dropped receiver keeps its thread, and catches an event that was missed.
const NOTIFY_TIMEOUT_MS: i32 = 200;

/// Entries under a prefix, sorted by key, as [`Directory::watch`] returns them.
type Snapshot = Vec<(String, Versioned)>;

/// The content of `directory.json`.
///
/// Fields added later are `#[serde(default)]`, so that a file written before them loads.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct State {
    /// Revision of the last change; the next change gets `revision + 1`.
    revision: u64,
    /// Current entries, sorted so prefix listings are a range scan.
    entries: BTreeMap<String, Versioned>,
    /// The most recent changes, oldest first, one per revision, ending at `revision`.
    #[serde(default)]
    log: VecDeque<Change>,
    /// The live leases by id (expired ones are removed when reaped).
    #[serde(default)]
    leases: BTreeMap<i64, Lease>,
    /// The last lease id handed out; ids only grow (see [`Directory::grant_lease`]).
    #[serde(default)]
    last_lease: i64,
    /// Whether this state differs from the file it was loaded from (so must be stored).
    #[serde(skip)]
    dirty: bool,
}

/// A lease in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    /// The TTL it was granted with, which each keep-alive renews.
    ttl_ms: u64,
    /// When it expires: wall clock, milliseconds since the Unix epoch.
    expires_ms: u64,
    /// The keys attached to it.
    keys: BTreeSet<String>,
}

/// One entry of the recent-change log.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Change {
    revision: u64,
    key: String,
    /// `None` for a delete.
    value: Option<String>,
}

/// The wall clock in milliseconds since the Unix epoch, the time base of lease expiries.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The wall clock in microseconds since the Unix epoch, the lower bound of new lease ids.
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// A TTL in whole milliseconds, rounded up, at least 1.
fn ttl_ms(ttl: Duration) -> u64 {
    let ms = ttl.as_nanos().div_ceil(1_000_000).max(1);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

impl State {
    /// Puts (`Some`) or deletes (`None`) `key` as a new revision, logged for watchers, and
    /// detaches the key from the lease it had (a put with a lease attaches it again after).
    /// Returns the revision.
    fn apply(&mut self, key: &str, value: Option<String>) -> u64 {
        let revision = self.revision + 1;
        self.revision = revision;
        match &value {
            Some(v) => {
                self.entries.insert(
                    key.to_owned(),
                    Versioned {
                        value: v.clone(),
                        version: revision,
                    },
                );
            }
            None => {
                self.entries.remove(key);
            }
        }
        for lease in self.leases.values_mut() {
            lease.keys.remove(key);
        }
        self.log.push_back(Change {
            revision,
            key: key.to_owned(),
            value,
        });
        while self.log.len() > LOG_CAP {
            self.log.pop_front();
        }
        self.dirty = true;
        revision
    }

    /// Ends `lease` (if it lives), deleting its keys in key order, one revision each.
    fn end_lease(&mut self, lease: i64) {
        let Some(ended) = self.leases.remove(&lease) else {
            return;
        };
        self.dirty = true;
        for key in ended.keys {
            if self.entries.contains_key(&key) {
                self.apply(&key, None);
            }
        }
    }

    /// Ends every lease that expired by `now` (in id order).
    fn reap(&mut self, now: u64) {
        let due: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_ms <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.end_lease(id);
        }
    }

    /// When the next lease expires, if any lives.
    fn next_expiry(&self) -> Option<u64> {
        self.leases.values().map(|l| l.expires_ms).min()
    }

    fn prefix(&self, prefix: &str) -> BTreeMap<String, Versioned> {
        self.entries
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// The paths of one directory folder.
#[derive(Debug)]
struct Paths {
    state: PathBuf,
    tmp: PathBuf,
    lock: PathBuf,
}

/// A [`Directory`] stored in a folder, shared by every process that opens the same folder.
///
/// Needs no external service; meant for a cluster whose nodes all run on one machine (the
/// folder is the cluster runtime dir). Cloning is cheap and clones share nothing mutable, so
/// a clone behaves like another process's handle.
///
/// Write operations run on tokio's blocking pool (they may wait for another process's lock),
/// so [`Directory::cas`] must be called within a tokio runtime. Each watch uses one thread.
#[derive(Debug, Clone)]
pub struct EmbeddedDirectory {
    paths: Arc<Paths>,
}

impl EmbeddedDirectory {
    /// Opens (creating it if missing) the directory kept in the folder `path`.
    ///
    /// Fails if the folder or its lock file cannot be created, or if an existing state file
    /// is unreadable or corrupt — better at start-up than at the first registration.
    pub fn open(path: &Path) -> Result<Self, DirError> {
        fs::create_dir_all(path).map_err(|source| DirError::Io {
            op: "create directory folder",
            path: path.to_owned(),
            source,
        })?;
        let dir = EmbeddedDirectory {
            paths: Arc::new(Paths {
                state: path.join(STATE_FILE),
                tmp: path.join(TMP_FILE),
                lock: path.join(LOCK_FILE),
            }),
        };
        // Create the lock file now, so that a permission problem shows up here.
        dir.open_lock_file()?;
        dir.load()?;
        Ok(dir)
    }

    fn open_lock_file(&self) -> Result<File, DirError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.paths.lock)
            .map_err(|source| DirError::Io {
                op: "open lock file",
                path: self.paths.lock.clone(),
                source,
            })
    }

    /// Takes the writer lock; it is released when the returned file is dropped (closed).
    fn lock_exclusive(&self) -> Result<File, DirError> {
        let file = self.open_lock_file()?;
        loop {
            // SAFETY: flock on a file descriptor we own and keep open for the call.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(file);
            }
            let err = io::Error::last_os_error();
            if err.kind() != ErrorKind::Interrupted {
                return Err(DirError::Io {
                    op: "lock",
                    path: self.paths.lock.clone(),
                    source: err,
                });
            }
        }
    }

    fn load(&self) -> Result<State, DirError> {
        let bytes = read_state_bytes(&self.paths.state)?;
        parse_state(&self.paths.state, bytes.as_deref())
    }

    fn store(&self, state: &State) -> Result<(), DirError> {
        let bytes = serde_json::to_vec(state).expect("directory state always serialises");
        fs::write(&self.paths.tmp, bytes).map_err(|source| DirError::Io {
            op: "write",
            path: self.paths.tmp.clone(),
            source,
        })?;
        fs::rename(&self.paths.tmp, &self.paths.state).map_err(|source| DirError::Io {
            op: "replace",
            path: self.paths.state.clone(),
            source,
        })
    }

    /// Under the lock: loads the state, reaps the leases that are due, runs `op` on it, and
    /// stores the result if anything changed (also when `op` fails after a reap).
    fn update<T>(
        &self,
        op: impl FnOnce(&mut State, u64) -> Result<T, DirError>,
    ) -> Result<T, DirError> {
        let _lock = self.lock_exclusive()?;
        let mut state = self.load()?;
        let now = now_ms();
        state.reap(now);
        let result = op(&mut state, now);
        if state.dirty {
            self.store(&state)?;
        }
        result
    }

    /// Runs `job` (which may wait for the lock) on tokio's blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        key: &str,
        job: impl FnOnce(&EmbeddedDirectory) -> Result<T, DirError> + Send + 'static,
    ) -> Result<T, DirError> {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || job(&this)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(DirError::Cancelled {
                key: key.to_owned(),
            }),
        }
    }

    /// The current state, for a read: without the lock, unless a lease is due, which is
    /// reaped first (so a read never shows a key whose lease has expired).
    async fn read(&self) -> Result<State, DirError> {
        let state = self.load()?;
        let due = matches!(state.next_expiry(), Some(t) if t <= now_ms());
        if !due {
            return Ok(state);
        }
        self.blocking("", |d| d.update(|state, _| Ok(state.clone())))
            .await
    }

    /// The blocking body of [`Directory::cas`] and [`Directory::cas_leased`].
    fn cas_blocking(
        &self,
        key: &str,
        expect: Option<u64>,
        value: Option<String>,
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome, DirError> {
        self.update(|state, _| {
            let current = state.entries.get(key);
            let holds = match (expect, current) {
                (None, None) => true,
                (Some(want), Some(cur)) => cur.version == want,
                _ => false,
            };
            if !holds {
                return Ok(CasOutcome::Conflict {
                    current: current.cloned(),
                });
            }
            if let Some(lease) = lease {
                if !state.leases.contains_key(&lease.0) {
                    return Err(DirError::LeaseExpired { lease });
                }
            }
            if value.is_none() && current.is_none() {
                // Nothing to delete: no new revision, so watchers see no phantom event.
                return Ok(CasOutcome::Done {
                    version: state.revision,
                });
            }
            let revision = state.apply(key, value);
            if let Some(lease) = lease {
                let record = state.leases.get_mut(&lease.0).expect("checked above");
                record.keys.insert(key.to_owned());
            }
            Ok(CasOutcome::Done { version: revision })
        })
    }

    /// [`Directory::watch`], also returning the watcher thread so tests can see it stop.
    fn watch_inner(
        &self,
        prefix: &str,
    ) -> Result<
        (
            Snapshot,
            UnboundedReceiver<DirEvent>,
            thread::JoinHandle<()>,
        ),
        DirError,
    > {
        // Snapshot and watcher start from the same bytes, which is what makes the pair atomic.
        let bytes = read_state_bytes(&self.paths.state)?;
        let state = parse_state(&self.paths.state, bytes.as_deref())?;
        let view = state.prefix(prefix);
        let snapshot = view.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let watcher = Watcher {
            dir: self.clone(),
            prefix: prefix.to_owned(),
            last_bytes: bytes,
            revision: state.revision,
            next_expiry: state.next_expiry(),
            view,
            tx,
        };
        let handle = thread::Builder::new()
            .name("dvs-dir-watch".into())
            .spawn(move || watcher.run())
            .map_err(|source| DirError::Io {
                op: "start watcher thread for",
                path: self.paths.state.clone(),
                source,
            })?;
        Ok((snapshot, rx, handle))
    }
}

/// Reads the state file; `None` if it does not exist yet (an empty directory).
fn read_state_bytes(path: &Path) -> Result<Option<Vec<u8>>, DirError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DirError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

fn parse_state(path: &Path, bytes: Option<&[u8]>) -> Result<State, DirError> {
    match bytes {
        None => Ok(State::default()),
        Some(b) => serde_json::from_slice(b).map_err(|source| DirError::Corrupt {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The state a watch thread carries between polls.
struct Watcher {
    /// The directory watched: its state file is read, and its leases reaped when due.
    dir: EmbeddedDirectory,
    prefix: String,
    /// The file content last looked at; comparing bytes (not mtime/inode, which can repeat
    /// within a clock tick after renames) is what makes change detection exact.
    last_bytes: Option<Vec<u8>>,
    /// Revision of `last_bytes`.
    revision: u64,
    /// When the next lease of `last_bytes` expires: the watcher reaps it then.
    next_expiry: Option<u64>,
    /// Entries under `prefix` as of `revision`, for the diff fallback.
    view: BTreeMap<String, Versioned>,
    tx: UnboundedSender<DirEvent>,
}

/// Wakes a watcher when a file in the directory's folder is written or renamed into place
/// (every change replaces the state file by a rename), so that idle watchers do not poll.
struct FolderNotify {
    fd: std::os::fd::OwnedFd,
}

impl FolderNotify {
    /// `None` when inotify is unavailable; the watcher then polls.
    fn new(folder: &Path) -> Option<Self> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain syscalls; the fd is owned by the OwnedFd from here on.
        let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if raw < 0 {
            return None;
        }
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let path = std::ffi::CString::new(folder.as_os_str().as_bytes()).ok()?;
        let mask = libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE | libc::IN_CREATE | libc::IN_DELETE;
        // SAFETY: `path` is a valid C string and `fd` an inotify instance.
        if unsafe { libc::inotify_add_watch(raw, path.as_ptr(), mask) } < 0 {
            return None;
        }
        Some(FolderNotify { fd })
    }

    /// Waits for a change (or `timeout_ms`), then drains the pending events.
    fn wait(&self, timeout_ms: i32) {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a buffer of its stated length for read.
        unsafe {
            libc::poll(&mut pfd, 1, timeout_ms);
            let mut buf = [0u8; 4096];
            while libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) > 0 {}
        }
    }
}

impl Watcher {
    fn run(mut self) {
        let path = self.dir.paths.state.clone();
        let notify = path.parent().and_then(FolderNotify::new);
        loop {
            // Until the next change, or the next lease expiry, whichever comes first.
            let until_expiry = self.next_expiry.map(|t| t.saturating_sub(now_ms()));
            match &notify {
                Some(n) => n.wait(until_expiry.map_or(NOTIFY_TIMEOUT_MS, |ms| {
                    i32::try_from(ms).map_or(NOTIFY_TIMEOUT_MS, |ms| ms.min(NOTIFY_TIMEOUT_MS))
                })),
                None => thread::sleep(until_expiry.map_or(POLL_INTERVAL, |ms| {
                    POLL_INTERVAL.min(Duration::from_millis(ms))
                })),
            }
            if self.tx.is_closed() {
                return;
            }
            if self.next_expiry.is_some_and(|t| t <= now_ms()) {
                // Reaping writes the state file, which the read below then reports.
                if let Err(e) = self.dir.update(|_, _| Ok(())) {
                    tracing::warn!("directory watch on {:?} ends: {e}", self.prefix);
                    return;
                }
            }
            let bytes = match read_state_bytes(&path) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("directory watch on {:?} ends: {e}", self.prefix);
                    return;
                }
            };
            if bytes == self.last_bytes {
                if self.next_expiry.is_some_and(|t| t <= now_ms()) {
                    // A lease due that the reap did not end: the clock went back. Wait for
                    // the next change instead of trying again at once.
                    self.next_expiry = None;
                }
                continue;
            }
            let state = match parse_state(&path, bytes.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("directory watch on {:?} ends: {e}", self.prefix);
                    return;
                }
            };
            self.last_bytes = bytes;
            self.next_expiry = state.next_expiry();
            for event in self.advance(&state) {
                if self.tx.send(event).is_err() {
                    return;
                }
            }
        }
    }

    /// The events under the prefix between `self.revision` and `state.revision`; updates the
    /// watcher to `state`.
    fn advance(&mut self, state: &State) -> Vec<DirEvent> {
        let replayable = state.revision >= self.revision
            && state
                .log
                .front()
                .is_some_and(|c| c.revision <= self.revision + 1);
        let mut events = Vec::new();
        if state.revision == self.revision {
            // Rewritten without a change; nothing to report.
        } else if replayable {
            for change in state.log.iter().filter(|c| c.revision > self.revision) {
                if !change.key.starts_with(&self.prefix) {
                    continue;
                }
                match &change.value {
                    Some(value) => {
                        self.view.insert(
                            change.key.clone(),
                            Versioned {
                                value: value.clone(),
                                version: change.revision,
                            },
                        );
                        events.push(DirEvent::Put {
                            key: change.key.clone(),
                            value: value.clone(),
                            version: change.revision,
                        });
                    }
                    None => {
                        self.view.remove(&change.key);
                        events.push(DirEvent::Delete {
                            key: change.key.clone(),
                        });
                    }
                }
            }
        } else {
            // Fell behind the log (or the state file was reset): report the net difference.
            let new_view = state.prefix(&self.prefix);
            events = crate::net_difference(&self.view, &new_view);
            self.view = new_view;
        }
        self.revision = state.revision;
        events
    }
}

#[async_trait::async_trait]
impl Directory for EmbeddedDirectory {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, DirError> {
        check_key(key)?;
        // No lock (unless a lease is due): the state file is replaced atomically, so one read
        // is one snapshot.
        Ok(self.read().await?.entries.remove(key))
    }

    async fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, DirError> {
        Ok(self.read().await?.prefix(prefix).into_iter().collect())
    }

    async fn cas(
        &self,
        key: &str,
        expect: Option<u64>,
        value: Option<String>,
    ) -> Result<CasOutcome, DirError> {
        check_key(key)?;
        let owned_key = key.to_owned();
        self.blocking(key, move |d| {
            d.cas_blocking(&owned_key, expect, value, None)
        })
        .await
    }

    async fn watch(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Versioned)>, UnboundedReceiver<DirEvent>), DirError> {
        // Reap what is due, so the snapshot shows no key of an expired lease (one that
        // expires right after is reaped by the watcher, and reported as a delete).
        self.read().await?;
        let (snapshot, rx, _thread) = self.watch_inner(prefix)?;
        Ok((snapshot, rx))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, DirError> {
        let ttl_ms = ttl_ms(ttl);
        self.blocking("", move |d| {
            d.update(|state, now| {
                // Not below the clock in microseconds, so that ids are not reused even if the
                // state file was removed since (no two grants happen within 1 µs).
                let id = (state.last_lease + 1).max(now_us());
                state.last_lease = id;
                state.leases.insert(
                    id,
                    Lease {
                        ttl_ms,
                        expires_ms: now.saturating_add(ttl_ms),
                        keys: BTreeSet::new(),
                    },
                );
                state.dirty = true;
                Ok(LeaseId(id))
            })
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), DirError> {
        self.blocking("", move |d| {
            d.update(|state, now| match state.leases.get_mut(&lease.0) {
                Some(record) => {
                    record.expires_ms = now.saturating_add(record.ttl_ms);
                    state.dirty = true;
                    Ok(())
                }
                None => Err(DirError::LeaseExpired { lease }),
            })
        })
        .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), DirError> {
        self.blocking("", move |d| {
            d.update(|state, _| {
                state.end_lease(lease.0);
                Ok(())
            })
        })
        .await
    }

    async fn cas_leased(
        &self,
        key: &str,
        expect: Option<u64>,
        value: String,
        lease: LeaseId,
    ) -> Result<CasOutcome, DirError> {
        check_key(key)?;
        let owned_key = key.to_owned();
        self.blocking(key, move |d| {
            d.cas_blocking(&owned_key, expect, Some(value), Some(lease))
        })
        .await
    }
}

#[cfg(test)]
mod tests;
