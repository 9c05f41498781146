//! Glue between the core and the [`Directory`]: registrations, lookups and the watch.
//!
//! Keys (named in [`dvs_directory::keys`]) are `ep/{dc}/{ep}`, values the id of the node
//! running the endpoint; `launch/{dc}/{ep}` holds the command line (JSON) the endpoint's
//! program was launched with, the only place a cooperative restore learns what to start
//! (never from a peer). Operations run one at a time, in the order the core asked for them,
//! so a register followed by an unregister of the same endpoint cannot land in the other
//! order.

use dvs_core::{DirectoryInput, Input};
use std::sync::Arc;
use std::time::Instant;

use dvs_core::{ConnId, MigrRecord, Require};
use dvs_directory::keys::{
    endpoint_key, launch_key, migr_key, parse_endpoint_key, parse_migr_key, ENDPOINT_PREFIX,
    MIGR_PREFIX,
};
use dvs_directory::{CasOutcome, DirEvent, Directory};
use dvs_wire::peer::MigrationId;
use dvs_wire::{DcId, Ep, Errno, NodeId};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::{NodeError, State};

/// A directory operation the core asked for.
pub(crate) enum DirOp {
    Register {
        conn: ConnId,
        dc: DcId,
        ep: Ep,
    },
    Unregister {
        dc: DcId,
        ep: Ep,
    },
    Lookup {
        dc: DcId,
        ep: Ep,
    },
    MigrRecord {
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        record: MigrRecord,
        require: Require,
    },
    Relocate {
        dc: DcId,
        ep: Ep,
        node: NodeId,
    },
    /// Read the migration record of `{dc, ep}` for migration `id`.
    ReadMigr {
        id: MigrationId,
        dc: DcId,
        ep: Ep,
    },
    /// Answered once every operation queued before it is done (operations run in order).
    Sync {
        conn: ConnId,
    },
    /// Record the command line `{dc, ep}` was launched with on this node.
    PutLaunch {
        dc: DcId,
        ep: Ep,
        cmd: Vec<String>,
    },
    /// Read the launch record of `{dc, ep}`; `Err` names what is missing.
    GetLaunch {
        dc: DcId,
        ep: Ep,
        reply: oneshot::Sender<Result<Vec<String>, String>>,
    },
}

