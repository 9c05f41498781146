//! Glue between the core and the [`Directory`]: the core's [`DirRequest`]s, the launch
//! records, and the watch.
//!
//! Keys (named in [`dvs_directory::keys`]) are `ep/{dc}/{ep}`, values the id of the node
//! running the endpoint; `launch/{dc}/{ep}` holds the command line (JSON) the endpoint's
//! program was launched with, the only place a cooperative restore learns what to start
//! (never from a peer). Jobs run one at a time, in the order the event loop queued them, so a
//! register followed by an unregister of the same endpoint cannot land in the other order.
//!
//! The directory client runs on a thread of its own, with its own runtime: a slow directory
//! (or the embedded directory's file I/O) never holds up the event loop. Answers and changes
//! reach the loop as [`Input::Directory`] events.

use dvs_core::{DirRequest, DirectoryInput, Input};
use std::sync::Arc;

use dvs_core::{MigrRecord, Require};
use dvs_directory::keys::{
    endpoint_key, launch_key, migr_key, parse_dc_key, parse_dc_nodes, parse_endpoint_key,
    parse_migr_key, parse_node_key, DC_PREFIX, ENDPOINT_PREFIX, MIGR_PREFIX, NODE_PREFIX,
};
use dvs_directory::{CasOutcome, DirEvent, Directory, Versioned};
use dvs_wire::{DcId, Ep, Errno, NodeId};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::event_loop::{Event, Events};
use crate::membership::{self, MemberCmd, MemberRecord};
use crate::NodeError;

/// Tries of a relocation before giving up (about 30 s with the back-off).
const RELOCATE_ATTEMPTS: u32 = 20;

/// A job for the directory thread.
pub(crate) enum DirJob {
    /// One of the core's requests; its answer, if it has one, goes to the event loop.
    Core(DirRequest),
    /// A launch record, which only the shell uses.
    Launch(LaunchRecord),
    /// Which node the directory records for each of `endpoints` (after a fence).
    Owners {
        endpoints: Vec<(DcId, Ep)>,
        reply: oneshot::Sender<Owners>,
    },
}

/// Each endpoint asked about, and the node the directory records it on.
pub(crate) type Owners = Vec<((DcId, Ep), Option<NodeId>)>;

/// The launch record of `{dc, ep}`: the command line it was launched with.
pub(crate) enum LaunchRecord {
    /// Record the command line `{dc, ep}` was launched with on this node.
    Put { dc: DcId, ep: Ep, cmd: Vec<String> },
    /// Read it; `Err` names what is missing.
    Get {
        dc: DcId,
        ep: Ep,
        reply: oneshot::Sender<Result<Vec<String>, String>>,
    },
}

/// What the directory thread gives the node at start.
pub(crate) struct Started {
    /// The thread's job queue.
    pub jobs: mpsc::UnboundedSender<DirJob>,
    /// The registrations and the DCs' node sets, as inputs for the core, to give it before
    /// anything else.
    pub inputs: Vec<Input>,
    /// The way to the membership lease holder.
    pub membership: mpsc::UnboundedSender<MemberCmd>,
}

