//! The node kernel core: M3-IPC semantics over local connections and peer links.
//!
//! Inputs are method calls (`on_*`, [`NodeCore::handle_timeout`]) carrying the current time;
//! outputs are [`Action`]s taken with [`NodeCore::poll_action`]. Every local request gets
//! exactly one [`LocalAction::Respond`], possibly much later (blocking calls).

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use dvs_wire::local::LocalResponse;
use dvs_wire::{DcId, Ep, Errno, NodeId};

use crate::table::{EndpointTable, Registration};
use crate::{ConnId, OpId};
use crate::{Map, Set};

pub mod action;
mod conn;
mod endpoint_port;
pub mod input;
mod ipc;
mod ledger;
pub mod migration;
pub mod peer_check;
mod remote;
mod resolve;
mod timers;
mod vcopy;
pub mod vcopy_in;
pub use action::{
    Action, DirRequest, LocalAction, MemoryAction, PeerAction, ProcessAction, Report,
    VcopyCompletion,
};
use conn::{Blocked, Conn};
pub use input::{DirectoryInput, Input, MigrationInput, Ticket};
use ledger::RemoteCalls;
use migration::MigrationState;
use resolve::Waiters;
use timers::{TimerKey, Timers};
use vcopy::{Op, Vcopies};

/// Largest `vcopy` in one call.
pub const VCOPY_MAX: u64 = 16 << 20;

/// Extra time a caller waits for a remote node's own timeout verdict before giving up locally.
pub(super) const REMOTE_GRACE: Duration = Duration::from_millis(200);

/// What the core needs to know of one DC.
#[derive(Clone, Debug)]
pub struct DcInfo {
    /// DC id.
    pub id: DcId,
    /// Nodes the DC spans.
    pub nodes: BTreeSet<NodeId>,
    /// Endpoints are `0..max_endpoints`.
    pub max_endpoints: u32,
    /// Most messages queued for one endpoint.
    pub max_queue: u32,
    /// Uids whose processes may bind endpoints of this DC without having been launched for
    /// them by the node.
    pub bind_uids: BTreeSet<u32>,
}

/// Who is at the other end of a local connection, as the daemon learnt it from the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalPeer {
    /// Pid as seen by the node kernel (0 if unknown).
    pub pid: i32,
    /// Uid of the process that connected.
    pub uid: u32,
    /// The endpoint the node launched this process (or an ancestor of it) for, or restored it
    /// as; such a process may bind only that endpoint.
    pub launched_for: Option<(DcId, Ep)>,
}

impl LocalPeer {
    /// A process the node did not launch, running as `uid`.
    pub fn unlaunched(pid: i32, uid: u32) -> Self {
        LocalPeer {
            pid,
            uid,
            launched_for: None,
        }
    }
}

/// What the core needs to know of the cluster.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// This node.
    pub node: NodeId,
    /// Every DC of the cluster.
    pub dcs: Vec<DcInfo>,
    /// Where this node's migration ids start (low 48 bits; the node id fills the top 16), so
    /// that a restarted node does not reuse the ids of its previous run.
    pub migration_seed: u64,
}

/// The core of one node kernel.
pub struct NodeCore {
    node: NodeId,
    dcs: Map<DcId, DcInfo>,
    table: EndpointTable,
    conns: Map<ConnId, Conn>,
    links_up: Set<NodeId>,
    next_op: OpId,
    /// Every call crossing a node boundary.
    calls: RemoteCalls,
    /// Processes waiting on the directory about an endpoint.
    waiters: Waiters,
    /// Vcopies of local callers and vcopies streaming into this node.
    vcopies: Vcopies,
    /// Peers that sent a forged frame; their frames are dropped until the link is new.
    condemned: Set<NodeId>,
    timers: Timers,
    actions: VecDeque<Action>,
    migr: MigrationState,
    /// Time of the latest event, for the few inputs that carry none (link down, snapshot).
    last_now: Option<Instant>,
}

pub(super) fn err(e: Errno) -> LocalResponse {
    LocalResponse::Err(e)
}

impl NodeCore {
    /// A core for node `cfg.node` with no connections and no registrations.
    pub fn new(cfg: CoreConfig) -> Self {
        let mut core = NodeCore {
            node: cfg.node,
            dcs: cfg.dcs.into_iter().map(|d| (d.id, d)).collect(),
            table: EndpointTable::default(),
            conns: Map::default(),
            links_up: Set::default(),
            next_op: 1,
            calls: RemoteCalls::default(),
            waiters: Waiters::default(),
            vcopies: Vcopies::default(),
            condemned: Set::default(),
            timers: Timers::default(),
            actions: VecDeque::new(),
            migr: MigrationState::default(),
            last_now: None,
        };
        core.set_migration_seed(cfg.migration_seed);
        core
    }

