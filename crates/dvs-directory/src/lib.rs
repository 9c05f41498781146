//! The cluster directory: the small, consistent key/value store through which node kernels
//! agree on endpoint registrations, node membership and migration records.
//!
//! The interface is deliberately narrow — read one key or a prefix, compare-and-set one key,
//! watch a prefix — because that is exactly what both backends can do atomically:
//!
//! - [`EmbeddedDirectory`]: a folder on the local file system, shared by the node processes of
//!   a cluster that runs on one machine. No external service; the default.
//! - [`EtcdDirectory`]: an etcd cluster, for nodes on several machines. `version` is a key's
//!   `mod_revision`, [`Directory::cas`] a `Txn` comparing `mod_revision` (or
//!   `create_revision == 0` for "absent"), [`Directory::watch`] a range read followed by a
//!   prefix watch starting at the read's revision + 1.
//!
//! Versions are store-wide revisions (like etcd's), so a key's version only ever grows, also
//! across delete and re-create; this is what lets a CAS never confuse an old incarnation of a
//! key with a new one.
//!
//! Leases give node membership its liveness: a node grants itself a lease
//! ([`Directory::grant_lease`]), writes its `nodes/{id}` key attached to it
//! ([`Directory::cas_leased`]) and renews it ([`Directory::keep_alive`]) well within its TTL.
//! If the node stops renewing, the lease expires and its keys are deleted; watchers see
//! ordinary [`DirEvent::Delete`]s, in order with every other change. A node that is told its
//! lease is gone ([`DirError::LeaseExpired`]) has lost its membership and must fence itself.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dvs_config::DirectoryConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedReceiver;

mod embedded;
mod etcd;
pub mod keys;

pub use embedded::EmbeddedDirectory;
pub use etcd::{EtcdDirectory, EtcdSettings};

/// Opens the directory that a cluster config's `[directory]` section names: the one way
/// node kernels and the CLI reach it, so both always look at the same store.
///
/// An etcd directory is not dialed here: if etcd is down, the operations fail (naming the
/// endpoints), so a caller can start and retry.
pub fn open(config: &DirectoryConfig) -> Result<Arc<dyn Directory>, DirError> {
    match config {
        DirectoryConfig::Embedded { path } => Ok(Arc::new(EmbeddedDirectory::open(path)?)),
        DirectoryConfig::Etcd { .. } => {
            let settings = EtcdSettings::from_config(config).expect("an etcd config");
            Ok(Arc::new(EtcdDirectory::connect(settings)?))
        }
    }
}

/// Refuses the empty key, in every backend alike: etcd rejects it, and under a prefix it
/// would be the prefix itself.
fn check_key(key: &str) -> Result<(), DirError> {
    if key.is_empty() {
        return Err(DirError::InvalidKey {
            key: key.to_owned(),
            reason: "keys must not be empty",
        });
    }
    Ok(())
}

/// The events that take a watcher from `old` to `new` when the changes in between are not
/// known one by one (a watcher that fell behind): deletes first, then puts in the order they
/// were made. Changes that came and went in between leave no trace.
fn net_difference(
    old: &BTreeMap<String, Versioned>,
    new: &BTreeMap<String, Versioned>,
) -> Vec<DirEvent> {
    let mut events: Vec<DirEvent> = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(|k| DirEvent::Delete { key: k.clone() })
        .collect();
    let mut puts: Vec<_> = new.iter().filter(|(k, v)| old.get(*k) != Some(v)).collect();
    puts.sort_by_key(|(_, v)| v.version);
    events.extend(puts.into_iter().map(|(k, v)| DirEvent::Put {
        key: k.clone(),
        value: v.value.clone(),
        version: v.version,
    }));
    events
}

/// A value together with the revision at which it was last written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    /// The stored value.
    pub value: String,
    /// The key's modification revision; always `> 0`, and strictly greater than any earlier
    /// version of the same key (also one that was deleted in between).
    pub version: u64,
}