/// Cleans what a previous run of this node left, takes the current registrations and DC
/// node sets, and starts the directory thread with the watches and the membership lease
/// holder (see `membership.rs`).
pub(crate) async fn start(
    dir: Arc<dyn Directory>,
    me: NodeId,
    member: MemberRecord,
    lease_ttl: std::time::Duration,
    events: Events,
) -> Result<Started, NodeError> {
    // Nothing runs here yet: every key naming this node is stale.
    for (k, v) in dir.get_prefix(ENDPOINT_PREFIX).await? {
        if v.value == me.to_string() {
            let _ = dir.cas(&k, Some(v.version), None).await?;
            info!("removed stale registration {k} left by a previous run");
        }
    }
    let (snapshot, ep_watch) = dir.watch(ENDPOINT_PREFIX).await?;
    let (_, migr_watch) = dir.watch(MIGR_PREFIX).await?;
    let (dcs, dc_watch) = dir.watch(DC_PREFIX).await?;
    let (members, member_watch) = dir.watch(NODE_PREFIX).await?;
    let mut inputs = changes(snapshot);
    inputs.extend(dcs.iter().filter_map(|(k, v)| dc_nodes_input(k, &v.value)));
    let (jobs, rx) = mpsc::unbounded_channel();
    let (membership, cmds) = mpsc::unbounded_channel();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(crate::io_err("cannot start the directory runtime"))?;
    std::thread::Builder::new()
        .name("dvs-directory".into())
        .spawn(move || {
            rt.block_on(async move {
                // The snapshots of `ep/` and `dcs/` went into `inputs` already; the one of
                // `migr/` holds nothing a fresh core needs.
                let watches = [
                    (
                        ENDPOINT_PREFIX,
                        None,
                        ep_watch,
                        endpoint_events as fn(Seen) -> Vec<Event>,
                    ),
                    (MIGR_PREFIX, None, migr_watch, migration_events),
                    (DC_PREFIX, None, dc_watch, dc_events),
                    (NODE_PREFIX, Some(members), member_watch, member_events),
                ];
                for (prefix, first, rx, events_of) in watches {
                    tokio::spawn(follow(
                        dir.clone(),
                        prefix,
                        first,
                        rx,
                        events.clone(),
                        events_of,
                    ));
                }
                tokio::spawn(membership::hold(
                    dir.clone(),
                    me,
                    member,
                    lease_ttl,
                    events.clone(),
                    cmds,
                ));
                worker(dir, me, rx, events).await;
            })
        })
        .map_err(crate::io_err("cannot start the directory thread"))?;
    Ok(Started {
        jobs,
        inputs,
        membership,
    })
}

/// The core's input for entry `key` of `dcs/`; `None`, with the key logged, if it is garbage.
fn dc_nodes_input(key: &str, value: &str) -> Option<Input> {
    let dc = parse_dc_key(key)?;
    let Some(nodes) = parse_dc_nodes(value) else {
        error!("directory entry {key} holds {value:?}, which is not a list of node ids; ignored");
        return None;
    };
    Some(Input::Directory(DirectoryInput::DcNodes { dc, nodes }))
}

/// The entries a watch shows written: all of a snapshot, or the one a put wrote (a delete
/// writes none).
fn written(seen: Seen) -> Vec<(String, String)> {
    match seen {
        Seen::Snapshot(snap) => snap.into_iter().map(|(k, v)| (k, v.value)).collect(),
        Seen::Change(DirEvent::Put { key, value, .. }) => vec![(key, value)],
        Seen::Change(DirEvent::Delete { .. }) => Vec::new(),
    }
}

/// The core's inputs for what `dcs/` shows: an operator's `dvs dc add-node` / `remove-node`.
/// A deleted entry leaves the DC as it was (the operator commands never delete one).
fn dc_events(seen: Seen) -> Vec<Event> {
    written(seen)
        .iter()
        .filter_map(|(k, v)| dc_nodes_input(k, v))
        .map(Event::Input)
        .collect()
}

/// The member entry `key` = `value` of `nodes/` (`None` for a bad one, logged).
fn member_of(key: &str, value: &str) -> Option<(NodeId, MemberRecord)> {
    let node = parse_node_key(key)?;
    match serde_json::from_str(value) {
        Ok(r) => Some((node, r)),
        Err(e) => {
            error!("directory entry {key} holds {value:?}, which is not a member record ({e}); ignored");
            None
        }
    }
}

/// What `nodes/` shows of which nodes hold a lease, for status. A snapshot (of a watch
/// opened again) replaces what the node knew.
fn member_events(seen: Seen) -> Vec<Event> {
    let change = match seen {
        Seen::Snapshot(snap) => MembersChange::All(
            snap.iter()
                .filter_map(|(k, v)| member_of(k, &v.value))
                .collect(),
        ),
        Seen::Change(DirEvent::Put { key, value, .. }) => match member_of(&key, &value) {
            Some((node, r)) => MembersChange::Alive(node, r),
            None => return Vec::new(),
        },
        Seen::Change(DirEvent::Delete { key }) => match parse_node_key(&key) {
            Some(node) => MembersChange::Gone(node),
            None => return Vec::new(),
        },
    };
    vec![Event::Members(change)]
}

