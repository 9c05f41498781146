//! A running [`Directory::watch`](crate::Directory::watch) on etcd: follows the prefix from a
//! revision, resumes after a lost connection, reads the prefix again after a compaction.

use std::collections::BTreeMap;
use std::sync::Arc;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tracing::{error, info, warn};

use super::call::entry;
use super::{Shared, FIRST_RETRY_PAUSE, MAX_RETRY_PAUSE};
use crate::{DirError, DirEvent, Versioned};

/// A running watch: what it has reported so far, and where to resume.
pub(super) struct Follower {
    /// Holding it keeps the client (and its runtime) alive as long as the watch.
    shared: Arc<Shared>,
    full_prefix: String,
    /// The entries under the prefix as the receiver knows them, for the re-read after a
    /// compaction.
    view: BTreeMap<String, Versioned>,
    /// The first revision not yet reported.
    next_revision: i64,
    tx: UnboundedSender<DirEvent>,
}

/// Why a watch stream ended.
enum StreamEnd {
    /// The receiver was dropped, or an entry could not be reported: the watch is over.
    Stop,
    /// The connection was lost or etcd ended the stream: watch again from `next_revision`.
    /// `was_up`: the stream had been established, so this is a new outage.
    Reconnect { why: String, was_up: bool },
    /// The revision to resume from is gone (compacted), or the store went back in time: read
    /// the prefix again.
    Resync(String),
}