/// A lease of the directory: while it lives, the keys attached to it live; when it expires
/// (nobody renewed it within its TTL) or is revoked, they are deleted.
///
/// Ids are positive and not reused by either backend, so an old lease id never names a newer
/// lease; an id that no grant returned (such as 0) is treated as a lease that is gone. Shown
/// in hexadecimal, as `etcdctl` shows etcd's lease ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseId(pub i64);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// The result of [`Directory::cas`] and [`Directory::cas_leased`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The expectation held and the change was applied.
    ///
    /// `version` is the revision of the change: the key's new version for a put, the revision
    /// of the delete for a delete. Deleting a key that was already absent (with `expect: None`)
    /// changes nothing and reports the store's current revision (which may be `0` on an empty
    /// store), as etcd does.
    Done {
        /// Revision at which the change took effect.
        version: u64,
    },
    /// The expectation did not hold; nothing was changed.
    Conflict {
        /// What the key holds now, so the caller can retry without another read.
        current: Option<Versioned>,
    },
}

/// A change seen by a [`Directory::watch`] receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirEvent {
    /// `key` was created or overwritten.
    Put {
        /// The key that changed.
        key: String,
        /// Its new value.
        value: String,
        /// Its new version.
        version: u64,
    },
    /// `key` was deleted.
    Delete {
        /// The key that was removed.
        key: String,
    },
}

impl DirEvent {
    /// The key this event is about.
    pub fn key(&self) -> &str {
        match self {
            DirEvent::Put { key, .. } | DirEvent::Delete { key } => key,
        }
    }
}