/// A change of the nodes holding a membership lease.
#[derive(Debug)]
pub(crate) enum MembersChange {
    /// Every node that holds one now (a watch's snapshot).
    All(Vec<(NodeId, MemberRecord)>),
    /// This node holds one (again).
    Alive(NodeId, MemberRecord),
    /// This node's lease ended (expired, revoked when it left).
    Gone(NodeId),
}

/// The registrations of an `ep/` snapshot, as inputs for the core.
fn changes(snapshot: Vec<(String, Versioned)>) -> Vec<Input> {
    snapshot
        .into_iter()
        .filter_map(|(k, v)| {
            let (dc, ep) = parse_endpoint_key(&k)?;
            let node = node_of(&k, &v.value)?;
            Some(Input::Directory(DirectoryInput::Changed {
                dc,
                ep,
                node: Some(node),
            }))
        })
        .collect()
}

/// The node an `ep/` entry names; `None`, with the key logged, if its value is no node id
/// (written by hand, or by something that is not dvs): such an entry routes nothing.
fn node_of(key: &str, value: &str) -> Option<NodeId> {
    let node = value.parse::<NodeId>().ok();
    if node.is_none() {
        error!("directory entry {key} holds {value:?}, which is not a node id; ignored");
    }
    node
}

/// The migration record of a `migr/` entry; `None`, with the key logged, if it is garbage.
fn record_of(key: &str, value: &str) -> Option<(DcId, Ep, MigrRecord)> {
    let (dc, ep) = parse_migr_key(key)?;
    let record = MigrRecord::parse(value);
    if record.is_none() {
        error!("directory entry {key} holds {value:?}, which is not a migration record; ignored");
    }
    Some((dc, ep, record?))
}

/// The core's inputs for what `ep/` shows: where endpoints run.
fn endpoint_events(seen: Seen) -> Vec<Event> {
    let inputs = match seen {
        Seen::Snapshot(snap) => changes(snap),
        Seen::Change(ev) => {
            let (k, node) = match &ev {
                DirEvent::Put { key, value, .. } => match node_of(key, value) {
                    Some(n) => (key, Some(n)),
                    None => return Vec::new(),
                },
                DirEvent::Delete { key } => (key, None),
            };
            parse_endpoint_key(k)
                .map(|(dc, ep)| Input::Directory(DirectoryInput::Changed { dc, ep, node }))
                .into_iter()
                .collect()
        }
    };
    inputs.into_iter().map(Event::Input).collect()
}

/// What a watch reports to [`follow`]: the entries when it was opened again, or a change.
enum Seen {
    Snapshot(Vec<(String, Versioned)>),
    Change(DirEvent),
}

/// Follows the watch of `prefix`: `events_of` turns every change, the snapshot `first` (if
/// the caller has not used it itself) and the snapshot of every watch opened again after one
/// ended, into events for the loop. Returns once the event loop is gone.
async fn follow(
    dir: Arc<dyn Directory>,
    prefix: &'static str,
    first: Option<Vec<(String, Versioned)>>,
    mut changes_rx: mpsc::UnboundedReceiver<DirEvent>,
    events: Events,
    events_of: fn(Seen) -> Vec<Event>,
) {
    let mut snapshot = first;
    loop {
        if let Some(snap) = snapshot.take() {
            for ev in events_of(Seen::Snapshot(snap)) {
                if events.send(ev).await.is_err() {
                    return;
                }
            }
        }
        while let Some(change) = changes_rx.recv().await {
            for ev in events_of(Seen::Change(change)) {
                if events.send(ev).await.is_err() {
                    return;
                }
            }
        }
        let Some((snap, rx)) = rewatch(dir.as_ref(), prefix, &events).await else {
            return;
        };
        snapshot = Some(snap);
        changes_rx = rx;
    }
}