/// Writes `value` at `k` whatever is there (a few rounds of compare-and-set).
async fn put(dir: &dyn Directory, k: &str, value: String) -> Result<(), String> {
    for _ in 0..5 {
        let current = dir.get(k).await.map_err(|e| e.to_string())?;
        match dir
            .cas(k, current.map(|v| v.version), Some(value.clone()))
            .await
        {
            Ok(CasOutcome::Conflict { .. }) => continue,
            Ok(CasOutcome::Done { .. }) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("too many concurrent updates".into())
}

/// The launch record of `{dc, ep}`.
async fn get_launch(dir: &dyn Directory, dc: DcId, ep: Ep) -> Result<Vec<String>, String> {
    let k = launch_key(dc, ep);
    let v = dir
        .get(&k)
        .await
        .map_err(|e| format!("cannot read the launch record {k}: {e}"))?
        .ok_or_else(|| {
            format!("no launch record {k} in the directory: start {dc}/{ep} with `dvs run`")
        })?;
    let cmd: Vec<String> = serde_json::from_str(&v.value)
        .map_err(|e| format!("launch record {k} is not a JSON command line: {e}"))?;
    if cmd.is_empty() {
        return Err(format!("launch record {k} is an empty command line"));
    }
    Ok(cmd)
}

/// Writes `record` if the current record satisfies `require`: the compare-and-set that decides
/// a migration. `Err` carries the record that prevented it.
async fn write_record(
    dir: &dyn Directory,
    dc: DcId,
    ep: Ep,
    record: MigrRecord,
    require: Require,
) -> Result<(), Option<MigrRecord>> {
    let k = migr_key(dc, ep);
    // A conflict with a record that still allows the write (a concurrent unrelated update)
    // is retried; a few rounds are plenty.
    for _ in 0..5 {
        let current = dir.get(&k).await.map_err(|e| {
            error!("directory: cannot read {k}: {e}");
            None
        })?;
        let parsed = current.as_ref().and_then(|v| MigrRecord::parse(&v.value));
        if !require.allows(parsed.as_ref()) {
            return Err(parsed);
        }
        match dir
            .cas(&k, current.map(|v| v.version), Some(record.encode()))
            .await
        {
            Ok(CasOutcome::Done { .. }) => return Ok(()),
            Ok(CasOutcome::Conflict { .. }) => continue,
            Err(e) => {
                error!("directory: cannot write {k}: {e}");
                return Err(None);
            }
        }
    }
    Err(None)
}

/// Cleans what a previous run of this node left, loads the current registrations, and starts
/// the worker and the watch.
pub(crate) async fn start(
    state: State,
    dir: Arc<dyn Directory>,
    rx: mpsc::UnboundedReceiver<DirOp>,
) -> Result<(), NodeError> {
    let me = state.borrow().me.id;
    // Nothing runs here yet: every key naming this node is stale.
    for (k, v) in dir.get_prefix(ENDPOINT_PREFIX).await? {
        if v.value == me.to_string() {
            let _ = dir.cas(&k, Some(v.version), None).await?;
            info!("removed stale registration {k} left by a previous run");
        }
    }
    let (snapshot, events) = dir.watch(ENDPOINT_PREFIX).await?;
    {
        let mut s = state.borrow_mut();
        for (k, v) in snapshot {
            if let (Some((dc, ep)), Ok(node)) = (parse_endpoint_key(&k), v.value.parse::<NodeId>())
            {
                s.core.handle(
                    Instant::now(),
                    Input::Directory(DirectoryInput::Changed {
                        dc,
                        ep,
                        node: Some(node),
                    }),
                );
            }
        }
        s.drive();
    }
    tokio::task::spawn_local(watch(state.clone(), dir.clone(), events));
    let (_, migr_events) = dir.watch(MIGR_PREFIX).await?;
    tokio::task::spawn_local(watch_migrations(state.clone(), migr_events));
    tokio::task::spawn_local(worker(state, dir, rx));
    Ok(())
}

async fn watch(
    state: State,
    dir: Arc<dyn Directory>,
    mut events: mpsc::UnboundedReceiver<DirEvent>,
) {
    loop {
        while let Some(ev) = events.recv().await {
            let (k, node) = match &ev {
                DirEvent::Put { key, value, .. } => (key, value.parse::<NodeId>().ok()),
                DirEvent::Delete { key } => (key, None),
            };
            if let Some((dc, ep)) = parse_endpoint_key(k) {
                let mut s = state.borrow_mut();
                s.core.handle(
                    Instant::now(),
                    Input::Directory(DirectoryInput::Changed { dc, ep, node }),
                );
                s.drive();
            }
        }
        warn!("directory watch ended; watching again");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        match dir.watch(ENDPOINT_PREFIX).await {
            Ok((snap, ev)) => {
                let mut s = state.borrow_mut();
                for (k, v) in snap {
                    if let (Some((dc, ep)), Ok(node)) =
                        (parse_endpoint_key(&k), v.value.parse::<NodeId>())
                    {
                        s.core.handle(
                            Instant::now(),
                            Input::Directory(DirectoryInput::Changed {
                                dc,
                                ep,
                                node: Some(node),
                            }),
                        );
                    }
                }
                s.drive();
                events = ev;
            }
            Err(e) => error!("directory watch failed: {e}"),
        }
    }
}

/// Applies decided migrations this node may have missed the broadcast of.
async fn watch_migrations(state: State, mut events: mpsc::UnboundedReceiver<DirEvent>) {
    while let Some(ev) = events.recv().await {
        let DirEvent::Put { key, value, .. } = ev else {
            continue;
        };
        let Some((dc, ep)) = parse_migr_key(&key) else {
            continue;
        };
        if let Some(record) = MigrRecord::parse(&value) {
            let mut s = state.borrow_mut();
            s.core.handle(
                Instant::now(),
                Input::Directory(DirectoryInput::MigrRecordChanged { dc, ep, record }),
            );
            s.drive();
        }
    }
    warn!("directory watch of migration records ended");
}

async fn worker(state: State, dir: Arc<dyn Directory>, mut rx: mpsc::UnboundedReceiver<DirOp>) {
    let me = state.borrow().me.id;
    let me_s = me.to_string();
    while let Some(op) = rx.recv().await {
        match op {
            DirOp::Register { conn, dc, ep } => {
                let k = endpoint_key(dc, ep);
                let result = match dir.cas(&k, None, Some(me_s.clone())).await {
                    Ok(CasOutcome::Done { .. }) => Ok(()),
                    // Named this node: a local race the core resolves itself.
                    Ok(CasOutcome::Conflict { current: Some(v) }) if v.value == me_s => Ok(()),
                    Ok(CasOutcome::Conflict { current }) => {
                        let holder = current.map(|v| v.value).unwrap_or_default();
                        info!("bind of {k} refused: already bound on node {holder}");
                        Err(Errno::AlreadyBound)
                    }
                    Err(e) => {
                        error!("directory: cannot register {k}: {e}");
                        Err(Errno::Shutdown)
                    }
                };
                let mut s = state.borrow_mut();
                s.core.handle(
                    Instant::now(),
                    Input::Directory(DirectoryInput::Registered { conn, result }),
                );
                s.drive();
            }
            DirOp::Unregister { dc, ep } => {
                let k = endpoint_key(dc, ep);
                match dir.get(&k).await {
                    Ok(Some(v)) if v.value == me_s => {
                        if let Err(e) = dir.cas(&k, Some(v.version), None).await {
                            error!("directory: cannot unregister {k}: {e}");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => error!("directory: cannot read {k}: {e}"),
                }
            }
            DirOp::MigrRecord {
                id,
                dc,
                ep,
                record,
                require,
            } => {
                let result = write_record(dir.as_ref(), dc, ep, record, require).await;
                let mut s = state.borrow_mut();
                s.core.handle(
                    Instant::now(),
                    Input::Directory(DirectoryInput::MigrRecordWritten { id, result }),
                );
                s.drive();
            }
            DirOp::ReadMigr { id, dc, ep } => {
                let k = migr_key(dc, ep);
                let record = match dir.get(&k).await {
                    Ok(v) => v.and_then(|v| MigrRecord::parse(&v.value)),
                    Err(e) => {
                        // Unknown is not "absent": keep holding, the next check asks again.
                        error!("directory: cannot read {k}: {e}");
                        continue;
                    }
                };
                let mut s = state.borrow_mut();
                s.core.handle(
                    Instant::now(),
                    Input::Directory(DirectoryInput::MigrRecordRead { id, dc, ep, record }),
                );
                s.drive();
            }
            DirOp::Sync { conn } => {
                let mut s = state.borrow_mut();
                s.core.handle(
                    Instant::now(),
                    Input::Directory(DirectoryInput::Synced { conn }),
                );
                s.drive();
            }
            DirOp::Relocate { dc, ep, node } => {
                let k = endpoint_key(dc, ep);
                for _ in 0..5 {
                    let current = match dir.get(&k).await {
                        Ok(v) => v,
                        Err(e) => {
                            error!("directory: cannot read {k}: {e}");
                            break;
                        }
                    };
                    match dir
                        .cas(&k, current.map(|v| v.version), Some(node.to_string()))
                        .await
                    {
                        Ok(CasOutcome::Conflict { .. }) => continue,
                        Ok(CasOutcome::Done { .. }) => break,
                        Err(e) => {
                            error!("directory: cannot relocate {k}: {e}");
                            break;
                        }
                    }
                }
            }
            DirOp::PutLaunch { dc, ep, cmd } => {
                let k = launch_key(dc, ep);
                let value = serde_json::to_string(&cmd).expect("strings encode");
                if let Err(e) = put(dir.as_ref(), &k, value).await {
                    error!("directory: cannot write {k}: {e}");
                }
            }
            DirOp::GetLaunch { dc, ep, reply } => {
                let _ = reply.send(get_launch(dir.as_ref(), dc, ep).await);
            }
            DirOp::Lookup { dc, ep } => {
                let k = endpoint_key(dc, ep);
                let node = match dir.get(&k).await {
                    Ok(v) => v.and_then(|v| v.value.parse::<NodeId>().ok()),
                    Err(e) => {
                        error!("directory: cannot look up {k}: {e}");
                        None
                    }
                };
                let mut s = state.borrow_mut();
                s.core.handle(
                    Instant::now(),
                    Input::Directory(DirectoryInput::Located { dc, ep, node }),
                );
                s.drive();
            }
        }
    }
}