/// Why a directory operation failed.
///
/// Non-exhaustive so that backends can add their own failure kinds (lost leases, ...)
/// without breaking callers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirError {
    /// A file of the embedded directory could not be created, read, written or locked.
    #[error("directory: cannot {op} {path}: {source}")]
    Io {
        /// What was being attempted ("read", "lock", ...).
        op: &'static str,
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The embedded directory's state file exists but is not a valid state.
    #[error(
        "directory: state file {path} is corrupt (remove it to reset the directory): {source}"
    )]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The key is not acceptable to the store.
    #[error("directory: invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The offending key.
        key: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The config names a kind of directory this build cannot use. (Every kind is supported
    /// now; kept for callers that match on it.)
    #[error("directory kind {kind:?} is not supported by this build yet; use kind = \"embedded\"")]
    Unsupported {
        /// The configured kind.
        kind: &'static str,
    },
    /// etcd did not answer in time: no member could be reached, or none answered within the
    /// request timeout. For a compare-and-set, the change may or may not have been applied.
    #[error("directory: etcd at {endpoints} unavailable for {op} of key {key:?}: {reason}")]
    Unavailable {
        /// The configured endpoints.
        endpoints: String,
        /// The operation ("get", "compare-and-set", "watch", ...).
        op: &'static str,
        /// The key (or prefix) the operation was about, without the directory's prefix.
        key: String,
        /// What went wrong, with the last error seen.
        reason: String,
    },
    /// etcd answered the operation with an error that a retry would not change (a refused
    /// certificate, a permission, a request too large, ...).
    #[error("directory: etcd at {endpoints} refused {op} of key {key:?}: {message}")]
    Refused {
        /// The configured endpoints.
        endpoints: String,
        /// The operation.
        op: &'static str,
        /// The key (or prefix), without the directory's prefix.
        key: String,
        /// etcd's error.
        message: String,
    },
    /// An entry under the directory's prefix is not something dvs wrote: a value or key that
    /// is not UTF-8 text, for instance one written by hand.
    #[error("directory: etcd key {key:?} is unusable: {reason}; fix or delete it")]
    BadEntry {
        /// The whole etcd key, prefix included (as `etcdctl` shows it).
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The directory settings cannot work (a config built in code, which skipped the config
    /// file's checks, or TLS material the client cannot use).
    #[error("directory: {message}")]
    BadConfig {
        /// What is wrong.
        message: String,
    },
    /// The lease has expired or was revoked (or never existed): the keys attached to it are
    /// gone. A node that gets this for its membership lease has lost its membership and must
    /// stop acting as a member (fence itself) before it joins again with a new lease.
    #[error("directory: lease {lease} has expired or was revoked; its keys are deleted")]
    LeaseExpired {
        /// The lease that is gone.
        lease: LeaseId,
    },
    /// The operation on `key` could not run because the async runtime is shutting down.
    #[error("directory: operation on key {key:?} was cancelled (runtime shutting down)")]
    Cancelled {
        /// The key the operation was about.
        key: String,
    },
}

/// A consistent key/value store shared by all nodes of a cluster.
///
/// Implementations are cheap to share behind an `Arc<dyn Directory>`.
#[async_trait::async_trait]
pub trait Directory: Send + Sync + 'static {
    /// The current value and version of `key`, or `None` if it is absent.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, DirError>;

    /// All entries whose key starts with `prefix` (`""` = every key), sorted by key, taken
    /// from one consistent snapshot.
    async fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, DirError>;

    /// Compare-and-set on one key.
    ///
    /// `expect`: `None` = key must be absent; `Some(v)` = key's current version must be `v`.
    /// `value`: `Some` = put; `None` = delete.
    ///
    /// If the returned future is dropped before it completes, the change may or may not have
    /// been applied (as with any remote store); read the key back to find out.
    async fn cas(
        &self,
        key: &str,
        expect: Option<u64>,
        value: Option<String>,
    ) -> Result<CasOutcome, DirError>;

    /// Atomically: the current entries under `prefix` (sorted by key), and a receiver of every
    /// change under `prefix` after that snapshot, in the order they happened.
    ///
    /// Dropping the receiver ends the watch. If the backend can no longer follow the store, it
    /// closes the channel (the receiver yields `None`); calling `watch` again resynchronises
    /// and reports the cause as an error if it persists.
    async fn watch(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Versioned)>, UnboundedReceiver<DirEvent>), DirError>;

    /// A new lease that expires `ttl` from now unless renewed by [`Directory::keep_alive`].
    ///
    /// The TTL is rounded up to the backend's granularity: whole seconds, at least 1 s, in
    /// etcd (which may also raise it to its own minimum, 1.5 election timeouts); milliseconds,
    /// at least 1 ms, in the embedded directory. Keys attached to the lease may outlive the
    /// TTL by a moment (etcd checks for expired leases every 500 ms), never by much.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, DirError>;

    /// Renews `lease`: it now expires its (rounded) TTL from now.
    ///
    /// [`DirError::LeaseExpired`] if the lease is gone (expired or revoked): its keys are
    /// deleted, and the caller must act as if it never had them. Other errors (etcd
    /// unreachable) say nothing about the lease; retry within the TTL.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), DirError>;

    /// Ends `lease` now, deleting every key attached to it (watchers see the deletes at
    /// once). Revoking a lease that is already gone is not an error: its keys are gone too.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), DirError>;

    /// [`Directory::cas`] that puts `value` attached to `lease`: the key is deleted when the
    /// lease expires or is revoked.
    ///
    /// `expect` as for [`Directory::cas`]: `None` creates the key only if it is absent,
    /// `Some(v)` replaces version `v` (for instance one's own stale entry of an earlier lease,
    /// which is thereby moved to `lease`). A plain [`Directory::cas`] put or delete of a
    /// leased key detaches it from its lease, as in etcd.
    ///
    /// The expectation is checked first: if it does not hold, the outcome is a
    /// [`CasOutcome::Conflict`] whether or not the lease lives; if it holds but `lease` is
    /// gone, [`DirError::LeaseExpired`] and nothing is written.
    async fn cas_leased(
        &self,
        key: &str,
        expect: Option<u64>,
        value: String,
        lease: LeaseId,
    ) -> Result<CasOutcome, DirError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_follows_the_config() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("dir");
        let a = open(&DirectoryConfig::Embedded { path: path.clone() }).unwrap();
        let b = open(&DirectoryConfig::Embedded { path }).unwrap();
        // Two opens of one config are one store.
        a.cas("k", None, Some("v".into())).await.unwrap();
        assert_eq!(b.get("k").await.unwrap().unwrap().value, "v");
        // An etcd directory opens without dialing (none runs here); a bad one is refused.
        let etcd = |prefix: &str| DirectoryConfig::Etcd {
            endpoints: vec!["http://127.0.0.1:1".into()],
            prefix: prefix.into(),
            dial_timeout_ms: 100,
            request_timeout_ms: 100,
            tls: None,
        };
        open(&etcd("/dvs/t/")).unwrap();
        let e = open(&etcd("/dvs"))
            .err()
            .expect("a prefix without its slash");
        assert!(matches!(e, DirError::BadConfig { .. }), "{e}");
        assert!(e.to_string().contains("\"/dvs\""), "{e}");
    }
}