impl Follower {
    /// Spawns (on the client's runtime, which must be the current one) the watch of
    /// `full_prefix` after `snapshot`, read at `revision`; returns its receiver.
    pub(super) fn start(
        shared: Arc<Shared>,
        full_prefix: String,
        snapshot: &[(String, Versioned)],
        revision: i64,
    ) -> UnboundedReceiver<DirEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let follower = Follower {
            view: snapshot.iter().cloned().collect(),
            next_revision: revision + 1,
            shared,
            full_prefix,
            tx,
        };
        tokio::spawn(follower.run());
        rx
    }

    fn shown_prefix(&self) -> &str {
        self.full_prefix
            .strip_prefix(&self.shared.settings.prefix)
            .unwrap_or(&self.full_prefix)
    }

    async fn run(mut self) {
        let mut pause = FIRST_RETRY_PAUSE;
        // Whether an outage was logged and not yet its end: one line each, not one a retry.
        let mut down = false;
        loop {
            match self.stream(&mut down).await {
                StreamEnd::Stop => return,
                StreamEnd::Reconnect { why, was_up } => {
                    if was_up {
                        pause = FIRST_RETRY_PAUSE;
                    }
                    if !down {
                        warn!(
                            "directory watch of {:?}: lost etcd at {} ({why}); will resume from revision {}",
                            self.shown_prefix(),
                            self.shared.endpoints,
                            self.next_revision
                        );
                        down = true;
                    }
                }
                StreamEnd::Resync(why) => {
                    info!(
                        "directory watch of {:?}: {why}; reading the prefix again",
                        self.shown_prefix()
                    );
                    match self.resync().await {
                        Ok(()) => {
                            pause = FIRST_RETRY_PAUSE;
                            continue;
                        }
                        Err(DirError::BadEntry { key, reason }) => {
                            error!("directory watch ends: etcd key {key:?}: {reason}");
                            return;
                        }
                        Err(e) if !down => {
                            warn!("directory watch of {:?}: {e}", self.shown_prefix());
                            down = true;
                        }
                        Err(_) => {}
                    }
                }
            }
            tokio::select! {
                _ = self.tx.closed() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
    }

    /// Opens a watch from `next_revision` and reports its events until it ends.
    async fn stream(&mut self, down: &mut bool) -> StreamEnd {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.next_revision);
        let mut client = self.shared.client.clone();
        let opened = tokio::select! {
            _ = self.tx.closed() => return StreamEnd::Stop,
            opened = tokio::time::timeout(
                self.shared.settings.request_timeout,
                client.watch(self.full_prefix.clone(), Some(options)),
            ) => opened,
        };
        let mut stream = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return StreamEnd::Reconnect {
                    why: e.to_string(),
                    was_up: false,
                }
            }
            Err(_) => {
                return StreamEnd::Reconnect {
                    why: "no answer to the watch request".into(),
                    was_up: false,
                }
            }
        };
        let mut was_up = false;
        loop {
            let message = tokio::select! {
                _ = self.tx.closed() => return StreamEnd::Stop,
                message = stream.message() => message,
            };
            let resp = match message {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return StreamEnd::Reconnect {
                        why: "etcd ended the watch stream".into(),
                        was_up,
                    }
                }
                Err(e) => {
                    return StreamEnd::Reconnect {
                        why: e.to_string(),
                        was_up,
                    }
                }
            };
            if resp.compact_revision() > 0 {
                return StreamEnd::Resync(format!(
                    "revision {} is compacted (etcd keeps from {})",
                    self.next_revision,
                    resp.compact_revision()
                ));
            }
            if resp.canceled() {
                return StreamEnd::Reconnect {
                    why: format!("etcd cancelled the watch: {}", resp.cancel_reason()),
                    was_up,
                };
            }
            if resp.created() {
                let now = resp.header().map_or(0, |h| h.revision());
                // A store whose revision is behind what was already reported was restored or
                // replaced: the revisions to resume from mean nothing there.
                if now + 1 < self.next_revision {
                    return StreamEnd::Resync(format!(
                        "etcd's revision {now} is behind the {} already seen",
                        self.next_revision - 1
                    ));
                }
                was_up = true;
                if std::mem::take(down) {
                    info!(
                        "directory watch of {:?}: etcd is back; resumed from revision {}",
                        self.shown_prefix(),
                        self.next_revision
                    );
                }
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let revision = kv.mod_revision();
                let dir_event = match event.event_type() {
                    EventType::Put => match entry(&self.shared.settings.prefix, kv) {
                        Ok((key, v)) => {
                            self.view.insert(key.clone(), v.clone());
                            DirEvent::Put {
                                key,
                                value: v.value,
                                version: v.version,
                            }
                        }
                        Err(e) => {
                            // The trait cannot carry this event: end the watch, as documented;
                            // watching again reports the same error until the key is fixed.
                            error!("directory watch of {:?} ends: {e}", self.shown_prefix());
                            return StreamEnd::Stop;
                        }
                    },
                    EventType::Delete => {
                        let key = match std::str::from_utf8(kv.key())
                            .ok()
                            .and_then(|k| k.strip_prefix(&self.shared.settings.prefix))
                        {
                            Some(k) => k.to_owned(),
                            None => {
                                error!(
                                    "directory watch of {:?} ends: etcd key {:?} is not UTF-8 text",
                                    self.shown_prefix(),
                                    String::from_utf8_lossy(kv.key())
                                );
                                return StreamEnd::Stop;
                            }
                        };
                        self.view.remove(&key);
                        DirEvent::Delete { key }
                    }
                };
                if self.tx.send(dir_event).is_err() {
                    return StreamEnd::Stop;
                }
                self.next_revision = self.next_revision.max(revision + 1);
            }
        }
    }

    /// Reads the prefix again and reports the differences from what the receiver knows:
    /// deletes first, then puts in the order they were made (as the embedded backend does
    /// when its watcher falls behind its log).
    async fn resync(&mut self) -> Result<(), DirError> {
        let (entries, revision) = self
            .shared
            .read_prefix("watch (re-read)", &self.full_prefix)
            .await?;
        let now: BTreeMap<String, Versioned> = entries.into_iter().collect();
        for event in crate::net_difference(&self.view, &now) {
            if self.tx.send(event).is_err() {
                break;
            }
        }
        self.view = now;
        self.next_revision = revision + 1;
        Ok(())
    }
}
