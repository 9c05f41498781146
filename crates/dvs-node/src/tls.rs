//! The TLS side of the node's peer links: the current certificates and deny list, reloaded
//! while the node runs.
//!
//! Every few seconds the node rereads its TLS files and the deny list of its config file.
//! New links use what was read last; links whose peer certificate has since been revoked are
//! closed. A file that does not load keeps the previous material in use and is logged.

use std::path::PathBuf;
use std::time::Duration;

use dvs_config::{ClusterConfig, TlsConfig};
use dvs_tls::{NodeIdentity, NodeTls, TlsPaths};
use tracing::{error, info, warn};

use crate::{NodeError, State};

/// How often the TLS files and the deny list are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// What peer links are secured with.
pub(crate) struct LinkSecurity {
    /// `None` with `[link] tls = false`.
    pub tls: Option<NodeTls>,
    paths: TlsPaths,
    /// The `[tls]` section as last read (its deny list).
    pub cfg: TlsConfig,
    /// The config file to reread the deny list from, when the node was started from one.
    config_path: Option<PathBuf>,
    config_stamp: Option<std::time::SystemTime>,
}

impl LinkSecurity {
    /// Loads the node's TLS material, or says why it cannot.
    pub fn load(
        cfg: &ClusterConfig,
        id: u16,
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
            tls,
            paths,
            cfg: cfg.tls.clone(),
            config_path,
            config_stamp,
        })
    }

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

fn mtime(p: &PathBuf) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Rereads the TLS files and the deny list whenever they change.
pub(crate) async fn reload_task(state: State) {
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (cluster, id) = {
            let s = state.borrow();
            (s.cfg.cluster_id.clone(), s.me.id)
        };
        let (paths, have_tls, old_print, config_path, old_stamp) = {
            let s = state.borrow();
            let sec = &s.security;
            (
                sec.paths.clone(),
                sec.tls.is_some(),
                sec.tls.as_ref().map(|t| t.fingerprint),
                sec.config_path.clone(),
                sec.config_stamp,
            )
        };
        if have_tls && Some(paths.fingerprint()) != old_print {
            match NodeTls::load(&paths, &cluster, id) {
                Ok(t) => {
                    info!(
                        "TLS material reloaded from {} (serial {})",
                        paths.dir.display(),
                        t.identity.serial
                    );
                    state.borrow_mut().security.tls = Some(t);
                }
                Err(e) => {
                    error!("TLS files changed but do not load, keeping the previous ones: {e}");
                    // Don't retry the same broken files every tick.
                    if let Some(t) = state.borrow_mut().security.tls.as_mut() {
                        t.fingerprint = paths.fingerprint();
                    }
                }
            }
        }
        let Some(path) = config_path else { continue };
        let stamp = mtime(&path);
        if stamp == old_stamp {
            continue;
        }
        state.borrow_mut().security.config_stamp = stamp;
        match ClusterConfig::load(&path) {
            Ok(new) => {
                let mut s = state.borrow_mut();
                if new.tls.revoked != s.security.cfg.revoked {
                    info!(
                        "deny list reloaded: {} revoked certificate(s)",
                        new.tls.revoked.len()
                    );
                    s.security.cfg.revoked = new.tls.revoked;
                    s.close_revoked_links();
                }
            }
            Err(e) => error!("config changed but does not load, keeping the deny list: {e}"),
        }
    }
}