/// Watches `prefix` again after its watch ended, retrying until it works (the directory may
/// be away for a while); `None` once the event loop is gone.
async fn rewatch(dir: &dyn Directory, prefix: &str, events: &Events) -> Option<Snapshot> {
    warn!("directory watch of {prefix} ended; watching again");
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        tokio::time::sleep(pause).await;
        if events.is_closed() {
            return None;
        }
        match dir.watch(prefix).await {
            Ok(w) => {
                info!("watching {prefix} again");
                return Some(w);
            }
            Err(e) => error!("directory watch of {prefix} failed: {e}; retrying"),
        }
        pause = (pause * 2).min(std::time::Duration::from_secs(2));
    }
}

/// What a watch starts with: the entries, then the changes after them.
type Snapshot = (Vec<(String, Versioned)>, mpsc::UnboundedReceiver<DirEvent>);

/// The core's inputs for what `migr/` shows: decided migrations this node may have missed
/// the broadcast of (applying a known outcome twice is a no-op, so a snapshot is replayed
/// whole).
fn migration_events(seen: Seen) -> Vec<Event> {
    written(seen)
        .iter()
        .filter_map(|(k, v)| record_of(k, v))
        .map(|(dc, ep, record)| {
            Event::Input(Input::Directory(DirectoryInput::MigrRecordChanged {
                dc,
                ep,
                record,
            }))
        })
        .collect()
}

