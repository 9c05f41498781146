//! The TLS side of the node's peer links: the current certificates and deny list, reloaded
//! while the node runs.
//!
//! Every few seconds the node rereads its TLS files and the deny list of its config file (off
//! the event loop: these are file reads). New links use what was read last, published to the
//! handshakes as a [`PeerAuth`]; when the deny list changes, the event loop closes the links
//! whose peer certificate it now revokes. A file that does not load keeps the previous
//! material in use and is logged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dvs_config::{ClusterConfig, TlsConfig};
use dvs_tls::{NodeIdentity, NodeTls, TlsPaths};
use dvs_wire::NodeId;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::event_loop::{blocking, Event, Events};
use crate::NodeError;

/// How often the TLS files and the deny list are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// What peer links are secured with, as last loaded.
#[derive(Clone)]
pub(crate) struct PeerAuth {
    /// `None` with `[link] tls = false`.
    pub tls: Option<NodeTls>,
    /// The `[tls]` section as last read (its deny list).
    pub cfg: TlsConfig,
}

impl PeerAuth {
    /// Why a peer with this certificate identity may not have a link, if it may not.
    pub fn refuse(&self, cluster: &str, id: &NodeIdentity) -> Option<String> {
        if id.cluster != cluster {
            return Some(format!(
                "its certificate names cluster {:?}, not ours",
                id.cluster
            ));
        }
        if self.cfg.is_revoked(&id.serial) {
            return Some(format!(
                "its certificate (serial {}) is revoked by the deny list",
                id.serial
            ));
        }
        None
    }
}

/// The peer authentication and where it is reloaded from; owned by the reload task.
pub(crate) struct LinkSecurity {
    current: PeerAuth,
    cluster: String,
    node: NodeId,
    paths: TlsPaths,
    /// The config file to reread the deny list from, when the node was started from one.
    config_path: Option<PathBuf>,
    config_stamp: Option<std::time::SystemTime>,
}

/// What a reload changed.
#[derive(Default)]
struct Reloaded {
    tls: bool,
    deny_list: bool,
}

impl LinkSecurity {
    /// Loads the node's TLS material, or says why it cannot.
    pub fn load(
        cfg: &ClusterConfig,
        id: NodeId,
        name: &str,
        config_path: Option<PathBuf>,
    ) -> Result<Self, NodeError> {
        let paths = TlsPaths {
            dir: cfg.tls.dir.clone(),
            node_name: name.to_string(),
        };
        let tls = if cfg.link.tls {
            Some(NodeTls::load(&paths, &cfg.cluster_id, id).map_err(|e| {
                NodeError::Tls(format!(
                    "{e} (create the files with `dvs tls init` and `dvs tls issue {name}`, \
                     or set `[link] tls = false` to run without TLS)"
                ))
            })?)
        } else {
            warn!(
                "peer links are NOT encrypted or authenticated ([link] tls = false): anyone who \
                 can reach the peer port can act as a node of this cluster"
            );
            None
        };
        let config_stamp = config_path.as_ref().and_then(mtime);
        Ok(LinkSecurity {
            current: PeerAuth {
                tls,
                cfg: cfg.tls.clone(),
            },
            cluster: cfg.cluster_id.clone(),
            node: id,
            paths,
            config_path,
            config_stamp,
        })
    }

    /// What handshakes check peers against now.
    pub fn current(&self) -> Arc<PeerAuth> {
        Arc::new(self.current.clone())
    }

    /// Rereads the TLS files and the deny list if they changed (blocking file reads).
    fn reload(&mut self) -> Reloaded {
        let mut changed = Reloaded::default();
        let print = self.current.tls.as_ref().map(|t| t.fingerprint);
        if print.is_some() && Some(self.paths.fingerprint()) != print {
            match NodeTls::load(&self.paths, &self.cluster, self.node) {
                Ok(t) => {
                    info!(
                        "TLS material reloaded from {} (serial {})",
                        self.paths.dir.display(),
                        t.identity.serial
                    );
                    self.current.tls = Some(t);
                    changed.tls = true;
                }
                Err(e) => {
                    error!("TLS files changed but do not load, keeping the previous ones: {e}");
                    // Don't retry the same broken files every tick.
                    if let Some(t) = self.current.tls.as_mut() {
                        t.fingerprint = self.paths.fingerprint();
                    }
                }
            }
        }
        let Some(path) = &self.config_path else {
            return changed;
        };
        let stamp = mtime(path);
        if stamp == self.config_stamp {
            return changed;
        }
        self.config_stamp = stamp;
        match ClusterConfig::load(path) {
            Ok(new) => {
                if new.tls.revoked != self.current.cfg.revoked {
                    info!(
                        "deny list reloaded: {} revoked certificate(s)",
                        new.tls.revoked.len()
                    );
                    self.current.cfg.revoked = new.tls.revoked;
                    changed.deny_list = true;
                }
            }
            Err(e) => error!("config changed but does not load, keeping the deny list: {e}"),
        }
        changed
    }
}

fn mtime(p: &PathBuf) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Rereads the TLS files and the deny list whenever they change, publishes them to new
/// handshakes, and has the event loop close links that a new deny list revokes.
pub(crate) async fn reload_task(
    mut sec: LinkSecurity,
    publish: watch::Sender<Arc<PeerAuth>>,
    events: Events,
) {
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok((back, changed)) = blocking(move || {
            let changed = sec.reload();
            (sec, changed)
        })
        .await
        else {
            return error!("the TLS reload failed; keeping what was loaded last");
        };
        sec = back;
        if changed.tls || changed.deny_list {
            publish.send_replace(sec.current());
        }
        if changed.deny_list && events.send(Event::DenyListChanged).await.is_err() {
            return;
        }
    }
}