    /// Handles one event at time `now`; the actions it causes are taken with
    /// [`NodeCore::poll_action`]. This is the only way to change the core's state.
    pub fn handle(&mut self, now: Instant, input: Input) {
        self.last_now = Some(now);
        match input {
            Input::LocalConnect { conn, peer } => self.on_local_connect(conn, peer),
            Input::LocalDisconnect { conn } => self.on_local_disconnect(conn),
            Input::LocalRequest { conn, req } => self.on_local_request(conn, req, now),
            Input::LinkUp { node } => self.on_link_up(node),
            Input::LinkDown { node } => self.on_link_down(node),
            Input::PeerFrame { from, frame } => self.on_peer_frame(from, frame, now),
            Input::VcopyChunk { from, chunk, data } => {
                if let Some(pid) = self.on_vcopy_chunk(from, &chunk) {
                    self.actions
                        .push_back(Action::Memory(MemoryAction::WriteChunk {
                            pid,
                            from,
                            chunk,
                            data,
                        }));
                }
            }
            Input::VcopyChunkWritten {
                from,
                chunk,
                result,
            } => self.on_vcopy_chunk_written(from, &chunk, result),
            Input::VcopyLocalDone { done, result } => self.on_vcopy_local_done(done, result),
            Input::VcopyStreamFailed {
                caller_node,
                op,
                error,
            } => self.on_vcopy_stream_failed(caller_node, op, error),
            Input::Directory(d) => self.handle_directory(now, d),
            Input::Migration(m) => self.handle_migration(now, m),
            Input::Timeout => self.handle_timeout(now),
        }
    }

    fn handle_directory(&mut self, now: Instant, input: DirectoryInput) {
        match input {
            DirectoryInput::Registered { conn, result } => self.on_register_result(conn, result),
            DirectoryInput::Synced { conn } => self.on_directory_synced(conn),
            DirectoryInput::Located { dc, ep, node } => self.on_lookup_result(dc, ep, node, now),
            DirectoryInput::Changed { dc, ep, node } => self.on_directory_update(dc, ep, node),
            DirectoryInput::RegisterRemote {
                ticket,
                dc,
                ep,
                node,
                backup,
            } => {
                let result = self.register_remote(dc, ep, node, backup);
                self.actions
                    .push_back(Action::Report(Report::Registered { ticket, result }));
            }
            DirectoryInput::MigrRecordWritten { id, result } => {
                self.on_migr_record_result(id, result, now)
            }
            DirectoryInput::MigrRecordRead { id, dc, ep, record } => {
                self.on_migr_record_read(id, dc, ep, record, now)
            }
            DirectoryInput::MigrRecordChanged { dc, ep, record } => {
                self.on_migr_record(dc, ep, record, now)
            }
            DirectoryInput::DcNodes { dc, nodes } => {
                // Checks against the DC's nodes read this set from now on; what runs is left
                // as it is (the operator's command refuses to drop a node that runs endpoints
                // of the DC).
                if let Some(info) = self.dcs.get_mut(&dc) {
                    info.nodes = nodes;
                }
            }
        }
    }

    /// The nodes DC `dc` spans now, if it exists.
    pub fn dc_nodes(&self, dc: DcId) -> Option<&BTreeSet<NodeId>> {
        self.dcs.get(&dc).map(|d| &d.nodes)
    }

    fn handle_migration(&mut self, now: Instant, input: MigrationInput) {
        match input {
            MigrationInput::Start { ticket, req } => {
                let before = self.actions.len();
                let result = self.start_migration(req, now);
                // The acceptance goes before the progress the start queued.
                self.actions.insert(
                    before,
                    Action::Report(Report::MigrationAccepted { ticket, result }),
                );
            }
            MigrationInput::CheckpointDone { id, result } => {
                self.on_checkpoint_done(id, result, now)
            }
            MigrationInput::ImageSent { id, result } => self.on_image_sent(id, result, now),
            MigrationInput::ImageChunk { id, bytes } => self.on_image_chunk(id, bytes, now),
            MigrationInput::Restored { id, result } => self.on_restored(id, result, now),
        }
    }

    /// The time of the event being handled.
    fn now(&self) -> Instant {
        self.last_now.expect("set by handle before anything runs")
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`NodeCore::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Every registration this node holds, sorted.
    pub fn registrations(&self) -> Vec<(DcId, Ep, Registration)> {
        self.table.entries()
    }

    /// The pid of the process bound to local endpoint `{dc, ep}`.
    pub fn local_pid(&self, dc: DcId, ep: Ep) -> Option<i32> {
        match self.table.get(dc, ep)? {
            Registration::Local { conn } => self.conns.get(&conn).map(|c| c.pid),
            _ => None,
        }
    }

    /// Whether calls to `{dc, ep}` are held here because it is migrating.
    pub fn migrating(&self, dc: DcId, ep: Ep) -> bool {
        self.migr.holds(dc, ep)
    }

    /// Whether the link to `node` is up.
    pub fn link_up(&self, node: NodeId) -> bool {
        self.links_up.contains(&node)
    }

    // ----- local connections -------------------------------------------------------------

    // ----- bind --------------------------------------------------------------------------

    // ----- resolution --------------------------------------------------------------------

    // ----- send / sendrec ----------------------------------------------------------------

    // ----- receive -----------------------------------------------------------------------

    // ----- reply -------------------------------------------------------------------------

    // ----- notify ------------------------------------------------------------------------

    // ----- wait_for_bind -----------------------------------------------------------------

    // ----- vcopy -------------------------------------------------------------------------

    // ----- peers -------------------------------------------------------------------------

    // ----- timers ------------------------------------------------------------------------
}