/// Runs the jobs in order until the event loop drops the queue.
async fn worker(
    dir: Arc<dyn Directory>,
    me: NodeId,
    mut jobs: mpsc::UnboundedReceiver<DirJob>,
    events: Events,
) {
    let me = me.to_string();
    while let Some(job) = jobs.recv().await {
        let answer = match job {
            DirJob::Core(req) => execute(dir.as_ref(), &me, req).await,
            DirJob::Launch(record) => {
                launch_record(dir.as_ref(), record).await;
                None
            }
            DirJob::Owners { endpoints, reply } => {
                let mut owners = Vec::with_capacity(endpoints.len());
                for (dc, ep) in endpoints {
                    let owner = match dir.get(&endpoint_key(dc, ep)).await {
                        Ok(v) => v.and_then(|v| v.value.parse::<NodeId>().ok()),
                        // Unknown: keep the copy (the lease is held again, so nobody else
                        // took over the node's endpoints through it).
                        Err(e) => {
                            warn!("cannot read the owner of {dc}/{ep}: {e}");
                            Some(me.parse().unwrap_or_default())
                        }
                    };
                    owners.push(((dc, ep), owner));
                }
                let _ = reply.send(owners);
                None
            }
        };
        if let Some(answer) = answer {
            if events
                .send(Event::Input(Input::Directory(answer)))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Carries out one of the core's requests; returns the answer the core waits for, if any.
async fn execute(dir: &dyn Directory, me: &str, req: DirRequest) -> Option<DirectoryInput> {
    match req {
        DirRequest::Register { conn, dc, ep } => {
            let k = endpoint_key(dc, ep);
            let result = match dir.cas(&k, None, Some(me.to_string())).await {
                Ok(CasOutcome::Done { .. }) => Ok(()),
                // Named this node: a local race the core resolves itself.
                Ok(CasOutcome::Conflict { current: Some(v) }) if v.value == me => Ok(()),
                Ok(CasOutcome::Conflict { current }) => {
                    let holder = current.map(|v| v.value).unwrap_or_default();
                    info!("bind of {k} refused: already bound on node {holder}");
                    Err(Errno::AlreadyBound)
                }
                Err(e) => {
                    error!("directory: cannot register {k}: {e}");
                    Err(Errno::DirectoryUnavailable)
                }
            };
            Some(DirectoryInput::Registered { conn, result })
        }
        DirRequest::Unregister { dc, ep } => {
            let k = endpoint_key(dc, ep);
            match dir.get(&k).await {
                Ok(Some(v)) if v.value == me => {
                    if let Err(e) = dir.cas(&k, Some(v.version), None).await {
                        error!("directory: cannot unregister {k}: {e}");
                    }
                }
                Ok(_) => {}
                Err(e) => error!("directory: cannot read {k}: {e}"),
            }
            None
        }
        // Answered once every job queued before it is done (jobs run in order).
        DirRequest::Sync { conn } => Some(DirectoryInput::Synced { conn }),
        DirRequest::Lookup { dc, ep } => {
            let k = endpoint_key(dc, ep);
            let node = match dir.get(&k).await {
                Ok(v) => v.and_then(|v| v.value.parse::<NodeId>().ok()),
                Err(e) => {
                    error!("directory: cannot look up {k}: {e}");
                    None
                }
            };
            Some(DirectoryInput::Located { dc, ep, node })
        }
        DirRequest::Relocate { id, dc, ep, node } => {
            // A decided move that the directory does not show would send callers to the old
            // node (and a restart there would drop the key): retry while the directory is
            // away, for a while. Later jobs wait behind it, which keeps their order.
            let k = endpoint_key(dc, ep);
            let mut pause = std::time::Duration::from_millis(100);
            for attempt in 1..=RELOCATE_ATTEMPTS {
                match relocate(dir, id, dc, ep, node).await {
                    Ok(()) => break,
                    Err(e) if attempt == RELOCATE_ATTEMPTS => {
                        error!("directory: cannot relocate {k} to node {node}: {e}; giving up")
                    }
                    Err(e) => {
                        warn!("directory: cannot relocate {k} to node {node} yet: {e}; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(std::time::Duration::from_secs(2));
                    }
                }
            }
            None
        }
        DirRequest::WriteMigrRecord {
            id,
            dc,
            ep,
            record,
            require,
        } => {
            let result = write_record(dir, dc, ep, record, require).await;
            Some(DirectoryInput::MigrRecordWritten { id, result })
        }
        DirRequest::ReadMigrRecord { id, dc, ep } => {
            let k = migr_key(dc, ep);
            match dir.get(&k).await {
                Ok(v) => {
                    let record = v.and_then(|v| MigrRecord::parse(&v.value));
                    Some(DirectoryInput::MigrRecordRead { id, dc, ep, record })
                }
                Err(e) => {
                    // Unknown is not "absent": keep holding, the next check asks again.
                    error!("directory: cannot read {k}: {e}");
                    None
                }
            }
        }
    }
}

/// Writes or reads a launch record.
async fn launch_record(dir: &dyn Directory, record: LaunchRecord) {
    match record {
        LaunchRecord::Put { dc, ep, cmd } => {
            let k = launch_key(dc, ep);
            let value = serde_json::to_string(&cmd).expect("strings encode");
            if let Err(e) = put(dir, &k, value).await {
                error!("directory: cannot write {k}: {e}");
            }
        }
        LaunchRecord::Get { dc, ep, reply } => {
            let _ = reply.send(get_launch(dir, dc, ep).await);
        }
    }
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

/// Records that `{dc, ep}` runs on `node` after migration `id` committed, unless the
/// endpoint's migration record shows that it has moved on since (a relocation that lands
/// late must not undo a later move; see `MigrRecord::places_at`). The endpoint's entry is read first and written with a compare-and-set
/// on that version, so a move recorded in between is seen on the next try.
async fn relocate(
    dir: &dyn Directory,
    id: dvs_wire::peer::MigrationId,
    dc: DcId,
    ep: Ep,
    node: NodeId,
) -> Result<(), String> {
    let k = endpoint_key(dc, ep);
    for _ in 0..5 {
        let current = dir.get(&k).await.map_err(|e| e.to_string())?;
        let record = dir
            .get(&migr_key(dc, ep))
            .await
            .map_err(|e| e.to_string())?
            .and_then(|v| MigrRecord::parse(&v.value));
        if !record.is_some_and(|r| r.places_at(id, node)) {
            info!("not relocating {k} to node {node}: a later migration moved it elsewhere");
            return Ok(());
        }
        if current
            .as_ref()
            .is_some_and(|v| v.value == node.to_string())
        {
            return Ok(());
        }
        match dir
            .cas(&k, current.map(|v| v.version), Some(node.to_string()))
            .await
            .map_err(|e| e.to_string())?
        {
            CasOutcome::Done { .. } => return Ok(()),
            CasOutcome::Conflict { .. } => continue,
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
